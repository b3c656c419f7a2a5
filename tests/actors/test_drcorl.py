"""DRCORL: VP-SDE schedule and sampler, PCGrad, zone rule, the policy-aware cost critic and its estimate, score
distillation, the training phases, and a short fit / checkpoint round trip with analytic stand-ins."""
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_saferl.actors.drcorl import (
    BC_ZONE, BOTH_ZONE, COST_ZONE, REWARD_ZONE, BehaviorDiffusion, DrcorlPolicy, PolicyCostCritic, beta_schedule,
    choose_zone, episode_starts, fit_policy_cost_critic, pcgrad, score_distillation_loss, sds_weight,
)
from lightning_saferl.critics import CostCritic, RewardCritic
from lightning_saferl.data.format import Transitions
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.nets.vpsde import VPSDE, gaussian_eps
from lightning_saferl.policy import load_policy

MU, STD = 0.5, 0.1  # the known 1-D behaviour density N(0.5, 0.1^2)


# -- VP-SDE -------------------------------------------------------------------------------------------------
def test_vpsde_schedule_by_hand():
    sde = VPSDE(0.1, 20.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    log_alpha = [-(19.9 * x**2 / 4 + 0.1 * x / 2) for x in (0.0, 0.3, 1.0)]
    assert sde.alpha(t).tolist() == pytest.approx([math.exp(v) for v in log_alpha])
    assert sde.sigma(t[1:]).tolist() == pytest.approx([math.sqrt(1 - math.exp(2 * v)) for v in log_alpha[1:]])
    assert sde.beta(t).tolist() == pytest.approx([0.1, 0.1 + 0.3 * 19.9, 20.0])
    # lambda and its inverse
    t = torch.tensor([1e-3, 0.05, 0.5, 1.0], dtype=torch.float64)
    lam = sde.lam(t)
    assert lam.tolist() == pytest.approx((sde.log_alpha(t) - sde.sigma(t).log()).tolist())
    assert sde.t_of_lambda(lam).tolist() == pytest.approx(t.tolist(), rel=1e-9)
    grid = sde.time_grid(10)
    assert grid[0] == 1.0 and grid[-1] == pytest.approx(1e-3) and (grid.diff() < 0).all()
    assert sde.lam(grid).diff().tolist() == pytest.approx([float(sde.lam(grid).diff()[0])] * 10, rel=1e-6)
    # forward noising
    x0, eps = torch.tensor([[0.5, -0.2]]), torch.tensor([[1.0, -1.0]])
    a, s = float(sde.alpha(torch.tensor(0.3))), float(sde.sigma(torch.tensor(0.3)))
    assert sde.add_noise(x0, torch.tensor([0.3]), eps)[0].tolist() == pytest.approx([a * 0.5 + s, -a * 0.2 - s],
                                                                                    rel=1e-6)


@pytest.mark.parametrize("order,steps", [(2, 30), (1, 300)])
def test_vpsde_sampler_reproduces_gaussian_from_analytic_noise(order, steps):
    sde = VPSDE()
    x = sde.sample(lambda x, t: gaussian_eps(x, t, sde, MU, STD), (20_000, 1), dtype=torch.float64, steps=steps,
                   order=order, generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(MU, abs=0.004)
    assert x.std().item() == pytest.approx(STD, rel=0.03)
    # a wrong noise predictor (std 0.3) is told apart
    wrong = sde.sample(lambda x, t: gaussian_eps(x, t, sde, MU, 0.3), (20_000, 1), dtype=torch.float64,
                       steps=steps, order=order, generator=torch.Generator().manual_seed(0))
    assert wrong.std().item() > 0.25


# -- PCGrad, zones, beta -----------------------------------------------------------------------
def test_pcgrad_conflicting_vectors_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1
    # g1' = g1 + (1/2) g2 = (0.5, 0.5);  g2' = g2 + g1 = (0, 1)
    assert pcgrad(g1, g2).tolist() == pytest.approx([0.5, 1.5])
    assert pcgrad(g2, g1).tolist() == pytest.approx([0.5, 1.5])
    g1, g2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([-1.0, 0.0, 3.0])  # dot -2, |g1|^2 5, |g2|^2 10
    expected = (g1 + 0.2 * g2) + (g2 + 0.4 * g1)
    assert pcgrad(g1, g2).tolist() == pytest.approx(expected.tolist())
    # each projected part is orthogonal to the other original gradient
    assert float((g1 + 0.2 * g2) @ g2) == pytest.approx(0.0, abs=1e-6)


def test_pcgrad_non_conflicting_vectors_are_summed():
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])  # dot +1
    assert pcgrad(g1, g2).tolist() == pytest.approx([4.0, 1.0])
    assert pcgrad(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).tolist() == [1.0, 2.0]  # orthogonal
    assert pcgrad(torch.tensor([1.0, 0.0]), torch.zeros(2)).tolist() == [1.0, 0.0]  # zero gradient: no nan


