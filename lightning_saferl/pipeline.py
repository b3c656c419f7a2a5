"""`lightning-saferl pipeline`: run a recipe's stages in order, then evaluate the final policy.

A recipe is a YAML file:

    algorithm: fisor
    seed_everything: 0
    data: {task: PointRobot-v0, ...}            # OfflineDataModule arguments shared by all stages
    trainer: {...}                               # Trainer arguments shared by all stages
    checkpoint_every_n_steps: 1000               # a stage's checkpoints/last.ckpt is refreshed this often
    parallel_stages: 1                           # > 1: independent stages train at once in worker processes
    stages:                                      # run in this order
      feasibility_critic:
        model: {class_path: lightning_saferl.critics.FeasibilityCritic, init_args: {...}}
        trainer: {max_steps: 20000}              # per-stage Trainer overrides
        data: {batch_size: 256}                  # per-stage OfflineDataModule overrides
      actor:
        model: {class_path: lightning_saferl.actors.FisorActor, init_args: {...}}
        inputs: {feasibility_critic: feasibility_critic}   # init argument <- trained module of an earlier stage
    evaluation: {episodes: 20, num_envs: 20, seed: 0, reset_options: null, cost_limits: [10, 20, 40]}
    cost_limit: 10                               # the budget this run trains for (limit-dependent methods) ...
    cost_limit_fields: [stages.actor.model.init_args.cost_limit]   # ... copied into these fields

Cost limits: the summary reports `normalized_cost@L` and `safe@L` (normalised cost <= 1) for every L in
`evaluation.cost_limits` (one value or a list; else the old one-value `evaluation.cost_limit`); default
`[cost_limit]` when the recipe sets one, else the task family's limits (`TaskSpec.cost_limits`). `cost_limit` /
`normalized_cost` in the summary refer to the first of them. `cost_limit_fields` names the recipe fields that
follow `cost_limit` (dotted paths), or maps them to a multiple of it (`{...cost_slack: 0.5}`), so one recipe serves
every limit: `--cost_limit 20` retrains for 20 (`lightning-saferl sweep` does this per cell).

Recipes are read in OmegaConf mode: `${...}` interpolates other values of the same file
(e.g. `max_steps: ${trainer.max_steps}` in a stage), and `${bf16_if_native_cpu:}` is "bf16-mixed" on a CPU that
multiplies bf16 natively, else "32-true" (`runs.bf16_if_native_cpu`; the stage's config records the value).

Precedence, lowest first: the recipe's shared `trainer`/`data`, the stage's own `trainer`/`data`, `--smoke`,
the command line's shared `--trainer.KEY` / `--data.KEY` (or `--trainer '{...}'`), and last
`--stages.<name>.<section>.<key>` (section: model, trainer, data, inputs), which changes that one key of one stage.
Values are typed by the Trainer / model / OfflineDataModule signatures; the command line wins whatever its
position relative to `--config`.

Before anything trains, the dataset of every stage is read and validated and every stage's config is checked
(unknown options, model init arguments, inputs, training length, cost limits; each model is built once, its
constructor and `SafeRLModule.check_settings` judging its values), so a mistake in the last stage fails at once.
A `class_path` outside `TRUSTED_PACKAGES` is imported only if its module's source (read, not run) defines it.
Each stage trains exactly as `fit --trainer.default_root_dir <run_dir>/<stage>` does (`lightning_saferl.runs`):
logs, `config.yaml`, `run_info.json` and `checkpoints/last.ckpt` in `<run_dir>/<stage>/lightning_logs/version_N/`
(a new N per start), and at the end `<run_dir>/<stage>/model.ckpt`. Re-running on the same run directory loads a
finished stage and resumes an interrupted one from its newest `last.ckpt`, so it continues a killed run. Every
checkpoint holds the stage's resolved config and its hash (`runs.CONFIG_KEY`; seed and the hashes of the stages
it takes inputs from included, display-only keys `runs.RESULT_NEUTRAL_KEYS` left out): a checkpoint is reused
only for the same config, otherwise the run stops naming the changed keys, and `--restart STAGE ...` trains those
stages (and the stages that take their output) afresh. A model's acting-only settings
(`SafeRLModule.acting_hparams`, e.g. FisorActor's candidate choice) are not part of that config: a finished stage is
reused with the recipe's values, which are written into its model.ckpt. While it runs, a pipeline holds a lock on
its run directory (`.pipeline.lock`): a second one on the same directory stops at once; a training stage holds
`<stage>/.stage.lock`, so a rerun refuses while a stage worker of an ended pipeline still trains. Lock files are
never written through a link. Stage workers end with their pipeline however it ends (SIGTERM, SIGKILL: each saves
its last.ckpt); a pipeline stopped by SIGTERM says to rerun the same command, which resumes. The run directory also
holds the resolved recipe (`config.yaml`), `run_info.json` (seed, package versions) and `summary.json`
(evaluation of the final policy).
"""
from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import importlib
import importlib.machinery
import inspect
import json
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Callable, Optional, Union

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt
from tqdm import tqdm

from lightning_saferl.base import NonFiniteLossError, SafeRLModule
from lightning_saferl.callbacks import LastCheckpoint
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.errors import InputError, UnknownNameError
from lightning_saferl.policy import load_module, read_checkpoint
from lightning_saferl.runs import (RunRecord, atomic_write_text, check_training_length, config_changes, config_record,
                                   latest_checkpoint, register_resolvers, stored_record, trainer_arguments,
                                   write_run_info)


