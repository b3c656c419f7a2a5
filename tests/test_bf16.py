"""Every module trains under Trainer(precision="bf16-mixed") on CPU: from the same seed, weights and batches, a few
steps under bf16 autocast give finite losses within bf16 tolerance of float32, and move the weights the same way.

Tolerances (tiny networks, 4 steps): step losses within 5% (bf16 keeps 8 significant bits, rel. rounding 2^-8
per operation) yet not bit-identical (autocast really ran); the total weight update of bf16 has cosine >= 0.9
with the float32 one.
"""
from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_saferl.actors import CDT, CPQ, BCQLag, COptiDICE
from lightning_saferl.actors.bc import BCAll, BCSafe
from lightning_saferl.actors.fisor import FisorActor
from lightning_saferl.critics import CostCritic, FeasibilityCritic, RewardCritic
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.data.format import write_dataset

try:
    from lightning_saferl.actors.drcorl import BehaviorDiffusion, DrcorlPolicy
except ImportError:  # DRCORL not in this checkout
    BehaviorDiffusion = DrcorlPolicy = None

OBS, ACT, STEPS = 11, 2, 4
TINY = dict(hidden_dims=(32, 32))
BASELINES = dict(hidden_dims=(32, 32), critic_hidden_dims=(32, 32), max_episode_steps=300)
SEQUENCE_LENGTH = {"CDT": 4}  # modules trained on windows of K steps


def tiny_dataset(path, n: int = 2000, episode: int = 50, seed: int = 0):
    """Random PointRobot-shaped data; even episodes cost-free (BCSafe keeps them), odd ones with costs."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS)).astype(np.float32)
    episode_id = np.arange(n) // episode
    costs = ((rng.random(n) < 0.3) & (episode_id % 2 == 1)).astype(np.float32)
    timeouts = (np.arange(n) % episode) == episode - 1
    return write_dataset(path, {
        "observations": obs, "next_observations": np.roll(obs, -1, axis=0),
        "actions": rng.uniform(-0.9, 0.9, (n, ACT)).astype(np.float32),
        "rewards": rng.standard_normal(n).astype(np.float32), "costs": costs,
        "terminals": np.zeros(n, dtype=bool), "timeouts": timeouts,
        "constraint_values": rng.standard_normal(n).astype(np.float32)})


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return str(tiny_dataset(tmp_path_factory.mktemp("bf16") / "tiny.hdf5"))


def _fisor():
    return FisorActor(OBS, ACT, FeasibilityCritic(OBS, ACT, **TINY), RewardCritic(OBS, ACT, **TINY),
                      hidden_dim=32, num_blocks=1)


def _drcorl():
    behavior = BehaviorDiffusion(OBS, ACT, hidden_dim=32, num_blocks=1)
    # limit 0 with a huge slack keeps the estimate inside the band: the PCGrad (both objectives) step runs
    return DrcorlPolicy(OBS, ACT, behavior, RewardCritic(OBS, ACT, **TINY), hidden_dims=(32, 32),
                        cost_hidden_dims=(32, 32), cost_limit=0.0, cost_slack=1e6)


FACTORIES = {
    "FeasibilityCritic": lambda: FeasibilityCritic(OBS, ACT, **TINY),
    "RewardCritic": lambda: RewardCritic(OBS, ACT, **TINY),
    "CostCritic": lambda: CostCritic(OBS, ACT, **TINY),
    "FisorActor": _fisor,
    "BCAll": lambda: BCAll(OBS, ACT, **TINY),
    "BCAll-gaussian": lambda: BCAll(OBS, ACT, head="gaussian", **TINY),
    "BCSafe": lambda: BCSafe(OBS, ACT, **TINY),
    "BCQLag": lambda: BCQLag(OBS, ACT, vae_hidden_dim=16, **BASELINES),
    "CPQ": lambda: CPQ(OBS, ACT, vae_hidden_dim=16, **BASELINES),
    "COptiDICE": lambda: COptiDICE(OBS, ACT, **BASELINES),
    "CDT": lambda: CDT(OBS, ACT, sequence_length=SEQUENCE_LENGTH["CDT"], embedding_dim=16, num_layers=1, num_heads=2,
                       max_episode_steps=300, lr=1e-3, warmup_steps=1),
}
if DrcorlPolicy is not None:
    FACTORIES["BehaviorDiffusion"] = lambda: BehaviorDiffusion(OBS, ACT, hidden_dim=32, num_blocks=1)
    FACTORIES["DrcorlPolicy"] = _drcorl


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainable(module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def fit(name: str, precision: str, data_path: str):
    pl.seed_everything(0, verbose=False)
    module = FACTORIES[name]()
    before = trainable(module)
    recorder = LossRecorder()
    trainer = pl.Trainer(max_steps=STEPS, precision=precision, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder])
    dm = OfflineDataModule(path=data_path, batch_size=64, steps_per_epoch=100, seed=0,
                           sequence_length=SEQUENCE_LENGTH.get(name))
    trainer.fit(module, datamodule=dm)
    after = trainable(module)
    update = torch.cat([(after[k] - before[k]).flatten() for k in before])
    return recorder.losses, update


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bf16_mixed_matches_fp32(name, data_path):
    losses32, update32 = fit(name, "32-true", data_path)
    losses16, update16 = fit(name, "bf16-mixed", data_path)
    assert len(losses16) == len(losses32) == STEPS
    assert all(np.isfinite(losses16)), f"{name}: non-finite bf16 losses {losses16}"
    assert losses16 != losses32, f"{name}: bf16 losses identical to fp32: autocast did not run"
    np.testing.assert_allclose(losses16, losses32, rtol=5e-2, atol=1e-3, err_msg=f"{name}: bf16 vs fp32 losses")
    assert update32.norm() > 0, f"{name}: no weight update"
    cosine = float(update16 @ update32 / (update16.norm() * update32.norm()))
    assert cosine >= 0.9, f"{name}: bf16 weight update direction differs from fp32 (cosine {cosine:.3f})"