@pytest.mark.parametrize("estimate,zone", [
    (3.0, REWARD_ZONE), (3.999, REWARD_ZONE), (4.0, BOTH_ZONE), (4.001, BOTH_ZONE), (5.0, BOTH_ZONE),
    (5.999, BOTH_ZONE), (6.0, BOTH_ZONE), (6.001, COST_ZONE), (50.0, COST_ZONE),
])
def test_zone_rule_at_and_around_both_thresholds(estimate, zone):
    assert choose_zone(estimate, limit=5.0, slack=1.0) == zone


def test_zone_rule_without_slack():
    assert [choose_zone(c, 5.0, 0.0) for c in (4.99, 5.0, 5.01)] == [REWARD_ZONE, BOTH_ZONE, COST_ZONE]


def test_beta_schedule():
    assert beta_schedule(0) == 0.0
    assert beta_schedule(400) == pytest.approx(0.2)
    assert beta_schedule(400, beta_max=0.1) == 0.1
    assert beta_schedule(7, scale=0.3, power=0.0) == pytest.approx(0.3)


# -- score distillation ----------------------------------------------------------------------------------------
def _sds_equilibrium_gain(sde: VPSDE, t_min: float) -> float:
    """k in E_t,eps[d/da surrogate] = k (a - MU) for a Dirac policy at a and behaviour N(MU, STD^2):
    E_eps[eps*(a_t) - eps] = sigma alpha (a - MU) / V,  V = alpha^2 STD^2 + sigma^2, times w = sigma^2."""
    t = torch.linspace(t_min, 1.0, 20_001, dtype=torch.float64)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    integrand = sigma**2 * alpha * sigma / (alpha**2 * STD**2 + sigma**2)
    return float(torch.trapezoid(integrand, t) / (1 - t_min))


def _distil_1d(beta: float, steps: int = 400, start: float = -0.4) -> float:
    """Minimise mean SDS - beta * Q(a), Q(a) = a, over a single 1-D action; returns the late-iterate average."""
    sde, gen = VPSDE(), torch.Generator().manual_seed(0)
    a = torch.tensor([start], requires_grad=True)
    opt = torch.optim.SGD([a], lr=2.0)
    eps_fn = lambda x, t, s: gaussian_eps(x, t, sde, MU, STD)  # noqa: E731
    history = []
    for _ in range(steps):
        actions = a.expand(2048, 1)
        loss = score_distillation_loss(eps_fn, actions, None, sde, 0.02, generator=gen).mean() - beta * a.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(a.item())
    return sum(history[-100:]) / 100


def test_distillation_moves_policy_to_behaviour_mode_without_guidance():
    assert abs(-0.4 - MU) > 0.8
    assert _distil_1d(beta=0.0) == pytest.approx(MU, abs=0.01)


