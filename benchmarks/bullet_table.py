"""The method table on Bullet-Safety-Gym: every method's DSRL recipe at a budget sized for 2 CPU cores.

    python benchmarks/bullet_table.py --data 'datasets/{task}.hdf5' --out runs/bullet [--plan] [--write]
        [--methods fisor bc_all ...] [--tasks OfflineBallCircle-v0 OfflineCarCircle-v0] [--seeds 0 1 2]
        [--cost_limits 10 20 40] [--timing_steps 200] [--bank benchmarks/bank/bullet]

``--data`` is a dataset path with ``{task}`` for the task id (files written by `lightning-saferl build-dataset`).

Default: every cell of every method (`lightning_saferl.sweep`'s cells: FISOR, BC-All and CDT once per task and seed,
scored at every limit; the others once per limit) runs on one local Ray, one CPU per cell, the longest cells first,
then the table of all of them is written to OUT (``lightning-saferl table``). A rerun skips finished cells and
resumes interrupted ones, so the table can be built in pieces; ``--bank`` carries finished cells (their config and
summary, with the dataset's sha256) to a fresh machine through a committed folder. ``--write`` turns OUT's table into
docs/results/bullet.json, bullet.md and bullet.png (`write_results`).

``--plan`` trains nothing to the end: per method it times ``--timing_steps`` steps of each stage (one thread, the
real pipeline: recipe, data file, Lightning loop) and one evaluation, and prints each method's minutes per cell at
its budget (`BUDGETS`) and at its recipe's own step counts, the cell count, and the table's core-hours and wall
hours with two cells at once. Last line: a JSON object of these figures.

Budgets: each method's recipe (configs/*/..._dsrl.yaml, the paper's / OSRL's settings) with fewer steps, the
networks and batches unchanged; `BUDGETS` holds the overrides, and the docs' results page states them beside the
recipes' own.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("OfflineBallCircle-v0", "OfflineCarCircle-v0")

# algorithm -> (recipe, pipeline overrides that size it for 2 cores)
BUDGETS: dict[str, tuple[str, list[str]]] = {
    "fisor": ("configs/fisor/dsrl.yaml", [
        "--stages.feasibility_critic.trainer.max_steps", "20000", "--stages.reward_critic.trainer.max_steps", "20000",
        "--stages.actor.trainer.max_steps", "5000", "--stages.actor.model.init_args.cosine_decay_steps", "7500"]),
    "drcorl": ("configs/drcorl/dsrl.yaml", [
        "--stages.behavior.trainer.max_steps", "4000", "--stages.behavior.data.batch_size", "512",
        "--stages.reward_critic.trainer.max_steps", "20000",
        "--stages.policy.trainer.max_steps", "3000", "--stages.policy.model.init_args.bc_steps", "1200"]),
    "bc_all": ("configs/baselines/bc_all_dsrl.yaml", ["--stages.policy.trainer.max_steps", "10000"]),
    "bc_safe": ("configs/baselines/bc_safe_dsrl.yaml", ["--stages.policy.trainer.max_steps", "10000"]),
    "bcq_lag": ("configs/baselines/bcq_lag_dsrl.yaml", [
        "--stages.policy.trainer.max_steps", "6000", "--stages.policy.data.batch_size", "256"]),
    "cpq": ("configs/baselines/cpq_dsrl.yaml", [
        "--stages.policy.trainer.max_steps", "3000", "--stages.policy.data.batch_size", "256"]),
    "coptidice": ("configs/baselines/coptidice_dsrl.yaml", ["--stages.policy.trainer.max_steps", "10000"]),
    "cdt": ("configs/baselines/cdt_dsrl.yaml", [
        "--stages.policy.trainer.max_steps", "3000", "--stages.policy.data.batch_size", "256",
        "--stages.policy.model.init_args.embedding_dim", "64", "--stages.policy.model.init_args.num_layers", "2",
        "--stages.policy.model.init_args.num_heads", "4"]),
}
# timed with --plan besides the budget: phases that change the step's cost start within the timed steps
TIMING = {"drcorl": lambda steps: ["--stages.policy.model.init_args.bc_steps", str(steps * 2 // 5)]}
EVALUATION = ["--evaluation.episodes", "20", "--evaluation.seed", "100000"]  # episode seeds no run trained or tuned on


def cells(methods: Sequence[str], data: str, out: Path, tasks: Sequence[str], seeds: Sequence[int],
          cost_limits: Sequence[float]) -> list:
    """The sweep cells of every method (`lightning_saferl.sweep.plan`), checked against OUT."""
    from lightning_saferl import sweep

    planned = []
    for name in methods:
        recipe, budget = BUDGETS[name]
        for cell in sweep.plan(str(ROOT / recipe), out, seeds, tasks, cost_limits,
                               overrides=[*budget, *EVALUATION, "--data.path", data]):
            sweep.check(cell, out)
            planned.append(cell)
    return planned


# ------------------------------------------------------------------------------------------------ --bank
#: what a banked cell keeps: enough for `sweep.check` to skip it and for `lightning-saferl table` to read it
BANKED_FILES = ("config.yaml", "summary.json")


def cell_dataset(cell, data: str) -> Path:
    """The dataset file a cell trains on (its task in `data`)."""
    from lightning_saferl.data.datamodule import task_path

    return Path(task_path(data, cell.name.split("/")[1]))


def restore_from_bank(bank: Path, out: Path, planned: list, data: str) -> int:
    """Copy each banked cell's `BANKED_FILES` into OUT where OUT has no summary of that cell, if the bank's record
    of the dataset (``dataset.json``) names the same file content (sha256) as `data` holds now: a cell trained on
    another build of the dataset is run again. Returns the number of cells restored."""
    from lightning_saferl.data.download import file_sha256

    restored, hashes = 0, {}
    for cell in planned:
        source, target = bank / cell.name, out / cell.name
        if (target / "summary.json").exists() or not (source / "dataset.json").exists():
            continue
        dataset = cell_dataset(cell, data)
        if dataset not in hashes:
            hashes[dataset] = file_sha256(dataset) if dataset.exists() else None
        banked_sha = json.loads((source / "dataset.json").read_text())["sha256"]
        if banked_sha != hashes[dataset]:
            print(f"[bank] {cell.name}: banked on another build of {dataset.name} (sha256 {banked_sha[:12]}, "
                  f"this file {str(hashes[dataset])[:12]}); it runs again")
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in BANKED_FILES:
            shutil.copyfile(source / name, target / name)
        restored += 1
    return restored


def deposit_in_bank(bank: Path, out: Path, cell, data: str) -> bool:
    """Copy a finished cell's `BANKED_FILES` from OUT into the bank (small text files meant to be committed, so that
    the table resumes on a fresh machine), with ``dataset.json``: the dataset's file name and sha256, and the machine
    and date. False where the cell has no summary or is banked already."""
    from lightning_saferl.data.download import file_sha256
    from lightning_saferl.runs import cpu_model

    source, target = out / cell.name, bank / cell.name
    if not (source / "summary.json").exists() or (target / "summary.json").exists():
        return False
    target.mkdir(parents=True, exist_ok=True)
    for name in BANKED_FILES:
        shutil.copyfile(source / name, target / name)
    dataset = cell_dataset(cell, data)
    (target / "dataset.json").write_text(json.dumps(
        {"file": dataset.name, "sha256": file_sha256(dataset), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
         "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    return True


# ------------------------------------------------------------------------------------------------ --plan
def time_method(name: str, data: str, task: str, steps: int) -> dict:
    """Seconds per training step of each stage (mean over steps after the first 10) and of one evaluation."""
    import lightning.pytorch as pl
    from lightning_saferl.pipeline import parse_args
    from lightning_saferl.pipeline.plan import make_plan
    from lightning_saferl.pipeline.run import evaluate
    from lightning_saferl.pipeline.stages import train_stage

    class Clock(pl.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stamps.append(time.perf_counter())

    recipe, overrides = BUDGETS[name]
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["--config", str(ROOT / recipe), *overrides, *EVALUATION, "--data.task", task, "--data.path", data,
                "--run_dir", run_dir, "--trainer.enable_progress_bar", "false"]
        budget = budget_of(name)
        timed = [f"--stages.{stage}.trainer.max_steps={steps}" for stage in budget]
        timed += TIMING[name](steps) if name in TIMING else []
        plan = make_plan(parse_args([*argv, *timed]))
        trained, stages = {}, {}
        for stage in plan.names:
            clock = Clock()
            trained[stage] = train_stage(plan, stage, trained, None, callbacks=(clock,))
            seconds = (clock.stamps[-1] - clock.stamps[10]) / (len(clock.stamps) - 11)
            stages[stage] = {"step_s": seconds, "budget_steps": budget[stage][0], "recipe_steps": budget[stage][1]}
        started = time.perf_counter()
        evaluate(trained[plan.names[-1]], plan.task_spec, plan.cfg)
        return {"stages": stages, "evaluation_s": time.perf_counter() - started}


def budget_of(name: str) -> dict[str, tuple[int, int, int, int]]:
    """Stage -> (steps, the recipe's steps, batch size, the recipe's batch size) of a method's budget."""
    from lightning_saferl.pipeline import parse_args

    recipe, overrides = BUDGETS[name]
    cfg = parse_args(["--config", str(ROOT / recipe)])
    given = dict(zip(overrides[::2], overrides[1::2]))
    out = {}
    for stage, config in cfg.stages.items():
        steps = config.get("trainer", {}).get("max_steps", cfg.trainer.max_steps)
        batch = config.get("data", {}).get("batch_size", cfg.data.batch_size)
        out[stage] = (int(given.get(f"--stages.{stage}.trainer.max_steps", steps)), steps,
                      int(given.get(f"--stages.{stage}.data.batch_size", batch)), batch)
    return out


