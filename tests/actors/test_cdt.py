"""CDT and the data module's sequence mode: windows with hand-computed returns-to-go / costs-to-go, windows inside
episodes, the cost-to-go token steering a trained model, the runner's per-episode context, and the recipes through
`lightning-saferl pipeline --smoke`."""
import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import gymnasium
import numpy as np
import pytest
import torch
import yaml

import lightning_saferl.envs
from lightning_saferl.actors import CDT
from lightning_saferl.cli import main
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.data.format import write_dataset
from lightning_saferl.errors import InputError
from lightning_saferl.evaluation import EpisodeRunner
from lightning_saferl.policy import load_policy
from lightning_saferl.table import write_table
from scripts import load_script
from tiny_data import write_tiny

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "baselines"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
TINY = {"embedding_dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0, "max_episode_steps": 20}


def write_episodes(path, rewards, costs, ends, actions=None, obs=None):
    """A PointRobot-shaped (11/2) file with the given per-row rewards and costs; episodes end at rows `ends`;
    observation column 0 holds the row number unless `obs` is given."""
    n = len(rewards)
    timeouts = np.zeros(n)
    timeouts[list(ends)] = 1
    if obs is None:
        obs = np.zeros((n, 11))
        obs[:, 0] = np.arange(n)
    if actions is None:
        actions = np.zeros((n, 2))
    return str(write_dataset(path, {"observations": obs, "next_observations": obs, "actions": actions,
                                    "rewards": np.asarray(rewards, float), "costs": np.asarray(costs, float),
                                    "terminals": np.zeros(n), "timeouts": timeouts}))


# ------------------------------------------------------------------------------------------------------------
# The sequence mode of OfflineDataModule
# ------------------------------------------------------------------------------------------------------------
def test_windows_carry_returns_and_costs_to_go_by_hand(tmp_path):
    # episode 1: rows 0-2, episode 2: rows 3-6
    path = write_episodes(tmp_path / "two.hdf5", [1, 2, 3, 10, 20, 30, 40], [0, 1, 0, 1, 1, 0, 2], ends=[2, 6])
    dm = OfflineDataModule(path=path, sequence_length=3)
    batch = dm.batch(torch.tensor([6, 4, 2]))
    # row 6: rows 4 5 6; row 4: rows 2 3 4 with row 2 (episode 1) padded; row 2: rows 0 1 2
    assert batch["padding_mask"].tolist() == [[True] * 3, [False, True, True], [True] * 3]
    assert batch["returns_to_go"].tolist() == [[90, 70, 40], [0, 100, 90], [6, 5, 3]]
    assert batch["costs_to_go"].tolist() == [[3, 2, 2], [0, 4, 3], [1, 1, 0]]
    assert batch["timesteps"].tolist() == [[1, 2, 3], [0, 0, 1], [0, 1, 2]]
    assert batch["observations"][:, :, 0].tolist() == [[4, 5, 6], [0, 3, 4], [0, 1, 2]]  # padded step zeroed
    assert batch["rewards"].tolist() == [[20, 30, 40], [0, 10, 20], [1, 2, 3]]
    assert batch["actions"].shape == (3, 3, 2)


def test_windows_stay_inside_one_episode(tmp_path):
    dm = OfflineDataModule(path=write_tiny(tmp_path / "tiny.hdf5", n=200, episode=7), sequence_length=10,
                           batch_size=512)
    episode = dm.load().episode_index()
    batch = dm.next_batch()
    rows, real = batch["index"], batch["padding_mask"]
    last = rows[:, -1:]
    assert (episode[rows][real] == episode[last].expand_as(rows)[real]).all()
    assert (rows.diff(dim=1)[real[:, :-1]] == 1).all()  # consecutive real steps are consecutive rows
    assert (~real).any() and real[:, -1].all()  # episodes of 7 < 10 steps: every window padded on the left
    assert (real.sum(1) == batch["timesteps"][:, -1] + 1).all()


# ------------------------------------------------------------------------------------------------------------
# CDT: the cost-to-go token steers the action
# ------------------------------------------------------------------------------------------------------------
def test_trained_cdt_action_follows_the_cost_to_go(tmp_path):
    # 40 episodes of 4 steps, same observations and rewards; costly episodes act +0.8, free ones -0.8
    rng = np.random.default_rng(0)
    episodes, length = 40, 4
    costly = np.repeat(np.arange(episodes) % 2, length)
    actions = np.repeat((0.8 * (2 * costly - 1))[:, None], 2, 1)
    path = write_episodes(tmp_path / "steer.hdf5", np.ones(episodes * length), costly,
                          ends=range(length - 1, episodes * length, length), actions=actions,
                          obs=rng.normal(size=(episodes * length, 11)))
    dm = OfflineDataModule(path=path, sequence_length=2, batch_size=64)
    torch.manual_seed(0)
    model = CDT(11, 2, sequence_length=2, lr=3e-3, warmup_steps=1, **TINY)
    optimizer = model.configure_optimizers()["optimizer"]
    for _ in range(60):
        loss = sum(model.losses(dm.next_batch())[0].values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # a first step (one real step, left-padded) with the same state and return-to-go, cost-to-go 4 or 0
    obs = torch.randn(1, 1, 11).expand(2, 2, 11)
    window = (obs, torch.zeros(2, 2, 2), torch.full((2, 2), 4.0), torch.tensor([[0.0, 4.0], [0.0, 0.0]]),
              torch.zeros(2, 2, dtype=torch.long), torch.tensor([[False, True]] * 2))
    predicted = model(*window)[0][:, -1]
    assert (predicted[0] > 0.4).all() and (predicted[1] < -0.4).all(), predicted


def test_padded_steps_do_not_change_predictions():
    torch.manual_seed(0)
    model = CDT(11, 2, sequence_length=3, **TINY).eval()
    valid = torch.tensor([[False, True, True]])
    inputs = [torch.randn(1, 3, 11), torch.randn(1, 3, 2), torch.randn(1, 3), torch.randn(1, 3)]
    changed = [x.clone() for x in inputs]
    for x in changed:
        x[:, 0] += 5.0
    timesteps = torch.tensor([[0, 0, 1]])
    a = model(*inputs, timesteps, valid)[0][:, 1:]
    b = model(*changed, timesteps, valid)[0][:, 1:]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, model(*changed, timesteps, torch.ones(1, 3, dtype=torch.bool))[0][:, 1:])


# ------------------------------------------------------------------------------------------------------------
# The runner keeps a per-episode context: targets decremented by what the env returned, reset per episode
# ------------------------------------------------------------------------------------------------------------
class StepEnv(gymnasium.Env):
    """Reward 1 and cost 2 at every step; episodes are cut by the runner."""

    observation_space = gymnasium.spaces.Box(-1, 1, (11,), np.float32)
    action_space = gymnasium.spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(11, np.float32), {}

    def step(self, action):
        return np.zeros(11, np.float32), 1.0, False, False, {"cost": 2.0}


def test_runner_resets_the_context_and_decrements_the_targets():
    model = CDT(11, 2, sequence_length=2, target_return=10.0, target_cost=5.0, **TINY).eval()
    seen = []
    forward = model.forward

    def recording(obs, actions, returns_to_go, costs_to_go, timesteps, valid):
        seen.append((returns_to_go[:, -1].tolist(), costs_to_go[:, -1].tolist(), timesteps[:, -1].tolist(),
                     valid.sum(1).tolist()))
        return forward(obs, actions, returns_to_go, costs_to_go, timesteps, valid)

    model.forward = recording
    runner = EpisodeRunner("StepTask", episodes=3, num_envs=2, max_episode_steps=3,
                           env_factory=lambda task: StepEnv(), progress=False)
    metrics = runner.run(model)
    assert metrics["cost_mean"] == 6.0
    # episodes 0 and 1 side by side in slots 0 and 1, then episode 2 alone in slot 0 (a fresh context)
    assert seen == [([10, 10], [5, 5], [0, 0], [1, 1]), ([9, 9], [3, 3], [1, 1], [2, 2]),
                    ([8, 8], [1, 1], [2, 2], [2, 2]),
                    ([10], [5], [0], [1]), ([9], [3], [1], [2]), ([8], [1], [2], [2])]


# ------------------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------------------
def _smoke(recipe: str, run: Path, *extra: str) -> dict:
    """The recipe at batch 16 and width 16: --smoke runs 5 steps and 2 episodes."""
    config = yaml.safe_load((CONFIGS / recipe).read_text())
    config["stages"]["policy"]["data"]["batch_size"] = 16
    config["stages"]["policy"]["model"]["init_args"].update(embedding_dim=16, num_heads=2)
    path = run.parent / recipe
    path.write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(path), "--smoke", "--run_dir", str(run), "--trainer", json.dumps(QUIET), *extra])
    return json.loads((run / "summary.json").read_text())


