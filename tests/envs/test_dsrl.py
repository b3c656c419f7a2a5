"""DSRL tasks: the env contract (DSRLEnv), the factory and its install messages, the Safety-Gymnasium dataclass fix,
collection from simulator envs, and - where the simulators are installed - the real thing: collect a CarCircle
file, load it with our loader and DSRL's, run the FISOR recipe with --smoke and evaluate on Bullet-Safety-Gym.
"""
import dataclasses
import json
import sys
from pathlib import Path

import gymnasium
import h5py
import numpy as np
import pytest
import torch

from lightning_saferl.data.collect import collect, collect_main, rollout_env, summarize
from lightning_saferl.data.tasks import dsrl_task_ids, get_task
import lightning_saferl.envs
from lightning_saferl.envs import make_env
from lightning_saferl.envs import dsrl as dsrl_envs
from lightning_saferl.envs.dsrl import (INSTALL_COMMANDS, DSRLEnv, SimulatorNotInstalledError, make_dsrl_env,
                                        simulator_env_id)
from simulators import needs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASK = "OfflineCarCircle-v0"  # Bullet, 300-step episodes, obs 8, act 2


# --------------------------------------------------------------------------- stand-in simulators
class FakeSim(gymnasium.Env):
    """obs = (seed % 1000, t); episodes of `length` steps, or termination at t == 2 for odd seeds;
    reward = a[0] + 10 a[1]; cost = t (an int, as Bullet reports it); actions bounded by [low, high]."""

    def __init__(self, low=(-1.0, -1.0), high=(1.0, 1.0), six_tuple=False, report_cost=True, length=4):
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float64)
        self.action_space = gymnasium.spaces.Box(np.array(low, np.float32), np.array(high, np.float32))
        self.six_tuple, self.report_cost, self.length = six_tuple, report_cost, length
        self.received = []

    def reset(self, *, seed=None, options=None):
        self.s, self.t = (seed or 0) % 1000, 0  # small: exact in float32 observations
        return np.array([self.s, 0.0]), {}

    def step(self, action):
        self.received.append(np.array(action))
        self.t += 1
        obs = np.array([self.s, self.t], dtype=np.float64)
        reward = float(action[0] + 10 * action[1])
        terminated = self.s % 2 == 1 and self.t == 2
        truncated = self.t >= self.length
        if self.six_tuple:
            return obs, reward, float(self.t), terminated, truncated, {}
        return obs, reward, terminated, truncated, ({"cost": self.t} if self.report_cost else {})


def test_wrapper_maps_actions_onto_the_simulator_bounds():
    sim = FakeSim(low=(0.0, -2.0), high=(2.0, 6.0))
    env = DSRLEnv(sim, "Fake-v0", max_episode_steps=10)
    assert env.action_space.shape == (2,) and env.action_space.low.min() == -1 and env.action_space.high.max() == 1
    env.reset(seed=0)
    env.step(np.array([-1.0, 1.0]))  # -> (low0, high1) = (0, 6)
    env.step(np.array([0.0, 0.5]))   # -> (1, -2 + 1.5 * 4) = (1, 4)
    env.step(np.array([3.0, -7.0]))  # clipped to (1, -1) -> (2, -2)
    np.testing.assert_allclose(np.stack(sim.received), [[0, 6], [1, 4], [2, -2]])
    assert sim.received[0].dtype == np.float32
    unit = FakeSim()
    env = DSRLEnv(unit, "Fake-v0", max_episode_steps=10)
    env.reset(seed=0)
    env.step(np.array([0.25, -0.5]))
    np.testing.assert_allclose(unit.received[0], [0.25, -0.5])  # [-1, 1] bounds: passed through


def test_wrapper_cost_dtype_and_time_limit():
    env = DSRLEnv(FakeSim(length=100), "Fake-v0", max_episode_steps=3)
    obs, info = env.reset(seed=4)
    assert obs.dtype == np.float32 and env.observation_space.dtype == np.float32
    flags = []
    for t in range(1, 4):
        obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.1]))
        assert type(info["cost"]) is float and info["cost"] == t and reward == pytest.approx(1.5)
        flags.append((terminated, truncated))
    assert flags == [(False, False), (False, False), (False, True)]  # the DSRL limit (3) truncates
    env.reset(seed=4)
    assert env.step(np.zeros(2))[3] is False  # the counter restarts at reset
    # a termination is never also a truncation; 6-tuple steps (Safety-Gymnasium's API) fold the cost into info
    env = DSRLEnv(FakeSim(six_tuple=True), "Fake-v0", max_episode_steps=2)
    env.reset(seed=1)
    env.step(np.zeros(2))
    _, _, terminated, truncated, info = env.step(np.zeros(2))
    assert (terminated, truncated, info["cost"]) == (True, False, 2.0)


