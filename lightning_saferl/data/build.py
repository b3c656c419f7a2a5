"""DSRL-style dataset building: safe online agents at a spread of cost thresholds, their training episodes
recorded, a density filter over the reward-cost plane, a DSRL HDF5 file and its card.

    lightning-saferl build-dataset --task OfflineBallCircle-v0 --out DIR [--workers 2] [--steps_per_agent N] ...

Agents (`lightning_saferl.data.ppo_lagrangian`): one PPO-Lagrangian agent per episode-cost threshold (default:
``0, .05, .1, .2, .35, .5, .75, 1, 1.25`` times the registry's max episode cost, and one unconstrained agent).
Each agent trains in chunks of ``chunk_updates`` updates; an update collects ``horizon`` steps (default: the
task's max episode steps) from each of ``num_envs`` simulators. Every episode that ends during training is
recorded (actions as the env received them, clipped to [-1, 1]); episodes still running when a chunk ends are
dropped, and every chunk starts from freshly built and seeded simulators. After each chunk the agent's episodes
(``agent_KK/chunk_CCCC.npz``) and then its state (``agent_KK/state.pt``, read with ``weights_only=True``) are
written atomically, so an interrupted build rerun with the same command continues after the last finished chunk
and gives the file an uninterrupted build gives (`build.json` holds the settings; a rerun with other settings
is refused). Seeds: agent ``k`` initialises from ``(seed, k)``, chunk ``c`` resets its simulators with seeds
drawn from ``(seed, k, c)``, the filter draws from ``seed``. Agents run in ``workers`` processes (torch threads 1).

Density filter (`density_filter`): episodes with cost above ``max_cost`` are dropped; the (cost, return) plane
of the rest is cut into a ``cost_bins x return_bins`` grid; each cell keeps at most ``cap`` episodes (drawn at
random), with ``cap`` the smallest cap that reaches ``episodes`` kept; the reward-cost frontier (no other episode
has cost <= and a higher return) and the extremes (least and most cost, most return) are always kept (so more
than ``episodes`` remain when they alone outnumber it).

Outputs in DIR: ``<task>.hdf5`` (DSRL keys, `write_dataset`), ``<task>.card.json`` (`dataset_card`) and
``<task>.png`` (the reward-cost scatter with the task family's cost limits marked). ``--partial`` writes
``<task>.partial.*`` from the chunks finished so far (beside a running build, too) and trains nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from lightning_saferl.data.collect import episode_sums
from lightning_saferl.data.download import file_sha256
from lightning_saferl.data.format import REQUIRED_KEYS, write_dataset
from lightning_saferl.data.ppo_lagrangian import PPOLagConfig, PPOLagrangian
from lightning_saferl.data.tasks import TaskSpec, get_task
from lightning_saferl.errors import InputError

__all__ = ["BuildSettings", "default_thresholds", "pareto_frontier", "density_filter", "dataset_card",
           "build_dataset", "build_main", "run_chunk"]

THRESHOLD_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.25)
MAX_COST_FACTOR = 1.25
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
SETTINGS_FILE = "build.json"


def default_thresholds(max_episode_cost: float) -> list[float]:
    """``THRESHOLD_FRACTIONS`` times the task's max episode cost, then ``inf`` (the unconstrained agent)."""
    return [round(f * max_episode_cost, 6) for f in THRESHOLD_FRACTIONS] + [math.inf]


def _reference_episodes(spec: TaskSpec) -> Optional[int]:
    """DSRL's episode count of the task: the last number of its file name (``...-80-886.hdf5`` -> 886)."""
    match = re.search(r"-(\d+)\.hdf5$", spec.dataset_file or "")
    return int(match.group(1)) if match else None


