"""Behaviour-cloning baselines. BC-All imitates every transition; BC-Safe only the transitions of episodes
whose total cost is within the limit:  L = sum_b w_b l_b / sum_b w_b,  w_b = 1[episode cost <= limit]."""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from lightning.pytorch.utilities import rank_zero_info

from lightning_saferl.base import SafeRLModule
from lightning_saferl.errors import InputError
from lightning_saferl.nets import DeterministicPolicy, TanhGaussianPolicy


class BCAll(SafeRLModule):
    """l = ||pi(s) - a||^2 (deterministic tanh MLP) or -log pi(a|s) (tanh-Gaussian)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 head: Literal["deterministic", "gaussian"] = "deterministic", lr: float = 1e-3,
                 cosine_decay_steps: Optional[int] = None):
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.cosine_decay_steps = lr, cosine_decay_steps
        head_cls = {"deterministic": DeterministicPolicy, "gaussian": TanhGaussianPolicy}[head]
        self.policy = head_cls(obs_dim, act_dim, tuple(hidden_dims))

    def losses(self, batch: dict):
        obs, actions = batch["observations"], batch["actions"]
        if self.hparams.head == "deterministic":
            per_sample = (self.policy(obs) - actions).square().sum(-1)
        else:
            per_sample = -self.policy.log_prob(obs, actions)
        if self.sample_weights is None:
            loss = per_sample.mean()
        else:
            w = self.sample_weights[batch["index"]]
            loss = (w * per_sample).sum() / w.sum().clamp(min=1.0)
        return {"bc_loss": loss}, {}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.mode(obs)


class BCSafe(BCAll):
    """BC-All on the episodes whose total cost is within `cost_limit`: an undiscounted episode budget (the sum of the
    costs of one episode, as in the data); the other transitions get weight 0."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 head: Literal["deterministic", "gaussian"] = "deterministic", lr: float = 1e-3,
                 cosine_decay_steps: Optional[int] = None, cost_limit: float = 0.0):
        super().__init__(obs_dim, act_dim, hidden_dims, head, lr, cosine_decay_steps)

    def compute_sample_weights(self, data) -> torch.Tensor:
        safe_episode = data.episode_costs() <= self.hparams.cost_limit
        weights = safe_episode[data.episode_index()].to(data.observations.dtype)
        if weights.sum() == 0:
            raise InputError(f"BCSafe: no episode has total cost <= {self.hparams.cost_limit}; "
                             "raise cost_limit or use BCAll.")
        rank_zero_info(f"BCSafe keeps {int(weights.sum())}/{len(weights)} transitions "
                   f"({int(safe_episode.sum())}/{len(safe_episode)} episodes)")
        return weights