def test_wrapper_rejects_missing_cost_and_unbounded_actions():
    env = DSRLEnv(FakeSim(report_cost=False), "Fake-v0", max_episode_steps=5)
    env.reset(seed=0)
    with pytest.raises(KeyError, match="Fake-v0.*no 'cost'"):
        env.step(np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        DSRLEnv(FakeSim(low=(-np.inf, -1.0)), "Fake-v0", max_episode_steps=5)


def test_bullet_reset_seeds_numpy_global_generator():
    class NumpySim(FakeSim):  # Bullet-Safety-Gym draws its initial state from np.random and ignores `seed`
        def reset(self, *, seed=None, options=None):
            return np.array([np.random.uniform(), 0.0]), {}

    env = DSRLEnv(NumpySim(), "Fake-v0", max_episode_steps=5, seed_numpy_global=True)
    assert env.reset(seed=7)[0][0] == env.reset(seed=7)[0][0] != env.reset(seed=8)[0][0]


def test_every_dsrl_task_has_a_factory_and_a_simulator_id():
    assert set(dsrl_task_ids()) <= set(lightning_saferl.envs.ENV_FACTORIES)
    assert simulator_env_id(get_task("OfflineCarCircle-v0")) == "SafetyCarCircle-v0"
    assert simulator_env_id(get_task("OfflinePointGoal1Gymnasium-v0")) == "SafetyPointGoal1Gymnasium-v0"
    assert simulator_env_id(get_task("OfflineAntVelocityGymnasium-v1")) == "SafetyAntVelocityGymnasium-v1"
    with pytest.raises(ValueError, match="dsrl package"):
        simulator_env_id(get_task("OfflineMetadrive-easysparse-v0"))
    with pytest.raises(ValueError, match="not a DSRL task"):
        make_dsrl_env("PointRobot-v0")


@pytest.mark.parametrize("task_id,module,command", [
    ("OfflineCarCircle-v0", "bullet_safety_gym", '.[bullet]'),
    ("OfflinePointGoal1Gymnasium-v0", "safety_gymnasium", "safety-gymnasium==0.4.0"),
    ("OfflineMetadrive-easysparse-v0", "metadrive", "metadrive"),
])
def test_missing_simulator_names_the_install_command(monkeypatch, task_id, module, command):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail, installed or not
    with pytest.raises(SimulatorNotInstalledError) as err:  # an ImportError
        make_env(task_id)
    assert module in str(err.value) and command in str(err.value)
    assert INSTALL_COMMANDS[get_task(task_id).simulator] in str(err.value)


def test_array_defaults_become_default_factories():
    default, original = np.array([1.0, 2.0]), dataclasses.dataclass
    if sys.version_info >= (3, 11):  # the failure the fix is for
        with pytest.raises(ValueError, match="mutable default"):
            dataclasses.dataclass(type("Plain", (), {"__annotations__": {"color": np.ndarray}, "color": default}))
    with dsrl_envs._array_defaults_as_factories():
        @dataclasses.dataclass
        class Geom:
            color: np.ndarray = default
            size: float = 0.5

        @dataclasses.dataclass(frozen=True)
        class Frozen:
            group: np.ndarray = default

    assert dataclasses.dataclass is original  # restored on exit
    a, b = Geom(), Geom()
    np.testing.assert_array_equal(a.color, default)
    assert a.color is not b.color and a.color is not default and a.size == 0.5
    np.testing.assert_array_equal(Frozen().group, default)
    assert Geom(color=np.zeros(2)).color.sum() == 0


# --------------------------------------------------------------------------- collection (stand-in simulator)
class FakePolicy:
    device = torch.device("cpu")

    def act(self, obs):
        return torch.full((obs.shape[0], 2), 0.5)


@pytest.fixture
def fake_task(monkeypatch):
    """OfflineCarCircle-v0 served by FakeSim with the DSRL time limit 4; load_policy returns FakePolicy."""
    monkeypatch.setitem(lightning_saferl.envs.ENV_FACTORIES, TASK,
                        lambda: DSRLEnv(FakeSim(length=100), TASK, max_episode_steps=4))
    monkeypatch.setattr("lightning_saferl.policy.load_policy", lambda path: FakePolicy())
    return TASK


def _episodes(arrays):
    ends = np.flatnonzero((arrays["terminals"] > 0) | (arrays["timeouts"] > 0))
    return np.split(np.arange(len(arrays["rewards"])), ends[:-1] + 1)


def test_env_collection_layout_and_flags(fake_task):
    arrays = rollout_env(fake_task, steps=23, seed=0, behavior="random", num_envs=3, progress=False)
    assert {len(v) for v in arrays.values()} == {23}
    assert arrays["observations"].shape == (23, 2) and arrays["actions"].shape == (23, 2)
    assert all(v.dtype == np.float32 for v in arrays.values())
    assert np.abs(arrays["actions"]).max() <= 1.0
    for rows in _episodes(arrays):
        obs, nxt = arrays["observations"][rows], arrays["next_observations"][rows]
        assert (obs[:, 0] == obs[0, 0]).all()  # one episode (seed) per block, laid out contiguously
        np.testing.assert_array_equal(obs[:, 1], np.arange(len(rows)))  # t = 0, 1, ...
        np.testing.assert_array_equal(nxt[:-1], obs[1:])
        np.testing.assert_array_equal(arrays["costs"][rows], np.arange(1, len(rows) + 1))
        odd = obs[0, 0] % 2 == 1
        last = rows[-1]
        if rows[-1] != 22:
            # odd seeds terminate after 2 steps, even ones are truncated by the time limit after 4
            assert (len(rows), arrays["terminals"][last], arrays["timeouts"][last]) == (
                (2, 1, 0) if odd else (4, 0, 1))
        assert arrays["terminals"][rows[:-1]].sum() == arrays["timeouts"][rows[:-1]].sum() == 0
    assert arrays["timeouts"][-1] == 1 or arrays["terminals"][-1] == 1  # the cut ends the last episode
    np.testing.assert_allclose(arrays["rewards"], arrays["actions"][:, 0] + 10 * arrays["actions"][:, 1], rtol=1e-5)
    again = rollout_env(fake_task, steps=23, seed=0, behavior="random", num_envs=3, progress=False)
    for key in arrays:
        np.testing.assert_array_equal(again[key], arrays[key])
    other = rollout_env(fake_task, steps=23, seed=1, behavior="random", num_envs=3, progress=False)
    assert not np.array_equal(other["actions"], arrays["actions"])


def test_env_collection_policy_and_mixed(fake_task):
    exact = rollout_env(fake_task, steps=12, seed=0, behavior="policy", policy="p.ckpt", noise=0.0,
                        num_envs=2, progress=False)
    np.testing.assert_array_equal(exact["actions"], 0.5)  # the policy's action, no noise
    noisy = rollout_env(fake_task, steps=400, seed=0, behavior="policy", policy="p.ckpt", noise=0.3,
                        num_envs=4, progress=False)
    assert abs(noisy["actions"].std() - 0.3) < 0.05 and abs(noisy["actions"].mean() - 0.5) < 0.05
    mixed = rollout_env(fake_task, steps=2000, seed=0, behavior="mixed", policy="p.ckpt", noise=0.1,
                        num_envs=4, progress=False)
    per_episode = [mixed["actions"][rows] for rows in _episodes(mixed)]
    near_policy = [np.abs(a - 0.5).max() < 0.45 for a in per_episode]  # noise std <= 0.2: within 0.45 w.h.p.
    assert 0.2 < np.mean(near_policy) < 0.5  # about a third of the episodes follow the policy
    with pytest.raises(ValueError, match="needs a policy"):
        rollout_env(fake_task, steps=5, seed=0, behavior="policy", progress=False)
    with pytest.raises(ValueError, match="unknown behavior"):
        rollout_env(fake_task, steps=5, seed=0, behavior="expert", progress=False)
    with pytest.raises(ValueError, match="scripted behaviours"):
        collect("PointRobot-v0", "x.hdf5", steps=5, seed=0, policy="p.ckpt")


def test_env_collection_rejects_a_policy_for_other_observations(fake_task, monkeypatch):
    wrong = FakePolicy()
    wrong.hparams = {"obs_dim": 3}  # FakeSim observations have size 2
    monkeypatch.setattr("lightning_saferl.policy.load_policy", lambda path: wrong)
    with pytest.raises(ValueError, match="w.ckpt: the policy takes observations of size 3, but .* gives 2"):
        rollout_env(fake_task, steps=5, seed=0, behavior="policy", policy="w.ckpt", progress=False)


def test_collect_cli_writes_a_dsrl_file(fake_task, tmp_path, capsys):
    out = tmp_path / "car.hdf5"
    summary = collect_main(["--task", fake_task, "--out", str(out), "--steps", "30", "--seed", "2",
                            "--behavior", "policy", "--policy", "p.ckpt", "--noise", "0.2", "--num-envs", "2",
                            "--no-progress"])
    with h5py.File(out, "r") as f:
        arrays = {k: f[k][()] for k in f.keys()}
        assert f.attrs["task_id"] == fake_task and f.attrs["behavior"] == "policy" and f.attrs["noise"] == 0.2
    assert set(arrays) == {"observations", "next_observations", "actions", "rewards", "costs", "terminals",
                           "timeouts"}
    assert summary == {**summarize(arrays), "seconds": summary["seconds"]}
    assert "return mean" in capsys.readouterr().out


def test_summarize_hand_computed():
    arrays = {"rewards": np.array([1.0, 2.0, 3.0, 4.0, 5.0]), "costs": np.array([0.0, 1.0, 0.0, 0.0, 1.0]),
              "terminals": np.array([0, 1, 0, 0, 0]), "timeouts": np.array([0, 0, 0, 0, 0])}
    s = summarize(arrays)  # episodes: rows 0-1 (R 3, C 1), rows 2-4 (R 12, C 1)
    assert (s["episodes"], s["mean_return"], s["min_return"], s["max_return"]) == (2, 7.5, 3.0, 12.0)
    assert (s["mean_cost"], s["min_cost"], s["max_cost"], s["unsafe_episode_share"]) == (1.0, 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- the real simulators
@pytest.fixture(scope="module")
def car_circle(tmp_path_factory):
    needs("bullet")
    path = tmp_path_factory.mktemp("dsrl") / "car_circle.hdf5"
    summary = collect_main(["--task", TASK, "--out", str(path), "--steps", "700", "--seed", "0",
                            "--behavior", "mixed", "--num-envs", "2", "--no-progress"])
    return path, summary


@pytest.mark.dsrl
def test_bullet_env_contract():
    needs("bullet")
    env = make_env(TASK)
    assert env.observation_space.shape == (8,) and env.action_space.shape == (2,)
    first, _ = env.reset(seed=3)
    length, costs = 0, []
    while True:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        length += 1
        costs.append(info["cost"])
        if terminated or truncated:
            break
    assert all(type(c) is float for c in costs) and obs.dtype == np.float32
    assert (length, truncated) == (300, True)  # CarCircle's DSRL limit
    fresh = make_dsrl_env(TASK, use_dsrl=False)
    np.testing.assert_array_equal(fresh.reset(seed=3)[0], first)  # seeded start (a fresh env: same state)
    env.close()
    fresh.close()


@pytest.mark.dsrl
def test_dsrl_package_route_matches_the_simulator_route():
    needs("bullet")
    pytest.importorskip("dsrl")
    via_dsrl, direct = make_dsrl_env(TASK, use_dsrl=True), make_dsrl_env(TASK, use_dsrl=False)
    assert type(via_dsrl.env.unwrapped).__name__ == "OfflineCarCircleEnv"
    assert via_dsrl.observation_space == direct.observation_space
    np.testing.assert_array_equal(via_dsrl.reset(seed=5)[0], direct.reset(seed=5)[0])
    action = np.array([0.3, -0.2], np.float32)
    np.testing.assert_allclose(via_dsrl.step(action)[0], direct.step(action)[0], rtol=1e-6)
    via_dsrl.close()
    direct.close()


@pytest.mark.dsrl
def test_collected_file_loads_with_our_loader_and_dsrl(car_circle):
    from lightning_saferl.data.datamodule import OfflineDataModule

    path, summary = car_circle
    assert summary["transitions"] == 700 and summary["episodes"] >= 3
    spec = get_task(TASK)
    dm = OfflineDataModule(task=TASK, path=str(path), scale_reward=True)
    assert (dm.obs_dim, dm.act_dim) == (8, 2)  # read from the file at construction
    data = dm.transitions
    with h5py.File(path, "r") as f:
        raw_rewards, timeouts, terminals = f["rewards"][()], f["timeouts"][()], f["terminals"][()]
    factor = spec.max_episode_steps / (spec.reward_max - spec.reward_min)
    torch.testing.assert_close(data.rewards, torch.from_numpy(raw_rewards) * factor)
    lengths = np.diff(np.concatenate(([-1], np.flatnonzero((timeouts > 0) | (terminals > 0)))))
    assert (lengths[:-1] == 300).all() and terminals.sum() == 0  # CarCircle never terminates: every end is a timeout
    assert data.num_episodes == summary["episodes"]
    dsrl = pytest.importorskip("dsrl")
    env = make_dsrl_env(TASK, use_dsrl=True)  # dsrl's own env (built with the stream fix, see `needs`)
    assert isinstance(env.env.unwrapped, dsrl.OfflineEnv)
    theirs = env.env.unwrapped.get_dataset(h5path=str(path))
    np.testing.assert_array_equal(theirs["rewards"], raw_rewards)
    assert theirs["observations"].shape == (700, 8)
    env.close()


@pytest.mark.dsrl
def test_fisor_recipe_smoke_on_the_real_simulator(car_circle, tmp_path):
    from lightning_saferl.cli import main

    path, _ = car_circle
    run = tmp_path / "run"
    main(["pipeline", "--config", str(CONFIGS / "fisor" / "dsrl.yaml"), "--data.task", TASK,
          "--data.path", str(path), "--smoke", "--run_dir", str(run),
          "--trainer", json.dumps({"enable_progress_bar": False, "enable_model_summary": False, "logger": False})])
    summary = json.loads((run / "summary.json").read_text())
    spec = get_task(TASK)
    assert (summary["task"], summary["episodes"], summary["cost_limit"], summary["length_mean"]) == (TASK, 2, 10, 300)
    assert summary["normalized_return"] == pytest.approx(spec.normalized_return(summary["return_mean"]))
    assert summary["normalized_cost"] == pytest.approx(summary["cost_mean"] / 10)


def test_fisor_dsrl_recipe_values():
    import yaml

    recipe = yaml.safe_load((CONFIGS / "fisor" / "dsrl.yaml").read_text())
    stages = recipe["stages"]
    assert recipe["data"]["scale_reward"] is True and recipe["evaluation"]["cost_limit"] == 10
    assert stages["actor"]["data"]["batch_size"] == 1024
    assert stages["feasibility_critic"]["data"]["batch_size"] == stages["reward_critic"]["data"]["batch_size"] == 256
    assert stages["actor"]["model"]["init_args"]["num_candidates"] == 16
    assert "FeasibleRegionPlot" not in json.dumps(recipe)


@pytest.mark.dsrl
def test_safety_gymnasium_envs_build_on_this_python():
    needs("safety_gymnasium")
    dsrl_envs.patch_safety_gymnasium()
    dsrl_envs.patch_safety_gymnasium()  # idempotent
    for task_id, obs_dim in (("OfflinePointCircle1Gymnasium-v0", 28), ("OfflineHopperVelocityGymnasium-v1", 11)):
        env = make_env(task_id)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (obs_dim,) and obs.dtype == np.float32
        _, _, _, _, info = env.step(env.action_space.sample())
        assert type(info["cost"]) is float
        env.close()


@pytest.mark.dsrl
def test_metadrive_env_builds():
    needs("metadrive")
    pytest.importorskip("dsrl")
    env = make_env("OfflineMetadrive-easysparse-v0")
    obs, _ = env.reset(seed=0)
    _, _, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert obs.dtype == np.float32 and type(info["cost"]) is float
    env.close()
