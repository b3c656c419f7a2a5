"""FISOR's actor: a DDPM noise-prediction policy trained by feasibility-weighted behaviour cloning.

    L = mean_b w_b ||eps_theta(a_k, k, s) - eps||^2,   a_k = sqrt(ab_k) a + sqrt(1 - ab_k) eps,
    w = clip(exp(t_inf (V_h - Q_h)), w_inf_min, w_inf_max)   where V_h(s) > -delta   (infeasible: least unsafe action)
      = clip(exp(t_feas (Q - V)), 0, w_feas_max)     where V_h(s) <= -delta, Q_h <= -delta  (feasible, safe action)
      = 0                                            otherwise.
The feasibility margin delta (``feasibility_margin``, the reference's is 0) tightens the constraint by delta in h's
units: near the boundary, where the critic's level set is least exact, states count as infeasible.
The critics are frozen, so w is computed once over the dataset before training. The reference clips the infeasible
weights below at w_inf_min = 1: every action worse than V_h (most of them, V_h being a low expectile of Q_h) then
weighs 1, and where Q_h spreads over a few tenths (PointRobot's h is a distance) the infeasible states are plainly
cloned; w_inf_min = 0 with a temperature on the scale of Q_h makes them prefer the least unsafe actions.
The EMA copy acts: N candidates per observation by ancestral sampling, keep the one with the lowest Q_h (or highest
Q). With ``select_tolerance`` d > 0 and ``select_clearance`` m >= 0 (select="min_qh"): the highest-Q candidate among
    B = {c : Q_h(s, c) <= min_c' Q_h(s, c') + d  and  Q_h(s, c) <= -m},   the lowest-Q_h one where B is empty;
d = 0 is the reference's rule. Far inside the feasible set Q_h is nearly flat over the candidates and the
lowest Q_h is a draw biased to braking; there B holds them all and Q decides (see the recipe's comment).
With ``uniform_proposals`` K > 0, where the critic calls the state infeasible (V_h(s) > -delta, the states whose
target is the least unsafe action, argmin_a Q_h) K actions u_k uniform in [-1, 1]^act_dim are scored too: near a
hazard the escape can be a narrow corner of the action box that the weighted cloning rarely proposes. The safest
one, u* = argmin_k Q_h(s, u_k), replaces the candidates' choice only if
    Q_h(s, u*) < min_c Q_h(s, c) - g        (g = ``proposal_gain``),
so the actor keeps control unless the critic sees a clear gain: the lowest of K + N noisy estimates is biased low,
and near a boundary they differ by a few thousandths. K = 0 is the reference's rule. With ``proposal_snap`` p > 0
each coordinate of a proposal is set to the nearer bound (its sign) with probability p, so a share p^act_dim of the
proposals are vertices of the box and more lie on its faces: for control-affine dynamics (PointRobot's) the
safety-optimal control of HJ reachability is bang-bang, a vertex, which uniform draws never reach exactly. With
``proposal_vertices`` the box's 2^act_dim vertices are scored beside the K uniform proposals, under the same gain.
EMA after update k: ema <- (1 - tau_k) ema + tau_k net with tau_k = max(ema_tau, 9 / (10 + k)) (warm-up: the
random initialisation is forgotten within the first updates, however short the run), or tau_k = ema_tau.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Literal, Optional, Union

import torch
from einops import rearrange, repeat

from lightning.pytorch.utilities import rank_zero_info

from lightning_saferl.base import SafeRLModule
from lightning_saferl.critics import FeasibilityCritic, RewardCritic
from lightning_saferl.errors import InputError
from lightning_saferl.nets import DDPMSchedule, NoiseResNet, polyak_update
from lightning_saferl.policy import resolve_critic


def ema_rate(update: int, ema_tau: float, warmup: bool = True) -> float:
    """tau_k of EMA update k (0-based): max(ema_tau, 9 / (10 + k)) with warm-up, else ema_tau."""
    return max(ema_tau, 9.0 / (10.0 + update)) if warmup else ema_tau


def fisor_weights(v_h: torch.Tensor, q_h: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                  infeasible_temperature: float = 5.0, infeasible_weight_max: float = 150.0,
                  feasible_temperature: float = 3.0, feasible_weight_max: float = 100.0,
                  infeasible_weight_min: float = 1.0, feasibility_margin: float = 0.0) -> torch.Tensor:
    infeasible = v_h > -feasibility_margin
    safe_action = ~infeasible & (q_h <= -feasibility_margin)
    w_infeasible = torch.exp(infeasible_temperature * (v_h - q_h)).clamp(infeasible_weight_min, infeasible_weight_max)
    w_safe = torch.exp(feasible_temperature * (q - v)).clamp(0, feasible_weight_max)
    return torch.where(infeasible, w_infeasible, torch.where(safe_action, w_safe, torch.zeros_like(q)))


class FisorActor(SafeRLModule):
    """FISOR's diffusion actor (module docstring). ``compile=True``: on CUDA, the training loss (forward and
    backward) and the whole acting computation (N x T denoising steps and the candidate choice) run through
    ``torch.compile(mode="reduce-overhead")``, i.e. as CUDA graphs: these small networks are bound by kernel
    launches there. No effect on other devices (on CPU, inductor was not faster and compiles for minutes).
    The compiled functions are not submodules: state dicts and checkpoints are the same either way."""

    _compile_devices: tuple[str, ...] = ("cuda",)
    _compile_options: dict = {"mode": "reduce-overhead"}
    acting_hparams = ("num_candidates", "select", "select_tolerance", "select_clearance", "uniform_proposals",
                      "proposal_gain", "proposal_snap", "proposal_vertices")

    def __init__(self, obs_dim: int, act_dim: int,
                 feasibility_critic: Union[str, FeasibilityCritic, None] = None,
                 reward_critic: Union[str, RewardCritic, None] = None,
                 hidden_dim: int = 256, num_blocks: int = 3, dropout: float = 0.1, diffusion_steps: int = 5,
                 lr: float = 3e-4, cosine_decay_steps: Optional[int] = None, ema_tau: float = 0.001,
                 ema_warmup: bool = True,
                 num_candidates: int = 16, select: Literal["min_qh", "max_q"] = "min_qh",
                 select_tolerance: float = 0.0, select_clearance: float = 0.0, uniform_proposals: int = 0,
                 proposal_gain: float = 0.0, proposal_snap: float = 0.0, proposal_vertices: bool = False,
                 infeasible_temperature: float = 5.0, infeasible_weight_max: float = 150.0,
                 infeasible_weight_min: float = 1.0, feasibility_margin: float = 0.0,
                 feasible_temperature: float = 3.0, feasible_weight_max: float = 100.0,
                 weight_batch_size: int = 65536, compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["feasibility_critic", "reward_critic"])
        self.check_acting_hparams(self.hparams)
        self.lr, self.cosine_decay_steps = lr, cosine_decay_steps
        self.net = NoiseResNet(obs_dim, act_dim, hidden_dim, num_blocks, dropout)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.schedule = DDPMSchedule(diffusion_steps)
        self.feasibility_critic = resolve_critic(feasibility_critic, FeasibilityCritic)
        self.reward_critic = resolve_critic(reward_critic, RewardCritic)

    @classmethod
    def check_acting_hparams(cls, hparams: dict) -> None:
        candidates, select = hparams["num_candidates"], hparams["select"]
        tolerance, clearance = hparams.get("select_tolerance", 0.0), hparams.get("select_clearance", 0.0)
        proposals, gain = hparams.get("uniform_proposals", 0), hparams.get("proposal_gain", 0.0)
        if candidates < 1:
            raise InputError(f"FisorActor: num_candidates must be >= 1, got {candidates}")
        if tolerance < 0 or clearance < 0:
            raise InputError(f"FisorActor: select_tolerance and select_clearance must be >= 0, got "
                             f"{tolerance}, {clearance}")
        if proposals < 0 or (proposals > 0 and select != "min_qh"):
            raise InputError(f"FisorActor: uniform_proposals must be >= 0 and needs select='min_qh', got "
                             f"{proposals} with select={select!r}")
        if gain < 0:
            raise InputError(f"FisorActor: proposal_gain must be >= 0, got {gain}")
        snap = hparams.get("proposal_snap", 0.0)
        if not 0 <= snap <= 1:
            raise InputError(f"FisorActor: proposal_snap is a probability in [0, 1], got {snap}")
        if hparams.get("proposal_vertices", False) and proposals == 0:
            raise InputError("FisorActor: proposal_vertices needs uniform_proposals > 0 (they are scored together)")

    # -- critics are frozen passengers: kept in eval mode, saved with the actor so a checkpoint can act --
    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.ema, self.feasibility_critic, self.reward_critic):
            if frozen is not None:
                frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["critic_hparams"] = {name: dict(getattr(self, name).hparams)
                                        for name in ("feasibility_critic", "reward_critic")
                                        if getattr(self, name) is not None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, cls in (("feasibility_critic", FeasibilityCritic), ("reward_critic", RewardCritic)):
            hparams = checkpoint.get("critic_hparams", {}).get(name)
            if getattr(self, name) is None and hparams is not None:
                setattr(self, name, cls(**hparams).requires_grad_(False))

    # -- training ------------------------------------------------------------------------------------
    def compute_sample_weights(self, data) -> torch.Tensor:
        if self.feasibility_critic is None or self.reward_critic is None:
            raise InputError("FisorActor needs trained critics: pass feasibility_critic and reward_critic "
                             "(modules or checkpoint paths).")
        h = self.hparams
        chunks = []
        for start in range(0, len(data), h.weight_batch_size):
            obs = data.observations[start:start + h.weight_batch_size]
            act = data.actions[start:start + h.weight_batch_size]
            chunks.append(fisor_weights(
                self.feasibility_critic.value(obs), self.feasibility_critic.q_value(obs, act),
                self.reward_critic.q_value(obs, act), self.reward_critic.value(obs),
                h.infeasible_temperature, h.infeasible_weight_max, h.feasible_temperature, h.feasible_weight_max,
                h.get("infeasible_weight_min", 1.0), h.get("feasibility_margin", 0.0)))
        weights = torch.cat(chunks)
        rank_zero_info(f"FisorActor weights over {len(weights)} transitions: mean {weights.mean():.3f}, "
                       f"zero {(weights == 0).float().mean():.1%}")
        return weights

    def _compiled(self, name: str, fn: Callable, device: torch.device) -> Callable:
        """`fn` itself, or its torch.compile'd version (made once) when `compile` is on and `device` qualifies."""
        if not self.hparams.get("compile", False) or device.type not in self._compile_devices:
            return fn
        cache = self.__dict__.setdefault("_compiled_fns", {})
        if name not in cache:
            cache[name] = torch.compile(fn, **self._compile_options)
        return cache[name]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_compiled_fns", None)  # compiled functions are rebuilt on first use
        return state

    def losses(self, batch: dict):
        obs, actions = batch["observations"], batch["actions"]
        weights = self.sample_weights[batch["index"]]
        k = torch.randint(0, self.schedule.num_steps, (actions.shape[0],), device=actions.device)
        noise = torch.randn_like(actions)
        loss_fn = self._compiled("loss", self._weighted_noise_loss, actions.device)
        if loss_fn is not self._weighted_noise_loss:
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(obs, actions, weights, k, noise).clone()  # clone: CUDA-graph outputs are reused
        return {"actor_loss": loss}, {"weight_mean": weights.mean()}

    def _weighted_noise_loss(self, obs: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor, k: torch.Tensor,
                             noise: torch.Tensor) -> torch.Tensor:
        """mean_b w_b ||eps_theta(a_k, k, s) - eps||^2 for given step indices k and noise eps."""
        steps = torch.arange(self.schedule.num_steps, device=actions.device, dtype=actions.dtype)
        eps = self.net(self.schedule.add_noise(actions, k, noise), steps, obs, t_index=k)
        return (weights * (eps - noise).square().sum(-1)).mean()

    def after_optimizer_step(self) -> None:
        # global_step does not count this update yet: it is update number global_step
        tau = ema_rate(self.global_step, self.hparams.ema_tau, self.hparams.get("ema_warmup", False))
        polyak_update(self.ema, self.net, tau)

    # -- acting ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_candidates(self, obs: torch.Tensor, num_candidates: int) -> torch.Tensor:
        """(B, obs_dim) -> (B, N, act_dim): N EMA-policy samples per observation, all in one batch."""
        net = self.ema
        obs_features = repeat(net.obs_features(obs), "b h -> (b n) h", n=num_candidates)  # once per state
        time_features = net.time_features(torch.arange(self.schedule.num_steps, device=obs.device, dtype=obs.dtype))

        def eps_fn(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return net.trunk(net.action_features(a) + obs_features + time_features.index_select(0, k.long()))

        x = self.schedule.sample(eps_fn, (obs_features.shape[0], self.hparams.act_dim), obs.device, obs.dtype)
        return rearrange(x, "(b n) a -> b n a", n=num_candidates)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        if self.hparams.num_candidates > 1 or self.hparams.get("uniform_proposals", 0) > 0:
            if self.hparams.select == "min_qh" and self.feasibility_critic is None:
                raise InputError("select='min_qh' needs a feasibility critic")
            if self.hparams.select != "min_qh" and self.reward_critic is None:
                raise InputError("select='max_q' needs a reward critic")
            if self.hparams.get("select_tolerance", 0.0) > 0 and self.reward_critic is None:
                raise InputError("select_tolerance > 0 needs a reward critic")
        if self.hparams.get("uniform_proposals", 0) > 0:
            return self._act_with_proposals(obs)
        return self._compiled("act", self._act, obs.device)(obs).clone()  # clone: CUDA-graph outputs are reused

    def _act(self, obs: torch.Tensor) -> torch.Tensor:
        """N candidates per observation, then `_choose`."""
        return self._choose(obs, self.sample_candidates(obs, self.hparams.num_candidates))

    def _act_with_proposals(self, obs: torch.Tensor) -> torch.Tensor:
        """As `_act`; at critic-infeasible states the safest of K uniform proposals (some coordinates snapped to the
        bounds with `proposal_snap`; the box's vertices added with `proposal_vertices`) replaces the choice where it
        beats every candidate's Q_h by more than `proposal_gain` (eager: the flagged rows are data-dependent)."""
        h = self.hparams
        candidates = self.sample_candidates(obs, h.num_candidates)
        candidate_q_h = self._scores(self.feasibility_critic, obs, candidates)
        actions = self._choose(obs, candidates, candidate_q_h)
        flagged = (self.feasibility_critic.value(obs) > -h.get("feasibility_margin", 0.0)).nonzero().squeeze(1)
        proposals = torch.rand(len(flagged), h.uniform_proposals, h.act_dim, device=obs.device, dtype=obs.dtype)
        proposals = proposals * 2 - 1
        if h.get("proposal_snap", 0.0) > 0:
            snapped = torch.rand_like(proposals) < h.proposal_snap
            proposals = torch.where(snapped, proposals.sign(), proposals)
        if h.get("proposal_vertices", False):
            vertices = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=h.act_dim)), device=obs.device,
                                    dtype=obs.dtype)
            proposals = torch.cat((vertices.expand(len(flagged), -1, -1), proposals), dim=1)
        proposal_q_h = self._scores(self.feasibility_critic, obs[flagged], proposals)
        safest = proposal_q_h.argmin(dim=1)
        better = proposal_q_h.min(dim=1).values < \
            candidate_q_h[flagged].min(dim=1).values - h.get("proposal_gain", 0.0)
        actions[flagged[better]] = proposals[better, safest[better]]
        return actions

    @staticmethod
    def _scores(critic, obs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim), (B, N, act_dim) -> (B, N): the critic's Q(s, a) of every candidate."""
        n = candidates.shape[1]
        flat = critic.q_value(repeat(obs, "b o -> (b n) o", n=n), rearrange(candidates, "b n a -> (b n) a"))
        return rearrange(flat, "(b n) -> b n", n=n)

    def _choose(self, obs: torch.Tensor, candidates: torch.Tensor,
                q_h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, obs_dim), (B, N, act_dim) -> (B, act_dim): the candidate with the lowest Q_h (select="min_qh"; with
        a tolerance, the band rule of the module docstring) or the highest Q. `q_h`: the candidates' Q_h (B, N) when
        the caller has it already."""
        if candidates.shape[1] == 1:
            return candidates[:, 0]
        if self.hparams.select == "min_qh":
            q_h = self._scores(self.feasibility_critic, obs, candidates) if q_h is None else q_h
            scores = -q_h
            tolerance = self.hparams.get("select_tolerance", 0.0)
            if tolerance > 0:  # the band B of the module docstring: highest Q in it, lowest Q_h where it is empty
                q = self._scores(self.reward_critic, obs, candidates)
                band = (q_h <= q_h.min(dim=1, keepdim=True).values + tolerance) \
                    & (q_h <= -self.hparams.get("select_clearance", 0.0))
                scores = torch.where(band.any(dim=1, keepdim=True), q.masked_fill(~band, float("-inf")), scores)
        else:
            scores = self._scores(self.reward_critic, obs, candidates)
        best = scores.argmax(dim=1)
        return candidates[torch.arange(obs.shape[0], device=obs.device), best]
