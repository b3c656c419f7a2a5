"""Critic losses and targets, written next to their math (tested against hand-computed values)."""
from __future__ import annotations

import torch


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """IQL value loss, diff = Q - V:  mean |tau - 1(diff < 0)| diff^2  (tau > 0.5 pushes V up toward max Q)."""
    weight = torch.where(diff > 0, tau, 1 - tau)
    return (weight * diff.square()).mean()


def reversed_expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """FISOR feasibility value loss, diff = Q_h - V_h: weight tau where diff < 0, so V_h tracks min_a Q_h."""
    weight = torch.where(diff < 0, tau, 1 - tau)
    return (weight * diff.square()).mean()


def td_target(signal: torch.Tensor, next_value: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """Discounted sum target: x + gamma * mask * V(s')."""
    return signal + discount * mask * next_value


def fqe_loss(q, q_target, obs: torch.Tensor, actions: torch.Tensor, signal: torch.Tensor, next_obs: torch.Tensor,
             next_actions: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """Fitted Q evaluation of the policy that chose `next_actions` (a' = pi(s')), for Q ensembles (E, B):

        y_i = x + gamma mask Q'_i(s', a')  (no gradient),   L = sum_i mean_b (Q_i(s, a) - y_i)^2,

    member i bootstrapping from its own target Q'_i."""
    with torch.no_grad():
        y = td_target(signal, q_target(next_obs, next_actions), mask, discount)
    return (q(obs, actions) - y).square().mean(dim=1).sum()


def hj_target(h: torch.Tensor, next_value: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """Discounted Hamilton-Jacobi reachability target:
    (1 - gamma) h + gamma max(h, V_h(s')) for non-terminal transitions, h at terminal ones."""
    bootstrap = (1 - discount) * h + discount * torch.maximum(h, next_value)
    return mask * bootstrap + (1 - mask) * h


def constraint_signal(costs: torch.Tensor, cost_scale: float) -> torch.Tensor:
    """h from a binary cost: +cost_scale where cost > 0, -1 elsewhere."""
    return torch.where(costs > 0, torch.full_like(costs, cost_scale), torch.full_like(costs, -1.0))
