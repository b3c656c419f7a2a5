"""CPQ: constraints penalized Q-learning (Xu, Zhan & Zhu, AAAI 2022), the OSRL baseline (liuzuxin/OSRL,
osrl/algorithms/cpq.py).

The cost critic is trained to rate out-of-distribution (OOD) actions as unsafe, so an actor that only values actions
the cost critic deems safe stays near the data. OOD actions are the policy's own samples that a conditional VAE of the
dataset actions (`ActionVAE`) explains worst: of n samples per state, those whose KL(q(z|s, a) || N(0, I)) is in the
top (1 - ood_quantile) of the batch. With a tanh-Gaussian actor pi, reward and cost critics Q_r, Q_c (2 members,
member min) and Polyak targets:

    L_vae    = ||D(s, z) - a||^2 + beta KL
    L_c      = sum_i mean_b (Q_c,i(s, a) - c - gamma mask Q'_c(s', a'))^2 - alpha sum_i (E_ood[Q_c,i] - qc_thres),
               a' ~ pi(s'),  alpha <- clip(alpha + alpha_lr (qc_thres - E_ood[Q_c]), 0, alpha_max)  (dual ascent)
    L_r      = sum_i mean_b (Q_r,i(s, a) - r - gamma mask 1[Q'_c(s', a') <= q_thres] Q'_r(s', a'))^2
    L_actor  = mean_b [-1[Q_c(s, a_pi) <= q_thres] Q_r(s, a_pi) + 1[Q_c(s, a_pi) > q_thres] Q_c(s, a_pi)],
               a_pi ~ pi(s) reparameterised, critics fixed,

E_ood is the mean over the OOD samples, q_thres = limit (1 - gamma^T) / ((1 - gamma) T) (see `cost_threshold`),
qc_thres = qc_scale q_thres. While OOD actions look cheaper than qc_thres, alpha grows and pushes Q_c up on them, to
about qc_thres. One Adam optimiser, the actor in its own parameter group (actor_lr), every cross-term detached.

Differences from OSRL: the OOD term is taken on the online cost critic (OSRL evaluates it on the target critic under
no_grad, so its penalty has no gradient); OOD candidates are the squashed actions the policy acts with (OSRL feeds
pre-tanh samples); the cost target bootstraps through `mask`; E_ood averages over the OOD samples only (OSRL
averages the masked values over all n B samples, which drives the OOD samples' Q_c to qc_thres / (1 - ood_quantile),
4 qc_thres); where the policy's action is rated unsafe the actor descends Q_c (OSRL's actor gets no gradient there,
so an unsafe policy stays as it is). Measured on PointRobot (seed 0, 4000 steps, episodes 1000..): with OSRL's
average and actor the cost critic rated the policy's actions at 4.2 and 4.5 times the threshold at limits 3 and 10,
and the episode cost was 3.6 and 4.1 (3.98 and 3.99 over 3 seeds, episodes 2000..); with the mean over OOD samples
alone, Q_c(s, pi(s)) 0.94 (threshold 0.95) and 4.4 (3.17), cost 3.51 and 2.85; with the descent too, 2.99 and 3.81.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from lightning_saferl.actors.common import ActionVAE, CostLimitedModule, frozen_call
from lightning_saferl.errors import InputError
from lightning_saferl.nets import QEnsemble, TanhGaussianPolicy, polyak_update


class CPQ(CostLimitedModule):
    """CPQ (module docstring). Defaults: OSRL examples/configs/cpq_configs.py.

    Args:
        hidden_dims / critic_hidden_dims / vae_hidden_dim: actor, critics (`num_q` members) and VAE widths.
        lr: critics and VAE; actor_lr: the actor; alpha_lr, alpha_max: step and cap of the OOD multiplier.
        cost_limit: undiscounted episode budget (sum of an episode's costs), turned into the per-step threshold
            of `cost_threshold`; max_episode_steps: its T (default: the datamodule's).
        reward_scale: rewards are multiplied by it (OSRL's reward_scale).
        qc_scale: qc_thres / q_thres; num_samples: policy samples per state for the OOD term; ood_quantile: KL
            quantile above which a sample counts as OOD; vae_beta: weight of the VAE's KL term.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (300, 300),
                 critic_hidden_dims: Sequence[int] = (400, 400), vae_hidden_dim: int = 400, num_q: int = 2,
                 lr: float = 1e-3, actor_lr: float = 1e-4, alpha_lr: float = 1e-3, alpha_max: float = 1.0,
                 cost_limit: float = 10.0, max_episode_steps: Optional[int] = None, discount: float = 0.99,
                 reward_scale: float = 1.0,
                 tau: float = 0.005, qc_scale: float = 1.5, num_samples: int = 10, ood_quantile: float = 0.75,
                 vae_beta: float = 0.5):
        super().__init__()
        if not 0 <= ood_quantile < 1:
            raise InputError(f"CPQ: ood_quantile must be in [0, 1), got {ood_quantile}")
        self.save_hyperparameters()
        self.lr = lr
        self.vae = ActionVAE(obs_dim, act_dim, vae_hidden_dim)
        self.policy = TanhGaussianPolicy(obs_dim, act_dim, tuple(hidden_dims))
        self.critic = QEnsemble(obs_dim, act_dim, tuple(critic_hidden_dims), num_q)
        self.cost_critic = QEnsemble(obs_dim, act_dim, tuple(critic_hidden_dims), num_q)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.cost_critic_target = copy.deepcopy(self.cost_critic).requires_grad_(False)
        self.register_buffer("alpha", torch.zeros(()))

    def configure_optimizers(self):
        actor = list(self.policy.parameters())
        actor_ids = {id(p) for p in actor}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in actor_ids]
        fused = all(p.device.type in ("cpu", "cuda") for p in actor + rest)
        return torch.optim.Adam([{"params": rest}, {"params": actor, "lr": self.hparams.actor_lr}], lr=self.lr,
                                fused=fused or None)

    def ood_mask(self, obs_rep: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """1 where the VAE's KL of (s, a) is at or above its `ood_quantile` over the batch, else 0."""
        kl = self.vae.kl(obs_rep, actions).float()  # quantile needs float32/64 (not bf16 under autocast)
        return (kl >= kl.quantile(self.hparams.ood_quantile)).to(actions.dtype)

    def losses(self, batch: dict):
        h = self.hparams
        obs, actions, mask = batch["observations"], batch["actions"], batch["masks"]
        q_threshold = self.q_threshold
        qc_threshold = h.qc_scale * q_threshold
        with torch.no_grad():
            next_obs = batch["next_observations"]
            next_actions, _ = self.policy(next_obs)
            q_next = self.critic_target(next_obs, next_actions).min(0).values
            qc_next = self.cost_critic_target(next_obs, next_actions).min(0).values
            y_r = h.reward_scale * batch["rewards"] + h.discount * mask * (qc_next <= q_threshold) * q_next
            y_c = batch["costs"] + h.discount * mask * qc_next
            obs_rep = obs.repeat(h.num_samples, 1)
            ood_actions, _ = self.policy(obs_rep)
            ood = self.ood_mask(obs_rep, ood_actions)
        q_r, q_c = self.critic(obs, actions), self.cost_critic(obs, actions)
        # E_ood[Q_c,i] per member: the mean over the OOD samples (OSRL averages over all n B samples, so the
        # dual ascent drove the OOD samples' Q_c to qc_thres / (1 - ood_quantile) = 4 qc_thres)
        qc_ood = (self.cost_critic(obs_rep, ood_actions) * ood).sum(1) / ood.sum().clamp(min=1.0)
        alpha = self._alpha(qc_threshold - qc_ood.detach().min())

        pi, _ = self.policy(obs)
        q_r_pi = frozen_call(self.critic, obs, pi).min(0).values
        q_c_pi = frozen_call(self.cost_critic, obs, pi).min(0).values
        safe = (q_c_pi.detach() <= q_threshold).to(obs.dtype)
        losses = {"vae_loss": self.vae.loss(obs, actions, h.vae_beta),
                  "critic_loss": (q_r - y_r).square().mean(1).sum(),
                  "cost_critic_loss": (q_c - y_c).square().mean(1).sum() - alpha * (qc_ood - qc_threshold).sum(),
                  "actor_loss": (-safe * q_r_pi + (1 - safe) * q_c_pi).mean()}
        return losses, {"alpha": alpha, "q_cost_ood": qc_ood.detach().min(), "q_cost_pi": q_c_pi.detach().mean(),
                        "safe_fraction": safe.mean()}

    def _alpha(self, gap: torch.Tensor) -> torch.Tensor:
        """alpha after one dual-ascent step on `gap` = qc_thres - E_ood[Q_c] (training only; DDP ranks averaged)."""
        if self.training and torch.is_grad_enabled():
            if self._trainer is not None and self.trainer.world_size > 1:
                gap = self.trainer.strategy.reduce(gap, reduce_op="mean")
            self.alpha.copy_((self.alpha + self.hparams.alpha_lr * gap).clamp(0.0, self.hparams.alpha_max))
        return self.alpha.clone()

    def after_optimizer_step(self) -> None:
        polyak_update(self.critic_target, self.critic, self.hparams.tau)
        polyak_update(self.cost_critic_target, self.cost_critic, self.hparams.tau)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.mode(obs)
