"""BCQ-Lag: batch-constrained Q-learning (Fujimoto et al. 2019) with a PID Lagrange multiplier on a cost critic,
the OSRL baseline "BCQL" (liuzuxin/OSRL, osrl/algorithms/bcql.py).

Networks: a conditional VAE G(s, z) of the dataset actions, a perturbation actor xi(s, a) that moves a VAE action by
at most phi, reward and cost critics Q_r, Q_c (2 members each) with Polyak target copies of critics and actor.
One optimiser over the summed loss; every cross-term is detached, so each network only follows its own loss:

    L_vae   = ||D(s, z) - a||^2 + beta KL(N(mu(s, a), sigma(s, a)) || N(0, I)),   z = mu + sigma eps
    y_x     = x + gamma mask max_{j<n} [lmbda min_i Q'_x,i(s', a'_j) + (1 - lmbda) max_i Q'_x,i(s', a'_j)],
              a'_j = xi'(s', G(s', z_j)),  x in {r, c}     (clipped double-Q target over n VAE candidates)
    L_x     = sum_i mean_b (Q_x,i(s, a) - y_x)^2
    L_actor = -mean_b min_i Q_r,i(s, pi(s)) + lambda mean_b (min_i Q_c,i(s, pi(s)) - q_thres),
              pi(s) = xi(s, G(s, z)),  critics held fixed in this term,

with q_thres = limit (1 - gamma^T) / ((1 - gamma) T): the discounted cost-to-go of a policy that spends the episode
budget evenly over T steps. lambda follows a PID controller on e_k = mean_b Q_c(s, pi(s)) - q_thres (`PIDLagrangian`).
Differences from OSRL: the cost target bootstraps through `mask` like the reward target (OSRL's never stops at episode
ends), and `act` selects as BCQ itself does (Fujimoto et al. 2019, Algorithm 1): of n perturbed VAE candidates the
one with the highest Q_r - lambda Q_c (OSRL acts with one perturbed VAE sample, so lambda reaches the policy only
through the phi-bounded perturbation: on PointRobot limits 2 and 10 then gave identical episodes).

The VAE, the Q threshold of the cost limit and the frozen critic call are shared with CPQ and COptiDICE
(`lightning_saferl.actors.common`).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from lightning_saferl.actors.common import ActionVAE, CostLimitedModule, frozen_call
from lightning_saferl.errors import InputError
from lightning_saferl.nets import MLP, QEnsemble, polyak_update


class PerturbationActor(nn.Module):
    """xi(s, a) = clip(a + phi tanh(MLP(s, a)), -1, 1): a bounded correction of a candidate action (tanh hidden
    units, as OSRL's MLPGaussianPerturbationActor)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int], phi: float):
        super().__init__()
        self.net = MLP(obs_dim + act_dim, act_dim, tuple(hidden_dims), activation="tanh")
        self.phi = phi

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return (actions + self.phi * torch.tanh(self.net(torch.cat([obs, actions], -1)))).clamp(-1.0, 1.0)


class PIDLagrangian(nn.Module):
    """PID Lagrange multiplier (Stooke et al. 2020, as OSRL's LagrangianPIDController), state in buffers:

        e_k = error,  I_k = relu(I_{k-1} + e_k),  lambda_k = relu(K_P relu(e_k) + K_I I_k + K_D relu(e_k - e_{k-1}))

    so lambda grows while the cost is above its threshold (e > 0) and decays to 0 below it."""

    def __init__(self, kp: float, ki: float, kd: float):
        super().__init__()
        self.kp, self.ki, self.kd = kp, ki, kd
        self.register_buffer("integral", torch.zeros(()))
        self.register_buffer("previous_error", torch.zeros(()))
        self.register_buffer("multiplier", torch.zeros(()))

    @torch.no_grad()
    def update(self, error: torch.Tensor) -> torch.Tensor:
        error = error.detach().to(self.integral.dtype)
        self.integral.copy_(torch.relu(self.integral + error))
        rise = torch.relu(error - self.previous_error)
        self.multiplier.copy_(torch.relu(self.kp * torch.relu(error) + self.ki * self.integral + self.kd * rise))
        self.previous_error.copy_(error)
        return self.multiplier.clone()


def clipped_double_q(qs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """lmbda min_i Q_i + (1 - lmbda) max_i Q_i over the members (first dimension)."""
    return lmbda * qs.min(0).values + (1.0 - lmbda) * qs.max(0).values


class BCQLag(CostLimitedModule):
    """BCQ-Lag (module docstring). Defaults: OSRL examples/configs/bcql_configs.py.

    Args:
        hidden_dims / critic_hidden_dims / vae_hidden_dim: actor, critics (2 members each) and VAE widths.
        cost_limit: undiscounted episode budget (sum of an episode's costs), turned into the per-step threshold
            of `cost_threshold`; max_episode_steps: its T (default: the datamodule's).
        reward_scale: rewards are multiplied by it (OSRL's reward_scale).
        phi: the largest perturbation; lmbda: weight of the member min in the target; num_samples: n candidates.
        vae_beta: weight of the VAE's KL term; pid: (K_P, K_I, K_D) of the multiplier.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 critic_hidden_dims: Sequence[int] = (256, 256), vae_hidden_dim: int = 400, lr: float = 1e-3,
                 cost_limit: float = 10.0, max_episode_steps: Optional[int] = None, discount: float = 0.99,
                 reward_scale: float = 1.0, tau: float = 0.005, phi: float = 0.05, lmbda: float = 0.75,
                 vae_beta: float = 0.5, num_samples: int = 10, pid: Sequence[float] = (0.1, 0.003, 0.001)):
        super().__init__()
        if len(pid) != 3:
            raise InputError(f"BCQLag: pid must be (K_P, K_I, K_D), got {pid!r}")
        self.save_hyperparameters()
        self.lr = lr
        self.vae = ActionVAE(obs_dim, act_dim, vae_hidden_dim)
        self.actor = PerturbationActor(obs_dim, act_dim, hidden_dims, phi)
        self.critic = QEnsemble(obs_dim, act_dim, tuple(critic_hidden_dims), 2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, tuple(critic_hidden_dims), 2)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.cost_critic_target = copy.deepcopy(self.cost_critic).requires_grad_(False)
        self.lagrangian = PIDLagrangian(*pid)

    def losses(self, batch: dict):
        h = self.hparams
        obs, actions, mask = batch["observations"], batch["actions"], batch["masks"]
        with torch.no_grad():  # n candidates per next state, shared by both targets
            next_rep = batch["next_observations"].repeat_interleave(h.num_samples, 0)
            next_actions = self.actor_target(next_rep, self.vae.decode(next_rep))

            def target(signal, critic):
                q_next = clipped_double_q(critic(next_rep, next_actions), h.lmbda).view(-1, h.num_samples)
                return signal + h.discount * mask * q_next.max(1).values

            y_r = target(h.reward_scale * batch["rewards"], self.critic_target)
            y_c = target(batch["costs"], self.cost_critic_target)
        q_r, q_c = self.critic(obs, actions), self.cost_critic(obs, actions)

        pi = self.actor(obs, self.vae.decode(obs).detach())
        q_r_pi = frozen_call(self.critic, obs, pi).min(0).values
        q_c_pi = frozen_call(self.cost_critic, obs, pi).min(0).values
        threshold = self.q_threshold
        multiplier = self._multiplier(q_c_pi.detach().mean() - threshold)
        losses = {"vae_loss": self.vae.loss(obs, actions, h.vae_beta),
                  "critic_loss": (q_r - y_r).square().mean(1).sum(),
                  "cost_critic_loss": (q_c - y_c).square().mean(1).sum(),
                  "actor_loss": -q_r_pi.mean() + multiplier * (q_c_pi - threshold).mean()}
        return losses, {"multiplier": multiplier, "q_cost_pi": q_c_pi.detach().mean(),
                        "q_reward_pi": q_r_pi.detach().mean()}

    def _multiplier(self, error: torch.Tensor) -> torch.Tensor:
        """lambda: updated from this batch's error while training (mean over DDP ranks), read-only otherwise."""
        if not (self.training and torch.is_grad_enabled()):
            return self.lagrangian.multiplier.clone()
        if self._trainer is not None and self.trainer.world_size > 1:
            error = self.trainer.strategy.reduce(error, reduce_op="mean")
        return self.lagrangian.update(error)

    def after_optimizer_step(self) -> None:
        tau = self.hparams.tau
        polyak_update(self.critic_target, self.critic, tau)
        polyak_update(self.cost_critic_target, self.cost_critic, tau)
        polyak_update(self.actor_target, self.actor, tau)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """BCQ's selection among n perturbed VAE candidates a_j = xi(s, G(s, z_j)), under the Lagrangian:
        argmax_j min_i Q_r,i(s, a_j) - lambda min_i Q_c,i(s, a_j)."""
        n = self.hparams.num_samples
        obs_rep = obs.repeat_interleave(n, 0)
        candidates = self.actor(obs_rep, self.vae.decode(obs_rep))
        score = (self.critic(obs_rep, candidates).min(0).values
                 - self.lagrangian.multiplier * self.cost_critic(obs_rep, candidates).min(0).values)
        best = score.view(-1, n).argmax(1)
        return candidates.view(-1, n, candidates.shape[-1])[torch.arange(len(obs), device=obs.device), best]
