"""`lightning-saferl table DIR... [--out OUT]`: the results table of every finished run below the directories.

A finished run is any directory holding `summary.json` and `config.yaml` (a sweep's cells, `pipeline` runs,
benchmark run directories), so runs of several sweeps (e.g. FISOR and BC-Safe trained separately) make one table.
Each run contributes one record per cost limit it was scored at (`cost_limits` in its summary, else `cost_limit`):

    reward  = normalised return (R - R_min) / (R_max - R_min); for a task without DSRL reference scores (PointRobot)
              the raw mean episode return, marked "raw" (no reference scores are made up)
    cost    = normalised cost (C + e) / (L + e), e = 1 iff L = 0 (`lightning_saferl.evaluation.limit_scores`)

Rows: one per (algorithm, task, cost limit) with mean +- std over seeds (population std, ddof 0) and the number of
seeds; safe = mean normalised cost <= 1. A seed found twice (e.g. the same sweep copied) counts once (the first
path in sorted order). Family rows: the mean over a family's tasks of the rows' means, per limit and over all limits.
Written to OUT (default the first DIR): table.md, table.csv, table.json and table.png (reward against cost, one
panel per task family, with the normalised-cost = 1 line).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lightning_saferl.errors import InputError, MissingFileError

FAMILIES = {"bullet": "Bullet-Safety-Gym", "safety_gymnasium": "Safety-Gymnasium", "metadrive": "MetaDrive",
            "point_robot": "PointRobot"}
COLUMNS = ("algorithm", "task", "family", "cost_limit", "reward_mean", "reward_std", "reward_kind", "cost_mean",
           "cost_std", "n", "safe")
NOTE = ("reward: DSRL normalised return, or the raw episode return where a task has no DSRL reference scores "
        "(marked raw: PointRobot); cost: normalised cost (C + e) / (L + e), e = 1 iff L = 0; safe: mean normalised "
        "cost <= 1; mean +- std over seeds (population std)")


def find_runs(dirs: Sequence[str]) -> list[Path]:
    """Directories below `dirs` (or equal to one) holding summary.json and config.yaml, sorted."""
    runs = set()
    for root in dirs:
        if not Path(root).is_dir():
            raise MissingFileError(f"{root} is not a directory")
        runs.update(p.parent for p in Path(root).rglob("summary.json") if (p.parent / "config.yaml").exists())
    return sorted(runs)


def run_records(run: Path) -> list[dict[str, Any]]:
    """One record per cost limit of a finished run (module docstring)."""
    from lightning_saferl.data.tasks import get_task
    from lightning_saferl.evaluation import limit_key, limit_scores

    summary = json.loads((run / "summary.json").read_text())
    try:
        spec = get_task(summary["task"])
        limits = summary.get("cost_limits") or [summary["cost_limit"]]
        raw = "normalized_return" not in summary
        reward = summary["return_mean"] if raw else summary["normalized_return"]
        scores = limit_scores(summary["cost_mean"], spec, limits)
        return [{"algorithm": summary["algorithm"], "task": spec.task_id,
                 "family": FAMILIES.get(spec.simulator, spec.simulator), "cost_limit": float(limit),
                 "seed": summary["seed"], "reward": float(reward), "reward_kind": "raw" if raw else "normalized",
                 "cost": scores[f"normalized_cost@{limit_key(limit)}"], "run": str(run)} for limit in limits]
    except KeyError as err:
        raise InputError(f"{run / 'summary.json'}: not a pipeline summary (missing {err})") from None


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def aggregate(records: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(rows per (algorithm, task, cost limit), family rows per (algorithm, family, cost limit or 'all'))."""
    groups: dict[tuple, dict[Any, dict]] = {}
    for rec in records:
        seeds = groups.setdefault((rec["algorithm"], rec["task"], rec["cost_limit"]), {})
        seeds.setdefault(rec["seed"], rec)  # a seed found twice counts once
    rows = []
    for (algorithm, task, limit), seeds in sorted(groups.items()):
        recs = list(seeds.values())
        reward, cost = _stats([r["reward"] for r in recs]), _stats([r["cost"] for r in recs])
        rows.append({"algorithm": algorithm, "task": task, "family": recs[0]["family"], "cost_limit": limit,
                     "reward_mean": reward[0], "reward_std": reward[1], "reward_kind": recs[0]["reward_kind"],
                     "cost_mean": cost[0], "cost_std": cost[1], "n": len(recs), "safe": cost[0] <= 1.0})
    families: dict[tuple, list[dict]] = {}
    for row in rows:
        for limit in (row["cost_limit"], "all"):
            families.setdefault((row["algorithm"], row["family"], limit), []).append(row)
    family_rows = []
    def order(item):  # the limits in increasing order, then "all"
        algorithm, family, limit = item[0]
        return algorithm, family, float("inf") if limit == "all" else limit

    for (algorithm, family, limit), members in sorted(families.items(), key=order):
        reward, cost = _stats([r["reward_mean"] for r in members]), _stats([r["cost_mean"] for r in members])
        tasks = len({r["task"] for r in members})
        family_rows.append({"algorithm": algorithm, "task": f"{family} ({tasks} task{'s' if tasks != 1 else ''})",
                            "family": family, "cost_limit": limit, "reward_mean": reward[0], "reward_std": reward[1],
                            "reward_kind": members[0]["reward_kind"], "cost_mean": cost[0], "cost_std": cost[1],
                            "n": len(members), "safe": cost[0] <= 1.0})
    return rows, family_rows