def test_point_robot_recipe_runs_and_loads(tmp_path):
    summary = _smoke("cdt_point_robot.yaml", tmp_path / "run", "--data.path", write_tiny(tmp_path / "tiny.hdf5"),
                     "--cost_limit", "3")
    assert (summary["algorithm"], summary["episodes"], summary["cost_limit"]) == ("cdt", 2, 3)
    policy = load_policy(str(tmp_path / "run" / "policy" / "model.ckpt"))  # weights_only=True
    assert isinstance(policy, CDT) and policy.target_cost == 3.0
    actions = policy.act(torch.zeros(3, 11))
    assert actions.shape == (3, 2) and actions.abs().max() <= 1


def test_one_trained_cdt_serves_another_cost_limit_without_retraining(tmp_path, capsys):
    """target_cost is an acting setting: a rerun at another limit reuses the weights and conditions on the new
    budget (a sweep trains CDT once per task and seed)."""
    data = write_tiny(tmp_path / "tiny.hdf5")
    _smoke("cdt_point_robot.yaml", tmp_path / "run", "--data.path", data, "--cost_limit", "3")
    weights = load_policy(str(tmp_path / "run" / "policy" / "model.ckpt")).state_dict()
    capsys.readouterr()
    summary = _smoke("cdt_point_robot.yaml", tmp_path / "run", "--data.path", data, "--cost_limit", "7")
    out = capsys.readouterr().out
    assert "stage 'policy': finished earlier" in out and "{'target_cost': 7.0}" in out
    policy = load_policy(str(tmp_path / "run" / "policy" / "model.ckpt"))
    assert summary["cost_limit"] == 7 and policy.target_cost == 7.0
    assert all(torch.allclose(weights[k], v, rtol=0, atol=0, equal_nan=True) for k, v in policy.state_dict().items())
    policy.target_cost = 2.5
    assert policy.hparams.target_cost == 2.5