@dataclass
class BuildSettings:
    """Everything that fixes a build's result (stored in ``build.json``)."""

    task: str
    thresholds: list[float]
    steps_per_agent: int
    episodes: int
    max_cost: float
    seed: int = 0
    num_envs: int = 10
    horizon: int = 200
    chunk_updates: int = 25
    cost_bins: int = 20
    return_bins: int = 20
    agent: dict = field(default_factory=lambda: asdict(PPOLagConfig()))

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.horizon

    @property
    def updates_per_agent(self) -> int:
        return max(1, math.ceil(self.steps_per_agent / self.steps_per_update))

    @property
    def chunks_per_agent(self) -> int:
        return math.ceil(self.updates_per_agent / self.chunk_updates)

    def chunk_update_count(self, chunk: int) -> int:
        return min(self.chunk_updates, self.updates_per_agent - chunk * self.chunk_updates)

    def to_json(self) -> dict:
        out = asdict(self)
        out["thresholds"] = [t if math.isfinite(t) else "inf" for t in self.thresholds]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "BuildSettings":
        data = dict(data)
        data["thresholds"] = [float(t) for t in data["thresholds"]]
        return cls(**data)


# --------------------------------------------------------------------------- agents, chunk by chunk
def _agent_dir(out: Path, agent: int) -> Path:
    return out / f"agent_{agent:02d}"


def _chunk_path(out: Path, agent: int, chunk: int) -> Path:
    return _agent_dir(out, agent) / f"chunk_{chunk:04d}.npz"


def _chunks_done(out: Path, agent: int) -> int:
    state = _agent_dir(out, agent) / "state.pt"
    return int(torch.load(state, weights_only=True)["chunks_done"]) if state.exists() else 0


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _new_agent(settings: BuildSettings, agent: int, obs_dim: int, act_dim: int) -> PPOLagrangian:
    with torch.random.fork_rng():
        torch.manual_seed(_seed(settings.seed, agent, 0))
        generator = torch.Generator().manual_seed(_seed(settings.seed, agent, 1))
        return PPOLagrangian(obs_dim, act_dim, settings.thresholds[agent], PPOLagConfig(**settings.agent), generator)


def _save_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _append_step(rollout: dict[str, list], obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray,
                 log_probs: np.ndarray, step: list[tuple]) -> None:
    """One lockstep step of every simulator (`step`: their (obs, r, terminated, truncated, info)) into the update's
    rollout, a list per key with one row per simulator."""
    for key, value in (("observations", obs), ("next_observations", next_obs), ("actions", actions),
                       ("log_probs", log_probs), ("rewards", [s[1] for s in step]),
                       ("costs", [s[4]["cost"] for s in step]), ("terminals", [float(s[2]) for s in step]),
                       ("ends", [float(s[2] or s[3]) for s in step])):
        rollout[key].append(value)


def _write_episodes(path: Path, finished: list[dict[str, np.ndarray]], obs_dim: int, act_dim: int,
                    seconds: float) -> None:
    """A chunk's finished episodes as rows of the DSRL keys (compressed npz, written atomically), with each
    episode's length and the chunk's seconds."""
    widths = {"observations": obs_dim, "next_observations": obs_dim, "actions": act_dim}
    rows = {k: np.concatenate([ep[k].reshape(-1, *([widths[k]] if k in widths else [])) for ep in finished]
                              or [np.zeros((0, widths[k]) if k in widths else 0, np.float32)])
            for k in REQUIRED_KEYS}
    lengths = np.array([len(ep["rewards"]) for ep in finished], np.int64)

    def write_chunk(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, lengths=lengths, seconds=seconds, **rows)
    _save_atomically(path, write_chunk)


