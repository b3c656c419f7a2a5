"""Plain and ensemble MLPs. An ensemble runs all members as one batched matmul (no Python loop)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def _activation(name: str) -> nn.Module:
    table = {"relu": nn.ReLU, "mish": nn.Mish, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


class MLP(nn.Sequential):
    """Linear -> act -> ... -> Linear(out_dim); no activation after the last layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 activation: str = "relu"):
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(in_dim, width), _activation(activation)]
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied at once: (E, B, in) -> (E, B, out) by one batched matmul; with out = 1
    by one product and a sum over `in` (the same map: CPU bmm with one output column is 2-5x slower than that)."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)  # same init as nn.Linear, member by member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[-1] == 1:
            return (x * self.weight.transpose(1, 2)).sum(-1, keepdim=True) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """E MLPs evaluated together. Input (B, in) is shared by all members; output is (E, B, out)."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 activation: str = "relu"):
        super().__init__()
        self.num_members = num_members
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [EnsembleLinear(num_members, in_dim, width), _activation(activation)]
            in_dim = width
        layers.append(EnsembleLinear(num_members, in_dim, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.unsqueeze(0).expand(self.num_members, *x.shape))

    def forward_rows(self, shared: torch.Tensor, rows: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """(S, d), (R,) indices into S, (R, in - d) -> (E, R, out): the forward pass of the inputs
        concat(shared[rows[r]], own[r]) without forming them. The first layer splits into W_shared x + b, computed
        once per shared row, and W_own y per row: many rows sharing an input (actions scored at one state) then
        cost one small product each (equal to `forward` up to float rounding)."""
        first, d = self.layers[0], shared.shape[-1]
        members = self.num_members
        per_shared = torch.baddbmm(first.bias, shared.unsqueeze(0).expand(members, *shared.shape),
                                   first.weight[:, :d])
        # a contiguous batch: baddbmm_ with a stride-0 batch dimension takes a slow path (250x on CPU, torch 2.13)
        own = own.unsqueeze(0).expand(members, *own.shape).contiguous()
        hidden = per_shared.index_select(1, rows).baddbmm_(own, first.weight[:, d:])
        return self.layers[1:](hidden)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, parameter by parameter (buffers copied)."""
    tgt = list(target.parameters())
    torch._foreach_lerp_(tgt, [p.detach() for p in source.parameters()], tau)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)
