"""FISOR's candidate choice with a Q_h tolerance band, against hand-picked candidates and critic values."""
import pytest
import torch

from lightning_saferl.actors.fisor import FisorActor


class _Column(torch.nn.Module):
    """A critic stub whose Q(s, a) is one coordinate of the action."""

    def __init__(self, column: int):
        super().__init__()
        self.column = column

    def q_value(self, obs, act):
        return act[:, self.column]

    def q_value_rows(self, obs, rows, act):  # the actor scores many actions per state through this
        return self.q_value(obs[rows], act)


# each candidate action is (Q_h, Q): the stubs read them back
CANDIDATES = torch.tensor([
    [[-1.00, 0.1], [-1.01, 0.2], [-0.99, 0.5]],   # far inside: Q_h flat within 0.02 -> highest Q (not lowest Q_h)
    [[-0.30, 0.9], [-0.20, 0.8], [-0.35, 0.1]],   # near the boundary: safest Q_h -0.35 > -0.5 -> lowest Q_h
    [[-1.00, 0.1], [-0.90, 0.9], [-0.98, 0.2]],   # Q_h varies: only the two within 0.05 of -1.00 compete
])


def _actor(monkeypatch, **kwargs) -> FisorActor:
    actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3, **kwargs)
    monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: CANDIDATES)
    actor.feasibility_critic, actor.reward_critic = _Column(0), _Column(1)
    return actor


def test_band_takes_highest_q_among_near_safest_and_falls_back_to_lowest_qh(monkeypatch):
    chosen = _actor(monkeypatch, select_tolerance=0.05, select_clearance=0.5).act(torch.zeros(3, 3))
    assert torch.equal(chosen, CANDIDATES[torch.arange(3), torch.tensor([2, 2, 2])])


def test_zero_tolerance_is_the_reference_lowest_qh(monkeypatch):
    chosen = _actor(monkeypatch, select_clearance=0.5).act(torch.zeros(3, 3))
    assert torch.equal(chosen, CANDIDATES[torch.arange(3), torch.tensor([1, 2, 0])])


def test_clearance_alone_bounds_the_band(monkeypatch):
    # a huge tolerance leaves only the clearance: row 2's candidates all have Q_h <= -0.5 -> highest Q overall
    chosen = _actor(monkeypatch, select_tolerance=10.0, select_clearance=0.5).act(torch.zeros(3, 3))
    assert torch.equal(chosen, CANDIDATES[torch.arange(3), torch.tensor([2, 2, 1])])


def test_band_needs_a_reward_critic_and_nonnegative_values(monkeypatch):
    actor = _actor(monkeypatch, select_tolerance=0.05)
    actor.reward_critic = None
    with pytest.raises(ValueError, match="select_tolerance > 0 needs a reward critic"):
        actor.act(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="select_tolerance and select_clearance must be >= 0"):
        FisorActor(obs_dim=3, act_dim=2, select_clearance=-0.1)


class _CornerCritic(torch.nn.Module):
    """Q_h(s, a) = distance from a to the corner (1, -1) minus 1, V_h(s) = obs[:, 0]."""

    def q_value(self, obs, act):
        return (act - act.new_tensor([1.0, -1.0])).norm(dim=-1) - 1.0

    def q_value_rows(self, obs, rows, act):  # the actor scores many actions per state through this
        return self.q_value(obs[rows], act)

    def value(self, obs):
        return obs[:, 0]


def test_uniform_proposals_reach_an_escape_the_candidates_miss_only_where_the_critic_flags(monkeypatch):
    # candidates all near the centre; the safest action is the corner (1, -1), which they never propose
    candidates = torch.tensor([[[0.0, 0.0], [0.1, -0.1], [-0.1, 0.1]]]).expand(2, 3, 2)
    obs = torch.tensor([[0.1, 0.0, 0.0], [-0.5, 0.0, 0.0]])   # row 0 infeasible (V_h > -0.25), row 1 feasible

    def chosen(**kwargs):
        actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3,
                           feasibility_margin=0.25, **kwargs)
        monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: candidates)
        actor.feasibility_critic = _CornerCritic()
        torch.manual_seed(0)
        return actor.act(obs)

    reference, widened = chosen(), chosen(uniform_proposals=256, proposal_gain=1.0)
    assert torch.equal(reference, torch.tensor([[0.1, -0.1], [0.1, -0.1]]))  # lowest Q_h among the candidates
    assert (widened[0] - torch.tensor([1.0, -1.0])).norm() < 0.2              # a uniform proposal near the corner
    assert torch.equal(widened[1], reference[1])                              # feasible state: unchanged
    # the candidates' best Q_h is 0.27, the corner's -1: a gain above 1.27 keeps the actor's choice
    assert torch.equal(chosen(uniform_proposals=256, proposal_gain=1.3), reference)
    with pytest.raises(ValueError, match="uniform_proposals must be >= 0 and needs select='min_qh'"):
        FisorActor(obs_dim=3, act_dim=2, uniform_proposals=8, select="max_q")
    with pytest.raises(ValueError, match="proposal_gain must be >= 0"):
        FisorActor(obs_dim=3, act_dim=2, uniform_proposals=8, proposal_gain=-0.01)


