"""COptiDICE: offline constrained policy optimisation by stationary distribution correction estimation (Lee et al.,
ICLR 2022), the OSRL baseline (liuzuxin/OSRL, osrl/algorithms/coptidice.py).

It learns the ratio w(s, a) = d_pi(s, a) / d_D(s, a) of the best constrained policy's discounted state-action
distribution to the data's, then extracts the policy by w-weighted behaviour cloning. With a state function nu (the
dual of the Bellman-flow constraint), lambda >= 0 (the cost constraint's multiplier), an f-divergence f and its
f'^-1, and init = 1[s is an episode's first state] / P(first state):

    e(s, a, s') = r - lambda c + gamma mask nu(s') - nu(s)
    w           = relu(f'^-1(e / alpha))                                       (>= 0)
    L_nu        = (1 - gamma) mean_b init nu(s) + mean_b [w e - alpha f(w)]
    L_lambda    = lambda (c_thres - C_hat),   C_hat = an estimate of E_d_pi[c] = E_D[w c] (no gradient)
    L_pi        = -mean_b w log pi(a + eps_a | s + eps_s)  (w without gradient; eps = N(0, (bc_noise std)^2))

At the saddle point of L_nu the flow constraint holds, so w d_D is a normalised discounted distribution: E_D[w] = 1
when episodes never end, 1 - gamma^T for episodes of T steps, and E_D[w] = 1 for one-step episodes. C_hat is either
E_D[w c] (cost_ub_epsilon = 0) or its upper bound over distributions within KL epsilon of the data's:

    ell = (1 - gamma) init chi(s) + w (c + gamma mask chi(s') - chi(s)),   k = B softmax_b(ell / tau)
    L_chi = mean_b [k]_detached ell,   L_tau = tau (epsilon - mean_b k log k),   C_hat = mean_b k w c,

the gradients of the dual tau log mean_b exp(ell / tau) + tau epsilon. lambda = softplus(.), tau = softplus(.).
c_thres is E_d_pi[c] of a policy that spends the episode limit evenly over T steps: (1 - gamma) q_thres =
limit (1 - gamma^T) / T, with q_thres of `cost_threshold`.

cost_estimate = "policy" keeps that constraint but estimates it for the policy actually extracted, pi, instead of for
w d_D: fitted Q evaluation of pi's mode (the action `act` takes) and its value at the data's episode starts s0,

    y = c + gamma mask Q_c'(s', pi(s')),   L_Qc = sum_i mean_b (Q_c,i(s, a) - y)^2,
    C_hat = (1 - gamma) mean_{s0} Q_c(s0, pi(s0))     (Q_c: member mean; Q_c': Polyak copy, rate critic_tau)

with as many starts drawn per step as the batch has rows.

Differences from OSRL: OSRL compares C_hat, a per-step average, with q_thres itself (a discounted sum, 1 / (1 - gamma)
times larger); its chi loss also differentiates through the softmax weights k. One Adam optimiser; each loss above
reaches only its own network or scalar. "policy" is not in the paper or OSRL (both use E_D[w c] or its upper bound);
why it exists, measured on PointRobot (configs/baselines/coptidice_point_robot.yaml): w all but removes the costly
transitions themselves (w ~ exp(-lambda c / alpha) there), which the extracted policy does not reproduce: E_D[w c]
stayed below the tight limit's target for most of training (and fell to ~0 as lambda grew) while the extracted policy
paid ~3 per episode, so lambda did not rise at the tight limit and the policy did not respond to the limit.
"""
from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lightning_saferl.actors.common import CostLimitedModule
from lightning_saferl.errors import InputError
from lightning_saferl.nets import EnsembleMLP, QEnsemble, TanhGaussianPolicy, polyak_update


