"""EpisodeRunner: exact episode protocol, batching, metrics, DDP helpers, PointRobot outcomes."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from lightning_saferl.data.tasks import TaskSpec
from lightning_saferl.envs import point_robot
from lightning_saferl.evaluation import EpisodeRunner, merge_episodes, rank_slice, summarize_episodes


class ToyEnv(gym.Env):
    """obs = (seed, t). Even seeds last 3 steps, odd seeds 5. reward = seed + action + noise * N(0, 1) from the
    seeded np_random; cost 1 at the first step of seeds divisible by 3, else 0."""

    def __init__(self, noise: float = 0.0, report_cost: bool = True):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.noise, self.report_cost = noise, report_cost

    def _obs(self):
        return np.array([self.s, self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s, self.t = seed, 0
        self.length = 3 if seed % 2 == 0 else 5
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = float(self.s) + float(action[0]) + self.noise * float(self.np_random.normal())
        cost = 1.0 if (self.s % 3 == 0 and self.t == 1) else 0.0
        info = {"cost": cost} if self.report_cost else {}
        return self._obs(), reward, self.t >= self.length, False, info


class ZeroPolicy:
    device = torch.device("cpu")

    def act(self, obs):
        return torch.zeros(obs.shape[0], 1)


class ObsPolicy:
    """Deterministic, row-independent policy of the observation."""

    device = torch.device("cpu")

    def act(self, obs):
        return torch.tanh(0.3 * obs[:, :1] - 0.2 * obs[:, 1:2])


class CountingPolicy:
    def __init__(self, inner):
        self.inner, self.batch_sizes, self.device = inner, [], torch.device("cpu")

    def act(self, obs):
        assert obs.dtype == torch.float32 and obs.device == self.device and not torch.is_grad_enabled()
        self.batch_sizes.append(obs.shape[0])
        return self.inner.act(obs)


def toy_runner(episodes, num_envs, task="Toy-v0", **kwargs):
    noise = kwargs.pop("noise", 0.0)
    return EpisodeRunner(task, episodes=episodes, num_envs=num_envs, env_factory=lambda _: ToyEnv(noise),
                         progress=False, **kwargs)


def test_exact_episode_count_and_seeds_with_uneven_lengths():
    ep = toy_runner(7, 3).run_episodes(ZeroPolicy())
    np.testing.assert_array_equal(ep["index"], np.arange(7))
    np.testing.assert_array_equal(ep["length"], [3, 5, 3, 5, 3, 5, 3])
    np.testing.assert_array_equal(ep["return"], [s * (3 if s % 2 == 0 else 5) for s in range(7)])
    np.testing.assert_array_equal(ep["cost"], [1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(ep["violations"], [1, 0, 0, 1, 0, 0, 1])


def test_short_episodes_do_not_bias_metrics():
    # seeds 10..16: even seeds end after 3 steps and refill their slot first; the metrics must still be
    # over exactly seeds 10..16
    metrics = toy_runner(7, 3, seed=10).run(ZeroPolicy())
    returns = [s * (3 if s % 2 == 0 else 5) for s in range(10, 17)]  # 30 55 36 65 42 75 48
    assert metrics["episodes"] == 7
    assert metrics["return_mean"] == pytest.approx(351 / 7)
    assert metrics["return_std"] == pytest.approx(np.std(returns))
    assert metrics["cost_mean"] == pytest.approx(2 / 7)  # seeds 12 and 15
    assert metrics["cost_std"] == pytest.approx(np.std([0, 0, 1, 0, 0, 1, 0]))
    assert metrics["violation_free_fraction"] == pytest.approx(5 / 7)
    assert metrics["length_mean"] == pytest.approx(27 / 7)
    assert "normalized_return" not in metrics and "normalized_cost" not in metrics  # not in the registry


def test_one_policy_call_per_step_for_all_live_episodes():
    policy = CountingPolicy(ZeroPolicy())
    toy_runner(7, 3).run_episodes(policy)
    # slots: steps 1-8 run 3 episodes (seeds 0,1,2 -> 3,4 after step 3 -> 5 after step 5 -> 6 after step 6);
    # seed 3 ends after step 8, seed 6 after step 9, seed 5 after step 10
    assert policy.batch_sizes == [3] * 8 + [2, 1]
    assert sum(policy.batch_sizes) == 3 * 4 + 5 * 3  # one row per env step


def test_batched_equals_unbatched_on_deterministic_policy():
    batched = toy_runner(9, 4, noise=0.5).run_episodes(ObsPolicy())
    single = toy_runner(9, 1, noise=0.5).run_episodes(ObsPolicy())
    for key in batched:
        np.testing.assert_array_equal(batched[key], single[key])
    # the env noise (drawn from the np_random seeded at reset) is really part of the returns
    assert not np.allclose(batched["return"], toy_runner(9, 4).run_episodes(ObsPolicy())["return"])


def test_runner_is_reusable_and_deterministic():
    runner = toy_runner(5, 2, noise=1.0)
    first, second = runner.run(ObsPolicy()), runner.run(ObsPolicy())
    assert first == second
    runner.close()


class NoisyPolicy:
    """A stochastic policy that samples from torch's global RNG, as diffusion and VAE actors do."""

    device = torch.device("cpu")

    def act(self, obs):
        return torch.rand(obs.shape[0], 1) * 2 - 1