SMOKE_STEPS = 5
SMOKE_EPISODES = 2
STAGE_KEYS = ("model", "trainer", "data", "inputs")
#: OfflineDataModule arguments that decide which dataset is read (the others only change the sampling)
DATASET_KEYS = ("task", "path", "cache_dir", "num_transitions", "scale_reward", "download", "behavior")


def build_parser() -> ArgumentParser:
    register_resolvers()
    parser = ArgumentParser(prog="lightning-saferl pipeline", description=__doc__.split("\n")[0],
                            default_meta=False, exit_on_error=False, parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="recipe YAML (several compose in order; ${...} interpolation within a file)")
    parser.add_argument("--algorithm", type=str, default="custom", help="name recorded in the summary")
    parser.add_argument("--run_dir", type=Optional[str], default=None,
                        help="run directory (default runs/<algorithm>-<task>-<time>); reuse it to resume")
    parser.add_argument("--smoke", action=ActionYesNo, default=False,
                        help=f"{SMOKE_STEPS} steps per stage and {SMOKE_EPISODES} evaluation episodes")
    parser.add_argument("--seed_everything", type=int, default=0)
    parser.add_argument("--parallel_stages", type=PositiveInt, default=1,
                        help="train up to this many stages at once, in worker processes (a stage starts when the "
                             "stages it takes inputs from are finished; this process's torch threads are shared "
                             "among those running, anew whenever one starts or ends; at most one worker per thread; "
                             "none when a stage runs on several devices or nodes)")
    parser.add_argument("--checkpoint_every_n_steps", type=PositiveInt, default=1000,
                        help="each stage refreshes checkpoints/last.ckpt this often (and at the end and on SIGTERM)")
    parser.add_argument("--restart", nargs="+", type=str, default=[], metavar="STAGE",
                        help="stages to train afresh although the run directory holds a checkpoint of a different "
                             "config (the stages that take their output restart too)")
    parser.add_class_arguments(OfflineDataModule, "data")
    _add_trainer_arguments(parser)
    parser.set_defaults({"trainer.num_sanity_val_steps": 0, "trainer.limit_val_batches": 0})
    parser.add_argument("--stages", type=dict, required=True, help="name -> {model, trainer, data, inputs}")
    parser.add_argument("--overrides", type=list[str], default=[],
                        help="command-line --trainer.*, --data.* and --stages.<name>.* values, applied to every "
                             "stage after the recipe (`lightning-saferl pipeline` fills this in)")
    parser.add_argument("--evaluation.episodes", type=PositiveInt, default=20)
    parser.add_argument("--evaluation.num_envs", type=PositiveInt, default=20)
    parser.add_argument("--evaluation.seed", type=int, default=0)
    parser.add_argument("--evaluation.reset_options", type=Optional[dict], default=None)
    parser.add_argument("--evaluation.cost_limit", type=Optional[float], default=None,
                        help="one limit of the normalized cost (old spelling of evaluation.cost_limits)")
    parser.add_argument("--evaluation.cost_limits", type=Optional[Union[float, list[float]]], default=None,
                        help="limits the summary scores the policy at (default [cost_limit], else the task family's)")
    parser.add_argument("--cost_limit", type=Optional[float], default=None,
                        help="the cost budget this run trains for, copied into cost_limit_fields")
    parser.add_argument("--cost_limit_fields", type=Union[list[str], dict[str, float]], default=[],
                        help="recipe fields (dotted paths) set to cost_limit, or a mapping field -> multiple of it")
    return parser


def _add_trainer_arguments(parser: ArgumentParser) -> None:
    """Trainer arguments as LightningCLI declares them: typed, not instantiated (the run builds the Trainer)."""
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, sub_configs=True, fail_untyped=False,
                               skip={"default_root_dir"})


def _stage_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, default_meta=False)
    parser.add_subclass_arguments(SafeRLModule, "model", required=True)
    _add_trainer_arguments(parser)
    parser.add_class_arguments(OfflineDataModule, "data")
    parser.add_argument("--inputs", type=dict, default={})
    return parser


def _options(argv: list[str]) -> list[list[str]]:
    """Command-line arguments grouped as [option] or [option, value] (a value never starts with '--')."""
    groups, i = [], 0
    while i < len(argv):
        n = 2 if "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
        groups.append(argv[i:i + n])
        i += n
    return groups


def _option_name(group: list[str]) -> str:
    return group[0].partition("=")[0]


def parse_args(argv: list[str]) -> Namespace:
    """The pipeline's config from a command line. Its `--trainer*`, `--data*` and `--stages.<name>.*` values are
    also kept in `overrides`, which each stage applies after its recipe values (precedence: module docstring)."""
    configs, rest, overrides = [], [], []
    for group in _options(argv):
        name = _option_name(group)
        if name == "--config":
            configs += group
        elif name.startswith("--stages."):
            overrides += group
        else:
            rest += group
            if name.split(".")[0] in ("--trainer", "--data"):
                overrides += group
    cfg = build_parser().parse_args([*configs, *rest])  # recipe files first: the command line wins
    for group in _options(overrides):
        parts = _option_name(group).split(".")
        if parts[0] == "--stages" and (len(parts) < 4 or parts[1] not in cfg.stages):
            raise UnknownNameError(f"{_option_name(group)}: expected --stages.<name>.<section>.<key> with a stage "
                                   f"of the recipe ({', '.join(cfg.stages)})")
    cfg.overrides = [*cfg.overrides, *overrides]
    return cfg


