"""The DSRL-style dataset builder: PPO-Lagrangian pieces against hand-computed values, the density filter on
synthetic episodes, the dataset card, and - where Bullet-Safety-Gym is installed - a tiny build on
SafetyBallCircle-v0 that the OfflineDataModule loads, resumed after an interruption to the same file."""
import json
import math

import h5py
import numpy as np
import pytest
import torch

from lightning_saferl.cli import main
from lightning_saferl.data.build import build_main, dataset_card, default_thresholds, density_filter, \
    pareto_frontier
from lightning_saferl.data.format import REQUIRED_KEYS, read_dataset
from lightning_saferl.data.ppo_lagrangian import PIDLagrangian, RunningNorm, clipped_surrogate, gae, \
    lagrangian_advantage
from lightning_saferl.data.tasks import get_task
from lightning_saferl.errors import InputError

TASK = "OfflineBallCircle-v0"


# --------------------------------------------------------------------------- PPO-Lagrangian pieces
def _gae(rewards, values, next_values, terminals, ends, gamma=0.9, lam=0.5):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return gae(t(values), t(rewards), t(next_values), t(terminals), t(ends), gamma, lam).tolist()


def test_gae_three_steps_terminating():
    # deltas: 1 + .9*2 - 1 = 1.8; 0 + .9*3 - 2 = .7; 2 + 0 - 3 = -1 (terminal: no bootstrap)
    # A2 = -1; A1 = .7 + .45*(-1) = .25; A0 = 1.8 + .45*.25 = 1.9125
    adv = _gae([1, 0, 2], [1, 2, 3], [2, 3, 4], [0, 0, 1], [0, 0, 1])
    assert adv == pytest.approx([1.9125, 0.25, -1.0])


def test_gae_time_limit_bootstraps_and_restarts():
    # episode ends by time limit at t=1 (bootstraps V=3), a new one starts at t=2 (rollout end bootstraps V=4)
    # deltas: 1.8, .7, 2 + .9*4 - 3 = 2.6; A2 = 2.6; A1 = .7 (episode end); A0 = 1.8 + .45*.7 = 2.115
    adv = _gae([1, 0, 2], [1, 2, 3], [2, 3, 4], [0, 0, 0], [0, 1, 0])
    assert adv == pytest.approx([2.115, 0.7, 2.6])


def test_multiplier_rises_over_threshold_and_stays_nonnegative():
    ascent = PIDLagrangian(threshold=10.0, kp=0.0, ki=0.1, kd=0.0)  # plain gradient ascent, step 0.1
    assert ascent.update(30.0) == pytest.approx(2.0)
    assert ascent.update(30.0) == pytest.approx(4.0)
    assert ascent.update(0.0) == pytest.approx(3.0)  # below the threshold: falls
    for _ in range(10):
        assert ascent.update(0.0) >= 0.0
    assert ascent.multiplier == 0.0 and ascent.integral == 0.0
    pid = PIDLagrangian(threshold=10.0, kp=1.0, ki=0.0, kd=0.5)
    assert pid.update(14.0) == pytest.approx(4.0)  # k_p e
    assert pid.update(16.0) == pytest.approx(6.0 + 0.5 * 2.0)  # + k_d (rise of the cost)
    assert pid.update(0.0) == 0.0  # k_p e < 0: clamped at 0
    free = PIDLagrangian(threshold=math.inf, kp=1.0, ki=1.0, kd=1.0)
    assert free.update(1e6) == 0.0


def test_clipped_surrogate():
    up, down = math.log(1.5), math.log(0.5)
    cases = [(up, 1.0, -1.2), (up, -1.0, 1.5), (down, 1.0, -0.5), (down, -1.0, 0.8), (0.0, 2.0, -2.0)]
    for log_ratio, advantage, loss in cases:
        log_prob = torch.tensor([log_ratio], requires_grad=True)
        value = clipped_surrogate(log_prob, torch.zeros(1), torch.tensor([advantage]), clip=0.2)
        assert value.item() == pytest.approx(loss)
    clipped = torch.tensor([up], requires_grad=True)
    clipped_surrogate(clipped, torch.zeros(1), torch.ones(1), clip=0.2).backward()
    assert clipped.grad.item() == 0.0  # past the clip a positive advantage pushes no further


