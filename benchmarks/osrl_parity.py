"""Parity with OSRL: OSRL's own BCQ-Lag, CPQ and COptiDICE beside ours, on the same DSRL-format file.

    python benchmarks/osrl_parity.py --data FILE [--task OfflineBallCircle-v0] [--cost_limit 20] [--seeds 0 1 2]
        [--methods bcq_lag cpq coptidice] [--table_budget] [--steps N] [--episodes N] [--eval_seed S] [--osrl_venv DIR]
        [--osrl_acting own|mode] [--jobs 1] [--threads 1] [--run_dir DIR] [--write]

OSRL (PyPI osrl-lib 0.1.0) runs in its own virtual environment, built by ``benchmarks/osrl_env.sh DIR`` (default
``.venv-osrl``); nothing of it is imported here. Per method and seed:

* ours: ``lightning-saferl pipeline --config configs/baselines/<method>_dsrl.yaml --data.task TASK --data.path FILE
  --cost_limit L`` in a subprocess of this interpreter, with the seed, the step count and the evaluation below;
* OSRL's: benchmarks/osrl_venv/train_osrl.py in the OSRL venv trains OSRL's model with its trainer's
  ``train_one_step`` on the file loaded as OSRL's example scripts load it, with the settings `osrl_settings` maps
  from our recipe (network widths, learning rates, batch, steps, scales, algorithm constants), and exports its
  acting rule (TorchScript);
* both policies are evaluated here by the same code, the project's ``evaluate_policy``: the recipe's episode count
  (``--episodes``), episode i reset with seed ``eval_seed + i``, one cost limit, DSRL normalisation with the
  registry's reference scores (``lightning_saferl.data.tasks``).

The last printed line is a JSON object: method -> {ours_reward, ours_cost, osrl_reward, osrl_cost, ours_reward_std,
ours_cost_std, osrl_reward_std, osrl_cost_std, seeds} (normalised return and cost, mean and population std over
seeds); ``--write`` also writes it to docs/results/osrl_parity.json. RUN_DIR/details.json holds the per-seed
scores, the settings OSRL was given and what could not be matched. Rerun with the same arguments and run
directory, the trainings finished on either side are reused and evaluated again (an interrupted parity continues).
Every value is passed to both sides, with these exceptions, which cannot be matched:

* acting: OSRL acts as its ``model.act`` does: BCQ-Lag with the perturbation actor on one VAE sample, CPQ and
  COptiDICE with a sample of the tanh-Gaussian (``--osrl_acting mode`` takes its mean for these two). Ours: BCQ-Lag
  picks the best of ``num_samples`` perturbed candidates by Q_r - lambda Q_c, CPQ and COptiDICE act with the mean.
* what each side evaluates: the final policy on both (OSRL's scripts also keep a "best" checkpoint chosen on
  evaluation episodes; not used).
* CPQ: our alpha is clipped to [0, alpha_max] (recipe: 1) by additive dual ascent; OSRL 0.1.0's CPQ takes no
  alpha_max, its log-alpha step is multiplicative and clipped to [-5, 5]. The differences in the OOD term, the
  cost target and the actor loss are listed in lightning_saferl/actors/cpq.py.
* COptiDICE: OSRL fixes the BC input noise at 0.1 std (ours: bc_noise, recipe 0.1) and has no target critic
  (ours: critic_tau) and no ``cost_estimate`` switch (ours: recipe "dice", OSRL's estimate).
* data: ours samples batches by index on the device (seeded by the seed), OSRL draws transitions with numpy's
  global generator in a DataLoader (seeded by OSRL's ``seed_all``); ours clips dataset actions to +-(1 - 1e-5).
* threads: both sides run with ``--threads`` torch threads (default 1; OSRL's examples use 4).

Cost, measured on 2026-12-07 (AMD EPYC Zen 4, 2 cores shared with other training jobs, 1 thread per side): OSRL's
trainers take 0.29-0.56 s a step for BCQ-Lag, 0.24-0.30 for CPQ, 0.05-0.07 for COptiDICE, so at the recipes' budgets
(100k, 100k, 300k steps) OSRL's side alone needs about 8-15, 7-8 and 4-6 hours per seed. The check
``--seeds 0 --steps 200 --episodes 2`` ran both sides of all three methods in 5-7 minutes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "baselines"
WORKER = Path(__file__).resolve().parent / "osrl_venv" / "train_osrl.py"
RESULT_FILE = ROOT / "docs" / "results" / "osrl_parity.json"
METHODS = ("bcq_lag", "cpq", "coptidice")
OSRL_ENV = {"DSRL_SUPPRESS_IMPORT_ERROR": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "offline"}

#: our hyperparameter -> the OSRL arguments it sets: (section, name); section "model" is the model class's keyword,
#: "trainer" the trainer class's. Our lr sets several of OSRL's learning rates.
SETTING_MAP: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "bcq_lag": {
        "hidden_dims": (("model", "a_hidden_sizes"),), "critic_hidden_dims": (("model", "c_hidden_sizes"),),
        "vae_hidden_dim": (("model", "vae_hidden_sizes"),), "num_samples": (("model", "sample_action_num"),),
        "discount": (("model", "gamma"),), "tau": (("model", "tau"),), "phi": (("model", "phi"),),
        "lmbda": (("model", "lmbda"),), "vae_beta": (("model", "beta"),), "pid": (("model", "PID"),),
        "lr": (("trainer", "actor_lr"), ("trainer", "critic_lr"), ("trainer", "vae_lr")),
    },
    "cpq": {
        "hidden_dims": (("model", "a_hidden_sizes"),), "critic_hidden_dims": (("model", "c_hidden_sizes"),),
        "vae_hidden_dim": (("model", "vae_hidden_sizes"),), "num_q": (("model", "num_q"), ("model", "num_qc")),
        "num_samples": (("model", "sample_action_num"),), "discount": (("model", "gamma"),),
        "tau": (("model", "tau"),), "vae_beta": (("model", "beta"),), "qc_scale": (("model", "qc_scalar"),),
        "lr": (("trainer", "critic_lr"), ("trainer", "vae_lr")), "actor_lr": (("trainer", "actor_lr"),),
        "alpha_lr": (("trainer", "alpha_lr"),),
    },
    "coptidice": {
        "hidden_dims": (("model", "a_hidden_sizes"),), "critic_hidden_dims": (("model", "c_hidden_sizes"),),
        "num_nu": (("model", "num_nu"),), "num_chi": (("model", "num_chi"),), "discount": (("model", "gamma"),),
        "alpha": (("model", "alpha"),), "f_divergence": (("model", "f_type"),),
        "cost_ub_epsilon": (("model", "cost_ub_epsilon"),),
        "lr": (("trainer", "actor_lr"), ("trainer", "critic_lr"), ("trainer", "scalar_lr")),
    },
}

#: our hyperparameters that OSRL 0.1.0 fixes in its code, with the value it uses there (None: no counterpart).
OSRL_FIXED: dict[str, dict[str, Any]] = {
    "bcq_lag": {},
    "cpq": {"ood_quantile": 0.75, "alpha_max": None},
    "coptidice": {"bc_noise": 0.1, "cost_estimate": "dice", "critic_tau": None},
}

#: our hyperparameters both sides take from elsewhere: the limit, the episode length and the reward scale are passed
#: to OSRL separately (`osrl_settings`), the dimensions come from the data.
SHARED = ("obs_dim", "act_dim", "cost_limit", "max_episode_steps", "reward_scale")


def recipe_settings(method: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Our policy stage's settings: its class's `defaults` updated by the recipe's init_args, plus batch_size,
    steps, episodes, num_envs and eval_seed (from configs/baselines/<method>_dsrl.yaml)."""
    config = yaml.safe_load((RECIPES / f"{method}_dsrl.yaml").read_text())
    stage = config["stages"]["policy"]
    settings = {**defaults, **stage["model"].get("init_args", {})}
    settings.update(batch_size=stage["data"]["batch_size"], steps=stage["trainer"]["max_steps"],
                    episodes=config["evaluation"]["episodes"], num_envs=config["evaluation"]["num_envs"],
                    eval_seed=config["evaluation"]["seed"])
    return settings


