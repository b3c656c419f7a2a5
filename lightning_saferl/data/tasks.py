"""Task registry: the embedded PointRobot task plus every DSRL task, as data.

DSRL values (dataset URLs, max episode steps, reference min/max episode reward and cost) are the facts
published by the DSRL benchmark in ``dsrl/infos.py`` (DATASET_URLS, DEFAULT_MAX_EPISODE_STEPS,
MAX_/MIN_EPISODE_REWARD, MAX_/MIN_EPISODE_COST); the task ids follow its registrations in
``dsrl/offline_bullet_safety_gym/__init__.py`` (``Offline{Agent}{Task}-v0``),
``dsrl/offline_safety_gymnasium/__init__.py`` (``Offline{Env}Gymnasium-v0`` and velocity tasks
``Offline{Agent}VelocityGymnasium-v1``) and ``dsrl/offline_metadrive/__init__.py``
(``OfflineMetadrive-{road}{vehicle}-v0``). The dataset file name is the last component of the URL (DSRL's
cache naming). Observation/action sizes of DSRL tasks are not recorded here (None): the data module reads
them from the HDF5 file.

Dataset hashes (``TaskSpec.sha256``): DSRL publishes none and the files could not be fetched when this table was
written, so every entry is None and the download module verifies on first download instead (it records the
sha256 of the first good download in ``<file>.sha256`` and checks later reads and downloads against it). A
hash set here takes precedence over the recorded one.

Scores (DSRL convention):
    normalized return  = (R - R_min) / (R_max - R_min)
    normalized cost    = (C + e) / (limit + e),   e = 1 if limit == 0 else 0
    reward scaling     = r * max_episode_steps / (R_max - R_min)
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

from lightning_saferl.errors import InputError, UnknownNameError

__all__ = ["TaskSpec", "TASKS", "get_task", "task_ids", "dsrl_task_ids", "DSRL_URL_BASE", "DSRL_COST_LIMIT",
           "DEFAULT_COST_LIMITS"]

DSRL_URL_BASE = "http://data.offline-saferl.org/download/"
#: default cost limit of the DSRL recipes (FISOR / DRCORL evaluate DSRL tasks at limit 10)
DSRL_COST_LIMIT = 10.0
#: the cost limits each task family is scored at (``TaskSpec.cost_limits``; a sweep's default grid). DSRL families
#: follow OSRL's evaluation targets (liuzuxin/OSRL examples/configs/*_configs.py, e.g. the cost part of CDT's
#: ``target_returns``): Bullet-Safety-Gym and MetaDrive {10, 20, 40}, Safety-Gymnasium {20, 40, 80}. PointRobot
#: (episode cost = steps inside the hazard, 300-step episodes; no published protocol): 0 is the hard constraint the
#: task is built for (FISOR's setting, BC-Safe's filter), 5 the DRCORL recipe's budget, 10 DSRL's default limit.
DEFAULT_COST_LIMITS = {"bullet": (10.0, 20.0, 40.0), "metadrive": (10.0, 20.0, 40.0),
                       "safety_gymnasium": (20.0, 40.0, 80.0), "point_robot": (0.0, 5.0, 10.0)}


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one task. Reference scores are None where the task has none (PointRobot)."""

    task_id: str
    max_episode_steps: int
    simulator: str  # "point_robot" | "bullet" | "safety_gymnasium" | "metadrive"
    cost_limit: float
    reward_min: Optional[float] = None
    reward_max: Optional[float] = None
    cost_min: Optional[float] = None
    cost_max: Optional[float] = None
    dataset_file: Optional[str] = None
    url: Optional[str] = None
    obs_dim: Optional[int] = None
    act_dim: Optional[int] = None
    sha256: Optional[str] = None  # hex digest of the published dataset file, where known

    @property
    def has_reference_scores(self) -> bool:
        return self.reward_min is not None and self.reward_max is not None

    @property
    def cost_limits(self) -> tuple[float, ...]:
        """The limits the task's family is scored at (`DEFAULT_COST_LIMITS`), else ``(cost_limit,)``."""
        return DEFAULT_COST_LIMITS.get(self.simulator, (self.cost_limit,))

    @property
    def is_dsrl(self) -> bool:
        return self.url is not None

    def _reward_range(self) -> float:
        if not self.has_reference_scores:
            raise InputError(f"task {self.task_id!r} has no DSRL reference scores (reward_min/reward_max); "
                             "normalized returns and DSRL reward scaling are undefined for it")
        return float(self.reward_max) - float(self.reward_min)

    def normalized_return(self, episode_return):
        """(R - R_min) / (R_max - R_min); works on floats, numpy arrays and tensors."""
        span = self._reward_range()
        return (episode_return - float(self.reward_min)) / span

    def normalized_cost(self, episode_cost, limit: Optional[float] = None):
        """(C + e) / (limit + e) with e = 1 only when limit == 0; ``limit`` defaults to ``cost_limit``."""
        limit = self.cost_limit if limit is None else float(limit)
        if limit < 0:
            raise InputError(f"cost limit must be >= 0, got {limit}")
        eps = 1.0 if limit == 0 else 0.0
        return (episode_cost + eps) / (limit + eps)

    @property
    def reward_scale_factor(self) -> float:
        """max_episode_steps / (R_max - R_min): the DSRL reward scaling factor."""
        return self.max_episode_steps / self._reward_range()

    def dsrl_reward_scale(self, reward):
        """r * max_episode_steps / (R_max - R_min)."""
        return reward * self.reward_scale_factor


