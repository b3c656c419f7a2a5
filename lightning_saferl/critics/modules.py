"""Critic LightningModules: a Q ensemble and a V network trained together with one optimiser.

    L = L_V + L_Q,   L_Q = mean_members mean_b (Q_i(s, a) - y)^2,   y built from V(s') (no gradient),
    L_V = expectile loss of (Q_target(s, a) - V(s))   with Q_target = reduce_members(target Q) (no gradient).
Target Q networks follow Q by Polyak averaging after each optimiser step. L_Q averages over the members as the
official FISOR code does (ZhengYinan-AIR/FISOR @2097e8b, jaxrl5/agents/fisor/fisor.py: `((qs - target_q) ** 2).mean()`).

RewardCritic      IQL: reduce = min, y = r + gamma mask V(s'), upper expectile.
CostCritic        discounted cost, pessimistic: reduce = max, y = c + gamma mask V_c(s'), upper expectile.
FeasibilityCritic HJ reachability: reduce = max, y = hj_target(h, V_h(s')), reversed expectile;
                  a state is feasible when V_h(s) <= 0. With ``failure_violation`` v (off: None, the reference),
                  a failed termination (the batch's ``failures``, e.g. PointRobot leaving its arena) takes
                  y = max(h, v) instead of h: the episode's end is not mistaken for safety.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from lightning_saferl.base import SafeRLModule
from lightning_saferl.critics.losses import (
    constraint_signal, expectile_loss, hj_target, reversed_expectile_loss, td_target,
)
from lightning_saferl.errors import InputError
from lightning_saferl.nets import QEnsemble, ValueNet, polyak_update


class _QVCritic(SafeRLModule):
    reduce_members = "min"

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), num_q: int = 2,
                 expectile: float = 0.9, discount: float = 0.99, tau: float = 0.005, lr: float = 3e-4):
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.discount, self.tau, self.expectile = lr, discount, tau, expectile
        self.q = QEnsemble(obs_dim, act_dim, tuple(hidden_dims), num_q)
        self.v = ValueNet(obs_dim, tuple(hidden_dims))
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)

    # -- what differs between critics -------------------------------------------------------------------
    def signal(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def target(self, signal: torch.Tensor, next_value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return td_target(signal, next_value, mask, self.discount)

    def batch_target(self, batch: dict) -> torch.Tensor:
        """The Q regression target y of a batch (no gradient)."""
        return self.target(self.signal(batch), self.v(batch["next_observations"]), batch["masks"])

    def value_loss(self, diff: torch.Tensor) -> torch.Tensor:
        return expectile_loss(diff, self.expectile)

    # -- shared -----------------------------------------------------------------------------------------
    def q_value(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Member-reduced target Q(s, a): the conservative estimate actors use."""
        return self.reduce(self.q_target(obs, act))

    def q_value_rows(self, obs: torch.Tensor, rows: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(S, obs_dim), (R,) state indices, (R, act_dim) -> (R,): `q_value(obs[rows], act)` with the state's part
        of the first layer computed once per state (many actions scored at few states; equal up to float rounding)."""
        return self.reduce(self.q_target.of_rows(obs, rows, act))

    def reduce(self, qs: torch.Tensor) -> torch.Tensor:
        """(E, ...) member values -> (...): the min (reward) or max (cost, feasibility) over members."""
        return qs.min(0).values if self.reduce_members == "min" else qs.max(0).values

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs)

    def losses(self, batch: dict):
        obs, act = batch["observations"], batch["actions"]
        with torch.no_grad():
            q_target = self.q_value(obs, act)
            y = self.batch_target(batch)
        v = self.v(obs)
        qs = self.q(obs, act)
        losses = {"value_loss": self.value_loss(q_target - v),
                  "q_loss": (qs - y).square().mean()}
        return losses, {"q_mean": qs.detach().mean(), "v_mean": v.detach().mean()}

    def after_optimizer_step(self) -> None:
        polyak_update(self.q_target, self.q, self.tau)


class RewardCritic(_QVCritic):
    """IQL reward critic (Q ensemble min, upper expectile V)."""

    reduce_members = "min"

    def signal(self, batch: dict) -> torch.Tensor:
        return batch["rewards"]


class CostCritic(_QVCritic):
    """Discounted cost critic, pessimistic: Q_c is the max over members, V_c an upper expectile."""

    reduce_members = "max"

    def signal(self, batch: dict) -> torch.Tensor:
        return batch["costs"]


class FeasibilityCritic(_QVCritic):
    """Hamilton-Jacobi feasibility critic: Q_h max over members, V_h by reversed expectile, V_h(s) <= 0 feasible.

    h is the dataset's `constraint_values` when present and `use_constraint_values`, else
    +cost_scale where cost > 0 and -1 elsewhere. ``failure_violation`` (module docstring; None, the reference, keeps
    y = h at every termination) needs the data module's ``failures`` column (PointRobot: out-of-bounds terminations).
    """

    reduce_members = "max"

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), num_q: int = 2,
                 expectile: float = 0.9, discount: float = 0.99, tau: float = 0.005, lr: float = 3e-4,
                 cost_scale: float = 25.0, use_constraint_values: bool = True,
                 failure_violation: Optional[float] = None):
        super().__init__(obs_dim, act_dim, hidden_dims, num_q, expectile, discount, tau, lr)
        if failure_violation is not None and failure_violation <= 0:
            raise InputError(f"FeasibilityCritic: failure_violation is a violation (h > 0) or null, got "
                             f"{failure_violation}")
        self.cost_scale, self.use_constraint_values = cost_scale, use_constraint_values
        self.failure_violation = failure_violation

    @property
    def feasibility_critic(self) -> "FeasibilityCritic":
        return self

    def signal(self, batch: dict) -> torch.Tensor:
        if self.use_constraint_values and "constraint_values" in batch:
            return batch["constraint_values"]
        return constraint_signal(batch["costs"], self.cost_scale)

    def target(self, signal: torch.Tensor, next_value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hj_target(signal, next_value, mask, self.discount)

    def batch_target(self, batch: dict) -> torch.Tensor:
        y = super().batch_target(batch)
        if self.failure_violation is None:
            return y
        if "failures" not in batch:
            raise InputError("FeasibilityCritic: failure_violation needs the batch's 'failures' column (the data "
                             "module gives it for PointRobot); set failure_violation: null for this task")
        return torch.where(batch["failures"] > 0, y.clamp(min=self.failure_violation), y)

    def value_loss(self, diff: torch.Tensor) -> torch.Tensor:
        return reversed_expectile_loss(diff, self.expectile)

    def feasible(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value(obs) <= 0
