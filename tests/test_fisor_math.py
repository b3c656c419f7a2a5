"""FISOR's losses, targets, weights and diffusion steps against hand-computed values."""
import math
from types import SimpleNamespace

import pytest
import torch

from lightning_saferl.actors.fisor import FisorActor, ema_rate, fisor_weights
from lightning_saferl.base import SafeRLModule
from lightning_saferl.critics.losses import (
    constraint_signal, expectile_loss, hj_target, reversed_expectile_loss, td_target,
)
from lightning_saferl.nets import DDPMSchedule, EnsembleMLP, vp_beta_schedule


def test_expectile_and_reversed_expectile():
    diff = torch.tensor([1.0, -2.0])
    assert expectile_loss(diff, 0.9).item() == pytest.approx((0.9 * 1 + 0.1 * 4) / 2)
    assert reversed_expectile_loss(diff, 0.9).item() == pytest.approx((0.1 * 1 + 0.9 * 4) / 2)


def test_hj_target_terminal_and_non_terminal():
    h = torch.tensor([-1.0, 0.5, -1.0])
    next_v = torch.tensor([2.0, -3.0, 5.0])
    mask = torch.tensor([1.0, 1.0, 0.0])
    expected = [0.01 * -1 + 0.99 * 2.0, 0.01 * 0.5 + 0.99 * 0.5, -1.0]
    assert hj_target(h, next_v, mask, 0.99).tolist() == pytest.approx(expected)


def test_td_target_and_constraint_signal():
    assert td_target(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 10.0]), torch.tensor([1.0, 0.0]),
                     0.9).tolist() == pytest.approx([10.0, 2.0])
    assert constraint_signal(torch.tensor([0.0, 1.0, 0.5]), 25.0).tolist() == [-1.0, 25.0, 25.0]


def test_fisor_weight_branches_and_clipping():
    v_h = torch.tensor([0.2, 1.0, -0.5, -0.5, -0.5, 0.0, 0.2])
    q_h = torch.tensor([0.1, -100.0, -0.2, -0.2, 0.3, 0.0, 0.5])
    q = torch.tensor([0.0, 0.0, 1.0, 5.0, 9.0, 0.2, 0.0])
    v = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    w = fisor_weights(v_h, q_h, q, v, infeasible_weight_min=1.0)  # temperatures 5/3, clips 150/100
    # infeasible states: exp(5 (V_h - Q_h)) clipped to [1, 150] (the last: exp(-1.5) -> 1)
    expected = [math.exp(5 * 0.1), 150.0, math.exp(3 * 0.5), 100.0, 0.0, math.exp(3 * 0.2), 1.0]
    assert w.tolist() == pytest.approx(expected, rel=1e-5)
    # the default lower clip of 0 (the official code's head): the infeasible action worse than V_h keeps its small
    # weight exp(5 (0.2 - 0.5))
    w0 = fisor_weights(v_h, q_h, q, v)
    assert w0[-1].item() == pytest.approx(math.exp(-1.5), rel=1e-5) and w0[:-1].tolist() == pytest.approx(expected[:-1])
    # a feasibility margin of 0.25: V_h = -0.2 counts as infeasible (exp(5 (V_h - Q_h)), clipped to [0, 150]), and
    # an action with Q_h = -0.2 at a state with V_h = -0.5 is no longer a safe one (weight 0)
    v_h, q_h = torch.tensor([-0.2, -0.5, -0.5]), torch.tensor([-0.4, -0.2, -0.3])
    q, v = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 0.5, 0.5])
    assert fisor_weights(v_h, q_h, q, v, feasibility_margin=0.25).tolist() == pytest.approx(
        [math.exp(5 * 0.2), 0.0, math.exp(3 * 0.5)], rel=1e-5)
    assert fisor_weights(v_h, q_h, q, v).tolist() == pytest.approx(
        [math.exp(3 * 0.0), math.exp(3 * 0.5), math.exp(3 * 0.5)], rel=1e-5)


