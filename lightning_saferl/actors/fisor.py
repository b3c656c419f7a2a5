"""FISOR's actor: a DDPM noise-prediction policy trained by feasibility-weighted behaviour cloning.

    L = mean_b w_b ||eps_theta(a_k, k, s) - eps||^2,   a_k = sqrt(ab_k) a + sqrt(1 - ab_k) eps,
    w = clip(exp(t_inf (V_h - Q_h)), w_inf_min, w_inf_max)   where V_h(s) > -delta   (infeasible: least unsafe action)
      = clip(exp(t_feas (Q - V)), 0, w_feas_max)     where V_h(s) <= -delta, Q_h <= -delta  (feasible, safe action)
      = 0                                            otherwise.
The critics are frozen, so w is computed once over the dataset before training. The EMA copy acts: N candidates per
observation by ancestral sampling, keep the one with the lowest Q_h (or the highest Q with select="max_q").
EMA after update k: ema <- (1 - tau_k) ema + tau_k net, tau_k = ema_tau.

Defaults are the published method, the official code at ZhengYinan-AIR/FISOR@2097e8bbc96ef49183f22cb2a1b05948b5859ec0
(configs/train_config.py; jaxrl5/agents/fisor/fisor.py): N 16, t_inf 5 (cost_temperature), t_feas 3
(reward_temperature), w_inf in [0, 150] (cost_ub; the head clips at 0), w_feas <= 100, delta 0, T 5, 3 residual
blocks of width 256, dropout 0.1, lr 3e-4 with a cosine decay over 3M updates, constant EMA rate 0.001, minqc.
launcher/examples/train_offline.py overrides PointRobot's N 8, t_inf 2, t_feas 5 (configs/fisor/point_robot.yaml).

Departures, each off by default (the variant's recipe, configs/fisor_guard/, turns them on; docs/methods/fisor.md):
* ``feasibility_margin`` delta > 0 tightens the constraint by delta in h's units: near the boundary, where the
  critic's level set is least exact, states count as infeasible.
* ``select_tolerance`` d > 0 and ``select_clearance`` m >= 0 (select="min_qh"): the highest-Q candidate among
      B = {c : Q_h(s, c) <= min_c' Q_h(s, c') + d  and  Q_h(s, c) <= -m},   the lowest-Q_h one where B is empty.
  Far inside the feasible set Q_h is nearly flat over the candidates and the lowest Q_h is a draw biased to braking.
* ``uniform_proposals`` K > 0: where V_h(s) > -delta_p (``proposal_margin``, default delta) K actions u_k uniform in
  [-1, 1]^act_dim are scored too (near a hazard the escape can be a corner of the action box that the weighted
  cloning rarely proposes); u* = argmin_k Q_h(s, u_k) replaces the candidates' choice only if
      Q_h(s, u*) < min_c Q_h(s, c) - g        (g = ``proposal_gain``),
  since the lowest of K + N noisy estimates is biased low. ``proposal_snap`` p sets each coordinate of a proposal to
  its sign with probability p; ``proposal_vertices`` scores the box's 2^act_dim vertices beside them.
  ``proposal_tolerance`` r > 0: where they replace it, the proposal that acts is the one nearest to the candidates'
  choice among those with Q_h(s, u_k) <= Q_h(s, u*) + r, not u* itself: the lowest Q_h of K proposals is the most
  evasive action, blind to the reward and to the arena's edge (leaving it is a termination, not a cost), and it
  steered PointRobot out of the top of the arena; r = 0 keeps u*.
* ``cost_tiebreak`` e > 0 with a ``cost_critic`` (discounted cost Q_c): where V_h(s) > 0 and no scored action
  (candidate or proposal) has Q_h <= 0 (a violation the critic deems unavoidable, e.g. inside a hazard) every
  action's Q_h scores the same worst violation, not its length, so the lowest Q_h is decided by critic error (and
  braking at rest repeats the state); where an action with Q_h <= 0 was found, the state still has an escape and
  the choice above stands. At the tie-break's states the action is
      argmin_{a in P} Q_c(s, a)  over  P = {a : Q_h(s, a) <= min_a' Q_h(s, a') + e},
  a among the candidates only: the tie is broken by the shortest violation. Uniform proposals stay out of P: Q_c
  is fitted on the data's actions, and its lowest value over hundreds of out-of-distribution proposals is mostly
  error (with them in P the variant stayed longer in a hazard from starts at rest inside it; docs/ablations.md,
  "tie-break among the candidates").
* ``ema_warmup``: tau_k = max(ema_tau, 9 / (10 + k)) (the random initialisation forgotten within the first updates
  of a short run). It reaches ema_tau = 0.001 at k = 8990; over 6000 updates tau ends at 9 / 6009 = 0.0015.
* ``cosine_decay_steps`` shorter than the reference's 3M updates (the run's own length: decay to 0).
"""
from __future__ import annotations

