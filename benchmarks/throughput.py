"""Training and acting throughput of FISOR (and DRCORL's policy) on this machine, against its own matmul peak.

    python benchmarks/throughput.py [--threads N] [--repeats R] [--bf16] [--quick] [--baselines_only] [--recipe R]

Prints a table (median, inter-quartile range, min and max per figure) and, last, one JSON object.

What is timed: the real module code path outside the Lightning Trainer loop, step by step:
``batch = datamodule.next_batch()`` (device-side sampling), ``optimizer.zero_grad()``,
``module.training_step(batch)`` (losses, non-finite check), ``loss.backward()``, ``optimizer.step()`` (the
optimiser of ``module.configure_optimizers()``) and ``module.after_optimizer_step()`` (EMA / Polyak update).
The Lightning loop's own per-step cost is measured once (``Trainer.fit`` on a RewardCritic, minimal trainer:
no logger, progress bar, checkpointing, model summary or validation) as the median step time inside ``fit`` minus the
median bare step of the same module.

FLOPs: matrix-multiply FLOPs counted from the layer shapes as executed (2 * rows * in * out per linear
layer; the diffusion time-conditioning MLP runs on the T distinct times, not per row), training = 3 x forward
for the networks being trained plus 1 x forward for networks only evaluated (target Q, V(s')).
``*_fraction_of_peak`` divides the achieved FLOP rate by ``peak_gflops``: the median rate of a 2048^3 float32
matmul measured in the same run with the same threads (sampled before and after the module timings and once in
each round of the stage timings, pooled).

The quick start's stages (``--recipe``, default the quick start's recipe): each stage's training step as the recipe
builds it (networks, batch size, precision), its FLOPs, its median time (over rounds that alternate the stages and
a peak sample, so a burst of other load falls on all of them alike) and fraction of the peak, and the stage's
arithmetic limit, ``max_steps x step FLOPs / peak``; ``quick_start_flop_limit_minutes`` sums the stages' limits
(the least time the quick start's training can take on this machine at the measured fp32 matmul peak), and
``quick_start_step_minutes`` sums ``max_steps x median step time`` (the stages one after another, no Trainer).

Synthetic data of the PointRobot shapes (obs 11, act 2) and untrained critics: throughput does not depend on
the values. Timings on a shared machine are noisy: the table shows the spread and the 1-minute load average.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

import lightning_saferl  # noqa: F401  (first: it sets OpenMP's idle-spin default before torch starts OpenMP)
import torch

OBS_DIM, ACT_DIM = 11, 2
PEAK_SIZE = 2048
QUICK_START_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "fisor_guard" / "point_robot.yaml"


# ------------------------------------------------------------------------------------------------ timing
def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min, max of seconds -> milliseconds."""
    ms = sorted(1e3 * s for s in samples)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "min": ms[0], "max": ms[-1], "n": len(ms)}


