"""Test helpers for the DSRL simulators (Bullet-Safety-Gym, Safety-Gymnasium), which a machine may lack."""
import importlib.util

import pytest

from lightning_saferl.envs.dsrl import INSTALL_COMMANDS, SIMULATOR_MODULES, require_simulator


def needs(simulator):
    """Skip unless the simulator is installed; import it the library's way (Bullet-Safety-Gym's own import
    fails under pytest's output capture: `pytest.importorskip` would error, not skip)."""
    if importlib.util.find_spec(SIMULATOR_MODULES[simulator]) is None:
        pytest.skip(f"{SIMULATOR_MODULES[simulator]} is not installed ({INSTALL_COMMANDS[simulator]})")
    require_simulator(simulator)
