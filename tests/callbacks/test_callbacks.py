"""SafeRollout, FeasibleRegionPlot, SafeCheckpoint and TimedProgressBar inside real (tiny) Trainer runs."""
import csv
import math
import os
import warnings

import gymnasium as gym
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_saferl.callbacks import (FeasibleRegionPlot, SafeCheckpoint, SafeRollout, TimedProgressBar,
                                        plot_feasible_region, safety_score)
from lightning_saferl.callbacks.checkpoint import UNSAFE_OFFSET
from lightning_saferl.callbacks.rollout import publish
from lightning_saferl.data.tasks import TaskSpec
from lightning_saferl.envs.oracle import grid_slice, is_feasible
from lightning_saferl.evaluation import EpisodeRunner

TOY = TaskSpec(task_id="Toy-v0", max_episode_steps=50, simulator="toy", cost_limit=0.0)


class ToyEnv(gym.Env):
    """obs = (seed / 10, t / 10); 4 steps; reward = action; cost 1 where the action is > 0.5."""

    def __init__(self, *_):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s, self.t = seed, 0
        return np.array([self.s / 10, 0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        a = float(action[0])
        return (np.array([self.s / 10, self.t / 10], dtype=np.float32), a, self.t >= 4, False,
                {"cost": float(a > 0.5)})


class TinyActor(pl.LightningModule):
    """Linear + tanh policy; a frozen submodule stays in eval mode; records the mode seen by `act`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 1)
        self.frozen = torch.nn.Linear(2, 1).eval().requires_grad_(False)
        self.act_training_flags = []

    def act(self, obs):
        self.act_training_flags.append(self.training or self.net.training)
        return torch.tanh(self.net(obs))

    def training_step(self, batch, batch_idx):
        assert self.net.training and not self.frozen.training
        (obs,) = batch
        return ((self.net(obs) - 1.0) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=8)


class TaskDataModule(pl.LightningDataModule):
    def __init__(self, task_spec):
        super().__init__()
        self.task_spec = task_spec

    def train_dataloader(self):
        return TinyActor().train_dataloader()


def _trainer(tmp_path, max_steps, callbacks, logger=None):
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu",
                      logger=logger if logger is not None else CSVLogger(tmp_path), log_every_n_steps=50,
                      enable_progress_bar=False, enable_model_summary=False,
                      # SafeCheckpoint is a Checkpoint: Lightning then adds no default ModelCheckpoint
                      enable_checkpointing=any(isinstance(c, SafeCheckpoint) for c in callbacks))


def test_safe_rollout_logs_during_fit_at_the_right_steps(tmp_path):
    module = TinyActor()
    rollout = SafeRollout(every_n_steps=2, episodes=5, num_envs=2, env_factory=ToyEnv)
    trainer = _trainer(tmp_path, 5, [rollout])
    trainer.fit(module, datamodule=TaskDataModule(TOY))  # task comes from datamodule.task_spec

    assert module.act_training_flags and not any(module.act_training_flags)  # eval mode during rollouts
    assert module.training and not module.frozen.training  # each submodule's mode restored
    final = EpisodeRunner(TOY, episodes=5, num_envs=5, env_factory=ToyEnv, progress=False).run(module)
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/return_mean"]) == pytest.approx(final["return_mean"], abs=1e-6)
    assert float(metrics["rollout/episodes"]) == 5 and int(metrics["rollout/step"]) == 5
    assert rollout.last_metrics == pytest.approx(final)

    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("rollout/return_mean")]
    # every 2 steps (2, 4) despite log_every_n_steps=50, then once at the end of training (5)
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert float(rows[-1]["rollout/return_mean"]) == pytest.approx(final["return_mean"], abs=1e-6)
    assert float(rows[0]["rollout/return_mean"]) != float(rows[-1]["rollout/return_mean"])  # the policy trained


class PrecisionRecordingActor(TinyActor):
    """Records, for every `act` call, whether autocast was on and the dtype of the observations it got."""

    def __init__(self):
        super().__init__()
        self.act_precisions = []

    def act(self, obs):
        self.act_precisions.append((torch.is_autocast_enabled("cpu"), obs.dtype))
        return super().act(obs)


@pytest.mark.parametrize("precision, acts_as", [("bf16-mixed", (False, torch.float32)),
                                                ("bf16-true", (False, torch.bfloat16))])
def test_safe_rollout_acts_as_the_policy_is_saved(tmp_path, precision, acts_as):
    """Mixed precision keeps float32 weights: the rollout acts in float32, like the saved policy, not under the
    training's autocast. A true precision stores bf16 weights: the rollout acts on bf16 inputs."""
    module = PrecisionRecordingActor()
    trainer = pl.Trainer(max_steps=2, callbacks=[SafeRollout(every_n_steps=2, episodes=3, num_envs=3, task=TOY,
                                                             env_factory=ToyEnv)],
                         precision=precision, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert module.act_precisions and set(module.act_precisions) == {acts_as}
    if precision == "bf16-mixed":  # the same figures as the trained weights give in float32 outside the trainer
        final = EpisodeRunner(TOY, episodes=3, num_envs=3, env_factory=ToyEnv, progress=False).run(module)
        assert float(trainer.callback_metrics["rollout/return_mean"]) == pytest.approx(final["return_mean"],
                                                                                     abs=1e-6)


def test_safe_rollout_needs_a_task_and_a_policy(tmp_path):
    with pytest.raises(ValueError, match="no task to evaluate on"):
        _trainer(tmp_path, 2, [SafeRollout(every_n_steps=2, episodes=2, env_factory=ToyEnv)]).fit(TinyActor())

    class NoAct(TinyActor):
        act = None

    with pytest.raises(TypeError, match="has no `act"):
        _trainer(tmp_path, 2, [SafeRollout(every_n_steps=2, episodes=2, task=TOY, env_factory=ToyEnv)]).fit(NoAct())


def _states_of(obs):
    return torch.stack((obs[:, 0], obs[:, 1], obs[:, 2], torch.atan2(obs[:, 4], obs[:, 3])), dim=-1)


def hazard_value(obs):
    """Constraint value of the nearest hazard: 0.8 - min_k d_k (observation columns 5 and 8)."""
    return 0.8 - torch.minimum(obs[:, 5], obs[:, 8])


def test_plot_feasible_region_iou_against_known_critics(tmp_path):
    slices, n = ((0.5, math.pi / 4), (1.5, math.pi / 4)), 31
    oracle_fraction = [float(is_feasible(grid_slice(v, t, n)[2].double()).float().mean()) for v, t in slices]

    def perfect(obs):
        return torch.where(is_feasible(_states_of(obs).double()), -1.0, 1.0)

    fig, ious = plot_feasible_region(perfect, slices, n, str(tmp_path / "perfect.png"))
    assert ious == [1.0, 1.0] and (tmp_path / "perfect.png").stat().st_size > 10_000
    assert len(fig.axes) >= 2  # one panel per slice (plus colour bars)
    _, ious = plot_feasible_region(lambda obs: -torch.ones(obs.shape[0]), slices, n)
    assert ious == pytest.approx(oracle_fraction)  # everything feasible: IoU = |oracle| / n^2
    _, ious = plot_feasible_region(lambda obs: 1e-3 - hazard_value(obs), slices, n)
    assert ious == [0.0, 0.0]  # feasible only inside the hazards, where the oracle never is
    _, ious = plot_feasible_region(hazard_value, slices, n)
    # "outside every hazard" contains the oracle set; it misses only the braking shadows, larger at speed 1.5
    assert 0.93 < ious[1] < ious[0] < 1.0


class CriticActor(TinyActor):
    def __init__(self):
        super().__init__()
        self.feasibility_critic = HazardCritic()


class HazardCritic(torch.nn.Module):
    def value(self, obs):
        return hazard_value(obs)


def test_feasible_region_callback_writes_png_and_logs_iou(tmp_path):
    point_robot = TaskSpec(task_id="PointRobot-v0", max_episode_steps=300, simulator="point_robot", cost_limit=0.0)
    callback = FeasibleRegionPlot(every_n_steps=2, slices=((0.5, math.pi / 4),), n=31, task=point_robot)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, 3, [callback], logger=logger)
    trainer.fit(CriticActor())
    # step 2, then at the end of training (step 3)
    for step in (2, 3):
        assert os.path.getsize(os.path.join(trainer.log_dir, f"feasible_region_step{step}.png")) > 10_000
    iou = float(trainer.callback_metrics["feasible_region/iou"])
    assert 0.95 < iou < 1.0
    assert float(trainer.callback_metrics["feasible_region/iou_v0.5_theta0.785"]) == iou

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("feasible_region")] == [2, 3]
    assert [e.step for e in events.Scalars("feasible_region/iou")] == [2, 3]


def test_feasible_region_callback_warns_once_without_grid(tmp_path):
    callback = FeasibleRegionPlot(every_n_steps=1, n=11, task=TOY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, 3, [callback])
        trainer.fit(CriticActor())
    relevant = [w for w in caught if "FeasibleRegionPlot does nothing" in str(w.message)]
    assert len(relevant) == 1 and "no state grid" in str(relevant[0].message)
    assert callback.last_path is None and "feasible_region/iou" not in trainer.callback_metrics


def _metrics(ret, cost, n_ret=None, n_cost=None):
    m = {"rollout/return_mean": ret, "rollout/cost_mean": cost}
    if n_ret is not None:
        m.update({"rollout/normalized_return": n_ret, "rollout/normalized_cost": n_cost})
    return m


def test_safety_score_rule():
    # raw metrics, limit 0: safe ranks by return, unsafe by lower cost, any safe above any unsafe
    assert safety_score(_metrics(-50.0, 0.0)) == -50.0
    assert safety_score(_metrics(900.0, 0.5)) == -0.5 - UNSAFE_OFFSET
    assert safety_score(_metrics(-50.0, 0.0)) > safety_score(_metrics(900.0, 0.5))
    assert safety_score(_metrics(2.0, 0.0)) > safety_score(_metrics(1.0, 0.0))
    assert safety_score(_metrics(0.0, 1.0)) > safety_score(_metrics(100.0, 3.0))
    # limit 10 with DSRL normalised scores: the normalised values are used; cost == limit is safe
    assert safety_score(_metrics(300.0, 10.0, 0.6, 1.0), cost_limit=10.0) == 0.6
    assert safety_score(_metrics(300.0, 12.0, 0.6, 1.2), cost_limit=10.0) == -1.2 - UNSAFE_OFFSET
    with pytest.raises(KeyError, match="rollout/cost_mean"):
        safety_score({"rollout/return_mean": 1.0})


class ScriptedRollouts(pl.Callback):
    """Publishes hand-made rollout metrics at every step, as SafeRollout would."""

    def __init__(self, script):
        self.script = script

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ret, cost = self.script[trainer.global_step]
        publish(trainer, _metrics(ret, cost), extra={"rollout/step": trainer.global_step, "rollout/cost_limit": 0.0})


def test_safe_checkpoint_keeps_the_best_and_survives_resume(tmp_path):
    script = {1: (100.0, 5.0), 2: (0.0, 3.0), 3: (500.0, 4.0), 4: (1.0, 0.0), 5: (0.5, 0.0), 6: (2.0, 0.0)}
    # listed first on purpose: Lightning runs Checkpoint callbacks after the others
    checkpoint = SafeCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = _trainer(tmp_path, 6, [checkpoint, ScriptedRollouts(script)])
    saved_at = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda path, *a, **k: (saved_at.append(trainer.global_step), save(path, *a, **k))
    trainer.fit(TinyActor())
    # unsafe 5 -> less unsafe 3 -> (unsafe 4 is worse) -> safe 1.0 -> (safe 0.5 is worse) -> safe 2.0
    assert saved_at == [1, 2, 4, 6]
    assert checkpoint.best_score == 2.0 and checkpoint.best_step == 6
    path = tmp_path / "ckpt" / "safe-best.ckpt"
    assert checkpoint.best_model_path == str(path)
    state = torch.load(path, weights_only=False)["callbacks"][checkpoint.state_key]
    assert state == {"best_score": 2.0, "best_step": 6, "best_model_path": str(path)}

    # resume: worse scores than the restored best do not overwrite it, a better one does
    resumed = SafeCheckpoint(dirpath=str(tmp_path / "ckpt"))
    more = {7: (1.5, 0.0), 8: (3.0, 0.0)}
    trainer = _trainer(tmp_path, 8, [resumed, ScriptedRollouts(more)])
    saved_at = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda p, *a, **k: (saved_at.append(trainer.global_step), save(p, *a, **k))
    trainer.fit(TinyActor(), ckpt_path=str(path))
    assert saved_at == [8] and resumed.best_score == 3.0 and resumed.best_step == 8


def test_safe_checkpoint_with_safe_rollout_in_one_run(tmp_path):
    checkpoint = SafeCheckpoint()
    rollout = SafeRollout(every_n_steps=2, episodes=3, num_envs=3, task=TOY, env_factory=ToyEnv)
    trainer = _trainer(tmp_path, 4, [checkpoint, rollout])
    trainer.fit(TinyActor())
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("rollout/return_mean")]
    scores = {int(r["step"]): safety_score({k: float(v) for k, v in r.items() if k.startswith("rollout/")})
              for r in rows}
    assert sorted(scores) == [2, 4]
    best_step = max(scores, key=lambda k: (scores[k], -k))  # the first of equal scores is kept
    assert checkpoint.best_step == best_step and checkpoint.best_score == pytest.approx(scores[best_step])
    assert checkpoint.best_model_path == os.path.join(trainer.log_dir, "checkpoints", "safe-best.ckpt")
    assert torch.load(checkpoint.best_model_path, weights_only=False)["global_step"] == best_step


