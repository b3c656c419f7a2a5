"""SafeRollout: periodic evaluation episodes of the module's Policy during training."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_saferl.errors import InputError
from lightning_saferl.evaluation import EpisodeRunner, merge_episodes, rank_slice

__all__ = ["SafeRollout", "ROLLOUT_PREFIX"]

ROLLOUT_PREFIX = "rollout/"


def task_from_trainer(trainer: "pl.Trainer", task: Any, owner: str) -> Any:
    """``task`` if given, else the datamodule's ``task_spec`` (or ``task`` id). Raises if neither exists."""
    if task is not None:
        return task
    datamodule = getattr(trainer, "datamodule", None)
    for attr in ("task_spec", "task"):
        found = getattr(datamodule, attr, None)
        if found is not None:
            return found
    raise InputError(f"{owner}: no task to evaluate on: pass task=... or train with a datamodule that has a "
                     "`task_spec` or `task` attribute (e.g. OfflineDataModule)")


def due(trainer: "pl.Trainer", every_n_steps: int, last_step: int) -> bool:
    """True when ``global_step`` is a positive multiple of ``every_n_steps`` not handled yet."""
    step = trainer.global_step
    return step > 0 and step % every_n_steps == 0 and step != last_step


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's own train/eval flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def publish(trainer: "pl.Trainer", metrics: Mapping[str, float], extra: Mapping[str, float] = ()) -> None:
    """Writes ``metrics`` and ``extra`` into ``trainer.callback_metrics`` and ``metrics`` to every logger at
    ``global_step``. Direct logger calls (not ``LightningModule.log``) so values land at the exact step, are not
    gated by ``log_every_n_steps``, and can be published from ``on_train_end``."""
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in {**metrics, **dict(extra)}.items()})
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


@contextlib.contextmanager
def as_saved(precision_plugin: Any) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Context in which a module computes as it is saved and deployed; yields the input conversion to apply.
    Under mixed precision the weights are float32 and autocast only speeds up training, so nothing changes
    (float32); under a true precision ("bf16-true", "16-true") the weights have that dtype, so the plugin's
    forward context and input conversion apply."""
    if isinstance(precision_plugin, MixedPrecision):
        yield lambda x: x
    else:
        with precision_plugin.forward_context():
            yield precision_plugin.convert_input


class _SavedPolicy:
    """The module's Policy computed as saved (`as_saved`)."""

    def __init__(self, module: torch.nn.Module, precision_plugin: Any):
        self.module, self.precision = module, precision_plugin

    @property
    def device(self) -> torch.device:
        return self.module.device

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        with as_saved(self.precision) as convert:
            return self.module.act(convert(obs))


class SafeRollout(pl.Callback):
    """Every ``every_n_steps`` training steps (``global_step % every_n_steps == 0``) and once at the end of
    training, runs ``episodes`` evaluation episodes (`lightning_saferl.evaluation.EpisodeRunner`: episode i
    reset with ``seed + i``) of ``pl_module.act`` and publishes the metrics as ``rollout/<name>`` to the loggers
    and ``trainer.callback_metrics``.

    ``callback_metrics`` also receives ``rollout/step`` (the global step of the evaluation) and
    ``rollout/cost_limit`` (the limit the metrics refer to: ``cost_limit``, else the task's, else 0) for
    `SafeCheckpoint`. ``task`` defaults to ``trainer.datamodule.task_spec`` / ``.task``. Under DDP each rank
    runs its `rank_slice` of the episodes; the per-episode results are all-gathered so every rank publishes
    the same metrics over all episodes. The module is in eval mode during the rollout (each submodule's mode
    is restored afterwards) and acts as saved (`as_saved`: float32 under mixed precision). Other arguments are
    those of `EpisodeRunner`.
    """

    def __init__(self, every_n_steps: int = 1000, episodes: int = 10, num_envs: int = 10,
                 task: Union[str, Any, None] = None, reset_options: Optional[dict] = None, seed: int = 0,
                 max_episode_steps: Optional[int] = None, cost_limit: Optional[float] = None,
                 env_factory: Optional[Callable[[str], Any]] = None, progress: bool = False):
        if every_n_steps < 1:
            raise InputError(f"SafeRollout: every_n_steps must be >= 1, got {every_n_steps}")
        if episodes < 1:
            raise InputError(f"SafeRollout: episodes must be >= 1, got {episodes}")
        self.every_n_steps = every_n_steps
        self.episodes = episodes
        self.num_envs = num_envs
        self.task = task
        self.reset_options = reset_options
        self.seed = seed
        self.max_episode_steps = max_episode_steps
        self.cost_limit = cost_limit
        self.env_factory = env_factory
        self.progress = progress
        self.last_metrics: dict[str, float] = {}
        self._runner: Optional[EpisodeRunner] = None
        self._last_step = -1

    def runner(self, trainer: "pl.Trainer") -> EpisodeRunner:
        if self._runner is None:
            self._runner = EpisodeRunner(
                task_from_trainer(trainer, self.task, "SafeRollout"), episodes=self.episodes,
                num_envs=self.num_envs, seed=self.seed, reset_options=self.reset_options,
                max_episode_steps=self.max_episode_steps, env_factory=self.env_factory, cost_limit=self.cost_limit,
                progress=self.progress and trainer.is_global_zero)
        return self._runner

    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, float]:
        """Runs the rollout now and publishes it; returns the metrics (without the prefix)."""
        if not callable(getattr(pl_module, "act", None)):
            raise TypeError(f"SafeRollout: {type(pl_module).__name__} has no `act(obs)` method; it needs a module "
                            "that implements the Policy protocol (lightning_saferl.policy.Policy)")
        runner = self.runner(trainer)
        indices = rank_slice(self.episodes, trainer.global_rank, trainer.world_size)
        with eval_mode(pl_module):
            local = runner.run_episodes(_SavedPolicy(pl_module, trainer.precision_plugin), indices)
        episodes = merge_episodes(self._gather(trainer, local))
        if len(episodes["index"]) != self.episodes:
            raise RuntimeError(f"SafeRollout: gathered {len(episodes['index'])} episodes, expected {self.episodes}")
        metrics = runner.summarize(episodes)
        spec = runner.task_spec
        limit = self.cost_limit if self.cost_limit is not None else getattr(spec, "cost_limit", 0.0)
        publish(trainer, {ROLLOUT_PREFIX + k: v for k, v in metrics.items()},
                extra={ROLLOUT_PREFIX + "step": trainer.global_step, ROLLOUT_PREFIX + "cost_limit": limit})
        self.last_metrics = metrics
        self._last_step = trainer.global_step
        return metrics

    @staticmethod
    def _gather(trainer: "pl.Trainer", local: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
            return parts
        return [local]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if due(trainer, self.every_n_steps, self._last_step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