def run_chunk(out: Path, settings: BuildSettings, agent_index: int, chunk: int) -> dict:
    """Train agent ``agent_index`` for chunk ``chunk`` (its state from the previous chunk), save its episodes and
    state; returns ``{"agent", "chunk", "seconds", "episodes", "mean_return", "mean_cost", "multiplier"}``."""
    from lightning_saferl.envs import make_env

    start = time.perf_counter()
    torch.set_num_threads(1)
    envs = [make_env(settings.task) for _ in range(settings.num_envs)]
    try:
        obs_dim = int(np.prod(envs[0].observation_space.shape))
        act_dim = int(np.prod(envs[0].action_space.shape))
        agent = _new_agent(settings, agent_index, obs_dim, act_dim)
        state_path = _agent_dir(out, agent_index) / "state.pt"
        if chunk > 0:
            agent.load_full_state(torch.load(state_path, weights_only=True)["agent"])
        reset_rng = np.random.default_rng([settings.seed, agent_index, chunk])
        obs = np.stack([env.reset(seed=int(reset_rng.integers(2**31)))[0] for env in envs])
        running: list[dict[str, list]] = [{k: [] for k in REQUIRED_KEYS} for _ in envs]
        finished: list[dict[str, np.ndarray]] = []
        for _ in range(settings.chunk_update_count(chunk)):
            rollout = {k: [] for k in ("observations", "next_observations", "actions", "log_probs", "rewards",
                                       "costs", "terminals", "ends")}
            ended_costs = []
            for _ in range(settings.horizon):
                actions, log_probs = agent.act(obs)
                step = [env.step(np.clip(a, -1.0, 1.0)) for env, a in zip(envs, actions)]
                next_obs = np.stack([s[0] for s in step])
                for e, (o2, r, term, trunc, info) in enumerate(step):
                    for key, value in (("observations", obs[e]), ("actions", np.clip(actions[e], -1.0, 1.0)),
                                       ("rewards", r), ("costs", info["cost"]), ("next_observations", o2),
                                       ("terminals", float(term)), ("timeouts", float(trunc and not term))):
                        running[e][key].append(value)
                _append_step(rollout, obs, next_obs, actions, log_probs, step)
                obs = next_obs.copy()
                for e, (_, _, term, trunc, _) in enumerate(step):
                    if term or trunc:
                        episode = {k: np.asarray(v, np.float32) for k, v in running[e].items()}
                        finished.append(episode)
                        ended_costs.append(float(episode["costs"].sum()))
                        running[e] = {k: [] for k in REQUIRED_KEYS}
                        obs[e] = envs[e].reset(seed=int(reset_rng.integers(2**31)))[0]
            tensors = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in rollout.items()}
            agent.update(tensors, float(np.mean(ended_costs)) if ended_costs else None)
    finally:
        for env in envs:
            env.close()
    directory = _agent_dir(out, agent_index)
    directory.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - start
    _write_episodes(_chunk_path(out, agent_index, chunk), finished, obs_dim, act_dim, seconds)
    _save_atomically(state_path, lambda p: torch.save({"chunks_done": chunk + 1, "agent": agent.full_state()}, p))
    returns = [float(ep["rewards"].sum()) for ep in finished]
    costs = [float(ep["costs"].sum()) for ep in finished]
    return {"agent": agent_index, "chunk": chunk, "seconds": seconds, "episodes": len(finished),
            "mean_return": float(np.mean(returns)) if returns else math.nan,
            "mean_cost": float(np.mean(costs)) if costs else math.nan, "multiplier": agent.lagrangian.multiplier}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _train_agents(out: Path, settings: BuildSettings, workers: int, progress: bool,
                  max_chunks: Optional[int]) -> bool:
    """Run every agent's missing chunks (at most ``max_chunks`` in this call); True when all are done."""
    agents = range(len(settings.thresholds))
    next_chunk = {a: _chunks_done(out, a) for a in agents}
    todo = [a for a in agents if next_chunk[a] < settings.chunks_per_agent]
    budget = math.inf if max_chunks is None else max_chunks
    done_steps = sum(min(next_chunk[a] * settings.chunk_updates, settings.updates_per_agent)
                     for a in agents) * settings.steps_per_update
    total = len(settings.thresholds) * settings.updates_per_agent * settings.steps_per_update
    with tqdm(total=total, initial=done_steps, unit="step", desc=f"build {settings.task}", disable=not progress,
              smoothing=0.05) as bar:
        def finished(report: dict) -> None:
            a = report["agent"]
            next_chunk[a] += 1
            bar.update(settings.chunk_update_count(report["chunk"]) * settings.steps_per_update)
            bar.set_postfix_str(f"agent {a} (d={settings.thresholds[a]:g}) chunk {report['chunk'] + 1}/"
                                f"{settings.chunks_per_agent}: return {report['mean_return']:.1f} cost "
                                f"{report['mean_cost']:.1f} lambda {report['multiplier']:.2f}")
        started = 0
        if workers <= 1:
            for a in todo:
                while next_chunk[a] < settings.chunks_per_agent and started < budget:
                    started += 1
                    finished(run_chunk(out, settings, a, next_chunk[a]))
        else:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)
            try:
                pending = {}
                for a in todo:
                    if started < budget:
                        started += 1
                        pending[pool.submit(run_chunk, out, settings, a, next_chunk[a])] = a
                while pending:
                    completed, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in completed:
                        a = pending.pop(future)
                        finished(future.result())
                        if next_chunk[a] < settings.chunks_per_agent and started < budget:
                            started += 1
                            pending[pool.submit(run_chunk, out, settings, a, next_chunk[a])] = a
            finally:  # interrupted: queued chunks are dropped, running ones end (their files are written whole)
                pool.shutdown(wait=True, cancel_futures=True)
    return all(next_chunk[a] >= settings.chunks_per_agent for a in agents)