def test_lagrangian_advantage_weights_and_normalises():
    adv = lagrangian_advantage(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]), multiplier=1.0)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # (A_r - A_c) / 2 = [-1, 0, 1], std 1
    assert lagrangian_advantage(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]), 0.0).tolist() == \
        pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)


def test_running_norm_merges_batches():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 + 2
    norm = RunningNorm(3)
    norm.update(x[:100])
    norm.update(x[100:])
    assert torch.allclose(norm.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, x.var(0, unbiased=False), rtol=1e-5)


# --------------------------------------------------------------------------- the density filter
def test_pareto_frontier():
    costs = np.array([0, 0, 5, 10, 10, 20, 30])
    returns = np.array([1, 3, 2, 8, 9, 7, 12])
    assert np.flatnonzero(pareto_frontier(returns, costs)).tolist() == [1, 4, 6]


def _synthetic_episodes(seed=0):
    """A dense blob of cheap poor episodes (as a safe agent's training gives) over a thin, even spread."""
    rng = np.random.default_rng(seed)
    blob_c, blob_r = rng.uniform(0, 5, 4000), rng.uniform(0, 50, 4000)
    spread_c, spread_r = rng.uniform(0, 120, 600), rng.uniform(0, 500, 600)
    costs, returns = np.r_[blob_c, spread_c], np.r_[blob_r, spread_r]
    returns += costs * 3  # more cost buys more return
    # a staircase of 15 frontier episodes, all in one cell (cheapest, best): more than a cell's cap
    return np.r_[returns, 1000 + np.arange(15.0)], np.r_[costs, 0.1 * np.arange(15.0)]


def _cells(returns, costs, max_cost, bins=20):
    keep = costs <= max_cost
    c = np.minimum(((costs - costs[keep].min()) / np.ptp(costs[keep]) * bins).astype(int), bins - 1)
    r = np.minimum(((returns - returns[keep].min()) / np.ptp(returns[keep]) * bins).astype(int), bins - 1)
    return c * bins + r


def test_density_filter_covers_the_plane_evenly_and_keeps_extremes():
    returns, costs = _synthetic_episodes()
    max_cost = 100.0
    kept = density_filter(returns, costs, episodes=400, max_cost=max_cost, seed=1)
    assert len(kept) == 400 and len(set(kept.tolist())) == 400
    assert (costs[kept] <= max_cost).all()
    eligible = np.flatnonzero(costs <= max_cost)
    for extreme in (np.argmin(costs), eligible[np.argmax(costs[eligible])], eligible[np.argmax(returns[eligible])]):
        assert extreme in kept
    frontier = eligible[pareto_frontier(returns[eligible], costs[eligible])]
    assert set(frontier.tolist()) <= set(kept.tolist())
    cells = _cells(returns, costs, max_cost)
    before = np.bincount(cells[eligible], minlength=400)
    after = np.bincount(cells[kept], minlength=400)
    occupied = before > 0
    # every occupied cell of the plane stays occupied, and besides the frontier no cell holds more than an even
    # share (the dense blob is thinned tenfold)
    assert (after[occupied] > 0).all()
    sampled = np.bincount(cells[np.setdiff1d(kept, frontier)], minlength=400)
    assert sampled.max() <= 2 * 400 / occupied.sum() + 2 and before.max() > 10 * sampled.max()
    assert np.array_equal(kept, density_filter(returns, costs, episodes=400, max_cost=max_cost, seed=1))


def test_density_filter_keeps_everything_when_short():
    returns, costs = np.array([1.0, 2.0, 3.0]), np.array([0.0, 50.0, 200.0])
    assert density_filter(returns, costs, episodes=10, max_cost=100.0).tolist() == [0, 1]


