"""A run of a module that draws random numbers (diffusion noise and times, dropout masks), stopped after K steps and
resumed from its `last.ckpt`, continues bit for bit as the uninterrupted run: the first 50 losses after the resume
are exactly the uninterrupted run's losses K+1..K+50.

The stream of each step is seeded from (seed, rank, step) (`SafeRLModule.on_train_batch_start`), so nothing of the
global generator's state needs to be in the checkpoint. The resumed process here draws numbers of its own before
fitting, as a different process history would: only the seed given to `seed_everything` may matter.
`Trainer(deterministic=True)`: on CUDA some kernels add in a varying order (atomic adds), so without it the resumed
FisorActor run differed from the uninterrupted one in the 7th digit from the 6th step after the resume (H200); with
it two uninterrupted GPU runs agreed exactly. On CPU it changes nothing.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_saferl.actors import CDT, CPQ, BCQLag, COptiDICE
from lightning_saferl.actors.drcorl import BehaviorDiffusion, DrcorlPolicy
from lightning_saferl.actors.fisor import FisorActor
from lightning_saferl.callbacks import LastCheckpoint
from lightning_saferl.critics import FeasibilityCritic, RewardCritic
from lightning_saferl.data.datamodule import OfflineDataModule
from tiny_data import write_tiny

OBS, ACT = 11, 2
STOP, AFTER = 10, 50  # stop after STOP steps (mid-epoch: 25 steps per epoch), compare AFTER steps after the resume
TINY = dict(hidden_dims=(16,))
BASELINES = dict(hidden_dims=(16,), critic_hidden_dims=(16,))
SEQUENCE_LENGTH = {"CDT": 4}  # modules trained on windows of K steps

def _bcq_lag_above_its_threshold():
    """BCQ-Lag at limit 0 with Q_c raised by 1 everywhere: the cost estimate starts above the threshold, so the PID
    integral and multiplier grow from the first step (their state must travel in last.ckpt)."""
    module = BCQLag(OBS, ACT, vae_hidden_dim=16, cost_limit=0.0, **BASELINES)
    with torch.no_grad():
        module.cost_critic.net.layers[-1].bias.fill_(1.0)
    return module


FACTORIES = {
    "FisorActor": lambda: FisorActor(OBS, ACT, FeasibilityCritic(OBS, ACT, **TINY), RewardCritic(OBS, ACT, **TINY),
                                     hidden_dim=16, num_blocks=1),
    "BehaviorDiffusion": lambda: BehaviorDiffusion(OBS, ACT, hidden_dim=16, num_blocks=1),
    "DrcorlPolicy": lambda: DrcorlPolicy(OBS, ACT, behavior=BehaviorDiffusion(OBS, ACT, hidden_dim=16, num_blocks=1),
                                         reward_critic=RewardCritic(OBS, ACT, **TINY), hidden_dims=(16,),
                                         cost_hidden_dims=(16,), cost_limit=0.0, cost_slack=1e6),
    "BCQLag": _bcq_lag_above_its_threshold,
    "CPQ": lambda: CPQ(OBS, ACT, vae_hidden_dim=16, **BASELINES),  # alpha moves from the first step
    "COptiDICE": lambda: COptiDICE(OBS, ACT, **BASELINES),
    "CDT": lambda: CDT(OBS, ACT, sequence_length=SEQUENCE_LENGTH["CDT"], embedding_dim=16, num_layers=1, num_heads=2,
                       max_episode_steps=300, warmup_steps=20),
}


class Crash(RuntimeError):
    pass


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class CrashAt(pl.Callback):
    """Raises before the batch of step `step` (after the checkpoint of step `step` was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


def fit(name: str, data_path: str, checkpoints, callbacks=(), ckpt_path=None) -> list[float]:
    pl.seed_everything(0, verbose=False)
    module = FACTORIES[name]()
    if ckpt_path is not None:
        torch.rand(17)  # another process history: the global generator is somewhere else
    recorder = LossRecorder()
    trainer = pl.Trainer(max_steps=STOP + AFTER, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True,
                         callbacks=[recorder, LastCheckpoint(str(checkpoints), every_n_train_steps=STOP), *callbacks])
    data = OfflineDataModule(path=data_path, batch_size=32, steps_per_epoch=25, seed=0,
                             sequence_length=SEQUENCE_LENGTH.get(name))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return recorder.losses


@pytest.fixture(autouse=True)
def restore_determinism():
    """`Trainer(deterministic=True)` switches torch's deterministic algorithms on for the whole process."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("resume") / "tiny.hdf5")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resumed_run_repeats_the_uninterrupted_losses_exactly(name, data_path, tmp_path):
    uninterrupted = fit(name, data_path, tmp_path / "a")
    assert len(uninterrupted) == STOP + AFTER
    with pytest.raises(Crash):
        fit(name, data_path, tmp_path / "b", callbacks=[CrashAt(STOP)])
    last = tmp_path / "b" / LastCheckpoint.FILENAME
    assert torch.load(last, weights_only=True)["global_step"] == STOP
    resumed = fit(name, data_path, tmp_path / "b", ckpt_path=str(last))
    assert len(resumed) == AFTER
    assert resumed == uninterrupted[STOP:], f"{name}: losses after the resume differ from the uninterrupted run"
    assert len(set(resumed)) == AFTER  # the losses do change from step to step
