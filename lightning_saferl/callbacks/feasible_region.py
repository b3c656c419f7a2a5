"""FeasibleRegionPlot: learned feasible region (V_h <= 0) against the PointRobot oracle on 2-D state slices.

Besides the IoU of the two feasible sets, the *shadow* is scored: oracle-infeasible states outside every hazard
(a crash can no longer be avoided), which the trivial rule "feasible iff h(s) <= 0" misses entirely
(`lightning_saferl.envs.oracle.feasibility_scores`)."""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib import rc_context
from matplotlib.patches import Circle, Patch

from lightning_saferl.callbacks.rollout import as_saved, due, eval_mode, publish, task_from_trainer
from lightning_saferl.envs import point_robot
from lightning_saferl.envs.oracle import feasibility_scores, feasible_region_iou, grid_slice, is_feasible
from lightning_saferl.errors import InputError

__all__ = ["FeasibleRegionPlot", "plot_feasible_region", "region_scores", "slice_ious", "DEFAULT_SLICES"]

#: (speed v, heading theta) of the default slices
DEFAULT_SLICES = ((0.5, math.pi / 4), (1.0, math.pi / 2), (1.5, math.pi / 4))

ValueFn = Callable[[torch.Tensor], torch.Tensor]


def _evaluate_slice(value_fn: ValueFn, v: float, theta: float, n: int) -> dict[str, Any]:
    xs, ys, states = grid_slice(v, theta, n)
    values = value_fn(point_robot.observe(states))
    if values.shape != (n * n,):
        raise ValueError(f"feasible region: value_fn returned shape {tuple(values.shape)} for {n * n} "
                         f"observations; expected ({n * n},)")
    values = values.detach().float().cpu().view(n, n)
    oracle = is_feasible(states.double()).view(n, n)
    hazard = point_robot.in_hazard(states.double()).view(n, n)
    return {"xs": xs.numpy(), "ys": ys.numpy(), "values": values.numpy(), "oracle": oracle.numpy(),
            "hazard": hazard.numpy(), "shadow": (~oracle & ~hazard).numpy(),
            "iou": feasible_region_iou(values <= 0, oracle),
            "scores": feasibility_scores(values <= 0, oracle, hazard)}