# --------------------------------------------------------------------------- the density filter
def pareto_frontier(returns: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Boolean mask of the frontier: episodes that no other episode beats with cost <= and a higher return
    (among equal (cost, return) pairs the first one)."""
    order = np.lexsort((-returns, costs))  # by cost, then return descending
    keep = np.zeros(len(returns), bool)
    best = -np.inf
    for i in order:
        if returns[i] > best:
            keep[i] = True
            best = returns[i]
    return keep


def density_filter(returns: np.ndarray, costs: np.ndarray, episodes: int, max_cost: float, cost_bins: int = 20,
                   return_bins: int = 20, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of the episodes kept by the density filter (module docstring)."""
    returns, costs = np.asarray(returns, np.float64), np.asarray(costs, np.float64)
    eligible = np.flatnonzero(costs <= max_cost)
    if len(eligible) <= episodes:
        return eligible
    r, c = returns[eligible], costs[eligible]
    must = pareto_frontier(r, c)
    must[[np.argmin(c), np.argmax(c), np.argmax(r)]] = True

    def bins(x: np.ndarray, n: int) -> np.ndarray:
        span = x.max() - x.min()
        return np.zeros(len(x), np.int64) if span == 0 else np.minimum(((x - x.min()) / span * n).astype(np.int64),
                                                                       n - 1)
    cell = bins(c, cost_bins) * return_bins + bins(r, return_bins)
    rng = np.random.default_rng(seed)
    # rank within the cell: the always-kept episodes first, the others in random order
    order = np.lexsort((rng.permutation(len(cell)), ~must, cell))
    rank = np.empty(len(cell), np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(cell[order])) + 1]
    sizes = np.diff(np.r_[starts, len(cell)])
    rank[order] = np.arange(len(cell)) - np.repeat(starts, sizes)

    def kept(cap: int) -> np.ndarray:
        return must | (rank < cap)
    low, high = 0, int(sizes.max())
    while low < high:  # the smallest cap keeping >= episodes
        mid = (low + high) // 2
        if kept(mid).sum() >= episodes:
            high = mid
        else:
            low = mid + 1
    keep = kept(low)
    surplus = int(keep.sum()) - episodes
    if surplus > 0:  # drop random ones of the last admitted rank to land on `episodes`
        marginal = np.flatnonzero(keep & ~must & (rank == low - 1))
        keep[rng.choice(marginal, size=min(surplus, len(marginal)), replace=False)] = False
    return eligible[np.flatnonzero(keep)]


# --------------------------------------------------------------------------- card and plot
def _limit_key(limit: float) -> str:
    return f"{limit:g}"


