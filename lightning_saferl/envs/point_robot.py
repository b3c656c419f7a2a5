"""PointRobot-v0: a unicycle robot that must reach a goal while avoiding two circular hazards.

The task follows the point-robot setting of FISOR's feasible-region study. State ``s = (x, y, v, theta)``,
action ``u = (u0, u1)`` in ``[-1, 1]^2`` (clipped), explicit Euler step with ``dt = DT``::

    x'     = x + dt * v * cos(theta)
    y'     = y + dt * v * sin(theta)
    v'     = clip(v + dt * u0, 0, V_MAX)
    theta' = wrap(theta + dt * u1)          (wrapped to [-pi, pi))

Velocity bound (a choice of this library): ``v`` is kept in ``[0, V_MAX]`` with ``V_MAX = 3``, so full
braking brings the robot to rest (no reversing) and speeds stay in a sane range. The feasibility oracle
uses the same dynamics.

Every physical quantity is a batched torch function of states ``(B, 4)`` (any float dtype and device);
the gymnasium environment calls them with ``B = 1``, and dataset collection calls them with many states.

* cost ``c(s') = 1`` if ``s'`` is inside a hazard (distance to a centre < ``HAZARD_RADIUS``), else 0;
* constraint value ``h(s) = HAZARD_RADIUS - min_k ||p - c_k||`` (> 0 exactly inside a hazard);
* reward ``r = d_goal(s) - d_goal(s') + GOAL_BONUS * [d_goal(s') < GOAL_RADIUS]``;
* termination when the goal is reached or ``|x| > BOUND`` or ``|y| > BOUND``; truncation after
  ``MAX_EPISODE_STEPS`` (by gymnasium's TimeLimit wrapper set up at registration).

Observation (11): ``x, y, v, cos(theta), sin(theta)`` then, per hazard ``k``, the distance ``d_k`` to its
centre and ``cos(b_k), sin(b_k)`` with bearing ``b_k = atan2(dy_k, dx_k) - theta`` in the robot frame,
``(dx_k, dy_k) = c_k - p``.
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium
import numpy as np
import torch

ENV_ID = "PointRobot-v0"
HAZARD_CENTERS = ((0.4, -1.2), (-0.4, 1.2))
HAZARD_RADIUS = 0.8
GOAL = (2.2, 2.2)
GOAL_RADIUS = 0.3
GOAL_BONUS = 1.0
DT = 0.05
V_MAX = 3.0
BOUND = 3.0
MAX_EPISODE_STEPS = 300
STANDARD_START = (-1.8, 0.0, 2.0, math.pi / 4)
RANDOM_START_LOW = (-BOUND, -BOUND, 0.5, math.pi / 4)
RANDOM_START_HIGH = (BOUND, BOUND, 2.0, 3 * math.pi / 4)
OBS_DIM = 5 + 3 * len(HAZARD_CENTERS)
ACT_DIM = 2


def _check_states(states: torch.Tensor) -> None:
    if states.ndim != 2 or states.shape[-1] != 4:
        raise ValueError(f"PointRobot states must have shape (B, 4) = (x, y, v, theta), got {tuple(states.shape)}")


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Wrap angles to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def step_states(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """One Euler step of the unicycle dynamics for (B, 4) states and (B, 2) actions (clipped to [-1, 1])."""
    _check_states(states)
    if actions.shape != (states.shape[0], ACT_DIM):
        raise ValueError(f"PointRobot actions must have shape {(states.shape[0], ACT_DIM)}, got {tuple(actions.shape)}")
    x, y, v, theta = states.unbind(-1)
    u = actions.to(states.dtype).clamp(-1.0, 1.0)
    return torch.stack(
        (
            x + DT * v * torch.cos(theta),
            y + DT * v * torch.sin(theta),
            (v + DT * u[:, 0]).clamp(0.0, V_MAX),
            wrap_angle(theta + DT * u[:, 1]),
        ),
        dim=-1,
    )


def hazard_offsets(states: torch.Tensor) -> torch.Tensor:
    """(B, H, 2) vectors from the robot position to each hazard centre."""
    _check_states(states)
    return states.new_tensor(HAZARD_CENTERS)[None] - states[:, None, :2]


def observe(states: torch.Tensor) -> torch.Tensor:
    """(B, 11) observations (layout in the module docstring)."""
    offsets = hazard_offsets(states)
    dist = offsets.norm(dim=-1)
    bearing = torch.atan2(offsets[..., 1], offsets[..., 0]) - states[:, 3:4]
    per_hazard = torch.stack((dist, torch.cos(bearing), torch.sin(bearing)), dim=-1).flatten(1)
    theta = states[:, 3]
    return torch.cat((states[:, :3], torch.cos(theta)[:, None], torch.sin(theta)[:, None], per_hazard), dim=-1)


def state_from_observation(obs: torch.Tensor) -> torch.Tensor:
    """(B, 4) states (x, y, v, theta) of (B, 11) observations: the inverse of `observe`."""
    if obs.ndim != 2 or obs.shape[-1] != OBS_DIM:
        raise ValueError(f"PointRobot observations must have shape (B, {OBS_DIM}), got {tuple(obs.shape)}")
    return torch.cat((obs[:, :3], torch.atan2(obs[:, 4], obs[:, 3])[:, None]), dim=-1)


def constraint_value(states: torch.Tensor) -> torch.Tensor:
    """(B,) ``HAZARD_RADIUS - distance to the nearest hazard centre`` (> 0 inside a hazard)."""
    return HAZARD_RADIUS - hazard_offsets(states).norm(dim=-1).min(dim=-1).values


def in_hazard(states: torch.Tensor) -> torch.Tensor:
    """(B,) bool: inside a hazard, i.e. ``constraint_value > 0``."""
    return constraint_value(states) > 0


def goal_distance(states: torch.Tensor) -> torch.Tensor:
    """(B,) Euclidean distance from the robot to the goal centre."""
    _check_states(states)
    return (states[:, :2] - states.new_tensor(GOAL)).norm(dim=-1)


def reached_goal(states: torch.Tensor) -> torch.Tensor:
    """(B,) bool: within ``GOAL_RADIUS`` of the goal centre."""
    return goal_distance(states) < GOAL_RADIUS


def out_of_bounds(states: torch.Tensor) -> torch.Tensor:
    """(B,) bool: ``|x| > BOUND`` or ``|y| > BOUND``."""
    _check_states(states)
    return (states[:, :2].abs() > BOUND).any(dim=-1)


def compute_reward(states: torch.Tensor, next_states: torch.Tensor) -> torch.Tensor:
    """(B,) reward: decrease of the goal distance, plus ``GOAL_BONUS`` when ``next_states`` reach the goal."""
    return goal_distance(states) - goal_distance(next_states) + GOAL_BONUS * reached_goal(next_states).to(states.dtype)


def sample_random_starts(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, 4) start states uniform in the box [RANDOM_START_LOW, RANDOM_START_HIGH] (torch generator)."""
    low = torch.tensor(RANDOM_START_LOW, dtype=dtype)
    high = torch.tensor(RANDOM_START_HIGH, dtype=dtype)
    return low + (high - low) * torch.rand(n, 4, generator=generator, dtype=dtype)


