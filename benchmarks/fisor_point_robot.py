"""FISOR on PointRobot over training seeds and two datasets: the variant (fisor_guard), the published method and,
with ``--ablation``, each departure added in turn; against BC-All and BC-Safe on the same data.

    python benchmarks/fisor_point_robot.py [--seeds 0 1 2] [--datasets mixed scarce] [--start_seed 0]
                                           [--run_dir benchmarks/out/fisor_point_robot] [--jobs 1] [--quick]
                                           [--ablation] [--random_episodes 500]
                                           [--set stages.<stage>.<key>=<value> ...]
                                           [--bank benchmarks/bank/fisor_point_robot]
                                           [--table_json docs/results/fisor_point_robot.json [--table_only]]

Datasets (generated, data seed 0): ``mixed`` (the default data) and ``scarce`` (safe expert episodes <= 10 %;
figures with the suffix ``_scarce``). For every dataset and seed S, each recipe step runs as a pipeline
(``--seed_everything S --data.seed S``) in its own run directory, and BC-All / BC-Safe train with seed S. The steps:
the published recipe configs/fisor/point_robot.yaml (figures ``reference_*``), with ``--ablation`` the departures of
`ABLATION` added to it one after another (cumulative), and last the variant configs/fisor_guard/point_robot.yaml
(``--recipe``; ``--set`` values on top), whose figures carry no prefix. A step starts from a copy of the previous
step's run directory, so the stages whose config it does not change are reused (a change of acting settings only
re-evaluates). Per seed it measures:
  feasible_region_iou, shadow_recall, false_infeasible_rate   the variant's critic {V_h <= 0} against the oracle on the
                                 (v, theta) grid slices; with ``dataset_`` in front, on the dataset's own states.
                                 Shadow: oracle-infeasible states outside the hazards. The trivial rule
                                 "feasible iff h(s) <= 0" is scored beside (``trivial_*``; its shadow recall is 0).
  standard_start_violations      violating steps over the episodes from the standard start
  feasible_start_violation_rate  share of episodes from held-out oracle-feasible starts that ever violate, and
  goal_rate, return_mean         of each step, BC-All and BC-Safe from the same starts
  *_violation_rate_tight          the same on the *tight* starts only: feasible, but at most 3 of the oracle's 7
                                  braking manoeuvres escape (`escape_margin`), i.e. a nearly exact manoeuvre is
                                  needed; ``tight_start_fraction`` is their share of the starts
  random_start_cost              mean episode cost from ``--random_episodes`` random starts (episode seeds from
                                  RANDOM_START_SEED, the results table's stream), with ``random_start_return`` and the
                                  DSRL normalised cost of that mean at the task's limits 0 / 5 / 10
                                  (``random_start_normalized_cost@L``); costs are heavy-tailed, hence >= 500 episodes
  critic_greedy_violation_rate_tight  the feasibility critic alone on the tight starts: each step the lowest Q_h of
                                  512 uniform actions and the oracle's 7 braking actions (`greedy_violations`), no
                                  actor; 0 for a perfect action ranking. Beside it (``one_step_rule_*``) the same
                                  rollout ranked by h one step ahead (the dynamics' next state; no critic)
then every seed's figures, their mean and standard deviation, the ablation table (``--ablation``), and as the last
stdout line one JSON object (``ablation``: step -> figure -> mean and std over seeds).

Held-out starts: drawn from the evaluation stream ``EVALUATION_STREAM + start_seed``
(`lightning_saferl.envs.oracle.feasible_starts`), never used by data collection, and checked to contain no row of
the dataset. Reported figures use ``--start_seed 0``; tune with other start seeds (e.g. ``--start_seed 1``).
Re-running on the same run_dir reuses finished stages of the same config and retrains the stages whose config
changed (and those fed by them); each policy's figures are kept beside its checkpoint and reused while checkpoint,
package code, starts and episode counts are the same. ``--table_json`` writes the ablation table (every step and
BC-All / BC-Safe, per seed) for docs/gen_results.py; ``--table_only`` builds it from the kept figures alone.
``--bank DIR`` keeps every finished step's figures as small JSON files (with machine, date and commit) that are
committed, so that the 3-seed ablation (about 2.5 hours per seed on one core: 8 actors, each evaluated on 2520
episodes) resumes on a fresh machine from the steps a previous run finished, and ``--table_only --bank DIR`` builds
the table from them. BC checkpoints are named by seed, dataset and steps. Figures:
<run_dir>/<dataset>/seed<S>/feasible_region.png (the oracle's shadow hatched).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch

import lightning_saferl
from lightning_saferl import runs
from lightning_saferl.actors import BCAll, BCSafe
from lightning_saferl.callbacks.feasible_region import DEFAULT_SLICES, plot_feasible_region, region_scores
from lightning_saferl.data.collect import summarize
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.data.download import file_sha256
from lightning_saferl.data.tasks import get_task
from lightning_saferl.envs import point_robot as pr
from lightning_saferl.envs.oracle import (
    dataset_rows_among, escape_margin, feasibility_scores, feasible_starts, greedy_violations, is_feasible,
    one_step_hazard_rule,
)
from lightning_saferl.evaluation import EpisodeRunner
from lightning_saferl.pipeline import parse_args, print_table, run_pipeline, stage_conflicts
from lightning_saferl.policy import load_module

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPE = CONFIGS / "fisor_guard" / "point_robot.yaml"
REFERENCE_RECIPE = CONFIGS / "fisor" / "point_robot.yaml"
ACTOR = "stages.actor.model.init_args."
#: the published recipe's departures in the order the ablation adds them (each step keeps the earlier ones); after
#: the last one the ablation runs the variant's recipe, which adds the cost critic and its tie-break
ABLATION = (
    ("infeasible_temperature", (f"{ACTOR}infeasible_temperature=50.0",)),
    ("feasibility_margin", (f"{ACTOR}feasibility_margin=0.25",)),
    ("select_band", (f"{ACTOR}select_tolerance=0.05", f"{ACTOR}select_clearance=0.5")),
    ("proposals", (f"{ACTOR}uniform_proposals=512", f"{ACTOR}proposal_gain=0.005", f"{ACTOR}proposal_vertices=true")),
    ("ema_warmup_cosine_decay", (f"{ACTOR}ema_warmup=true", f"{ACTOR}cosine_decay_steps=6000")),
    ("bf16_actor", (f"stages.actor.trainer.precision={runs.bf16_if_native_cpu()}",)),
)
RANDOM_START_SEED = 2000  # episode seeds of the random starts: the results table's stream (2000, 2001, ...)
COST_LIMITS = (0.0, 5.0, 10.0)
#: the figures of each recipe step (per seed; the ablation table's columns)
STEP_KEYS = ("feasible_start_violation_rate", "feasible_start_violation_rate_tight",
             "feasible_start_violation_rate_other", "goal_rate", "return_mean", "random_start_cost",
             *(f"random_start_normalized_cost@{limit:g}" for limit in COST_LIMITS), "random_start_return",
             "standard_start_violations", "standard_start_goal_rate")
GRID = 101  # grid points per axis of each slice
TIGHT_MARGIN = 3  # a start is tight when at most this many of the oracle's 7 braking manoeuvres escape
SUMMARY_KEYS = ("feasible_start_violation_rate", "bc_safe_violation_rate", "bc_all_violation_rate",
                "feasible_start_violation_rate_tight", "bc_safe_violation_rate_tight",
                "critic_greedy_violation_rate_tight",
                "feasible_start_violation_rate_other", "bc_safe_violation_rate_other", "goal_rate",
                "bc_safe_goal_rate", "bc_all_goal_rate", "return_mean", "bc_safe_return_mean", "shadow_recall",
                "false_infeasible_rate", "feasible_region_iou", "dataset_shadow_recall",
                "dataset_false_infeasible_rate", "standard_start_violations", "standard_start_goal_rate",
                "random_start_cost", "bc_safe_random_start_cost", "bc_all_random_start_cost",
                "reference_feasible_start_violation_rate", "reference_goal_rate", "reference_random_start_cost",
                "reference_standard_start_violations")


def dataset_figures(data: OfflineDataModule) -> dict:
    """Episodes, returns, costs, unsafe and goal-reaching shares of the dataset, and the oracle on its states."""
    t = data.load()
    arrays = {"rewards": t.rewards.numpy(), "costs": t.costs.numpy(), "terminals": t.terminals.numpy(),
              "timeouts": t.timeouts.numpy()}
    stats = summarize(arrays)
    ends = np.flatnonzero((arrays["terminals"] > 0) | (arrays["timeouts"] > 0))
    final_states = pr.state_from_observation(t.next_observations[ends].double())
    stats["goal_episode_share"] = float(pr.reached_goal(final_states).sum()) / stats["episodes"]
    states = pr.state_from_observation(t.observations.double())
    return {"stats": stats, "observations": t.observations, "oracle": is_feasible(states),
            "hazard": pr.in_hazard(states)}


def train_bc(cls, steps: int, seed_dir: Path, seed: int, behavior: str):
    """BC-All / BC-Safe with seed `seed` on the dataset `behavior`, and its checkpoint (named by class and steps)."""
    path = seed_dir / f"{cls.__name__.lower()}_steps{steps}.ckpt"
    if path.exists():
        return load_module(str(path)), path
    L.seed_everything(seed)
    model = cls(obs_dim=pr.OBS_DIM, act_dim=pr.ACT_DIM)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=OfflineDataModule(task=pr.ENV_ID, batch_size=256, seed=seed, behavior=behavior))
    trainer.save_checkpoint(path, weights_only=True)
    return model, path


def recipe_steps(args) -> list[tuple[str, str, list[str]]]:
    """(name, recipe, settings) of every step: the published recipe, with --ablation each departure added in turn,
    then the variant (--set on top)."""
    steps, settings = [("published", args.reference_recipe, [])], []
    if args.ablation:
        for name, added in ABLATION:
            settings = settings + list(added)
            steps.append((f"+{name}", args.reference_recipe, settings))
    return steps + [("fisor_guard", args.recipe, list(args.set))]


def train_step(recipe: str, settings: list[str], step_dir: Path, seed: int, behavior: str, args):
    """Run one recipe step's pipeline in `step_dir` and return its trained actor (eval mode)."""
    pipeline_args = ["--config", recipe, "--run_dir", str(step_dir), "--seed_everything", str(seed),
                     "--data.seed", str(seed), "--data.behavior", behavior,
                     # the pipeline's own summary (step_dir/summary.json) with the README table's protocol
                     "--evaluation.episodes", "100", "--evaluation.num_envs", "50",
                     "--evaluation.seed", str(RANDOM_START_SEED),
                     "--evaluation.reset_options", json.dumps({"random_start": True})]
    # --quick: the smoke budget (5 steps per stage) would lose to a max_steps setting (the command line wins)
    pipeline_args += [f"--{setting}" for setting in settings
                      if not (args.quick and setting.partition("=")[0].endswith(".max_steps"))]
    if args.quick:
        pipeline_args.append("--smoke")
    config = parse_args(pipeline_args)
    changed = stage_conflicts(config)  # stages cached for another config (e.g. an edited recipe) train afresh
    if changed:
        print(f"[benchmark] {step_dir}: retraining stages of a changed config: {changed}")
        config = parse_args(pipeline_args + ["--restart", *changed])
    run_pipeline(config)
    return load_module(str(step_dir / "actor" / "model.ckpt")).eval()