def test_distillation_moves_toward_higher_q_as_beta_grows():
    gain = _sds_equilibrium_gain(VPSDE(), 0.02)
    finals = [_distil_1d(beta) for beta in (0.0, 0.01, 0.03)]
    assert finals[0] < finals[1] < finals[2]
    # fixed point of k (a - MU) = beta
    assert finals[1] == pytest.approx(MU + 0.01 / gain, abs=0.005)
    assert finals[2] == pytest.approx(MU + 0.03 / gain, abs=0.005)


def test_sds_gradient_matches_formula():
    sde, t_min = VPSDE(), 0.5
    actions = torch.tensor([[0.2, -0.1]], requires_grad=True)
    fixed = torch.tensor([[0.7, 0.3]])
    gen = torch.Generator().manual_seed(3)
    score_distillation_loss(lambda x, t, s: fixed, actions, None, sde, t_min, "sigma2", gen).sum().backward()
    gen = torch.Generator().manual_seed(3)  # replay the draws: t, then eps
    t = t_min + (1 - t_min) * torch.rand(1, generator=gen)
    eps = torch.randn(1, 2, generator=gen)
    expected = sds_weight(sde, t, "sigma2") * (fixed - eps)  # the clean action: no alpha_t factor
    assert actions.grad.tolist()[0] == pytest.approx(expected.tolist()[0], rel=1e-5)


# -- the policy-aware cost critic ---------------------------------------------------------------------------------
def _constant_members(ensemble, values) -> None:
    """Make every member of a QEnsemble output its own constant."""
    last = ensemble.net.layers[-1]
    torch.nn.init.zeros_(last.weight)
    last.bias.data.copy_(torch.tensor(values, dtype=torch.float32).view(-1, 1, 1))


def test_cost_critic_pessimism_is_mean_plus_k_std_by_hand():
    critic = PolicyCostCritic(3, 1, hidden_dims=(8,), members=4, pessimism=2.0)
    _constant_members(critic.q_target, [1.0, 2.0, 3.0, 6.0])  # mean 3, sample std sqrt(14 / 3)
    obs, act = torch.randn(5, 3), torch.randn(5, 1)
    expected = 3.0 + 2.0 * math.sqrt(14 / 3)
    assert critic.upper(obs, act).tolist() == pytest.approx([expected] * 5, rel=1e-6)
    assert critic.estimate(obs, lambda o: torch.zeros(len(o), 1)).item() == pytest.approx(expected, rel=1e-6)
    critic.pessimism = 0.0
    assert critic.upper(obs, act).tolist() == pytest.approx([3.0] * 5)


def test_iql_cost_critic_is_pessimistic_max_over_members():
    cost, reward = CostCritic(3, 1, hidden_dims=(8,)), RewardCritic(3, 1, hidden_dims=(8,))
    for critic in (cost, reward):
        _constant_members(critic.q_target, [1.0, 5.0])
    obs, act = torch.randn(4, 3), torch.randn(4, 1)
    assert cost.q_value(obs, act).tolist() == [5.0] * 4  # the costlier member
    assert reward.q_value(obs, act).tolist() == [1.0] * 4  # the poorer member


def test_cost_critic_td_loss_by_hand():
    critic = PolicyCostCritic(3, 1, hidden_dims=(8,), members=2, discount=0.9)
    _constant_members(critic.q, [1.0, 2.0])
    _constant_members(critic.q_target, [10.0, 20.0])
    costs, masks = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])
    # y_1 = (1 + 9, 0), y_2 = (1 + 18, 0);  member 1: ((1-10)^2 + 1) / 2 = 41, member 2: ((2-19)^2 + 4) / 2 = 146.5
    loss = critic.td_loss(torch.zeros(2, 3), torch.zeros(2, 1), costs, torch.zeros(2, 3), torch.zeros(2, 1), masks)
    assert loss.item() == pytest.approx(41 + 146.5)


