"""Dataset collection: roll out a behaviour policy and write a DSRL-format HDF5 file.

PointRobot-v0 is collected with its batched torch dynamics: a wave of up to ``num_envs`` episodes runs in
parallel for up to ``MAX_EPISODE_STEPS`` steps, episodes are laid out one after another (each intact, in order), and
waves are appended until ``steps`` rows exist; the dataset is cut at exactly ``steps`` rows (the last episode
may be cut; the reader treats the last row as an episode end). All randomness comes from one
``torch.Generator`` seeded with ``seed``, so a seed fixes the file contents.

Behaviours (per episode; starts are random-start draws, or the standard start with probability 0.1):

* ``expert``: :func:`~lightning_saferl.envs.point_robot.scripted_controller` (goal seeking, avoids hazards);
* ``random``: actions uniform in [-1, 1]^2 at every step;
* ``mixed``: 15% random episodes, 25% *reckless* ones (the controller without hazard avoidance) and 60%
  expert ones; all non-random episodes add Gaussian action noise with a per-episode std uniform in
  [0, 0.8]. The data then hold safe goal-reaching episodes, hazard-entering ones, and episodes that
  start inside a hazard or doomed to enter one.
* ``scarce``: the same kinds of episodes with safe expert ones scarce: 10% expert, 60% reckless, 30% random
  (the data FISOR is meant for: mostly unsafe or aimless behaviour, few safe demonstrations).

Every DSRL task is collected from its simulator env (`lightning_saferl.envs.make_env`) by `rollout_env`:
``num_envs`` env instances are stepped in lockstep (one batched policy call per step), episode ``k`` is reset
with a seed drawn from the collection's generator, and finished episodes are laid out in the order they end.
New episodes stop starting once ``steps`` rows exist (finished plus running); the running ones complete, and
the file keeps the first ``steps`` rows, so only its last episode may be cut (its last row is then marked as a
timeout). ``terminals`` are the env's terminations, ``timeouts`` its truncations (time limit) and that cut.
Behaviours (per episode):

* ``random``: actions uniform in [-1, 1]^act_dim at every step;
* ``policy``: a trained policy checkpoint (``--policy``, `lightning_saferl.policy.load_policy`) plus Gaussian
  noise of std ``noise``, clipped to [-1, 1];
* ``mixed``: each episode is uniform random, *correlated* random (``x_0 = s e_0``,
  ``x_{t+1} = 0.9 x_t + sqrt(1 - 0.81) s e_t``, e_t ~ N(0, I), so x_t has std ``s``; action ``clip(x_t)``;
  ``s`` uniform in [0.3, 1] per episode: long coherent manoeuvres that reach speed and leave safe zones), or,
  with a policy, the noisy policy with a per-episode std uniform in [0, 2 noise]; the kinds are equally likely.
  Without a policy the returns stay far below what a trained policy reaches: collect with ``--policy`` for
  high-return data.

Randomness: one ``numpy`` generator seeded with ``seed`` (behaviours, noise, reset seeds) and torch's global
generator seeded with ``seed`` for the policy's own sampling; a seed and ``num_envs`` fix the file up to the
simulator's determinism.
"""
from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from lightning_saferl.data.format import write_dataset
from lightning_saferl.data.tasks import dsrl_task_ids, get_task
from lightning_saferl.envs import point_robot as pr
from lightning_saferl.errors import InputError
from lightning_saferl.evaluation import Step, lockstep

BEHAVIORS = ("mixed", "expert", "random", "scarce")  # PointRobot-v0 (batched scripted behaviours)
ENV_BEHAVIORS = ("mixed", "random", "policy")  # simulator tasks
ENV_NUM_ENVS = 8
CORRELATION = 0.9
CORRELATED_SCALE = (0.3, 1.0)
STANDARD_START_PROB = 0.1
MIXED_MAX_NOISE = 0.8
# behaviour -> (random share, reckless share) of episodes; the rest are expert (avoiding hazards)
EPISODE_MIX = {"mixed": (0.15, 0.25), "scarce": (0.3, 0.6)}


