"""A pipeline run from start to summary: plan, lock the run directory, train the stages not finished yet (in this
process or in workers), evaluate the last one and write `summary.json`."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import Namespace

from lightning_saferl.base import SafeRLModule
from lightning_saferl.evaluation import evaluate_policy, print_table
from lightning_saferl.pipeline.locks import exclusive, refuse_held_stages
from lightning_saferl.pipeline.plan import Plan, check_models, make_plan, refuse_conflicts
from lightning_saferl.pipeline.recipe import SMOKE_EPISODES, build_parser, evaluation_limits, parse_args
from lightning_saferl.pipeline.stages import apply_acting_settings, train_stage
from lightning_saferl.pipeline.workers import stage_workers, train_in_workers
from lightning_saferl.policy import load_module, read_checkpoint
from lightning_saferl.runs import atomic_write_text, config_changes, stored_record, write_run_info


def run_pipeline(cfg: Namespace, command: Optional[list[str]] = None, cost_limit: Optional[float] = None,
                 reuse_from: Sequence[os.PathLike] = ()) -> dict[str, Any]:
    """Check everything, train the stages not finished yet, evaluate the last one; returns the summary. `cfg` (from
    `parse_args`) is left unchanged; `cost_limit`, where given, is the budget this run trains for (it wins over the
    recipe's and the command line's `cost_limit`, `resolve_cost_limit`); `reuse_from`: other run directories whose
    finished stages this run takes where their config is this run's (`reuse_finished_stages`)."""
    started = time.time()
    plan = make_plan(cfg, cost_limit)
    check_models(plan)

    from lightning_saferl.envs import make_env

    make_env(plan.task_spec.task_id).close()  # a missing simulator fails now, not after training
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(plan.run_dir):
        refuse_held_stages(plan)
        reuse_finished_stages(plan, reuse_from)
        refuse_conflicts(plan.conflicts(), plan.run_dir)
        return _run_locked(plan, command, started)


def reuse_finished_stages(plan: Plan, sources: Sequence[os.PathLike]) -> list[str]:
    """Link (else copy) `<source>/<stage>/model.ckpt` into this run for each stage not finished here whose
    checkpoint was saved with this stage's config record (same settings, seed and inputs' configs; acting-only
    settings aside, as when resuming). A sweep's cells that differ only in the cost limit share so the stages that
    do not follow it. Returns the stages taken."""
    taken = []
    for name in plan.names:
        target = plan.run_dir / name / "model.ckpt"
        if target.exists() or name in plan.restart:
            continue
        for source in map(Path, sources):
            ckpt = source / name / "model.ckpt"
            stored = stored_record(read_checkpoint(str(ckpt))) if ckpt.is_file() else None
            if stored is None or config_changes(stored, plan.records[name]):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(ckpt, target)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(ckpt, target)
            print(f"[pipeline] stage '{name}': the same config finished in {source}, reusing its model.ckpt")
            taken.append(name)
            break
    return taken


def _run_locked(plan: Plan, command: Optional[list[str]], started: float) -> dict[str, Any]:
    """`run_pipeline`'s work once the run directory is locked and its checkpoints are known to fit the config."""
    run_dir = plan.run_dir
    _save_run_record(plan, command)
    todo = [name for name in plan.names if name in plan.restart or not (run_dir / name / "model.ckpt").exists()]
    trained: dict[str, SafeRLModule] = {}
    workers = stage_workers(plan, todo)
    in_workers = todo if workers > 1 and len(todo) > 1 else []
    if in_workers:
        train_in_workers(plan, in_workers, workers, command)
    for name in plan.names:
        final = run_dir / name / "model.ckpt"
        if name in todo and name not in in_workers:
            trained[name] = train_stage(plan, name, trained, command)
            continue
        if name not in in_workers:
            print(f"[pipeline] stage '{name}': finished earlier, loading {final}")
        trained[name] = load_module(str(final), expected=plan.classes[name])
        apply_acting_settings(trained[name], plan.parsed[name], final)
    summary = evaluate(trained[plan.names[-1]], plan.task_spec, plan.cfg)
    summary["minutes"] = (time.time() - started) / 60
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_table(summary, f"summary ({run_dir / 'summary.json'})")
    return summary


def evaluate(policy, task_spec, cfg: Namespace) -> dict[str, Any]:
    """The summary of the final policy: task, algorithm and seed, then `evaluation.evaluate_policy` with the recipe's
    `evaluation` settings (`SMOKE_EPISODES` episodes under `--smoke`) at its evaluation limits."""
    ev = cfg.evaluation
    episodes = SMOKE_EPISODES if cfg.smoke else ev.episodes
    return {"task": task_spec.task_id, "algorithm": cfg.algorithm, "seed": cfg.seed_everything,
            **evaluate_policy(policy, task_spec, evaluation_limits(cfg, task_spec), episodes, ev.num_envs, ev.seed,
                              ev.reset_options)}


def _save_run_record(plan: Plan, command: Optional[list[str]]) -> None:
    """The resolved recipe (without --restart, so that running it again reuses the stages), seed and versions."""
    recorded = plan.cfg.clone()
    recorded.restart = []
    atomic_write_text(plan.run_dir / "config.yaml", build_parser().dump(recorded, skip_none=False))
    write_run_info(plan.run_dir, plan.cfg.seed_everything, command)


def pipeline_main(argv: Optional[list[str]] = None, cost_limit: Optional[float] = None,
                  reuse_from: Sequence[os.PathLike] = ()) -> dict[str, Any]:
    """`lightning-saferl pipeline ARGV`; `cost_limit` and `reuse_from` as `run_pipeline` takes them (the sweep's
    cells pass theirs so)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = ["lightning-saferl", "pipeline", *argv, *(["--cost_limit", repr(float(cost_limit))]
                                                         if cost_limit is not None else [])]
    return run_pipeline(parse_args(argv), command=command, cost_limit=cost_limit, reuse_from=reuse_from)
