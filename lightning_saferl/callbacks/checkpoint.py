"""SafeCheckpoint: keep the checkpoint of the best evaluation under a safety-first ranking."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_saferl.callbacks.rollout import ROLLOUT_PREFIX
from lightning_saferl.errors import InputError

__all__ = ["SafeCheckpoint", "safety_score", "UNSAFE_OFFSET"]

#: subtracted from the score of every unsafe evaluation, so any safe one (score > -UNSAFE_OFFSET) ranks higher
UNSAFE_OFFSET = 1e6


def safety_score(metrics: Mapping[str, Any], cost_limit: float = 0.0, prefix: str = ROLLOUT_PREFIX) -> float:
    """Safety-first score of rollout metrics (keys ``<prefix>return_mean``, ``<prefix>cost_mean``, optionally
    ``<prefix>normalized_return`` / ``<prefix>normalized_cost``).

    safe  := cost_mean <= cost_limit   (raw mean episode cost; equivalently normalized_cost <= 1)
    score := R                         if safe
             -C - UNSAFE_OFFSET        otherwise
    with (R, C) = (normalized_return, normalized_cost) when both are present (tasks with DSRL references),
    else (return_mean, cost_mean). Hence any safe evaluation outranks any unsafe one (for returns above
    -UNSAFE_OFFSET), safe ones rank by return, unsafe ones by lower cost.
    """
    def get(name: str) -> Optional[float]:
        value = metrics.get(prefix + name)
        return None if value is None else float(value)

    ret, cost = get("return_mean"), get("cost_mean")
    if ret is None or cost is None:
        raise KeyError(f"safety_score: metrics need {prefix}return_mean and {prefix}cost_mean, got {sorted(metrics)}")
    n_ret, n_cost = get("normalized_return"), get("normalized_cost")
    if n_ret is not None and n_cost is not None:
        ret, score_cost = n_ret, n_cost
    else:
        score_cost = cost
    return ret if cost <= cost_limit else -score_cost - UNSAFE_OFFSET


class SafeCheckpoint(Checkpoint):
    """Saves ``<dirpath>/<filename>.ckpt`` whenever a new rollout (``rollout/step`` in
    ``trainer.callback_metrics``, published by `SafeRollout`) scores strictly higher under `safety_score` than
    every earlier one. The limit is ``cost_limit`` if given, else ``rollout/cost_limit`` from the metrics.
    ``dirpath`` defaults to ``<trainer.log_dir or default_root_dir>/checkpoints``. The best score, its step and
    path are kept in the callback state, so they survive a resume from a Lightning checkpoint.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "safe-best", cost_limit: Optional[float] = None):
        self.dirpath = dirpath
        self._dirpath_arg = dirpath  # the state key must not depend on the run directory (it changes on resume)
        self.filename = filename
        self.cost_limit = cost_limit
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_model_path = ""
        self._last_rollout_step: Optional[int] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self._dirpath_arg, filename=self.filename)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step, "best_model_path": self.best_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict["best_score"]
        self.best_step = state_dict["best_step"]
        self.best_model_path = state_dict["best_model_path"]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check(trainer)

    def _check(self, trainer: "pl.Trainer") -> None:
        metrics = trainer.callback_metrics
        step = metrics.get(ROLLOUT_PREFIX + "step")
        if step is None or int(step) == self._last_rollout_step:
            return
        self._last_rollout_step = int(step)
        if self.cost_limit is not None:
            limit = self.cost_limit
        else:
            limit = float(metrics.get(ROLLOUT_PREFIX + "cost_limit", 0.0))
        score = safety_score(metrics, limit)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, int(step)
            self.best_model_path = os.path.join(self.dirpath, f"{self.filename}.ckpt")
            trainer.save_checkpoint(self.best_model_path, weights_only=False)  # full state: resumable


class LastCheckpoint(Checkpoint):
    """Keeps `<dirpath>/last.ckpt` current: every `every_n_train_steps` optimiser steps, at the end of training and
    when a run is stopped by SIGTERM, so a killed run loses at most `every_n_train_steps` steps. After any other
    exception (a non-finite loss, a bug) nothing is written: the last good checkpoint stays. The file is written
    under a temporary name and renamed, so a kill during the write never leaves a truncated `last.ckpt`.
    `dirpath` defaults to `<trainer.log_dir>/checkpoints`.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: int = 1000):
        if every_n_train_steps < 1:
            raise InputError(f"LastCheckpoint: every_n_train_steps must be >= 1, got {every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = int(every_n_train_steps)
        self.saved_step: Optional[int] = None

    @property
    def path(self) -> Optional[str]:
        return None if self.dirpath is None else os.path.join(self.dirpath, self.FILENAME)

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised by Lightning between steps: the state is consistent
            self.save(trainer)
        if self.path is not None and os.path.isfile(self.path):
            step = f" (step {self.saved_step})" if self.saved_step is not None else ""
            exception.last_checkpoint = f"{self.path}{step}"

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.saved_step or trainer.sanity_checking or self.path is None:
            return
        tmp = self.path + ".tmp"
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimiser, loops, data sampler
        except BaseException:
            if trainer.is_global_zero and os.path.exists(tmp):  # a failed write leaves no partial file
                os.remove(tmp)
            raise
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("LastCheckpoint.save")
        self.saved_step = trainer.global_step