def _chain_data(copies: int = 32) -> Transitions:
    """Episodes s0 -(a=0, c=0)-> s1 -(a, c = 1 if a > 0)-> end, with a = +1 and a = -1 equally often at s1."""
    s0, s1, s2 = torch.eye(3)
    obs = torch.stack([s0, s1, s0, s1] * copies)
    actions = torch.tensor([[0.0], [1.0], [0.0], [-1.0]] * copies)
    costs = torch.tensor([0.0, 1.0, 0.0, 0.0] * copies)
    next_obs = torch.stack([s1, s2, s1, s2] * copies)
    terminals = torch.tensor([0.0, 1.0, 0.0, 1.0] * copies)
    return Transitions(obs, actions, torch.zeros(4 * copies), costs, next_obs, terminals, torch.zeros(4 * copies))


def test_estimate_sees_the_policy_at_later_states():
    """Two policies with the same first action at the start state s0, differing only at the next state s1:
    the one that acts costly at s1 is estimated at gamma * 1, the other at 0."""
    data = _chain_data()
    starts = data.observations[episode_starts(data)]
    assert starts.shape[0] == 64 and (starts == torch.eye(3)[0]).all()

    def policy(at_s1: float):
        return lambda obs: torch.where(obs[:, 1:2] > 0.5, at_s1, 0.0)

    estimates = {}
    for name, at_s1 in (("costly", 1.0), ("careful", -1.0)):
        act = policy(at_s1)
        critic = fit_policy_cost_critic(act, data, steps=300, batch_size=32, lr=3e-3, hidden_dims=(32, 32),
                                        members=2, discount=0.9, tau=0.05, pessimism=0.0)
        assert act(starts).abs().max() == 0  # same first action
        estimates[name] = critic.estimate(starts, act).item()
    assert estimates["costly"] == pytest.approx(0.9, abs=0.1)
    assert estimates["careful"] == pytest.approx(0.0, abs=0.1)


def test_episode_starts():
    data = SimpleNamespace(done=torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]))
    assert episode_starts(data).tolist() == [0, 2, 3, 6]


# -- the module, with analytic stand-ins for the frozen models -------------------------------------------------------
class GaussianBehavior(BehaviorDiffusion):
    """Behaviour N(MU, STD^2) on every action dimension, whatever the state: the exact noise predictor."""

    def eps(self, noisy_action, t, obs):
        return gaussian_eps(noisy_action, t, self.sde, MU, STD)


class ToyCost(PolicyCostCritic):
    """U_c(s, a) = 2 + a_0."""

    def upper(self, obs, act):
        return 2.0 + act[:, 0]


class ToyReward(RewardCritic):
    """Q_r(s, a) = a_1."""

    def q_value(self, obs, act):
        return act[:, 1]


def _policy(**kwargs) -> DrcorlPolicy:
    tiny = {"hidden_dim": 8, "num_blocks": 1}
    policy = DrcorlPolicy(4, 2, GaussianBehavior(4, 2, **tiny), ToyReward(4, 2, hidden_dims=(8,)),
                          hidden_dims=(16,), cost_hidden_dims=(8,), **kwargs)
    policy.cost_critic = ToyCost(4, 2, hidden_dims=(8,))
    policy.start_obs = torch.randn(16, 4)
    return policy


def _batch(obs: torch.Tensor) -> dict:
    n = obs.shape[0]
    return {"observations": obs, "actions": torch.zeros(n, 2), "rewards": torch.zeros(n), "costs": torch.zeros(n),
            "next_observations": obs.flip(0), "masks": torch.ones(n)}


def _constant_action(policy: DrcorlPolicy, value: float) -> None:
    """Make the deterministic head output `value` everywhere."""
    last = policy.policy.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, math.atanh(value))


