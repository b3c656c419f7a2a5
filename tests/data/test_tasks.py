import dataclasses

import numpy as np
import pytest
import torch

from lightning_saferl.data.tasks import DSRL_URL_BASE, TASKS, TaskSpec, dsrl_task_ids, get_task

SAMPLE_IDS = [
    "OfflineAntCircle-v0", "OfflineAntRun-v0", "OfflineBallCircle-v0", "OfflineBallRun-v0",
    "OfflineCarCircle-v0", "OfflineCarRun-v0", "OfflineDroneCircle-v0", "OfflineDroneRun-v0",
    "OfflinePointButton1Gymnasium-v0", "OfflineCarGoal2Gymnasium-v0", "OfflinePointPush1Gymnasium-v0",
    "OfflineCarCircle2Gymnasium-v0", "OfflineAntVelocityGymnasium-v1", "OfflineWalker2dVelocityGymnasium-v1",
    "OfflineMetadrive-easysparse-v0", "OfflineMetadrive-harddense-v0",
]


def test_point_robot_entry():
    t = get_task("PointRobot-v0")
    assert (t.max_episode_steps, t.cost_limit, t.simulator, t.obs_dim, t.act_dim) == (300, 0.0, "point_robot", 11, 2)
    assert t.reward_min is None and t.url is None and not t.has_reference_scores and not t.is_dsrl
    with pytest.raises(ValueError, match="no DSRL reference scores"):
        t.normalized_return(1.0)
    with pytest.raises(ValueError, match="PointRobot-v0"):
        t.reward_scale_factor
    # hard constraint: limit 0 -> e = 1
    assert t.normalized_cost(0.0) == 1.0
    assert t.normalized_cost(3.0) == 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.cost_limit = 1.0


def test_registry_covers_dsrl():
    ids = dsrl_task_ids()
    assert len(ids) == 38 and "PointRobot-v0" not in ids
    for task_id in SAMPLE_IDS:
        assert task_id in ids
    sims = {TASKS[t].simulator for t in ids}
    assert sims == {"bullet", "safety_gymnasium", "metadrive"}
    assert sum(TASKS[t].simulator == "bullet" for t in ids) == 8
    assert sum(TASKS[t].simulator == "metadrive" for t in ids) == 9


@pytest.mark.parametrize("task_id", dsrl_task_ids())
def test_every_dsrl_task_is_consistent(task_id):
    t = get_task(task_id)
    assert t.task_id == task_id
    assert t.max_episode_steps > 0
    assert t.reward_max > t.reward_min
    assert t.cost_max > t.cost_min >= 0
    assert t.cost_limit == 10.0
    assert t.url == DSRL_URL_BASE + t.dataset_file and t.dataset_file.endswith(".hdf5")


def test_known_values():
    # spot checks against DSRL's infos.py
    t = get_task("OfflineCarCircle-v0")
    assert (t.max_episode_steps, t.reward_max, t.reward_min, t.cost_max) == (300, 534.3060913085938,
                                                                               3.484419822692871, 100.0)
    assert t.dataset_file == "SafetyCarCircle-v0-100-1450.hdf5"
    t = get_task("OfflineAntVelocityGymnasium-v1")
    assert t.max_episode_steps == 1000 and t.dataset_file == "SafetyAntVelocityGymnasium-v1-250-2249.hdf5"
    assert get_task("OfflineBallRun-v0").max_episode_steps == 100


def test_normalisation_formulas_hand_computed():
    t = TaskSpec(task_id="T", max_episode_steps=200, simulator="bullet", cost_limit=10.0,
                 reward_min=10.0, reward_max=110.0, cost_min=0.0, cost_max=50.0)
    assert t.normalized_return(60.0) == pytest.approx(0.5)
    assert t.normalized_return(10.0) == 0.0 and t.normalized_return(110.0) == 1.0
    assert t.normalized_cost(5.0) == pytest.approx(0.5)  # default limit 10, e = 0
    assert t.normalized_cost(5.0, limit=20) == pytest.approx(0.25)
    assert t.normalized_cost(0.0, limit=0) == 1.0  # e = 1 at limit 0
    assert t.normalized_cost(2.0, limit=0) == 3.0
    # reward scaling: r * 200 / (110 - 10) = 2 r
    assert t.reward_scale_factor == pytest.approx(2.0)
    assert t.dsrl_reward_scale(1.5) == pytest.approx(3.0)
    # works elementwise on arrays and tensors
    np.testing.assert_allclose(t.normalized_return(np.array([10.0, 60.0])), [0.0, 0.5])
    assert torch.allclose(t.normalized_cost(torch.tensor([0.0, 10.0])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="cost limit"):
        t.normalized_cost(1.0, limit=-1)


def test_unknown_id_lists_close_matches():
    with pytest.raises(KeyError) as e:
        get_task("OfflineCarCirlce-v0")
    assert "OfflineCarCircle-v0" in str(e.value) and "did you mean" in str(e.value)
    with pytest.raises(KeyError) as e:
        get_task("pointrobot-v0")
    assert "PointRobot-v0" in str(e.value)
    with pytest.raises(KeyError, match="known tasks"):
        get_task("zzzzzzzz")


def test_matches_dsrl_package_when_installed():
    """Every task's URL, episode length, reference returns and cost range equal DSRL's own `infos` (CI installs
    `dsrl==0.1.0 --no-deps`, which is enough to import it; skipped where dsrl is absent)."""
    infos = pytest.importorskip("dsrl.infos")
    for task_id in dsrl_task_ids():
        t = TASKS[task_id]
        key = next(k for k, url in infos.DATASET_URLS.items() if url.endswith("/" + t.dataset_file))
        ours = (t.url, t.max_episode_steps, t.reward_min, t.reward_max, t.cost_min, t.cost_max)
        theirs = (infos.DATASET_URLS[key], infos.DEFAULT_MAX_EPISODE_STEPS[key], infos.MIN_EPISODE_REWARD[key],
                  infos.MAX_EPISODE_REWARD[key], infos.MIN_EPISODE_COST[key], infos.MAX_EPISODE_COST[key])
        assert ours == theirs, f"{task_id} (DSRL's {key!r}): ours {ours}, DSRL's {theirs}"


def test_ids_and_simulators_match_the_dsrl_registrations_when_installed():
    import importlib

    import gymnasium

    infos = pytest.importorskip("dsrl.infos")
    assert {TASKS[t].url for t in dsrl_task_ids()} == set(infos.DATASET_URLS.values())  # no DSRL task missing
    entry_points = {"bullet": ("offline_bullet_safety_gym", "dsrl.offline_bullet_safety_gym."),
                    "safety_gymnasium": ("offline_safety_gymnasium", "safety_gymnasium.")}
    for simulator, (module, prefix) in entry_points.items():
        try:
            importlib.import_module(f"dsrl.{module}")  # registers that simulator's Offline... ids
        except ImportError:
            continue
        for task_id in (t for t in dsrl_task_ids() if TASKS[t].simulator == simulator):
            registered = gymnasium.registry[task_id]
            assert registered.entry_point.startswith(prefix), task_id
            assert registered.max_episode_steps == TASKS[task_id].max_episode_steps, task_id