def policy_figures(policy, data: dict, args) -> dict:
    """Standard-start, held-out feasible-start and random-start figures of one policy (`STEP_KEYS`)."""
    standard = EpisodeRunner(pr.ENV_ID, episodes=args.standard_episodes, num_envs=args.standard_episodes,
                             seed=args.start_seed).run_episodes(policy)
    feasible = EpisodeRunner(pr.ENV_ID, episodes=len(data["starts"]), num_envs=100, seed=args.start_seed,
                             reset_options=data["starts"]).run_episodes(policy)
    random = EpisodeRunner(pr.ENV_ID, episodes=args.random_episodes, num_envs=100, seed=RANDOM_START_SEED,
                           reset_options={"random_start": True}).run_episodes(policy)
    violated = feasible["violations"] > 0
    tight = data["escape_margin"] <= TIGHT_MARGIN
    spec = get_task(pr.ENV_ID)

    def rate_on(where: np.ndarray) -> float:
        return float(violated[where].mean()) if where.any() else float("nan")
    cost = float(random["cost"].mean())
    return {
        "standard_start_episodes": int(len(standard["index"])),
        "standard_start_violations": int(standard["violations"].sum()),
        "standard_start_goal_rate": float(standard["success"].mean()),
        "feasible_start_violation_rate": float(violated.mean()),
        "feasible_start_violation_rate_tight": rate_on(tight), "feasible_start_violation_rate_other": rate_on(~tight),
        "goal_rate": float(feasible["success"].mean()), "return_mean": float(feasible["return"].mean()),
        "random_start_cost": cost, "random_start_return": float(random["return"].mean()),
        **{f"random_start_normalized_cost@{limit:g}": float(spec.normalized_cost(cost, limit))
           for limit in COST_LIMITS},
    }


