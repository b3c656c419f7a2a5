"""Where a PointRobot policy's cost comes from: episodes from starts inside a hazard, and the results table's random
starts split by where each start lies.

    python benchmarks/hazard_starts.py CKPT [CKPT ...] [--hazard_episodes 40] [--random_episodes 500]

For each checkpoint (any policy `load_policy` reads: FISOR, FISOR-Guard, BC-Safe, ...):
  hazard        mean episode cost, its std and the goal rate over `--hazard_episodes` starts at rest inside the
                hazards (uniform within 0.8 of a radius, random heading, hazards in turn; episode seeds 5000..)
  random        mean episode cost over the random starts 2000.. (the results table's stream), and the sum of
                the episodes' costs by the start's kind: inside a hazard, outside but oracle-infeasible (a hazard can
                no longer be avoided), feasible; with the number of violating episodes from feasible starts
Last line: one JSON object, checkpoint -> figures. The ablations page's "tie-break among the candidates" and
"failure violation" entries were measured this way.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from lightning_saferl.envs import point_robot as pr
from lightning_saferl.envs.oracle import is_feasible
from lightning_saferl.evaluation import EpisodeRunner
from lightning_saferl.policy import load_policy

HAZARD_SEED, RANDOM_SEED = 5000, 2000


def hazard_starts(count: int, seed: int = 12345) -> list[dict]:
    """`count` reset options at rest inside the hazards (taken in turn), uniform within 0.8 of a radius."""
    generator, starts = torch.Generator().manual_seed(seed), []
    for i in range(count):
        cx, cy = pr.HAZARD_CENTERS[i % len(pr.HAZARD_CENTERS)]
        radius = pr.HAZARD_RADIUS * 0.8 * math.sqrt(float(torch.rand(1, generator=generator)))
        angle, heading = (2 * math.pi * float(torch.rand(1, generator=generator)) for _ in range(2))
        starts.append({"state": [cx + radius * math.cos(angle), cy + radius * math.sin(angle), 0.0, heading]})
    return starts


def random_start_kinds(count: int) -> dict[str, np.ndarray]:
    """Masks over the random starts RANDOM_SEED.. : `inside` a hazard, `doomed` (outside, oracle-infeasible),
    `feasible`."""
    env = pr.PointRobotEnv()
    states = []
    for i in range(count):
        env.reset(seed=RANDOM_SEED + i, options={"random_start": True})
        states.append(env.state)
    states = torch.tensor(np.stack(states))
    inside, feasible = pr.in_hazard(states).numpy().astype(bool), is_feasible(states).numpy().astype(bool)
    return {"inside": inside, "doomed": ~inside & ~feasible, "feasible": feasible}


def figures(checkpoint: str, args, kinds: dict[str, np.ndarray]) -> dict:
    policy = load_policy(checkpoint)
    torch.manual_seed(0)
    hazard = EpisodeRunner(pr.ENV_ID, episodes=args.hazard_episodes, num_envs=args.hazard_episodes, seed=HAZARD_SEED,
                           reset_options=hazard_starts(args.hazard_episodes), progress=False).run_episodes(policy)
    torch.manual_seed(0)
    random = EpisodeRunner(pr.ENV_ID, episodes=args.random_episodes, num_envs=50, seed=RANDOM_SEED,
                           reset_options={"random_start": True}, progress=False).run_episodes(policy)
    cost = random["cost"]
    return {"hazard_cost_mean": float(hazard["cost"].mean()), "hazard_cost_std": float(hazard["cost"].std()),
            "hazard_goal_rate": float(hazard["success"].mean()), "random_cost_mean": float(cost.mean()),
            **{f"random_cost_sum_{kind}": float(cost[mask].sum()) for kind, mask in kinds.items()},
            **{f"random_starts_{kind}": int(mask.sum()) for kind, mask in kinds.items()},
            "random_violating_from_feasible": int((cost[kinds["feasible"]] > 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--hazard_episodes", type=int, default=40)
    parser.add_argument("--random_episodes", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = random_start_kinds(args.random_episodes)
    results = {}
    for checkpoint in args.checkpoints:
        results[checkpoint] = figures(checkpoint, args, kinds)
        print(checkpoint, {k: round(v, 3) for k, v in results[checkpoint].items()}, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