def _stage_overrides(overrides: list[str], name: str) -> tuple[list[str], dict[str, str]]:
    """(arguments for the stage parser, inputs to set) from `overrides`: the shared ones, then this stage's."""
    shared, own, inputs = [], [], {}
    for group in _options(overrides):
        option = _option_name(group)
        if not option.startswith("--stages."):
            shared += group
        elif option.startswith(f"--stages.{name}.inputs."):
            inputs[option.split(".", 3)[3]] = group[0].partition("=")[2] if "=" in group[0] else group[-1]
        elif option.startswith(f"--stages.{name}."):
            own += ["--" + group[0][len(f"--stages.{name}."):], *group[1:]]
    return shared + own, inputs


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


#: packages whose modules a recipe's class_path may import directly; a module elsewhere is imported only once its
#: source, read without running it, is seen to define the class (`_defines_class`)
TRUSTED_PACKAGES = ("lightning_saferl", "lightning", "torch")


def _defines_class(module_name: str, class_name: str) -> bool:
    """Whether the source of module `module_name` binds `class_name` at its top level (a class, an assignment or an
    import), found and read without executing the module or its packages (importlib's PathFinder, then ast)."""
    search, spec = None, None
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), search)
        if spec is None:
            return False
        search = spec.submodule_search_locations
    if spec.origin is None or not spec.origin.endswith(".py"):
        return False
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8", errors="replace"))
    bound = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return class_name in bound


def _import_class(class_path: str, where: str) -> Any:
    """The object `class_path` names, importing its module only when that is safe: the module is already imported,
    lies in `TRUSTED_PACKAGES`, or its source defines the name (`_defines_class`). Else InputError, with nothing
    imported: a recipe naming e.g. `this.Nothing` runs no module."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name or not all(part.isidentifier() for part in class_path.split(".")):
        raise InputError(f"{where}: {class_path!r} is not a dotted class path (e.g. lightning_saferl.actors.BCAll)")
    if not (module_name in sys.modules or module_name.split(".")[0] in TRUSTED_PACKAGES
            or _defines_class(module_name, class_name)):
        raise InputError(f"{where}: no class '{class_name}' found in the source of module '{module_name}' (the "
                         "module was not imported)")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"{where}: cannot import '{class_path}' ({_one_line(err)})") from None


def _check_class_paths(name: str, config: Any) -> None:
    """Every `class_path` in a stage config (model, callbacks, loggers, ...) names an existing object, found
    without running a module that does not define it (`_import_class`); jsonargparse then checks its kind."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "class_path" and isinstance(value, str) and "." in value:  # a bare name: jsonargparse's lookup
                _import_class(value, f"stage '{name}'")
            else:
                _check_class_paths(name, value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            _check_class_paths(name, value)


def _model_class(name: str, model: dict) -> type:
    class_path = model.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise InputError(f"stage '{name}': model needs a 'class_path' (e.g. lightning_saferl.actors.BCAll), "
                         f"got {class_path!r}")
    cls = _import_class(class_path, f"stage '{name}': model class")
    if not (isinstance(cls, type) and issubclass(cls, SafeRLModule)):
        raise InputError(f"stage '{name}': '{class_path}' is not a lightning_saferl module (SafeRLModule subclass)")
    return cls


def _stage_config(name: str, stage: Any, cfg: Namespace, obs_dim: int, act_dim: int) -> dict:
    """The recipe's config of one stage: shared settings overridden by the stage's own, then `--smoke`."""
    if not isinstance(stage, dict) or "model" not in stage:
        raise InputError(f"stage '{name}': expected a mapping with a 'model' entry, got {stage!r}")
    unknown = set(stage) - set(STAGE_KEYS)
    if unknown:
        raise InputError(f"stage '{name}': unknown key(s) {sorted(unknown)}; allowed: {list(STAGE_KEYS)}")
    model = dict(stage["model"])
    model["init_args"] = {"obs_dim": obs_dim, "act_dim": act_dim, **dict(model.get("init_args") or {})}
    trainer = {**_plain(cfg.trainer), **dict(stage.get("trainer") or {})}
    if cfg.smoke:
        trainer.update(max_steps=SMOKE_STEPS, max_epochs=-1, log_every_n_steps=1)
    data = {**cfg.data.as_dict(), **dict(stage.get("data") or {})}
    return {"model": model, "trainer": trainer, "data": data, "inputs": dict(stage.get("inputs") or {})}


def _check_stage(name: str, config: dict, earlier: list[str], overrides: list[str]) -> tuple[type, Namespace]:
    """Validate a stage config without building anything: the model class and its init arguments, the Trainer
    and data arguments (jsonargparse names the offending key) and the inputs, after the command line's values
    (`overrides`) are applied. Returns (model class, parsed config)."""
    args, inputs = _stage_overrides(overrides, name)
    config = {**config, "inputs": {**config["inputs"], **inputs}}
    _check_class_paths(name, config)
    for group in _options(args):  # a class named on the command line, before jsonargparse imports it
        named = _option_name(group).endswith("class_path") or _option_name(group) == "--model"
        if named and (len(group) == 2 or "=" in group[0]):
            value = group[0].partition("=")[2] if "=" in group[0] else group[1]
            if not value.lstrip().startswith(("{", "[")):
                _import_class(value, f"stage '{name}': {_option_name(group)}")
    cls = _model_class(name, config["model"])
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = [p for p in parameters if p != "self"]
        unknown = [k for k in config["model"]["init_args"] if k not in accepted]
        if unknown:
            raise InputError(f"stage '{name}': {cls.__name__} has no init argument(s) {unknown}; "
                             f"accepted: {accepted}")
    try:  # jsonargparse reports the offending key
        parsed = _stage_parser().parse_object(config)
        if args:
            parsed = _stage_parser().parse_args(args, namespace=parsed)
    except ArgumentError as err:
        raise InputError(f"stage '{name}': {_one_line(err)}") from None
    if parsed.model.class_path != config["model"]["class_path"]:
        cls = _model_class(name, {"class_path": parsed.model.class_path})
        parameters = inspect.signature(cls.__init__).parameters
    for arg, source in parsed.inputs.items():
        if arg not in parameters:
            raise InputError(f"stage '{name}': input '{arg}' is not an init argument of {cls.__name__}")
        if source not in earlier:
            raise InputError(f"stage '{name}': input '{arg}' names stage '{source}', which does not run before it; "
                             f"earlier stages: {earlier}")
    return cls, parsed


def _instantiate(name: str, parsed: Namespace, cls: type, trained: dict[str, SafeRLModule]):
    """(model, Trainer arguments, datamodule) of a checked stage config; inputs are trained modules of earlier
    stages. A ValueError of the model's constructor (it rejects its configured arguments) is an InputError."""
    model_cfg = parsed.model
    kwargs = model_cfg.init_args.as_dict() if isinstance(model_cfg.init_args, Namespace) else dict(model_cfg.init_args)
    kwargs.update({arg: trained[source] for arg, source in parsed.inputs.items()})
    parsed = parsed.clone()
    parsed.model = None
    init = _stage_parser().instantiate_classes(parsed)
    try:
        model = cls(**kwargs)
    except ValueError as err:
        raise InputError(f"stage '{name}': {_one_line(err)}") from err
    return model, {key: init.trainer[key] for key in init.trainer.keys()}, init.data


def _check_models(plan: "_Plan") -> None:
    """Build every stage's model (without its inputs, which earlier stages train) and check its settings
    (`SafeRLModule.check_settings`), so that a value its constructor or that check refuses stops the run before any
    stage trains. Stages whose class needs an input to be built are checked when they start. Torch's random state
    is left as it was."""
    for name in plan.names:
        parsed, cls = plan.parsed[name], plan.classes[name]
        kwargs = {key: value for key, value in _plain(parsed.model.init_args).items() if key not in parsed.inputs}
        required = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                    if p.name in parsed.inputs and p.default is inspect.Parameter.empty]
        if required:
            continue
        with torch.random.fork_rng(devices=[]):
            try:
                model = cls(**kwargs)
            except ValueError as err:
                raise InputError(f"stage '{name}': {_one_line(err)}") from err
        try:
            model.check_settings()
        except InputError as err:
            raise InputError(f"stage '{name}': {err}") from None