def test_default_thresholds_span_zero_to_beyond_the_max_cost():
    thresholds = default_thresholds(80.0)
    assert thresholds[0] == 0.0 and math.isinf(thresholds[-1]) and max(thresholds[:-1]) > 80.0


# --------------------------------------------------------------------------- the card
def _episodes_to_arrays(episodes):
    """DSRL arrays of episodes given as (length, per-step reward, per-step cost)."""
    rows = {k: [] for k in REQUIRED_KEYS}
    for length, reward, cost in episodes:
        rows["observations"].append(np.zeros((length, 2)))
        rows["next_observations"].append(np.zeros((length, 2)))
        rows["actions"].append(np.zeros((length, 1)))
        rows["rewards"].append(np.full(length, reward))
        rows["costs"].append(np.full(length, cost))
        rows["terminals"].append(np.zeros(length))
        rows["timeouts"].append(np.r_[np.zeros(length - 1), 1.0])
    return {k: np.concatenate(v) for k, v in rows.items()}


def test_card_fields_on_a_synthetic_dataset():
    arrays = _episodes_to_arrays([(5, 1.0, 0.0), (5, 4.0, 3.0), (5, 10.0, 12.0), (4, 2.0, 0.5), (5, 6.0, 4.0)])
    # episode (return, cost): (5, 0), (20, 15), (50, 60), (8, 2), (30, 20): a limit counts as within
    spec = get_task(TASK)
    card = dataset_card(arrays, spec, sha256="ab", minutes=1.234, extra={"thresholds": [0, "inf"]})
    assert card["task"] == TASK and card["episodes"] == 5 and card["transitions"] == 24
    assert (card["episode_cost_min"], card["episode_cost_max"], card["episode_return_max"]) == (0.0, 60.0, 50.0)
    assert card["best_return_at_cost"] == {"10": 8.0, "20": 30.0, "40": 30.0}
    assert card["best_normalized_return_at_cost"]["20"] == pytest.approx(spec.normalized_return(30.0))
    assert card["max_episode_cost_ref"] == 80.0 and card["minutes"] == 1.23 and card["sha256"] == "ab"
    assert card["cost_quantiles"]["0.5"] == 15.0 and card["return_quantiles"]["1"] == 50.0
    assert card["thresholds"] == [0, "inf"]


