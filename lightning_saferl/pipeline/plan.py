"""The plan of a pipeline run, a value built from the recipe without changing it: the datasets read and validated,
the run directory named, every stage's config checked and hashed (its config record), the stages to restart."""
from __future__ import annotations

import inspect
import time
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from jsonargparse import Namespace

from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.errors import InputError, UnknownNameError
from lightning_saferl.pipeline.classes import check_class_paths, import_class, model_class
from lightning_saferl.pipeline.recipe import (DATASET_KEYS, SMOKE_STEPS, STAGE_KEYS, evaluation_limits, one_line,
                                              option_groups, option_name, plain, resolve_cost_limit, stage_overrides,
                                              stage_parser)
from lightning_saferl.policy import read_checkpoint
from lightning_saferl.runs import check_training_length, config_changes, config_record, latest_checkpoint, stored_record

def _stage_config(name: str, stage: Any, cfg: Namespace, obs_dim: int, act_dim: int) -> dict:
    """The recipe's config of one stage: shared settings overridden by the stage's own, then `--smoke`."""
    if not isinstance(stage, dict) or "model" not in stage:
        raise InputError(f"stage '{name}': expected a mapping with a 'model' entry, got {stage!r}")
    unknown = set(stage) - set(STAGE_KEYS)
    if unknown:
        raise InputError(f"stage '{name}': unknown key(s) {sorted(unknown)}; allowed: {list(STAGE_KEYS)}")
    model = dict(stage["model"])
    model["init_args"] = {"obs_dim": obs_dim, "act_dim": act_dim, **dict(model.get("init_args") or {})}
    trainer = {**plain(cfg.trainer), **dict(stage.get("trainer") or {})}
    if cfg.smoke:
        trainer.update(max_steps=SMOKE_STEPS, max_epochs=-1, log_every_n_steps=1)
    data = {**cfg.data.as_dict(), **dict(stage.get("data") or {})}
    return {"model": model, "trainer": trainer, "data": data, "inputs": dict(stage.get("inputs") or {})}


def _check_stage(name: str, config: dict, earlier: list[str], overrides: list[str]) -> tuple[type, Namespace]:
    """Validate a stage config without building anything: the model class and its init arguments, the Trainer
    and data arguments (jsonargparse names the offending key) and the inputs, after the command line's values
    (`overrides`) are applied. Returns (model class, parsed config)."""
    args, inputs = stage_overrides(overrides, name)
    config = {**config, "inputs": {**config["inputs"], **inputs}}
    check_class_paths(name, config)
    for group in option_groups(args):  # a class named on the command line, before jsonargparse imports it
        named = option_name(group).endswith("class_path") or option_name(group) == "--model"
        if named and (len(group) == 2 or "=" in group[0]):
            value = group[0].partition("=")[2] if "=" in group[0] else group[1]
            if not value.lstrip().startswith(("{", "[")):
                import_class(value, f"stage '{name}': {option_name(group)}")
    cls = model_class(name, config["model"])
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = [p for p in parameters if p != "self"]
        unknown = [k for k in config["model"]["init_args"] if k not in accepted]
        if unknown:
            raise InputError(f"stage '{name}': {cls.__name__} has no init argument(s) {unknown}; "
                             f"accepted: {accepted}")
    try:  # jsonargparse reports the offending key
        parsed = stage_parser().parse_object(config)
        if args:
            parsed = stage_parser().parse_args(args, namespace=parsed)
    except ArgumentError as err:
        raise InputError(f"stage '{name}': {one_line(err)}") from None
    if parsed.model.class_path != config["model"]["class_path"]:
        cls = model_class(name, {"class_path": parsed.model.class_path})
        parameters = inspect.signature(cls.__init__).parameters
    for arg, source in parsed.inputs.items():
        if arg not in parameters:
            raise InputError(f"stage '{name}': input '{arg}' is not an init argument of {cls.__name__}")
        if source not in earlier:
            raise InputError(f"stage '{name}': input '{arg}' names stage '{source}', which does not run before it; "
                             f"earlier stages: {earlier}")
    return cls, parsed


def check_models(plan: Plan) -> None:
    """Build every stage's model (without its inputs, which earlier stages train) and check its settings
    (`SafeRLModule.check_settings`), so that a value its constructor or that check refuses stops the run before any
    stage trains. Stages whose class needs an input to be built are checked when they start. Torch's random state
    is left as it was."""
    for name in plan.names:
        parsed, cls = plan.parsed[name], plan.classes[name]
        kwargs = {key: value for key, value in plain(parsed.model.init_args).items() if key not in parsed.inputs}
        required = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                    if p.name in parsed.inputs and p.default is inspect.Parameter.empty]
        if required:
            continue
        with torch.random.fork_rng(devices=[]):
            try:
                model = cls(**kwargs)
            except ValueError as err:
                raise InputError(f"stage '{name}': {one_line(err)}") from err
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


