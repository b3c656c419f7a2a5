"""The project's own error for bad input.

`InputError` means "what the user gave is wrong" (a recipe or option, a dataset file, a checkpoint, a task id):
the `lightning-saferl` command prints its message as one line and exits 2. Any other exception is a bug or an
environment problem and keeps its traceback. It derives from ValueError, so `except ValueError` still catches it.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input, reported as one line naming the file / key / value at fault."""


class UnknownNameError(InputError, KeyError):
    """An unknown name (task id, stage): also a KeyError; printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WrongTypeError(InputError, TypeError):
    """A checkpoint or object of the wrong kind (e.g. a critic where an actor is expected): also a TypeError."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the user named does not exist: also a FileNotFoundError."""