# The embedded task (lightning_saferl.envs.point_robot): 300-step episodes, hard constraint (limit 0).
_POINT_ROBOT = TaskSpec(task_id="PointRobot-v0", max_episode_steps=300, simulator="point_robot", cost_limit=0.0,
                        obs_dim=11, act_dim=2)

# DSRL tasks. Columns: task id, simulator, max episode steps, dataset file (appended to DSRL_URL_BASE),
# R_max, R_min, C_max, C_min. Source: liuzuxin/DSRL dsrl/infos.py (keys AntCircle, ..., harddense).
_DSRL_TABLE = (
    # Bullet-Safety-Gym
    ("OfflineAntCircle-v0", "bullet", 500, "SafetyAntCircle-v0-200-5728.hdf5",
     460.7091979980469, 0.0177031010389328, 200.0, 0.0),
    ("OfflineAntRun-v0", "bullet", 200, "SafetyAntRun-v0-150-1816.hdf5",
     955.4818725585938, 0.001767391717990563, 150.0, 0.0),
    ("OfflineBallCircle-v0", "bullet", 200, "SafetyBallCircle-v0-80-886.hdf5",
     881.46337890625, 0.38312244415283203, 80.0, 0.0),
    ("OfflineBallRun-v0", "bullet", 100, "SafetyBallRun-v0-80-940.hdf5",
     1327.445556640625, 26.339754104614258, 80.0, 0.0),
    ("OfflineCarCircle-v0", "bullet", 300, "SafetyCarCircle-v0-100-1450.hdf5",
     534.3060913085938, 3.484419822692871, 100.0, 0.0),
    ("OfflineCarRun-v0", "bullet", 200, "SafetyCarRun-v0-40-651.hdf5",
     574.6533203125, 204.28726196289062, 40.0, 0.0),
    ("OfflineDroneCircle-v0", "bullet", 300, "SafetyDroneCircle-v0-100-1923.hdf5",
     996.38916015625, 207.794189453125, 100.0, 0.0),
    ("OfflineDroneRun-v0", "bullet", 200, "SafetyDroneRun-v0-140-1990.hdf5",
     682.8330078125, 10.557029724121094, 140.0, 0.0),
    # Safety-Gymnasium: Car
    ("OfflineCarButton1Gymnasium-v0", "safety_gymnasium", 1000, "SafetyCarButton1Gymnasium-v0-250-2656.hdf5",
     44.420003345738984, 0.0028926206826067613, 250.0, 0.0),
    ("OfflineCarButton2Gymnasium-v0", "safety_gymnasium", 1000, "SafetyCarButton2Gymnasium-v0-300-3755.hdf5",
     41.99513815522894, 0.001767391717990563, 300.0, 0.0),
    ("OfflineCarCircle1Gymnasium-v0", "safety_gymnasium", 500, "SafetyCarCircle1Gymnasium-v0-250-1271.hdf5",
     24.94155502319336, 8.037073135375977, 250.0, 0.0),
    ("OfflineCarCircle2Gymnasium-v0", "safety_gymnasium", 500, "SafetyCarCircle2Gymnasium-v0-400-940.hdf5",
     25.950098037719727, 5.113386154174805, 398.0, 0.0),
    ("OfflineCarGoal1Gymnasium-v0", "safety_gymnasium", 1000, "SafetyCarGoal1Gymnasium-v0-120-1671.hdf5",
     39.907809198384705, 0.012232819540852091, 120.0, 0.0),
    ("OfflineCarGoal2Gymnasium-v0", "safety_gymnasium", 1000, "SafetyCarGoal2Gymnasium-v0-200-4105.hdf5",
     28.902897990056502, 0.001032874531954775, 200.0, 0.0),
    ("OfflineCarPush1Gymnasium-v0", "safety_gymnasium", 1000, "SafetyCarPush1Gymnasium-v0-200-2871.hdf5",
     16.304467598905237, 0.013700173533941762, 200.0, 0.0),
    ("OfflineCarPush2Gymnasium-v0", "safety_gymnasium", 1000, "SafetyCarPush2Gymnasium-v0-250-4407.hdf5",
     15.141648491514314, 0.00029391133526335267, 250.0, 0.0),
    # Safety-Gymnasium: Point
    ("OfflinePointButton1Gymnasium-v0", "safety_gymnasium", 1000, "SafetyPointButton1Gymnasium-v0-200-2268.hdf5",
     41.19301568767707, 0.008822109034937853, 200.0, 0.0),
    ("OfflinePointButton2Gymnasium-v0", "safety_gymnasium", 1000, "SafetyPointButton2Gymnasium-v0-250-3288.hdf5",
     42.8985953616709, 0.014114166087574098, 250.0, 0.0),
    ("OfflinePointCircle1Gymnasium-v0", "safety_gymnasium", 500, "SafetyPointCircle1Gymnasium-v0-200-1098.hdf5",
     61.72819519042969, 20.067626953125, 200.0, 0.0),
    ("OfflinePointCircle2Gymnasium-v0", "safety_gymnasium", 500, "SafetyPointCircle2Gymnasium-v0-300-895.hdf5",
     54.02184295654297, 20.478347778320312, 299.0, 0.0),
    ("OfflinePointGoal1Gymnasium-v0", "safety_gymnasium", 1000, "SafetyPointGoal1Gymnasium-v0-100-2022.hdf5",
     30.071114857340543, 0.01196012764197707, 100.0, 0.0),
    ("OfflinePointGoal2Gymnasium-v0", "safety_gymnasium", 1000, "SafetyPointGoal2Gymnasium-v0-200-3442.hdf5",
     27.717709787852737, 0.002616959830266108, 200.0, 0.0),
    ("OfflinePointPush1Gymnasium-v0", "safety_gymnasium", 1000, "SafetyPointPush1Gymnasium-v0-150-2379.hdf5",
     16.518654299293367, 0.0014001545292344209, 150.0, 0.0),
    ("OfflinePointPush2Gymnasium-v0", "safety_gymnasium", 1000, "SafetyPointPush2Gymnasium-v0-200-3242.hdf5",
     14.691039145644403, 0.0012438183001730607, 200.0, 0.0),
    # Safety-Gymnasium: velocity
    ("OfflineAntVelocityGymnasium-v1", "safety_gymnasium", 1000, "SafetyAntVelocityGymnasium-v1-250-2249.hdf5",
     2976.276611328125, 6.1519012451171875, 250.0, 0.0),
    ("OfflineHalfCheetahVelocityGymnasium-v1", "safety_gymnasium", 1000,
     "SafetyHalfCheetahVelocityGymnasium-v1-250-2495.hdf5",
     2806.93310546875, 5.7509765625, 250.0, 0.0),
    ("OfflineHopperVelocityGymnasium-v1", "safety_gymnasium", 1000, "SafetyHopperVelocityGymnasium-v1-250-2240.hdf5",
     1911.396728515625, 37.05154800415039, 250.0, 0.0),
    ("OfflineSwimmerVelocityGymnasium-v1", "safety_gymnasium", 1000,
     "SafetySwimmerVelocityGymnasium-v1-200-1686.hdf5",
     238.95831298828125, 0.07114458084106445, 200.0, 0.0),
    ("OfflineWalker2dVelocityGymnasium-v1", "safety_gymnasium", 1000,
     "SafetyWalker2dVelocityGymnasium-v1-300-2729.hdf5",
     3418.223876953125, 18.668498992919922, 300.0, 0.0),
    # MetaDrive
    ("OfflineMetadrive-easysparse-v0", "metadrive", 1000, "SafeMetaDrive-easysparse-v0-85-1000.hdf5",
     425.8006286621094, 20.094310760498047, 82.42418670654297, 0.00025356505648232996),
    ("OfflineMetadrive-easymean-v0", "metadrive", 1000, "SafeMetaDrive-easymean-v0-85-1000.hdf5",
     425.82440185546875, 22.142553329467773, 82.38601684570312, 0.0),
    ("OfflineMetadrive-easydense-v0", "metadrive", 1000, "SafeMetaDrive-easydense-v0-85-1000.hdf5",
     425.81732177734375, 19.71139144897461, 80.36358642578125, 0.0),
    ("OfflineMetadrive-mediumsparse-v0", "metadrive", 1000, "SafeMetaDrive-mediumsparse-v0-50-1000.hdf5",
     269.80084228515625, 17.446578979492188, 46.46459197998047, 0.0),
    ("OfflineMetadrive-mediummean-v0", "metadrive", 1000, "SafeMetaDrive-mediummean-v0-50-1000.hdf5",
     269.8221435546875, 17.032529830932617, 46.46154022216797, 0.0),
    ("OfflineMetadrive-mediumdense-v0", "metadrive", 1000, "SafeMetaDrive-mediumdense-v0-50-1000.hdf5",
     269.7813415527344, 15.102348327636719, 46.45858383178711, 0.0),
    ("OfflineMetadrive-hardsparse-v0", "metadrive", 1000, "SafeMetaDrive-hardsparse-v0-85-1000.hdf5",
     486.80523681640625, 17.247974395751953, 85.010009765625, 0.0),
    ("OfflineMetadrive-hardmean-v0", "metadrive", 1000, "SafeMetaDrive-hardmean-v0-85-1000.hdf5",
     486.9967956542969, 19.387981414794922, 84.33995056152344, 0.00033149970113299787),
    ("OfflineMetadrive-harddense-v0", "metadrive", 1000, "SafeMetaDrive-harddense-v0-85-1000.hdf5",
     486.63616943359375, 15.386894226074219, 84.76679229736328, 0.0),
)


