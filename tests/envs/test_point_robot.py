import importlib
import math
import warnings

import gymnasium
import numpy as np
import pytest
import torch

import lightning_saferl  # noqa: F401  (registers PointRobot-v0)
from lightning_saferl import envs
from lightning_saferl.envs import make_env
from lightning_saferl.envs import point_robot as pr
from lightning_saferl.envs.oracle import is_feasible


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_euler_step_matches_hand_computation():
    states = _t(
        [1.0, 2.0, 1.0, math.pi / 2],
        [0.0, 0.0, 2.0, 0.0],  # action (2, 3) is clipped to (1, 1)
        [0.0, 0.0, 0.02, 0.0],  # braking below zero clamps v at 0
        [0.0, 0.0, 2.99, math.pi - 0.01],  # v clamps at V_MAX; theta wraps past pi
    )
    actions = _t([0.5, -1.0], [2.0, 3.0], [-1.0, 0.0], [1.0, 1.0])
    expected = _t(
        [1.0, 2.05, 1.025, math.pi / 2 - 0.05],
        [0.1, 0.0, 2.05, 0.05],
        [0.001, 0.0, 0.0, 0.0],
        [-2.99 * 0.05 * math.cos(0.01), 2.99 * 0.05 * math.sin(0.01), 3.0, -math.pi + 0.04],
    )
    torch.testing.assert_close(pr.step_states(states, actions), expected, atol=1e-12, rtol=0)