@dataclass(frozen=True)
class Plan:
    """A checked pipeline (`make_plan`): the resolved recipe, run directory, task, stage configs (parsed), model
    classes, config records and the stages to train afresh."""

    cfg: Namespace  # the recipe with its cost limit applied (`resolve_cost_limit`)
    run_dir: Path
    task_spec: Any
    names: list[str]
    parsed: dict[str, Namespace]
    classes: dict[str, type]
    records: dict[str, dict]
    restart: frozenset[str]

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


def make_plan(cfg: Namespace, cost_limit: Optional[float] = None) -> Plan:
    """Check a pipeline config (`parse_args`; left unchanged) before anything trains: its cost limit (`cost_limit`
    wins over the recipe's, `resolve_cost_limit`), the shared dataset and every stage's own (read and validated),
    the evaluation limits, every stage's config, that the last stage acts, and `--restart`."""
    cfg = resolve_cost_limit(cfg, cost_limit)
    # the shared dataset: generated / downloaded if needed, then read and validated before anything else
    checked = OfflineDataModule(**cfg.data.as_dict())
    checked.prepare_data()
    dataset = checked.load()
    obs_dim, act_dim, task_spec = dataset.obs_dim, dataset.act_dim, checked.task_spec
    del checked, dataset  # each stage reads its own copy
    evaluation_limits(cfg, task_spec)  # checked now: the summary needs them only after training
    run_dir = Path(cfg.run_dir or f"runs/{cfg.algorithm}-{task_spec.task_id}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.stages:
        raise InputError("the recipe has no stages")
    classes, parsed, records = _check_stages(cfg, obs_dim, act_dim)
    shared = _dataset_key(cfg.data.as_dict())
    data = {name: {"data": stage.data.as_dict()} for name, stage in parsed.items()}
    _validate_datasets({n: c for n, c in data.items() if _dataset_key(c["data"]) != shared}, obs_dim, act_dim)
    names = list(cfg.stages)
    if not callable(getattr(classes[names[-1]], "act", None)):
        raise InputError(f"the last stage '{names[-1]}' must be an actor (a module with `act`), "
                         f"got {classes[names[-1]].__name__}")
    return Plan(cfg, run_dir, task_spec, names, parsed, classes, records, _restarts(cfg.restart, names, parsed))


def _check_stages(cfg: Namespace, obs_dim: int, act_dim: int) -> tuple[dict, dict, dict]:
    """(model class, parsed config, config record) of every stage, by name, each checked in recipe order."""
    names = list(cfg.stages)
    configs = {name: _stage_config(name, stage, cfg, obs_dim, act_dim) for name, stage in cfg.stages.items()}
    classes, parsed, records = {}, {}, {}
    for i, name in enumerate(names):
        classes[name], parsed[name] = _check_stage(name, configs[name], names[:i], cfg.overrides)
        check_training_length(parsed[name].trainer, f"stage '{name}': ")
        inputs = {s: records[s]["sha256"] for s in parsed[name].inputs.values()}
        records[name] = _stage_record(parsed[name], cfg.seed_everything, inputs, classes[name].acting_hparams)
    return classes, parsed, records


def _restarts(restart: list[str], names: list[str], parsed: dict[str, Namespace]) -> frozenset[str]:
    """The stages `--restart` names and every stage fed by a restarted one."""
    unknown = [name for name in restart if name not in parsed]
    if unknown:
        raise UnknownNameError(f"--restart {' '.join(unknown)}: no such stage; stages: {', '.join(names)}")
    restarted = set(restart)
    for name in names:  # in recipe order: a stage's inputs come before it
        if any(source in restarted for source in parsed[name].inputs.values()):
            restarted.add(name)
    return frozenset(restarted)


def _stage_record(parsed: Namespace, seed: int, inputs: dict[str, str], acting: tuple[str, ...] = ()) -> dict:
    """The config record (`runs.config_record`) of a stage: its parsed config without the model's acting-only
    init arguments (`acting`), the seed, and the hashes of the stages it takes inputs from."""
    config = yaml.safe_load(stage_parser().dump(parsed, skip_none=False))
    for key in acting:
        (config["model"].get("init_args") or {}).pop(key, None)
    return config_record({**config, "seed_everything": seed, "input_sha256": inputs})


def stage_conflicts(cfg: Namespace) -> dict[str, list[str]]:
    """For a pipeline config (`parse_args`), each stage whose checkpoint in `cfg.run_dir` was trained with another
    config, with the changed keys (empty: every existing checkpoint may be reused). Reads the datasets."""
    return make_plan(cfg).conflicts()


def refuse_conflicts(conflicts: dict[str, list[str]], run_dir: Path) -> None:
    if not conflicts:
        return
    stages = "; ".join(f"'{name}' ({', '.join(keys)})" for name, keys in conflicts.items())
    raise InputError(f"{run_dir} holds checkpoints of another config: stage {stages}; pass --restart "
                     f"{' '.join(conflicts)} to train afresh, or use another --run_dir")