def _sha256(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _starts_sha256(data: dict) -> str:
    return hashlib.sha256(json.dumps(data["starts"]).encode()).hexdigest()


PACKAGE_SHA256 = _sha256(sorted(Path(lightning_saferl.__file__).parent.rglob("*.py")))


def cached_figures(checkpoint: Path, data: dict, args, compute) -> dict:
    """`compute()` (a policy's `policy_figures`), kept in ``<checkpoint>.figures.json`` and reused while the
    checkpoint, the package's code, the held-out starts and the episode counts are the same: an interrupted
    benchmark resumes with its evaluations, not only its training."""
    key = {"checkpoint_sha256": _sha256([checkpoint]), "package_sha256": PACKAGE_SHA256,
           "starts_sha256": _starts_sha256(data),
           **{name: getattr(args, name) for name in ("start_seed", "standard_episodes", "random_episodes")}}
    path = checkpoint.with_name(checkpoint.name + ".figures.json")
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["figures"]
    figures = compute()
    path.write_text(json.dumps({"key": key, "figures": figures}, indent=1))
    return figures


def _git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or "unknown" outside a git checkout."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _bank_key(starts_sha256: Optional[str], args, settings, recipes=()) -> dict:
    """What banked figures must match to be reused: the step's settings and recipe files (sha256 of their text), the
    held-out starts and the episode counts. The package's code is not in it (the commit is kept beside the figures):
    after a change of what a step learns or how it acts, delete the step's files (and ``seed.json``) to rerun it."""
    return {"settings": list(settings), "recipes_sha256": [file_sha256(recipe) for recipe in recipes],
            "starts_sha256": starts_sha256,
            **{name: getattr(args, name) for name in ("start_seed", "standard_episodes", "random_episodes", "bc_steps",
                                                       "quick")}}


def _seed_bank_key(starts_sha256: Optional[str], args) -> dict:
    """The key of a whole seed in the bank: every step's name, the variant's settings, both recipes."""
    return _bank_key(starts_sha256, args, [step for step, _, _ in recipe_steps(args)] + list(args.set),
                     (args.reference_recipe, args.recipe))


def _bank_path(args, behavior: str, seed: int, name: str) -> Path:
    return Path(args.bank) / behavior / f"seed{seed}" / f"{name.lstrip('+')}.json"


def banked(args, behavior: str, seed: int, name: str, key: dict) -> Optional[dict]:
    """Figures of (dataset, seed, step) kept in ``--bank`` by an earlier run with the same `key`, else None."""
    if args.bank is None:
        return None
    path = _bank_path(args, behavior, seed, name)
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    return stored["figures"] if stored["key"] == key else None


def bank(args, behavior: str, seed: int, name: str, key: dict, figures: dict) -> None:
    """Keep `figures` in ``--bank`` (a folder meant to be committed: small JSON, with the machine, date and package
    commit that produced them), so that a later run on a fresh machine resumes the benchmark without retraining."""
    if args.bank is None:
        return
    path = _bank_path(args, behavior, seed, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "machine": f"{runs.cpu_model()}, {os.cpu_count()} cores",
                                "date": time.strftime("%Y-%m-%d"), "commit": _git_commit(),
                                "figures": figures}, indent=1) + "\n")


