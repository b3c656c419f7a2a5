"""Every module trains under DDP (2 CPU processes, gloo): one step equals the single-process step it should equal.

The test launches this file as a worker with ``python -m torch.distributed.run --nproc_per_node 2`` (one launch for
all modules; each rank fits every module for one step with ``Trainer(strategy="ddp", devices=2)``) and records, per
rank, the batch indices, the global RNG state as the module's loss sees it and the parameters after the step. Each
rank's RNG state must be its own stream, `step_seed(seed, rank, step)` (seeding.py): ranks draw different diffusion
noise, time steps and dropout masks. The single-process references are computed here from the same initial weights:

* "halves": one Adam step on (L(batch_0) + L(batch_1)) / 2, each half's loss evaluated with that rank's RNG state.
  DDP averages the ranks' gradients, so this must equal DDP for *every* module, the random ones (FISOR's actor,
  behaviour diffusion, DRCORL's policy) included.
* "union": one Adam step on L(concat(batch_0, batch_1)). For a loss that is a plain mean over rows of per-row terms
  (critics, BC-All, and FISOR's mean_b w_b l_b with weights fixed per transition) the mean over the union of two
  equal halves is the mean of the halves' means, so union == halves == DDP; checked literally for the
  deterministic losses (for FISOR / behaviour diffusion the random k, t, eps of a union step would be different
  draws, the identity holds for the same draws). It does NOT hold for
  - BC-Safe: sum_b w_b l_b / sum_b w_b is a ratio; DDP averages the ranks' ratios, which equals the union's ratio
    only when both ranks' weight sums are equal;
  - DRCORL's policy: each rank normalises its Q term by its own batch mean |Q| and combines its own reward/cost
    gradients by PCGrad (non-linear), so DDP averages per-rank PCGrad steps (the zone is shared: the cost
    estimate is all-reduced).
The dual variables that BCQ-Lag (PID multiplier) and CPQ (alpha) update inside the loss from a batch statistic are
all-reduced over the ranks: the halves reference uses the DDP run's value, which must be one update on the mean of
the two halves' statistics.
Also: ranks draw different batches, parameters and buffers stay identical across ranks, SafeRollout splits evaluation
episodes across ranks (rank_slice) and gathers metrics equal to a single-process EpisodeRunner over all episodes,
and a loss that is NaN on rank 1 only stops both ranks with NonFiniteLossError (no rank left in the all-reduce).
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Optional
from unittest import mock

import numpy as np
import pytest
import torch

OBS, ACT, BATCH = 11, 2, 32
EPISODES = 5
ROLLOUT = dict(episodes=EPISODES, num_envs=EPISODES, max_episode_steps=10, seed=3,
               reset_options={"random_start": True})  # episodes differ from each other
TINY = dict(hidden_dims=(32, 32))
MODULES = ["FeasibilityCritic", "RewardCritic", "CostCritic", "FisorActor", "BCAll", "BCSafe",
           "BehaviorDiffusion", "DrcorlPolicy", "BCQLag", "CPQ", "COptiDICE", "CDT"]
UNION_EQUALS_DDP = {"FeasibilityCritic", "RewardCritic", "CostCritic", "BCAll"}  # literally checked
NAN_STEP = 1  # the step at which rank 1's loss is NaN in the last fit of the worker
#: dual variables updated inside the loss from a batch statistic (not by a gradient): DDP averages the statistic over
#: the ranks, so both ranks step with one value. name -> (the module's update method, the buffer holding the value)
DUAL_UPDATES = {"BCQLag": ("_multiplier", "lagrangian.multiplier"), "CPQ": ("_alpha", "alpha")}
SEQUENCE_LENGTH = {"CDT": 4}  # modules trained on windows of K steps


def make(name: str):
    from lightning_saferl.actors.bc import BCAll, BCSafe
    from lightning_saferl.actors.fisor import FisorActor
    from lightning_saferl.critics import CostCritic, FeasibilityCritic, RewardCritic

    if name in ("FeasibilityCritic", "RewardCritic", "CostCritic", "BCAll", "BCSafe"):
        return {"FeasibilityCritic": FeasibilityCritic, "RewardCritic": RewardCritic, "CostCritic": CostCritic,
                "BCAll": BCAll, "BCSafe": BCSafe}[name](OBS, ACT, **TINY)
    if name == "FisorActor":
        return FisorActor(OBS, ACT, FeasibilityCritic(OBS, ACT, **TINY), RewardCritic(OBS, ACT, **TINY),
                          hidden_dim=32, num_blocks=1)
    from lightning_saferl.actors import CDT, CPQ, BCQLag, COptiDICE

    baselines = dict(hidden_dims=(32, 32), critic_hidden_dims=(32, 32), max_episode_steps=300)
    if name == "BCQLag":
        # limit 0 and Q_c raised by 1 everywhere: the estimate is above the threshold, the multiplier leaves 0
        module = BCQLag(OBS, ACT, vae_hidden_dim=16, cost_limit=0.0, **baselines)
        with torch.no_grad():
            module.cost_critic.net.layers[-1].bias.fill_(1.0)
        return module
    if name == "CPQ":
        return CPQ(OBS, ACT, vae_hidden_dim=16, **baselines)
    if name == "COptiDICE":
        return COptiDICE(OBS, ACT, **baselines)
    if name == "CDT":  # no warm-up: the first step moves the weights
        return CDT(OBS, ACT, sequence_length=SEQUENCE_LENGTH[name], embedding_dim=16, num_layers=1, num_heads=2,
                   max_episode_steps=300, lr=1e-3, warmup_steps=1)
    from lightning_saferl.actors.drcorl import BehaviorDiffusion, DrcorlPolicy

    if name == "BehaviorDiffusion":
        return BehaviorDiffusion(OBS, ACT, hidden_dim=32, num_blocks=1)
    # limit 0 with a huge slack: the estimate stays in the band, the PCGrad step runs
    return DrcorlPolicy(OBS, ACT, behavior=BehaviorDiffusion(OBS, ACT, hidden_dim=32, num_blocks=1),
                        reward_critic=RewardCritic(OBS, ACT, **TINY), hidden_dims=(32, 32), cost_hidden_dims=(32, 32),
                        cost_limit=0.0, cost_slack=1e6)


def tiny_dataset(path, n: int = 2000, episode: int = 50, seed: int = 0):
    """Random PointRobot-shaped data; even episodes cost-free (BCSafe keeps them), odd ones with costs."""
    from lightning_saferl.data.format import write_dataset

    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS)).astype(np.float32)
    costs = ((rng.random(n) < 0.3) & ((np.arange(n) // episode) % 2 == 1)).astype(np.float32)
    return write_dataset(path, {
        "observations": obs, "next_observations": np.roll(obs, -1, axis=0),
        "actions": rng.uniform(-0.9, 0.9, (n, ACT)).astype(np.float32),
        "rewards": rng.standard_normal(n).astype(np.float32), "costs": costs,
        "terminals": np.zeros(n, dtype=bool), "timeouts": (np.arange(n) % episode) == episode - 1,
        "constraint_values": rng.standard_normal(n).astype(np.float32)})


def datamodule(path: str, name: str, batch_size: int = BATCH):
    from lightning_saferl.data.datamodule import OfflineDataModule

    return OfflineDataModule(path=path, batch_size=batch_size, steps_per_epoch=10, seed=0,
                             sequence_length=SEQUENCE_LENGTH.get(name))


def gradients(module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def parameters(module) -> dict[str, torch.Tensor]:
    """All parameters, trained and frozen (EMA / target copies follow the trained ones after a step)."""
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def buffers(module) -> dict[str, torch.Tensor]:
    """All buffers (e.g. the dual variables of BCQ-Lag and CPQ)."""
    return {k: b.detach().clone() for k, b in module.named_buffers()}


# ------------------------------------------------------------------------------------------------ worker
def wrap_losses(module, before):
    """module.losses(batch) calls before(module) first (a recording or fault-injecting wrapper)."""
    losses = module.losses

    def wrapped(batch):
        return before(module) or losses(batch)

    module.losses = wrapped


def trainer_for(callbacks, max_steps: int = 1):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    # a rank stuck in a collective fails after 60 s instead of gloo's default 30 minutes
    return pl.Trainer(strategy=DDPStrategy(timeout=timedelta(seconds=60)), accelerator="cpu", devices=2,
                      max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks)


def worker(data_path: str, out_dir: str) -> None:
    import lightning.pytorch as pl

    from lightning_saferl.base import NonFiniteLossError
    from lightning_saferl.callbacks import SafeRollout

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.index = batch["index"].clone()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = gradients(pl_module)  # after DDP's all-reduce

        def rng_seen_by_losses(self, module):
            self.rng = torch.get_rng_state()  # callbacks' batch-start hooks run before the module seeds its stream

    class RecordingRollout(SafeRollout):
        """SafeRollout noting which episode indices this rank ran."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.ran: list[int] = []

        def runner(self, trainer):
            runner = super().runner(trainer)
            if not getattr(runner, "_recording", False):
                run_episodes = runner.run_episodes

                def recording(policy, indices=None):
                    self.ran.extend(int(i) for i in indices)
                    return run_episodes(policy, indices)

                runner.run_episodes, runner._recording = recording, True
            return runner

    for name in MODULES:
        pl.seed_everything(0, verbose=False)
        module = make(name)
        recorder = Recorder()
        wrap_losses(module, recorder.rng_seen_by_losses)
        callbacks = [recorder]
        rollout = RecordingRollout(every_n_steps=1, progress=False, **ROLLOUT) if name == "BCAll" else None
        callbacks += [rollout] if rollout else []
        trainer = trainer_for(callbacks)
        trainer.fit(module, datamodule=datamodule(data_path, name))
        record = {"index": recorder.index, "rng": recorder.rng, "grads": recorder.grads, "params": parameters(module),
                  "buffers": buffers(module), "world_size": trainer.world_size}
        if rollout is not None:
            record.update(rollout_indices=list(rollout.ran), rollout_metrics=dict(rollout.last_metrics))
        torch.save(record, Path(out_dir) / f"{name}_rank{trainer.global_rank}.pt")

    # last (a failure here must not hide the records above): rank 1's loss turns NaN at step NAN_STEP
    pl.seed_everything(0, verbose=False)
    module = make("BCAll")
    nan = {"bc_loss": torch.tensor(float("nan"))}
    wrap_losses(module, lambda m: (nan, {}) if m.global_rank == 1 and m.global_step == NAN_STEP else None)
    trainer = trainer_for([], max_steps=NAN_STEP + 2)
    try:
        trainer.fit(module, datamodule=datamodule(data_path, "BCAll"))
        outcome = "finished"
    except NonFiniteLossError as error:
        outcome = str(error)
    (Path(out_dir) / f"nan_rank{trainer.global_rank}.txt").write_text(outcome)