def scripted_controller(states: torch.Tensor, avoid: torch.Tensor | bool = True, margin: float = 0.3) -> torch.Tensor:
    """Goal-seeking controller, (B, 4) states -> (B, 2) actions in [-1, 1].

    Heading: toward the goal; where ``avoid`` holds and a hazard inflated by ``margin`` blocks that line, the
    tangent to the inflated circle nearer the current heading instead (each hazard in turn, nearest first).
    Speed: cruises at up to 1.5, slower when the heading error is large (turning radius = v / |u1| >= v) or
    the goal is near; full braking when the current heading ray leaves the arena, or (where ``avoid`` holds)
    enters a hazard, within the braking distance ``v^2 / 2 + v * DT`` plus a margin of 0.15 (at rest the
    robot can still turn). ``u1 = clip(3 * heading error)``, ``u0 = clip(2 * (v_target - v))``.
    """
    _check_states(states)
    avoid = torch.as_tensor(avoid, device=states.device).expand(states.shape[0])
    x, y, v, theta = states.unbind(-1)
    to_goal = states.new_tensor(GOAL) - states[:, :2]
    goal_dist = to_goal.norm(dim=-1)
    heading = torch.atan2(to_goal[:, 1], to_goal[:, 0])

    offsets = hazard_offsets(states)
    dist = offsets.norm(dim=-1)  # (B, H)
    angle = torch.atan2(offsets[..., 1], offsets[..., 0])
    safe_radius = HAZARD_RADIUS + margin
    for k in dist.argsort(dim=-1).unbind(-1):  # nearest hazard first
        d_k = dist.gather(1, k[:, None])[:, 0]
        phi = angle.gather(1, k[:, None])[:, 0]
        rel = wrap_angle(phi - heading)
        ahead = d_k * torch.cos(rel)
        blocked = (ahead > 0) & (d_k * torch.sin(rel).abs() < safe_radius) & (ahead < goal_dist + safe_radius)
        blocked |= d_k < safe_radius
        half_width = torch.asin((safe_radius / d_k).clamp(max=1.0)) + 2.0 * (safe_radius - d_k).clamp(min=0.0)
        left, right = phi + half_width, phi - half_width
        detour = torch.where(wrap_angle(left - theta).abs() < wrap_angle(right - theta).abs(), left, right)
        heading = torch.where(avoid & blocked, detour, heading)

    error = wrap_angle(heading - theta)
    v_target = torch.minimum(1.5 * torch.cos(error).clamp(min=0.1), 0.3 + 0.8 * goal_dist)

    stopping = v**2 / 2 + v * DT + 0.15
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    tiny = torch.finfo(states.dtype).tiny
    exit_x = torch.where(cos_t > 0, (BOUND - x) / cos_t.clamp(min=tiny), (-BOUND - x) / cos_t.clamp(max=-tiny))
    exit_y = torch.where(sin_t > 0, (BOUND - y) / sin_t.clamp(min=tiny), (-BOUND - y) / sin_t.clamp(max=-tiny))
    danger = torch.minimum(exit_x, exit_y) < stopping
    rel_now = wrap_angle(angle - theta[:, None])
    ahead_now = dist * torch.cos(rel_now)
    perp_sq = (dist * torch.sin(rel_now)) ** 2
    entry = ahead_now - ((HAZARD_RADIUS + 0.1) ** 2 - perp_sq).clamp(min=0.0).sqrt()
    hits = (ahead_now > 0) & (perp_sq < (HAZARD_RADIUS + 0.1) ** 2)
    danger |= (hits & (entry < stopping[:, None])).any(dim=-1) & avoid
    v_target = torch.where(danger, torch.zeros_like(v_target), v_target)
    return torch.stack(((2.0 * (v_target - v)).clamp(-1, 1), (3.0 * error).clamp(-1, 1)), dim=-1)