def _copy_run(source: Path, target: Path) -> None:
    """Start `target` from `source`'s finished stages (not its lock, summary or figures) unless it exists already."""
    if source.exists() and not target.exists():
        shutil.copytree(source, target,
                        ignore=shutil.ignore_patterns(".pipeline.lock", "summary.json", "*.figures.json"))


def run_seed(seed: int, behavior: str, data: dict, args, run_dir: Path) -> dict:
    """Every recipe step, the BC baselines and every figure of one (seed, dataset); `data` from `prepare_dataset`."""
    started = time.time()
    seed_dir = run_dir / behavior / f"seed{seed}"

    def figures_of(policy, checkpoint: Path) -> dict:
        def evaluate() -> dict:
            L.seed_everything(seed)  # the policy's own sampling
            return policy_figures(policy.eval(), data, args)
        return cached_figures(checkpoint, data, args, evaluate)
    starts_sha256 = _starts_sha256(data)
    seed_key = _seed_bank_key(starts_sha256, args)
    whole = banked(args, behavior, seed, "seed", seed_key)
    if whole is not None:
        print(f"[benchmark] {behavior} seed {seed}: every figure from the bank {args.bank}")
        return whole
    steps, previous = {}, None
    for name, recipe, settings in recipe_steps(args):
        step_dir = seed_dir / name.lstrip("+")
        key = _bank_key(starts_sha256, args, settings, (recipe,))
        # the variant's actor is needed below (its critic's figures), so its step always runs
        steps[name] = None if name == "fisor_guard" else banked(args, behavior, seed, name, key)
        if steps[name] is not None:
            print(f"[benchmark] {behavior} seed {seed}: {name} from the bank {args.bank}")
            previous = step_dir if step_dir.exists() else None
            continue
        if previous is not None:
            _copy_run(previous, step_dir)
        actor = train_step(recipe, settings, step_dir, seed, behavior, args)
        steps[name] = figures_of(actor, step_dir / "actor" / "model.ckpt")
        bank(args, behavior, seed, name, key, steps[name])
        print_table(steps[name], f"PointRobot, dataset '{behavior}', seed {seed}: {name}")
        previous = step_dir
    critic = actor.feasibility_critic  # the variant's (the last step)
    with torch.no_grad():
        value_fn = lambda obs: critic.value(obs)  # noqa: E731
        _, ious = plot_feasible_region(value_fn, DEFAULT_SLICES, GRID, str(seed_dir / "feasible_region.png"))
        grid = region_scores(value_fn, DEFAULT_SLICES, GRID)
        on_data = feasibility_scores(critic.feasible(data["observations"]), data["oracle"], data["hazard"])
        critic_greedy = greedy_violations(critic.q_value, data["tight_starts"]).float().mean()  # nan without any
    baselines, key = {}, _bank_key(starts_sha256, args, [])
    for name, cls in (("bc_all", BCAll), ("bc_safe", BCSafe)):
        baselines[name] = banked(args, behavior, seed, name, key)
        if baselines[name] is None:
            baselines[name] = figures_of(*train_bc(cls, args.bc_steps, seed_dir, seed, behavior))
            bank(args, behavior, seed, name, key, baselines[name])
    variant, reference = steps["fisor_guard"], steps["published"]
    result = {
        **variant,
        "feasible_region_iou": grid["iou"], "feasible_region_iou_per_slice": [round(x, 4) for x in ious],
        "shadow_recall": grid["shadow_recall"], "false_infeasible_rate": grid["false_infeasible_rate"],
        "dataset_feasible_region_iou": on_data["iou"], "dataset_shadow_recall": on_data["shadow_recall"],
        "dataset_false_infeasible_rate": on_data["false_infeasible_rate"],
        "critic_greedy_violation_rate_tight": float(critic_greedy),
        **{f"{name}_{key}": figures[key] for name, figures in baselines.items()
           for key in ("goal_rate", "random_start_cost", "random_start_return")},
        **{f"{name}_violation_rate{part}": figures[f"feasible_start_violation_rate{part}"]
           for name, figures in baselines.items() for part in ("", "_tight", "_other")},
        "bc_all_return_mean": baselines["bc_all"]["return_mean"],
        "bc_safe_return_mean": baselines["bc_safe"]["return_mean"],
        **{f"reference_{key}": value for key, value in reference.items()},
        "steps": steps,
        "minutes": (time.time() - started) / 60,
    }
    bank(args, behavior, seed, "seed", seed_key, result)
    return result