def test_snapped_or_added_vertices_reach_the_box_vertex_that_uniform_proposals_only_approach(monkeypatch):
    candidates = torch.zeros(1, 3, 2)
    obs = torch.tensor([[0.1, 0.0, 0.0]])  # critic-infeasible: the proposals act

    def chosen(snap: float = 0.0, vertices: bool = False, proposals: int = 256) -> torch.Tensor:
        actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3,
                           feasibility_margin=0.25, uniform_proposals=proposals, proposal_snap=snap,
                           proposal_vertices=vertices)
        monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: candidates)
        actor.feasibility_critic = _CornerCritic()
        torch.manual_seed(0)
        return actor.act(obs)[0]

    corner = torch.tensor([1.0, -1.0])
    assert 0 < (chosen() - corner).norm() < 0.2   # near the safest corner, never on it
    assert torch.equal(chosen(snap=0.5), corner)    # a quarter of the proposals are vertices
    assert torch.equal(chosen(snap=1.0), corner)
    assert torch.equal(chosen(vertices=True), corner)
    assert torch.equal(chosen(vertices=True, proposals=1), corner)  # the 4 vertices beside a single draw
    for snap in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"proposal_snap is a probability in \[0, 1\]"):
            FisorActor(obs_dim=3, act_dim=2, uniform_proposals=8, proposal_snap=snap)
    with pytest.raises(ValueError, match="proposal_vertices needs uniform_proposals > 0"):
        FisorActor(obs_dim=3, act_dim=2, proposal_vertices=True)


class _FirstCoordinateCostCritic(torch.nn.Module):
    """Q_c(s, a) = a_0: the tie-break would take the candidate with the lowest first coordinate."""

    def q_value_rows(self, obs, rows, act):
        return act[:, 0]


def test_proposal_tolerance_takes_the_safe_proposal_nearest_to_the_candidates_choice(monkeypatch):
    """Q_h = |a - (1, -1)| - 1: the lowest-Q_h proposal is near the corner; with a tolerance p the proposal that acts
    is the nearest to the candidates' choice (0.1, -0.1) among those within p of the lowest Q_h."""
    candidates = torch.tensor([[[0.0, 0.0], [0.1, -0.1], [-0.1, 0.1]]])
    obs = torch.tensor([[0.1, 0.0, 0.0]])  # flagged: V_h = 0.1 > -0.25

    def chosen(tolerance: float) -> torch.Tensor:
        actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3,
                           feasibility_margin=0.25, uniform_proposals=2048, proposal_tolerance=tolerance)
        monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: candidates)
        actor.feasibility_critic = _CornerCritic()
        torch.manual_seed(0)
        return actor.act(obs)[0]

    corner, choice = torch.tensor([1.0, -1.0]), torch.tensor([0.1, -0.1])
    critic = _CornerCritic()
    safest = chosen(0.0)
    assert (safest - corner).norm() < 0.05
    for tolerance in (0.2, 0.5):
        near = chosen(tolerance)
        q_h = critic.q_value(obs, near[None])[0]
        assert q_h <= critic.q_value(obs, safest[None])[0] + tolerance       # within the tolerance of the lowest
        assert q_h > critic.q_value(obs, safest[None])[0] + tolerance - 0.05  # at its edge: the nearest such
        assert (near - choice).norm() < (safest - choice).norm() - 0.5 * tolerance
    with pytest.raises(ValueError, match="proposal_tolerance is a Q_h tolerance >= 0"):
        FisorActor(obs_dim=3, act_dim=2, uniform_proposals=8, proposal_tolerance=-0.1)


def test_cost_tiebreak_leaves_a_state_alone_where_a_proposal_has_an_escape(monkeypatch):
    """V_h > 0 at both states; at row 0 a proposal near the corner scores Q_h <= 0 (an escape), so it is kept; at
    row 1 (a far-off corner: every action's Q_h > 0) the cost tie-break picks among the candidates."""
    candidates = torch.tensor([[[0.0, 0.0], [0.1, -0.1], [-0.1, 0.1]]]).expand(2, 3, 2)

    class Critic(_CornerCritic):
        def q_value(self, obs, act):  # row 1 of obs (obs[:, 1] = 5) puts every action 5 further from safety
            return super().q_value(obs, act) + obs[:, 1]

    actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3, feasibility_margin=0.25,
                       uniform_proposals=256, cost_tiebreak=1.0)
    monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: candidates)
    actor.feasibility_critic, actor.cost_critic = Critic(), _FirstCoordinateCostCritic()
    torch.manual_seed(0)
    actions = actor.act(torch.tensor([[0.1, 0.0, 0.0], [0.1, 5.0, 0.0]]))
    assert (actions[0] - torch.tensor([1.0, -1.0])).norm() < 0.2
    assert torch.equal(actions[1], torch.tensor([-0.1, 0.1]))


def test_acting_settings_change_on_a_trained_actor_and_training_settings_do_not(monkeypatch):
    actor = _actor(monkeypatch, select_clearance=0.5)
    actor.set_acting_hparams({"select_tolerance": 0.05})
    assert torch.equal(actor.act(torch.zeros(3, 3)), CANDIDATES[torch.arange(3), torch.tensor([2, 2, 2])])
    with pytest.raises(ValueError, match=r"\['lr'\] are not acting settings"):
        actor.set_acting_hparams({"lr": 1.0})
    with pytest.raises(ValueError, match="proposal_gain must be >= 0"):
        actor.set_acting_hparams({"proposal_gain": -0.5})
    assert actor.hparams.proposal_gain == 0.0 and actor.hparams.lr == 3e-4  # a refused change leaves all as it was