def _point_robot_wave(
    num_envs: int, behavior: str, generator: torch.Generator, bar: tqdm
) -> dict[str, torch.Tensor]:
    """Run `num_envs` episodes in parallel; returns transitions laid out episode after episode."""
    dtype = torch.float64
    states = pr.sample_random_starts(num_envs, generator, dtype)
    standard = torch.rand(num_envs, generator=generator, dtype=dtype) < STANDARD_START_PROB
    states[standard] = torch.tensor(pr.STANDARD_START, dtype=dtype)
    draw = torch.rand(num_envs, generator=generator, dtype=dtype)
    noise_std = MIXED_MAX_NOISE * torch.rand(num_envs, generator=generator, dtype=dtype)
    if behavior in EPISODE_MIX:
        random_share, reckless_share = EPISODE_MIX[behavior]
        random_mode = draw < random_share
        avoid = draw >= random_share + reckless_share
    else:
        random_mode = torch.full((num_envs,), behavior == "random")
        avoid = torch.ones(num_envs, dtype=torch.bool)
        noise_std = torch.zeros_like(noise_std)

    alive = torch.ones(num_envs, dtype=torch.bool)
    steps: list[dict[str, torch.Tensor]] = []
    for t in range(pr.MAX_EPISODE_STEPS):
        uniform = 2 * torch.rand(num_envs, pr.ACT_DIM, generator=generator, dtype=dtype) - 1
        gaussian = torch.randn(num_envs, pr.ACT_DIM, generator=generator, dtype=dtype)
        scripted = pr.scripted_controller(states, avoid) + noise_std[:, None] * gaussian
        actions = torch.where(random_mode[:, None], uniform, scripted).clamp(-1.0, 1.0)
        next_states = pr.step_states(states, actions)
        terminal = pr.reached_goal(next_states) | pr.out_of_bounds(next_states)
        constraint = pr.constraint_value(next_states)
        steps.append(
            {
                "observations": pr.observe(states),
                "actions": actions,
                "rewards": pr.compute_reward(states, next_states),
                "costs": (constraint > 0).to(dtype),
                "next_observations": pr.observe(next_states),
                "terminals": terminal.to(dtype),
                "timeouts": (~terminal).to(dtype) * float(t == pr.MAX_EPISODE_STEPS - 1),
                "constraint_values": constraint,
                "valid": alive.clone(),
            }
        )
        bar.update(min(int(alive.sum()), bar.total - bar.n))
        alive &= ~terminal
        states = next_states
        if not alive.any():
            break
    valid = torch.stack([s["valid"] for s in steps], dim=1)  # (B, T): episode-major layout
    return {
        key: torch.stack([s[key] for s in steps], dim=1)[valid].to(torch.float32)
        for key in steps[0]
        if key != "valid"
    }


def rollout_point_robot(
    steps: int, seed: int, behavior: str = "mixed", num_envs: int = 2048, progress: bool = True
) -> dict[str, np.ndarray]:
    """Collect exactly `steps` PointRobot transitions (DSRL keys + ``constraint_values``) as float32 arrays.

    Waves of ``min(num_envs, ceil(steps / 32))`` episodes run in parallel until `steps` rows exist.
    """
    if behavior not in BEHAVIORS:
        raise InputError(f"unknown behavior {behavior!r}; choose one of {BEHAVIORS}")
    if steps <= 0 or num_envs <= 0:
        raise InputError(f"steps and num_envs must be positive, got steps={steps}, num_envs={num_envs}")
    wave_size = min(num_envs, math.ceil(steps / 32))  # episodes average ~65 steps: small datasets need few
    generator = torch.Generator().manual_seed(seed)
    waves: list[dict[str, torch.Tensor]] = []
    collected = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors are small: intra-op threads only add overhead (and stall under load)
    try:
        with tqdm(total=steps, desc=f"collect PointRobot-v0 ({behavior})", unit="step", disable=not progress) as bar:
            while collected < steps:
                waves.append(_point_robot_wave(wave_size, behavior, generator, bar))
                collected += len(waves[-1]["rewards"])
    finally:
        torch.set_num_threads(threads)
    return {key: torch.cat([w[key] for w in waves])[:steps].numpy() for key in waves[0]}


