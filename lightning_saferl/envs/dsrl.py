"""Evaluation environments of the DSRL tasks (Bullet-Safety-Gym, Safety-Gymnasium, MetaDrive).

`make_dsrl_env(task_id)` builds the simulator env of a DSRL task id:

* through the ``dsrl`` package when it is importable (its own registration of ``task_id``);
* otherwise straight from the simulator: ``bullet_safety_gym`` / ``safety_gymnasium`` register the same
  environments under ``Safety...`` ids (``OfflineCarCircle-v0 -> SafetyCarCircle-v0``,
  ``OfflinePointGoal1Gymnasium-v0 -> SafetyPointGoal1Gymnasium-v0``). MetaDrive's DSRL configurations live
  in ``dsrl`` only, so MetaDrive tasks need it.

and wraps it in `DSRLEnv`, which gives every task the same contract:

* actions in ``[-1, 1]^act_dim`` (clipped), mapped affinely onto the simulator's Box bounds
  ``low + (a + 1) (high - low) / 2`` where those are not already ``[-1, 1]``;
* float32 observations; ``info["cost"]`` a float at every step (Safety-Gymnasium's 6-tuple step is
  folded into it);
* episodes truncated after the task's DSRL ``max_episode_steps``;
* ``reset(seed=s)`` seeded: Bullet-Safety-Gym ignores the seed and draws its initial state from numpy's global
  generator, so for Bullet tasks that generator is seeded with ``s``. Bullet-Safety-Gym also carries a little
  state across resets (e.g. the Drone's motor outputs, the car's wheel speeds), so with Car and Drone agents
  only a fresh env's first episode repeats exactly; later ones start from the same pose.

Safety-Gymnasium 0.4 declares dataclass fields with numpy-array defaults, which Python >= 3.11 rejects when
the class is created (``ValueError: mutable default ... use default_factory``). `patch_safety_gymnasium`
imports the affected modules with those defaults turned into ``default_factory`` copies.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import gymnasium
import numpy as np

from lightning_saferl.data.tasks import TaskSpec, get_task
from lightning_saferl.errors import InputError

__all__ = ["DSRLEnv", "make_dsrl_env", "simulator_env_id", "require_simulator", "patch_safety_gymnasium",
           "SimulatorNotInstalledError", "INSTALL_COMMANDS", "SIMULATOR_MODULES"]

#: simulator name (TaskSpec.simulator) -> python module it needs
SIMULATOR_MODULES = {"bullet": "bullet_safety_gym", "safety_gymnasium": "safety_gymnasium", "metadrive": "metadrive"}

#: simulator name -> the install command that works on Python 3.11
INSTALL_COMMANDS = {
    "bullet": 'pip install "lightning-saferl[bullet]" (from a checkout: pip install -e ".[bullet]"); to keep '
              "gymnasium 1.x instead: pip install --no-deps bullet-safety-gym==1.4.0 && pip install pybullet",
    "safety_gymnasium": "pip install --no-deps safety-gymnasium==0.4.0 && "
                        'pip install gymnasium==0.28.1 mujoco==2.3.3 "numpy<2" xmltodict pyyaml imageio',
    "metadrive": "pip install --no-deps dsrl==0.1.0 && pip install "
                 "git+https://github.com/HenryLHH/metadrive_clean.git@main (DSRL's MetaDrive fork, 0.2 API; not on "
                 "PyPI: metadrive-simulator 0.2.6 does not build on Python 3.11 and 0.4.x has another config API)",
}


class SimulatorNotInstalledError(ImportError):
    """A DSRL task's simulator package is missing; the message holds the command that installs it."""


# Importing the builder (every navigation task and asset) creates all of Safety-Gymnasium 0.4's dataclasses with
# numpy-array defaults; on Python 3.11 those are the `color` fields of assets.geoms.{Apples, Buttons, Circle, Goal,
# Hazards, Oranges, Pillars, Sigwalls, Walls}, assets.free_geoms.{PushBox, Vases} and assets.mocaps.Gremlins.
_SAFETY_GYMNASIUM_MODULES = ("safety_gymnasium.builder",)
_safety_gymnasium_patched = False


def simulator_env_id(spec: TaskSpec) -> str:
    """The simulator's own id of a DSRL task: ``Offline...`` -> ``Safety...`` (Bullet, Safety-Gymnasium)."""
    if spec.simulator not in ("bullet", "safety_gymnasium") or not spec.task_id.startswith("Offline"):
        raise ValueError(f"task {spec.task_id!r} (simulator {spec.simulator!r}) has no simulator id of its own; "
                         "it is built through the dsrl package")
    return "Safety" + spec.task_id[len("Offline"):]