import copy
import inspect
import itertools
from typing import Callable, Literal, Optional, Union

import torch
from einops import rearrange, repeat

from lightning.pytorch.utilities import rank_zero_info

from lightning_saferl.base import SafeRLModule
from lightning_saferl.critics import CostCritic, FeasibilityCritic, RewardCritic
from lightning_saferl.errors import InputError
from lightning_saferl.nets import DDPMSchedule, NoiseResNet, polyak_update
from lightning_saferl.policy import resolve_critic


def ema_rate(update: int, ema_tau: float, warmup: bool = False) -> float:
    """tau_k of EMA update k (0-based): ema_tau (the reference), or max(ema_tau, 9 / (10 + k)) with warm-up."""
    return max(ema_tau, 9.0 / (10.0 + update)) if warmup else ema_tau


def fisor_weights(v_h: torch.Tensor, q_h: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                  infeasible_temperature: float = 5.0, infeasible_weight_max: float = 150.0,
                  feasible_temperature: float = 3.0, feasible_weight_max: float = 100.0,
                  infeasible_weight_min: float = 0.0, feasibility_margin: float = 0.0) -> torch.Tensor:
    """Per-transition weights w of the module docstring (defaults: the official code's DSRL settings)."""
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
                      "proposal_gain", "proposal_snap", "proposal_vertices", "proposal_margin", "proposal_tolerance",
                      "cost_tiebreak")
    #: the critics an actor holds (init argument -> class): frozen, saved with the actor
    critic_classes = {"feasibility_critic": FeasibilityCritic, "reward_critic": RewardCritic,
                      "cost_critic": CostCritic}

    def __init__(self, obs_dim: int, act_dim: int,
                 feasibility_critic: Union[str, FeasibilityCritic, None] = None,
                 reward_critic: Union[str, RewardCritic, None] = None,
                 cost_critic: Union[str, CostCritic, None] = None,
                 hidden_dim: int = 256, num_blocks: int = 3, dropout: float = 0.1, diffusion_steps: int = 5,
                 lr: float = 3e-4, cosine_decay_steps: Optional[int] = 3_000_000, ema_tau: float = 0.001,
                 ema_warmup: bool = False,
                 num_candidates: int = 16, select: Literal["min_qh", "max_q"] = "min_qh",
                 select_tolerance: float = 0.0, select_clearance: float = 0.0, uniform_proposals: int = 0,
                 proposal_gain: float = 0.0, proposal_snap: float = 0.0, proposal_vertices: bool = False,
                 proposal_margin: Optional[float] = None, proposal_tolerance: float = 0.0,
                 cost_tiebreak: float = 0.0,
                 infeasible_temperature: float = 5.0, infeasible_weight_max: float = 150.0,
                 infeasible_weight_min: float = 0.0, feasibility_margin: float = 0.0,
                 feasible_temperature: float = 3.0, feasible_weight_max: float = 100.0,
                 weight_batch_size: int = 65536, compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=list(self.critic_classes))
        self.check_acting_hparams(self.hparams)
        self.lr, self.cosine_decay_steps = lr, cosine_decay_steps
        self.net = NoiseResNet(obs_dim, act_dim, hidden_dim, num_blocks, dropout)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.schedule = DDPMSchedule(diffusion_steps)
        self.feasibility_critic = resolve_critic(feasibility_critic, FeasibilityCritic)
        self.reward_critic = resolve_critic(reward_critic, RewardCritic)
        self.cost_critic = resolve_critic(cost_critic, CostCritic)

    @classmethod
    def hparam(cls, hparams: dict, name: str):
        """hparams[name], or `__init__`'s default where it is missing (a checkpoint saved before the option
        existed): one source for every default."""
        return hparams[name] if name in hparams else inspect.signature(cls.__init__).parameters[name].default

    def _hp(self, name: str):
        return self.hparam(self.hparams, name)

    @classmethod
    def check_acting_hparams(cls, hparams: dict) -> None:
        get = lambda name: cls.hparam(hparams, name)  # noqa: E731
        candidates, select = get("num_candidates"), get("select")
        tolerance, clearance = get("select_tolerance"), get("select_clearance")
        proposals, gain = get("uniform_proposals"), get("proposal_gain")
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
        snap = get("proposal_snap")
        if not 0 <= snap <= 1:
            raise InputError(f"FisorActor: proposal_snap is a probability in [0, 1], got {snap}")
        if get("proposal_vertices") and proposals == 0:
            raise InputError("FisorActor: proposal_vertices needs uniform_proposals > 0 (they are scored together)")
        if get("proposal_tolerance") < 0:
            raise InputError(f"FisorActor: proposal_tolerance is a Q_h tolerance >= 0, got "
                             f"{get('proposal_tolerance')}")
        if get("cost_tiebreak") < 0:
            raise InputError(f"FisorActor: cost_tiebreak is a Q_h tolerance >= 0, got {get('cost_tiebreak')}")

    # -- critics are frozen passengers: kept in eval mode, saved with the actor so a checkpoint can act --
    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.ema, *(getattr(self, name) for name in self.critic_classes)):
            if frozen is not None:
                frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["critic_hparams"] = {name: dict(getattr(self, name).hparams)
                                        for name in self.critic_classes if getattr(self, name) is not None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, cls in self.critic_classes.items():
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
                self._hp("infeasible_weight_min"), self._hp("feasibility_margin")))
        weights = torch.cat(chunks)
        rank_zero_info(f"FisorActor weights over {len(weights)} transitions: mean {weights.mean():.3f}, "
                       f"zero {(weights == 0).float().mean():.1%}")
        return weights

    def _compiled(self, name: str, fn: Callable, device: torch.device) -> Callable:
        """`fn` itself, or its torch.compile'd version (made once) when `compile` is on and `device` qualifies."""
        if not self._hp("compile") or device.type not in self._compile_devices:
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
        tau = ema_rate(self.global_step, self.hparams.ema_tau, self._hp("ema_warmup"))
        polyak_update(self.ema, self.net, tau)

    # -- acting ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample_candidates(self, obs: torch.Tensor, num_candidates: int) -> torch.Tensor:
        """(B, obs_dim) -> (B, N, act_dim): N EMA-policy samples per observation, all in one batch."""
        net = self.ema
        obs_features = repeat(net.obs_features(obs), "b h -> (b n) h", n=num_candidates)  # once per state
        time_features = net.time_features(torch.arange(self.schedule.num_steps, device=obs.device, dtype=obs.dtype))

        def eps_fn(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return net.trunk(net.action_features(a) + obs_features + time_features.index_select(0, k[:1].long()))

        x = self.schedule.sample(eps_fn, (obs_features.shape[0], self.hparams.act_dim), obs.device, obs.dtype)
        return rearrange(x, "(b n) a -> b n a", n=num_candidates)

    @torch.inference_mode()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        if self._hp("num_candidates") > 1 or self._hp("uniform_proposals") > 0:
            if self.hparams.select == "min_qh" and self.feasibility_critic is None:
                raise InputError("select='min_qh' needs a feasibility critic")
            if self.hparams.select != "min_qh" and self.reward_critic is None:
                raise InputError("select='max_q' needs a reward critic")
            if self._hp("select_tolerance") > 0 and self.reward_critic is None:
                raise InputError("select_tolerance > 0 needs a reward critic")
            if self._hp("cost_tiebreak") > 0 and (self.cost_critic is None or self.feasibility_critic is None):
                raise InputError("cost_tiebreak > 0 needs a cost critic and a feasibility critic")
        if self._hp("uniform_proposals") > 0:
            return self._act_with_proposals(obs)
        return self._compiled("act", self._act, obs.device)(obs).clone()  # clone: CUDA-graph outputs are reused

    def _act(self, obs: torch.Tensor) -> torch.Tensor:
        """N candidates per observation, then `_choose` (`_shortest_violation` where the cost tie-break applies)."""
        candidates = self.sample_candidates(obs, self.hparams.num_candidates)
        if self._hp("cost_tiebreak") == 0 or candidates.shape[1] == 1:
            return self._choose(obs, candidates)
        q_h = self._scores(self.feasibility_critic, obs, candidates)
        # all rows: static shapes for the compiled path
        unavoidable = (self.feasibility_critic.value(obs) > 0) & (q_h.min(dim=1).values > 0)
        return torch.where(unavoidable[:, None], self._shortest_violation(obs, candidates, q_h),
                           self._choose(obs, candidates, q_h))

    def _act_with_proposals(self, obs: torch.Tensor) -> torch.Tensor:
        """As `_act`; at critic-infeasible states (V_h > -proposal_margin) K uniform proposals (some coordinates
        snapped to the bounds with `proposal_snap`; the box's vertices added with `proposal_vertices`) replace the
        choice where their lowest Q_h beats every candidate's by more than `proposal_gain` (the one nearest to the
        choice within `proposal_tolerance` of that lowest acts); then the cost tie-break among the candidates where
        V_h > 0 and no scored action has Q_h <= 0 (eager: the flagged rows are data-dependent). V_h(s) is computed
        once; the proposals and Q_c only at the states that use them."""
        h = self.hparams
        candidates = self.sample_candidates(obs, h.num_candidates)
        v_h = self.feasibility_critic.value(obs)
        candidate_q_h = self._scores(self.feasibility_critic, obs, candidates)
        actions = self._choose(obs, candidates, candidate_q_h)
        lowest = candidate_q_h.min(dim=1).values  # the lowest Q_h of every action scored at each state
        margin = self._hp("proposal_margin")
        margin = self._hp("feasibility_margin") if margin is None else margin
        flagged = (v_h > -margin).nonzero().squeeze(1)
        proposals = self._proposals(len(flagged), obs)
        proposal_q_h = self._scores(self.feasibility_critic, obs[flagged], proposals)
        safest = proposal_q_h.min(dim=1, keepdim=True).values
        better = (safest[:, 0] < lowest[flagged] - self._hp("proposal_gain")).nonzero().squeeze(1)
        near_safest = proposal_q_h[better] <= safest[better] + self._hp("proposal_tolerance")
        distance = (proposals[better] - actions[flagged[better], None]).norm(dim=-1)
        chosen = distance.masked_fill(~near_safest, float("inf")).argmin(dim=1)
        actions[flagged[better]] = proposals[better, chosen]
        lowest[flagged] = torch.minimum(lowest[flagged], safest[:, 0])
        if self._hp("cost_tiebreak") > 0:
            states = ((v_h > 0) & (lowest > 0)).nonzero().squeeze(1)
            actions[states] = self._shortest_violation(obs[states], candidates[states], candidate_q_h[states])
        return actions

    def _proposals(self, num_states: int, obs: torch.Tensor) -> torch.Tensor:
        """(num_states, K [+ 2^act_dim], act_dim): K uniform proposals per state in [-1, 1]^act_dim, coordinates
        snapped to their sign with probability `proposal_snap`, the box's vertices first with `proposal_vertices`."""
        h = self.hparams
        proposals = torch.rand(num_states, h.uniform_proposals, h.act_dim, device=obs.device, dtype=obs.dtype)
        proposals = proposals * 2 - 1
        if self._hp("proposal_snap") > 0:
            snapped = torch.rand_like(proposals) < h.proposal_snap
            proposals = torch.where(snapped, proposals.sign(), proposals)
        if self._hp("proposal_vertices"):
            vertices = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=h.act_dim)), device=obs.device,
                                    dtype=obs.dtype)
            proposals = torch.cat((vertices.expand(num_states, -1, -1), proposals), dim=1)
        return proposals

    def _shortest_violation(self, obs: torch.Tensor, pool: torch.Tensor, pool_q_h: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim), (B, P, act_dim), (B, P) -> (B, act_dim): the lowest-Q_c action among those within
        `cost_tiebreak` of the pool's lowest Q_h (module docstring; the choice where the tie-break applies)."""
        q_c = self._scores(self.cost_critic, obs, pool)
        ties = pool_q_h <= pool_q_h.min(dim=1, keepdim=True).values + self.hparams.cost_tiebreak
        return pool[torch.arange(obs.shape[0], device=obs.device), q_c.masked_fill(~ties, float("inf")).argmin(1)]

    @staticmethod
    def _scores(critic, obs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim), (B, N, act_dim) -> (B, N): the critic's Q(s, a) of every candidate (each state's part of the
        critic's first layer computed once)."""
        batch, n = candidates.shape[:2]
        rows = torch.arange(batch, device=obs.device).repeat_interleave(n)
        return critic.q_value_rows(obs, rows, candidates.reshape(batch * n, candidates.shape[-1])).view(batch, n)

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
            tolerance = self._hp("select_tolerance")
            if tolerance > 0:  # the band B of the module docstring: highest Q in it, lowest Q_h where it is empty
                q = self._scores(self.reward_critic, obs, candidates)
                band = (q_h <= q_h.min(dim=1, keepdim=True).values + tolerance) \
                    & (q_h <= -self._hp("select_clearance"))
                scores = torch.where(band.any(dim=1, keepdim=True), q.masked_fill(~band, float("-inf")), scores)
        else:
            scores = self._scores(self.reward_critic, obs, candidates)
        best = scores.argmax(dim=1)
        return candidates[torch.arange(obs.shape[0], device=obs.device), best]
