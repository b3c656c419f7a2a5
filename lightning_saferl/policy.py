"""The one interface evaluation and callbacks see: a batched, deterministic-shape policy."""
from __future__ import annotations

import contextvars
from typing import Optional, Protocol, runtime_checkable

import torch

from lightning_saferl.errors import InputError, MissingFileError, WrongTypeError


@runtime_checkable
class Policy(Protocol):
    """`act(obs)` maps a (B, obs_dim) float tensor to (B, act_dim) actions in [-1, 1].

    Called under `torch.no_grad()`; `obs` is moved to `device` by the caller. Every actor
    LightningModule satisfies this protocol itself (it has `device` and `act`).
    """

    device: torch.device

    def act(self, obs: torch.Tensor) -> torch.Tensor: ...


def _module_class(tag: str, path: str):
    """The lightning_saferl class named by a checkpoint's tag; nothing outside the package is imported."""
    import importlib

    from lightning_saferl.base import SafeRLModule

    module_name, _, class_name = str(tag).rpartition(".")
    if not module_name.startswith("lightning_saferl."):
        raise InputError(f"{path}: checkpoint names class {tag!r}, which is not a lightning_saferl module; "
                         "refusing to load it")
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except (ImportError, ValueError, TypeError):  # ModuleNotFoundError, malformed names
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, SafeRLModule)):
        raise InputError(f"{path}: checkpoint names unknown class {tag!r} (not a lightning_saferl module class)")
    return cls


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at `path`, loaded with weights_only=True (tensors and plain containers only: nothing
    in the file is executed). Raises MissingFileError / InputError naming the path."""
    import os

    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # with weights_only=True a failure is a refusal or a malformed file, never code run
        message = str(err)
        if "Unsupported global:" in message:  # a pickled object other than tensors and plain containers
            refused = message.split("Unsupported global:", 1)[1].split(" was not an allowed global")[0].strip()
            raise InputError(f"{path}: refused to load: the checkpoint holds {refused}, which weights_only=True "
                             "does not allow (nothing in it was executed)") from None
        if "unsupported GLOBAL" in message:  # a global torch blocks outright: "... GLOBAL posix.system whose module"
            refused = message.split("unsupported GLOBAL", 1)[1].split()[0]
            raise InputError(f"{path}: refused to load: the checkpoint holds GLOBAL {refused}, an object that "
                             "weights_only=True refuses (nothing in it was executed)") from None
        if message.startswith("Weights only load failed") and "Unsupported operand" not in message:
            # another refusal by torch's restricted unpickler (an unknown operand is a file that is no pickle)
            raise InputError(f"{path}: refused to load: the checkpoint holds objects that weights_only=True "
                             "refuses (nothing in it was executed)") from None
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}); is it truncated or a "
                         "different kind of file?") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def checkpoint_class(path: str, checkpoint: Optional[dict] = None) -> type:
    """The lightning_saferl module class recorded in a checkpoint (its 'lightning_saferl_class' tag)."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    tag = checkpoint.get("lightning_saferl_class")
    if tag is None:
        raise InputError(f"{path}: not a lightning_saferl checkpoint (no 'lightning_saferl_class' entry)")
    return _module_class(tag, path)


def load_module(path: str, expected: Optional[type] = None, map_location: str | torch.device = "cpu"):
    """Load a lightning_saferl module from a checkpoint with weights_only=True, checking its type."""
    cls = checkpoint_class(path, read_checkpoint(path, map_location))
    if expected is not None and not issubclass(cls, expected):
        raise WrongTypeError(f"{path}: checkpoint holds a {cls.__name__}, expected a {expected.__name__}")
    # In a fresh context: a module loaded while LightningCLI instantiates another one (a critic path given to an
    # actor) must not see the context in which LightningCLI passes the outer module's init arguments as the
    # hyperparameters to record.
    return contextvars.Context().run(cls.load_from_checkpoint, path, map_location=map_location, weights_only=True)


def load_policy(path: str, map_location: str | torch.device = "cpu"):
    """Load any trained actor checkpoint as a ready-to-act module (eval mode)."""
    module = load_module(path, map_location=map_location)
    if not isinstance(module, Policy):
        raise WrongTypeError(f"{path}: {type(module).__name__} is not a policy (it has no `act`)")
    return module.eval()


def resolve_critic(critic, cls: type):
    """A frozen critic from a module, a checkpoint path, or None."""
    if critic is None:
        return None
    if isinstance(critic, (str,)) or hasattr(critic, "__fspath__"):
        try:
            critic = load_module(str(critic), expected=cls)
        except FileNotFoundError:
            raise MissingFileError(f"{cls.__name__} checkpoint not found: {critic}") from None
    if not isinstance(critic, cls):
        raise WrongTypeError(f"expected a {cls.__name__} (module or checkpoint path), got {type(critic).__name__}")
    return critic.requires_grad_(False).eval()