@contextmanager
def _process_streams() -> Iterator[None]:
    """``sys.stdout``/``sys.stderr`` set to the process's own streams while active. Bullet-Safety-Gym silences
    pybullet (at import and in every env constructor) by flushing the C stream named after ``sys.stdout.name`` /
    ``sys.stderr.name``, which fails where those were replaced (pytest's capture, notebooks)."""
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.__stdout__ if sys.__stdout__ is not None else sys.stdout
    sys.stderr = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _import_simulator(module: str) -> None:
    if module != "bullet_safety_gym":
        importlib.import_module(module)
        return
    with _process_streams():
        importlib.import_module(module)
        importlib.import_module("bullet_safety_gym.envs.builder")


def require_simulator(simulator: str) -> None:
    """Import the simulator package of ``simulator``; ImportError with the install command if it is missing."""
    try:
        module = SIMULATOR_MODULES[simulator]
    except KeyError:
        raise InputError(f"unknown simulator {simulator!r}; known: {sorted(SIMULATOR_MODULES)}") from None
    try:
        _import_simulator(module)
    except ImportError as err:
        raise SimulatorNotInstalledError(
            f"the {simulator} tasks need the python package '{module}', which cannot be imported ({err}). "
            f"Install it with: {INSTALL_COMMANDS[simulator]}") from err


def _with_array_defaults_as_factories(cls: type) -> type:
    """Replace class attributes that are numpy arrays and annotated fields by ``field(default_factory=copy)``."""
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name)
        if isinstance(value, np.ndarray):
            setattr(cls, name, dataclasses.field(default_factory=value.copy))
    return cls


@contextmanager
def _array_defaults_as_factories() -> Iterator[None]:
    """While active, ``dataclasses.dataclass`` first turns numpy-array defaults into default factories."""
    original = dataclasses.dataclass

    def dataclass(cls=None, /, **kwargs):
        def wrap(c):
            return original(**kwargs)(_with_array_defaults_as_factories(c))

        return wrap if cls is None else wrap(cls)

    dataclasses.dataclass = dataclass
    try:
        yield
    finally:
        dataclasses.dataclass = original


def patch_safety_gymnasium() -> None:
    """Import Safety-Gymnasium's env modules with numpy-array dataclass defaults made default factories.

    Idempotent; a no-op when the modules import as they are (Python < 3.11, or an already fixed release).
    """
    global _safety_gymnasium_patched
    if _safety_gymnasium_patched:
        return
    require_simulator("safety_gymnasium")
    with _array_defaults_as_factories():
        for module in _SAFETY_GYMNASIUM_MODULES:
            importlib.import_module(module)
    _safety_gymnasium_patched = True


def _box(space: gymnasium.Space, what: str, task_id: str) -> gymnasium.spaces.Box:
    if not isinstance(space, gymnasium.spaces.Box) and type(space).__name__ != "Box":
        raise TypeError(f"{task_id}: the simulator's {what} space is {space}, expected a Box")
    return space