def dataset_card(arrays: dict[str, np.ndarray], spec: TaskSpec, sha256: str, minutes: float,
                 extra: Optional[dict] = None) -> dict:
    """The card of a DSRL dataset: sizes, episode return / cost extremes and quantiles, the best return among
    episodes with cost <= each of the task family's limits (raw and DSRL-normalised), the registry's max
    episode cost, build minutes and sha256; ``extra`` (agents, thresholds, settings) is merged in."""
    returns, costs = episode_sums(arrays)
    best = {}
    for limit in spec.cost_limits:
        under = returns[costs <= limit]
        best[_limit_key(limit)] = float(under.max()) if len(under) else None
    normalised = spec.has_reference_scores
    card = {
        "task": spec.task_id,
        "episodes": int(len(returns)),
        "transitions": int(len(arrays["rewards"])),
        "episode_cost_min": float(costs.min()),
        "episode_cost_max": float(costs.max()),
        "episode_return_max": float(returns.max()),
        "best_return_at_cost": best,
        "best_normalized_return_at_cost": {k: (None if v is None or not normalised
                                               else float(spec.normalized_return(v))) for k, v in best.items()},
        "max_episode_cost_ref": spec.cost_max,
        "return_quantiles": {f"{q:g}": float(np.quantile(returns, q)) for q in QUANTILES},
        "cost_quantiles": {f"{q:g}": float(np.quantile(costs, q)) for q in QUANTILES},
        "normalized_return_max": float(spec.normalized_return(returns.max())) if normalised else None,
        "minutes": round(float(minutes), 2),
        "sha256": sha256,
    }
    card.update(extra or {})
    return card


