"""Batched episode evaluation of a Policy and the safety metrics reported for it.

Protocol: episode ``i`` (0 <= i < N) is reset with ``seed + i`` and the metrics are computed over exactly
those N episodes, whichever env instance ran them and in whatever order they finished. A stochastic policy draws
from torch's RNG seeded with ``seed + (first episode index)`` and restored afterwards, so the same runner gives the
same figures for the same policy wherever it is called. Up to ``num_envs``
episodes run at once; each step calls ``policy.act`` once on the stacked observations of all live episodes.

Metrics over episodes (std is the population std, ddof = 0):
    return_mean/std, cost_mean/std      episode return and episode cost (sum of ``info["cost"]``)
    violation_free_fraction              share of episodes in which no step had cost > 0
    length_mean, episodes
    normalized_return                    mean of (R - R_min) / (R_max - R_min)        [tasks with DSRL references]
    normalized_cost                      mean of (C + e) / (limit + e), e = 1 iff limit == 0   [same]

A policy with a per-episode context (e.g. CDT's history and return/cost targets) also defines
``reset(slots)`` (new episodes start in these env slots), ``act(obs, slots)`` (``slots[i]`` is the slot of row i) and
``observe(slots, rewards, costs)`` (what each slot's env returned for that action); the runner then calls these.

The field's protocol scores a policy at several cost limits (`limit_scores`): per limit L,
    normalized_cost@L = mean of (C + e) / (L + e) = (cost_mean + e) / (L + e)   (the score is linear in C)
    safe@L            = normalized_cost@L <= 1
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_saferl.errors import InputError

__all__ = ["EpisodeRunner", "rank_slice", "merge_episodes", "summarize_episodes", "EPISODE_KEYS", "cost_limit_list",
           "limit_key", "limit_scores", "lockstep", "Step", "evaluate_policy", "json_number", "print_table"]

#: keys of the per-episode arrays returned by `EpisodeRunner.run_episodes`
EPISODE_KEYS = ("index", "return", "cost", "length", "violations", "success")


def rank_slice(episodes: int, rank: int, world_size: int) -> range:
    """Contiguous episode indices of ``rank``: the ranks together cover 0..episodes-1 exactly once and
    their sizes differ by at most 1 (the first ``episodes % world_size`` ranks get one more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank_slice: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if episodes < 0:
        raise ValueError(f"rank_slice: episodes must be >= 0, got {episodes}")
    base, extra = divmod(episodes, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def merge_episodes(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-episode results (e.g. gathered from DDP ranks) and order them by episode index.

    Raises ValueError if a part lacks a key of `EPISODE_KEYS` or an episode index occurs twice.
    """
    for j, part in enumerate(parts):
        missing = [k for k in EPISODE_KEYS if k not in part]
        if missing:
            raise ValueError(f"merge_episodes: part {j} lacks keys {missing} (has {sorted(part)})")
    merged = {k: np.concatenate([np.asarray(p[k]) for p in parts]) if parts else np.zeros(0) for k in EPISODE_KEYS}
    index = merged["index"].astype(np.int64)
    unique, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"merge_episodes: episode indices {unique[counts > 1].tolist()} occur more than once")
    order = np.argsort(index, kind="stable")
    return {k: v[order] for k, v in merged.items()}


def _has_reference_scores(spec: Any) -> bool:
    return (spec is not None and getattr(spec, "reward_min", None) is not None
            and getattr(spec, "reward_max", None) is not None)


def summarize_episodes(episodes: Mapping[str, np.ndarray], task_spec: Any = None,
                       cost_limit: Optional[float] = None) -> dict[str, float]:
    """Metrics of the module docstring from per-episode arrays (keys `EPISODE_KEYS`).

    ``task_spec``: a TaskSpec-like object; normalised scores are added when it has reward_min/reward_max.
    ``cost_limit`` overrides ``task_spec.cost_limit`` in the normalised cost.
    """
    returns = np.asarray(episodes["return"], dtype=np.float64)
    costs = np.asarray(episodes["cost"], dtype=np.float64)
    if returns.size == 0:
        raise ValueError("summarize_episodes: no episodes to summarise")
    metrics = {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "cost_mean": float(costs.mean()),
        "cost_std": float(costs.std()),
        "violation_free_fraction": float((np.asarray(episodes["violations"]) == 0).mean()),
        "length_mean": float(np.asarray(episodes["length"], dtype=np.float64).mean()),
        "episodes": int(returns.size),
        # share of episodes whose env reported info["is_success"] (gymnasium's convention; PointRobot: goal)
        "success_rate": float(np.asarray(episodes["success"], dtype=np.float64).mean()),
    }
    if _has_reference_scores(task_spec):
        limit = task_spec.cost_limit if cost_limit is None else cost_limit
        metrics["normalized_return"] = float(np.mean(task_spec.normalized_return(returns)))
        metrics["normalized_cost"] = float(np.mean(task_spec.normalized_cost(costs, limit)))
    return metrics


def cost_limit_list(value: Union[float, Sequence[float]], where: str = "cost_limits") -> list[float]:
    """A cost limit or a list of them as a non-empty list of floats >= 0."""
    limits = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not limits or any(not np.isfinite(v) or v < 0 for v in limits):
        raise InputError(f"{where}: expected one or more finite cost limits >= 0, got {value!r}")
    return limits


def limit_key(limit: float) -> str:
    """How a limit is written in metric names: 10.0 -> '10', 2.5 -> '2.5'."""
    return f"{float(limit):g}"


def limit_scores(cost_mean: float, task_spec: Any, limits: Sequence[float]) -> dict[str, Any]:
    """``normalized_cost@L`` and ``safe@L`` (module docstring) for every limit L, from the mean episode cost."""
    scores: dict[str, Any] = {}
    for limit in limits:
        normalized = float(task_spec.normalized_cost(float(cost_mean), limit))
        scores[f"normalized_cost@{limit_key(limit)}"] = normalized
        scores[f"safe@{limit_key(limit)}"] = normalized <= 1.0
    return scores


def _default_env_factory(task_id: str) -> gym.Env:
    from lightning_saferl.envs import make_env

    return make_env(task_id)


def _resolve_task(task: Any) -> tuple[str, Any]:
    """(task_id, TaskSpec or None). A string not in the registry is evaluated without a spec."""
    if isinstance(task, str):
        from lightning_saferl.data.tasks import get_task

        try:
            return task, get_task(task)
        except KeyError:
            return task, None
    task_id = getattr(task, "task_id", None)
    if not isinstance(task_id, str):
        raise TypeError(f"EpisodeRunner: task must be a task id string or a TaskSpec-like object with a "
                        f"string `task_id`, got {type(task).__name__}")
    return task_id, task



class Step(NamedTuple):
    """One slot's step: what `env.step(action)` returned, and the action as the env received it."""

    observation: Any
    reward: Any
    terminated: bool
    truncated: bool
    info: dict
    action: np.ndarray


def lockstep(envs: Sequence[gym.Env], start: Callable[[int], Any], act: Callable[[list[int], list[Any]], np.ndarray],
             record: Callable[[int, Step], bool], after_step: Optional[Callable[[list[int]], None]] = None,
             restart_at_once: bool = False) -> None:
    """Step episodes in `envs` together until every slot idles; a slot whose episode ended starts the next one.

    `start(slot)` resets `envs[slot]` for a new episode and returns its first observation, or None: the slot idles
    from then on (all slots are started first, in order). Each step `act(live, observations)` gives the actions of the
    live slots (ascending) in one batched call; each live env steps with its row (cast to its Box action dtype) and
    `record(slot, step)` says whether that episode ended. `after_step(live)` runs once all live slots stepped. Ended
    slots restart after `after_step`, in slot order; with `restart_at_once`, right after their own step, before the
    next slot steps (what matters for simulators whose reset seeds a generator the other envs' steps draw from)."""
    observations = [start(slot) for slot in range(len(envs))]
    while live := [slot for slot, obs in enumerate(observations) if obs is not None]:
        actions = act(live, [observations[slot] for slot in live])
        ended = []
        for row, slot in enumerate(live):
            env = envs[slot]
            action = actions[row]
            if isinstance(env.action_space, gym.spaces.Box):
                action = action.astype(env.action_space.dtype)
            step = Step(*env.step(action), action)
            observations[slot] = step.observation
            if record(slot, step):
                if restart_at_once:
                    observations[slot] = start(slot)
                else:
                    observations[slot] = None
                    ended.append(slot)
        if after_step is not None:
            after_step(live)
        for slot in ended:
            observations[slot] = start(slot)


class EpisodeRunner:
    """Runs N episodes of a Policy on a pool of ``min(N, num_envs)`` env instances (see module docstring).

    Args:
        task: task id (looked up with ``lightning_saferl.data.tasks.get_task``; ids not in the registry are
            run without reference scores) or a TaskSpec-like object (``task_id``, ``max_episode_steps``,
            ``cost_limit``, optional ``reward_min``/``reward_max`` with ``normalized_return``/``normalized_cost``).
        episodes: N, the number of episodes of `run`.
        num_envs: env instances stepped together.
        seed: episode ``i`` is reset with ``seed + i``.
        reset_options: passed to every ``env.reset``, or a sequence with one dict per episode index
            (PointRobot: None = standard start, ``{"state": s}`` = start at s,
            ``{"random_start": True}`` = random start).
        max_episode_steps: episodes are cut after this many steps; default the spec's value, else only the
            env's own termination/truncation ends an episode.
        env_factory: ``task_id -> gymnasium.Env``; default ``lightning_saferl.envs.make_env``.
        cost_limit: limit used by the normalised cost; default the spec's ``cost_limit``.
        progress: show a tqdm bar over finished episodes.

    Env instances are created on first use and reused (each reset re-seeds them); call `close` to free them.
    """

    def __init__(self, task: Union[str, Any], episodes: int = 20, num_envs: int = 10, seed: int = 0,
                 reset_options: Union[dict, Sequence[dict], None] = None, max_episode_steps: Optional[int] = None,
                 env_factory: Optional[Callable[[str], gym.Env]] = None, cost_limit: Optional[float] = None,
                 progress: bool = True):
        if episodes < 1:
            raise InputError(f"EpisodeRunner: episodes must be >= 1, got {episodes}")
        if num_envs < 1:
            raise InputError(f"EpisodeRunner: num_envs must be >= 1, got {num_envs}")
        self.task_id, self.task_spec = _resolve_task(task)
        self.episodes = int(episodes)
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        if reset_options is not None and not isinstance(reset_options, Mapping):
            reset_options = [dict(o) for o in reset_options]
            if len(reset_options) < self.episodes:
                raise InputError(f"EpisodeRunner: {len(reset_options)} per-episode reset_options for "
                                 f"{self.episodes} episodes")
        elif reset_options is not None:
            reset_options = dict(reset_options)
        self.reset_options = reset_options
        if max_episode_steps is None and self.task_spec is not None:
            max_episode_steps = getattr(self.task_spec, "max_episode_steps", None)
        if max_episode_steps is not None and max_episode_steps < 1:
            raise InputError(f"EpisodeRunner: max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = max_episode_steps
        self.env_factory = env_factory if env_factory is not None else _default_env_factory
        self.cost_limit = cost_limit
        self.progress = progress
        self._envs: list[gym.Env] = []

    def run(self, policy) -> dict[str, float]:
        """Metrics (module docstring) over episodes 0..N-1."""
        return self.summarize(self.run_episodes(policy))

    def summarize(self, episodes: Mapping[str, np.ndarray]) -> dict[str, float]:
        """`summarize_episodes` with this runner's task spec and cost limit."""
        return summarize_episodes(episodes, self.task_spec, self.cost_limit)

    def _pool(self, size: int) -> list[gym.Env]:
        while len(self._envs) < size:
            self._envs.append(self.env_factory(self.task_id))
        return self._envs[:size]

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []

    def run_episodes(self, policy, indices: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
        """Per-episode arrays (keys `EPISODE_KEYS`, ordered by episode index) for the episode ``indices``
        (default 0..N-1; a DDP rank passes its `rank_slice`). ``violations`` counts steps with cost > 0."""
        indices = list(range(self.episodes)) if indices is None else [int(i) for i in indices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"EpisodeRunner.run_episodes: duplicate episode indices in {indices}")
        if not indices:
            return _Episodes(self, policy, indices, []).result
        device = torch.device(getattr(policy, "device", "cpu"))
        envs = self._pool(min(len(indices), self.num_envs))
        # the policy's own sampling (diffusion noise, VAE latents) is seeded too, in a forked RNG so that a rollout
        # during training leaves the training stream as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                tqdm(total=len(indices), desc=f"rollout {self.task_id}", disable=not self.progress, leave=False) as bar:
            torch.manual_seed(self.seed + indices[0])
            book = _Episodes(self, policy, indices, envs, bar)
            lockstep(envs, book.start, book.act, book.record, after_step=book.observe)
        order = np.argsort(book.result["index"], kind="stable")
        return {k: v[order] for k, v in book.result.items()}


class _Episodes:
    """One `EpisodeRunner.run_episodes` call: which episode each env slot runs, its running sums, the per-episode
    results, and the `lockstep` callbacks (a contextual policy is told of new episodes and of each step's rewards)."""

    def __init__(self, runner: EpisodeRunner, policy, indices: list[int], envs: list[gym.Env], bar=None):
        self.runner, self.policy, self.indices, self.envs, self.bar = runner, policy, indices, envs, bar
        self.result = {k: np.zeros(len(indices), dtype=np.int64 if k in ("index", "length", "violations")
                                   else np.float64) for k in EPISODE_KEYS}
        self.device = torch.device(getattr(policy, "device", "cpu"))
        self.contextual = callable(getattr(policy, "observe", None))  # EpisodeRunner's module docstring
        self.slot_pos: list[Optional[int]] = [None] * len(envs)  # per slot: position in `indices` of its episode
        self.sums = np.zeros((len(envs), 5))  # per slot: return, cost, length, violations, success
        self.received: list[tuple[float, float]] = []  # (reward, cost) per live slot of the current step
        self.next_pos = 0

    def start(self, slot: int) -> Any:
        if self.next_pos == len(self.indices):
            return None
        episode = self.indices[self.next_pos]
        options = self.runner.reset_options
        if isinstance(options, list):
            options = options[episode]
        obs, _ = self.envs[slot].reset(seed=self.runner.seed + episode, options=options)
        self.slot_pos[slot] = self.next_pos
        self.sums[slot] = 0.0
        self.next_pos += 1
        if self.contextual:
            self.policy.reset([slot])
        return obs

    def act(self, live: list[int], observations: list[Any]) -> np.ndarray:
        obs = torch.from_numpy(np.stack([np.asarray(o, dtype=np.float32) for o in observations])).to(self.device)
        with torch.no_grad():
            actions = self.policy.act(obs, live) if self.contextual else self.policy.act(obs)
        actions = actions.detach().float().cpu().numpy()
        if actions.ndim != 2 or actions.shape[0] != len(live):
            raise ValueError(f"EpisodeRunner: policy.act returned shape {tuple(actions.shape)} for a batch "
                             f"of {len(live)} observations of shape {tuple(obs.shape[1:])}; expected "
                             f"({len(live)}, act_dim)")
        return actions

    def record(self, slot: int, step: Step) -> bool:
        if "cost" not in step.info:
            raise KeyError(f"EpisodeRunner: env {self.runner.task_id!r} returned no 'cost' in the step info "
                           f"(info keys: {sorted(step.info)}); evaluation needs envs that report "
                           "info['cost'] at every step")
        reward, cost = float(step.reward), float(step.info["cost"])
        self.received.append((reward, cost))
        sums = self.sums[slot]
        sums[:4] += (reward, cost, 1.0, float(cost > 0))
        sums[4] = float(bool(step.info.get("is_success", False)))
        limit = self.runner.max_episode_steps
        if not (step.terminated or step.truncated or (limit is not None and sums[2] >= limit)):
            return False
        pos, result = self.slot_pos[slot], self.result
        result["index"][pos] = self.indices[pos]
        result["return"][pos], result["cost"][pos] = sums[0], sums[1]
        result["length"][pos], result["violations"][pos] = int(sums[2]), int(sums[3])
        result["success"][pos] = sums[4]
        self.bar.update(1)
        return True

    def observe(self, live: list[int]) -> None:
        if self.contextual:
            rewards, costs = torch.from_numpy(np.asarray(self.received, dtype=np.float32).T.copy())
            self.policy.observe(live, rewards.to(self.device), costs.to(self.device))
        self.received.clear()


def evaluate_policy(policy: Any, task_spec: Any, limits: Sequence[float], episodes: int, num_envs: int, seed: int,
                    reset_options: Optional[dict] = None) -> dict[str, Any]:
    """`episodes` episodes of `policy` (in eval mode, without gradients) on the task's environment: the metrics of
    `EpisodeRunner` (scored at the first of `limits`) as JSON numbers, plus `limit_scores` at every limit."""
    runner = EpisodeRunner(task_spec, episodes=episodes, num_envs=min(num_envs, episodes), seed=seed,
                           reset_options=reset_options, cost_limit=limits[0])
    policy.eval()
    try:
        with torch.no_grad():
            metrics = runner.run(policy)
    finally:
        runner.close()
    return {"cost_limit": limits[0], "cost_limits": list(limits), **{k: json_number(v) for k, v in metrics.items()},
            **limit_scores(metrics["cost_mean"], task_spec, limits)}


def json_number(value: Any) -> Any:
    """A metric as a JSON number: counts stay integers, everything else becomes a float."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return int(value) if isinstance(value, int) else float(value)


def print_table(rows: Mapping[str, Any], title: str) -> None:
    """A titled two-column table of names and values (floats to 4 significant digits)."""
    width = max(len(k) for k in rows)
    print(f"\n{'=' * (width + 16)}\n {title}\n{'-' * (width + 16)}")
    for key, value in rows.items():
        print(f" {key:<{width}}  {value:.4g}" if isinstance(value, float) else f" {key:<{width}}  {value}")
    print("=" * (width + 16))
