"""The scarce PointRobot dataset: few safe expert episodes, selectable from the datamodule."""
import numpy as np
import pytest
import torch

from lightning_saferl.data.collect import EPISODE_MIX, rollout_point_robot, summarize
from lightning_saferl.data.datamodule import OfflineDataModule


def test_scarce_behaviour_has_few_expert_episodes_and_more_violations():
    assert 1 - sum(EPISODE_MIX["scarce"]) == pytest.approx(0.1)  # expert share
    mixed, scarce = (summarize(rollout_point_robot(30_000, seed=0, behavior=b, progress=False))
                     for b in ("mixed", "scarce"))
    assert scarce["unsafe_episode_share"] > mixed["unsafe_episode_share"] + 0.05
    assert scarce["violation_share"] > mixed["violation_share"]


def test_datamodule_generates_the_chosen_behaviour(tmp_path):
    data = OfflineDataModule(num_transitions=2000, behavior="scarce", cache_dir=str(tmp_path))
    assert data.dataset_path().name == "PointRobot-v0_scarce_n2000_seed0.hdf5"
    expected = rollout_point_robot(2000, seed=0, behavior="scarce", progress=False)
    assert np.array_equal(data.load().observations.numpy(), expected["observations"])
    with pytest.raises(ValueError, match="data.behavior"):
        OfflineDataModule(behavior="careful")