# ------------------------------------------------------------------------------------------------ references
def reference_step(name: str, data_path: str, halves: list[tuple[torch.Tensor, torch.Tensor]],
                   dual: Optional[torch.Tensor] = None):
    """(gradients, parameters after one single-process Adam step, module) for the mean of the losses of `halves`
    ((index, rng state) pairs: each loss evaluated on those dataset rows with that RNG state). For a module of
    `DUAL_UPDATES` every half's loss uses the dual value `dual` (the DDP run's); the statistics its update was
    given are in `module.dual_statistics`."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = make(name).train()
    dm = datamodule(data_path, name)
    attached = property(lambda self: SimpleNamespace(datamodule=dm))  # what on_fit_start reads of the trainer
    with mock.patch.object(type(module), "dataset", lambda self: dm.transitions), \
            mock.patch.object(type(module), "trainer", attached):
        module.on_fit_start()  # sample weights, DRCORL's start states, COptiDICE's episode starts
    config = module.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    optimizer.zero_grad()
    if name in DUAL_UPDATES:
        module.dual_statistics = []
        setattr(module, DUAL_UPDATES[name][0],
                lambda statistic: module.dual_statistics.append(statistic.detach()) or dual.clone())
    total = 0.0
    for index, rng in halves:
        torch.set_rng_state(rng)
        rows = index[:, -1] if index.dim() == 2 else index  # windows are drawn by their last rows
        total = total + module.training_step(dm.batch(rows), 0) / len(halves)
    total.backward()
    grads = gradients(module)
    optimizer.step()
    module.after_optimizer_step()  # global_step 0, as in the Trainer during its first step
    return grads, parameters(module), module


def max_difference(a: dict, b: dict) -> float:
    """max |a - b| over all tensors; NaN in the same place of both (an unfilled entry) counts as equal."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].isnan(), b[k].isnan()), f"{k}: NaN in different places"
    return max((float((a[k] - b[k]).nan_to_num(0.0).abs().max()) for k in a), default=0.0)


