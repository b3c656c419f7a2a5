import h5py
import numpy as np
import pytest
import torch

from lightning_saferl.data.collect import collect, collect_main, rollout_point_robot
from lightning_saferl.data.format import read_dataset
from lightning_saferl.envs import point_robot as pr

STEPS = 20_000


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("collect") / "mixed.hdf5"
    summary = collect("PointRobot-v0", path, steps=STEPS, seed=0, num_envs=512, progress=False)
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f.keys()}
    return path, summary, arrays


def _episode_bounds(arrays):
    ends = (arrays["terminals"] > 0) | (arrays["timeouts"] > 0)
    ends[-1] = True
    last = np.flatnonzero(ends)
    return np.concatenate(([0], last[:-1] + 1)), last


def test_file_keys_dtypes_shapes(mixed):
    path, summary, arrays = mixed
    assert set(arrays) == {"observations", "next_observations", "actions", "rewards", "costs", "terminals",
                           "timeouts", "constraint_values"}
    assert arrays["observations"].shape == arrays["next_observations"].shape == (STEPS, 11)
    assert arrays["actions"].shape == (STEPS, 2) and np.abs(arrays["actions"]).max() <= 1.0
    for key in ("observations", "next_observations", "actions", "rewards", "costs", "constraint_values"):
        assert arrays[key].dtype == np.float32, key
    for key in ("rewards", "costs", "terminals", "timeouts", "constraint_values"):
        assert arrays[key].shape == (STEPS,), key
    data = read_dataset(path, obs_dim=11, act_dim=2)
    assert len(data) == STEPS and data.constraint_values is not None
    assert data.num_episodes == summary["episodes"]
    assert torch.equal(data.costs > 0, data.constraint_values > 0)


def test_same_seed_same_data_different_seed_different(mixed):
    _, _, arrays = mixed
    again = rollout_point_robot(STEPS, seed=0, num_envs=512, progress=False)
    other = rollout_point_robot(STEPS, seed=1, num_envs=512, progress=False)
    for key, value in arrays.items():
        np.testing.assert_array_equal(again[key].astype(value.dtype), value, err_msg=key)
    assert not np.array_equal(other["observations"], arrays["observations"])


def test_rows_follow_the_dynamics(mixed):
    _, _, arrays = mixed
    obs = torch.from_numpy(arrays["observations"]).double()
    states = torch.stack((obs[:, 0], obs[:, 1], obs[:, 2], torch.atan2(obs[:, 4], obs[:, 3])), dim=-1)
    next_states = pr.step_states(states, torch.from_numpy(arrays["actions"]).double())
    torch.testing.assert_close(pr.observe(next_states).float(), torch.from_numpy(arrays["next_observations"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(pr.compute_reward(states, next_states).float(), torch.from_numpy(arrays["rewards"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(pr.constraint_value(next_states).float(),
                               torch.from_numpy(arrays["constraint_values"]), atol=1e-4, rtol=0)
    # within an episode each row starts where the previous one ended
    cont = ~((arrays["terminals"] > 0) | (arrays["timeouts"] > 0))[:-1]
    np.testing.assert_array_equal(arrays["observations"][1:][cont], arrays["next_observations"][:-1][cont])
    terminal_next = torch.from_numpy(arrays["next_observations"][arrays["terminals"] > 0]).double()
    ends = torch.stack((terminal_next[:, 0], terminal_next[:, 1]), dim=-1)
    at_goal = (ends - torch.tensor(pr.GOAL, dtype=torch.float64)).norm(dim=-1) < pr.GOAL_RADIUS + 1e-5
    assert (at_goal | (ends.abs() > pr.BOUND - 1e-5).any(dim=-1)).all()


def test_mixed_data_holds_safe_and_unsafe_episodes(mixed):
    _, summary, arrays = mixed
    assert 0.04 <= summary["violation_share"] <= 0.2
    assert summary["violation_share"] == pytest.approx(float((arrays["costs"] > 0).mean()))
    first, last = _episode_bounds(arrays)
    ep_cost = np.add.reduceat(arrays["costs"], first)
    at_goal = np.linalg.norm(arrays["next_observations"][last, :2] - np.array(pr.GOAL), axis=1) < pr.GOAL_RADIUS
    start_in_hazard = arrays["observations"][first][:, [5, 8]].min(axis=1) < pr.HAZARD_RADIUS
    assert (at_goal & (ep_cost == 0)).mean() > 0.3  # safe, goal-reaching episodes
    assert 0.1 < (ep_cost > 0).mean() < 0.5  # hazard-entering episodes
    assert ((ep_cost > 0) & ~start_in_hazard).sum() > 20  # entered from outside, not only bad starts
    assert start_in_hazard.sum() > 10


def test_behaviours_order_by_safety_and_timeouts_at_300():
    expert = rollout_point_robot(10_000, seed=0, behavior="expert", num_envs=256, progress=False)
    random = rollout_point_robot(30_000, seed=0, behavior="random", num_envs=512, progress=False)
    assert (expert["costs"] > 0).mean() < 0.05 < (random["costs"] > 0).mean()
    first, last = _episode_bounds(random)
    lengths = last - first + 1
    timeouts = random["timeouts"][last] > 0
    assert timeouts.any() and (lengths[timeouts] == pr.MAX_EPISODE_STEPS).all()
    assert lengths.max() <= pr.MAX_EPISODE_STEPS
    assert not ((random["timeouts"] > 0) & (random["terminals"] > 0)).any()


def test_collect_main_and_errors(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.hdf5"
    summary = collect_main(["--task", "PointRobot-v0", "--out", str(out), "--steps", "1000", "--seed", "3",
                            "--behavior", "expert", "--no-progress"])
    assert out.exists() and summary["transitions"] == 1000
    assert "episodes" in capsys.readouterr().out
    with pytest.raises(KeyError, match="unknown task id 'Nowhere-v0'"):  # an InputError: one line from the CLI
        collect("Nowhere-v0", tmp_path / "x.hdf5", steps=10, seed=0)
    with pytest.raises(ValueError, match="behavior"):
        collect("PointRobot-v0", tmp_path / "x.hdf5", steps=10, seed=0, behavior="greedy")