def limit_following_stages(name: str) -> set[str]:
    """The stages of a method's recipe whose training its `cost_limit_fields` change (trained per limit; the others,
    and those where the limit is an acting setting such as CDT's target_cost, once per task and seed:
    `lightning_saferl.sweep`)."""
    from lightning_saferl.pipeline import parse_args
    from lightning_saferl.pipeline.classes import import_class

    cfg = parse_args(["--config", str(ROOT / BUDGETS[name][0])])
    stages = set()
    for field in cfg.cost_limit_fields:
        _, stage, _, _, key = field.split(".")  # stages.<stage>.model.init_args.<key>
        if key not in import_class(cfg.stages[stage]["model"]["class_path"], field).acting_hparams:
            stages.add(stage)
    return stages


def plan_table(methods: Sequence[str], data: str, tasks: Sequence[str], seeds: Sequence[int],
               cost_limits: Sequence[float], steps: int) -> dict:
    """Time every method on the first task and scale to the table (module docstring)."""
    import torch

    torch.set_num_threads(1)
    out = {"methods": {}, "timing_task": tasks[0], "timing_steps": steps}
    with tempfile.TemporaryDirectory() as scratch:
        counted = cells(methods, data, Path(scratch), tasks, seeds, cost_limits)
    for name in methods:
        figures = time_method(name, data, tasks[0], steps)
        mine = [c for c in counted if c.name.split("/")[0] == name]
        n, follows = len(mine), limit_following_stages(name)
        shared = n // len(cost_limits) if mine[0].cost_limit is not None else n  # trainings of a limit-free stage
        minutes = {key: sum(s["step_s"] * s[key] * (n if stage in follows else shared)
                            for stage, s in figures["stages"].items()) / 60 + n * figures["evaluation_s"] / 60
                   for key in ("budget_steps", "recipe_steps")}
        out["methods"][name] = {**figures, "cells": n, "core_hours": minutes["budget_steps"] / 60,
                                "recipe_core_hours": minutes["recipe_steps"] / 60}
        print(f"{name:10s} {n:3d} cells, {minutes['budget_steps'] / 60:5.2f} core-hours (recipe's steps: "
              f"{minutes['recipe_steps'] / 60:6.1f}); " + ", ".join(
                  f"{stage} {1e3 * s['step_s']:.1f} ms x {s['budget_steps']}" for stage, s in
                  figures["stages"].items()) + f"; evaluation {figures['evaluation_s']:.0f} s", flush=True)
    total = sum(m["core_hours"] for m in out["methods"].values())
    out.update(core_hours=total, wall_hours_2_cores=total / 2)
    print(f"table: {total:.1f} core-hours, about {total / 2:.1f} hours on 2 cores (timed on {tasks[0]})")
    return out


