"""`lightning-saferl fit | validate | test`: LightningCLI with the project's defaults (see `lightning_saferl.cli`).

Imported only when one of these commands runs (it imports Lightning). Everything is done through LightningCLI's
public hooks except `_parse_ckpt_path`: Lightning has no public hook to replace its reading of `--ckpt_path`
hyperparameters, which would take the model class and arguments from the file unchecked, so it is overridden
here; pyproject.toml pins the Lightning minor version this is tested with. Configs are read in OmegaConf mode,
as pipeline recipes are (`runs.RESOLVERS`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_saferl.base import SafeRLModule
from lightning_saferl.callbacks import LastCheckpoint
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.errors import InputError, WrongTypeError
from lightning_saferl.runs import check_training_length, register_resolvers, trainer_arguments, write_run_record

DEFAULT_DATA = "lightning_saferl.data.datamodule.OfflineDataModule"


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's `config.yaml` (the full resolved config, seed included) plus `run_info.json`
    (seed, package versions, command line) in the run's log directory, both written atomically."""

    def __init__(self, *args: Any, command: Optional[list[str]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.command = command

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcast from rank 0
        if trainer.is_global_zero:
            write_run_record(log_dir, self.parser.dump(self.config, skip_none=False),
                             seed=self.config.get("seed_everything"), command=self.command)
        self.already_saved = True


def data_dims(data: OfflineDataModule) -> tuple[int, int]:
    """(obs_dim, act_dim) of a datamodule's dataset. When they are not known yet (a DSRL file not cached), the
    file is resolved first (downloaded) and read, so the model is never built without them."""
    if data.obs_dim is None or data.act_dim is None:
        data.load()
    return data.obs_dim, data.act_dim


def _obs_dim(data: OfflineDataModule) -> int:
    return data_dims(data)[0]


def _act_dim(data: OfflineDataModule) -> int:
    return data_dims(data)[1]


class SafeRLCLI(LightningCLI):
    """LightningCLI in subclass mode; obs_dim / act_dim come from the datamodule (see `lightning_saferl.cli`)."""

    def __init__(self, args: list[str]):
        register_resolvers()  # OmegaConf mode, as pipeline recipes: `${...}` interpolation and `runs.RESOLVERS`
        no_exit = {"exit_on_error": False, "parser_mode": "omegaconf"}
        super().__init__(SafeRLModule, OfflineDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=args, save_config_callback=SaveRunConfig,
                         save_config_kwargs={"overwrite": True, "command": ["lightning-saferl", *args]},
                         seed_everything_default=0,
                         parser_kwargs={**no_exit, **{name: dict(no_exit) for name in self.subcommands()}})

    def add_arguments_to_parser(self, parser) -> None:
        # the datamodule is built first; its dims (resolving the file if needed) are the model's
        parser.link_arguments("data", "model.init_args.obs_dim", compute_fn=_obs_dim, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.act_dim", compute_fn=_act_dim, apply_on="instantiate")
        parser.add_class_arguments(LastCheckpoint, "last_checkpoint")
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # --ckpt_path is read without executing anything in it
        self.parser.set_defaults({f"{name}.weights_only": True for name in self.subcommands()
                                  if "weights_only" in inspect.signature(getattr(self.trainer_class, name)).parameters})

    def parse_arguments(self, parser, args) -> None:
        self.config = parser.parse_args(args)  # `args` is always given: no warning about sys.argv

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`: check the file (exists, loads with weights_only=True, holds the configured model class)
        and take the model's init arguments from it (they define the architecture the weights fit)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        from lightning_saferl.policy import checkpoint_class, read_checkpoint

        checkpoint = read_checkpoint(ckpt_path)
        held = checkpoint_class(ckpt_path, checkpoint)
        class_path = self.config[subcommand].model.class_path
        module_name, _, class_name = class_path.rpartition(".")
        wanted = getattr(importlib.import_module(module_name), class_name)
        if not issubclass(held, wanted):
            raise WrongTypeError(f"{ckpt_path}: checkpoint holds a {held.__name__}, expected a {wanted.__name__} "
                                 f"(--model {class_path})")
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        self._checkpoint_dims = (ckpt_path, hparams.pop("obs_dim", None), hparams.pop("act_dim", None))
        model = {"class_path": f"{held.__module__}.{held.__qualname__}", "init_args": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def after_instantiate_classes(self) -> None:
        # a dataset file given by the user is read and validated now, before any logger or checkpoint writes
        if self.subcommand is not None and getattr(self.datamodule, "path", None) is not None:
            self.datamodule.load()
        if self.subcommand == "fit" and isinstance(self.model, SafeRLModule):
            self.model.check_settings()
        ckpt_path, obs_dim, act_dim = getattr(self, "_checkpoint_dims", (None, None, None))
        data_dims = (getattr(self.datamodule, "obs_dim", None), getattr(self.datamodule, "act_dim", None))
        if ckpt_path and None not in data_dims and (obs_dim, act_dim) != data_dims:
            raise InputError(f"{ckpt_path}: the checkpoint was trained with obs_dim {obs_dim}, act_dim {act_dim}; "
                             f"the data ({self.datamodule.task}) has obs_dim {data_dims[0]}, act_dim {data_dims[1]}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if self.subcommand == "fit":
            check_training_length(section.get("trainer", {}))
        config, _ = trainer_arguments({**section.get("trainer", {}), **kwargs}, section.get("last_checkpoint"))
        return super().instantiate_trainer(**config)


def _model_from_checkpoint(argv: list[str]) -> list[str]:
    """`<subcommand> --ckpt_path X` without --model / --config: add `--model <class in X>`."""
    if not argv or argv[0] not in LightningCLI.subcommands():
        return argv
    if any(a in ("--model", "-c", "--config") or a.startswith(("--model=", "--config=")) for a in argv):
        return argv
    ckpt_path = None
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            ckpt_path = argv[i + 1]
        elif arg.startswith("--ckpt_path="):
            ckpt_path = arg.split("=", 1)[1]
    if not ckpt_path:
        return argv
    from lightning_saferl.policy import checkpoint_class

    cls = checkpoint_class(ckpt_path)
    return [argv[0], "--model", f"{cls.__module__}.{cls.__qualname__}", *argv[1:]]


def lightning_main(argv: list[str]) -> None:
    SafeRLCLI(_model_from_checkpoint(argv))
