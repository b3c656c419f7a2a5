"""Entry point `lightning-saferl`:

    lightning-saferl fit|validate|test --config CFG.yaml [--model ...] [--data ...]   LightningCLI
    lightning-saferl pipeline --config RECIPE.yaml [--run_dir DIR] [--smoke] [--restart STAGE ...]   all stages,
        then evaluation; --trainer.X / --data.X / --stages.<name>.<section>.<key> win over the recipe
    lightning-saferl collect --task PointRobot-v0 --out FILE --steps N --seed S [--num_envs N]   write a dataset
    lightning-saferl evaluate --ckpt ACTOR.ckpt [--episodes N] [--plot OUT.png]   episodes of a trained actor
    lightning-saferl build-dataset --task OfflineBallCircle-v0 --out DIR [--workers 2] [--steps_per_agent N]   train
        PPO-Lagrangian agents at a spread of cost thresholds, filter their episodes, write a DSRL file and its card
        (rerun the same command to resume)
    lightning-saferl sweep --config RECIPE --out DIR --seeds 0 1 2 [--tasks ..] [--cost_limits ..]   runs on Ray
    lightning-saferl table DIR... [--out OUT]       table.md/.csv/.json/.png from the finished runs below DIR...

`fit` / `validate` / `test` (`lightning_saferl.lightning_cli`, imported only for these commands) defaults: data
class OfflineDataModule (PointRobot-v0), `seed_everything: 0`, TensorBoard + CSV loggers in
`lightning_logs/version_N/`, also holding `config.yaml`, `run_info.json` and `checkpoints/last.ckpt` (written
every `--last_checkpoint.every_n_train_steps` steps, at the end and on SIGTERM); the layout of every pipeline stage
too (`lightning_saferl.runs`). Checkpoints are read with `weights_only=True`. Resume a run with
`lightning-saferl fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt`.
With `--ckpt_path` and neither `--model` nor `--config`, the model class is read from the checkpoint.

Bad input (dataset, config or option, missing or wrong checkpoint, unknown task: `errors.InputError`, and a
ValueError of a class built from the config) and a non-finite loss print one line and exit 2 (a run stopped by SIGTERM exits 143, saying how to resume); pass --debug (or set LIGHTNING_SAFERL_DEBUG=1) for the
traceback. Any other error is a bug or an environment problem and shows its traceback.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional

from lightning_saferl.command import run_command, split_debug
from lightning_saferl.errors import InputError

_LIGHTNING = ("lightning_saferl.lightning_cli", "lightning_main", True)
#: every command: (module, function, whether the function takes the command name too: LightningCLI's subcommands,
#: which `lightning_cli` takes from `LightningCLI.subcommands()`); the function takes the arguments after the command
COMMANDS = {
    "fit": _LIGHTNING,
    "validate": _LIGHTNING,
    "test": _LIGHTNING,
    "predict": _LIGHTNING,
    "pipeline": ("lightning_saferl.pipeline", "pipeline_main", False),
    "collect": ("lightning_saferl.data.collect", "collect_main", False),
    "evaluate": ("lightning_saferl.evaluate", "evaluate_main", False),
    "build-dataset": ("lightning_saferl.data.build", "build_main", False),
    "sweep": ("lightning_saferl.sweep", "sweep_main", False),
    "table": ("lightning_saferl.table", "table_main", False),
}


def _dispatch(command: str, argv: list[str]) -> None:
    """Import the command's module (only that one: Lightning is slow to import) and run it on `argv`."""
    if command not in COMMANDS:
        raise InputError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)} (each takes --help)")
    module, function, with_name = COMMANDS[command]
    getattr(import_module(module), function)(argv if with_name else argv[1:])


def main(argv: Optional[list[str]] = None) -> None:
    debug, argv = split_debug(list(sys.argv[1:] if argv is None else argv))
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help"):
        print(__doc__.strip())
        return
    run_command(command, lambda: _dispatch(command, argv), debug)


if __name__ == "__main__":
    main()