def repeat(fn: Callable[[int], object], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Time `fn(i)` `repeats` times after `warmup` untimed calls (wall clock)."""
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(warmup + i)
        samples.append(time.perf_counter() - start)
    return summarize(samples)


def matmul_samples(repeats: int, n: int = PEAK_SIZE, warmup: int = 3) -> list[float]:
    """Seconds per float32 n x n x n matmul, `repeats` samples after `warmup` untimed calls."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        samples.append(time.perf_counter() - start)
    return samples


# ------------------------------------------------------------------------------------------------ FLOPs
def linear_flops(rows: int, module: torch.nn.Module) -> int:
    """2 * rows * in * out summed over the nn.Linear layers of `module`."""
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def ensemble_flops(rows: int, module: torch.nn.Module) -> int:
    """2 * rows * in * out * members summed over the EnsembleLinear layers of `module`."""
    from lightning_saferl.nets.mlp import EnsembleLinear

    return sum(2 * rows * m.weight.numel() for m in module.modules() if isinstance(m, EnsembleLinear))


def noise_net_forward_flops(net, rows: int, num_times: int) -> int:
    """One forward of NoiseResNet on `rows` rows: the trunk per row, the time MLP and its first-layer block
    once per distinct time (as NoiseResNet computes them)."""
    hidden, cond_dim = net.inp.out_features, net.cond[-1].out_features
    per_row = 2 * rows * (net.inp.in_features - cond_dim) * hidden  # the (a_t, s) columns of the first layer
    per_row += linear_flops(rows, net.blocks) + linear_flops(rows, net.out)
    per_time = linear_flops(num_times, net.cond) + 2 * num_times * cond_dim * hidden
    return per_row + per_time


def critic_step_flops(critic, rows: int) -> int:
    """Q and V trained (3 x forward) plus the target-Q and V(s') forwards."""
    q, v = ensemble_flops(rows, critic.q), linear_flops(rows, critic.v)
    return 3 * (q + v) + q + v


# ------------------------------------------------------------------------------------------------ setup
def synthetic_dataset(path: Path, n: int, episode_length: int = 100, seed: int = 0) -> Path:
    """Random PointRobot-shaped transitions in the DSRL format (timeouts every `episode_length` rows)."""
    from lightning_saferl.data.format import write_dataset

    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS_DIM)).astype(np.float32)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[episode_length - 1::episode_length] = True
    return write_dataset(path, {
        "observations": obs, "next_observations": np.roll(obs, -1, axis=0),
        "actions": rng.uniform(-0.99, 0.99, (n, ACT_DIM)).astype(np.float32),
        "rewards": rng.standard_normal(n).astype(np.float32),
        "costs": (rng.random(n) < 0.1).astype(np.float32),
        "terminals": np.zeros(n, dtype=bool), "timeouts": timeouts,
        "constraint_values": rng.standard_normal(n).astype(np.float32),
    })


def datamodule(path: Path, batch_size: int, seed: int = 0):
    from lightning_saferl.data.datamodule import OfflineDataModule

    dm = OfflineDataModule(task="PointRobot-v0", path=str(path), batch_size=batch_size, steps_per_epoch=10**6,
                           seed=seed)
    dm.setup("fit")
    return dm


def optimizer_of(module) -> torch.optim.Optimizer:
    config = module.configure_optimizers()
    return config["optimizer"] if isinstance(config, dict) else config


def baseline_loops(path: Path) -> list[tuple[str, "BareLoop"]]:
    """BCQ-Lag, CPQ, COptiDICE and CDT as their PointRobot recipes build them, each with a batch-256 stream
    (CDT: windows of its recipe's K steps)."""
    import importlib

    import yaml
    from lightning_saferl.data.datamodule import OfflineDataModule

    loops = []
    for name in ("bcq_lag", "cpq", "coptidice", "cdt"):
        recipe = Path(__file__).resolve().parent.parent / "configs" / "baselines" / f"{name}_point_robot.yaml"
        policy = yaml.safe_load(recipe.read_text())["stages"]["policy"]
        module_name, cls = policy["model"]["class_path"].rsplit(".", 1)
        kwargs = {"max_episode_steps": 300, **policy["model"]["init_args"]}
        module = getattr(importlib.import_module(module_name), cls)(OBS_DIM, ACT_DIM, **kwargs)
        dm = OfflineDataModule(task="PointRobot-v0", path=str(path), batch_size=256, steps_per_epoch=10**6,
                               sequence_length=policy["data"].get("sequence_length"))
        dm.setup("fit")
        if name == "coptidice":
            module.set_data_statistics(dm.transitions)
        loops.append((name, BareLoop(module, dm)))
    return loops