def test_cost_estimate_and_zone_logged_by_losses():
    policy = _policy(cost_limit=1.0, cost_slack=0.25)
    _constant_action(policy, 0.5)
    obs = torch.randn(32, 4)
    # U_c = 2.5 at every start state: C = 2.5 > 1.25 -> cost step
    assert policy.estimate_cost(policy.start_obs).item() == pytest.approx(2.5, rel=1e-5)
    policy.train()
    losses, extras = policy.losses(_batch(obs))
    assert extras["zone"].item() == COST_ZONE and extras["cost_estimate"].item() == pytest.approx(2.5, rel=1e-5)
    assert "q_reward" not in extras and extras["q_cost"].item() == pytest.approx(2.5, rel=1e-5)
    assert set(losses) == {"policy_loss", "cost_critic_loss", "reward_critic_loss"}
    for limit, zone in ((2.5, BOTH_ZONE), (3.0, REWARD_ZONE)):
        policy.hparams.cost_limit = limit
        assert policy.losses(_batch(obs))[1]["zone"].item() == zone


def test_training_phases_distillation_then_reward_warmup_then_zone_rule():
    obs = torch.randn(32, 4)
    policy = _policy(cost_limit=1.0, cost_slack=0.25, bc_steps=1)  # global step 0 < bc_steps
    policy.train()
    _constant_action(policy, 0.5)
    losses, extras = policy.losses(_batch(obs))
    assert extras["zone"].item() == BC_ZONE and "q_reward" not in extras and "q_cost" not in extras
    assert losses["policy_loss"].item() == pytest.approx(extras["regulariser"].item())
    # guided, within the reward-only warm-up: reward step though the estimate is over the limit
    policy.hparams.bc_steps, policy.hparams.warmup_steps = 0, 1
    assert policy.losses(_batch(obs))[1]["zone"].item() == REWARD_ZONE
    policy.hparams.warmup_steps = 0
    assert policy.losses(_batch(obs))[1]["zone"].item() == COST_ZONE


def test_estimate_smoothing_is_an_exponential_average():
    policy = _policy(estimate_smoothing=0.75)
    policy.train()
    _constant_action(policy, 0.5)
    obs = torch.randn(8, 4)
    policy.losses(_batch(obs))  # first estimate taken as is: 2.5
    _constant_action(policy, -0.5)  # now 1.5
    estimate = policy.losses(_batch(obs))[1]["cost_estimate"].item()
    assert estimate == pytest.approx(0.75 * 2.5 + 0.25 * 1.5, rel=1e-5)


def test_pcgrad_surrogate_gradient_and_value():
    policy = _policy()
    obs = torch.randn(16, 4)
    params = list(policy.policy.parameters())
    a = policy.policy(obs)
    loss_r, loss_c = -(a[:, 1]).mean(), (2 + a[:, 0]).mean() + a[:, 1].mean() * 0.3
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    g_r = flat(torch.autograd.grad(loss_r, params, retain_graph=True))
    g_c = flat(torch.autograd.grad(loss_c, params, retain_graph=True))
    surrogate, cosine = policy._pcgrad_surrogate(loss_r, loss_c)
    assert surrogate.item() == pytest.approx((loss_r.item() + loss_c.item()) / 2, rel=1e-6)
    assert cosine.item() == pytest.approx(float(g_r @ g_c / (g_r.norm() * g_c.norm())), rel=1e-5)
    surrogate.backward()
    assert torch.allclose(flat([p.grad for p in params]), pcgrad(g_r, g_c) / 2, atol=1e-6)


