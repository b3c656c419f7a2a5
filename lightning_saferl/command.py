"""Running one `lightning-saferl` command the way the console shows it: expected errors (bad input, a non-finite
loss, a missing simulator) as one line and exit status 2, a run stopped by SIGTERM with how to resume and exit status
143, anything else (a bug) with its traceback. Used by the CLI and by the sweep's cells, which print into their log.
Imports nothing heavy until an error needs it."""
from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from typing import Callable, Optional

from lightning_saferl.errors import InputError

DEBUG_HINT = " (--debug shows the traceback)"


def split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks are wanted: `--debug` among `argv` or LIGHTNING_SAFERL_DEBUG=1, `argv` without
    `--debug`)."""
    debug = os.environ.get("LIGHTNING_SAFERL_DEBUG") == "1" or "--debug" in argv
    return debug, [a for a in argv if a != "--debug"]


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


def run_command(command: str, run: Callable[[], object], debug: bool = False) -> None:
    """Call `run()` (the body of `lightning-saferl <command>`). An expected error prints
    `lightning-saferl <command>: error: <one line>` to stderr and exits 2 (re-raised as is when `debug`); a SIGTERM
    stop prints how to resume and exits 143; other errors propagate with their traceback."""
    try:
        run()
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