def table_budget(method: str) -> dict[str, int]:
    """`method`'s policy steps, and its batch size where it differs from the recipe's, in the Bullet table's budget
    (benchmarks/bullet_table.py `budget_of`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bullet_table", Path(__file__).with_name("bullet_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    steps, _, batch, recipe_batch = table.budget_of(method)["policy"]
    return {"steps": steps, **({"batch_size": batch} if batch != recipe_batch else {})}


def class_defaults(method: str) -> dict[str, Any]:
    """Keyword defaults of our policy class of `method` (read from the recipe's class_path)."""
    import importlib

    config = yaml.safe_load((RECIPES / f"{method}_dsrl.yaml").read_text())
    module, name = config["stages"]["policy"]["model"]["class_path"].rsplit(".", 1)
    signature = inspect.signature(getattr(importlib.import_module(module), name).__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def osrl_settings(method: str, ours: Mapping[str, Any], *, seed: int, steps: int, cost_limit: float,
                  episode_len: int) -> tuple[dict[str, Any], list[str]]:
    """OSRL's settings for `method` from ours (`recipe_settings`), and the list of ours it cannot take (each as
    "name=value (OSRL: ...)"). Raises KeyError for a setting of ours that is neither mapped, fixed nor shared."""
    if method not in SETTING_MAP:
        raise KeyError(f"osrl_settings: method {method!r} is not one of {METHODS}")
    mapping, fixed = SETTING_MAP[method], OSRL_FIXED[method]
    model: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    unmatched = []
    for name, value in ours.items():
        if name in mapping:
            for section, osrl_name in mapping[name]:
                (model if section == "model" else trainer)[osrl_name] = list(value) if isinstance(
                    value, (list, tuple)) else value
        elif name in fixed:
            if fixed[name] is None:
                unmatched.append(f"{name}={value!r} (OSRL: none)")
            elif fixed[name] != value:
                unmatched.append(f"{name}={value!r} (OSRL: {fixed[name]!r}, fixed)")
        elif name not in SHARED and name not in ("batch_size", "steps", "episodes", "num_envs", "eval_seed"):
            raise KeyError(f"osrl_settings: {method} setting {name!r} has no OSRL counterpart listed")
    settings = {"method": method, "seed": int(seed), "steps": int(steps), "batch_size": int(ours["batch_size"]),
                "cost_limit": float(cost_limit), "episode_len": int(episode_len),
                "reward_scale": float(ours.get("reward_scale", 1.0)), "cost_scale": 1.0,
                "model": model, "trainer": trainer}
    return settings, unmatched


def aggregate(scores: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
              seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """scores[method][side] = [(normalised return, normalised cost) per seed], side "ours" / "osrl" ->
    method -> {side_reward, side_cost, side_reward_std, side_cost_std, ..., seeds} (mean, population std)."""
    table = {}
    for method, sides in scores.items():
        row: dict[str, Any] = {}
        for side in ("ours", "osrl"):
            values = np.asarray(sides[side], dtype=float).reshape(-1, 2)
            if len(values) != len(seeds):
                raise ValueError(f"aggregate: {method} {side} has {len(values)} scores for {len(seeds)} seeds")
            row[f"{side}_reward"], row[f"{side}_cost"] = (float(v) for v in values.mean(0))
            row[f"{side}_reward_std"], row[f"{side}_cost_std"] = (float(v) for v in values.std(0))
        row["seeds"] = [int(s) for s in seeds]
        table[method] = row
    return table


def thread_env(threads: int, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_logged(command: list[str], log: Path, env: Mapping[str, str], cwd: Path = ROOT) -> str:
    """Run `command` in `cwd`, its output to `log`; returns the output, or exits naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log.write_text(result.stdout)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-15:])
        raise SystemExit(f"{' '.join(command[:4])} ... failed (exit {result.returncode}); log: {log}\n{tail}")
    return result.stdout


def run_ours(method: str, seed: int, ours: Mapping[str, Any], args, out: Path) -> dict[str, Any]:
    """Our pipeline run on the file; its summary.json."""
    command = [sys.executable, "-c", "from lightning_saferl.cli import main; main()", "pipeline",
               "--config", str(RECIPES / f"{method}_dsrl.yaml"), "--data.task", args.task, "--data.path", args.data,
               "--cost_limit", str(args.cost_limit), "--seed_everything", str(seed),
               "--stages.policy.trainer.max_steps", str(ours["steps"]),
               "--stages.policy.data.batch_size", str(ours["batch_size"]),
               "--evaluation.episodes", str(ours["episodes"]), "--evaluation.num_envs", str(ours["num_envs"]),
               "--evaluation.seed", str(ours["eval_seed"]),
               "--trainer", json.dumps({"enable_progress_bar": False}), "--run_dir", str(out)]
    env = thread_env(args.threads, {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                 os.environ.get("PYTHONPATH")]))})
    run_logged(command, out.with_suffix(".log"), env)  # `out` and the data path are absolute (`main`)
    return json.loads((out / "summary.json").read_text())


def run_osrl(settings: Mapping[str, Any], args, out: Path) -> dict[str, Any]:
    """OSRL's training in its venv; the worker's JSON line (with `out`, the exported acting rule). A training finished
    in `out` with the same settings is reused (trained.json is written once the actor is saved)."""
    python, out = Path(args.osrl_venv) / "bin" / "python", out.resolve()
    if not python.exists():
        raise SystemExit(f"--osrl_venv {args.osrl_venv}: no bin/python there; build it with "
                         f"benchmarks/osrl_env.sh {args.osrl_venv}")
    out.mkdir(parents=True, exist_ok=True)
    settings_file, trained_file = out / "settings.json", out / "trained.json"
    text = json.dumps({**settings, "task": args.task, "data": args.data, "acting": args.osrl_acting,
                       "out": str(out / "actor.pt")}, indent=1)
    if trained_file.exists() and settings_file.exists() and settings_file.read_text() == text:
        return json.loads(trained_file.read_text())
    trained_file.unlink(missing_ok=True)
    settings_file.write_text(text)
    # in `out`: dsrl's pre_process_data saves a plot of the episodes into the working directory
    output = run_logged([str(python), str(WORKER), str(settings_file)], out / "train.log",
                        thread_env(args.threads, OSRL_ENV), cwd=out)
    trained_file.write_text(output.strip().splitlines()[-1])
    return json.loads(trained_file.read_text())


def evaluate_exported(actor: str, task_spec, limit: float, ours: Mapping[str, Any]) -> dict[str, Any]:
    """The project's evaluation of an exported (TorchScript) acting rule (observation batch -> action batch) with the
    episodes of our run (`recipe_settings`: episodes, num_envs, eval_seed)."""
    import torch

    from lightning_saferl.evaluation import evaluate_policy

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.jit.load(actor)

        def act(self, obs: torch.Tensor) -> torch.Tensor:
            return self.net(obs)

    return evaluate_policy(Exported(), task_spec, [limit], ours["episodes"], ours["num_envs"], ours["eval_seed"])


def run_seed(method: str, seed: int, ours: Mapping[str, Any], args, spec) -> dict[str, Any]:
    """Both sides of one method and seed, trained (or reused) and evaluated: {seed, ours, osrl (normalised return,
    cost), osrl_train_seconds, osrl_settings, not_matched}."""
    base = Path(args.run_dir) / method / f"limit{args.cost_limit:g}" / f"seed{seed}"
    summary = run_ours(method, seed, ours, args, base / "ours")
    settings, unmatched = osrl_settings(method, ours, seed=seed, steps=ours["steps"], cost_limit=args.cost_limit,
                                        episode_len=spec.max_episode_steps)
    trained = run_osrl(settings, args, base / "osrl")
    theirs = evaluate_exported(trained["out"], spec, args.cost_limit, ours)
    record = {"seed": seed, "ours": (summary["normalized_return"], summary["normalized_cost"]),
              "osrl": (theirs["normalized_return"], theirs["normalized_cost"]),
              "osrl_train_seconds": trained["train_seconds"],
              "osrl_settings": {k: settings[k] for k in ("model", "trainer")}, "not_matched": unmatched}
    print(f"[parity] {method} seed {seed}: ours (return, cost) {record['ours']}, OSRL {record['osrl']}", flush=True)
    return record


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="DSRL-format HDF5 file both sides train on")
    parser.add_argument("--task", default="OfflineBallCircle-v0")
    parser.add_argument("--cost_limit", type=float, default=20.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="gradient steps (default: each recipe's)")
    parser.add_argument("--table_budget", action="store_true",
                        help="steps and batch of the Bullet table's budget (benchmarks/bullet_table.py) instead of "
                             "the recipes'; --steps still wins")
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes (default: the recipe's)")
    parser.add_argument("--eval_seed", type=int, default=None, help="episode i is seeded eval_seed + i "
                        "(default: the recipe's evaluation.seed)")
    parser.add_argument("--osrl_venv", default=str(ROOT / ".venv-osrl"))
    parser.add_argument("--osrl_acting", choices=("own", "mode"), default="own",
                        help="OSRL's acting rule as its model.act (own) or the Gaussian's mean (mode)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="methods x seeds trained at once (each side one process of --threads threads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (0: the default)")
    parser.add_argument("--run_dir", default=str(ROOT / "benchmarks" / "out" / "osrl_parity"))
    parser.add_argument("--write", action="store_true", help=f"also write the JSON to {RESULT_FILE}")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: no such file")
    args.data, args.run_dir = str(Path(args.data).resolve()), str(Path(args.run_dir).resolve())

    import torch

    from lightning_saferl.data.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_task(args.task)
    started = time.time()
    settings_of = {}
    for method in args.methods:
        ours = recipe_settings(method, class_defaults(method))
        if args.table_budget:
            ours.update(table_budget(method))
        for key in ("steps", "episodes", "eval_seed"):
            if getattr(args, key) is not None:
                ours[key] = getattr(args, key)
        settings_of[method] = ours
    units = [(method, seed) for method in args.methods for seed in args.seeds]
    # each unit's trainings are subprocesses: threads run `--jobs` of them at once
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(units, pool.map(lambda unit: run_seed(*unit, settings_of[unit[0]], args, spec), units)))
    scores = {m: {side: [done[m, s][side] for s in args.seeds] for side in ("ours", "osrl")} for m in args.methods}
    details: dict[str, Any] = {}
    for method in args.methods:
        ours = settings_of[method]
        last = done[method, args.seeds[-1]]  # the OSRL settings differ between seeds only in the seed
        details[method] = {"per_seed": [{k: v for k, v in done[method, seed].items()
                                         if k not in ("osrl_settings", "not_matched")} for seed in args.seeds],
                           "osrl_settings": last["osrl_settings"], "not_matched": last["not_matched"],
                           "steps": ours["steps"], "batch_size": ours["batch_size"], "episodes": ours["episodes"],
                           "eval_seed": ours["eval_seed"]}
    result = aggregate(scores, args.seeds)
    details["run"] = {"task": args.task, "data": str(args.data), "cost_limit": args.cost_limit,
                      "osrl_acting": args.osrl_acting, "threads": args.threads,
                      "minutes": (time.time() - started) / 60}
    details_file = Path(args.run_dir) / "details.json"
    details_file.write_text(json.dumps(details, indent=1) + "\n")
    print(f"[parity] per-seed scores, OSRL settings and what could not be matched: {details_file}")
    if args.write:
        RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULT_FILE.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))

if __name__ == "__main__":
    main()