def _dataset_key(data: dict) -> tuple:
    return tuple(data.get(k) for k in DATASET_KEYS)


def _validate_datasets(configs: dict[str, dict], obs_dim: int, act_dim: int) -> None:
    """Read and validate the dataset of every stage whose data differs from the shared one (already checked)."""
    seen: set[tuple] = set()
    for name, config in configs.items():
        key = _dataset_key(config["data"])
        if key in seen:
            continue
        seen.add(key)
        data = OfflineDataModule(**config["data"])
        data.prepare_data()
        loaded = data.load()
        if (loaded.obs_dim, loaded.act_dim) != (obs_dim, act_dim):
            raise InputError(f"stage '{name}': its dataset has obs_dim {loaded.obs_dim}, act_dim {loaded.act_dim}; "
                             f"the recipe's data has {obs_dim}, {act_dim}")


class _Plan:
    """A checked pipeline: run directory, task, stage configs (parsed), classes, config records, restarts."""

    def __init__(self, cfg: Namespace):
        apply_cost_limit(cfg)
        # the shared dataset: generated / downloaded if needed, then read and validated before anything else
        checked = OfflineDataModule(**cfg.data.as_dict())
        checked.prepare_data()
        dataset = checked.load()
        obs_dim, act_dim, self.task_spec = dataset.obs_dim, dataset.act_dim, checked.task_spec
        del checked, dataset  # each stage reads its own copy
        evaluation_limits(cfg, self.task_spec)  # checked now: the summary needs them only after training
        self.run_dir = Path(cfg.run_dir or
                            f"runs/{cfg.algorithm}-{self.task_spec.task_id}-{time.strftime('%Y%m%d-%H%M%S')}")
        if not cfg.stages:
            raise InputError("the recipe has no stages")
        self.names = list(cfg.stages)
        configs = {name: _stage_config(name, stage, cfg, obs_dim, act_dim) for name, stage in cfg.stages.items()}
        self.parsed, self.classes, self.records = {}, {}, {}
        for i, name in enumerate(self.names):
            self.classes[name], self.parsed[name] = _check_stage(name, configs[name], self.names[:i], cfg.overrides)
            check_training_length(self.parsed[name].trainer, f"stage '{name}': ")
            inputs = {s: self.records[s]["sha256"] for s in self.parsed[name].inputs.values()}
            self.records[name] = _stage_record(self.parsed[name], cfg.seed_everything, inputs,
                                               self.classes[name].acting_hparams)
        shared = _dataset_key(cfg.data.as_dict())
        data = {name: {"data": parsed.data.as_dict()} for name, parsed in self.parsed.items()}
        _validate_datasets({n: c for n, c in data.items() if _dataset_key(c["data"]) != shared}, obs_dim, act_dim)
        last = self.names[-1]
        if not callable(getattr(self.classes[last], "act", None)):
            raise InputError(f"the last stage '{last}' must be an actor (a module with `act`), "
                             f"got {self.classes[last].__name__}")
        unknown = [name for name in cfg.restart if name not in self.parsed]
        if unknown:
            raise UnknownNameError(f"--restart {' '.join(unknown)}: no such stage; stages: {', '.join(self.names)}")
        self.restart = set(cfg.restart)
        for name in self.names:  # a stage fed by a restarted one restarts too
            if any(source in self.restart for source in self.parsed[name].inputs.values()):
                self.restart.add(name)

    def conflicts(self) -> dict[str, list[str]]:
        """Stage -> the config keys in which its reusable checkpoint (model.ckpt, else the newest last.ckpt)
        differs from the config it is given now; restarted stages and stages without a checkpoint are left out."""
        found = {}
        for name in self.names:
            stage_dir = self.run_dir / name
            ckpt = stage_dir / "model.ckpt" if (stage_dir / "model.ckpt").exists() else latest_checkpoint(stage_dir)
            if name in self.restart or ckpt is None:
                continue
            stored = stored_record(read_checkpoint(str(ckpt)))
            # checkpoints written before acting settings left the record still hold them: not a difference either
            acting = {f"model.init_args.{key}" for key in self.classes[name].acting_hparams}
            changes = ["(no config recorded)"] if stored is None else \
                [key for key in config_changes(stored, self.records[name]) if key not in acting]
            if changes:
                found[name] = changes
        return found