# --------------------------------------------------------------------------- bad input
def test_bad_options_exit_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["build-dataset", "--task", "PointRobot-v0", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "not a DSRL simulator task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["build-dataset", "--task", TASK, "--out", str(tmp_path), "--thresholds", "-1", "inf"])
    assert stop.value.code == 2 and "--thresholds must be >= 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- on the real simulator
TINY = ["--task", TASK, "--steps_per_agent", "800", "--num_envs", "2", "--horizon", "100", "--chunk_updates", "2",
        "--thresholds", "0", "inf", "--episodes", "5", "--max_cost", "400", "--seed", "3", "--no_progress"]


def _needs_bullet():
    from simulators import needs

    needs("bullet")


def _arrays(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A tiny build (two agents, two chunks each) run in two worker processes."""
    _needs_bullet()
    out = tmp_path_factory.mktemp("build") / "whole"
    card = build_main([*TINY, "--out", str(out), "--workers", "2"])
    return out / f"{TASK}.hdf5", card


@pytest.mark.dsrl
def test_tiny_build_writes_a_dsrl_file_the_datamodule_loads(tiny_build):
    path, card = tiny_build
    # what DSRL's get_dataset(h5path=...) checks: the seven keys; observation and action shapes those of the env;
    # rewards, costs and terminals of shape (N,); flags stored as bool (as in DSRL's files)
    from lightning_saferl.envs import make_env

    data = _arrays(path)
    env = make_env(TASK)
    assert set(REQUIRED_KEYS) <= set(data) and len({len(v) for v in data.values()}) == 1
    assert data["observations"].shape[1:] == env.observation_space.shape == data["next_observations"].shape[1:]
    assert data["actions"].shape[1:] == env.action_space.shape
    env.close()
    assert all(data[k].ndim == 1 for k in ("rewards", "costs", "terminals", "timeouts"))
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    assert np.abs(data["actions"]).max() <= 1.0
    assert card["episodes"] == 5 == int(data["timeouts"].sum() + data["terminals"].sum())
    assert card["transitions"] == len(data["rewards"]) == 5 * 200
    card_file = json.loads(path.with_suffix(".card.json").read_text())
    assert card_file["sha256"] == card["sha256"] and path.with_suffix(".png").stat().st_size > 0
    assert [a["recorded_episodes"] for a in card_file["agents"]] == [4, 4]  # 2 chunks x 2 envs x 1 episode
    # training carries over chunks: Adam counted 2 chunks x 2 updates x 10 epochs x 1 minibatch
    state = torch.load(path.parent / "agent_01" / "state.pt", weights_only=True)
    assert state["chunks_done"] == 2 and int(state["agent"]["actor_opt"]["state"][0]["step"]) == 40
    # each chunk resets its simulators with its own seeds
    starts = [np.load(path.parent / "agent_00" / f"chunk_{c:04d}.npz")["observations"][0] for c in (0, 1)]
    assert not np.array_equal(*starts)

    from lightning_saferl.data import OfflineDataModule

    module = OfflineDataModule(task=TASK, path=str(path), batch_size=16, steps_per_epoch=2)
    module.setup("fit")
    assert len(read_dataset(path)) == 1000 and next(iter(module.train_dataloader()))["observations"].shape[0] == 16


@pytest.mark.dsrl
def test_dsrl_get_dataset_reads_the_file(tiny_build):
    pytest.importorskip("dsrl")
    import gymnasium

    from lightning_saferl.envs.dsrl import _import_dsrl_quietly, _process_streams

    _import_dsrl_quietly("dsrl.offline_bullet_safety_gym")
    with _process_streams():  # Bullet's constructor flushes the C stream named after sys.stdout (pytest's capture)
        env = gymnasium.make(TASK)
    dataset = env.unwrapped.get_dataset(h5path=str(tiny_build[0]))
    assert len(dataset["rewards"]) == 1000


@pytest.mark.dsrl
def test_interrupted_build_resumes_to_the_same_file(tiny_build, tmp_path):
    path, card = tiny_build
    parts = tmp_path / "parts"
    assert build_main([*TINY, "--out", str(parts), "--max_chunks", "1"]) is None  # interrupted after one chunk
    assert not (parts / f"{TASK}.hdf5").exists() and (parts / "agent_00" / "chunk_0000.npz").exists()
    sofar = build_main([*TINY, "--out", str(parts), "--partial"])  # the one finished chunk, nothing trained
    assert sofar["partial"] and [a["chunks"] for a in sofar["agents"]] == [1, 0]
    assert sofar["episodes"] == 2 and (parts / f"{TASK}.partial.hdf5").exists()
    assert not (parts / "agent_01").exists()
    first_chunk = (parts / "agent_00" / "chunk_0000.npz").stat().st_mtime_ns
    resumed = build_main([*TINY, "--out", str(parts)])  # the same command again, in one process
    assert (parts / "agent_00" / "chunk_0000.npz").stat().st_mtime_ns == first_chunk  # not run again
    again, data = _arrays(parts / f"{TASK}.hdf5"), _arrays(path)
    for key in REQUIRED_KEYS:
        np.testing.assert_array_equal(again[key], data[key], err_msg=key)
    assert resumed["best_return_at_cost"] == card["best_return_at_cost"] and not resumed["partial"]
    with pytest.raises(InputError, match="started with seed=3"):
        build_main([*TINY[:-3], "--seed", "4", "--no_progress", "--out", str(parts)])