def prepare_dataset(behavior: str, args) -> dict:
    """The dataset's figures and oracle labels, the held-out starts (checked), and the trivial rule's scores."""
    datamodule = OfflineDataModule(task=pr.ENV_ID, behavior=behavior)
    datamodule.prepare_data()
    data = dataset_figures(datamodule)
    start_states = feasible_starts(args.feasible_episodes, args.start_seed)
    overlap = dataset_rows_among(start_states, data["observations"])
    if overlap:
        raise RuntimeError(f"{overlap} held-out evaluation starts are rows of the {behavior} dataset")
    data["starts"] = [{"state": s.tolist()} for s in start_states]
    data["escape_margin"] = escape_margin(start_states).numpy()
    data["tight_starts"] = start_states[torch.from_numpy(data["escape_margin"] <= TIGHT_MARGIN)]
    one_step = greedy_violations(one_step_hazard_rule, data["tight_starts"])
    data["one_step_rule_greedy"] = float(one_step.float().mean())
    with torch.no_grad():
        data["trivial_grid"] = region_scores(lambda obs: -obs[:, 5::3].min(dim=-1).values + pr.HAZARD_RADIUS,
                                             DEFAULT_SLICES, GRID)  # h(s) = radius - nearest hazard distance
    data["trivial_data"] = feasibility_scores(~data["hazard"], data["oracle"], data["hazard"])
    print_table(data["stats"], f"PointRobot dataset '{behavior}' (100k transitions, data seed 0)")
    return data


