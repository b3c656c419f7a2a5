"""`lightning-saferl sweep`: one recipe over seeds x tasks x cost limits (x any field given with --grid) on Ray.

    lightning-saferl sweep --config RECIPE --out DIR [--seeds 0 1 2] [--tasks ID ...] [--cost_limits 10 20 40]
        [--grid KEY=[V1,V2] ...] [--address ADDR] [--cpus_per_run N] [--gpus_per_run N] [--smoke] [PIPELINE ARGS]

Every cell is an ordinary `lightning-saferl pipeline` run directory under DIR, named
`<algorithm>/<task>/[<grid values>/]limit_<L>/seed_<S>`; its output goes to `<cell>/log.txt`. Remaining arguments
(e.g. `--data.path FILE`, `--trainer '{...}'`) are passed to every cell.

Cost limits: `--cost_limits`, else the task family's (`TaskSpec.cost_limits`). A recipe whose training follows the
limit (it names `cost_limit_fields`) gets one cell per limit (trained for L: the cell hands L to the pipeline as a
number, `run_pipeline(cfg, cost_limit=L)`; scored at L; the stages whose config does not follow the limit, e.g. DRCORL's
behaviour model and critic, are trained by the cell of the first limit and taken by the others of the same task and
seed, `pipeline.reuse_finished_stages`: the cells run limit by limit); any other recipe is
trained once per (task, seed) and scored at every limit, in a cell named `limits_<L1>_<L2>...`; without
`--cost_limits` these are the limits the pipeline itself would score at (`pipeline.evaluation_limits`: the recipe's
`evaluation.cost_limits`, else its `cost_limit`, else the family's).

A rerun skips the cells whose `summary.json` exists, resumes the others (the pipeline continues from the stages'
checkpoints), and refuses a cell whose stored `config.yaml` differs from the config it would run now. A failing
cell is reported with its log and the others go on; the command exits 1 if any cell failed or was refused.
Finally `table.md`, `table.csv`, `table.json` and `table.png` are (re)built in DIR from every finished run below it
(`lightning_saferl.table`).

Engine: Ray. Without `--address` a local Ray is started inside the command and shut down at the end; with it the
cells go to that cluster (DIR, the recipe and the data must then be on a file system every node sees, and every
node needs lightning-saferl installed). Each cell is a Ray task with `--cpus_per_run` CPUs and `--gpus_per_run`
GPUs that runs the pipeline in its worker process (no new interpreter per cell, so the imports are paid once per
worker).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from lightning_saferl.errors import InputError

RAY_MISSING = "lightning-saferl sweep needs Ray: pip install -e '.[sweep]'  (or: pip install 'ray>=2.9')"


@dataclass
class Cell:
    """One run of the grid: its directory (relative to the sweep's), its pipeline arguments and the cost limit it
    trains for (None: the recipe's)."""

    name: str
    argv: list[str]
    cost_limit: Optional[float] = None
    siblings: list[str] = field(default_factory=list)  # the same cell at the other limits (stages to share)
    status: str = "pending"  # pending | skipped | refused | finished | failed
    message: str = ""
    seconds: float = 0.0  # the cell's time in its worker (pipeline, log redirection, parsing)
    finished_at: float = 0.0  # when the sweep received the result (time.time())
    summary: dict = field(default_factory=dict)


def _label(value: Any) -> str:
    """A grid value as a path component: file paths by their name, unsafe characters replaced."""
    text = Path(value).name if isinstance(value, str) and os.sep in value else str(value)
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def _parse_grid(items: Sequence[str]) -> list[tuple[str, list]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        parsed = yaml.safe_load(values) if sep else None
        if not key or not isinstance(parsed, list) or not parsed:
            raise InputError(f"--grid {item!r}: expected KEY=[V1,V2,...] (a YAML list of at least one value)")
        grid.append((key.lstrip("-"), parsed))
    return grid


def plan(recipe: str, out: Path, seeds: Sequence[int], tasks: Optional[Sequence[str]] = None,
         cost_limits: Optional[Sequence[float]] = None, grid: Sequence[str] = (), overrides: Sequence[str] = (),
         smoke: bool = False) -> list[Cell]:
    """The cells of the sweep (module docstring), in a stable order."""
    from lightning_saferl.data.tasks import get_task
    from lightning_saferl.evaluation import cost_limit_list, limit_key
    from lightning_saferl.pipeline import evaluation_limits, parse_args

    base_argv = ["--config", str(Path(recipe).resolve()), *overrides]
    base = parse_args(base_argv)
    follows = bool(base.cost_limit_fields)
    grid_items = _parse_grid(grid)
    cells = []
    for task in tasks or [base.data.task]:
        spec = get_task(task)
        if cost_limits:
            limits = cost_limit_list(cost_limits, "--cost_limits")
        else:  # one cell per limit of the family, or one cell scored where the pipeline alone would score it
            limits = cost_limit_list(list(spec.cost_limits)) if follows else evaluation_limits(base, spec)
        for combo in itertools.product(*[values for _, values in grid_items]):
            grid_argv, labels = [], []
            for (key, _), value in zip(grid_items, combo):
                grid_argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
                labels.append(f"{key.rsplit('.', 1)[-1]}={_label(value)}")
            algorithm = base.algorithm + (f"[{','.join(labels)}]" if labels else "")
            groups = [[limit] for limit in limits] if follows else [limits]
            same_seed: dict[int, list[Cell]] = {seed: [] for seed in seeds}
            # limit-major: a seed's first limit runs before its others, which then reuse its limit-free stages
            for group, seed in itertools.product(groups, seeds):
                limit_dir = (f"limit_{limit_key(group[0])}" if follows
                             else "limits_" + "_".join(limit_key(v) for v in group))
                name = "/".join([base.algorithm, task, *labels, limit_dir, f"seed_{seed}"])
                argv = [*base_argv, "--data.task", task, *grid_argv, "--algorithm", algorithm,
                        "--seed_everything", str(seed), "--evaluation.cost_limits", json.dumps(group),
                        "--run_dir", str(out / name)]
                if smoke:
                    argv.append("--smoke")
                cells.append(Cell(name, argv, group[0] if follows else None))
                same_seed[seed].append(cells[-1])
            for group_cells in same_seed.values():
                for cell in group_cells:
                    cell.siblings = [str(out / c.name) for c in group_cells if c is not cell]
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise InputError("two cells of the grid get the same directory; give grid values distinct names")
    return cells


def resolved_config(argv: list[str], cost_limit: Optional[float] = None) -> dict:
    """The config a pipeline run with these arguments (and this cost limit, `pipeline.run_pipeline`) stores in
    `<run_dir>/config.yaml`: its cost limit applied (`pipeline.resolve_cost_limit`)."""
    from lightning_saferl.pipeline import build_parser, parse_args, resolve_cost_limit

    return yaml.safe_load(build_parser().dump(resolve_cost_limit(parse_args(argv), cost_limit), skip_none=False))


def check(cell: Cell, out: Path) -> None:
    """Mark a cell skipped (finished with this config), refused (its stored config differs in a key that matters,
    `runs.config_changes`) or leave it pending (the pipeline resumes it, checking each stage's checkpoint)."""
    from lightning_saferl.runs import config_changes

    run = out / cell.name
    stored = run / "config.yaml"
    if not stored.exists():
        return
    changed = config_changes(yaml.safe_load(stored.read_text()), resolved_config(cell.argv, cell.cost_limit))
    if changed:
        cell.status = "refused"
        cell.message = (f"{run} was run with another config (changed: {', '.join(changed)}); "
                        "use another --out or delete the cell")
    elif (run / "summary.json").exists():
        cell.status = "skipped"
        cell.summary = json.loads((run / "summary.json").read_text())


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C libraries too) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_cell(argv: list[str], run_dir: str, cwd: Optional[str] = None, cost_limit: Optional[float] = None,
             siblings: Sequence[str] = ()) -> dict[str, Any]:
    """Run one pipeline (`argv`, trained for `cost_limit` where given) in this process with its output appended to
    `<run_dir>/log.txt`, in the sweep's working directory `cwd` where this machine has it (relative paths in
    recipes), taking the finished stages of `siblings` whose config is its own (`pipeline.reuse_finished_stages`);
    never raises.
    Returns {"ok", "seconds", "error", "log", "summary"}."""
    from lightning_saferl.command import run_command, split_debug

    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    log = run / "log.txt"
    started = time.time()
    ok = False
    with _output_to(log):
        limit = "" if cost_limit is None else f" (cost limit {cost_limit:g})"
        print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} lightning-saferl pipeline {' '.join(argv)}{limit}", flush=True)
        try:
            from lightning_saferl.pipeline import pipeline_main

            debug, pipeline_argv = split_debug(argv)
            run_command("pipeline", lambda: pipeline_main(pipeline_argv, cost_limit, siblings), debug)
            ok = True
        except SystemExit as stop:
            ok = stop.code in (0, None)
        except BaseException:  # noqa: BLE001 - a cell's failure is reported, never raised into the sweep
            traceback.print_exc()
    seconds = time.time() - started
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if ok and summary_path.exists() else {}
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return {"ok": ok and bool(summary), "seconds": seconds, "log": str(log), "summary": summary,
            "error": "" if ok else (lines[-1].strip() if lines else "no output")}


def _progress(done: int, total: int, cell: Cell, log: str) -> str:
    if cell.status == "finished":
        s = cell.summary
        return (f"[sweep] {done}/{total} finished {cell.name} ({cell.seconds:.1f} s): "
                f"return {s.get('return_mean', float('nan')):.4g}, cost {s.get('cost_mean', float('nan')):.4g}")
    return f"[sweep] {done}/{total} FAILED {cell.name}: {cell.message} (log: {log})"


def _import_ray():
    try:
        import ray
    except ImportError:
        print(f"lightning-saferl sweep: error: {RAY_MISSING}", file=sys.stderr)
        sys.exit(2)
    return ray


def _start_ray(address: Optional[str]):
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 ** 2)
    return ray, True


