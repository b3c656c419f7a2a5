"""What a `lightning-saferl sweep` costs per cell beyond the pipeline's own time.

    python benchmarks/sweep_overhead.py [--seeds 0 1 2] [--cost_limits 0 5] [--steps 300] [--episodes 10]
                                        [--out DIR]

Runs the BC-Safe PointRobot recipe (configs/baselines/bc_safe_point_robot.yaml, with --steps gradient steps, a
20k-transition dataset and --episodes evaluation episodes) as a sweep of seeds x cost limits on a local Ray with
one CPU, so the cells run one after another and every second of the sweep is either some cell's pipeline or
overhead. The dataset is generated before timing (it is cached for every run).

Figures (seconds):
    pipeline          each cell's own time: `minutes` in its summary.json (run_pipeline, from planning to summary)
    in_worker         the cell's time in its Ray worker (`Cell.seconds`) minus its pipeline time: command-line
                      parsing, log redirection, reading the summary back
    marginal          per cell after the first: time between two results arriving at the sweep minus the
                      pipeline time (Ray task dispatch + in_worker); the median is the per-cell overhead
    ray_start         ray.init once per sweep; planning: the cells' config resolution and checks on the driver
    first_cell_extra  the first cell's arrival minus its pipeline time (worker start-up and imports, once per worker)
    table             table.md/csv/json/png at the end
    amortized         (sweep wall time - sum of pipeline times) / cells, everything included
and the ratio sweep wall time / sum of pipeline times. The last line of stdout is one JSON object.
Timings on a shared machine are noisy; the 1-minute load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning_saferl.sweep as sweep
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.table import write_table

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "baselines" / "bc_safe_point_robot.yaml"
TRANSITIONS = 20_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cost_limits", type=float, nargs="+", default=[0.0, 5.0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--out", default=None, help="sweep directory (default: a fresh temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep_overhead_"))
    OfflineDataModule(task="PointRobot-v0", num_transitions=TRANSITIONS).prepare_data()  # cached, not timed
    overrides = ["--data.num_transitions", str(TRANSITIONS), "--stages.policy.trainer.max_steps", str(args.steps),
                 "--evaluation.episodes", str(args.episodes), "--evaluation.num_envs", str(args.episodes),
                 "--trainer.enable_progress_bar", "false"]

    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 ** 2)
    ray_start = time.time() - started
    try:
        t = time.time()
        cells = sweep.plan(str(RECIPE), out, args.seeds, None, args.cost_limits, (), overrides)
        for cell in cells:
            sweep.check(cell, out)
        planning = time.time() - t
        if any(c.status != "pending" for c in cells):
            raise SystemExit(f"{out} already holds cells: pass a fresh --out")
        dispatched = time.time()
        sweep.run_cells(cells, out, cpus_per_run=1)
        t = time.time()
        write_table([str(out)], str(out))
        table = time.time() - t
    finally:
        ray.shutdown()
    wall = time.time() - started
    failed = [c for c in cells if c.status != "finished"]
    if failed:
        raise SystemExit(f"{len(failed)} cells failed, e.g. {failed[0].name}: {failed[0].message}")

    cells.sort(key=lambda c: c.finished_at)
    pipeline = [c.summary["minutes"] * 60 for c in cells]
    in_worker = [c.seconds - p for c, p in zip(cells, pipeline)]
    arrivals = [dispatched] + [c.finished_at for c in cells]
    marginal = [arrivals[i + 1] - arrivals[i] - pipeline[i] for i in range(1, len(cells))]
    print(f"{'cell':<48} {'pipeline':>9} {'in_worker':>9} {'arrival gap - pipeline':>22}")
    for i, cell in enumerate(cells):
        print(f"{cell.name:<48} {pipeline[i]:9.2f} {in_worker[i]:9.2f} "
              f"{arrivals[i + 1] - arrivals[i] - pipeline[i]:22.2f}")
    figures = {
        "cells": len(cells), "pipeline_median_s": statistics.median(pipeline),
        "in_worker_median_s": statistics.median(in_worker),
        "marginal_overhead_median_s": statistics.median(marginal) if marginal else None,
        "marginal_overhead_max_s": max(marginal) if marginal else None,
        "ray_start_s": ray_start, "planning_s": planning, "first_cell_extra_s": arrivals[1] - dispatched - pipeline[0],
        "table_s": table, "sweep_wall_s": wall, "amortized_overhead_per_cell_s": (wall - sum(pipeline)) / len(cells),
        "ratio_wall_to_pipeline": wall / sum(pipeline), "load_average_1min": os.getloadavg()[0], "out": str(out),
    }
    width = max(map(len, figures))
    print()
    for key, value in figures.items():
        print(f" {key:<{width}}  {value:.3g}" if isinstance(value, float) else f" {key:<{width}}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