class BareLoop:
    """One training step of `module` as Lightning's automatic optimisation runs it, without the Trainer."""

    def __init__(self, module, dm, autocast: Optional[torch.dtype] = None):
        self.module, self.dm, self.opt = module.train(), dm, optimizer_of(module)
        self.autocast = autocast

    def __call__(self, i: int) -> None:
        self.step_on(self.dm.next_batch(), i)

    def step_on(self, batch: dict, i: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            loss = self.module.training_step(batch, i)
        loss.backward()
        self.opt.step()
        self.module.after_optimizer_step()


def lightning_overhead(module_factory, dm_factory, steps: int, bare_median_ms: float) -> dict:
    """Median per-step time inside Trainer.fit (time between consecutive on_train_batch_end) minus the bare
    loop's median for the same module and batch size."""
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stamps.append(time.perf_counter())

    clock = Clock()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[clock])
    trainer.fit(module_factory(), datamodule=dm_factory())
    stats = summarize(list(np.diff(clock.stamps[5:])))
    stats["overhead_ms"] = stats["median"] - bare_median_ms
    return stats


def recipe_stages(recipe: Path) -> dict[str, dict]:
    """A recipe's stages, resolved: name -> {class_path, init_args, inputs, max_steps, batch_size, precision}.
    A stage's own `trainer` / `data` values win over the recipe's shared ones, as in the pipeline."""
    from omegaconf import OmegaConf

    from lightning_saferl.runs import register_resolvers

    register_resolvers()
    config = OmegaConf.to_container(OmegaConf.load(recipe), resolve=True)
    stages = {}
    for name, stage in config["stages"].items():
        trainer = {**config.get("trainer", {}), **stage.get("trainer", {})}
        data = {**config.get("data", {}), **stage.get("data", {})}
        stages[name] = {"class_path": stage["model"]["class_path"], "init_args": stage["model"].get("init_args", {}),
                        "inputs": stage.get("inputs", {}), "max_steps": trainer["max_steps"],
                        "batch_size": data["batch_size"], "precision": str(trainer.get("precision", "32-true"))}
    return stages


def stage_step_flops(module, batch_size: int) -> int:
    """Training FLOPs of one step of a FISOR stage's module at `batch_size` rows."""
    from lightning_saferl.actors.fisor import FisorActor

    if isinstance(module, FisorActor):
        return 3 * noise_net_forward_flops(module.net, batch_size, module.schedule.num_steps)
    return critic_step_flops(module, batch_size)


def time_recipe_stages(recipe: Path, path: Path, rounds: int, seconds_per_round: float = 0.2,
                       peak_samples: Optional[list] = None) -> tuple[dict, list]:
    """Build every stage of `recipe` as it trains (copies of the critics handed to the actor) and time its step with a
    bare loop at the stage's batch size and precision. The stages are timed in `rounds` alternating rounds (each
    stage about `seconds_per_round` per round, one sample = that stretch's mean step time), with one peak matmul
    appended to `peak_samples` per round: a burst of the host's other load falls on every stage and on the peak
    alike, so their ratios hold where single figures would not."""
    import importlib

    modules, loops, stages = {}, {}, recipe_stages(recipe)
    for name, stage in stages.items():
        module_name, cls = stage["class_path"].rsplit(".", 1)
        # copies, as the pipeline hands an actor its critics from their checkpoints: the actor freezes its own
        inputs = {arg: copy.deepcopy(modules[source]) for arg, source in stage["inputs"].items()}
        module = getattr(importlib.import_module(module_name), cls)(OBS_DIM, ACT_DIM, **stage["init_args"], **inputs)
        modules[name] = module
        dm = datamodule(path, stage["batch_size"], seed=len(modules))
        if hasattr(module, "compute_sample_weights"):
            with torch.no_grad():
                module.sample_weights = module.compute_sample_weights(dm.transitions)
        loops[name] = BareLoop(module, dm, torch.bfloat16 if stage["precision"].startswith("bf16") else None)
        for i in range(3):  # warm-up
            loops[name](i)
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(rounds):
        if peak_samples is not None:
            peak_samples += matmul_samples(1, warmup=0)
        for name, loop in loops.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < seconds_per_round:
                loop(calls)
                calls += 1
            samples[name].append((time.perf_counter() - start) / calls)
    figures, rows = {}, []
    for name, stage in stages.items():
        stats = summarize(samples[name])
        flops = stage_step_flops(modules[name], stage["batch_size"])
        figures[name] = {"max_steps": stage["max_steps"], "batch_size": stage["batch_size"],
                         "precision": stage["precision"], "step_gflop": flops / 1e9, "step_ms": stats["median"]}
        rows.append((f"quick start: {name}, batch {stage['batch_size']}, {stage['precision']}", stats,
                     f"{flops / 1e9:.3f} GFLOP x {stage['max_steps']} steps"))
    return figures, rows