class _Episode:
    """Rows of one running episode in one env slot, and how its actions are chosen."""

    def __init__(self, obs: np.ndarray, kind: str, scale: float):
        self.obs, self.kind, self.scale = obs, kind, scale
        self.state: Optional[np.ndarray] = None  # correlated-noise state
        self.rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "costs",
                                                      "next_observations", "terminals", "timeouts")}

    def __len__(self) -> int:
        return len(self.rows["rewards"])

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.rows.items()}


def _episode_kind(behavior: str, has_policy: bool, rng: np.random.Generator, noise: float) -> tuple[str, float]:
    """(kind, scale) of a new episode: kind in random / correlated / policy; scale = noise std or s."""
    if behavior == "random":
        return "random", 0.0
    if behavior == "policy":
        return "policy", noise
    kinds = ("random", "correlated", "policy") if has_policy else ("random", "correlated")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "correlated":
        return kind, float(rng.uniform(*CORRELATED_SCALE))
    return kind, float(rng.uniform(0.0, 2.0 * noise)) if kind == "policy" else 0.0


def _policy_actions(policy, obs: np.ndarray, act_dim: int) -> np.ndarray:
    with torch.no_grad():
        actions = policy.act(torch.as_tensor(obs, dtype=torch.float32, device=policy.device))
    actions = actions.detach().float().cpu().numpy()
    if actions.shape != (len(obs), act_dim):
        raise ValueError(f"collect: policy.act returned shape {actions.shape} for {len(obs)} observations of "
                         f"shape {obs.shape[1:]}; the env expects actions of shape ({len(obs)}, {act_dim})")
    return actions


class _EnvCollection:
    """One `rollout_env` run: the running episode of each env slot, the finished ones in the order they ended, and the
    `lockstep` callbacks. New episodes stop starting once `steps` rows exist (finished plus running)."""

    def __init__(self, envs: list, steps: int, behavior: str, rng: np.random.Generator, actor, noise: float, bar):
        self.envs, self.steps, self.behavior, self.rng, self.actor, self.noise, self.bar = (
            envs, steps, behavior, rng, actor, noise, bar)
        self.act_dim = int(np.prod(envs[0].action_space.shape))
        self.slots: list[Optional[_Episode]] = [None] * len(envs)
        self.finished: list[dict[str, np.ndarray]] = []
        self.done_rows = 0

    def rows(self) -> int:
        """Rows written so far: finished episodes and running ones."""
        return self.done_rows + sum(len(ep) for ep in self.slots if ep is not None)

    def start(self, slot: int) -> Optional[np.ndarray]:
        if self.rows() >= self.steps:
            return None
        obs, _ = self.envs[slot].reset(seed=int(self.rng.integers(2**31)))
        kind, scale = _episode_kind(self.behavior, self.actor is not None, self.rng, self.noise)
        self.slots[slot] = _Episode(np.asarray(obs, np.float32), kind, scale)
        return self.slots[slot].obs

    def act(self, live: list[int], observations: list[np.ndarray]) -> np.ndarray:
        rng, act_dim = self.rng, self.act_dim
        actions = rng.uniform(-1.0, 1.0, (len(live), act_dim))
        on_policy = [i for i, s in enumerate(live) if self.slots[s].kind == "policy"]
        if on_policy:
            obs = np.stack([np.asarray(observations[i], np.float32) for i in on_policy])
            actions[on_policy] = _policy_actions(self.actor, obs, act_dim)
        for i, s in enumerate(live):
            ep = self.slots[s]
            if ep.kind == "correlated":
                innovation = ep.scale * rng.standard_normal(act_dim)
                ep.state = innovation if ep.state is None else (
                    CORRELATION * ep.state + math.sqrt(1 - CORRELATION**2) * innovation)
                actions[i] = ep.state
            elif ep.kind == "policy":
                actions[i] += ep.scale * rng.standard_normal(act_dim)
        return np.clip(actions, -1.0, 1.0)

    def record(self, slot: int, step: Step) -> bool:
        ep = self.slots[slot]
        next_obs = np.asarray(step.observation, np.float32)
        for key, value in (("observations", ep.obs), ("actions", step.action), ("rewards", step.reward),
                           ("costs", step.info["cost"]), ("next_observations", next_obs),
                           ("terminals", float(step.terminated)),
                           ("timeouts", float(step.truncated and not step.terminated))):
            ep.rows[key].append(value)
        ep.obs = next_obs
        self.bar.update(max(0, min(self.rows(), self.steps) - self.bar.n))
        if not (step.terminated or step.truncated):
            return False
        self.finished.append(ep.arrays())
        self.done_rows += len(ep)
        self.slots[slot] = None
        return True


