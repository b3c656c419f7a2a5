import h5py
import numpy as np
import pytest
import torch

from lightning_saferl.data.format import (
    ACTION_BOUND, REQUIRED_KEYS, DatasetError, Transitions, read_dataset, read_dims, write_dataset,
)


def make_arrays(n=6, obs_dim=3, act_dim=2, constraint=True):
    rng = np.random.default_rng(0)
    arrays = {
        "observations": rng.normal(size=(n, obs_dim)),
        "next_observations": rng.normal(size=(n, obs_dim)),
        "actions": rng.uniform(-0.5, 0.5, size=(n, act_dim)),
        "rewards": np.arange(n, dtype=np.float64),
        "costs": np.zeros(n),
        "terminals": np.zeros(n),
        "timeouts": np.zeros(n),
    }
    if constraint:
        arrays["constraint_values"] = rng.normal(size=n)
    return arrays


def write_raw(path, arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    return path


def test_round_trip_values_done_mask_and_clipping(tmp_path):
    arrays = make_arrays()
    arrays["actions"][0] = [1.0, -1.0]
    arrays["actions"][1] = [3.0, 0.25]
    arrays["terminals"][2] = 1
    arrays["timeouts"][4] = 1
    path = write_dataset(tmp_path / "sub" / "d.hdf5", arrays, attrs={"task": "x"})
    assert path.exists() and not (tmp_path / "sub" / "d.hdf5.tmp").exists()
    with h5py.File(path) as f:
        assert f["terminals"].dtype == bool and f.attrs["task"] == "x"
    t = read_dataset(path)
    assert len(t) == 6 and t.obs_dim == 3 and t.act_dim == 2
    np.testing.assert_allclose(t.observations.numpy(), arrays["observations"], rtol=1e-6)
    np.testing.assert_allclose(t.next_observations.numpy(), arrays["next_observations"], rtol=1e-6)
    np.testing.assert_allclose(t.rewards.numpy(), arrays["rewards"])
    np.testing.assert_allclose(t.constraint_values.numpy(), arrays["constraint_values"], rtol=1e-6)
    assert t.observations.dtype == torch.float32 and t.terminals.dtype == torch.float32
    # clipping to ±(1 - 1e-5)
    assert t.actions[0].tolist() == pytest.approx([ACTION_BOUND, -ACTION_BOUND])
    assert t.actions[1].tolist() == pytest.approx([ACTION_BOUND, 0.25])
    assert t.actions.abs().max().item() < 1.0
    assert t.done.tolist() == [0, 0, 1, 0, 1, 0]
    assert t.mask.tolist() == [1, 1, 0, 1, 0, 1]


def test_reward_scale_and_optional_constraint(tmp_path):
    path = write_dataset(tmp_path / "d.h5", make_arrays(constraint=False))
    t = read_dataset(path, reward_scale=2.5)
    assert t.constraint_values is None
    assert t.rewards.tolist() == [0.0, 2.5, 5.0, 7.5, 10.0, 12.5]
    assert read_dims(path) == (3, 2)


def test_missing_key_lists_found_keys(tmp_path):
    arrays = make_arrays()
    del arrays["costs"]
    path = write_raw(tmp_path / "m.hdf5", arrays)
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "'costs'" in msg and "missing" in msg
    assert "rewards" in msg and "observations" in msg  # keys found


def test_lengths_disagree_lists_each_length(tmp_path):
    arrays = make_arrays()
    arrays["rewards"] = np.zeros(5)
    path = write_raw(tmp_path / "l.hdf5", arrays)
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "different lengths" in msg
    assert "rewards=5" in msg and "observations=6" in msg and "costs=6" in msg


@pytest.mark.parametrize("kw,expected,found", [({"obs_dim": 4}, "(N, 4)", "(6, 3)"),
                                               ({"act_dim": 1}, "(N, 1)", "(6, 2)")])
def test_shape_mismatch_with_env(tmp_path, kw, expected, found):
    path = write_dataset(tmp_path / "s.hdf5", make_arrays())
    with pytest.raises(DatasetError) as e:
        read_dataset(path, **kw)
    msg = str(e.value)
    assert msg.startswith(str(path)) and f"expected {expected}" in msg and f"found {found}" in msg
    assert ("observation" if "obs_dim" in kw else "action") in msg


def test_next_observation_shape_and_rank(tmp_path):
    arrays = make_arrays()
    arrays["next_observations"] = arrays["next_observations"][:, :2]
    with pytest.raises(DatasetError, match="next_observations"):
        read_dataset(write_raw(tmp_path / "a.hdf5", arrays))
    arrays = make_arrays()
    arrays["rewards"] = arrays["rewards"][:, None]
    with pytest.raises(DatasetError, match=r"'rewards' has shape \(6, 1\)"):
        read_dataset(write_raw(tmp_path / "b.hdf5", arrays))


def test_non_finite_counts_and_first_row(tmp_path):
    arrays = make_arrays()
    arrays["observations"][3, 1] = np.nan
    arrays["observations"][5, 0] = np.nan
    arrays["observations"][5, 2] = np.inf
    arrays["rewards"][2] = -np.inf
    path = write_raw(tmp_path / "n.hdf5", arrays)
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    msg = str(e.value)
    assert msg.startswith(str(path))
    assert "observations: 2 NaN and 1 inf value(s) in 2 row(s), first at row 3" in msg
    assert "rewards: 0 NaN and 1 inf value(s) in 1 row(s), first at row 2" in msg
    assert "costs" not in msg


def test_write_refuses_bad_arrays(tmp_path):
    arrays = make_arrays()
    arrays["costs"][1] = np.nan
    with pytest.raises(DatasetError, match="costs: 1 NaN"):
        write_dataset(tmp_path / "w.hdf5", arrays)
    assert not (tmp_path / "w.hdf5").exists()
    with pytest.raises(DatasetError, match="unknown key"):
        write_dataset(tmp_path / "w.hdf5", {**make_arrays(), "extra": np.zeros(6)})


def test_empty_files(tmp_path):
    no_keys = tmp_path / "nokeys.hdf5"
    h5py.File(no_keys, "w").close()
    with pytest.raises(DatasetError) as e:
        read_dataset(no_keys)
    assert str(e.value).startswith(str(no_keys)) and "no keys" in str(e.value)

    zero_rows = write_raw(tmp_path / "zero.hdf5", {k: v[:0] for k, v in make_arrays().items()})
    with pytest.raises(DatasetError) as e:
        read_dataset(zero_rows)
    assert str(e.value).startswith(str(zero_rows)) and "zero rows" in str(e.value)

    zero_bytes = tmp_path / "zero_bytes.hdf5"
    zero_bytes.write_bytes(b"")
    with pytest.raises(DatasetError, match="0 bytes"):
        read_dataset(zero_bytes)


def test_not_hdf5_and_missing_path(tmp_path):
    text = tmp_path / "data.hdf5"
    text.write_text("<html>not found</html>")
    with pytest.raises(DatasetError) as e:
        read_dataset(text)
    assert str(e.value).startswith(str(text)) and "not a readable HDF5 file" in str(e.value)
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        read_dims(text)

    missing = tmp_path / "nope.hdf5"
    with pytest.raises(DatasetError) as e:
        read_dataset(missing)
    assert str(e.value).startswith(str(missing)) and "does not exist" in str(e.value)
    assert isinstance(e.value, ValueError)


def hand_made():
    # episodes: rows 0-2 (terminal at 2), rows 3-4 (timeout at 4), rows 5-6 (cut at the last row)
    n = 7
    z = torch.zeros(n)
    return Transitions(
        observations=torch.zeros(n, 2), actions=torch.zeros(n, 1),
        rewards=torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 100.0, 200.0]),
        costs=torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
        next_observations=torch.zeros(n, 2),
        terminals=torch.tensor([0.0, 0, 1, 0, 0, 0, 0]),
        timeouts=torch.tensor([0.0, 0, 0, 0, 1, 0, 0]),
        constraint_values=z.clone(),
    )


def test_episode_helpers():
    t = hand_made()
    assert t.episode_index().tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert t.episode_index().dtype == torch.long
    assert t.num_episodes == 3
    assert t.episode_returns().tolist() == [6.0, 30.0, 300.0]
    assert t.episode_costs().tolist() == [2.0, 0.0, 1.0]
    # a done flag on the last row does not create an extra (empty) episode
    t.timeouts[-1] = 1
    assert t.episode_index().tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_select_and_to():
    t = hand_made()
    safe = t.episode_costs()[t.episode_index()] <= 0
    s = t.select(safe)
    assert len(s) == 2 and s.rewards.tolist() == [10.0, 20.0] and s.constraint_values is not None
    s2 = t.select(torch.tensor([6, 0]))
    assert s2.rewards.tolist() == [200.0, 1.0]
    assert t.to("cpu") is t
    assert t.to(torch.device("meta")).observations.device.type == "meta"
    assert set(t.tensors()) == set(REQUIRED_KEYS) | {"constraint_values"}