def _run_unit(unit: tuple) -> dict:
    """One (seed, dataset) in a worker process (one thread each when several share the cores)."""
    if unit[3].jobs > 1:
        torch.set_num_threads(1)
    return run_seed(*unit)


def summarize_dataset(behavior: str, data: dict, per_seed: dict, seeds: list[int]) -> dict:
    """Every seed's figures, their mean and std (printed); returns the JSON figures (keys without suffix)."""
    summary = {}
    for key in SUMMARY_KEYS:
        values = [per_seed[s][key] for s in seeds]
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    print_table({**{f"{k} (seeds {seeds})": [round(per_seed[s][k], 4) for s in seeds] for k in SUMMARY_KEYS},
                 **{f"{k} (mean +- std)": f"{summary[k + '_mean']:.4g} +- {summary[k + '_std']:.2g}"
                    for k in SUMMARY_KEYS}},
                f"FISOR on PointRobot, dataset '{behavior}': per seed and over seeds")
    ablation = {}
    for step in per_seed[seeds[0]]["steps"]:
        figures = {key: [per_seed[s]["steps"][step][key] for s in seeds] for key in STEP_KEYS}
        ablation[step] = {**{f"{key}_mean": statistics.fmean(v) for key, v in figures.items()},
                          **{f"{key}_std": statistics.stdev(v) if len(v) > 1 else 0.0 for key, v in figures.items()},
                          "standard_start_violations_max": max(figures["standard_start_violations"])}
    print_table({step: "  ".join(f"{key} {row[key + '_mean']:.4g} +- {row[key + '_std']:.2g}" for key in STEP_KEYS)
                 for step, row in ablation.items()},
                f"PointRobot, dataset '{behavior}': recipe steps (mean +- std over seeds {seeds})")
    return {
        **summary,
        "ablation": ablation,
        "standard_start_violations_max": max(per_seed[s]["standard_start_violations"] for s in seeds),
        "feasible_start_episodes": len(data["starts"]),
        "tight_start_fraction": float((data["escape_margin"] <= TIGHT_MARGIN).mean()),
        "trivial_shadow_recall": data["trivial_grid"]["shadow_recall"],
        "trivial_false_infeasible_rate": data["trivial_grid"]["false_infeasible_rate"],
        "trivial_feasible_region_iou": data["trivial_grid"]["iou"],
        "trivial_dataset_shadow_recall": data["trivial_data"]["shadow_recall"],
        "one_step_rule_greedy_violation_rate_tight": data["one_step_rule_greedy"],
        "dataset_stats": data["stats"],
        "per_seed": per_seed,
        "minutes_per_seed": statistics.fmean(per_seed[s]["minutes"] for s in seeds),
    }


#: the ablation table's columns: (title, STEP_KEYS figure, scale, unit)
TABLE_COLUMNS = (
    ("violating from held-out feasible starts", "feasible_start_violation_rate", 100, "%"),
    ("of the tight ones", "feasible_start_violation_rate_tight", 100, "%"),
    ("of the others", "feasible_start_violation_rate_other", 100, "%"),
    ("goal rate from them", "goal_rate", 1, ""),
    ("random starts: mean episode cost", "random_start_cost", 1, ""),
    *((f"normalised cost at limit {limit:g}", f"random_start_normalized_cost@{limit:g}", 1, "")
      for limit in COST_LIMITS),
    ("random starts: return", "random_start_return", 1, ""),
    ("standard start: violating steps", "standard_start_violations", 1, ""),
    ("standard start: goal rate", "standard_start_goal_rate", 1, ""),
)


