"""What `SafeRLModule` ties to optimiser steps, under gradient accumulation (4 micro-batches per step, 8 batches):

* EMA / Polyak targets move once per optimiser step (`after_optimizer_step`), not once per micro-batch:
  target_2 = (1 - tau_1) ((1 - tau_0) target_0 + tau_0 source_1) + tau_1 source_2, by hand;
* each micro-batch draws from its own random stream, seeded with step_seed(seed, rank, step, micro-batch).
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_saferl.actors.drcorl import BehaviorDiffusion
from lightning_saferl.actors.fisor import FisorActor, ema_rate
from lightning_saferl.critics import FeasibilityCritic, RewardCritic
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.seeding import step_seed
from tiny_data import write_tiny

OBS, ACT, ACCUMULATE, BATCHES, TAU = 11, 2, 4, 8, 0.5
TINY = dict(hidden_dims=(8,))

# name: (module, source attribute, target attribute, tau of update k)
CASES = {
    "RewardCritic": (lambda: RewardCritic(OBS, ACT, tau=TAU, **TINY), "q", "q_target", lambda k: TAU),
    "BehaviorDiffusion": (lambda: BehaviorDiffusion(OBS, ACT, hidden_dim=8, num_blocks=1, ema_tau=TAU),
                          "net", "ema", lambda k: TAU),
    "FisorActor": (lambda: FisorActor(OBS, ACT, FeasibilityCritic(OBS, ACT, **TINY), RewardCritic(OBS, ACT, **TINY),
                                      hidden_dim=8, num_blocks=1, ema_tau=TAU, ema_warmup=True),
                   "net", "ema", lambda k: ema_rate(k, TAU, warmup=True)),  # the warm-up counts updates, not batches
}


def flat(module: torch.nn.Module) -> torch.Tensor:
    """The parameters as one CPU vector (the Trainer may have moved the module to a GPU)."""
    return torch.cat([p.detach().flatten() for p in module.parameters()]).cpu()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("steps") / "tiny.hdf5")


def fit(module, data_path: str, callbacks, seed: int = 0) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=BATCHES // ACCUMULATE, accumulate_grad_batches=ACCUMULATE, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=OfflineDataModule(path=data_path, batch_size=16, steps_per_epoch=100, seed=seed))
    return trainer


@pytest.mark.parametrize("name", sorted(CASES))
def test_targets_move_once_per_optimizer_step(name, data_path):
    factory, source_name, target_name, tau = CASES[name]
    pl.seed_everything(0, verbose=False)
    module = factory()
    sources = [flat(getattr(module, source_name))]
    target = flat(getattr(module, target_name))

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sources.append(flat(getattr(pl_module, source_name)))

    trainer = fit(module, data_path, [Snapshot()])
    assert trainer.global_step == 2 and len(sources) == 1 + BATCHES
    steps = [i for i in range(1, len(sources)) if not torch.equal(sources[i], sources[i - 1])]
    assert steps == [ACCUMULATE, 2 * ACCUMULATE], f"{name}: the source changed after batches {steps}"
    for k, batch in enumerate(steps):  # by hand: two Polyak updates, with the sources after each step
        target = (1 - tau(k)) * target + tau(k) * sources[batch]
    moved = flat(getattr(module, target_name))
    assert torch.allclose(moved, target, rtol=0, atol=1e-6), \
        f"{name}: the target is not two Polyak updates away (max difference {(moved - target).abs().max():.2e})"


def test_each_micro_batch_draws_from_its_own_stream(data_path):
    pl.seed_everything(5, verbose=False)
    module = BehaviorDiffusion(OBS, ACT, hidden_dim=8, num_blocks=1)
    states = []
    losses = module.losses

    def recording(batch):
        states.append(torch.get_rng_state())
        return losses(batch)

    module.losses = recording
    fit(module, data_path, [])
    expected = [torch.Generator().manual_seed(step_seed(5, 0, i // ACCUMULATE, i % ACCUMULATE)).get_state()
                for i in range(BATCHES)]
    assert len(states) == BATCHES
    assert all(torch.equal(a, b) for a, b in zip(states, expected)), "streams are not step_seed(seed, rank, step, micro)"
    assert len({step_seed(5, 0, i // ACCUMULATE, i % ACCUMULATE) for i in range(BATCHES)}) == BATCHES
    assert step_seed(5, 0, 0) != step_seed(6, 0, 0) != step_seed(5, 1, 0)
