"""What every lightning-saferl module shares: loss logging with a non-finite check (decided across DDP ranks),
the optimiser, per-step random streams, a hook after each optimiser step, access to the whole dataset, and a class
tag in checkpoints so a policy loads in one call."""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Optional

import lightning as L
import torch

from lightning_saferl.errors import InputError
from lightning_saferl.seeding import seed_generators, step_seed


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf: training stops at once, the last good checkpoint is kept.

    ``last_checkpoint`` (set by the checkpointing callback when it knows one) is appended to the message."""

    last_checkpoint: Optional[str] = None

    def __str__(self) -> str:
        message = super().__str__()
        if self.last_checkpoint is None:
            return message
        return f"{message} Last good checkpoint: {self.last_checkpoint}"


def cosine_decay(step: int, decay_steps: int) -> float:
    """Learning-rate factor 0.5 (1 + cos(pi min(step, decay_steps) / decay_steps)): 1 -> 0, then 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, decay_steps) / decay_steps))


class SafeRLModule(L.LightningModule):
    """Base LightningModule: one Adam optimiser (optional cosine decay) and automatic optimisation.

    Random stream: before each training batch, torch's generators (CPU and the module's device) are seeded with
    `step_seed(seed, rank, global_step, micro_batch)`, seed = the one given to `seed_everything` (else torch's
    initial seed at fit start). Diffusion noise, timesteps and dropout masks thus differ between DDP ranks, repeat
    from run to run, and a run resumed from a checkpoint draws exactly what the uninterrupted run drew.

    EMA / Polyak updates belong in `after_optimizer_step`, which runs once per optimiser step (not per
    micro-batch under gradient accumulation)."""

    lr: float = 3e-4
    cosine_decay_steps: Optional[int] = None
    #: init arguments read only when acting: the trained weights never depend on them, so the pipeline reuses a
    #: finished stage when only these change (`set_acting_hparams`)
    acting_hparams: tuple[str, ...] = ()
    sample_weights: Optional[torch.Tensor] = None
    test_episodes: int = 20
    _weights_computed: bool = False

    def losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(losses to minimise, extra figures to log) for one batch."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, extras = self.losses(batch)
        total = sum(losses.values())
        failed = self._nonfinite_ranks(total)
        if failed:  # find the culprit only when it fails
            trainer = self._trainer
            where = "" if trainer is None or trainer.world_size == 1 else \
                f" on rank {', '.join(map(str, failed))} of {trainer.world_size} (every rank stops)"
            if torch.isfinite(total):
                what = f"the loss is non-finite{where}"
            else:
                name, value = next(((k, v) for k, v in losses.items() if not torch.isfinite(v).all()),
                                   ("sum of losses", total))
                what = f"loss '{name}' is {value.item()}{where}"
            raise NonFiniteLossError(
                f"{type(self).__name__}: {what} at step {self.global_step}; training stopped before the update "
                f"(lr={self.lr}). Check the dataset for extreme values or lower the learning rate.")
        trainer = self._trainer
        if trainer is not None and (self.global_step + 1) % trainer.log_every_n_steps == 0:  # ~0.4 ms per log call
            self.log_dict({f"train/{k}": v.detach() for k, v in {**losses, **extras}.items()})
            self.log("loss", total.detach(), prog_bar=True)
        return total

    def _nonfinite_ranks(self, total: torch.Tensor) -> list[int]:
        """Ranks whose loss is NaN / inf: one device sync per step, and under DDP one all-gather of a flag, so that
        every rank raises together instead of the others waiting forever in the gradient all-reduce."""
        finite = torch.isfinite(total.detach())
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return [] if finite else [0]
        flags = self.all_gather(finite.to(torch.float32)).reshape(-1)
        return [rank for rank, ok in enumerate(flags.tolist()) if not ok]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seeds this batch's random stream (class docstring). A subclass overriding this hook calls super()."""
        trainer = self.trainer
        micro_batch = batch_idx % trainer.accumulate_grad_batches
        seed_generators(step_seed(self._stream_base, trainer.global_rank, trainer.global_step, micro_batch),
                        self.device)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def set_acting_hparams(self, values: dict[str, Any]) -> None:
        """Change acting-only init arguments (`acting_hparams`) of a trained module, checked as `__init__` checks
        them."""
        unknown = sorted(set(values) - set(self.acting_hparams))
        if unknown:
            raise InputError(f"{type(self).__name__}: {unknown} are not acting settings; acting settings: "
                             f"{list(self.acting_hparams)}")
        self.check_acting_hparams({**self.hparams, **values})
        self.hparams.update(values)

    def check_settings(self) -> None:
        """Raise InputError for init arguments no run trains with: a learning rate (`lr`, `*_lr`) that is not > 0,
        a cost budget (`cost_limit`, `target_cost`) that is not a finite number >= 0. `fit` and the pipeline call
        this before training (a constructor checks what only its class knows)."""
        for key, value in self.hparams.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if (key == "lr" or key.endswith("_lr")) and not value > 0:
                raise InputError(f"{type(self).__name__}: {key} must be > 0, got {value}")
            if key in ("cost_limit", "target_cost") and not (math.isfinite(value) and value >= 0):
                raise InputError(f"{type(self).__name__}: {key} must be a finite cost budget >= 0, got {value}")

    @classmethod
    def check_acting_hparams(cls, hparams: dict[str, Any]) -> None:
        """Raise InputError for invalid acting settings in `hparams` (subclasses with acting settings)."""

    def after_optimizer_step(self) -> None:
        """Runs once after every optimiser step: EMA / Polyak target updates go here. `global_step` does not count
        this step yet: it reads the step's 0-based index."""

    def _evaluate(self, batch: dict, prefix: str) -> None:
        if not self._weights_computed:
            self.on_fit_start()
        losses, extras = self.losses(batch)
        self.log_dict({f"{prefix}/{k}": v for k, v in {**losses, **extras}.items()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Losses on held batches; for policies (modules with `act`, the `Policy` protocol) also episodes on the
        task's environment (once)."""
        self._evaluate(batch, "test")
        if batch_idx == 0 and callable(getattr(self, "act", None)):
            from lightning_saferl.evaluation import EpisodeRunner

            metrics = EpisodeRunner(self.trainer.datamodule.task, episodes=self.test_episodes).run(self)
            self.log_dict({f"test/rollout_{k}": float(v) for k, v in metrics.items()
                           if isinstance(v, (int, float))}, batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel for all tensors: ~3x faster
        optimizer = torch.optim.Adam(params, lr=self.lr, fused=fused or None)
        if not self.cosine_decay_steps:
            return optimizer
        # cosine decay to 0 over cosine_decay_steps, then held at 0 (optax.cosine_decay_schedule, as FISOR's
        # reference); torch's CosineAnnealingLR would climb back up after T_max.
        factor = partial(cosine_decay, decay_steps=self.cosine_decay_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def dataset(self):
        """The full training dataset (`Transitions`) of the attached OfflineDataModule."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "transitions"):
            raise RuntimeError(f"{type(self).__name__} needs the whole dataset before training: "
                               "fit it with an OfflineDataModule (trainer.fit(model, datamodule=...)).")
        return datamodule.transitions

    def compute_sample_weights(self, data) -> Optional[torch.Tensor]:
        """Per-transition loss weights over the whole dataset, computed once at fit start (None: unweighted)."""
        return None

    def on_fit_start(self) -> None:
        self._stream_base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        with torch.no_grad():
            weights = self.compute_sample_weights(self.dataset().to(self.device))
        self.sample_weights = None if weights is None else weights.detach()
        self._weights_computed = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lightning_saferl_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