def rollout_env(
    task_id: str,
    steps: int,
    seed: int,
    behavior: str = "mixed",
    num_envs: int = ENV_NUM_ENVS,
    progress: bool = True,
    policy: Optional[str] = None,
    noise: float = 0.3,
) -> dict[str, np.ndarray]:
    """Collect exactly `steps` transitions of `task_id` from its env (module docstring) as float32 arrays.

    ``policy``: checkpoint path (required by ``policy``, optional for ``mixed``); ``noise``: Gaussian std.
    """
    from lightning_saferl.envs import make_env

    if behavior not in ENV_BEHAVIORS:
        raise InputError(f"unknown behavior {behavior!r} for {task_id}; choose one of {ENV_BEHAVIORS}")
    if behavior == "policy" and policy is None:
        raise InputError("behavior 'policy' needs a policy checkpoint (--policy CKPT)")
    if policy is not None and behavior == "random":
        raise InputError("behavior 'random' takes no policy; use 'policy' or 'mixed'")
    if steps <= 0 or num_envs <= 0 or noise < 0:
        raise InputError(f"steps and num_envs must be positive and noise >= 0, got steps={steps}, "
                         f"num_envs={num_envs}, noise={noise}")
    actor = None
    if policy is not None:
        from lightning_saferl.policy import load_policy

        actor = load_policy(policy)
    envs: list = []
    try:
        envs.extend(make_env(task_id) for _ in range(num_envs))
        obs_dim = int(np.prod(envs[0].observation_space.shape))
        expected = getattr(actor, "hparams", {}).get("obs_dim") if actor is not None else None
        if expected is not None and expected != obs_dim:
            raise InputError(f"{policy}: the policy takes observations of size {expected}, but {task_id} "
                             f"gives {obs_dim}")
        with torch.random.fork_rng(), tqdm(total=steps, desc=f"collect {task_id} ({behavior})", unit="step",
                                           disable=not progress) as bar:
            torch.manual_seed(seed)
            run = _EnvCollection(envs, steps, behavior, np.random.default_rng(seed), actor, noise, bar)
            # a finished slot restarts before the next slot steps: Bullet's reset seeds numpy's global generator, so
            # the order is part of what a seed fixes
            lockstep(envs, run.start, run.act, run.record, restart_at_once=True)
    finally:
        for env in envs:
            env.close()
    arrays = {key: np.concatenate([ep[key] for ep in run.finished])[:steps] for key in run.finished[0]}
    if arrays["terminals"][-1] == 0:
        arrays["timeouts"][-1] = 1.0  # the cut (or a time limit) ends the last episode
    return arrays


# task id -> collector(steps, seed, behavior, num_envs, progress, **behavior options) -> DSRL arrays
COLLECTORS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    pr.ENV_ID: rollout_point_robot,
    **{task_id: partial(rollout_env, task_id) for task_id in dsrl_task_ids()},
}


