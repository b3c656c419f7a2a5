"""Training one stage: its model, datamodule and Trainer built from the checked config, with the trained modules of the
stages it takes inputs from; and giving a finished stage that is reused the recipe's acting-only settings."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from jsonargparse import Namespace

from lightning_saferl.base import NonFiniteLossError, SafeRLModule
from lightning_saferl.callbacks import LastCheckpoint
from lightning_saferl.errors import InputError
from lightning_saferl.pipeline.locks import stage_lock
from lightning_saferl.pipeline.plan import Plan
from lightning_saferl.pipeline.recipe import one_line, stage_parser
from lightning_saferl.policy import read_checkpoint
from lightning_saferl.runs import RunRecord, latest_checkpoint, trainer_arguments

def instantiate(name: str, parsed: Namespace, cls: type, trained: dict[str, SafeRLModule]):
    """(model, Trainer arguments, datamodule) of a checked stage config; inputs are trained modules of earlier
    stages. A ValueError of the model's constructor (it rejects its configured arguments) is an InputError."""
    model_cfg = parsed.model
    kwargs = model_cfg.init_args.as_dict() if isinstance(model_cfg.init_args, Namespace) else dict(model_cfg.init_args)
    kwargs.update({arg: trained[source] for arg, source in parsed.inputs.items()})
    parsed = parsed.clone()
    parsed.model = None
    init = stage_parser().instantiate_classes(parsed)
    try:
        model = cls(**kwargs)
    except ValueError as err:
        raise InputError(f"stage '{name}': {one_line(err)}") from err
    return model, {key: init.trainer[key] for key in init.trainer.keys()}, init.data


def apply_acting_settings(module: SafeRLModule, parsed: Namespace, checkpoint: Path) -> None:
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


def train_stage(plan: Plan, name: str, trained: dict[str, SafeRLModule],
                 command: Optional[list[str]], callbacks: tuple[L.Callback, ...] = ()) -> SafeRLModule:
    """Train stage `name` (resuming from its newest last.ckpt unless restarted) with the trained modules of the
    stages it takes inputs from, write `<run_dir>/<name>/model.ckpt` and return the model. `callbacks` join the
    recipe's for this run only (not part of the stage's config)."""
    stage_dir = plan.run_dir / name
    with stage_lock(stage_dir):  # held from before anything is written until model.ckpt is
        final = stage_dir / "model.ckpt"
        if name in plan.restart:
            final.unlink(missing_ok=True)
        last = None if name in plan.restart else latest_checkpoint(stage_dir)
        L.seed_everything(plan.cfg.seed_everything, workers=True)
        model, trainer_kwargs, datamodule = instantiate(name, plan.parsed[name], plan.classes[name], trained)
        kwargs, log_dir = trainer_arguments({**trainer_kwargs, "default_root_dir": str(stage_dir)},
                                            LastCheckpoint(every_n_train_steps=plan.cfg.checkpoint_every_n_steps),
                                            record=plan.records[name])
        kwargs["callbacks"].append(RunRecord(log_dir, stage_parser().dump(plan.parsed[name], skip_none=False),
                                             plan.cfg.seed_everything, command))
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