def relative_difference(a: dict, b: dict) -> float:
    """max |a - b| / max |b| over all tensors (gradients)."""
    return max_difference(a, b) / max(float(v.abs().max()) for v in b.values())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data_path = str(tiny_dataset(root / "tiny.hdf5"))
    out = root / "out"
    out.mkdir()
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), data_path, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    failure = f"DDP worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    records = {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)]
               for name in MODULES if all((out / f"{name}_rank{r}.pt").exists() for r in range(2))}
    assert records.keys() == set(MODULES), failure
    nan_outcomes = [(out / f"nan_rank{r}.txt").read_text() if (out / f"nan_rank{r}.txt").exists() else None
                    for r in range(2)]
    return data_path, records, nan_outcomes, (proc.returncode, failure)


@pytest.mark.parametrize("name", MODULES)
def test_ddp_step_equals_single_process(name, ddp_run):
    from lightning_saferl.seeding import step_seed

    data_path, records, _, _ = ddp_run
    rank0, rank1 = records[name]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert not torch.equal(rank0["index"], rank1["index"]), f"{name}: both ranks drew the same batch"
    assert not torch.equal(rank0["rng"], rank1["rng"]), f"{name}: both ranks draw the same random numbers"
    for rank, record in enumerate((rank0, rank1)):  # seed_everything(0), step 0: stream step_seed(0, rank, 0)
        stream = torch.Generator().manual_seed(step_seed(0, rank, 0)).get_state()
        assert torch.equal(record["rng"], stream), f"{name}: rank {rank} does not draw from its (seed, rank, step) stream"
    assert max_difference(rank0["params"], rank1["params"]) == 0.0, f"{name}: ranks' parameters diverged"
    assert max_difference(rank0["buffers"], rank1["buffers"]) == 0.0, f"{name}: ranks' buffers diverged"
    ddp = rank0["params"]

    dual = rank0["buffers"][DUAL_UPDATES[name][1]] if name in DUAL_UPDATES else None
    grads, params, module = reference_step(name, data_path, [(rank0["index"], rank0["rng"]),
                                                             (rank1["index"], rank1["rng"])], dual)
    if name in DUAL_UPDATES:  # the DDP step's dual value is one update on the mean of the ranks' statistics
        update, _ = DUAL_UPDATES[name]
        statistics = module.dual_statistics
        expected = getattr(make_initial(name).train(), update)(torch.stack(statistics).mean())
        assert statistics[0] != statistics[1] and float(dual) > 0, f"{name}: {statistics}, dual {float(dual)}"
        assert float(dual) == pytest.approx(float(expected), rel=1e-6), \
            f"{name}: DDP dual value {float(dual)} is not one update on the mean statistic ({float(expected)})"
    moved = max_difference(ddp, parameters(make_initial(name)))
    assert moved > 1e-4, f"{name}: the DDP step did not change the parameters (max change {moved:.2e})"
    # Adam's first step is ~ lr * sign(g): the parameters alone would not see a wrongly scaled gradient
    grad_difference = relative_difference(rank0["grads"], grads)
    print(f"{name}: relative gradient difference DDP vs average of the ranks' gradients {grad_difference:.1e}")
    assert grad_difference < 1e-5, \
        f"{name}: DDP gradient differs from the average of the ranks' gradients by {grad_difference:.2e} (relative)"
    assert max_difference(ddp, params) < 1e-6, f"{name}: DDP step differs from the single-process step"

    union_index = torch.cat([rank0["index"], rank1["index"]])
    if name in UNION_EQUALS_DDP:
        grads, params, _ = reference_step(name, data_path, [(union_index, rank0["rng"])])
        grad_difference = relative_difference(rank0["grads"], grads)
        print(f"{name}: relative gradient difference DDP vs union batch {grad_difference:.1e}")
        assert grad_difference < 1e-5, f"{name}: DDP gradient differs from the union batch's by {grad_difference:.2e}"
        assert max_difference(ddp, params) < 1e-6, f"{name}: DDP step differs from the union-batch step"
    elif name == "BCSafe":
        grads, params, module = reference_step(name, data_path, [(union_index, rank0["rng"])])
        sums = [float(module.sample_weights[r["index"]].sum()) for r in (rank0, rank1)]
        assert sums[0] != sums[1], f"{name}: test data should give the ranks different weight sums, got {sums}"
        # a ratio of sums: DDP's average of the ranks' ratios is not the union's ratio
        grad_difference = relative_difference(rank0["grads"], grads)
        print(f"{name}: relative gradient difference DDP vs union batch {grad_difference:.1e} (weight sums {sums})")
        assert grad_difference > 1e-3, f"{name}: expected DDP to differ from the union step, got {grad_difference:.2e}"


