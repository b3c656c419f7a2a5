"""`lightning-saferl evaluate`: episodes of a trained actor checkpoint, their metrics, and a picture of them.

    lightning-saferl evaluate --ckpt runs/<run>/actor/model.ckpt [--task PointRobot-v0] [--episodes 20]
        [--num_envs 20] [--seed 0] [--random_start] [--plot trajectories.png] [--frames episode.gif]

Episode ``i`` is reset with ``seed + i`` (`lightning_saferl.evaluation.EpisodeRunner`), so the same command gives
the same episodes and figures. ``--plot`` draws every episode's (x, y) path over PointRobot's hazards and goal, red
where the step was inside a hazard (cost > 0). ``--frames`` (simulator tasks, e.g. Bullet-Safety-Gym) renders the
first episode (seed ``--seed``) every ``--frame_every`` steps and its last step: an animated GIF, or a PNG grid of
8 of those frames.
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

__all__ = ["FrameRecorder", "PathRecorder", "evaluate_main", "plot_trajectories", "save_frames"]


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


class FrameRecorder(gym.Wrapper):
    """Appends to ``frames`` (step, rendered frame) pairs (``env.render_rgb()``) of the episode reset with ``seed``:
    after the reset (step 0), every ``every`` steps and at its last step. Other episodes run unrecorded."""

    def __init__(self, env: gym.Env, seed: int, every: int, frames: list):
        super().__init__(env)
        self.seed, self.every, self.frames = seed, every, frames
        self._recording, self._steps = False, 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._recording, self._steps = seed == self.seed and not self.frames, 0
        if self._recording:
            self.frames.append((0, self.env.render_rgb()))
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        if self._recording and (self._steps % self.every == 0 or terminated or truncated):
            self.frames.append((self._steps, self.env.render_rgb()))
        return obs, reward, terminated, truncated, info


def save_frames(frames: Sequence[tuple[int, np.ndarray]], path: str, title: str = "") -> None:
    """(step, frame) pairs -> ``.gif``: every frame, 10 per second, looping; ``.png``: 8 evenly spaced frames (first
    and last included) in a 2 x 4 grid, each titled with its step."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".gif"):
        from PIL import Image

        images = [Image.fromarray(frame) for _, frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
        return
    picks = np.unique(np.linspace(0, len(frames) - 1, 8).round().astype(int))
    fig = Figure(figsize=(12, 4.6))
    for ax, index in zip(fig.subplots(2, 4).flat, picks):
        step, frame = frames[index]
        ax.imshow(frame)
        ax.set_title(f"step {step}", fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)


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
    parser.add_argument("--frames", default=None,
                        help="GIF (or PNG grid) of the first episode's rendered frames (simulator tasks)")
    parser.add_argument("--frame_every", type=int, default=5, help="render every N steps (default %(default)s)")
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
    if args.frames is not None and args.task == point_robot.ENV_ID:
        raise InputError(f"evaluate --frames: {point_robot.ENV_ID} does not render; --plot draws its episodes")
    if args.frames is not None and not args.frames.lower().endswith((".gif", ".png")):
        raise InputError(f"evaluate --frames: give a .gif or .png path, got {args.frames}")
    if args.frame_every < 1:
        raise InputError(f"evaluate --frame_every: expected >= 1, got {args.frame_every}")
    if not os.path.isfile(args.ckpt):
        raise InputError(f"evaluate --ckpt: no such file: {args.ckpt}")
    policy = load_policy(args.ckpt)
    paths: dict[int, tuple[list, list]] = {}
    frames: list[tuple[int, np.ndarray]] = []

    def factory(task_id: str) -> gym.Env:
        env = make_env(task_id)
        if args.plot:
            return PathRecorder(env, paths)
        return FrameRecorder(env, args.seed, args.frame_every, frames) if args.frames else env

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
    if args.frames:
        save_frames(frames, args.frames, f"{args.task}, episode seed {args.seed}")
        metrics["frames"] = args.frames
    print(json.dumps(metrics))
    return metrics