def _stage_record(parsed: Namespace, seed: int, inputs: dict[str, str], acting: tuple[str, ...] = ()) -> dict:
    """The config record (`runs.config_record`) of a stage: its parsed config without the model's acting-only
    init arguments (`acting`), the seed, and the hashes of the stages it takes inputs from."""
    config = yaml.safe_load(_stage_parser().dump(parsed, skip_none=False))
    for key in acting:
        (config["model"].get("init_args") or {}).pop(key, None)
    return config_record({**config, "seed_everything": seed, "input_sha256": inputs})


def stage_conflicts(cfg: Namespace) -> dict[str, list[str]]:
    """For a pipeline config (`parse_args`), each stage whose checkpoint in `cfg.run_dir` was trained with another
    config, with the changed keys (empty: every existing checkpoint may be reused). Reads the datasets."""
    return _Plan(cfg.clone()).conflicts()


def _refuse(conflicts: dict[str, list[str]], run_dir: Path) -> None:
    if not conflicts:
        return
    stages = "; ".join(f"'{name}' ({', '.join(keys)})" for name, keys in conflicts.items())
    raise InputError(f"{run_dir} holds checkpoints of another config: stage {stages}; pass --restart "
                     f"{' '.join(conflicts)} to train afresh, or use another --run_dir")


def run_pipeline(cfg: Namespace, command: Optional[list[str]] = None) -> dict[str, Any]:
    """Check everything, train the stages not finished yet, evaluate the last one; returns the summary."""
    started = time.time()
    plan = _Plan(cfg)
    _check_models(plan)
    run_dir = plan.run_dir

    from lightning_saferl.envs import make_env

    make_env(plan.task_spec.task_id).close()  # a missing simulator fails now, not after training
    run_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(run_dir):
        _refuse_held_stages(plan)
        _refuse(plan.conflicts(), run_dir)
        return _run_locked(plan, cfg, command, started)


