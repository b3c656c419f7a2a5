"""FISOR's fast acting paths against plain formulations: the variant's acting against benchmarks/acting.py's
`reference_act` on the same random numbers, critics scoring rows that share a state, the schedule's reverse step
with its coefficients as numbers, and NoiseResNet's mish."""

import pytest
import torch
from torch.nn import functional as F

from lightning_saferl.actors.fisor import FisorActor
from lightning_saferl.critics import CostCritic, FeasibilityCritic, RewardCritic
from lightning_saferl.nets import DDPMSchedule, EnsembleMLP
from lightning_saferl.nets.resnet import Mish
from scripts import load_script


def _benchmark():
    return load_script("benchmarks/acting.py")


def _variant_actor(**kwargs) -> FisorActor:
    torch.manual_seed(0)
    critics = [cls(4, 2, hidden_dims=(16, 16)) for cls in (FeasibilityCritic, RewardCritic, CostCritic)]
    options = dict(num_candidates=5, select_tolerance=0.05, select_clearance=0.0, uniform_proposals=64,
                   proposal_vertices=True, proposal_gain=0.0, cost_tiebreak=0.05, feasibility_margin=0.05)
    options.update(kwargs)
    return FisorActor(4, 2, *critics, hidden_dim=16, num_blocks=1, **options).eval()


@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_variant_acting_chooses_the_reference_actions_on_the_same_random_numbers(tolerance):
    actor = _variant_actor(proposal_tolerance=tolerance)
    obs = torch.randn(40, 4) * 3
    v_h = actor.feasibility_critic.value(obs).detach()
    # every branch occurs: feasible (no proposals), flagged but feasible (proposals), infeasible (cost tie-break)
    assert (v_h <= -0.05).sum() >= 5 and ((v_h > -0.05) & (v_h <= 0)).sum() >= 1 and (v_h > 0).sum() >= 5
    reference_act = _benchmark().reference_act
    for batch in (1, 40):
        torch.manual_seed(1)
        fast = torch.cat([actor.act(rows) for rows in obs.split(batch)])
        torch.manual_seed(1)
        plain = torch.cat([reference_act(actor, rows) for rows in obs.split(batch)])
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)  # a different choice differs by far more
    if tolerance > 0:  # the tolerance changes choices here, so the comparison covers its branch
        actor.set_acting_hparams({"proposal_tolerance": 0.0})
        torch.manual_seed(1)
        assert (actor.act(obs) - fast).abs().sum(dim=1).gt(1e-3).any()


def test_rows_sharing_a_state_score_as_the_concatenated_input():
    torch.manual_seed(0)
    net = EnsembleMLP(3, 6, 2, (8, 8))
    shared, rows, own = torch.randn(4, 4), torch.tensor([0, 0, 3, 1, 3, 3, 2]), torch.randn(7, 2)
    expected = net(torch.cat((shared[rows], own), dim=-1))
    torch.testing.assert_close(net.forward_rows(shared, rows, own), expected)
    critic = FeasibilityCritic(4, 2, hidden_dims=(8, 8))
    torch.testing.assert_close(critic.q_value_rows(shared, rows, own), critic.q_value(shared[rows], own))


def test_reverse_step_with_number_coefficients_is_the_tensor_formula_bit_for_bit():
    schedule = DDPMSchedule(5)
    x, eps, noise = torch.randn(3, 50, 2).unbind(0)
    for k in range(5):
        by_tensors = (x - schedule.betas[k] / (1 - schedule.alpha_bars[k]).sqrt() * eps) / schedule.alphas[k].sqrt()
        if k > 0:
            by_tensors = by_tensors + schedule.betas[k].sqrt() * noise
        assert torch.equal(schedule.reverse_step(x, k, eps, noise), by_tensors.clamp(-1, 1))


def test_mish_without_gradients_is_within_a_few_ulp_and_with_gradients_is_torchs():
    x = torch.cat((torch.linspace(-30, 30, 20001), torch.tensor([-1e4, 1e4, 0.0])))
    mish = Mish()
    exact = F.mish(x.double()).float()
    with torch.no_grad():
        fast = mish(x)
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((fast - exact).abs() <= 4 * ulp + 1e-30).all()
    y = x.clone().requires_grad_(True)
    assert torch.equal(mish(y), F.mish(y))  # training keeps torch's kernel
    with torch.inference_mode():
        assert torch.equal(mish(x), fast)


@pytest.mark.parametrize("tiebreak", [0.0, 0.05])
def test_variant_acting_without_proposals_keeps_the_tie_break_where_no_candidate_escapes(tiebreak):
    """The path without proposals (the one torch.compile takes on CUDA) applies the cost tie-break where V_h > 0 and
    every candidate has Q_h > 0; a state with V_h > 0 and a candidate with Q_h <= 0 keeps the lowest-Q_h rule."""
    actor = _variant_actor(uniform_proposals=0, proposal_vertices=False, cost_tiebreak=tiebreak)
    obs = torch.randn(60, 4) * 3
    torch.manual_seed(2)
    chosen = actor.act(obs)
    torch.manual_seed(2)
    candidates = actor.sample_candidates(obs, 5)
    q_h = actor._scores(actor.feasibility_critic, obs, candidates)
    plain = actor._choose(obs, candidates, q_h)
    infeasible = actor.feasibility_critic.value(obs) > 0
    unavoidable = infeasible & (q_h.min(1).values > 0)
    assert unavoidable.sum() >= 3 and (infeasible & ~unavoidable).sum() >= 3  # both kinds of V_h > 0 state occur
    assert torch.equal(chosen[~unavoidable], plain[~unavoidable])
    if tiebreak > 0:
        q_c = actor._scores(actor.cost_critic, obs, candidates)
        ties = q_h <= q_h.min(1, keepdim=True).values + tiebreak
        shortest = candidates[torch.arange(60), q_c.masked_fill(~ties, float("inf")).argmin(1)]
        assert torch.equal(chosen[unavoidable], shortest[unavoidable])
        assert not torch.equal(chosen[unavoidable], plain[unavoidable])  # the tie-break changes something


class _FlatInfeasibleCritic(torch.nn.Module):
    """V_h = 1 everywhere (every state infeasible) and Q_h = 1 for every action: all actions tie."""

    def value(self, obs):
        return torch.ones(obs.shape[0])

    def q_value_rows(self, obs, rows, act):
        return torch.ones(act.shape[0])


class _CornerSeekingCostCritic(torch.nn.Module):
    """Q_c = -|a|_1: the box's vertices score lowest, far below any in-distribution candidate."""

    def q_value_rows(self, obs, rows, act):
        return -act.abs().sum(-1)


def test_cost_tiebreak_chooses_among_the_candidates_not_the_uniform_proposals():
    """Q_c is fitted on the data's actions; its minimum over hundreds of proposals (vertices included) is mostly
    error, so the tie-break pool is the actor's own candidates."""
    actor = _variant_actor(num_candidates=4)
    actor.feasibility_critic, actor.cost_critic = _FlatInfeasibleCritic(), _CornerSeekingCostCritic()
    candidates = torch.tensor([[[0.1, 0.2], [-0.3, 0.4], [0.05, -0.05], [0.5, -0.1]]]).repeat(3, 1, 1)
    actor.sample_candidates = lambda obs, n: candidates[:len(obs)]
    actions = actor.act(torch.randn(3, 4))
    torch.testing.assert_close(actions, candidates[:, 1])  # the candidate with the largest |a|_1, not a vertex