# ------------------------------------------------------------------------------------------------ --write
def write_results(out: Path, results: Path, command: str) -> list[dict]:
    """OUT's table -> `results`/bullet.json (a list of rows: task, algorithm, cost_limit, reward_norm_mean/std,
    cost_norm_mean/std, seeds), bullet.md (the table with per-task averages over the limits, the budgets, the
    machine and the command) and bullet.png (reward against cost)."""
    import shutil

    import numpy as np
    from lightning_saferl.runs import cpu_model

    table = json.loads((out / "table.json").read_text())
    rows = [{"task": r["task"], "algorithm": r["algorithm"], "cost_limit": r["cost_limit"],
             "reward_norm_mean": r["reward_mean"], "reward_norm_std": r["reward_std"],
             "cost_norm_mean": r["cost_mean"], "cost_norm_std": r["cost_std"], "seeds": r["n"]}
            for r in table["rows"]]
    (results / "bullet.json").write_text(json.dumps(rows, indent=1) + "\n")
    averages = ["| task | algorithm | reward (mean over limits) | cost (mean over limits) | safe at every limit |",
                "| --- | --- | --- | --- | --- |"]
    for task, algorithm in sorted({(r["task"], r["algorithm"]) for r in rows}):
        mine = [r for r in rows if (r["task"], r["algorithm"]) == (task, algorithm)]
        averages.append(f"| {task} | {algorithm} | {np.mean([r['reward_norm_mean'] for r in mine]):.3f} | "
                        f"{np.mean([r['cost_norm_mean'] for r in mine]):.3f} | "
                        f"{'yes' if all(r['cost_norm_mean'] <= 1 for r in mine) else '**no**'} |")
    budgets = ["| algorithm | recipe | stage | steps (recipe's) | batch (recipe's) |", "| --- | --- | --- | --- | --- |"]
    budgets += [f"| {name} | `{BUDGETS[name][0]}` | {stage} | {steps} ({recipe_steps}) | {batch} ({recipe_batch}) |"
                for name in BUDGETS for stage, (steps, recipe_steps, batch, recipe_batch) in budget_of(name).items()]
    (results / "bullet.md").write_text("\n".join([
        "# Bullet-Safety-Gym: the method table", "",
        f"Measured on {cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; generated by", "",
        f"```bash\n{command}\n```", "",
        f"Evaluation: `{' '.join(EVALUATION)}` (episode i reset with seed 100000 + i).", "",
        (out / "table.md").read_text(), "Averages per task (mean over the cost limits):", "", *averages, "",
        "Budgets:", "", *budgets, "", "![reward against normalised cost](bullet.png)", ""]))
    shutil.copyfile(out / "table.png", results / "bullet.png")
    print(f"wrote {results / 'bullet.json'} ({len(rows)} rows), bullet.md, bullet.png")
    return rows


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset path with {task} for the task id")
    parser.add_argument("--out", default="runs/bullet", help="the table's directory (one sweep cell per run)")
    parser.add_argument("--methods", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cost_limits", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    parser.add_argument("--plan", action="store_true", help="time the budgets instead of running them")
    parser.add_argument("--timing_steps", type=int, default=200, help="steps timed per stage with --plan")
    parser.add_argument("--write", action="store_true", help="write docs/results/bullet.json from OUT's table")
    parser.add_argument("--bank", type=Path, default=None,
                        help="a folder meant to be committed (e.g. benchmarks/bank/bullet): each cell's config and "
                             "summary are copied there as it finishes, and cells banked on the same dataset file "
                             "(sha256) are restored into OUT before the run, so a fresh machine resumes the table")
    args = parser.parse_args(argv)
    if "{task}" not in args.data:
        parser.error(f"--data {args.data!r} must contain {{task}} (one file per task)")
    if args.plan:
        result = plan_table(args.methods, args.data, args.tasks, args.seeds, args.cost_limits, args.timing_steps)
        print(json.dumps(result))
        return result
    from lightning_saferl import sweep
    from lightning_saferl.table import write_table

    out = Path(args.out).resolve()
    planned = cells(args.methods, args.data, out, args.tasks, args.seeds, args.cost_limits)
    if args.bank is not None and restore_from_bank(args.bank, out, planned, args.data):
        planned = cells(args.methods, args.data, out, args.tasks, args.seeds, args.cost_limits)
    refused = [c for c in planned if c.status == "refused"]
    for cell in refused:
        print(f"REFUSED {cell.name}: {cell.message}")
    todo = [c for c in planned if c.status == "pending"]
    print(f"{len(planned)} cells in {out}: {len(planned) - len(todo) - len(refused)} finished earlier, "
          f"{len(todo)} to run", flush=True)
    order = list(BUDGETS)  # the longest methods first, so that two cores stay busy to the end
    todo.sort(key=lambda c: order.index(c.name.split("/")[0]))
    if args.bank is not None:  # cells finished in OUT before, then each cell as it finishes
        banked = sum(deposit_in_bank(args.bank, out, cell, args.data) for cell in planned)
        print(f"[bank] {banked} finished cells of {out} added to {args.bank}")
    sweep.run_cells(todo, out, on_finished=None if args.bank is None else
                    lambda cell: deposit_in_bank(args.bank, out, cell, args.data))
    result = write_table([str(out)], str(out)) if any((out / c.name / "summary.json").exists() for c in planned) \
        else {}
    if args.write:
        write_results(out, ROOT / "docs" / "results", "python benchmarks/bullet_table.py " + " ".join(
            argv if argv is not None else sys.argv[1:]))
    failed = [c for c in planned if c.status in ("failed", "refused")]
    if failed:
        print(f"{len(failed)} cells failed or were refused: " + ", ".join(c.name for c in failed))
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