def _open_lock_file(path: Path):
    """`path` opened for reading and writing, created if missing, never through a link: a symbolic link there (or a
    file with other hard links, or not a regular file) is refused, so a lock cannot be made to truncate another file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise InputError(f"{path} is a symbolic link; a lock file is never written through a link: remove the "
                         "link and rerun") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise InputError(f"{path} is not a regular file of its own ({info.st_nlink} hard links); a lock file is "
                         "never written into another file: remove it and rerun")
    return os.fdopen(fd, "r+")


@contextlib.contextmanager
def _file_lock(path: Path, busy: Callable[[str], str]):
    """Hold an OS file lock on `path` (released when the process ends, however it ends), writing this process into
    it; if another process holds it, InputError(`busy(what the holder wrote)`) at once. Under DDP every rank runs
    the pipeline: only the first process (rank 0 of node 0) takes locks. Not POSIX: no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    ranks = [int(os.environ.get(key) or 0) for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")]
    if fcntl is None or any(ranks):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock_file(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise InputError(busy(handle.read().strip() or "another process")) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exclusive(run_dir: Path):
    """Hold `<run_dir>/.pipeline.lock` (`_file_lock`), so that two pipelines never train into one run directory;
    a second one stops at once naming the holder."""
    return _file_lock(run_dir / ".pipeline.lock", lambda holder: f"{run_dir} is in use by another pipeline "
                      f"({holder}); wait for it to finish or use another --run_dir")


def _stage_lock(stage_dir: Path):
    """Hold `<stage_dir>/.stage.lock` while the stage trains (in this process or a worker): a worker that outlives
    its pipeline still holds it, and no other pipeline trains the stage meanwhile (`_refuse_held_stages`)."""
    return _file_lock(stage_dir / ".stage.lock", lambda holder: f"stage '{stage_dir.name}' of {stage_dir.parent} is "
                      f"still being trained by {holder}, a stage worker whose pipeline ended; wait for it to stop (it "
                      "saves its last.ckpt) or end it, then rerun the same command")


def _refuse_held_stages(plan: "_Plan") -> None:
    """InputError naming the holder if a stage of the run directory is still being trained by another process."""
    for name in plan.names:
        if (plan.run_dir / name / ".stage.lock").exists():
            with _stage_lock(plan.run_dir / name):
                pass


def _run_locked(plan: _Plan, cfg: Namespace, command: Optional[list[str]], started: float) -> dict[str, Any]:
    """`run_pipeline`'s work once the run directory is locked and its checkpoints are known to fit the config."""
    run_dir = plan.run_dir
    _save_run_record(cfg, run_dir, command)
    todo = [name for name in plan.names if name in plan.restart or not (run_dir / name / "model.ckpt").exists()]
    trained: dict[str, SafeRLModule] = {}
    workers = _stage_workers(plan, cfg, todo)
    in_workers = todo if workers > 1 and len(todo) > 1 else []
    if in_workers:
        _train_in_workers(plan, cfg, in_workers, workers, command)
    for name in plan.names:
        final = run_dir / name / "model.ckpt"
        if name in todo and name not in in_workers:
            trained[name] = _train_stage(plan, cfg, name, trained, command)
            continue
        if name not in in_workers:
            print(f"[pipeline] stage '{name}': finished earlier, loading {final}")
        trained[name] = load_module(str(final), expected=plan.classes[name])
        _apply_acting_settings(trained[name], plan.parsed[name], final)
    summary = evaluate(trained[plan.names[-1]], plan.task_spec, cfg)
    summary["minutes"] = (time.time() - started) / 60
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_table(summary, f"summary ({run_dir / 'summary.json'})")
    return summary


def _apply_acting_settings(module: SafeRLModule, parsed: Namespace, checkpoint: Path) -> None:
    """Give a reused stage the recipe's acting-only settings (`SafeRLModule.acting_hparams`) and write them into
    its checkpoint, so that whoever loads it later acts as this run does; the weights are untouched."""
    wanted = {key: value for key, value in parsed.model.init_args.as_dict().items() if key in module.acting_hparams}
    changed = {key: value for key, value in wanted.items() if module.hparams.get(key) != value}
    if not changed:
        return
    before = {key: module.hparams.get(key) for key in changed}
    module.set_acting_hparams(changed)
    stored = read_checkpoint(str(checkpoint))
    stored["hyper_parameters"].update(changed)
    tmp = checkpoint.with_name(f"{checkpoint.name}.{os.getpid()}.tmp")
    torch.save(stored, tmp)
    os.replace(tmp, checkpoint)
    print(f"[pipeline] {checkpoint}: acting settings {before} -> {changed} (weights reused: they do not depend "
          "on these)")


def _train_stage(plan: _Plan, cfg: Namespace, name: str, trained: dict[str, SafeRLModule],
                 command: Optional[list[str]], callbacks: tuple[L.Callback, ...] = ()) -> SafeRLModule:
    """Train stage `name` (resuming from its newest last.ckpt unless restarted) with the trained modules of the
    stages it takes inputs from, write `<run_dir>/<name>/model.ckpt` and return the model. `callbacks` join the
    recipe's for this run only (not part of the stage's config)."""
    stage_dir = plan.run_dir / name
    with _stage_lock(stage_dir):  # held from before anything is written until model.ckpt is
        final = stage_dir / "model.ckpt"
        if name in plan.restart:
            final.unlink(missing_ok=True)
        last = None if name in plan.restart else latest_checkpoint(stage_dir)
        L.seed_everything(cfg.seed_everything, workers=True)
        model, trainer_kwargs, datamodule = _instantiate(name, plan.parsed[name], plan.classes[name], trained)
        kwargs, log_dir = trainer_arguments({**trainer_kwargs, "default_root_dir": str(stage_dir)},
                                            LastCheckpoint(every_n_train_steps=cfg.checkpoint_every_n_steps),
                                            record=plan.records[name])
        kwargs["callbacks"].append(RunRecord(log_dir, _stage_parser().dump(plan.parsed[name], skip_none=False),
                                             cfg.seed_everything, command))
        kwargs["callbacks"].extend(callbacks)
        trainer = L.Trainer(**kwargs)
        print(f"[pipeline] stage '{name}': {type(model).__name__}, max_steps={trainer.max_steps}"
              f"{', resuming from ' + str(last) if last else ''}{', restarted' if name in plan.restart else ''}")
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=last, weights_only=True)
        except NonFiniteLossError as err:
            err.args = (f"stage '{name}': {err.args[0]}",)
            raise
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")  # a kill while writing must not look finished
        trainer.save_checkpoint(tmp, weights_only=True)
        os.replace(tmp, final)
        return model


def _stage_workers(plan: _Plan, cfg: Namespace, todo: list[str]) -> int:
    """How many stages may train at once: `parallel_stages`, at most one per torch thread of this process, and 1
    (all in this process) under a distributed launcher or when a stage trains on several devices or nodes."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        return 1
    for name in todo:
        trainer = plan.parsed[name].trainer
        devices = trainer.get("devices", "auto")
        if str(devices) in ("auto", "-1"):  # every device of the accelerator: only GPUs come several to a machine
            count = torch.cuda.device_count() if str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") \
                else 1
        elif isinstance(devices, (list, tuple)):  # device ids
            count = len(devices)
        elif "," in str(devices):  # device ids as text: "0,1" (two), "0," (one)
            count = len([d for d in str(devices).split(",") if d.strip()])
        else:
            count = int(devices)
        if count > 1 or trainer.get("num_nodes") not in (None, 1):
            return 1
    return min(cfg.parallel_stages, torch.get_num_threads())


def _train_in_workers(plan: _Plan, cfg: Namespace, todo: list[str], workers: int,
                      command: Optional[list[str]]) -> None:
    """Train the `todo` stages in worker processes, up to `workers` at once: a stage starts when the stages it takes
    inputs from are finished. This process's torch threads are shared among the running workers, anew
    whenever one starts or ends (a worker takes its new share before its next batch): when FISOR's reward critic
    finishes, the feasibility critic trains on every core. The first failure stops the other workers (SIGTERM: they
    save last.ckpt) and is raised here; so does a SIGTERM to this process (raised as Lightning's SIGTERMException).
    Workers end with this process however it ends (`_end_with_parent`)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    running: dict[str, Any] = {}
    shares: dict[str, Any] = {}  # stage -> its worker's thread count (shared memory, read by _FollowThreadShare)
    budget = torch.get_num_threads()
    done, todo = {name for name in plan.names if name not in todo}, list(todo)
    try:
        _raise_on_sigterm()
        while todo or running:
            ready = [name for name in todo if set(plan.parsed[name].inputs.values()) <= done]
            ready = ready[:workers - len(running)]
            threads = max(1, budget // max(1, len(running) + len(ready)))
            for name in running:
                shares[name].value = threads
            for name in ready:
                todo.remove(name)
                shares[name] = context.Value("i", threads, lock=False)
                running[name] = context.Process(target=_stage_worker, args=(cfg, name, command, shares[name],
                                                                            results, os.getpid()), name=f"stage-{name}")
                running[name].start()
            try:
                name, error = results.get(timeout=1.0)
            except queue.Empty:
                died = {n: p.exitcode for n, p in running.items() if p.exitcode not in (None, 0)}
                if died:
                    name, code = next(iter(died.items()))
                    raise RuntimeError(f"stage '{name}': its worker process died (exit code {code}); rerun the "
                                       f"same command to resume from its last.ckpt")
                continue
            running.pop(name).join()
            if error is not None:
                raise error
            done.add(name)
    finally:
        _restore_sigterm()  # a second SIGTERM ends this process: its workers end with it (`_end_with_parent`)
        for process in running.values():
            process.terminate()  # SIGTERM: the worker saves its last.ckpt at the end of its current step
        for process in running.values():
            process.join(WORKER_STOP_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()


#: how long a stopped stage worker may take to save its last.ckpt before it is killed
WORKER_STOP_SECONDS = 120
_sigterm_handlers: list[Any] = []


def _raise_on_sigterm() -> None:
    """Until `_restore_sigterm`: SIGTERM to this process raises Lightning's SIGTERMException (the command line
    prints how to resume), so that the pipeline's cleanup stops its workers. Only from the main thread."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stop(signum: int, frame: Any) -> None:
        raise SIGTERMException(signum)

    if threading.current_thread() is threading.main_thread():
        _sigterm_handlers.append(signal.signal(signal.SIGTERM, stop))


def _restore_sigterm() -> None:
    if _sigterm_handlers:
        signal.signal(signal.SIGTERM, _sigterm_handlers.pop())


#: prctl(2) option: the signal a Linux process receives when its parent ends
PR_SET_PDEATHSIG = 1


def _end_with_parent(parent: int) -> None:
    """Make this worker receive SIGTERM when its pipeline process (`parent`) ends, even by SIGKILL: Linux's
    parent-death signal (prctl PR_SET_PDEATHSIG), elsewhere a thread that watches the parent pid each second. A
    worker whose parent already ended stops here. SIGTERM makes a training worker save its last.ckpt and stop."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not sys.platform.startswith("linux") or libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) is not available")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="watch-pipeline", daemon=True).start()
    if os.getppid() != parent:
        raise SystemExit(f"[pipeline] process {parent} ended before its stage worker {os.getpid()} started")


class _FollowThreadShare(L.Callback):
    """In a worker of `_train_in_workers`: before each batch, use the number of torch threads the parent assigned."""

    def __init__(self, stage: str, share: Any):
        self.stage, self.share = stage, share

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"[pipeline] stage '{self.stage}': {torch.get_num_threads()} threads in process {os.getpid()}",
              flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        threads = self.share.value
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            tqdm.write(f"[pipeline] stage '{self.stage}': {threads} threads from step {trainer.global_step}")


def _stage_worker(cfg: Namespace, name: str, command: Optional[list[str]], share: Any, results, parent: int) -> None:
    """One stage in a worker process of pipeline process `parent`: its inputs are read from their model.ckpt; `share`
    holds its thread count; puts (name, None or the error). Ends with its parent (`_end_with_parent`)."""
    _end_with_parent(parent)
    torch.set_num_threads(share.value)
    try:
        plan = _Plan(cfg)
        sources = set(plan.parsed[name].inputs.values())
        trained = {source: load_module(str(plan.run_dir / source / "model.ckpt"), expected=plan.classes[source])
                   for source in sources}
        _train_stage(plan, cfg, name, trained, command, callbacks=(_FollowThreadShare(name, share),))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        if os.getppid() != parent:  # the pipeline ended (its SIGTERM stopped this worker): nobody to report to
            saved = getattr(err, "last_checkpoint", None)
            print(f"[pipeline] stage '{name}': stopped with its pipeline (process {parent})"
                  + (f"; state saved to {saved}" if saved else ""), file=sys.stderr, flush=True)
            return
        if not isinstance(err, SystemExit):
            traceback.print_exc()
        try:
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an error that cannot cross processes is described instead
            err = RuntimeError(f"stage '{name}': {type(err).__name__}: {err}")
        results.put((name, err))
    else:
        results.put((name, None))


def apply_cost_limit(cfg: Namespace) -> None:
    """Set every field of `cfg.cost_limit_fields` to `cfg.cost_limit` (times its factor, for a mapping)."""
    fields = cfg.cost_limit_fields
    fields = dict(fields) if isinstance(fields, dict) else {path: 1.0 for path in fields or []}
    if fields and cfg.cost_limit is None:
        raise InputError(f"cost_limit_fields {list(fields)} follow cost_limit, but the recipe sets no cost_limit")
    if cfg.cost_limit is not None:
        from lightning_saferl.evaluation import cost_limit_list

        cost_limit_list(cfg.cost_limit, "cost_limit")
    for path, factor in fields.items():
        *parents, leaf = path.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, (dict, Namespace)) else None
        if not isinstance(node, (dict, Namespace)) or leaf not in node:
            raise InputError(f"cost_limit_fields: {path!r} is not a field of the recipe")
        node[leaf] = float(factor) * cfg.cost_limit


def evaluation_limits(cfg: Namespace, task_spec) -> list[float]:
    """The cost limits the summary reports (see the module docstring)."""
    from lightning_saferl.evaluation import cost_limit_list

    ev = cfg.evaluation
    given = ev.cost_limits if ev.cost_limits is not None else ev.cost_limit
    if given is None:
        given = cfg.cost_limit if cfg.cost_limit is not None else list(task_spec.cost_limits)
    return cost_limit_list(given, "evaluation.cost_limits")


def evaluate(policy, task_spec, cfg: Namespace) -> dict[str, Any]:
    """Episodes of the final policy on the task's environment: the metrics of `EpisodeRunner`, plus the
    normalised cost and safe flag at each evaluation limit (`lightning_saferl.evaluation.limit_scores`)."""
    from lightning_saferl.evaluation import EpisodeRunner, limit_scores

    ev = cfg.evaluation
    limits = evaluation_limits(cfg, task_spec)
    episodes = SMOKE_EPISODES if cfg.smoke else ev.episodes
    runner = EpisodeRunner(task_spec, episodes=episodes, num_envs=min(ev.num_envs, episodes), seed=ev.seed,
                           reset_options=ev.reset_options, cost_limit=limits[0])
    policy.eval()
    try:
        with torch.no_grad():
            metrics = runner.run(policy)
    finally:
        runner.close()
    return {"task": task_spec.task_id, "algorithm": cfg.algorithm, "seed": cfg.seed_everything,
            "cost_limit": limits[0], "cost_limits": limits, **{k: _number(v) for k, v in metrics.items()},
            **limit_scores(metrics["cost_mean"], task_spec, limits)}


def print_table(rows: dict[str, Any], title: str) -> None:
    """A titled two-column table of names and values (floats to 4 significant digits)."""
    width = max(len(k) for k in rows)
    print(f"\n{'=' * (width + 16)}\n {title}\n{'-' * (width + 16)}")
    for key, value in rows.items():
        print(f" {key:<{width}}  {value:.4g}" if isinstance(value, float) else f" {key:<{width}}  {value}")
    print("=" * (width + 16))


def _save_run_record(cfg: Namespace, run_dir: Path, command: Optional[list[str]]) -> None:
    """The resolved recipe (without --restart, so that running it again reuses the stages), seed and versions."""
    recorded = cfg.clone()
    recorded.restart = []
    atomic_write_text(run_dir / "config.yaml", build_parser().dump(recorded, skip_none=False))
    write_run_info(run_dir, cfg.seed_everything, command)


def _plain(obj):
    if isinstance(obj, Namespace):
        obj = obj.as_dict()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _number(value):
    """A metric as a JSON number: counts stay integers, everything else becomes a float."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return int(value) if isinstance(value, int) else float(value)


def pipeline_main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_pipeline(parse_args(argv), command=["lightning-saferl", "pipeline", *argv])