def _cell(values: list[float], unit: str) -> dict:
    digits = 2 if unit == "%" else 3  # percentages of 2000 starts move in steps of 0.05
    shown = [round(v, digits) for v in values]  # the mean and std of the figures as shown
    cell = {"seeds": shown, "mean": round(statistics.fmean(shown), digits),
            "std": round(statistics.stdev(shown), digits) if len(shown) > 1 else 0.0}
    return {**cell, "unit": unit} if unit else cell


def ablation_table(run_dir: Path, behavior: str, seeds: list[int], args) -> dict:
    """The docs' plain table (`docs/gen_results.py`) of every recipe step and BC-All / BC-Safe, one row each, from
    ``--bank`` if given, else from the figures kept beside their checkpoints in `run_dir` (`cached_figures`);
    per-seed values, mean and std."""
    # row title -> (name in the bank, its bank key but the starts, checkpoint in a seed's run directory)
    sources = {name: (name.lstrip("+"), _bank_key(None, args, settings, (recipe,)),
                      lambda seed_dir, step=name.lstrip("+"): seed_dir / step / "actor" / "model.ckpt")
               for name, recipe, settings in recipe_steps(args)}
    for label, name, cls in (("BC-All", "bc_all", BCAll), ("BC-Safe", "bc_safe", BCSafe)):
        sources[f"{label} ({args.bc_steps} steps)"] = \
            (name, _bank_key(None, args, []),
             lambda seed_dir, cls=cls: seed_dir / f"{cls.__name__.lower()}_steps{args.bc_steps}.ckpt")
    rows, starts = [], set()
    for title, (name, key, checkpoint) in sources.items():
        figures = []
        for seed in seeds:
            if args.bank is not None:
                path = _bank_path(args, behavior, seed, name)
                if not path.exists():
                    raise FileNotFoundError(f"{path}: no banked figures for '{title}', seed {seed}; run the benchmark "
                                            f"with --bank {args.bank} first")
                stored = json.loads(path.read_text())
                starts.add(stored["key"]["starts_sha256"])
                differing = sorted(k for k in key if k != "starts_sha256" and stored["key"].get(k) != key[k])
                if differing or len(starts) > 1:
                    raise ValueError(f"{path}: banked for other {differing or 'held-out starts'} than this table's "
                                     f"(its key: {stored['key']}); run the benchmark with --bank {args.bank} again")
                figures.append(stored["figures"])
                continue
            model = checkpoint(run_dir / behavior / f"seed{seed}")
            path = model.with_name(model.name + ".figures.json")
            stored = json.loads(path.read_text()) if path.exists() and model.exists() else None
            if stored is None or stored["key"].get("checkpoint_sha256") != _sha256([model]):
                raise FileNotFoundError(f"{path}: no figures of the checkpoint beside it for '{title}', seed {seed}; "
                                        f"run the benchmark first")
            figures.append(stored["figures"])
        rows.append([title, *(_cell([f[key] * scale for f in figures], unit) for _, key, scale, unit in TABLE_COLUMNS)])
    return {"columns": ["recipe step", *(title for title, _, _, _ in TABLE_COLUMNS)], "rows": rows}