def test_vp_schedule_forward_noising_and_reverse_step():
    alphas = [math.exp(-0.1 / 5 - 0.5 * 9.9 * (2 * t - 1) / 25) for t in range(1, 6)]
    assert (1 - vp_beta_schedule(5)).tolist() == pytest.approx(alphas, rel=1e-6)
    s = DDPMSchedule(5)
    a0, eps = torch.tensor([[0.5, -0.3]]), torch.tensor([[1.0, 2.0]])
    ab2 = alphas[0] * alphas[1] * alphas[2]
    noisy = s.add_noise(a0, torch.tensor([2]), eps)
    assert noisy[0].tolist() == pytest.approx([math.sqrt(ab2) * 0.5 + math.sqrt(1 - ab2) * 1.0,
                                               math.sqrt(ab2) * -0.3 + math.sqrt(1 - ab2) * 2.0], rel=1e-5)
    # one reverse step from index 1 (t = 2), with fixed predicted noise and fixed injected noise
    x, e, z = torch.tensor([[0.2, 0.1]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.3, -0.2]])
    ab1, beta = alphas[0] * alphas[1], 1 - alphas[1]
    by_hand = [min(1.0, max(-1.0, (xi - beta / math.sqrt(1 - ab1) * ei) / math.sqrt(alphas[1])
                            + math.sqrt(beta) * zi)) for xi, ei, zi in zip([0.2, 0.1], [0.5, -1.0], [0.3, -0.2])]
    assert s.reverse_step(x, 1, e, z)[0].tolist() == pytest.approx(by_hand, rel=1e-5)
    # last step adds no noise and clips
    big = s.reverse_step(torch.tensor([[5.0]]), 0, torch.tensor([[0.0]]), torch.tensor([[100.0]]))
    assert big.item() == 1.0


@pytest.mark.parametrize("out_dim", [2, 1])  # one output column takes the product-and-sum path
def test_ensemble_members_are_independent_linear_maps(out_dim):
    torch.manual_seed(0)
    net = EnsembleMLP(3, 4, out_dim, hidden_dims=())
    x = torch.randn(5, 4)
    out = net(x)
    out.square().sum().backward()
    layer = net.layers[0]
    for m in range(3):
        member = x @ layer.weight[m] + layer.bias[m]
        assert torch.allclose(out[m], member, atol=1e-6)
        # d/dW sum (xW + b)^2 = 2 x^T (xW + b), member by member
        assert torch.allclose(layer.weight.grad[m], 2 * x.T @ member.detach(), atol=1e-5)


class _StubFeasibility(torch.nn.Module):
    """Q_h(s, a) = a_0: lower first coordinate is safer."""

    def q_value(self, obs, act):
        return act[:, 0]

    def q_value_rows(self, obs, rows, act):  # the actor scores many actions per state through this
        return self.q_value(obs[rows], act)


def test_candidate_selection_picks_lowest_qh_and_highest_q(monkeypatch):
    actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3)
    candidates = torch.tensor([[[0.5, 0.0], [-0.7, 0.1], [0.2, 0.2]],
                               [[0.9, 0.3], [0.4, 0.4], [-0.1, 0.5]]])
    monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: candidates)
    actor.feasibility_critic = _StubFeasibility()
    chosen = actor.act(torch.zeros(2, 3))
    assert torch.allclose(chosen, torch.tensor([[-0.7, 0.1], [-0.1, 0.5]]))
    actor.hparams.select = "max_q"
    actor.reward_critic = _StubFeasibility()
    assert torch.allclose(actor.act(torch.zeros(2, 3)), torch.tensor([[0.5, 0.0], [0.9, 0.3]]))


#: every weighting hyperparameter of FisorActor, given explicitly (the tests below never read its defaults)
WEIGHTING = dict(infeasible_temperature=2.0, infeasible_weight_max=50.0, infeasible_weight_min=0.5,
                 feasible_temperature=4.0, feasible_weight_max=20.0, feasibility_margin=0.0)


class _TableCritic(torch.nn.Module):
    """A critic read from a table: row i of the data has observation (i,) and action (i,); value(s) = state[i] by the
    observation, q_value(s, a) = action[i] by the action (so a row whose observation and action were misaligned
    would read another row's values)."""

    def __init__(self, state, action):
        super().__init__()
        self.state, self.action = torch.tensor(state), torch.tensor(action)

    def value(self, obs):
        return self.state[obs[:, 0].long()]

    def q_value(self, obs, act):
        return self.action[act[:, 0].long()]


class _Rows(SimpleNamespace):
    def __len__(self):
        return len(self.observations)


