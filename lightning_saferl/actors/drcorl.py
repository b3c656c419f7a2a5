"""DRCORL: a fast policy extracted from a frozen behaviour diffusion model under a cost budget.

Stages: `BehaviorDiffusion` (VP-SDE noise prediction on all dataset actions) and a `RewardCritic` (IQL), trained
alone, then `DrcorlPolicy`, a tanh MLP (Gaussian or deterministic) that acts with one forward pass, trained together
with its own cost critic. With a = pi(s) (reparameterised), t ~ U(t_min, 1), eps ~ N(0, I), a_t = alpha_t a + sigma_t eps,

    L_reg = mean_b [w(t) (eps_theta(a_t, t, s) - eps)]_detached . a   (+ entropy_coef mean_b log pi(a|s), Gaussian)

is the score-distillation surrogate of a reverse KL to the behaviour policy mu (the reference's, on the clean
action): its gradient wrt a is w(t) (eps_theta - eps), and eps_theta(a_t, t, s) = -sigma_t grad log mu_t(a_t | s),
so the step moves a up the noised behaviour density (the -eps term has zero mean given a and only lowers the
variance); w = sigma_t^2 by default. Training has two phases, as in the reference: `bc_steps` of L_reg alone
(distillation of the behaviour policy), then guided steps k = 0, 1, ... that add a critic term with beta_k:

    L_r = L_reg - beta_k mean_b Q_r(s, a) / n_r        (reward step)
    L_c = L_reg + beta_k mean_b U_c(s, a) / n_c        (cost step)

with n = mean_b |Q| (detached, as in TD3+BC; `normalize_q=False` for n = 1), so beta_k is a scale-free trade-off.

The cost critic sees the policy (`PolicyCostCritic`): an ensemble fitted at every step, phases alike, by fitted Q
evaluation on the batch's dataset transitions with the policy's next actions a' = pi_mode(s') (no environment),
and read pessimistically, U_c = mean + k std over its members. Which step is taken is decided from the offline
estimate of the policy's episode cost C_hat = mean_{s0} U_c(s0, pi_mode(s0)) over a sample of the dataset's episode
start states (averaged over DDP ranks, smoothed):

    C_hat <  limit - slack:  reward step         (zone 0)
    C_hat >  limit + slack:  cost step           (zone 2)
    otherwise:               PCGrad(grad L_r, grad L_c) / 2  (zone 1)

and the first `warmup_steps` guided steps are reward steps (the reference's 500). C_hat is a discounted episode
cost (gamma = `cost_discount`): it moves with what the policy does at every state it reaches in the data, not only
with its first action. The reward critic starts as the IQL one and, in the guided phase, is refitted the same way
(`reward_refit`, as the reference): FQE of its members on the batch with a' = pi_mode(s'), so Q_r follows the
policy being improved instead of staying the in-sample optimum of the data.

PCGrad: where the two gradients conflict (g_r . g_c < 0) each is projected on the normal plane of the other
before they are summed; the halving keeps the step on the scale of a single-objective step. The combination is
done inside automatic optimisation: both gradients come from `torch.autograd.grad` over the policy parameters and
the returned loss is the surrogate sum_p <p, g_combined> (value shifted to (L_r + L_c) / 2), whose gradient is the
combined one, so Lightning's optimiser step, gradient clipping, AMP loss scaling and DDP all-reduce apply unchanged.
"""
from __future__ import annotations

import copy
from typing import Callable, Literal, Optional, Sequence, Union

import torch
from einops import rearrange, repeat
from torch import nn

from lightning_saferl.base import SafeRLModule
from lightning_saferl.critics import RewardCritic
from lightning_saferl.critics.losses import fqe_loss
from lightning_saferl.errors import InputError
from lightning_saferl.nets import DeterministicPolicy, NoiseResNet, QEnsemble, TanhGaussianPolicy, polyak_update
from lightning_saferl.nets.vpsde import VPSDE
from lightning_saferl.policy import resolve_critic

BC_ZONE, REWARD_ZONE, BOTH_ZONE, COST_ZONE = -1, 0, 1, 2
WEIGHTINGS = ("sigma2", "constant", "alpha_over_sigma")


