"""`lightning-saferl evaluate`: episodes of a trained actor checkpoint, their metrics, and a picture of them.

    lightning-saferl evaluate --ckpt runs/<run>/actor/model.ckpt [--task PointRobot-v0] [--episodes 20]
        [--num_envs 20] [--seed 0] [--random_start] [--plot trajectories.png]

Episode ``i`` is reset with ``seed + i`` (`lightning_saferl.evaluation.EpisodeRunner`), so the same command gives
the same episodes and figures. ``--plot`` draws every episode's (x, y) path over PointRobot's hazards and goal, red
where the step was inside a hazard (cost > 0). Other tasks have no plot: their environments do not render.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from lightning_saferl.envs import point_robot
from lightning_saferl.errors import InputError

__all__ = ["PathRecorder", "plot_trajectories", "evaluate_main"]


class PathRecorder(gym.Wrapper):
    """Keeps the (x, y) positions and step costs of every episode it runs, keyed by the reset seed (the
    runner's episode seed), in ``paths[seed] = (positions (T + 1, 2), costs (T,))``. The observation's first two
    entries must be the position (PointRobot's are)."""

    def __init__(self, env: gym.Env, paths: dict[int, tuple[list, list]]):
        super().__init__(env)
        self.paths = paths
        self._current: Optional[tuple[list, list]] = None

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._current = ([np.asarray(obs[:2], dtype=np.float64)], [])
        self.paths[seed] = self._current
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._current[0].append(np.asarray(obs[:2], dtype=np.float64))
        self._current[1].append(float(info["cost"]))
        return obs, reward, terminated, truncated, info


def plot_trajectories(paths: Sequence[tuple[np.ndarray, np.ndarray]], path: Optional[str] = None,
                      title: str = "") -> Figure:
    """One line per episode (positions (T + 1, 2), step costs (T,)) over the PointRobot arena (dashed: its
    bounds): hazards (orange), goal (gold), start points (dots), steps with cost > 0 in red; each episode's line has
    gid "path". Saves a PNG at ``path`` when given."""
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    bound = point_robot.BOUND
    ax.set_xlim(-bound - 0.2, bound + 0.2)
    ax.set_ylim(-bound - 0.2, bound + 0.2)
    ax.add_patch(Rectangle((-bound, -bound), 2 * bound, 2 * bound, fill=False, edgecolor="0.5", linestyle="--"))
    for centre in point_robot.HAZARD_CENTERS:
        ax.add_patch(Circle(centre, point_robot.HAZARD_RADIUS, color="orange", alpha=0.35))
    ax.add_patch(Circle(point_robot.GOAL, point_robot.GOAL_RADIUS, color="gold", alpha=0.9))
    for positions, costs in paths:
        positions, costs = np.asarray(positions), np.asarray(costs)
        ax.plot(positions[:, 0], positions[:, 1], color="tab:blue", linewidth=0.9, alpha=0.7, gid="path")
        ax.plot(positions[:1, 0], positions[:1, 1], "o", color="tab:blue", markersize=3)
        unsafe = np.flatnonzero(costs > 0) + 1  # cost of step t belongs to the state it reached
        ax.plot(positions[unsafe, 0], positions[unsafe, 1], ".", color="red", markersize=3)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=9)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-saferl evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a trained actor's checkpoint (e.g. <run>/actor/model.ckpt)")
    parser.add_argument("--task", default=point_robot.ENV_ID, help="task id (default %(default)s)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--num_envs", type=int, default=20, help="episodes stepped together")
    parser.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i")
    parser.add_argument("--random_start", action="store_true", help="random starts (default: the standard start)")
    parser.add_argument("--plot", default=None, help="PNG of the episodes' paths (PointRobot only)")
    return parser


def evaluate_main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Runs the command (module docstring), prints the metrics as one JSON line and returns them."""
    from lightning_saferl.envs import make_env
    from lightning_saferl.evaluation import EpisodeRunner
    from lightning_saferl.policy import load_policy

    args = _parser().parse_args(argv)
    if args.plot is not None and args.task != point_robot.ENV_ID:
        raise InputError(f"evaluate --plot: only {point_robot.ENV_ID} has a plot of its episodes, got --task "
                         f"{args.task}")
    if not os.path.isfile(args.ckpt):
        raise InputError(f"evaluate --ckpt: no such file: {args.ckpt}")
    policy = load_policy(args.ckpt)
    paths: dict[int, tuple[list, list]] = {}
    factory = (lambda task_id: PathRecorder(make_env(task_id), paths)) if args.plot else None
    runner = EpisodeRunner(args.task, episodes=args.episodes, num_envs=min(args.num_envs, args.episodes),
                           seed=args.seed, reset_options={"random_start": True} if args.random_start else None,
                           env_factory=factory)
    try:
        metrics = runner.run(policy)
    finally:
        runner.close()
    if args.plot:
        seeds = range(args.seed, args.seed + args.episodes)
        title = (f"{os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))}: {args.episodes} episodes, "
                 f"cost {metrics['cost_mean']:.2f}, goal {metrics['success_rate']:.2f}")
        plot_trajectories([paths[s] for s in seeds], args.plot, title)
        metrics["plot"] = args.plot
    print(json.dumps(metrics))
    return metrics
