"""A compact PPO-Lagrangian agent (on-policy, Gaussian policy) for building DSRL-style datasets.

Why not FSRL (PyPI ``fast-safe-rl``, the trainers DSRL's authors used): it imports only with ``numpy<2``,
``setuptools<81`` and ``sentry-sdk<2`` pinned (tianshou 0.5.1, wandb 0.14), which clash with this package's
environment, so it would need an environment of its own driven by a subprocess; the agent needed for data
collection is small enough to own, test and seed here (one torch file, no extra dependency).

The agent (one env batch of ``num_envs`` simulators, rollouts of ``horizon`` steps per env):

* observations normalised by running mean / variance (updated from each rollout before the update);
* actor: MLP(obs) -> mean, state-independent ``log_std``; actions ``a ~ N(mean, std)``, the env receives
  ``clip(a, -1, 1)``, log-probabilities are of the unclipped ``a``;
* critic: MLP(obs) -> (V_r, V_c), the reward and cost value heads;
* GAE for both signals: ``delta_t = x_t + g (1 - term_t) V(s_{t+1}) - V(s_t)``,
  ``A_t = delta_t + g lam (1 - end_t) A_{t+1}`` where ``end_t`` marks the end of an episode (termination or
  time limit; at a time limit ``V(s_{t+1})`` bootstraps) and the rollout's last step bootstraps from the value of
  the next observation; value targets ``A_t + V(s_t)``;
* policy loss: ``-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A))``, ``rho = pi(a|s) / pi_old(a|s)``, with the
  Lagrangian advantage ``A = (A_r - lambda A_c) / (1 + lambda)``, normalised over the rollout;
* multiplier (PID Lagrangian): with ``e = J_c - d`` (``J_c`` the mean cost of the episodes that ended in the
  rollout, ``d`` the episode-cost threshold), ``I <- max(0, I + e)``,
  ``lambda = max(0, k_p e + k_i I + k_d max(0, J_c - J_c_prev))``; ``k_p = k_d = 0`` is plain gradient ascent
  on lambda with step ``k_i``. An unconstrained agent has ``d = inf`` and lambda 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = ["PPOLagConfig", "PPOLagrangian", "PIDLagrangian", "RunningNorm", "gae", "clipped_surrogate",
           "lagrangian_advantage"]


@dataclass
class PPOLagConfig:
    """Hyper-parameters of `PPOLagrangian` (defaults: common PPO settings for small continuous-control tasks)."""

    hidden: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    epochs: int = 10
    minibatch: int = 500
    init_log_std: float = -0.5
    max_grad_norm: float = 0.5
    kp: float = 0.05
    ki: float = 0.005
    kd: float = 0.1


def gae(values: torch.Tensor, signal: torch.Tensor, next_values: torch.Tensor, terminals: torch.Tensor,
        ends: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates (module docstring) for arrays of shape (T, ...) in time order.

    ``next_values``: V(s_{t+1}) of each step; ``terminals``: 1 where the env terminated (no bootstrap);
    ``ends``: 1 where the episode ended (termination or time limit: the recursion restarts).
    """
    deltas = signal + gamma * (1.0 - terminals) * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[0])
    for t in range(len(values) - 1, -1, -1):
        running = deltas[t] + gamma * lam * (1.0 - ends[t]) * running
        advantages[t] = running
    return advantages


def lagrangian_advantage(reward_adv: torch.Tensor, cost_adv: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``(A_r - lambda A_c) / (1 + lambda)``, then normalised to zero mean and unit std."""
    adv = (reward_adv - multiplier * cost_adv) / (1.0 + multiplier)
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor,
                      clip: float) -> torch.Tensor:
    """PPO's loss ``-mean(min(rho A, clip(rho, 1 - clip, 1 + clip) A))``, ``rho = exp(log_prob - old_log_prob)``."""
    ratio = torch.exp(log_prob - old_log_prob)
    return -torch.min(ratio * advantage, ratio.clamp(1.0 - clip, 1.0 + clip) * advantage).mean()


class PIDLagrangian:
    """The Lagrange multiplier of a cost threshold (module docstring); ``update(J_c)`` returns the new lambda."""

    def __init__(self, threshold: float, kp: float, ki: float, kd: float):
        self.threshold, self.kp, self.ki, self.kd = float(threshold), kp, ki, kd
        self.integral = 0.0
        self.previous_cost: Optional[float] = None
        self.multiplier = 0.0

    def update(self, episode_cost: float) -> float:
        if math.isinf(self.threshold):
            return self.multiplier
        error = episode_cost - self.threshold
        self.integral = max(0.0, self.integral + error)
        rise = 0.0 if self.previous_cost is None else max(0.0, episode_cost - self.previous_cost)
        self.previous_cost = episode_cost
        self.multiplier = max(0.0, self.kp * error + self.ki * self.integral + self.kd * rise)
        return self.multiplier

    def state_dict(self) -> dict:
        return {"integral": self.integral, "previous_cost": self.previous_cost, "multiplier": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.previous_cost, self.multiplier = state["integral"], state["previous_cost"], \
            state["multiplier"]


class RunningNorm(nn.Module):
    """Observation normaliser: ``clip((x - mean) / sqrt(var + 1e-8), -10, 10)`` with running moments."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Merge the moments of the batch ``x`` (N, dim) (parallel-variance formula)."""
        x = x.to(torch.float64)
        n, mean, var = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        self.var.copy_((self.var * self.count + var * n + delta**2 * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean.float()) / torch.sqrt(self.var.float() + 1e-8)).clamp(-10.0, 10.0)


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, out))


