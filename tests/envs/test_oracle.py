import math

import pytest
import torch

from lightning_saferl.envs import point_robot as pr
from lightning_saferl.data.collect import rollout_point_robot
from lightning_saferl.envs.oracle import (
    dataset_rows_among, escape_margin, feasibility_scores, feasible_region_iou, feasible_starts, grid_slice,
    greedy_violations, is_feasible, one_step_hazard_rule, TURN_RATES,
)

DOWN = -math.pi / 2  # heading from above straight at hazard 1, centred at (0.4, -1.2)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def _above_hazard(gap: float, v: float, theta: float = DOWN) -> list[float]:
    """A state `gap` above hazard 1's top edge (y = -0.4), on its vertical axis."""
    return [0.4, -0.4 + gap, v, theta]


def test_clearly_safe_and_clearly_doomed_states():
    states = _t(
        [-2.5, -2.5, 0.3, 0.0],  # far from both hazards, slow
        [2.5, 0.0, 0.0, math.pi],  # at rest outside the hazards
        [0.4, -1.2, 0.0, 0.0],  # at a hazard centre
        [-0.4, 1.0, 1.0, 0.0],  # inside hazard 2
        _above_hazard(0.1, 3.0),  # 0.1 from the edge at top speed, heading at the centre
        _above_hazard(0.3, 3.0),
    )
    assert is_feasible(states).tolist() == [True, True, False, False, False, False]


def test_standard_start_is_feasible():
    assert is_feasible(_t(list(pr.STANDARD_START))).item()


def test_escape_margin_counts_the_manoeuvres_that_avoid_every_hazard():
    # far from both hazards, at rest: every manoeuvre is safe; the standard start (heading for the upper hazard at
    # speed 2) escapes with some turn rates only; inside a hazard none
    states = _t([2.5, -2.5, 0.0, 0.0], list(pr.STANDARD_START), [0.4, -1.2, 1.0, 0.0])
    margin = escape_margin(states)
    assert margin[0].item() == len(TURN_RATES) and 0 < margin[1].item() < len(TURN_RATES) and margin[2].item() == 0
    per_rate = torch.stack([is_feasible(states, (rate,)) for rate in TURN_RATES]).sum(0)
    assert margin.tolist() == per_rate.tolist()


def test_moving_away_just_outside_is_feasible():
    states = _t(_above_hazard(0.01, 3.0, math.pi / 2), [0.4 + 0.81, -1.2, 2.0, 0.0])
    assert is_feasible(states).tolist() == [True, True]


def test_braking_threshold_matches_euler_braking_distance():
    # Straight braking from v0 = m * DT travels DT * sum_{k<m} (v0 - k DT) = v0^2 / 2 + v0 * DT / 2.
    v0 = 1.0
    braking = v0**2 / 2 + v0 * pr.DT / 2  # 0.525
    states = _t(_above_hazard(braking + 0.01, v0), _above_hazard(braking - 0.01, v0))
    assert is_feasible(states, turn_rates=(0.0,)).tolist() == [True, False]
    # Turning while braking can only add feasible states; slowly enough to brake is feasible either way.
    assert is_feasible(states[:1]).item()
    # Far too fast for the gap: even turning at full rate cannot avoid the hazard.
    assert not is_feasible(_t(_above_hazard(braking, 2.5))).item()


def test_more_manoeuvres_never_remove_feasible_states():
    states = pr.sample_random_starts(2000, torch.Generator().manual_seed(0))
    straight = is_feasible(states, turn_rates=(0.0,))
    full = is_feasible(states)
    assert not (straight & ~full).any()
    assert (full & ~straight).any()  # turning rescues some states
    assert not (full & pr.in_hazard(states)).any()


def test_batched_result_equals_one_state_at_a_time():
    states = pr.sample_random_starts(24, torch.Generator().manual_seed(3))
    batched = is_feasible(states)
    single = torch.stack([is_feasible(s[None])[0] for s in states])
    assert torch.equal(batched, single)
    assert 0 < int(batched.sum()) < 24