def _markdown(rows: list[dict], family_rows: list[dict], runs: int) -> str:
    def line(cells):
        return "| " + " | ".join(cells) + " |"

    def body(items, first):
        out = [line([first, "algorithm", "cost limit", "reward", "cost", "n", "safe"]), line(["---"] * 7)]
        for r in items:
            limit = r["cost_limit"] if r["cost_limit"] == "all" else f"{r['cost_limit']:g}"
            raw = " (raw)" if r["reward_kind"] == "raw" else ""
            out.append(line([r["task"], r["algorithm"], limit, f"{r['reward_mean']:.3f} ± {r['reward_std']:.3f}{raw}",
                             f"{r['cost_mean']:.3f} ± {r['cost_std']:.3f}", str(r["n"]),
                             "yes" if r["safe"] else "**no**"]))
        return out

    return "\n".join([f"Results of {runs} finished runs. {NOTE}. n: seeds (family rows: task x limit rows).", "",
                      *body(rows, "task"), "", "Averages per task family (mean over the tasks' rows):", "",
                      *body(family_rows, "family"), ""])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in rows})
    algorithms = sorted({r["algorithm"] for r in rows})
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(algorithms)}
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        members = [r for r in rows if r["family"] == family]
        for algorithm in algorithms:
            mine = [r for r in members if r["algorithm"] == algorithm]
            if mine:
                ax.errorbar([r["cost_mean"] for r in mine], [r["reward_mean"] for r in mine],
                            xerr=[r["cost_std"] for r in mine], yerr=[r["reward_std"] for r in mine], fmt="o",
                            color=colors[algorithm], label=algorithm, capsize=2)
                for r in mine:  # each point is labelled with its cost limit
                    ax.annotate(f"{r['cost_limit']:g}", (r["cost_mean"], r["reward_mean"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points", color=colors[algorithm])
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_title(family)
        ax.set_xlabel("normalised cost (safe left of 1); labels: cost limit")
        ax.set_ylabel("raw episode return" if members[0]["reward_kind"] == "raw" else "normalised reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(dirs: Sequence[str], out: Optional[str] = None) -> dict[str, Any]:
    """Build the table of every finished run below `dirs` and write it to `out` (default dirs[0])."""
    runs = find_runs(dirs)
    if not runs:
        raise MissingFileError(f"no finished run (summary.json + config.yaml) below "
                                f"{', '.join(map(str, dirs))}")
    rows, family_rows = aggregate([rec for run in runs for rec in run_records(run)])
    out_dir = Path(out or dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {"note": NOTE, "rows": rows, "families": family_rows, "runs": [str(r) for r in runs]}
    (out_dir / "table.json").write_text(json.dumps(table, indent=2))
    (out_dir / "table.md").write_text(_markdown(rows, family_rows, len(runs)))
    with open(out_dir / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kind", *COLUMNS])
        writer.writeheader()
        for kind, items in (("task", rows), ("family", family_rows)):
            writer.writerows({"kind": kind, **item} for item in items)
    _plot(rows, out_dir / "table.png")
    return table


def table_main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="lightning-saferl table", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="directories searched for finished runs")
    parser.add_argument("--out", default=None, help="where the table files go (default: the first directory)")
    args = parser.parse_args(argv)
    table = write_table(args.dirs, args.out)
    print((Path(args.out or args.dirs[0]) / "table.md").read_text())
    return table