def _build_registry() -> dict[str, TaskSpec]:
    tasks = {_POINT_ROBOT.task_id: _POINT_ROBOT}
    for task_id, simulator, steps, file, r_max, r_min, c_max, c_min in _DSRL_TABLE:
        tasks[task_id] = TaskSpec(task_id=task_id, max_episode_steps=steps, simulator=simulator,
                                  cost_limit=DSRL_COST_LIMIT, reward_min=r_min, reward_max=r_max,
                                  cost_min=c_min, cost_max=c_max, dataset_file=file, url=DSRL_URL_BASE + file)
    return tasks


#: every known task, keyed by id
TASKS: dict[str, TaskSpec] = _build_registry()


def task_ids() -> list[str]:
    return list(TASKS)


def dsrl_task_ids() -> list[str]:
    return [t for t, spec in TASKS.items() if spec.is_dsrl]


def get_task(task_id: str) -> TaskSpec:
    """The TaskSpec of ``task_id``; unknown ids raise KeyError listing close matches."""
    try:
        return TASKS[task_id]
    except KeyError:
        pass
    lowered = {t.lower(): t for t in TASKS}
    close = [lowered[t] for t in difflib.get_close_matches(str(task_id).lower(), lowered, n=5, cutoff=0.5)]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known tasks: {', '.join(TASKS)}"
    raise UnknownNameError(f"unknown task id {task_id!r}{hint}")