def test_dsrl_recipe_follows_the_limit(tmp_path, monkeypatch):
    monkeypatch.setitem(lightning_saferl.envs.ENV_FACTORIES, "OfflineBallRun-v0",
                        lambda **kw: gymnasium.make("PointRobot-v0"))
    recipe = yaml.safe_load((CONFIGS / "cdt_dsrl.yaml").read_text())
    assert recipe["stages"]["policy"]["model"]["init_args"]["target_cost"] == recipe["cost_limit"] == 10
    summary = _smoke("cdt_dsrl.yaml", tmp_path / "run", "--data.task", "OfflineBallRun-v0",
                     "--data.path", write_tiny(tmp_path / "tiny.hdf5"))
    assert summary["task"] == "OfflineBallRun-v0" and summary["cost_limit"] == 10


def test_sequence_length_mismatch_is_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _smoke("cdt_point_robot.yaml", tmp_path / "run", "--data.path", write_tiny(tmp_path / "tiny.hdf5"),
               "--stages.policy.data.sequence_length", "3")
    assert "data.sequence_length is 3, the model's sequence_length 5" in capsys.readouterr().err


def _small_benchmark(tmp_path, monkeypatch, embedding_dim=16):
    """benchmarks/baselines_point_robot.py with CDT shrunk to a tiny file and network, and its arguments."""
    bench = load_script("benchmarks/baselines_point_robot.py")
    tiny = write_tiny(tmp_path / "tiny.hdf5")
    recipe = bench.recipe

    def small(method, limit, steps):
        config = recipe(method, limit, steps)
        config["data"]["path"] = tiny
        config["stages"]["policy"]["data"]["batch_size"] = 16
        config["stages"]["policy"]["model"]["init_args"].update(embedding_dim=embedding_dim, num_heads=2)
        return config

    monkeypatch.setattr(bench, "recipe", small)
    return bench, argparse.Namespace(run_dir=str(tmp_path / "bench"), steps=None, episodes=2, eval_seed=2000,
                                     quick=True)