def test_stochastic_policy_figures_do_not_depend_on_the_callers_rng():
    # evaluation inside a training run (RNG advanced) and from a saved checkpoint (fresh RNG) must agree, and
    # a rollout during training must leave the training stream where it was
    runner = toy_runner(6, 3)
    torch.manual_seed(1)
    first = runner.run_episodes(NoisyPolicy())
    torch.manual_seed(2)
    expected_next = torch.rand(3)
    torch.manual_seed(2)
    second = runner.run_episodes(NoisyPolicy())
    assert torch.equal(torch.rand(3), expected_next)
    np.testing.assert_array_equal(first["return"], second["return"])
    assert len(np.unique(first["return"] - np.floor(first["return"]))) > 1  # the actions really are random


def test_normalized_scores_with_reference_values():
    spec = TaskSpec(task_id="Toy-v0", max_episode_steps=100, simulator="toy", cost_limit=0.0,
                    reward_min=0.0, reward_max=10.0)
    metrics = toy_runner(7, 3, task=spec).run(ZeroPolicy())
    # returns 0 5 6 15 12 25 18 (sum 81), costs 1 0 0 1 0 0 1
    assert metrics["return_mean"] == pytest.approx(81 / 7)
    assert metrics["normalized_return"] == pytest.approx(81 / 70)
    assert metrics["normalized_cost"] == pytest.approx((3 * 2 + 4 * 1) / 7)  # (C + 1) / (0 + 1)
    limited = toy_runner(7, 3, task=spec, cost_limit=2.0).run(ZeroPolicy())
    assert limited["normalized_cost"] == pytest.approx(3 / 14)  # C / 2


def test_max_episode_steps_cuts_episodes():
    spec = TaskSpec(task_id="Toy-v0", max_episode_steps=4, simulator="toy", cost_limit=0.0)
    ep = toy_runner(4, 2, task=spec).run_episodes(ZeroPolicy())
    np.testing.assert_array_equal(ep["length"], [3, 4, 3, 4])
    np.testing.assert_array_equal(toy_runner(4, 2, max_episode_steps=2).run_episodes(ZeroPolicy())["length"], [2] * 4)


def test_missing_cost_key_is_a_clear_error():
    runner = EpisodeRunner("Toy-v0", episodes=2, num_envs=2, progress=False,
                           env_factory=lambda _: ToyEnv(report_cost=False))
    with pytest.raises(KeyError, match="no 'cost' in the step info"):
        runner.run(ZeroPolicy())


def test_wrong_action_shape_is_a_clear_error():
    class Flat:
        device = torch.device("cpu")

        def act(self, obs):
            return torch.zeros(obs.shape[0])

    with pytest.raises(ValueError, match=r"policy.act returned shape \(3,\)"):
        toy_runner(3, 3).run(Flat())


@pytest.mark.parametrize("episodes", range(0, 13))
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_slice_partitions_exactly(episodes, world_size):
    slices = [rank_slice(episodes, r, world_size) for r in range(world_size)]
    assert [i for s in slices for i in s] == list(range(episodes))
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        rank_slice(episodes, world_size, world_size)


def test_rank_results_reduce_to_the_single_process_result():
    full = toy_runner(7, 3, noise=0.3).run_episodes(ObsPolicy())
    parts = [toy_runner(7, 2, noise=0.3).run_episodes(ObsPolicy(), rank_slice(7, r, 3)) for r in range(3)]
    merged = merge_episodes(parts[::-1])  # gathered order does not matter
    for key in full:
        np.testing.assert_array_equal(merged[key], full[key])
    assert summarize_episodes(merged) == toy_runner(7, 3, noise=0.3).run(ObsPolicy())
    with pytest.raises(ValueError, match="more than once"):
        merge_episodes([parts[0], parts[0]])


class Brake:
    device = torch.device("cpu")

    def act(self, obs):
        return torch.tensor([[-1.0, 0.0]]).expand(obs.shape[0], 2)


def test_point_robot_braking_from_standard_start():
    """Full braking on the heading pi/4 from (-1.8, 0) at v = 2: the robot travels
    s_k = DT * sum_{j<k} (2 - DT j) and stops after 40 steps at s = 2.05, inside the hazard at (-0.4, 1.2),
    which it enters at step 13 (s_12 = 1.035 < 1.8385 - sqrt(0.64 - 0.02) = 1.0511 < s_13 = 1.105).
    It stays there until the 300-step time limit: cost 300 - 12 = 288; return = d_goal(start) - d_goal(end)."""
    runner = EpisodeRunner("PointRobot-v0", episodes=5, num_envs=3, progress=False)
    ep = runner.run_episodes(Brake())
    x0, y0, v0, theta = point_robot.STANDARD_START
    dt = point_robot.DT
    speeds = np.clip(v0 - dt * np.arange(300), 0.0, None)
    travelled = np.cumsum(dt * speeds)
    pos = np.array([x0, y0]) + travelled[:, None] * np.array([math.cos(theta), math.sin(theta)])
    inside = np.linalg.norm(pos - np.array([-0.4, 1.2]), axis=1) < 0.8
    goal = np.array(point_robot.GOAL)
    expected_return = np.linalg.norm(np.array([x0, y0]) - goal) - np.linalg.norm(pos[-1] - goal)
    assert int(inside.sum()) == 288
    np.testing.assert_array_equal(ep["cost"], [288.0] * 5)
    np.testing.assert_array_equal(ep["length"], [300] * 5)
    np.testing.assert_allclose(ep["return"], expected_return, rtol=0, atol=1e-6)
    metrics = runner.summarize(ep)
    assert metrics["violation_free_fraction"] == 0.0 and metrics["return_std"] == pytest.approx(0.0, abs=1e-12)
    assert "normalized_return" not in metrics  # PointRobot has no DSRL reference values