def test_actor_sample_weights_by_hand_in_every_branch():
    """compute_sample_weights reads V_h, Q_h from the feasibility critic and Q, V from the reward critic, row by row
    across chunks of `weight_batch_size` rows; weights by hand with t_inf = 2 in [0.5, 50], t_feas = 4 in [0, 20]."""
    #            infeasible (V_h > 0)        feasible, safe action (Q_h <= 0)   feasible, unsafe  V_h = 0 (feasible)
    v_h = [0.3, 2.0, 0.1, -0.4, -1.0, -0.3, 0.0]
    q_h = [0.1, -0.5, 1.0, -0.2, -0.9, 0.2, 0.0]
    q = [5.0, 5.0, 5.0, 1.5, 3.0, 9.0, 0.1]
    v = [0.0, 0.0, 0.0, 1.2, 2.0, 0.0, 0.35]
    expected = [math.exp(2 * 0.2),  # exp(t_inf (V_h - Q_h))
                50.0,               # exp(2 * 2.5) = 148 clipped to the maximum
                0.5,                # exp(-1.8) = 0.17 clipped to the minimum
                math.exp(4 * 0.3),  # exp(t_feas (Q - V))
                20.0,               # exp(4) = 55 clipped to the maximum
                0.0,                # Q_h > 0: an unsafe action at a feasible state is not cloned
                math.exp(4 * -0.25)]
    rows = _Rows(observations=torch.arange(7.0)[:, None], actions=torch.arange(7.0)[:, None])

    def weights(**overrides):
        actor = FisorActor(obs_dim=1, act_dim=1, hidden_dim=8, num_blocks=1, weight_batch_size=3,
                           **{**WEIGHTING, **overrides})
        actor.feasibility_critic, actor.reward_critic = _TableCritic(v_h, q_h), _TableCritic(v, q)
        return actor.compute_sample_weights(rows).tolist()

    assert weights() == pytest.approx(expected, rel=1e-6)
    # margin 0.25: V_h = 0 is infeasible (exp(2 (0 - 0)) = 1), Q_h = -0.2 no longer a safe action
    assert weights(feasibility_margin=0.25) == pytest.approx(expected[:3] + [0.0, 20.0, 0.0, 1.0], rel=1e-6)


def test_weighted_noise_loss_by_hand():
    """mean_b w_b ||eps_hat - eps||^2 with eps_hat = 0: per-row terms ||eps_b||^2 = 5, 9, 4; the loss follows the
    weights, and `losses` hands the network loss the weights of the batch's dataset rows."""
    actor = FisorActor(obs_dim=1, act_dim=2, hidden_dim=8, num_blocks=1, **WEIGHTING)
    actor.net = _ZeroNoise()
    noise = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, -2.0]])
    args = (torch.zeros(3, 1), torch.zeros(3, 2))
    k = torch.tensor([0, 2, 4])

    def loss(weights):
        return actor._weighted_noise_loss(*args, torch.tensor(weights), k, noise).item()

    assert loss([2.0, 0.0, 0.5]) == pytest.approx((2 * 5 + 0.5 * 4) / 3)
    assert loss([0.0, 1.0, 0.0]) == pytest.approx(9 / 3)
    assert loss([1.0, 1.0, 1.0]) == pytest.approx((5 + 9 + 4) / 3)
    assert loss([0.0, 0.0, 0.0]) == 0.0

    seen = []
    actor.sample_weights = torch.tensor([0.5, 7.0, 3.0, 0.0])  # one per dataset row
    actor._weighted_noise_loss = lambda obs, actions, weights, k, noise: seen.append(weights) or weights.sum()
    actor.losses({"observations": torch.zeros(3, 1), "actions": torch.zeros(3, 2), "index": torch.tensor([2, 0, 2])})
    assert seen[0].tolist() == [3.0, 0.5, 3.0]


class _ZeroNoise(torch.nn.Module):
    """A noise network that predicts eps_hat = 0 whatever its input."""

    def forward(self, noisy_actions, steps, obs, t_index):
        return torch.zeros_like(noisy_actions)


