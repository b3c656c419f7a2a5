"""Environments: the embedded PointRobot task (registered with gymnasium on import), the DSRL tasks'
simulators (`lightning_saferl.envs.dsrl`, imported when a DSRL env is built) and `make_env`."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import gymnasium
from gymnasium.envs.registration import registry

from lightning_saferl.data.tasks import dsrl_task_ids
from lightning_saferl.envs.point_robot import ENV_ID as POINT_ROBOT_ID
from lightning_saferl.envs.point_robot import MAX_EPISODE_STEPS, PointRobotEnv
from lightning_saferl.errors import InputError

if POINT_ROBOT_ID not in registry:
    gymnasium.register(
        id=POINT_ROBOT_ID,
        entry_point="lightning_saferl.envs.point_robot:PointRobotEnv",
        max_episode_steps=MAX_EPISODE_STEPS,
    )


def _dsrl_factory(task_id: str, **kwargs: Any) -> gymnasium.Env:
    """Build a DSRL task's env; its simulator is imported only now (ImportError with the install command)."""
    from lightning_saferl.envs.dsrl import make_dsrl_env

    return make_dsrl_env(task_id, **kwargs)


# task id -> factory(**kwargs) -> gymnasium.Env
ENV_FACTORIES: dict[str, Callable[..., gymnasium.Env]] = {
    POINT_ROBOT_ID: lambda **kwargs: gymnasium.make(POINT_ROBOT_ID, **kwargs),
    **{task_id: partial(_dsrl_factory, task_id) for task_id in dsrl_task_ids()},
}


def make_env(task_id: str, **kwargs: Any) -> gymnasium.Env:
    """Build the evaluation environment of `task_id` (kwargs go to its factory)."""
    try:
        factory = ENV_FACTORIES[task_id]
    except KeyError:
        raise InputError(
            f"make_env: no environment factory for task {task_id!r}; available: {sorted(ENV_FACTORIES)}"
        ) from None
    return factory(**kwargs)


__all__ = ["ENV_FACTORIES", "POINT_ROBOT_ID", "PointRobotEnv", "make_env"]