def test_point_robot_random_starts_differ_by_seed_and_are_reproducible():
    runner = EpisodeRunner("PointRobot-v0", episodes=4, num_envs=4, progress=False,
                           reset_options={"random_start": True}, max_episode_steps=20)
    ep = runner.run_episodes(Brake())
    assert len(np.unique(ep["return"])) == 4
    again = EpisodeRunner("PointRobot-v0", episodes=4, num_envs=1, progress=False,
                          reset_options={"random_start": True}, max_episode_steps=20).run_episodes(Brake())
    np.testing.assert_array_equal(ep["return"], again["return"])
    assert (ep["length"] <= 20).all()


def test_per_episode_start_states_and_success():
    """Episode i starts at its own state; a robot next to the goal, heading into it, reaches it (success);
    one parked far away (v = 0, braking) never does."""
    goal_x, goal_y = point_robot.GOAL
    starts = [{"state": [goal_x - 0.37, goal_y, 1.0, 0.0]}, {"state": [-2.5, -2.5, 0.0, 0.0]},
              {"state": [goal_x, goal_y - 0.5, 2.0, math.pi / 2]}]
    runner = EpisodeRunner("PointRobot-v0", episodes=3, num_envs=2, progress=False, reset_options=starts,
                           max_episode_steps=30)
    ep = runner.run_episodes(Brake())
    np.testing.assert_array_equal(ep["success"], [1.0, 0.0, 1.0])
    # braking: steps of 0.05 v_k with v_k = v_0 - 0.05 k; inside the goal once the distance is < 0.3:
    # 0.37 -> 0.32 -> 0.2725 (2 steps);  0.5 -> 0.4 -> 0.3025 -> 0.2075 (3 steps)
    np.testing.assert_array_equal(ep["length"], [2, 30, 3])
    assert runner.summarize(ep)["success_rate"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 per-episode reset_options for 3 episodes"):
        EpisodeRunner("PointRobot-v0", episodes=3, reset_options=starts[:2])


def test_lockstep_restarts_a_finished_slot_after_the_step_or_at_once():
    """The call order `lockstep` promises: all slots start first; ended slots restart after `after_step`, or (with
    `restart_at_once`) right after their own step, before the next slot steps; a slot whose `start` gives None
    idles."""
    from lightning_saferl.evaluation import lockstep

    def order(restart_at_once):
        calls, queue = [], iter(range(4))  # episodes 0..3, seeded 0..3 (ToyEnv: even seeds last 3 steps, odd 5)

        class Env(ToyEnv):
            def reset(self, *, seed=None, options=None):
                calls.append(("reset", seed))
                return super().reset(seed=seed)

        envs = [Env(), Env()]

        def start(slot):
            seed = next(queue, None)
            return None if seed is None else envs[slot].reset(seed=seed)[0]

        def act(live, observations):
            calls.append(("act", live))
            return np.zeros((len(live), 1))

        def record(slot, step):
            assert step.action.dtype == np.float32  # cast to the env's Box dtype
            calls.append(("step", slot))
            return step.terminated

        lockstep(envs, start, act, record, after_step=lambda live: calls.append(("after", live)),
                 restart_at_once=restart_at_once)
        return calls

    after = order(restart_at_once=False)
    at_once = order(restart_at_once=True)
    assert after[:2] == at_once[:2] == [("reset", 0), ("reset", 1)]
    # episode 0 ends at its 3rd step (slot 0): the next episode starts after the step, or before slot 1 steps
    third = [("act", [0, 1]), ("step", 0), ("step", 1), ("after", [0, 1]), ("reset", 2)]
    assert after[2 + 2 * 4:2 + 3 * 4 + 1] == third, after
    assert at_once[2 + 2 * 4:2 + 3 * 4 + 1] == [("act", [0, 1]), ("step", 0), ("reset", 2), ("step", 1),
                                                 ("after", [0, 1])], at_once
    for calls in (after, at_once):  # 4 episodes of 3, 5, 3, 5 steps, then every slot idles
        assert [c for c in calls if c[0] == "reset"] == [("reset", s) for s in range(4)]
        assert sum(c[0] == "step" for c in calls) == 16 and calls[-1][0] == "after"