class PointRobotEnv(gymnasium.Env):
    """Gymnasium environment over the batched dynamics above (B = 1, float64 state).

    ``reset(seed=..., options={"state": (x, y, v, theta)})`` starts at the given state,
    ``options={"random_start": True}`` draws one from the random-start box with ``self.np_random``,
    otherwise the start is ``STANDARD_START``. ``info`` holds ``cost`` (0/1) and ``constraint_value``
    of the current state (the post-step state in ``step``).
    """

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(ACT_DIM,), dtype=np.float32)
        self._state = torch.tensor([STANDARD_START], dtype=torch.float64)

    @property
    def state(self) -> np.ndarray:
        """Current (x, y, v, theta) as a float64 array (a copy)."""
        return self._state[0].numpy().copy()

    def _obs_info(self) -> tuple[np.ndarray, dict[str, Any]]:
        cv = float(constraint_value(self._state)[0])
        info = {"cost": float(cv > 0), "constraint_value": cv}
        return observe(self._state)[0].numpy().astype(np.float32), info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "state" in options and options.get("random_start", False):
            raise ValueError("PointRobotEnv.reset: give either options['state'] or options['random_start'], not both")
        if "state" in options:
            state = np.asarray(options["state"], dtype=np.float64)
            if state.shape != (4,) or not np.isfinite(state).all() or not 0.0 <= state[2] <= V_MAX:
                raise ValueError(
                    f"PointRobotEnv.reset: options['state'] must be 4 finite numbers (x, y, v, theta) with "
                    f"0 <= v <= {V_MAX}, got {options['state']!r}"
                )
        elif options.get("random_start", False):
            state = self.np_random.uniform(RANDOM_START_LOW, RANDOM_START_HIGH)
        else:
            state = np.asarray(STANDARD_START, dtype=np.float64)
        self._state = torch.as_tensor(state, dtype=torch.float64).reshape(1, 4)
        return self._obs_info()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACT_DIM,) or not np.isfinite(action).all():
            raise ValueError(f"PointRobotEnv.step: action must be {ACT_DIM} finite numbers, got {action!r}")
        previous = self._state
        self._state = step_states(previous, torch.from_numpy(action)[None])
        reward = float(compute_reward(previous, self._state)[0])
        goal = bool(reached_goal(self._state)[0])
        terminated = goal or bool(out_of_bounds(self._state)[0])
        obs, info = self._obs_info()
        info["is_success"] = goal
        return obs, reward, terminated, False, info