class PPOLagrangian(nn.Module):
    """Actor, two-headed critic, observation normaliser, optimisers and the multiplier of one agent."""

    def __init__(self, obs_dim: int, act_dim: int, threshold: float, config: PPOLagConfig,
                 generator: torch.Generator):
        super().__init__()
        self.config = config
        self.generator = generator
        self.norm = RunningNorm(obs_dim)
        self.actor = _mlp(obs_dim, config.hidden, act_dim)
        self.log_std = nn.Parameter(torch.full((act_dim,), config.init_log_std))
        self.critic = _mlp(obs_dim, config.hidden, 2)
        self.actor_opt = torch.optim.Adam([*self.actor.parameters(), self.log_std], lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.lagrangian = PIDLagrangian(threshold, config.kp, config.ki, config.kd)

    def distribution(self, normed_obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.actor(normed_obs), self.log_std.exp())

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unclipped sampled actions, their log-probabilities) for a batch of raw observations."""
        mean = self.actor(self.norm(torch.as_tensor(obs, dtype=torch.float32)))
        noise = torch.randn(mean.shape, generator=self.generator)
        action = mean + self.log_std.exp() * noise
        log_prob = torch.distributions.Normal(mean, self.log_std.exp()).log_prob(action).sum(-1)
        return action.numpy(), log_prob.numpy()

    def update(self, rollout: dict[str, torch.Tensor], episode_cost: Optional[float]) -> dict[str, float]:
        """One PPO-Lagrangian update from a rollout of shape (T, num_envs, ...) (keys: observations,
        next_observations, actions, log_probs, rewards, costs, terminals, ends). ``episode_cost``: mean cost of
        the episodes that ended in it (None: the multiplier is left as it is)."""
        cfg = self.config
        if episode_cost is not None:
            self.lagrangian.update(episode_cost)
        steps, envs = rollout["rewards"].shape
        self.norm.update(rollout["observations"].reshape(steps * envs, -1))
        with torch.no_grad():
            values = self.critic(self.norm(rollout["observations"]))
            next_values = self.critic(self.norm(rollout["next_observations"]))
            advantages = torch.stack([
                gae(values[..., k], rollout[signal], next_values[..., k], rollout["terminals"], rollout["ends"],
                    cfg.gamma, cfg.gae_lambda) for k, signal in enumerate(("rewards", "costs"))], dim=-1)
            targets = (advantages + values).reshape(steps * envs, 2)
            policy_adv = lagrangian_advantage(advantages[..., 0], advantages[..., 1],
                                              self.lagrangian.multiplier).reshape(-1)
        obs = self.norm(rollout["observations"]).reshape(steps * envs, -1)
        actions = rollout["actions"].reshape(steps * envs, -1)
        old_log_probs = rollout["log_probs"].reshape(-1)
        policy_losses, value_losses = [], []
        for _ in range(cfg.epochs):
            order = torch.randperm(steps * envs, generator=self.generator)
            for start in range(0, len(order), cfg.minibatch):
                idx = order[start:start + cfg.minibatch]
                log_prob = self.distribution(obs[idx]).log_prob(actions[idx]).sum(-1)
                policy_loss = clipped_surrogate(log_prob, old_log_probs[idx], policy_adv[idx], cfg.clip)
                self.actor_opt.zero_grad()
                policy_loss.backward()
                nn.utils.clip_grad_norm_([*self.actor.parameters(), self.log_std], cfg.max_grad_norm)
                self.actor_opt.step()
                value_loss = ((self.critic(obs[idx]) - targets[idx]) ** 2).mean()
                self.critic_opt.zero_grad()
                value_loss.backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.critic_opt.step()
                policy_losses.append(policy_loss.item())
                value_losses.append(value_loss.item())
        return {"policy_loss": float(np.mean(policy_losses)), "value_loss": float(np.mean(value_losses)),
                "multiplier": self.lagrangian.multiplier}

    def full_state(self) -> dict:
        """Everything that fixes the agent's future: weights, optimisers, multiplier, its random generator."""
        return {"modules": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "lagrangian": self.lagrangian.state_dict(),
                "generator": self.generator.get_state(), "config": asdict(self.config)}

    def load_full_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.generator.set_state(state["generator"])