def run_cells(cells: list[Cell], out: Path, address: Optional[str] = None, cpus_per_run: float = 1,
              gpus_per_run: float = 0, on_finished: Optional[Callable[[Cell], None]] = None) -> None:
    """Run the pending cells as Ray tasks, updating each cell's status; one progress line per finished cell, and
    `on_finished(cell)` for each cell that finished well."""
    pending = [c for c in cells if c.status == "pending"]
    if not pending:
        return
    ray, started_here = _start_ray(address)
    try:
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(run_cell)
        futures = {task.remote(c.argv, str(out / c.name), os.getcwd(), c.cost_limit, c.siblings): c for c in pending}
        done = 0
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            cell = futures.pop(ready[0])
            log = str(out / cell.name / "log.txt")
            try:
                result = ray.get(ready[0])
            except Exception as err:  # the worker died (killed, out of memory): the cell failed, the sweep goes on
                result = {"ok": False, "seconds": 0.0, "error": " ".join(str(err).split())[:300], "summary": {}}
            cell.seconds, cell.summary, cell.finished_at = result["seconds"], result["summary"], time.time()
            cell.status, cell.message = ("finished", "") if result["ok"] else ("failed", result["error"])
            done += 1
            print(_progress(done, len(pending), cell, log), flush=True)
            if on_finished is not None and cell.status == "finished":
                on_finished(cell)
    finally:
        if started_here:
            ray.shutdown()