def plot_scatter(arrays: dict[str, np.ndarray], spec: TaskSpec, path: Path,
                 groups: Optional[np.ndarray] = None) -> Path:
    """The reward-cost scatter of the episodes, with the task family's cost limits as dashed lines; ``groups``
    (one label per episode, e.g. the threshold of the agent that played it) colours the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    returns, costs = episode_sums(arrays)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = np.zeros(len(returns)) if groups is None else np.asarray(groups)
    labels = list(dict.fromkeys(groups.tolist()))
    for label in labels:
        mine = groups == label
        ax.scatter(costs[mine], returns[mine], s=6, alpha=0.6, label=f"{label:g}")
    if len(labels) > 1:
        ax.legend(title="agent threshold", fontsize=7, title_fontsize=7, markerscale=2,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for limit in spec.cost_limits:
        ax.axvline(limit, color="gray", linestyle="--", linewidth=1)
        ax.text(limit, ax.get_ylim()[1], f" {limit:g}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("episode cost")
    ax.set_ylabel("episode return")
    ax.set_title(f"{spec.task_id}: {len(returns)} episodes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the build
def _check_settings(out: Path, settings: BuildSettings) -> float:
    """Store the settings on a first run; refuse other settings on a rerun. Returns the wall seconds so far."""
    path = out / SETTINGS_FILE
    wanted = settings.to_json()
    if path.exists():
        stored = json.loads(path.read_text())
        for key, value in wanted.items():
            if stored["settings"].get(key) != value:
                raise InputError(f"{path}: this build was started with {key}={stored['settings'].get(key)!r}, "
                                 f"not {value!r}; rerun with the same settings or use another --out")
        return float(stored["wall_seconds"])
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": wanted, "wall_seconds": 0.0}, indent=1))
    return 0.0


def _record_wall_seconds(out: Path, seconds: float) -> None:
    path = out / SETTINGS_FILE
    stored = json.loads(path.read_text())
    stored["wall_seconds"] = seconds
    path.write_text(json.dumps(stored, indent=1))


def _episode_table(out: Path, chunks: list[int]) -> tuple[np.ndarray, float]:
    """One row per episode recorded in the first ``chunks[a]`` chunks of each agent ``a``, agent by agent and chunk
    by chunk: (agent, chunk, first row, end row, return, cost); and those chunks' summed seconds. Reads only
    rewards and costs."""
    table, seconds = [], 0.0
    for a, done in enumerate(chunks):
        for c in range(done):
            with np.load(_chunk_path(out, a, c)) as chunk:
                seconds += float(chunk["seconds"])
                ends = np.cumsum(chunk["lengths"])
                if len(ends) == 0:
                    continue
                starts = ends - chunk["lengths"]
                sums = [np.add.reduceat(chunk[k].astype(np.float64), starts) for k in ("rewards", "costs")]
                table.append(np.column_stack([np.full(len(ends), a), np.full(len(ends), c), starts, ends, *sums]))
    return (np.concatenate(table) if table else np.zeros((0, 6))), seconds


def _gather(out: Path, table: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The DSRL arrays of the episodes ``table[rows]``, in table order (one chunk file open at a time)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in REQUIRED_KEYS}
    chunks = table[rows, :2].astype(np.int64)
    for a, c in np.unique(chunks, axis=0):
        with np.load(_chunk_path(out, int(a), int(c))) as chunk:
            data = {k: chunk[k] for k in REQUIRED_KEYS}
        for i in rows[(chunks[:, 0] == a) & (chunks[:, 1] == c)]:
            start, end = int(table[i, 2]), int(table[i, 3])
            for k in REQUIRED_KEYS:
                parts[k].append(data[k][start:end])
    return {k: np.concatenate(v) for k, v in parts.items()}


def build_dataset(settings: BuildSettings, out: str | Path, workers: int = 1, progress: bool = True,
                  max_chunks: Optional[int] = None, partial: bool = False) -> Optional[dict]:
    """Train, record, filter and write (module docstring). Returns the card, or None when ``max_chunks`` stopped
    the build before every agent finished (rerun to continue). ``partial``: train nothing; write
    ``<task>.partial.hdf5`` (and its card and plot) from the chunks finished so far, e.g. beside a running build."""
    out = Path(out)
    start = time.perf_counter()
    wall_before = _check_settings(out, settings)
    if partial:
        chunks = [_chunks_done(out, a) for a in range(len(settings.thresholds))]
        return _write_outputs(out, settings, chunks, f"{settings.task}.partial", wall_before / 60, workers)
    try:
        complete = _train_agents(out, settings, workers, progress, max_chunks)
    finally:
        _record_wall_seconds(out, wall_before + time.perf_counter() - start)
    if not complete:
        return None
    return _write_outputs(out, settings, [settings.chunks_per_agent] * len(settings.thresholds), settings.task,
                          (wall_before + time.perf_counter() - start) / 60, workers)


def _write_outputs(out: Path, settings: BuildSettings, chunks: list[int], name: str, wall_minutes: float,
                   workers: int) -> dict:
    """Filter the episodes of each agent's first ``chunks[agent]`` chunks; write ``name``.hdf5 / .card.json / .png
    in ``out``; returns the card."""
    table, core_seconds = _episode_table(out, chunks)
    if not len(table):
        raise InputError(f"{out}: the agents recorded no finished episode; raise --steps_per_agent or --horizon")
    returns, costs, agents = table[:, 4], table[:, 5], table[:, 0].astype(np.int64)
    keep = density_filter(returns, costs, settings.episodes, settings.max_cost, settings.cost_bins,
                          settings.return_bins, settings.seed)
    if len(keep) == 0:
        raise InputError(f"{out}: no recorded episode has cost <= max_cost={settings.max_cost}")
    arrays = _gather(out, table, keep)
    path = write_dataset(out / f"{name}.hdf5", arrays,
                         attrs={"task_id": settings.task, "seed": settings.seed, "builder": "build-dataset"})
    agent_rows = []
    for a, threshold in enumerate(settings.thresholds):
        mine = np.flatnonzero(agents == a)
        last = mine[-settings.num_envs:]  # the agent's final episodes: what it learned
        agent_rows.append({"threshold": threshold if math.isfinite(threshold) else "inf", "chunks": chunks[a],
                           "recorded_episodes": len(mine), "kept_episodes": int((agents[keep] == a).sum()),
                           "final_return": float(returns[last].mean()) if len(mine) else None,
                           "final_cost": float(costs[last].mean()) if len(mine) else None})
    spec = get_task(settings.task)
    card = dataset_card(arrays, spec, file_sha256(path), wall_minutes, extra={
        "partial": sum(chunks) < settings.chunks_per_agent * len(chunks),
        "core_minutes": round(core_seconds / 60, 2), "workers": workers,
        "recorded_episodes": len(table), "agent": "PPO-Lagrangian (lightning_saferl.data.ppo_lagrangian)",
        "agents": agent_rows, "thresholds": [row["threshold"] for row in agent_rows],
        "settings": settings.to_json()})
    (out / f"{name}.card.json").write_text(json.dumps(card, indent=1))
    plot_scatter(arrays, spec, out / f"{name}.png", np.asarray(settings.thresholds)[agents[keep]])
    print(f"wrote {path}: {card['episodes']} episodes ({card['transitions']} transitions) of "
          f"{card['recorded_episodes']} recorded, cost [{card['episode_cost_min']:.0f}, "
          f"{card['episode_cost_max']:.0f}], best return at cost <= limit {card['best_return_at_cost']}, "
          f"{card['minutes']:.1f} min")
    return card


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    spec = get_task(args.task)
    if spec.simulator == "point_robot" or spec.cost_max is None:
        raise InputError(f"build-dataset: {args.task} is not a DSRL simulator task (PointRobot-v0 is built with "
                         "`lightning-saferl collect`)")
    thresholds = default_thresholds(spec.cost_max) if args.thresholds is None else [
        math.inf if t in ("inf", "none") else float(t) for t in args.thresholds]
    if any(t < 0 for t in thresholds):
        raise InputError(f"build-dataset: --thresholds must be >= 0 (or inf), got {args.thresholds}")
    episodes = args.episodes or _reference_episodes(spec)
    if episodes is None:
        raise InputError(f"build-dataset: {args.task} has no reference episode count; pass --episodes")
    for name, value in (("steps_per_agent", args.steps_per_agent), ("episodes", episodes),
                        ("num_envs", args.num_envs), ("chunk_updates", args.chunk_updates)):
        if value <= 0:
            raise InputError(f"build-dataset: --{name} must be positive, got {value}")
    agent = asdict(PPOLagConfig())
    agent["minibatch"] = min(agent["minibatch"], args.num_envs * (args.horizon or spec.max_episode_steps))
    return BuildSettings(task=args.task, thresholds=thresholds, steps_per_agent=args.steps_per_agent,
                         episodes=episodes,
                         max_cost=args.max_cost if args.max_cost is not None else MAX_COST_FACTOR * spec.cost_max,
                         seed=args.seed, num_envs=args.num_envs, horizon=args.horizon or spec.max_episode_steps,
                         chunk_updates=args.chunk_updates, agent=agent)


def build_main(argv: Optional[list[str]] = None) -> Optional[dict]:
    """`lightning-saferl build-dataset --task ID --out DIR [...]` (module docstring)."""
    parser = argparse.ArgumentParser(prog="lightning-saferl build-dataset",
                                     description="Build a DSRL-style dataset with PPO-Lagrangian agents "
                                                 "(rerun the same command to resume).")
    parser.add_argument("--task", required=True, help="DSRL task id, e.g. OfflineBallCircle-v0")
    parser.add_argument("--out", required=True, help="build directory (agents' chunks, the file, its card)")
    parser.add_argument("--steps_per_agent", "--steps-per-agent", type=int, default=1_000_000,
                        help="env steps each agent trains for (default: %(default)s)")
    parser.add_argument("--thresholds", nargs="+", default=None,
                        help="episode-cost thresholds, 'inf' for an unconstrained agent (default: "
                             f"{', '.join(map(str, THRESHOLD_FRACTIONS))} x the registry's max episode cost, inf)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes kept by the filter (default: DSRL's count for the task)")
    parser.add_argument("--max_cost", "--max-cost", type=float, default=None,
                        help=f"drop episodes above this cost (default: {MAX_COST_FACTOR} x the registry's max)")
    parser.add_argument("--num_envs", "--num-envs", type=int, default=10, help="simulators per agent (default: 10)")
    parser.add_argument("--horizon", type=int, default=None,
                        help="rollout steps per simulator per update (default: the task's max episode steps)")
    parser.add_argument("--chunk_updates", "--chunk-updates", type=int, default=25,
                        help="updates per saved chunk (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="agent processes in parallel (default: 1)")
    parser.add_argument("--max_chunks", "--max-chunks", type=int, default=None,
                        help="stop after this many chunks in this call (rerun to continue)")
    parser.add_argument("--partial", action="store_true",
                        help="train nothing: write <task>.partial.hdf5 from the chunks finished so far")
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.horizon is not None and args.horizon <= 0:
        raise InputError(f"build-dataset: --horizon must be positive, got {args.horizon}")
    return build_dataset(settings_from_args(args), args.out, args.workers, not args.no_progress, args.max_chunks,
                         args.partial)