class DumpRolloutMetrics(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("rollout/")}
        torch.save((metrics, pl_module.state_dict()), os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_safe_rollout_under_ddp_matches_single_process(tmp_path):
    """Two CPU ranks split 5 episodes 3/2; both publish the metrics of all 5 (= a single-process run)."""
    rollout = SafeRollout(every_n_steps=2, episodes=5, num_envs=2, task=TOY, env_factory=ToyEnv)
    trainer = pl.Trainer(max_steps=3, strategy="ddp_spawn", devices=2, accelerator="cpu", default_root_dir=tmp_path,
                         logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SafeCheckpoint(), rollout, DumpRolloutMetrics(str(tmp_path))])
    trainer.fit(TinyActor())
    (m0, weights), (m1, _) = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert m0 == m1 and m0["rollout/episodes"] == 5 and m0["rollout/step"] == 3
    module = TinyActor()
    module.load_state_dict(weights)
    single = EpisodeRunner(TOY, episodes=5, num_envs=5, env_factory=ToyEnv, progress=False).run(module)
    assert m0["rollout/return_mean"] == pytest.approx(single["return_mean"], abs=1e-6)
    assert m0["rollout/cost_mean"] == pytest.approx(single["cost_mean"], abs=1e-6)


class BarWatcher(TinyActor):
    """Records the training bar's position after each batch (module hooks run after the callbacks')."""

    def __init__(self):
        super().__init__()
        self.positions = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.positions.append(self.trainer.progress_bar_callback.train_progress_bar.n)


@pytest.mark.parametrize("interval, positions", [
    (0.0, [1, 2, 3, 4, 5, 6, 7, 8] * 2),  # redrawn after every batch, as Lightning's own bar
    (3600.0, [1] * 7 + [8] + [0] * 7 + [8]),  # the first draw, then only each epoch's last batch
])
def test_timed_progress_bar_redraws_by_time_and_at_each_epochs_end(tmp_path, interval, positions):
    module = BarWatcher()
    pl.Trainer(max_epochs=2, callbacks=[TimedProgressBar(interval=interval)], logger=False,
               enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module)
    assert module.positions == positions


def test_runs_get_the_timed_progress_bar_unless_it_is_disabled_or_they_have_a_bar(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_saferl.runs import trainer_arguments

    config, _ = trainer_arguments({"default_root_dir": str(tmp_path)})
    assert [type(c) for c in config["callbacks"]] == [TimedProgressBar]
    config, _ = trainer_arguments({"default_root_dir": str(tmp_path), "enable_progress_bar": False})
    assert config["callbacks"] == []
    own = TQDMProgressBar(refresh_rate=10)
    config, _ = trainer_arguments({"default_root_dir": str(tmp_path), "callbacks": [own]})
    assert config["callbacks"] == [own]
