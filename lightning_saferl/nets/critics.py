"""Critic networks: an ensemble Q(s, a) -> (E, B) and a state value V(s) -> (B,)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_saferl.nets.mlp import MLP, EnsembleMLP


class QEnsemble(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), num_members: int = 2,
                 activation: str = "relu"):
        super().__init__()
        self.net = EnsembleMLP(num_members, obs_dim + act_dim, 1, hidden_dims, activation)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], dim=-1)).squeeze(-1)

    def of_rows(self, obs: torch.Tensor, rows: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(S, obs_dim), (R,) state indices, (R, act_dim) -> (E, R): Q(obs[rows[r]], act[r]), the state's part of
        the first layer computed once per state (`EnsembleMLP.forward_rows`)."""
        return self.net.forward_rows(obs, rows, act).squeeze(-1)


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, hidden_dims: Sequence[int] = (256, 256), activation: str = "relu"):
        super().__init__()
        self.net = MLP(obs_dim, 1, hidden_dims, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)