# ------------------------------------------------------------------------------------------------------------
# the pieces of the method, as functions (tested one by one)
# ------------------------------------------------------------------------------------------------------------
def pcgrad(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """PCGrad of two flat gradients: g1' + g2', with g_i' = g_i - (g_i . g_j / |g_j|^2) g_j if g1 . g2 < 0,
    else g_i' = g_i."""
    dot = torch.clamp(g1 @ g2, max=0.0)
    tiny = torch.finfo(g1.dtype).tiny
    return g1 + g2 - dot / (g2 @ g2).clamp(min=tiny) * g2 - dot / (g1 @ g1).clamp(min=tiny) * g1


def choose_zone(cost_estimate: float, limit: float, slack: float) -> int:
    """0 (reward step) if C < limit - slack, 2 (cost step) if C > limit + slack, else 1 (both, by PCGrad)."""
    if cost_estimate < limit - slack:
        return REWARD_ZONE
    if cost_estimate > limit + slack:
        return COST_ZONE
    return BOTH_ZONE


def beta_schedule(step: int, scale: float = 0.01, power: float = 0.5, beta_max: Optional[float] = None) -> float:
    """beta_k = scale * k^power, capped at beta_max (None: no cap); power 0 gives a constant beta."""
    beta = scale * float(step) ** power
    return beta if beta_max is None else min(beta, beta_max)


def sds_weight(sde: VPSDE, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t): sigma_t^2 ("sigma2"), 1 ("constant") or alpha_t / sigma_t ("alpha_over_sigma")."""
    if weighting == "sigma2":
        return sde.sigma(t) ** 2
    if weighting == "constant":
        return torch.ones_like(t)
    if weighting == "alpha_over_sigma":
        return sde.alpha(t) / sde.sigma(t)
    raise InputError(f"unknown score-distillation weighting {weighting!r}; choose one of {WEIGHTINGS}")


def score_distillation_loss(eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                            actions: torch.Tensor, obs: torch.Tensor, sde: VPSDE, t_min: float = 0.02,
                            weighting: str = "sigma2", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample surrogate (B,): [w(t) (eps_fn(a_t, t, s) - eps)]_detached . a, t ~ U(t_min, 1),
    a_t = alpha_t a + sigma_t eps. Its gradient wrt `actions` is w(t) (eps_fn - eps)."""
    batch = actions.shape[0]
    dtype = torch.promote_types(actions.dtype, torch.float32)  # never draw t or eps in bf16 under autocast
    t = t_min + (1.0 - t_min) * torch.rand(batch, device=actions.device, dtype=dtype, generator=generator)
    eps = torch.randn(actions.shape, device=actions.device, dtype=dtype, generator=generator)
    with torch.no_grad():
        noisy = sde.add_noise(actions.detach(), t, eps)
        residual = sds_weight(sde, t, weighting).unsqueeze(-1) * (eps_fn(noisy, t, obs) - eps)
    return (residual * actions).sum(-1)


def episode_starts(data) -> torch.Tensor:
    """Row indices where the dataset's episodes begin: row 0 and every row after a `done` row."""
    after_done = torch.nonzero(data.done[:-1] > 0).flatten() + 1
    return torch.cat([after_done.new_zeros(1), after_done])


class PolicyCostCritic(nn.Module):
    """The discounted cost of a given policy pi, by fitted Q evaluation (FQE) on dataset transitions:

        y_i = c + gamma mask Q'_i(s', a'),   a' = pi(s')   (drawn by the caller, no gradient)
        L   = sum_i mean_b (Q_i(s, a) - y_i)^2            i = 1..E, member i bootstraps from its own target Q'_i,

    Q' following Q by Polyak averaging (rate tau). The pessimistic value is U(s, a) = mean_i Q'_i + k std_i Q'_i
    (sample std over members, k = `pessimism`), and pi's episode-cost estimate is mean_{s0} U(s0, pi(s0)) over
    episode start states: its expected discounted cost, pessimistic where the members disagree."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), members: int = 4,
                 discount: float = 0.99, tau: float = 0.005, pessimism: float = 1.0):
        super().__init__()
        if members < 2:
            raise InputError(f"PolicyCostCritic needs members >= 2 (its pessimism uses their spread), got {members}")
        self.discount, self.tau, self.pessimism = discount, tau, pessimism
        self.q = QEnsemble(obs_dim, act_dim, tuple(hidden_dims), members)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)

    def td_loss(self, obs: torch.Tensor, actions: torch.Tensor, costs: torch.Tensor, next_obs: torch.Tensor,
                next_actions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return fqe_loss(self.q, self.q_target, obs, actions, costs, next_obs, next_actions, masks, self.discount)

    def update_target(self) -> None:
        polyak_update(self.q_target, self.q, self.tau)

    def upper(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """U(s, a) = mean + k std over the target members, (B,); differentiable wrt `actions`."""
        qs = self.q_target(obs, actions)
        return qs.mean(0) + self.pessimism * qs.std(0)

    @torch.no_grad()
    def estimate(self, start_obs: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """mean_{s0} U(s0, act(s0)): the policy's pessimistic discounted episode cost."""
        return self.upper(start_obs, act(start_obs)).mean()


def fit_policy_cost_critic(act: Callable[[torch.Tensor], torch.Tensor], data, steps: int, batch_size: int = 256,
                           lr: float = 3e-4, seed: int = 0, **critic_args) -> PolicyCostCritic:
    """A `PolicyCostCritic` of the policy `act` (obs -> actions, may be stochastic) fitted on the `Transitions`
    `data` by `steps` Adam steps on uniformly drawn batches: the same loss DrcorlPolicy minimises while it trains."""
    generator = torch.Generator(device=data.device).manual_seed(seed)
    torch.manual_seed(seed)  # the members' initialisation and a stochastic policy's draws
    critic = PolicyCostCritic(data.observations.shape[1], data.actions.shape[1], **critic_args).to(data.device)
    optimizer = torch.optim.Adam(critic.q.parameters(), lr=lr)
    masks = data.mask
    for _ in range(steps):
        i = torch.randint(len(masks), (batch_size,), device=data.device, generator=generator)
        with torch.no_grad():
            next_actions = act(data.next_observations[i])
        loss = critic.td_loss(data.observations[i], data.actions[i], data.costs[i], data.next_observations[i],
                              next_actions, masks[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        critic.update_target()
    return critic


# ------------------------------------------------------------------------------------------------------------
# stage 1: the behaviour model
# ------------------------------------------------------------------------------------------------------------
class BehaviorDiffusion(SafeRLModule):
    """Continuous VP-SDE noise-prediction model of the behaviour policy, fit to all dataset actions:

        L = mean_b ||eps_theta(alpha_t a + sigma_t eps, t, s) - eps||^2,   t ~ U(t_min, 1),

    trunk `NoiseResNet` fed the continuous time t, its Fourier frequencies drawn with std `time_scale` (the
    reference's 30 for t in [0, 1]; FISOR's 0.2 is made for integer steps 1..T and gives t in [0, 1] angles below
    ~1 radian). An EMA copy (rate `ema_tau`) is the model used downstream (`eps`, `sample`, `act`). `act` draws one
    action per observation with the VP-SDE sampler: behaviour cloning by diffusion, handy to check the model."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256, num_blocks: int = 3, dropout: float = 0.1,
                 beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, lr: float = 3e-4,
                 cosine_decay_steps: Optional[int] = None, ema_tau: float = 0.005, sample_steps: int = 30,
                 sample_order: int = 2, time_scale: float = 30.0):
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.cosine_decay_steps = lr, cosine_decay_steps
        self.sde = VPSDE(beta_min, beta_max)
        self.net = NoiseResNet(obs_dim, act_dim, hidden_dim, num_blocks, dropout)
        nn.init.normal_(self.net.time_embedding.weight, std=time_scale)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()
        return self

    def losses(self, batch: dict):
        obs, actions = batch["observations"], batch["actions"]
        t_min = self.hparams.t_min
        t = t_min + (1 - t_min) * torch.rand(actions.shape[0], device=actions.device, dtype=actions.dtype)
        noise = torch.randn_like(actions)
        eps = self.net(self.sde.add_noise(actions, t, noise), t, obs)
        return {"diffusion_loss": (eps - noise).square().sum(-1).mean()}, {}

    def after_optimizer_step(self) -> None:
        polyak_update(self.ema, self.net, self.hparams.ema_tau)

    def eps(self, noisy_action: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """EMA noise prediction eps_theta(a_t, t, s), t of shape (B,) in (0, 1]."""
        return self.ema(noisy_action, t, obs)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, num_samples: int = 1, steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, obs_dim) -> (B, num_samples, act_dim) behaviour actions, clipped to [-1, 1]."""
        obs_rep = repeat(obs, "b o -> (b n) o", n=num_samples)
        x = self.sde.sample(lambda a, t: self.eps(a, t, obs_rep), (obs_rep.shape[0], self.hparams.act_dim),
                            obs.device, obs.dtype, steps=steps or self.hparams.sample_steps,
                            order=self.hparams.sample_order, t_min=self.hparams.t_min, clip=1.0, generator=generator)
        return rearrange(x, "(b n) a -> b n a", n=num_samples)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.sample(obs, 1)[:, 0]


# ------------------------------------------------------------------------------------------------------------
# stage 2: the fast policy and its cost critic
# ------------------------------------------------------------------------------------------------------------
_FROZEN = (("behavior", BehaviorDiffusion), ("reward_critic", RewardCritic))


class DrcorlPolicy(SafeRLModule):
    """The DRCORL policy (module docstring). Inputs, as modules or checkpoint paths: `behavior` (BehaviorDiffusion,
    frozen) and `reward_critic` (RewardCritic, its Q members refitted in the guided phase when `reward_refit`); they
    are saved with the policy (weights and hparams), so a checkpoint loads standalone with `load_policy` and resumes
    training. The cost critic is trained here.

    Args:
        head: "deterministic" (a = tanh(MLP(s))) or "gaussian" (tanh-squashed Gaussian, entropy term). The default
            is deterministic: the distillation surrogate is exact for a Dirac policy (its noised score is the -eps
            baseline), while a Gaussian needs an entropy weight whose right value depends on w(t).
        lr: one Adam step size for the policy and its cost critic.
        cost_limit, cost_slack: a discounted episode budget (gamma = `cost_discount`, the unit of the estimate C_hat),
            not the undiscounted one of the other actors, and the half-width of the PCGrad band.
        bc_steps: distillation-only steps before the guided phase (the cost critic trains in both).
        warmup_steps: the first guided steps are reward steps (no zone rule).
        beta_scale, beta_power, beta_max: beta_k = min(beta_max, beta_scale k^beta_power), k = guided step.
        t_min, weighting: the diffusion times and w(t) of the distillation term.
        entropy_coef: weight of mean log pi(a|s) (Gaussian head only).
        normalize_q: divide each Q term by its batch mean |Q| (detached).
        cost_members, cost_discount, cost_tau, cost_pessimism, cost_hidden_dims: the `PolicyCostCritic`
            (ensemble size, gamma, Polyak rate, k of mean + k std, widths).
        estimate_states: episode start states drawn (with replacement) for each step's estimate.
        estimate_smoothing: m in C <- m C + (1 - m) C_step (0: each step's estimate alone).
        reward_refit: refit the reward critic's Q members by FQE (a' = pi(s'), its own discount and Polyak rate)
            during the guided phase, as the reference. The loss is present with weight 0 in the distillation phase
            so that every trained parameter has a gradient at every step (DDP).
    """

    def __init__(self, obs_dim: int, act_dim: int,
                 behavior: Union[str, BehaviorDiffusion, None] = None,
                 reward_critic: Union[str, RewardCritic, None] = None,
                 head: Literal["deterministic", "gaussian"] = "deterministic", hidden_dims: Sequence[int] = (256, 256),
                 lr: float = 3e-4, cosine_decay_steps: Optional[int] = None,
                 cost_limit: float = 10.0, cost_slack: float = 1.0, bc_steps: int = 0, warmup_steps: int = 0,
                 beta_scale: float = 0.01, beta_power: float = 0.5, beta_max: Optional[float] = None,
                 t_min: float = 0.02, weighting: Literal["sigma2", "constant", "alpha_over_sigma"] = "sigma2",
                 entropy_coef: float = 0.01, normalize_q: bool = True,
                 cost_members: int = 4, cost_discount: float = 0.99, cost_tau: float = 0.005,
                 cost_pessimism: float = 1.0, cost_hidden_dims: Sequence[int] = (256, 256),
                 estimate_states: int = 256, estimate_smoothing: float = 0.9, reward_refit: bool = True):
        super().__init__()
        if head not in ("deterministic", "gaussian"):
            raise InputError(f"DrcorlPolicy: head must be 'deterministic' or 'gaussian', got {head!r}")
        if weighting not in WEIGHTINGS:
            raise InputError(f"DrcorlPolicy: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if cost_slack < 0 or not 0 <= estimate_smoothing < 1 or not 0 < t_min < 1:
            raise InputError(f"DrcorlPolicy: need cost_slack >= 0, 0 <= estimate_smoothing < 1 and 0 < t_min < 1, "
                             f"got {cost_slack}, {estimate_smoothing}, {t_min}")
        self.save_hyperparameters(ignore=[name for name, _ in _FROZEN])
        self.lr, self.cosine_decay_steps = lr, cosine_decay_steps
        head_cls = DeterministicPolicy if head == "deterministic" else TanhGaussianPolicy
        self.policy = head_cls(obs_dim, act_dim, tuple(hidden_dims))
        self.cost_critic = PolicyCostCritic(obs_dim, act_dim, cost_hidden_dims, cost_members, cost_discount,
                                            cost_tau, cost_pessimism)
        self.behavior = resolve_critic(behavior, BehaviorDiffusion)
        self.reward_critic = resolve_critic(reward_critic, RewardCritic)
        if reward_refit and self.reward_critic is not None:
            self.reward_critic.q.requires_grad_(True)
        self.register_buffer("cost_estimate", torch.tensor(float("nan")))
        self.register_buffer("start_obs", torch.zeros(0, obs_dim), persistent=False)  # set at fit start

    # -- frozen passengers: kept in eval mode, saved with the policy so a checkpoint can act and resume --------
    def train(self, mode: bool = True):
        super().train(mode)
        for name, _ in _FROZEN:
            if getattr(self, name) is not None:
                getattr(self, name).eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["frozen_hparams"] = {name: dict(getattr(self, name).hparams)
                                        for name, _ in _FROZEN if getattr(self, name) is not None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, cls in _FROZEN:
            hparams = checkpoint.get("frozen_hparams", {}).get(name)
            if getattr(self, name) is None and hparams is not None:
                setattr(self, name, cls(**hparams).requires_grad_(False).eval())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        missing = [name for name, _ in _FROZEN if getattr(self, name) is None]
        if missing:
            raise InputError(f"DrcorlPolicy needs trained {', '.join(missing)}: pass them as modules or checkpoint "
                             "paths (recipe: `inputs` of the policy stage).")
        data = self.dataset()
        self.start_obs = data.observations[episode_starts(data)].to(self.device)

    def after_optimizer_step(self) -> None:
        self.cost_critic.update_target()
        if self.hparams.reward_refit and self.global_step >= self.hparams.bc_steps:  # the step's own global_step
            polyak_update(self.reward_critic.q_target, self.reward_critic.q, self.reward_critic.tau)

    # -- training ----------------------------------------------------------------------------------------------
    def estimate_cost(self, start_obs: torch.Tensor) -> torch.Tensor:
        """C_hat = mean_{s0} U_c(s0, pi_mode(s0)) over the given start states (this rank's draw only)."""
        return self.cost_critic.estimate(start_obs, self.policy.mode)

    def _shared_estimate(self) -> float:
        """A fresh estimate on drawn start states, averaged over ranks (every rank then picks the same zone),
        smoothed while training."""
        if self.start_obs.shape[0] == 0:
            raise InputError("DrcorlPolicy: no episode start states; fit it with an OfflineDataModule")
        draw = torch.randint(self.start_obs.shape[0], (self.hparams.estimate_states,), device=self.start_obs.device)
        estimate = self.estimate_cost(self.start_obs[draw])
        if self._trainer is not None and self.trainer.world_size > 1:
            estimate = self.trainer.strategy.reduce(estimate, reduce_op="mean")
        if self.training and torch.is_grad_enabled():
            if torch.isfinite(self.cost_estimate):
                m = self.hparams.estimate_smoothing
                estimate = m * self.cost_estimate + (1 - m) * estimate
            self.cost_estimate.copy_(estimate)
            return float(self.cost_estimate)
        return float(estimate)

    def _q_term(self, q: torch.Tensor) -> torch.Tensor:
        scale = q.detach().abs().mean().clamp(min=1e-6) if self.hparams.normalize_q else 1.0
        return q.mean() / scale

    def losses(self, batch: dict):
        h = self.hparams
        obs = batch["observations"]
        with torch.no_grad():
            next_actions = self.policy.mode(batch["next_observations"])
        critic_loss = self.cost_critic.td_loss(obs, batch["actions"], batch["costs"], batch["next_observations"],
                                               next_actions, batch["masks"])
        losses = {"cost_critic_loss": critic_loss}
        estimate = self._shared_estimate()
        guided = self.global_step - h.bc_steps
        if h.reward_refit:
            rc = self.reward_critic
            refit = fqe_loss(rc.q, rc.q_target, obs, batch["actions"], batch["rewards"], batch["next_observations"],
                             next_actions, batch["masks"], rc.discount)
            losses["reward_critic_loss"] = refit * float(guided >= 0)
        if guided < 0:
            zone = BC_ZONE
        elif guided < h.warmup_steps:
            zone = REWARD_ZONE
        else:
            zone = choose_zone(estimate, h.cost_limit, h.cost_slack)
        beta = beta_schedule(max(guided, 0), h.beta_scale, h.beta_power, h.beta_max)

        if h.head == "gaussian":
            actions, log_prob = self.policy(obs)
        else:
            actions, log_prob = self.policy(obs), None
        regulariser = score_distillation_loss(self.behavior.eps, actions, obs, self.behavior.sde, h.t_min,
                                              h.weighting).mean()
        extras = {"zone": obs.new_tensor(float(zone)), "cost_estimate": obs.new_tensor(estimate),
                  "beta": obs.new_tensor(beta), "regulariser": regulariser.detach()}
        if log_prob is not None:
            regulariser = regulariser + h.entropy_coef * log_prob.mean()
            extras["entropy"] = -log_prob.detach().mean()

        reward_loss = cost_loss = None
        if zone in (REWARD_ZONE, BOTH_ZONE):
            q_r = self.reward_critic.q_value(obs, actions)
            reward_loss = regulariser - beta * self._q_term(q_r)
            extras["q_reward"] = q_r.detach().mean()
        if zone in (COST_ZONE, BOTH_ZONE):
            q_c = self.cost_critic.upper(obs, actions)
            cost_loss = regulariser + beta * self._q_term(q_c)
            extras["q_cost"] = q_c.detach().mean()
        if zone == BC_ZONE:
            losses["policy_loss"] = regulariser
        elif zone == REWARD_ZONE:
            losses["policy_loss"] = reward_loss
        elif zone == COST_ZONE:
            losses["policy_loss"] = cost_loss
        elif self.training and torch.is_grad_enabled():
            losses["policy_loss"], extras["grad_cosine"] = self._pcgrad_surrogate(reward_loss, cost_loss)
        else:
            losses["policy_loss"] = (reward_loss + cost_loss) / 2
        return losses, extras

    def _pcgrad_surrogate(self, reward_loss: torch.Tensor, cost_loss: torch.Tensor):
        """(loss whose gradient wrt the policy parameters is PCGrad(g_r, g_c) / 2, cosine(g_r, g_c))."""
        params = [p for p in self.policy.parameters() if p.requires_grad]

        def flat_grad(loss: torch.Tensor, retain: bool) -> torch.Tensor:
            grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])

        g_r, g_c = flat_grad(reward_loss, True), flat_grad(cost_loss, False)
        combined = pcgrad(g_r, g_c) / 2
        surrogate = sum((p * g.view_as(p)).sum() for p, g in zip(params, combined.split([p.numel() for p in params])))
        value = (reward_loss.detach() + cost_loss.detach()) / 2
        cosine = (g_r @ g_c) / (g_r.norm() * g_c.norm()).clamp(min=torch.finfo(g_r.dtype).tiny)
        return surrogate - surrogate.detach() + value, cosine.detach()

    # -- acting --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """One forward pass: the mode of the head."""
        return self.policy.mode(obs)