def test_step_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        pr.step_states(torch.zeros(3, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="actions"):
        pr.step_states(torch.zeros(3, 4), torch.zeros(2, 2))


def test_observation_layout_hand_worked():
    # robot at (0.4, 0) facing +y: hazard 1 at (0.4, -1.2) is straight behind, hazard 2 at (-0.4, 1.2)
    # is ahead-left: offset (-0.8, 1.2), robot-frame bearing has cos = 1.2/d, sin = 0.8/d.
    obs = pr.observe(_t([0.4, 0.0, 1.5, math.pi / 2]))
    d2 = math.sqrt(0.8**2 + 1.2**2)
    expected = _t([0.4, 0.0, 1.5, 0.0, 1.0, 1.2, -1.0, 0.0, d2, 1.2 / d2, 0.8 / d2])
    assert obs.shape == (1, pr.OBS_DIM) == (1, 11)
    torch.testing.assert_close(obs, expected, atol=1e-12, rtol=0)


def test_cost_iff_positive_constraint_value_on_random_states():
    gen = torch.Generator().manual_seed(0)
    states = torch.rand(5000, 4, generator=gen, dtype=torch.float64) * 6 - 3
    cv = pr.constraint_value(states)
    pos = states[:, :2].numpy()
    dist = np.linalg.norm(pos[:, None, :] - np.array(pr.HAZARD_CENTERS)[None], axis=-1).min(axis=1)
    np.testing.assert_allclose(cv.numpy(), 0.8 - dist, atol=1e-12)
    assert torch.equal(pr.in_hazard(states), cv > 0)
    assert 0 < int(pr.in_hazard(states).sum()) < 5000


def test_goal_and_bounds_helpers():
    states = _t([2.2, 2.0, 0.0, 0.0], [2.2, 1.85, 0.0, 0.0], [3.01, 0.0, 0.0, 0.0], [0.0, -3.01, 0.0, 0.0])
    assert pr.reached_goal(states).tolist() == [True, False, False, False]
    assert pr.out_of_bounds(states).tolist() == [False, False, True, True]


def test_env_reset_standard_state_and_random_start():
    env = gymnasium.make("PointRobot-v0")
    obs, info = env.reset(seed=0)
    torch.testing.assert_close(torch.from_numpy(obs), pr.observe(_t(list(pr.STANDARD_START)))[0].float())
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    assert info["cost"] == 0.0 and info["constraint_value"] < 0

    obs, info = env.reset(options={"state": [0.4, -1.0, 1.0, 0.0]})
    assert obs[:3].tolist() == pytest.approx([0.4, -1.0, 1.0])
    assert info["cost"] == 1.0 and info["constraint_value"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="options"):
        env.reset(options={"state": [0.0, 0.0, 5.0, 0.0]})

    starts = []
    for seed in range(200):
        env.reset(seed=seed, options={"random_start": True})
        starts.append(env.unwrapped.state)
    starts = np.array(starts)
    assert (np.abs(starts[:, :2]) <= 3).all() and starts[:, :2].std(axis=0).min() > 1.2
    assert ((starts[:, 2] >= 0.5) & (starts[:, 2] <= 2.0)).all()
    assert ((starts[:, 3] >= math.pi / 4) & (starts[:, 3] <= 3 * math.pi / 4)).all()

    env.reset(seed=7, options={"random_start": True})
    again = env.unwrapped.state
    env.reset(seed=7, options={"random_start": True})
    np.testing.assert_array_equal(env.unwrapped.state, again)
    env.reset(seed=8, options={"random_start": True})
    assert not np.array_equal(env.unwrapped.state, again)


def test_env_step_reward_cost_and_goal_termination():
    env = gymnasium.make("PointRobot-v0")
    env.reset(options={"state": [2.2 - 0.33, 2.2, 1.0, 0.0]})
    obs, reward, terminated, truncated, info = env.step(np.zeros(2, dtype=np.float32))
    assert terminated and not truncated
    assert reward == pytest.approx(0.33 - 0.28 + 1.0)
    assert obs[0] == pytest.approx(1.92)

    env.reset(options={"state": [0.4, -0.38, 1.0, -math.pi / 2]})  # 0.02 m from the hazard edge, heading in
    _, reward, terminated, _, info = env.step(np.array([5.0, 0.0]))  # clipped to u0 = 1
    assert info["cost"] == 1.0 and info["constraint_value"] == pytest.approx(0.8 - (1.2 - 0.43))
    assert not terminated
    assert env.unwrapped.state[2] == pytest.approx(1.05)


def test_env_out_of_bounds_terminates():
    env = gymnasium.make("PointRobot-v0")
    env.reset(options={"state": [2.98, 0.0, 1.0, 0.0]})
    _, reward, terminated, truncated, _ = env.step(np.zeros(2))
    assert terminated and not truncated
    assert reward == pytest.approx(math.hypot(0.78, 2.2) - math.hypot(0.83, 2.2))


def test_env_truncates_once_at_300_steps():
    env = gymnasium.make("PointRobot-v0")
    env.reset(options={"state": [0.0, 0.0, 0.0, 0.0]})
    flags = [env.step(np.array([-1.0, 0.0]))[2:4] for _ in range(300)]
    assert all(not term for term, _ in flags)
    assert [trunc for _, trunc in flags] == [False] * 299 + [True]


def test_registration_is_guarded_and_make_env():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(envs)
    assert gymnasium.spec("PointRobot-v0").max_episode_steps == pr.MAX_EPISODE_STEPS
    env = make_env("PointRobot-v0")
    assert env.action_space.shape == (2,) and env.observation_space.shape == (11,)
    with pytest.raises(ValueError, match="Nowhere-v0"):
        make_env("Nowhere-v0")


def test_scripted_controller_reaches_goal_safely_from_standard_start():
    env = gymnasium.make("PointRobot-v0")
    env.reset(seed=0)
    total_cost, terminated, truncated = 0.0, False, False
    while not (terminated or truncated):
        state = torch.from_numpy(env.unwrapped.state)[None]
        action = pr.scripted_controller(state)[0].numpy()
        assert np.abs(action).max() <= 1.0
        _, _, terminated, truncated, info = env.step(action)
        total_cost += info["cost"]
    assert terminated and total_cost == 0.0
    assert pr.reached_goal(torch.from_numpy(env.unwrapped.state)[None]).item()


def test_scripted_controller_is_competent_from_feasible_random_starts():
    states = pr.sample_random_starts(1000, torch.Generator().manual_seed(1))
    states = states[is_feasible(states)]
    alive = torch.ones(len(states), dtype=torch.bool)
    goal = torch.zeros_like(alive)
    violated = torch.zeros_like(alive)
    for _ in range(pr.MAX_EPISODE_STEPS):
        states = pr.step_states(states, pr.scripted_controller(states))
        violated |= alive & pr.in_hazard(states)
        goal |= alive & pr.reached_goal(states)
        alive &= ~(pr.reached_goal(states) | pr.out_of_bounds(states))
    assert violated.float().mean() < 0.03
    assert goal.float().mean() > 0.75