def write_table_json(path: Path, run_dir: Path, seeds: list[int], args) -> None:
    """`ablation_table` with its title, machine, date, command and protocol as ``tables.ablation`` of `path` (other
    tables in the file are kept)."""
    document = json.loads(path.read_text()) if path.exists() else {"tables": {}}
    document["tables"]["ablation"] = {
        "title": f"FISOR (published) to FISOR-Guard on PointRobot, one departure at a time, {len(seeds)} seeds",
        "machine": f"{runs.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/fisor_point_robot.py --seeds {' '.join(map(str, seeds))} --datasets mixed "
                   f"--ablation" + (f" --bank {args.bank}" if args.bank else ""),
        "protocol": f"Each step adds one departure to the published recipe (the ones before it kept); the last row "
                    f"but two is the variant's recipe. {args.feasible_episodes} held-out feasible starts "
                    f"(evaluation stream {args.start_seed}), {args.random_episodes} random starts (episode seeds "
                    f"{RANDOM_START_SEED}..), {args.standard_episodes} standard-start episodes; per seed "
                    f"({', '.join(map(str, seeds))}), mean and sample std.",
        **ablation_table(run_dir, "mixed", seeds, args)}
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"[benchmark] wrote tables.ablation of {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--datasets", nargs="+", choices=("mixed", "scarce"), default=["mixed", "scarce"])
    parser.add_argument("--start_seed", type=int, default=0,
                        help="evaluation-start stream: 0 for reported figures, others for tuning")
    parser.add_argument("--run_dir", default="benchmarks/out/fisor_point_robot")
    parser.add_argument("--recipe", default=str(RECIPE), help="the variant's recipe (default: %(default)s)")
    parser.add_argument("--reference_recipe", default=str(REFERENCE_RECIPE),
                        help="the published method's recipe (default: %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="pipeline settings over the variant's recipe (default: none, the recipe as it is, i.e. the "
                             "README's quick start)")
    parser.add_argument("--ablation", action="store_true",
                        help="between the published recipe and the variant, add the departures of ABLATION in turn")
    parser.add_argument("--random_episodes", type=int, default=500,
                        help="random-start episodes per policy and seed (costs are heavy-tailed: at least 500)")
    parser.add_argument("--quick", action="store_true", help="pipeline --smoke and few episodes (a check only)")
    parser.add_argument("--bc_steps", type=int, default=5000)
    parser.add_argument("--standard_episodes", type=int, default=20)
    parser.add_argument("--feasible_episodes", type=int, default=2000,
                        help="held-out feasible starts; at 500 the 3-seed mean of a ~1 %% rate has a standard error of "
                             "~0.3 points")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(seed, dataset) runs in this many worker processes (one thread each when > 1)")
    parser.add_argument("--table_json", type=Path, default=None,
                        help="also write the ablation table (every step, BC-All, BC-Safe; dataset 'mixed') as a "
                             "docs/results JSON file (key tables.ablation)")
    parser.add_argument("--bank", default=None,
                        help="a folder of small JSON files, one per (dataset, seed, step), meant to be committed: each "
                             "finished step's figures are kept there and a step found there with the same settings, "
                             "starts and episode counts is not run again (the variant's step and the critic figures "
                             "run until the whole seed is banked), so the benchmark resumes on a fresh machine")
    parser.add_argument("--table_only", action="store_true",
                        help="with --table_json: build the table from the figures already in --run_dir, run nothing")
    args = parser.parse_args()
    malformed = [setting for setting in args.set if "=" not in setting or setting.startswith("-")]
    if malformed:
        parser.error(f"--set takes KEY=VALUE pipeline settings (e.g. stages.actor.trainer.max_steps=100), got {malformed}")
    if args.quick:
        args.standard_episodes, args.feasible_episodes, args.bc_steps, args.random_episodes = 2, 4, 5, 4
    run_dir = Path(args.run_dir)
    if args.table_only:
        if args.table_json is None:
            parser.error("--table_only needs --table_json")
        write_table_json(args.table_json, run_dir, args.seeds, args)
        return
    data = {behavior: prepare_dataset(behavior, args) for behavior in args.datasets}
    units = [(seed, behavior, data[behavior], args, run_dir)
             for behavior in args.datasets for seed in args.seeds]
    figures, failed = {}, []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_unit, unit): unit[:2] for unit in units}
        for future in as_completed(futures):
            seed, behavior = futures[future]
            try:
                figures[seed, behavior] = future.result()
            except Exception:  # one failed run must not lose the others: reported, left out of the means
                failed.append(f"{behavior}/seed{seed}")
                print(f"[benchmark] {behavior} seed {seed} FAILED:\n{traceback.format_exc()}", flush=True)
                continue
            print_table({k: v for k, v in figures[seed, behavior].items() if k != "steps"},
                        f"FISOR on PointRobot, dataset '{behavior}', seed {seed}")
    results = {"seeds": args.seeds, "start_seed": args.start_seed, "settings": args.set, "failed": failed}
    for behavior in args.datasets:
        seeds = [seed for seed in args.seeds if (seed, behavior) in figures]
        if not seeds:
            continue
        suffix = "" if behavior == "mixed" else f"_{behavior}"
        per_seed = {seed: figures[seed, behavior] for seed in seeds}
        summary = summarize_dataset(behavior, data[behavior], per_seed, seeds)
        results.update({f"{k}{suffix}": v for k, v in {"seeds": seeds, **summary}.items()})
    if args.table_json is not None and "mixed" in args.datasets and not failed:
        write_table_json(args.table_json, run_dir, args.seeds, args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
