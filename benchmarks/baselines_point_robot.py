"""The baselines (BCQ-Lag, CPQ, COptiDICE, CDT) on PointRobot at a tight and a loose cost limit, over seeds.

    python benchmarks/baselines_point_robot.py [--seeds 0 1 2] [--limits 3 10] [--steps N] [--quick]
                                               [--methods bcq_lag cpq coptidice cdt] [--run_dir DIR]

For each method, limit and seed: the recipe configs/baselines/<method>_point_robot.yaml with cost_limit (training
and evaluation) set to the limit, seed_everything = seed and, when given, `--steps` policy steps, run by the
pipeline and evaluated on held-out episodes (random starts, episode i seeded `--eval_seed` + i, default
2000..2099; the data were collected with generator seed 0). Prints per method and limit the mean episode cost and
return over seeds with their sample std and the worst seed's cost; the last line of stdout is one JSON object:
method -> {limit_tight, limit_loose, cost_tight, cost_loose, return_tight, return_loose, cost_std_tight,
cost_std_loose, cost_max_seed_tight, cost_max_seed_loose, seeds}, plus minutes. CDT's training does not depend on
the limit: it is trained once per seed (recipe at the tight limit) and evaluated at target costs tight, their mean
and loose (its tight / loose rows); ``cdt_target_costs`` and ``cdt_realised_costs`` (mean episode cost over seeds)
list the three. Re-running on the same run_dir reuses a finished run only when its recipe and arguments are
unchanged (a changed stage retrains).

Limits 3 and 10, from the data (1517 episodes, 71% cost-free, mean episode cost 4.6; the behaviour's discounted
cost-to-go averages 1.53 over dataset states). A limit L becomes the Q threshold 0.317 L (gamma 0.99, T 300): at 3
that is 0.95, below the behaviour's 1.53, so the constraint binds and must be met by avoiding hazards the data
enters (cost-free episodes show it can be); at 10 it is 3.17, twice the behaviour's, so reward-seeking costs what it
likes (BC on all data costs 5.1, a scripted reckless goal-seeker 5.5 over 500 random-start episodes, as measured
by benchmarks/drcorl_point_robot.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml

from lightning_saferl.data.tasks import get_task
from lightning_saferl.pipeline import build_parser, evaluate, print_table, run_pipeline, stage_conflicts
from lightning_saferl.policy import load_policy

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "baselines"
METHODS = ("bcq_lag", "cpq", "coptidice", "cdt")
KEY_FILE = "benchmark_key.txt"  # the recipe and arguments a run's summary was made with


def recipe(method: str, limit: float, steps: int | None) -> dict:
    """The method's PointRobot recipe with its cost limit (training and evaluation) and optionally its step count."""
    config = yaml.safe_load((RECIPES / f"{method}_point_robot.yaml").read_text())
    policy = config["stages"]["policy"]
    config["cost_limit"] = float(limit)  # the recipe's cost_limit_fields follow it (CDT: its target cost)
    config["evaluation"]["cost_limit"] = float(limit)
    if steps is not None:
        policy["trainer"]["max_steps"] = steps
    return config


def run(method: str, limit: float, seed: int, args) -> dict:
    """One pipeline run in its own directory. Its summary is reused only when the recipe and the arguments are
    those it was made with; otherwise the pipeline runs, retraining the stages whose config changed."""
    out = Path(args.run_dir) / method / f"limit{limit:g}" / f"seed{seed}"
    argv = pipeline_argv(method, limit, seed, args, out)
    key = json.dumps(argv) + (out / "recipe.yaml").read_text()
    summary_path = out / "run" / "summary.json"
    if (summary := reused(out, summary_path, key)) is not None:
        return summary
    config = build_parser().parse_args(argv)
    changed = stage_conflicts(config)
    if changed:
        print(f"[benchmark] {out}: retraining stages of a changed config: {changed}")
        config = build_parser().parse_args(argv + ["--restart", *changed])
    summary = run_pipeline(config)
    (out / KEY_FILE).write_text(key)
    return summary


