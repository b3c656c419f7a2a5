"""Drop-in Lightning callbacks: safe rollouts, feasible-region plots, safe-best and last checkpoints, a progress bar
redrawn by time."""
from lightning_saferl.callbacks.checkpoint import LastCheckpoint, SafeCheckpoint, safety_score
from lightning_saferl.callbacks.feasible_region import FeasibleRegionPlot, plot_feasible_region
from lightning_saferl.callbacks.progress import TimedProgressBar
from lightning_saferl.callbacks.rollout import SafeRollout

__all__ = ["FeasibleRegionPlot", "LastCheckpoint", "SafeCheckpoint", "SafeRollout", "TimedProgressBar",
           "plot_feasible_region", "safety_score"]
