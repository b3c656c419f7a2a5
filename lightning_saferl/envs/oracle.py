"""Feasibility oracle for PointRobot: which states can be kept out of every hazard forever.

A state is *feasible* when some admissible control sequence keeps the robot outside all hazards at every
future step. The oracle tests a family of evasive manoeuvres with the batched dynamics of
:mod:`lightning_saferl.envs.point_robot` (same Euler step ``DT`` and velocity bound as the environment):
full braking ``u0 = -1`` while turning at a constant rate ``u1`` in ``TURN_RATES`` (full left, full right,
straight and intermediate rates), simulated until the robot is at rest (``v = 0``; a robot at rest stays
where it is, so it is safe forever). A state is called feasible when it is outside every hazard and at
least one manoeuvre never enters a hazard.

Approximation: the manoeuvre family is a subset of the admissible controls, so the oracle
*under-approximates* the feasible set: every state it calls feasible truly is feasible (for the discrete-time
dynamics, hazards checked at the step instants as the environment's cost is), while some truly feasible
states that need cleverer controls (accelerating or keeping speed to slip past a hazard, switching turn
direction, turn rates between the tested ones) are called infeasible. The arena bounds are not constraints
here: leaving the arena ends an episode but is not a safety violation.

All states and manoeuvres are simulated in one batched tensor computation (a loop over time steps only).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lightning_saferl.envs.point_robot import (
    DT, constraint_value, in_hazard, observe, out_of_bounds, reached_goal, sample_random_starts,
    state_from_observation, step_states,
)

TURN_RATES = (-1.0, -2.0 / 3.0, -1.0 / 3.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)


def is_feasible(states: torch.Tensor, turn_rates: Sequence[float] = TURN_RATES) -> torch.Tensor:
    """(B,) bool: True where a braking manoeuvre with one of `turn_rates` avoids every hazard (see module doc)."""
    return escape_margin(states, turn_rates) > 0


def escape_margin(states: torch.Tensor, turn_rates: Sequence[float] = TURN_RATES) -> torch.Tensor:
    """(B,) int64: how many of the braking manoeuvres (one per turn rate) avoid every hazard. A feasible state
    with a margin of 1 or 2 of the 7 default ones needs a nearly exact manoeuvre; 7 is far from any hazard."""
    if states.ndim != 2 or states.shape[-1] != 4:
        raise ValueError(f"PointRobot oracle: states must have shape (B, 4), got {tuple(states.shape)}")
    if len(turn_rates) == 0:
        raise ValueError("PointRobot oracle: turn_rates is empty")
    batch, num = states.shape[0], len(turn_rates)
    if batch == 0:
        return torch.zeros(0, dtype=torch.int64, device=states.device)
    current = states[:, None, :].expand(batch, num, 4).reshape(batch * num, 4)
    turn = states.new_tensor(turn_rates).repeat(batch)
    actions = torch.stack((torch.full_like(turn, -1.0), turn), dim=-1)
    safe = ~in_hazard(current)
    # v decreases by DT per step until it is clamped at 0; one spare step guards against rounding.
    num_steps = math.ceil(float(states[:, 2].max()) / DT) + 1
    for _ in range(num_steps):
        current = step_states(current, actions)
        safe &= ~in_hazard(current)
    return safe.view(batch, num).sum(dim=-1)


def grid_slice(
    v: float, theta: float, n: int = 101, extent: float = 3.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States on an n x n grid of positions in [-extent, extent]^2 at fixed speed `v` and heading `theta`.

    Returns ``xs (n,)``, ``ys (n,)`` and ``states (n * n, 4)`` in row-major order with y along rows:
    ``states.view(n, n, 4)[i, j] = (xs[j], ys[i], v, theta)``, so ``mask.view(n, n)`` is an image for
    ``imshow(origin="lower", extent=(-extent, extent, -extent, extent))``.
    """
    if n < 2:
        raise ValueError(f"grid_slice: n must be >= 2, got {n}")
    xs = torch.linspace(-extent, extent, n, dtype=dtype)
    ys = torch.linspace(-extent, extent, n, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    states = torch.stack(
        (grid_x.flatten(), grid_y.flatten(), torch.full((n * n,), v, dtype=dtype), torch.full((n * n,), theta, dtype=dtype)),
        dim=-1,
    )
    return xs, ys, states


def feasible_region_iou(pred_feasible: torch.Tensor, oracle_feasible: torch.Tensor) -> float:
    """Intersection over union of two feasible sets given as equal-shape bool masks (1.0 when both are empty)."""
    if pred_feasible.shape != oracle_feasible.shape:
        raise ValueError(
            f"feasible_region_iou: mask shapes differ: pred {tuple(pred_feasible.shape)} vs oracle {tuple(oracle_feasible.shape)}"
        )
    pred, ref = pred_feasible.bool(), oracle_feasible.bool()
    union = int((pred | ref).sum())
    return 1.0 if union == 0 else int((pred & ref).sum()) / union


def feasibility_scores(pred_feasible: torch.Tensor, oracle_feasible: torch.Tensor,
                       hazard: torch.Tensor) -> dict[str, float]:
    """How a predicted feasible set (bool mask) matches the oracle's on the same states.

    The *shadow* is the set of oracle-infeasible states outside every hazard (doomed: a crash can no longer be
    avoided); the trivial rule "feasible iff outside every hazard" (h(s) <= 0) misses all of it.

    * ``iou``: `feasible_region_iou` of the two feasible sets;
    * ``shadow_recall``: share of shadow states predicted infeasible (nan without shadow states);
    * ``false_infeasible_rate``: share of oracle-feasible states predicted infeasible (nan without any);
    * ``shadow_share``: share of all states in the shadow.
    """
    if not pred_feasible.shape == oracle_feasible.shape == hazard.shape:
        raise ValueError(f"feasibility_scores: mask shapes differ: pred {tuple(pred_feasible.shape)}, oracle "
                         f"{tuple(oracle_feasible.shape)}, hazard {tuple(hazard.shape)}")
    pred, oracle, hazard = pred_feasible.bool(), oracle_feasible.bool(), hazard.bool()
    shadow = ~oracle & ~hazard

    def share(mask: torch.Tensor, among: torch.Tensor) -> float:
        return float(mask[among].float().mean()) if among.any() else float("nan")

    return {"iou": feasible_region_iou(pred, oracle), "shadow_recall": share(~pred, shadow),
            "false_infeasible_rate": share(~pred, oracle), "shadow_share": float(shadow.float().mean())}


#: Evaluation starts are drawn from torch generators seeded with ``EVALUATION_STREAM + start_seed``; data
#: collection seeds its generator with the collection seed itself (small integers), so the streams differ.
#: (torch's CPU generator keeps only the low 32 bits of a seed: an offset of 2**32 would be the same stream.)
EVALUATION_STREAM = 2_000_000_000


def feasible_starts(count: int, start_seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(count, 4) random starts (the env's random-start box) that the oracle calls feasible, drawn from the
    evaluation stream ``EVALUATION_STREAM + start_seed`` (never used by data collection)."""
    generator = torch.Generator().manual_seed(EVALUATION_STREAM + start_seed)
    chosen = torch.zeros(0, 4, dtype=dtype)
    while len(chosen) < count:
        draws = sample_random_starts(4 * count, generator=generator, dtype=dtype)
        chosen = torch.cat((chosen, draws[is_feasible(draws)]))
    return chosen[:count]


def dataset_rows_among(states: torch.Tensor, observations: torch.Tensor) -> int:
    """How many of the (B, 4) `states` appear, as float32 observations, among the rows of `observations`
    (N, 11) (an exact row match): 0 for evaluation starts held out from a dataset."""
    def rows(x: torch.Tensor) -> list[bytes]:
        return [row.tobytes() for row in x.detach().to("cpu", torch.float32).contiguous().numpy()]

    seen = set(rows(observations))
    return sum(row in seen for row in rows(observe(states.double())))


def greedy_violations(q_h: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], starts: torch.Tensor,
                      proposals: int = 512, steps: int = 80, seed: int = 0) -> torch.Tensor:
    """(B,) bool: the starts from which a *critic-greedy* rollout enters a hazard within `steps` steps.

    Each step scores the oracle's braking actions (-1, u1) for u1 in `TURN_RATES` and `proposals` uniform actions
    in [-1, 1]^2 with ``q_h(observations (M, 11) float32, actions (M, 2) float32) -> (M,)`` and takes the lowest;
    a rollout ends where an episode would (goal reached, arena left). No actor is involved: this measures how a
    feasibility critic ranks *actions*. From an oracle-feasible start a perfect ranking never loses (the first
    action of a working braking manoeuvre leaves that manoeuvre working from the next state), so each violating
    start is a ranking error of the critic. The uniform draws come from a generator seeded with `seed`.
    """
    if starts.ndim != 2 or starts.shape[-1] != 4:
        raise ValueError(f"greedy_violations: starts must have shape (B, 4), got {tuple(starts.shape)}")
    if proposals < 0 or steps < 1:
        raise ValueError(f"greedy_violations: need proposals >= 0 and steps >= 1, got {proposals}, {steps}")
    generator = torch.Generator().manual_seed(seed)
    braking = torch.stack((torch.full((len(TURN_RATES),), -1.0), torch.tensor(TURN_RATES)), dim=-1)
    state = starts.clone()
    alive = torch.ones(len(starts), dtype=torch.bool)
    violated = in_hazard(state)
    for _ in range(steps):
        rows = alive.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        actions = torch.cat((braking.expand(len(rows), -1, -1),
                             torch.rand(len(rows), proposals, 2, generator=generator) * 2 - 1), dim=1)
        count = actions.shape[1]
        obs = observe(state[rows]).float().repeat_interleave(count, dim=0)
        scores = q_h(obs, actions.reshape(-1, 2)).view(len(rows), count)
        chosen = actions[torch.arange(len(rows)), scores.argmin(dim=1)]
        state[rows] = step_states(state[rows], chosen.to(state.dtype))
        violated[rows] |= in_hazard(state[rows])
        alive[rows] = ~(reached_goal(state[rows]) | out_of_bounds(state[rows]))
    return violated


def one_step_hazard_rule(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """h one step ahead, ``constraint_value(step(s, a))`` for (M, 11) observations and (M, 2) actions: the
    critic-free ranking beside a critic in `greedy_violations` (it uses the dynamics, no reachability)."""
    return constraint_value(step_states(state_from_observation(obs.double()), actions.double()))