def test_cost_step_lowers_cost_and_reward_step_raises_reward():
    for limit, watched, sign in ((-100.0, 0, -1), (100.0, 1, +1)):  # always cost step / always reward step
        torch.manual_seed(0)
        policy = _policy(cost_limit=limit, beta_scale=1.0, beta_power=0.0, normalize_q=False)
        policy.train()
        opt = torch.optim.Adam(policy.policy.parameters(), lr=1e-2)
        obs = torch.randn(64, 4)
        before = policy.act(obs)[:, watched].mean().item()
        for _ in range(100):
            loss = policy.losses(_batch(obs))[0]["policy_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = policy.act(obs)[:, watched].mean().item()
        assert sign * (after - before) > 0.3, (limit, before, after)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return OfflineDataModule(task="PointRobot-v0", num_transitions=2000, batch_size=64, steps_per_epoch=50,
                             cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_behavior_diffusion_fit_and_sampler_wiring(tiny_data):
    L.seed_everything(0)
    model = BehaviorDiffusion(11, 2, hidden_dim=32, num_blocks=1)
    assert model.net.time_embedding.weight.std().item() == pytest.approx(30.0, rel=0.5)  # scaled for t in [0, 1]
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_data)
    actions = model.act(torch.randn(7, 11))
    assert actions.shape == (7, 2) and actions.abs().max() <= 1.0
    analytic = GaussianBehavior(11, 2, hidden_dim=8, num_blocks=1)
    samples = analytic.sample(torch.zeros(1, 11), num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (1, 4000, 2)
    assert samples.mean().item() == pytest.approx(MU, abs=0.01) and samples.std().item() == pytest.approx(STD, rel=0.05)


@pytest.mark.parametrize("head", ["deterministic", "gaussian"])
def test_fit_checkpoint_and_standalone_load(tiny_data, tmp_path, head):
    L.seed_everything(0)
    behavior = BehaviorDiffusion(11, 2, hidden_dim=16, num_blocks=1)
    policy = DrcorlPolicy(11, 2, behavior, RewardCritic(11, 2, hidden_dims=(16,)), head=head, hidden_dims=(16,),
                          cost_hidden_dims=(16,), cost_limit=0.0, bc_steps=1,
                          cost_slack=1e6)  # after one distillation step always the PCGrad zone, inside Trainer.fit
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    before = [p.detach().clone() for p in policy.policy.parameters()]
    critic_before = [p.detach().clone() for p in policy.cost_critic.parameters()]
    trainer.fit(policy, datamodule=tiny_data)
    assert policy.start_obs.shape == (tiny_data.transitions.num_episodes, 11)
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.policy.parameters()))
    # the cost critic learns (its TD loss is in the sum) and its target follows
    assert all(not torch.equal(b, p) for b, p in zip(critic_before, policy.cost_critic.parameters()))
    assert all(not p.requires_grad for p in behavior.parameters())
    path = tmp_path / "drcorl.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_policy(str(path))
    assert isinstance(loaded, DrcorlPolicy) and isinstance(loaded.behavior, BehaviorDiffusion)
    obs = torch.randn(5, 11)
    assert torch.allclose(loaded.act(obs), policy.eval().act(obs))
    assert loaded.cost_estimate.item() == pytest.approx(policy.cost_estimate.item())
    assert torch.allclose(loaded.estimate_cost(obs), policy.estimate_cost(obs))


@pytest.mark.parametrize("bc_steps, refit, changes", [(2, True, False), (1, True, True), (0, False, False)])
def test_reward_critic_refitted_in_the_guided_phase_only(tiny_data, bc_steps, refit, changes):
    """The reference refits the reward critic by TD with a' = pi(s') while guiding: its Q members and their targets
    move in guided steps, never during distillation, and not at all with reward_refit=False."""
    L.seed_everything(0)
    reward = RewardCritic(11, 2, hidden_dims=(16,))
    policy = DrcorlPolicy(11, 2, BehaviorDiffusion(11, 2, hidden_dim=16, num_blocks=1), reward, hidden_dims=(16,),
                          cost_hidden_dims=(16,), bc_steps=bc_steps, reward_refit=refit)
    before = {name: p.detach().clone() for name, p in reward.state_dict().items()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(policy, datamodule=tiny_data)
    moved = {name for name, p in reward.state_dict().items() if not torch.equal(before[name], p)}
    if changes:
        assert moved == {name for name in before if name.startswith(("q.", "q_target."))}
    else:
        assert not moved


def test_missing_frozen_models_are_reported(tiny_data):
    policy = DrcorlPolicy(11, 2, reward_critic=RewardCritic(11, 2, hidden_dims=(8,)))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="behavior"):
        trainer.fit(policy, datamodule=tiny_data)