def relate_stages_to_peak(stages: dict, peak: float) -> None:
    """Add each stage's fraction of `peak` (GFLOP/s), arithmetic limit and step-time minutes, in place."""
    for figures in stages.values():
        gflop, seconds, steps = figures["step_gflop"], figures["step_ms"] * 1e-3, figures["max_steps"]
        figures.update(fraction_of_peak=gflop / seconds / peak, flop_limit_minutes=steps * gflop / peak / 60,
                       step_minutes=steps * seconds / 60)
        for key, value in figures.items():
            if isinstance(value, float):
                figures[key] = round(value, 4)


# ------------------------------------------------------------------------------------------------ main
def print_rows(rows: list[tuple[str, dict, str]]) -> None:
    print(f"{'figure':52s} {'median ms':>10s} {'IQR ms':>17s} {'min-max ms':>19s}  note")
    for name, s, note in rows:
        print(f"{name:52s} {s['median']:10.2f} {s['q1']:8.2f}-{s['q3']:<8.2f} {s['min']:9.2f}-{s['max']:<9.2f}  {note}")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per figure (more for cheap ones)")
    parser.add_argument("--bf16", action="store_true", help="also time the full FISOR step under bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test of the script)")
    parser.add_argument("--baselines_only", action="store_true",
                        help="only the BCQ-Lag, CPQ, COptiDICE and CDT training steps (no FISOR figures)")
    parser.add_argument("--recipe", type=Path, default=QUICK_START_RECIPE,
                        help="the recipe whose stages are timed against their arithmetic limit (default: the quick "
                             "start's)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # self.log outside a Trainer warns once per module
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    reps = 3 if args.quick else args.repeats
    torch.manual_seed(0)

    from lightning_saferl.actors.fisor import FisorActor
    from lightning_saferl.critics import FeasibilityCritic, RewardCritic
    from lightning_saferl.runs import cpu_model, native_bf16_cpu

    rows: list[tuple[str, dict, str]] = []
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
                 # bf16 matrix products run natively with AVX512-BF16 or AMX; otherwise oneDNN emulates them
                 # (on a CPU that has them, ONEDNN_MAX_CPU_ISA=AVX512_CORE shows the emulated speed)
                 "cpu_native_bf16": native_bf16_cpu(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                 "load_average_1min_start": os.getloadavg()[0]}

    # the peak is sampled before and after the module timings (pooled median), so load drifts affect both alike
    peak_samples = matmul_samples(max(reps // 2, 5))
    peak = 2 * PEAK_SIZE**3 / statistics.median(peak_samples) / 1e9

    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_dataset(Path(tmp) / "bench.hdf5", 100_000)
        # -- the baselines' training steps at batch 256, their PointRobot recipes' networks
        for name, loop in baseline_loops(path):
            stats = repeat(loop, reps)
            out[f"{name}_step_ms"] = stats["median"]
            rows.append((f"{name} step, batch 256 (PointRobot recipe)", stats, ""))
        if args.baselines_only:
            print_rows(rows)
            print(json.dumps(out))
            return out

        dm256, dm1024 = datamodule(path, 256), datamodule(path, 1024, seed=1)
        feas, reward = FeasibilityCritic(OBS_DIM, ACT_DIM), RewardCritic(OBS_DIM, ACT_DIM)
        actor = FisorActor(OBS_DIM, ACT_DIM, feasibility_critic=feas, reward_critic=reward)
        with torch.no_grad():
            actor.sample_weights = actor.compute_sample_weights(dm1024.transitions)

        # -- the quick start's stages as its recipe trains them
        stages, stage_rows = time_recipe_stages(args.recipe, path, reps, 0.02 if args.quick else 0.2, peak_samples)
        rows += stage_rows

        # -- actor step at 1024
        actor_loop = BareLoop(actor, dm1024)
        stats = repeat(actor_loop, reps)
        flops = 3 * noise_net_forward_flops(actor.net, 1024, actor.schedule.num_steps)
        out.update(actor_step_ms=stats["median"], actor_step_gflop=flops / 1e9)
        rows.append(("FISOR actor step, batch 1024", stats, f"{flops / 1e9:.2f} GFLOP"))

        # -- both critics at 256 (fresh copies: their optimisers are separate from the actor's frozen ones)
        critics = [FeasibilityCritic(OBS_DIM, ACT_DIM), RewardCritic(OBS_DIM, ACT_DIM)]
        critic_loops = [BareLoop(c, dm256) for c in critics]

        def critic_step(i: int) -> None:
            batch = dm256.next_batch()  # both critics see the same batch, as FISOR's joint update does
            for loop in critic_loops:
                loop.step_on(batch, i)

        stats = repeat(critic_step, 3 * reps)
        flops = sum(critic_step_flops(c, 256) for c in critics)
        out.update(critic_step_ms=stats["median"], critic_step_gflop=flops / 1e9)
        rows.append(("FISOR both critics step, batch 256", stats, f"{flops / 1e9:.3f} GFLOP"))

        # -- everything FISOR trains per step at batch 2048: 2 actor steps at 1024 + 4 x both critics at 256
        def full_step(i: int) -> None:
            for j in range(2):
                actor_loop(2 * i + j)
            for j in range(4):
                critic_step(4 * i + j)

        stats = repeat(full_step, max(reps // 2, 3), warmup=1)
        out["fisor_full_step_ms_b2048"] = stats["median"]
        out["fisor_full_step_gflop"] = (2 * out["actor_step_gflop"] + 4 * out["critic_step_gflop"])
        rows.append(("FISOR full step (2x actor@1024 + 4x critics@256)", stats, "paper setting, batch 2048"))

        if args.bf16:
            actor_bf16, critics_bf16 = BareLoop(actor, dm1024, torch.bfloat16), [
                BareLoop(c, dm256, torch.bfloat16) for c in critics]

            def full_step_bf16(i: int) -> None:
                for j in range(2):
                    actor_bf16(2 * i + j)
                for j in range(4):
                    for loop in critics_bf16:
                        loop(4 * i + j)

            stats = repeat(full_step_bf16, max(reps // 2, 3), warmup=1)
            out["fisor_full_step_ms_b2048_bf16"] = stats["median"]
            rows.append(("FISOR full step, bf16 autocast", stats, "bf16-mixed"))
            stats = repeat(actor_bf16, reps, warmup=1)
            out["actor_step_ms_bf16"] = stats["median"]
            rows.append(("FISOR actor step, batch 1024, bf16 autocast", stats,
                         f"{out['actor_step_ms'] / stats['median']:.2f}x fp32's speed"))

        # -- acting: N = 16 candidates, T = 5 steps, pick min Q_h
        actor.eval()
        for key, batch, times in (("fisor_act_ms", 1, 5 * reps), ("fisor_act_ms_batch20", 20, reps)):
            obs = torch.randn(batch, OBS_DIM)
            stats = repeat(lambda i: actor.act(obs), times)
            out[key] = stats["median"]
            rows.append((f"FISOR act, {batch} obs x 16 candidates x 5 steps", stats, ""))

        try:
            from lightning_saferl.actors.drcorl import DrcorlPolicy
        except ImportError:
            out["drcorl_act_ms"] = None
        else:
            policy = DrcorlPolicy(OBS_DIM, ACT_DIM).eval()
            obs = torch.randn(1, OBS_DIM)
            stats = repeat(lambda i: policy.act(obs), 10 * reps)
            out["drcorl_act_ms"] = stats["median"]
            rows.append(("DRCORL act, 1 obs (one MLP forward)", stats, ""))

        # -- the Lightning loop's own per-step cost (RewardCritic at 256: a cheap step shows it best)
        bare = repeat(BareLoop(RewardCritic(OBS_DIM, ACT_DIM), dm256), 3 * reps)
        fit = lightning_overhead(lambda: RewardCritic(OBS_DIM, ACT_DIM), lambda: datamodule(path, 256), 3 * reps + 5,
                                 bare["median"])
        out["lightning_loop_overhead_ms"] = fit["overhead_ms"]
        rows.append(("RewardCritic step, bare loop", bare, ""))
        rows.append(("RewardCritic step, inside Trainer.fit", fit, f"overhead {fit['overhead_ms']:.2f} ms/step"))

    peak_samples += matmul_samples(max(reps // 2, 5))
    peak = 2 * PEAK_SIZE**3 / statistics.median(peak_samples) / 1e9
    out["peak_gflops"] = peak
    rows.insert(0, (f"peak: {PEAK_SIZE}^3 fp32 matmul (pooled)", summarize(peak_samples), f"{peak:.1f} GFLOP/s"))
    relate_stages_to_peak(stages, peak)
    out.update(quick_start_recipe=str(args.recipe), quick_start_stages=stages,
               quick_start_flop_limit_minutes=sum(s["flop_limit_minutes"] for s in stages.values()),
               quick_start_step_minutes=sum(s["step_minutes"] for s in stages.values()))
    for key in ("actor_step", "critic_step"):
        out[f"{key}_fraction_of_peak"] = out[f"{key}_gflop"] / (out[f"{key}_ms"] * 1e-3) / peak
    out["load_average_1min_end"] = os.getloadavg()[0]
    print(f"\ntorch {out['torch']}, {out['threads']} threads, {out['cpu']}, OMP_WAIT_POLICY={out['omp_wait_policy']}, "
          f"GOMP_SPINCOUNT={out['gomp_spincount']}, "
          f"load average (1 min) {out['load_average_1min_start']:.2f} -> {out['load_average_1min_end']:.2f}")
    print(f"fraction of peak: actor {out['actor_step_fraction_of_peak']:.2f}, "
          f"critics {out['critic_step_fraction_of_peak']:.2f}")
    for name, figures in stages.items():
        print(f"quick start stage {name}: {figures['step_gflop']:.3f} GFLOP/step, {figures['step_ms']:.2f} ms, "
              f"{figures['fraction_of_peak']:.2f} of peak, {figures['max_steps']} steps: limit "
              f"{figures['flop_limit_minutes']:.1f} min, steps {figures['step_minutes']:.1f} min")
    print(f"quick start ({args.recipe}): arithmetic limit {out['quick_start_flop_limit_minutes']:.1f} min at "
          f"{peak:.0f} GFLOP/s; its steps one after another {out['quick_start_step_minutes']:.1f} min "
          f"({out['quick_start_step_minutes'] / out['quick_start_flop_limit_minutes']:.2f}x the limit)")
    print_rows(rows)
    first = ["peak_gflops", "actor_step_ms", "actor_step_fraction_of_peak", "critic_step_ms",
             "critic_step_fraction_of_peak", "fisor_full_step_ms_b2048", "fisor_act_ms", "fisor_act_ms_batch20",
             "drcorl_act_ms", "quick_start_flop_limit_minutes", "quick_start_step_minutes"]
    out = {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