def _pooled_scores(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`feasibility_scores` over the states of all slices together."""
    values, oracle, hazard = (torch.cat([torch.from_numpy(r[key]).flatten() for r in results])
                              for key in ("values", "oracle", "hazard"))
    return feasibility_scores(values <= 0, oracle, hazard)


def slice_ious(value_fn: ValueFn, slices: Sequence[Sequence[float]] = DEFAULT_SLICES, n: int = 81) -> list[float]:
    """IoU of the learned feasible set ``{value_fn(observe(s)) <= 0}`` with the oracle's, per (v, theta) slice
    on an n x n position grid (`lightning_saferl.envs.oracle.grid_slice`)."""
    return [_evaluate_slice(value_fn, v, theta, n)["iou"] for v, theta in slices]


def region_scores(value_fn: ValueFn, slices: Sequence[Sequence[float]] = DEFAULT_SLICES,
                  n: int = 81) -> dict[str, float]:
    """`feasibility_scores` (iou, shadow_recall, false_infeasible_rate, shadow_share) of ``{value_fn <= 0}``
    over the grid states of all slices together."""
    return _pooled_scores([_evaluate_slice(value_fn, v, theta, n) for v, theta in slices])


def plot_feasible_region(value_fn: ValueFn, slices: Sequence[Sequence[float]] = DEFAULT_SLICES, n: int = 81,
                         path: Optional[str] = None) -> tuple[Figure, list[float]]:
    """One panel per (v, theta) slice: ``value_fn`` (observations (B, 11) -> V_h (B,)) as a diverging colour
    map centred at 0, the learned boundary V_h = 0 (solid), the oracle's feasible boundary (dashed), the
    oracle's shadow (hatched: infeasible outside the hazards), hazards and goal; each title gives the slice's
    IoU and shadow recall. Saves a PNG at ``path`` when given. Returns the figure and the IoU per slice."""
    results = [_evaluate_slice(value_fn, v, theta, n) for v, theta in slices]
    return _draw(results, slices, path), [r["iou"] for r in results]


def _draw(results: Sequence[dict[str, Any]], slices: Sequence[Sequence[float]], path: Optional[str]) -> Figure:
    fig = Figure(figsize=(4.6 * len(results), 4.2))
    fig.subplots_adjust(left=0.06, right=0.94, bottom=0.12, top=0.9, wspace=0.4)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (v, theta), res in zip(axes, slices, results):
        xs, ys, values = res["xs"], res["ys"], res["values"]
        span = max(float(np.abs(values).max()), 1e-6)
        half = (xs[1] - xs[0]) / 2
        image = ax.imshow(values, origin="lower", cmap="RdBu_r", interpolation="nearest",
                          extent=(xs[0] - half, xs[-1] + half, ys[0] - half, ys[-1] + half),
                          norm=TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span))
        if values.min() < 0 < values.max():
            ax.contour(xs, ys, values, levels=[0.0], colors="k", linewidths=1.5)
        oracle = res["oracle"].astype(np.float32)
        if 0 < oracle.mean() < 1:
            ax.contour(xs, ys, oracle, levels=[0.5], colors="limegreen", linewidths=1.5, linestyles="--")
        if res["shadow"].any():
            with rc_context({"hatch.color": "0.25"}):
                ax.contourf(xs, ys, res["shadow"].astype(np.float32), levels=[0.5, 1.5], colors="none",
                            hatches=["////"])
        for centre in point_robot.HAZARD_CENTERS:
            ax.add_patch(Circle(centre, point_robot.HAZARD_RADIUS, fill=False, edgecolor="orange", linewidth=1.5))
        ax.add_patch(Circle(point_robot.GOAL, point_robot.GOAL_RADIUS, color="gold", alpha=0.8))
        ax.set_title(f"v={v:g}, theta={theta:.2f}  IoU={res['iou']:.3f}\n"
                     f"shadow recall={res['scores']['shadow_recall']:.2f}", fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="V_h")
    axes[0].legend(handles=[Line2D([], [], color="k", label="learned V_h = 0"),
                            Line2D([], [], color="limegreen", linestyle="--", label="oracle boundary"),
                            Patch(facecolor="none", edgecolor="0.25", hatch="////", label="oracle shadow"),
                            Line2D([], [], color="orange", label="hazard")], loc="lower right", fontsize=7)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def _has_grid(task: Any) -> bool:
    if isinstance(task, str):
        return task == point_robot.ENV_ID
    return getattr(task, "simulator", None) == "point_robot"


class FeasibleRegionPlot(pl.Callback):
    """Every ``every_n_steps`` training steps and at the end of training, for a module with a feasibility critic
    (``pl_module.feasibility_critic.value(obs) -> (B,)``, feasible where <= 0) on PointRobot: logs
    ``feasible_region/iou`` (mean over slices) and ``feasible_region/iou_v<v>_theta<theta>`` against the oracle,
    and (global rank 0) saves `plot_feasible_region` as ``<trainer.log_dir or default_root_dir>/
    feasible_region_step<k>.png``, also added to TensorBoard (tag ``feasible_region``) when a logger is a
    TensorBoardLogger. Also logs, over all slices' states, ``feasible_region/shadow_recall`` and
    ``feasible_region/false_infeasible_rate`` (`region_scores`). Warns once and does nothing for tasks without a grid or modules without the critic.
    """

    def __init__(self, every_n_steps: int = 1000, slices: Sequence[Sequence[float]] = DEFAULT_SLICES, n: int = 81,
                 task: Any = None):
        if every_n_steps < 1:
            raise InputError(f"FeasibleRegionPlot: every_n_steps must be >= 1, got {every_n_steps}")
        if not slices or any(len(s) != 2 for s in slices):
            raise InputError(f"FeasibleRegionPlot: slices must be a non-empty sequence of (v, theta), got {slices!r}")
        self.every_n_steps = every_n_steps
        self.slices = tuple((float(v), float(theta)) for v, theta in slices)
        self.n = n
        self.task = task
        self.last_path: Optional[str] = None
        self._last_step = -1
        self._disabled = False

    def _enabled(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
        if self._disabled:
            return False
        task = task_from_trainer(trainer, self.task, "FeasibleRegionPlot")
        reason = None
        if not _has_grid(task):
            reason = f"task {getattr(task, 'task_id', task)!r} has no state grid (only PointRobot has one)"
        elif not callable(getattr(getattr(pl_module, "feasibility_critic", None), "value", None)):
            reason = f"{type(pl_module).__name__} has no `feasibility_critic` with a `value(obs)` method"
        if reason is not None:
            rank_zero_warn(f"FeasibleRegionPlot does nothing: {reason}")
            self._disabled = True
        return not self._disabled

    def plot(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[float]:
        """Computes, logs and (rank 0) plots the slices now; returns the IoU per slice."""
        critic, precision = pl_module.feasibility_critic, trainer.precision_plugin

        def value_fn(obs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), as_saved(precision) as convert:
                return critic.value(convert(obs.to(pl_module.device, torch.float32))).float()

        step = trainer.global_step
        run_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank must ask
        with eval_mode(pl_module):
            results = [_evaluate_slice(value_fn, v, theta, self.n) for v, theta in self.slices]
        if trainer.is_global_zero:
            self.last_path = os.path.join(run_dir, f"feasible_region_step{step}.png")
            fig = _draw(results, self.slices, self.last_path)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure("feasible_region", fig, global_step=step)
        ious = [r["iou"] for r in results]
        pooled = _pooled_scores(results)
        metrics = {"feasible_region/iou": float(np.mean(ious)),
                   "feasible_region/shadow_recall": pooled["shadow_recall"],
                   "feasible_region/false_infeasible_rate": pooled["false_infeasible_rate"]}
        metrics.update({f"feasible_region/iou_v{v:g}_theta{theta:.3g}": iou
                        for (v, theta), iou in zip(self.slices, ious)})
        publish(trainer, metrics)
        self._last_step = step
        return ious

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if due(trainer, self.every_n_steps, self._last_step) and self._enabled(trainer, pl_module):
            self.plot(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != self._last_step and self._enabled(trainer, pl_module):
            self.plot(trainer, pl_module)
