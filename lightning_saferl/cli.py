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

import os
import sys
from argparse import ArgumentError
from typing import Optional

from lightning_saferl.errors import InputError

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEBUG_HINT = " (--debug shows the traceback)"


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors printed as one line: the project's input errors, option parsing errors, Lightning's configuration
    errors, a non-finite loss and a missing simulator. (Imported when needed: Lightning is slow to import.)"""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_saferl.base import NonFiniteLossError
    from lightning_saferl.envs.dsrl import SimulatorNotInstalledError

    return InputError, ArgumentError, MisconfigurationException, NonFiniteLossError, SimulatorNotInstalledError


def _raised_by(err: BaseException, package: str) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}{package}{os.sep}" in tb.tb_frame.f_code.co_filename


def _expected_cause(err: BaseException, expected: tuple[type[BaseException], ...]) -> Optional[BaseException]:
    """The innermost expected error among `err` and the errors it re-raises in jsonargparse's words; None if there
    is none: a bug. jsonargparse wraps the errors of the classes it builds from the user's config: a ValueError
    from such a constructor is the class rejecting its configured arguments, so it counts as input too."""
    found = err if isinstance(err, expected) else None
    while err.__cause__ is not None and _raised_by(err, "jsonargparse"):
        err = err.__cause__
        if isinstance(err, expected) or (isinstance(err, ValueError) and not _raised_by(err, "jsonargparse")):
            found = err
    return found


def _how_to_resume(command: str, stop: SystemExit) -> str:
    """What a run stopped by SIGTERM saved, and how to go on: a pipeline resumes by running the same command
    again (every stage from its newest last.ckpt); `fit` takes the saved state as --ckpt_path."""
    saved = getattr(stop, "last_checkpoint", None)
    if command == "pipeline":
        return f"{f'state saved to {saved}; ' if saved else ''}rerun the same command to resume"
    return f"state saved to {saved}: pass it as --ckpt_path to resume" if saved else "no checkpoint written"


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LIGHTNING_SAFERL_DEBUG") == "1" or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help"):
        print(__doc__.strip())
        return
    try:
        if command not in (*SUBCOMMANDS, "pipeline", "collect", "evaluate", "build-dataset", "sweep", "table"):
            raise InputError(f"unknown command {command!r}; choose from fit, validate, test, pipeline, collect, "
                             "evaluate, build-dataset, sweep, table (each takes --help)")
        if command == "collect":
            from lightning_saferl.data.collect import collect_main

            collect_main(argv[1:])
        elif command == "evaluate":
            from lightning_saferl.evaluate import evaluate_main

            evaluate_main(argv[1:])
        elif command == "build-dataset":
            from lightning_saferl.data.build import build_main

            build_main(argv[1:])
        elif command == "pipeline":
            from lightning_saferl.pipeline import pipeline_main

            pipeline_main(argv[1:])
        elif command == "sweep":
            from lightning_saferl.sweep import sweep_main

            sweep_main(argv[1:])
        elif command == "table":
            from lightning_saferl.table import table_main

            table_main(argv[1:])
        else:
            from lightning_saferl.lightning_cli import lightning_main

            lightning_main(argv)
    except SystemExit as stop:
        lightning_exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")  # loaded if it can raise
        if lightning_exceptions is None or not isinstance(stop, lightning_exceptions.SIGTERMException):
            raise
        print(f"lightning-saferl {command}: stopped by SIGTERM; {_how_to_resume(command, stop)}", file=sys.stderr)
        sys.exit(143)
    except Exception as err:
        cause = _expected_cause(err, expected_errors())
        if debug or cause is None:
            raise
        message = " ".join(str(cause).split())  # one line, whatever the library's formatting
        print(f"lightning-saferl {command}: error: {message}{DEBUG_HINT}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