def test_diffusion_actor_fits_bimodal_actions():
    """Actions are +-0.7 with equal probability for the same state: both modes must be sampled."""
    torch.manual_seed(0)
    actor = FisorActor(obs_dim=1, act_dim=1, hidden_dim=64, num_blocks=2, dropout=0.0, ema_tau=0.05,
                       ema_warmup=False, num_candidates=1)
    actor.sample_weights = torch.ones(256)
    opt = torch.optim.Adam(actor.net.parameters(), lr=3e-3)
    for step in range(400):
        actions = torch.where(torch.rand(256, 1) < 0.5, 0.7, -0.7)
        batch = {"observations": torch.zeros(256, 1), "actions": actions, "index": torch.arange(256)}
        loss = actor.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        actor.after_optimizer_step()
    samples = actor.eval().act(torch.zeros(2000, 1)).squeeze(-1)
    near_upper = ((samples - 0.7).abs() < 0.2).float().mean()
    near_lower = ((samples + 0.7).abs() < 0.2).float().mean()
    near_mean = (samples.abs() < 0.2).float().mean()
    assert near_upper > 0.2 and near_lower > 0.2
    assert near_mean < 0.5 * min(near_upper, near_lower)  # the average (0) is not what it learned


def test_ema_warmup_rates():
    assert [ema_rate(k, 0.001, warmup=True) for k in (0, 8, 90)] == pytest.approx([0.9, 0.5, 0.09])
    assert [ema_rate(k, 0.001) for k in (0, 10, 5999)] == [0.001] * 3  # the reference: no warm-up
    # 9 / (10 + k) meets the floor at k = 8990: the variant's 6000 updates end at 9 / 6009 = 0.0015
    assert ema_rate(8989, 0.001, warmup=True) > 0.001 and ema_rate(8990, 0.001, warmup=True) == 0.001
    assert ema_rate(5999, 0.001, warmup=True) == pytest.approx(9 / 6009)
    # share of the random initialisation left in the EMA after 3000 updates: 5% without warm-up, none with it
    share = lambda warmup: math.prod(1 - ema_rate(k, 0.001, warmup) for k in range(3000))
    assert share(False) == pytest.approx(0.999 ** 3000) and share(False) > 0.04
    assert share(True) < 1e-20


def test_ema_follows_the_warmup_rates_in_a_trainer(tmp_path):
    """Two Trainer steps: ema = (1 - t1)((1 - t0) init + t0 net_1) + t1 net_2 with t0 = 0.9, t1 = 9 / 11."""
    import lightning as L

    from lightning_saferl.critics import FeasibilityCritic, RewardCritic
    from lightning_saferl.data.datamodule import OfflineDataModule
    from tiny_data import write_tiny

    critics = dict(obs_dim=11, act_dim=2, hidden_dims=(8,))
    actor = FisorActor(obs_dim=11, act_dim=2, hidden_dim=16, num_blocks=1, dropout=0.0, lr=1e-2, ema_warmup=True,
                       feasibility_critic=FeasibilityCritic(**critics), reward_critic=RewardCritic(**critics))
    snapshots = []

    class Snapshot(L.Callback):  # callbacks' hooks run before the module's: sees net_k before the EMA update
        def on_train_start(self, trainer, module):
            snapshots.append(torch.cat([p.detach().flatten() for p in module.net.parameters()]).cpu())

        def on_train_batch_end(self, trainer, module, *args):
            self.on_train_start(trainer, module)

    data = OfflineDataModule(path=write_tiny(tmp_path / "d.hdf5"), batch_size=32)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Snapshot()]).fit(actor, datamodule=data)
    init, net1, net2 = snapshots
    t0, t1 = 0.9, 9 / 11
    expected = (1 - t1) * ((1 - t0) * init + t0 * net1) + t1 * net2
    ema = torch.cat([p.flatten() for p in actor.ema.parameters()]).cpu()
    assert not torch.allclose(net1, net2)
    assert torch.allclose(ema, expected, atol=1e-6)


def test_cosine_decay_holds_its_floor():
    """LambdaLR(cosine_decay): 1 -> 0 over decay_steps, then stays 0 (torch's CosineAnnealingLR climbs back)."""
    module = SafeRLModule()
    module.weight = torch.nn.Parameter(torch.zeros(1))
    module.lr, module.cosine_decay_steps = 1.0, 4
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(9):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.5 * (1 + math.cos(math.pi * min(k, 4) / 4)) for k in range(9)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[4:] == [0.0] * 5