class DSRLEnv(gymnasium.Env):
    """A simulator env with the library's contract (module docstring): [-1, 1] actions, float32
    observations, ``info["cost"]`` as float, truncation after ``max_episode_steps``.

    ``env`` may be a gymnasium env or any object with gymnasium's ``reset``/``step`` signatures (a 6-tuple
    ``step`` returns the cost in third place), ``observation_space`` and ``action_space`` Boxes.
    """

    metadata = {"render_modes": []}

    def __init__(self, env: Any, task_id: str, max_episode_steps: int, seed_numpy_global: bool = False):
        if max_episode_steps < 1:
            raise InputError(f"{task_id}: max_episode_steps must be >= 1, got {max_episode_steps}")
        self.env = env
        self.task_id = task_id
        self.max_episode_steps = int(max_episode_steps)
        self.seed_numpy_global = seed_numpy_global
        obs_space = _box(env.observation_space, "observation", task_id)
        act_space = _box(env.action_space, "action", task_id)
        self.observation_space = gymnasium.spaces.Box(np.asarray(obs_space.low, np.float32),
                                                      np.asarray(obs_space.high, np.float32), dtype=np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=act_space.shape, dtype=np.float32)
        low, high = np.asarray(act_space.low, np.float64), np.asarray(act_space.high, np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise InputError(f"{task_id}: the simulator's action bounds must be finite to map [-1, 1] onto them, "
                             f"got low={low}, high={high}")
        self._rescale = not (np.all(low == -1.0) and np.all(high == 1.0))
        self._low, self._high = low, high
        self._act_dtype = act_space.dtype
        self._elapsed = 0

    def simulator_action(self, action: np.ndarray) -> np.ndarray:
        """[-1, 1] action (clipped) -> the simulator's bounds: ``low + (a + 1) (high - low) / 2``."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self.action_space.shape), -1.0, 1.0)
        if self._rescale:
            a = self._low + (a + 1.0) * 0.5 * (self._high - self._low)
        return a.astype(self._act_dtype)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if seed is not None and self.seed_numpy_global:
            np.random.seed(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._elapsed = 0
        return np.asarray(obs, dtype=np.float32), dict(info)

    def step(self, action):
        result = self.env.step(self.simulator_action(action))
        if len(result) == 6:
            obs, reward, cost, terminated, truncated, info = result
            info = dict(info)
        else:
            obs, reward, terminated, truncated, info = result
            info = dict(info)
            if "cost" not in info:
                raise KeyError(f"{self.task_id}: the simulator returned no 'cost' in its step info "
                               f"(keys: {sorted(info)})")
            cost = info["cost"]
        info["cost"] = float(cost)
        self._elapsed += 1
        terminated = bool(terminated)
        truncated = not terminated and (bool(truncated) or self._elapsed >= self.max_episode_steps)
        return np.asarray(obs, dtype=np.float32), float(reward), terminated, truncated, info

    def render_rgb(self) -> np.ndarray:
        """The simulator's current frame, (H, W, 3) uint8 (Bullet-Safety-Gym renders with ``mode="rgb_array"``)."""
        simulator = getattr(self.env, "unwrapped", self.env)
        try:
            frame = simulator.render(mode="rgb_array")
        except TypeError:  # gymnasium's API: the mode was fixed when the env was made
            frame = simulator.render()
        if frame is None:
            raise InputError(f"{self.task_id}: the simulator returned no frame (it was not made to render RGB "
                             "arrays)")
        return np.asarray(frame, dtype=np.uint8)[..., :3]

    def close(self) -> None:
        self.env.close()


def _dsrl_installed() -> bool:
    return importlib.util.find_spec("dsrl") is not None


def _import_dsrl_quietly(module: str):
    """Import ``module`` of dsrl; dsrl's ``__init__`` prints a warning for every simulator that is absent."""
    previous = os.environ.get("DSRL_SUPPRESS_IMPORT_ERROR")
    os.environ["DSRL_SUPPRESS_IMPORT_ERROR"] = "1"
    try:
        return importlib.import_module(module)
    finally:
        if previous is None:
            del os.environ["DSRL_SUPPRESS_IMPORT_ERROR"]
        else:
            os.environ["DSRL_SUPPRESS_IMPORT_ERROR"] = previous


def _make_through_dsrl(spec: TaskSpec):
    if spec.simulator == "metadrive":  # dsrl registers MetaDrive with the old `gym` registry: call its entry point
        gym_envs = _import_dsrl_quietly("dsrl.offline_metadrive.gym_envs")
        name = spec.task_id[len("OfflineMetadrive-"):-len("-v0")]
        return getattr(gym_envs, f"get_{name}_env")()
    _import_dsrl_quietly({"bullet": "dsrl.offline_bullet_safety_gym",
                          "safety_gymnasium": "dsrl.offline_safety_gymnasium"}[spec.simulator])
    return gymnasium.make(spec.task_id, max_episode_steps=spec.max_episode_steps, disable_env_checker=True)


def _make_direct(spec: TaskSpec):
    if spec.simulator == "metadrive":
        raise SimulatorNotInstalledError(f"{spec.task_id}: MetaDrive tasks are built through the dsrl package, "
                                         f"which is not installed. Install: {INSTALL_COMMANDS['metadrive']}")
    # require_simulator imported the simulator: its import registered the Safety... ids with gymnasium
    return gymnasium.make(simulator_env_id(spec), max_episode_steps=spec.max_episode_steps,
                          disable_env_checker=True)


def make_dsrl_env(task_id: str, use_dsrl: Optional[bool] = None) -> DSRLEnv:
    """The evaluation env of DSRL task ``task_id`` (module docstring).

    ``use_dsrl``: build through the ``dsrl`` package (True), straight from the simulator (False), or through
    ``dsrl`` when it is importable (None). A missing simulator raises ImportError with its install command.
    """
    spec = get_task(task_id)
    if not spec.is_dsrl:
        raise InputError(f"make_dsrl_env: {task_id!r} is not a DSRL task")
    require_simulator(spec.simulator)
    if spec.simulator == "safety_gymnasium":
        patch_safety_gymnasium()
    if use_dsrl is None:
        use_dsrl = _dsrl_installed()
    with _process_streams():
        env = _make_through_dsrl(spec) if use_dsrl else _make_direct(spec)
    return DSRLEnv(env, spec.task_id, spec.max_episode_steps, seed_numpy_global=spec.simulator == "bullet")