def make_initial(name: str):
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    return make(name)


def test_rollout_episodes_split_across_ranks_and_gathered(ddp_run):
    from lightning_saferl.evaluation import EpisodeRunner, rank_slice

    _, records, _, _ = ddp_run
    rank0, rank1 = records["BCAll"]
    assert rank0["rollout_indices"] == list(rank_slice(EPISODES, 0, 2)) == [0, 1, 2]
    assert rank1["rollout_indices"] == list(rank_slice(EPISODES, 1, 2)) == [3, 4]
    assert rank0["rollout_metrics"] == rank1["rollout_metrics"]
    policy = make_initial("BCAll")
    policy.load_state_dict({**policy.state_dict(), **rank0["params"]})
    single = EpisodeRunner("PointRobot-v0", progress=False, **ROLLOUT).run(policy.eval())
    assert rank0["rollout_metrics"]["episodes"] == EPISODES
    for key, value in single.items():
        assert rank0["rollout_metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert single["return_std"] > 0  # the episodes differ, so the gathered order matters


def test_nonfinite_loss_on_one_rank_stops_every_rank(ddp_run):
    _, _, outcomes, (returncode, failure) = ddp_run
    expected = f"on rank 1 of 2 (every rank stops) at step {NAN_STEP}; training stopped before the update"
    assert outcomes[1] is not None and f"BCAll: loss 'bc_loss' is nan {expected}" in outcomes[1], failure
    assert outcomes[0] is not None and f"BCAll: the loss is non-finite {expected}" in outcomes[0], failure
    assert returncode == 0, failure


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