def episode_sums(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(returns, costs) per episode of DSRL arrays, float64 (an episode ends at terminals/timeouts or at the
    last row)."""
    ends = (np.asarray(arrays["terminals"]) > 0) | (np.asarray(arrays["timeouts"]) > 0)
    ends[-1] = True
    starts = np.concatenate(([0], np.flatnonzero(ends)[:-1] + 1))
    returns = np.add.reduceat(np.asarray(arrays["rewards"], np.float64), starts)
    costs = np.add.reduceat(np.asarray(arrays["costs"], np.float64), starts)
    return returns, costs


def summarize(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Episode statistics of DSRL arrays (an episode ends at terminals/timeouts or at the last row)."""
    returns, costs = episode_sums(arrays)
    return {
        "transitions": int(len(arrays["rewards"])),
        "episodes": int(len(returns)),
        "mean_return": float(returns.mean()),
        "min_return": float(returns.min()),
        "max_return": float(returns.max()),
        "mean_cost": float(costs.mean()),
        "min_cost": float(costs.min()),
        "max_cost": float(costs.max()),
        "violation_share": float((arrays["costs"] > 0).mean()),
        "unsafe_episode_share": float((costs > 0).mean()),
    }


def collect(
    task_id: str,
    out: str | Path,
    steps: int,
    seed: int,
    behavior: str = "mixed",
    num_envs: Optional[int] = None,
    progress: bool = True,
    policy: Optional[str] = None,
    noise: float = 0.3,
) -> dict[str, float]:
    """Collect `steps` transitions of `task_id` with `behavior`, write them to `out` (DSRL HDF5), print and
    return a summary (transitions, episodes, mean/min/max return and cost, violation_share,
    unsafe_episode_share, seconds).

    ``num_envs``: episodes simulated together (default: 2048 for PointRobot-v0, 8 env instances otherwise).
    ``policy``/``noise``: behaviour-policy checkpoint and its Gaussian noise std (simulator tasks).
    """
    if task_id not in COLLECTORS:
        get_task(task_id)  # an unknown id: UnknownNameError naming the close ones
        raise InputError(f"collect: no collector for task {task_id!r} (available: {sorted(COLLECTORS)})")
    options = {"num_envs": num_envs} if num_envs is not None else {}
    if task_id == pr.ENV_ID:
        if policy is not None:
            raise InputError(f"collect: {pr.ENV_ID} is collected with its scripted behaviours {BEHAVIORS}; "
                             "--policy applies to simulator tasks")
    else:
        options.update(policy=policy, noise=noise)
    start = time.perf_counter()
    arrays = COLLECTORS[task_id](steps=steps, seed=seed, behavior=behavior, progress=progress, **options)
    attrs = {"task_id": task_id, "seed": seed, "behavior": behavior}
    if policy is not None:
        attrs.update(policy=str(policy), noise=noise)
    path = write_dataset(out, arrays, attrs=attrs)
    summary = summarize(arrays)
    summary["seconds"] = time.perf_counter() - start
    print(
        f"wrote {path}: {summary['transitions']} transitions, {summary['episodes']} episodes, "
        f"return mean {summary['mean_return']:.3f} [{summary['min_return']:.3f}, {summary['max_return']:.3f}], "
        f"cost mean {summary['mean_cost']:.2f} [{summary['min_cost']:.0f}, {summary['max_cost']:.0f}], "
        f"violating transitions {100 * summary['violation_share']:.1f}%, "
        f"unsafe episodes {100 * summary['unsafe_episode_share']:.1f}% ({summary['seconds']:.1f} s)"
    )
    return summary


def collect_main(argv: list[str] | None = None) -> dict[str, float]:
    """`lightning-saferl collect --task ID --out FILE --steps N --seed S [--behavior B] [--policy CKPT --noise X]`"""
    parser = argparse.ArgumentParser(prog="lightning-saferl collect",
                                     description="Collect an offline dataset (DSRL HDF5).")
    parser.add_argument("--task", default=pr.ENV_ID, help="task id (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--steps", type=int, default=100_000, help="number of transitions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--behavior", choices=sorted(set(BEHAVIORS) | set(ENV_BEHAVIORS)), default="mixed",
                        help=f"behaviour policy (default: %(default)s); {pr.ENV_ID}: {', '.join(BEHAVIORS)}; "
                             f"simulator tasks: {', '.join(ENV_BEHAVIORS)}")
    parser.add_argument("--policy", default=None, help="policy checkpoint for --behavior policy / mixed")
    parser.add_argument("--noise", type=float, default=0.3,
                        help="std of the Gaussian noise added to the policy's actions (default: %(default)s)")
    parser.add_argument("--num_envs", "--num-envs", type=int, default=None,
                        help=f"episodes simulated together (default: 2048 for {pr.ENV_ID}, "
                             f"{ENV_NUM_ENVS} env instances otherwise)")
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    return collect(args.task, args.out, args.steps, args.seed, args.behavior, args.num_envs, not args.no_progress,
                   args.policy, args.noise)