def reused(out: Path, summary_path: Path, key: str) -> dict | None:
    """The summary at `summary_path` if the key recorded in `out` equals `key`, else None."""
    key_path = out / KEY_FILE
    if summary_path.exists() and key_path.exists() and key_path.read_text() == key:
        return json.loads(summary_path.read_text())
    return None


def pipeline_argv(method: str, limit: float, seed: int, args, out: Path) -> list[str]:
    """The pipeline's arguments for one run in `out` (its recipe written there)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe(method, limit, args.steps), sort_keys=False))
    return ["--config", str(out / "recipe.yaml"), "--run_dir", str(out / "run"), "--seed_everything", str(seed),
            "--evaluation.seed", str(args.eval_seed), "--evaluation.episodes", str(args.episodes),
            "--trainer", json.dumps({"enable_progress_bar": False})] + (["--smoke"] if args.quick else [])


def cdt_summaries(seed: int, targets: list[float], args) -> list[dict]:
    """CDT trained once (recipe at targets[0]), evaluated at every target cost by the pipeline's evaluation; an
    evaluation is reused only for the same training recipe and arguments."""
    run("cdt", targets[0], seed, args)
    trained = Path(args.run_dir) / "cdt" / f"limit{targets[0]:g}" / f"seed{seed}"
    summaries = []
    for target in targets:
        out = Path(args.run_dir) / "cdt" / f"target{target:g}" / f"seed{seed}"
        argv = pipeline_argv("cdt", target, seed, args, out)
        key = (trained / KEY_FILE).read_text() + json.dumps(argv) + (out / "recipe.yaml").read_text()
        summary = reused(out, out / "summary.json", key)
        if summary is None:
            cfg = build_parser().parse_args(argv)
            policy = load_policy(str(trained / "run" / "policy" / "model.ckpt"))
            policy.target_cost = target
            summary = evaluate(policy, get_task(cfg.data.task), cfg)
            # config.yaml beside summary.json: `lightning-saferl table` counts the evaluation as a run at this limit
            shutil.copy(out / "recipe.yaml", out / "config.yaml")
            (out / "summary.json").write_text(json.dumps(summary))
            (out / KEY_FILE).write_text(key)
        summaries.append(summary)
    return summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", default="benchmarks/out/baselines_point_robot")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limits", type=float, nargs=2, default=[3.0, 10.0], metavar=("TIGHT", "LOOSE"),
                        help="cost limits (default 3 and 10: see the module docstring)")
    parser.add_argument("--steps", type=int, default=None, help="policy steps (default: the recipe's)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--eval_seed", type=int, default=2000, help="held-out episodes eval_seed + i")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: the machine's default)")
    parser.add_argument("--quick", action="store_true", help="pipeline --smoke (5 steps, 2 episodes): a check only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    tight, loose = sorted(args.limits)
    results: dict = {}
    for method in args.methods:
        row: dict = {"limit_tight": tight, "limit_loose": loose, "seeds": args.seeds}
        if method == "cdt":
            targets = [tight, (tight + loose) / 2, loose]
            per_target = list(zip(*[cdt_summaries(seed, targets, args) for seed in args.seeds]))
            results["cdt_target_costs"] = targets
            results["cdt_realised_costs"] = [statistics.mean(s["cost_mean"] for s in seeds) for seeds in per_target]
            by_limit = {"tight": per_target[0], "loose": per_target[-1]}
        else:
            by_limit = {name: [run(method, limit, seed, args) for seed in args.seeds]
                        for name, limit in (("tight", tight), ("loose", loose))}
        for name, summaries in by_limit.items():
            costs = [s["cost_mean"] for s in summaries]
            (row[f"cost_{name}"], row[f"cost_std_{name}"]) = mean_std(costs)
            (row[f"return_{name}"], row[f"return_std_{name}"]) = mean_std([s["return_mean"] for s in summaries])
            row[f"cost_max_seed_{name}"] = max(costs)
        results[method] = row
        print_table({k: v for k, v in row.items() if k != "seeds"}, f"{method} on PointRobot, seeds {args.seeds}")
    results["minutes"] = (time.time() - started) / 60
    print(json.dumps(results))


if __name__ == "__main__":
    main()