def run_sweep(recipe: str, out: str, seeds: Sequence[int] = (0, 1, 2), tasks: Optional[Sequence[str]] = None,
              cost_limits: Optional[Sequence[float]] = None, grid: Sequence[str] = (), overrides: Sequence[str] = (),
              smoke: bool = False, address: Optional[str] = None, cpus_per_run: float = 1,
              gpus_per_run: float = 0) -> list[Cell]:
    """Plan, check, run the cells and write the table in `out`; returns the cells with their status."""
    from lightning_saferl.table import write_table

    out_dir = Path(out).resolve()
    cells = plan(recipe, out_dir, seeds, tasks, cost_limits, grid, overrides, smoke)
    for cell in cells:
        check(cell, out_dir)
    skipped = [c for c in cells if c.status == "skipped"]
    print(f"[sweep] {len(cells)} cells in {out_dir}: {len(skipped)} finished earlier, "
          f"{sum(c.status == 'pending' for c in cells)} to run", flush=True)
    for cell in cells:
        if cell.status == "refused":
            print(f"[sweep] REFUSED {cell.name}: {cell.message}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_cells(cells, out_dir, address, cpus_per_run, gpus_per_run)
    if any(c.status in ("finished", "skipped") for c in cells):
        write_table([out_dir], out_dir)
    failed = [c for c in cells if c.status in ("failed", "refused")]
    if failed:
        print(f"[sweep] {len(failed)} of {len(cells)} cells failed or were refused:", flush=True)
        for cell in failed:
            where = f" (log: {out_dir / cell.name / 'log.txt'})" if cell.status == "failed" else ""
            print(f"  {cell.status} {cell.name}: {cell.message}{where}", flush=True)
    return cells


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-saferl sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the recipe (as for `lightning-saferl pipeline`)")
    parser.add_argument("--out", required=True, help="the sweep's directory (cells, logs, tables)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=None, help="task ids (default: the recipe's data.task)")
    parser.add_argument("--cost_limits", type=float, nargs="+", default=None,
                        help="default: the recipe's evaluation limits, else the task family's")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                        help="also sweep a recipe field over a YAML list (repeatable)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    parser.add_argument("--cpus_per_run", type=float, default=1)
    parser.add_argument("--gpus_per_run", type=float, default=0)
    parser.add_argument("--smoke", action="store_true", help="the pipeline's smoke budget in every cell")
    return parser


def sweep_main(argv: Optional[list[str]] = None) -> list[Cell]:
    args, overrides = build_parser().parse_known_args(argv)
    _import_ray()  # before any planning: a missing Ray is said at once
    cells = run_sweep(args.config, args.out, args.seeds, args.tasks, args.cost_limits, args.grid, overrides,
                      args.smoke, args.address, args.cpus_per_run, args.gpus_per_run)
    if any(c.status in ("failed", "refused") for c in cells):
        sys.exit(1)
    return cells