def f_functions(name: str):
    """(f, f'^-1) of an f-divergence: "chi2" f = (x - 1)^2 / 2; "kl" f = x log x; "softchi" x (log x - 1) + 1 for
    x < 1 and (x - 1)^2 / 2 above (COptiDICE's choice)."""
    def soft_chi(x):
        return torch.where(x < 1, x * (torch.log(x.clamp(min=1e-10)) - 1) + 1, 0.5 * (x - 1).square())

    def soft_chi_inverse(y):
        return torch.where(y < 0, torch.exp(y.clamp(max=0.0)), y + 1)

    table = {"chi2": (lambda x: 0.5 * (x - 1).square(), lambda y: y + 1),
             "kl": (lambda x: x * torch.log(x.clamp(min=1e-10)), lambda y: torch.exp(y - 1)),
             "softchi": (soft_chi, soft_chi_inverse)}
    if name not in table:
        raise InputError(f"unknown f-divergence {name!r}; choose one of {sorted(table)}")
    return table[name]


class StateValue(nn.Module):
    """A state function ensemble reduced by the member min: (B, obs_dim) -> (B,)."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int], num_members: int):
        super().__init__()
        self.net = EnsembleMLP(num_members, obs_dim, 1, tuple(hidden_dims))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1).min(0).values


class COptiDICE(CostLimitedModule):
    """COptiDICE (module docstring). Defaults: OSRL examples/configs/coptidice_configs.py.

    Args:
        hidden_dims / critic_hidden_dims: policy and nu / chi widths; num_nu, num_chi: their members.
        cost_limit: undiscounted episode budget (sum of an episode's costs), turned into the per-step threshold
            of `cost_threshold`; max_episode_steps: its T (default: the datamodule's).
        reward_scale: rewards are multiplied by it (OSRL's reward_scale).
        alpha: weight of the f-divergence; f_divergence: "softchi", "chi2" or "kl".
        cost_ub_epsilon: KL radius of the cost upper bound (0: plain E_D[w c]); "dice" estimate only.
        bc_noise: std of the BC input noise, as a fraction of the data's per-dimension std.
        cost_estimate: what lambda compares with the limit: "dice" (C_hat, the paper's and OSRL's) or "policy"
            (the extracted policy's cost value by fitted Q evaluation, module docstring); critic_tau: its Polyak rate.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 critic_hidden_dims: Sequence[int] = (256, 256), num_nu: int = 2, num_chi: int = 2, lr: float = 1e-4,
                 cost_limit: float = 10.0, max_episode_steps: Optional[int] = None, discount: float = 0.99,
                 reward_scale: float = 1.0,
                 alpha: float = 0.5, f_divergence: Literal["softchi", "chi2", "kl"] = "softchi",
                 cost_ub_epsilon: float = 0.01, bc_noise: float = 0.1,
                 cost_estimate: Literal["dice", "policy"] = "dice", critic_tau: float = 0.005):
        super().__init__()
        self.f, self.f_prime_inverse = f_functions(f_divergence)
        if cost_ub_epsilon < 0 or alpha <= 0:
            raise InputError(f"COptiDICE: need alpha > 0 and cost_ub_epsilon >= 0, got {alpha}, {cost_ub_epsilon}")
        if cost_estimate not in ("dice", "policy"):
            raise InputError(f"COptiDICE: cost_estimate must be 'dice' or 'policy', got {cost_estimate!r}")
        self.save_hyperparameters()
        self.lr = lr
        self.policy = TanhGaussianPolicy(obs_dim, act_dim, tuple(hidden_dims))
        self.nu = StateValue(obs_dim, critic_hidden_dims, num_nu)
        self.lambda_raw = nn.Parameter(torch.ones(()))  # softplus(1) = 1.31, OSRL's start
        if cost_estimate == "policy":  # no unused parameters (e.g. under DDP): chi and tau only for the upper bound
            self.cost_critic = QEnsemble(obs_dim, act_dim, tuple(critic_hidden_dims), 2)
            self.cost_critic_target = copy.deepcopy(self.cost_critic).requires_grad_(False)
        elif cost_ub_epsilon > 0:
            self.chi = StateValue(obs_dim, critic_hidden_dims, num_chi)
            self.tau_raw = nn.Parameter(torch.ones(()))
        self.initial = self.initial_observations = self.obs_std = self.act_std = None
        self.initial_fraction = 1.0

    @property
    def multiplier(self) -> torch.Tensor:
        return F.softplus(self.lambda_raw)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.set_data_statistics(self.dataset().to(self.device))

    def set_data_statistics(self, data) -> None:
        """Episode starts (first rows of episodes), their fraction and observations, and the per-dimension stds for
        the BC noise."""
        episode = data.episode_index()
        self.initial = torch.ones_like(data.rewards)
        self.initial[1:] = (episode[1:] != episode[:-1]).to(data.rewards.dtype)
        self.initial_fraction = float(self.initial.mean())
        self.initial_observations = data.observations[self.initial.bool()]
        self.obs_std, self.act_std = data.observations.std(0), data.actions.std(0)

    def weights(self, batch: dict) -> torch.Tensor:
        """w(s, a) = relu(f'^-1(e / alpha)) of the batch's transitions (B,), with lambda and nu as they are now."""
        with torch.no_grad():
            return self._advantage_and_weight(batch)[2]

    def _advantage_and_weight(self, batch: dict):
        h = self.hparams
        nu_s = self.nu(batch["observations"])
        nu_next = self.nu(batch["next_observations"])
        e = (h.reward_scale * batch["rewards"] - self.multiplier.detach() * batch["costs"]
             + h.discount * batch["masks"] * nu_next - nu_s)
        return nu_s, e, torch.relu(self.f_prime_inverse(e / h.alpha))

    def losses(self, batch: dict):
        h = self.hparams
        obs, actions, costs, mask = batch["observations"], batch["actions"], batch["costs"], batch["masks"]
        init = self.initial[batch["index"]] / self.initial_fraction
        nu_s, e, w = self._advantage_and_weight(batch)
        losses = {"nu_loss": (1 - h.discount) * (init * nu_s).mean() + (w * e - h.alpha * self.f(w)).mean()}
        w = w.detach()
        extras = {"w_mean": w.mean(), "lambda": self.multiplier.detach(), "dice_cost": (w * costs).mean()}
        if h.cost_estimate == "policy":
            with torch.no_grad():
                next_obs = batch["next_observations"]
                y = costs + h.discount * mask * self.cost_critic_target(next_obs, self.policy.mode(next_obs)).mean(0)
            losses["cost_critic_loss"] = (self.cost_critic(obs, actions) - y).square().mean(1).sum()
            with torch.no_grad():  # (1 - gamma) E_{s0 ~ p0} Q_c(s0, pi(s0)) over as many episode starts as the batch
                starts = self.initial_observations[torch.randint(len(self.initial_observations), (len(obs),),
                                                                 device=obs.device)]
                cost_estimate = (1 - h.discount) * self.cost_critic(starts, self.policy.mode(starts)).mean()
        elif h.cost_ub_epsilon > 0:
            tau = F.softplus(self.tau_raw)
            chi_s, chi_next = self.chi(obs), self.chi(batch["next_observations"])
            ell = (1 - h.discount) * init * chi_s + w * (costs + h.discount * mask * chi_next - chi_s)
            logits = ell / tau.detach()
            k = torch.softmax(logits, 0) * len(logits)
            kl = (k * (torch.log_softmax(logits, 0) + math.log(len(logits)))).mean()
            losses["chi_loss"] = (k.detach() * ell).mean()
            losses["tau_loss"] = tau * (h.cost_ub_epsilon - kl.detach())
            cost_estimate = (k * w * costs).mean().detach()
            extras.update(tau=tau.detach(), kl=kl.detach())
        else:
            cost_estimate = (w * costs).mean()
        cost_target = (1 - h.discount) * self.q_threshold
        losses["lambda_loss"] = self.multiplier * (cost_target - cost_estimate)
        noisy_obs = obs + torch.randn_like(obs) * self.obs_std * h.bc_noise
        noisy_actions = actions + torch.randn_like(actions) * self.act_std * h.bc_noise
        losses["policy_loss"] = -(w * self.policy.log_prob(noisy_obs, noisy_actions)).mean()
        extras["cost_estimate"] = cost_estimate
        return losses, extras

    def after_optimizer_step(self) -> None:
        if self.hparams.cost_estimate == "policy":
            polyak_update(self.cost_critic_target, self.cost_critic, self.hparams.critic_tau)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.mode(obs)