def test_benchmark_target_evaluations_are_table_rows(tmp_path, monkeypatch):
    # benchmarks/baselines_point_robot.py trains CDT once and evaluates it at every target cost: each evaluation
    # must be a run of `lightning-saferl table` at its target, so the table shows CDT beside the other methods
    bench, args = _small_benchmark(tmp_path, monkeypatch)
    summaries = bench.cdt_summaries(0, [3.0, 10.0], args)
    assert [s["cost_limit"] for s in summaries] == [3.0, 10.0]
    table = write_table([str(tmp_path / "bench")], str(tmp_path / "table"))
    assert [(r["algorithm"], r["cost_limit"], r["n"]) for r in table["rows"]] == [("cdt", 3.0, 1), ("cdt", 10.0, 1)]


def test_benchmark_reuses_a_run_only_for_its_recipe(tmp_path, monkeypatch):
    bench, args = _small_benchmark(tmp_path, monkeypatch)
    bench.cdt_summaries(0, [3.0], args)
    checkpoint = tmp_path / "bench" / "cdt" / "limit3" / "seed0" / "run" / "policy" / "model.ckpt"
    trained_at = checkpoint.stat().st_mtime_ns

    def no_more_work(*_args, **_kwargs):
        raise AssertionError("a finished run of the same recipe was not reused")

    monkeypatch.setattr(bench, "run_pipeline", no_more_work)
    monkeypatch.setattr(bench, "evaluate", no_more_work)
    bench.cdt_summaries(0, [3.0], args)  # same recipe: nothing trains or evaluates again

    monkeypatch.undo()
    bench, args = _small_benchmark(tmp_path, monkeypatch, embedding_dim=8)  # an edited recipe
    bench.cdt_summaries(0, [3.0], args)
    assert checkpoint.stat().st_mtime_ns != trained_at
    assert load_policy(str(checkpoint)).hparams.embedding_dim == 8


def test_target_return_null_is_the_datas_best_return_at_the_target_cost():
    """Episodes (cost, return): (3, 8), (0, 5), (10, 20), (3, 2), (12, 15) -> frontier (0, 5), (3, 8), (10, 20)."""
    episodes = [(3, 8), (0, 5), (10, 20), (3, 2), (12, 15)]
    data = SimpleNamespace(episode_returns=lambda: torch.tensor([float(r) for _, r in episodes]),
                           episode_costs=lambda: torch.tensor([float(c) for c, _ in episodes]))
    model = CDT(11, 2, sequence_length=2, target_return=None, target_cost=0.0, **TINY)
    with pytest.raises(InputError, match="target_return is null"):
        model.target_return
    model.fit_return_frontier(data)
    expected = {0.0: 5.0, 2.9: 5.0, 3.0: 8.0, 9.0: 8.0, 10.0: 20.0, 40.0: 20.0}
    for limit, best in expected.items():
        model.target_cost = limit
        assert model.target_return == best
    model.target_return = 7.5  # a number wins over the frontier
    assert model.target_return == 7.5
    old = {"state_dict": {}}  # a checkpoint saved before the frontier existed loads with an unfitted one
    model.on_load_checkpoint(old)
    assert old["state_dict"]["return_frontier"].isnan().all()