def test_grid_slice_layout():
    xs, ys, states = grid_slice(1.5, 0.3, n=5, extent=2.0)
    assert xs.shape == ys.shape == (5,) and states.shape == (25, 4)
    assert xs.tolist() == pytest.approx([-2.0, -1.0, 0.0, 1.0, 2.0])
    grid = states.view(5, 5, 4)
    assert grid[1, 3].tolist() == pytest.approx([xs[3].item(), ys[1].item(), 1.5, 0.3])
    assert torch.all(grid[..., 2] == 1.5) and torch.allclose(grid[..., 3], torch.tensor(0.3))
    at_rest = grid_slice(0.0, 0.0, n=41)[2]  # a robot at rest is feasible exactly outside the hazards
    assert torch.equal(is_feasible(at_rest), ~pr.in_hazard(at_rest))


def test_feasible_region_iou_on_hand_made_masks():
    pred = torch.tensor([True, True, False, False])
    ref = torch.tensor([True, False, True, False])
    assert feasible_region_iou(pred, ref) == pytest.approx(1 / 3)
    assert feasible_region_iou(pred, pred) == 1.0
    assert feasible_region_iou(pred, ~pred) == 0.0
    assert feasible_region_iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        feasible_region_iou(pred, ref[:3])


def test_feasibility_scores_on_hand_made_masks():
    oracle = torch.tensor([True, True, True, False, False, False, False])
    hazard = torch.tensor([False, False, False, False, False, True, True])  # shadow: indices 3, 4
    pred = torch.tensor([True, True, False, False, True, False, True])
    scores = feasibility_scores(pred, oracle, hazard)
    assert scores["shadow_recall"] == 0.5 and scores["false_infeasible_rate"] == pytest.approx(1 / 3)
    assert scores["iou"] == pytest.approx(2 / 5) and scores["shadow_share"] == pytest.approx(2 / 7)
    trivial = feasibility_scores(~hazard, oracle, hazard)  # "feasible iff outside every hazard"
    assert trivial["shadow_recall"] == 0.0 and trivial["false_infeasible_rate"] == 0.0


def test_state_from_observation_inverts_observe():
    states = pr.sample_random_starts(64, torch.Generator().manual_seed(3))
    assert torch.allclose(pr.state_from_observation(pr.observe(states)), states, atol=1e-12)


def test_feasible_starts_are_held_out_from_collected_data():
    """Evaluation starts come from their own stream: no row of a collected dataset (the data's own seed-0 stream
    would give dozens), and every start is oracle-feasible."""
    data = rollout_point_robot(20_000, seed=0, progress=False)
    observations = torch.from_numpy(data["observations"])
    starts = feasible_starts(200, start_seed=0)
    assert is_feasible(starts).all() and len(starts) == 200
    assert dataset_rows_among(starts, observations) == 0
    collection_stream = pr.sample_random_starts(200, torch.Generator().manual_seed(0))
    assert dataset_rows_among(collection_stream, observations) > 50
    assert not torch.equal(feasible_starts(200, start_seed=1), starts)


def _next_state(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    return pr.step_states(pr.state_from_observation(obs.double()), act.double())


def test_greedy_rollout_loses_no_start_with_a_perfect_ranking_and_many_with_poor_ones():
    starts = feasible_starts(600, 3)
    tight = starts[escape_margin(starts) <= 3]
    assert len(tight) >= 15
    # ranking by the oracle's escape margin one step ahead: the braking actions keep a working manoeuvre working
    perfect = greedy_violations(lambda obs, act: -escape_margin(_next_state(obs, act)).double(), tight, proposals=16)
    assert not perfect.any()
    # ranking by the hazard distance one step ahead (no reachability): loses a share of the tight starts
    myopic = greedy_violations(one_step_hazard_rule, tight)
    assert 0.2 < myopic.float().mean() < 0.8
    # a critic that prefers full throttle straight on loses nearly all of them
    reckless = greedy_violations(lambda obs, act: -act[:, 0] + act[:, 1].abs(), tight, proposals=16)
    assert reckless.float().mean() > 0.9


def test_greedy_rollout_is_seeded_and_checks_its_input():
    starts = feasible_starts(50, 4)
    noisy = lambda obs, act: one_step_hazard_rule(obs, act) + 0.05 * act[:, 1]  # noqa: E731
    assert torch.equal(greedy_violations(noisy, starts, seed=1), greedy_violations(noisy, starts, seed=1))
    with pytest.raises(ValueError, match="shape"):
        greedy_violations(noisy, starts[:, :3])
    with pytest.raises(ValueError, match="proposals"):
        greedy_violations(noisy, starts, proposals=-1)
