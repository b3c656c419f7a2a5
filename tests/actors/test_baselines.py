"""BCQ-Lag, CPQ and COptiDICE: each method's defining mechanism on a constructed problem, and every recipe through
`lightning-saferl pipeline --smoke`. Mechanism tests train tiny networks with a plain loop over `losses` (the same
summed loss and optimiser Lightning steps)."""
import json
from pathlib import Path

import gymnasium
import pytest
import torch
import yaml

import lightning_saferl.envs
from lightning_saferl.actors import CPQ, BCQLag, COptiDICE
from lightning_saferl.actors.bcq_lag import PIDLagrangian
from lightning_saferl.actors.common import cost_threshold
from lightning_saferl.cli import main
from lightning_saferl.policy import load_policy

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "baselines"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
TINY = {"hidden_dims": [16], "critic_hidden_dims": [16]}


def batches(columns: dict, batch_size: int, seed: int = 0):
    """An endless stream of uniformly drawn batches of `columns` (with their `index`), seeded."""
    gen = torch.Generator().manual_seed(seed)
    n = len(columns["rewards"])
    while True:
        index = torch.randint(0, n, (batch_size,), generator=gen)
        yield {**{k: v[index] for k, v in columns.items()}, "index": index}


def train(module, stream, steps: int):
    """`steps` optimiser steps on the module's summed loss, target updates after each, as Lightning would run them."""
    optimizer = module.configure_optimizers()
    module.train()
    for step in range(steps):
        batch = next(stream)
        loss = sum(module.losses(batch)[0].values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_optimizer_step()
    return module.eval()


def columns(obs, actions, rewards, costs, masks):
    return {"observations": obs, "actions": actions, "rewards": rewards, "costs": costs,
            "next_observations": obs.roll(1, 0), "masks": masks}


# ------------------------------------------------------------------------------------------------------------
# BCQ-Lag: the Lagrange multiplier
# ------------------------------------------------------------------------------------------------------------
def test_cost_threshold_is_osrls_per_step_q_threshold():
    assert cost_threshold(10, 0.99, 300) == pytest.approx(10 * (1 - 0.99 ** 300) / (0.01 * 300))
    assert cost_threshold(5, 0.0, 1) == 5.0


def test_pid_multiplier_by_hand():
    pid = PIDLagrangian(0.1, 0.01, 0.5)
    # e = 2: I = 2, lambda = 0.1*2 + 0.01*2 + 0.5*relu(2 - 0) = 1.22
    assert float(pid.update(torch.tensor(2.0))) == pytest.approx(1.22)
    # e = 1: I = 3, lambda = 0.1 + 0.03 + 0.5*relu(1 - 2) = 0.13
    assert float(pid.update(torch.tensor(1.0))) == pytest.approx(0.13)
    # e = -5: I = relu(3 - 5) = 0, lambda = 0
    assert float(pid.update(torch.tensor(-5.0))) == 0.0


def test_bcq_lag_multiplier_grows_above_the_threshold_and_falls_to_zero_below():
    torch.manual_seed(0)
    # no derivative gain here: it reacts to batch-to-batch noise of the estimate (checked by hand above)
    model = BCQLag(11, 2, vae_hidden_dim=16, cost_limit=5.0, max_episode_steps=300, pid=(0.1, 0.003, 0.0), **TINY)
    n = 64
    data = columns(torch.randn(n, 11), torch.rand(n, 2) * 2 - 1, torch.zeros(n), torch.zeros(n), torch.ones(n))
    stream = batches(data, 32)
    model.train()
    cost_bias = model.cost_critic.net.layers[-1].bias  # (members, 1, 1): shifts Q_c(s, a) everywhere

    def multipliers(bias, steps):
        with torch.no_grad():
            cost_bias.fill_(bias)
        return [float(model.losses(next(stream))[1]["multiplier"]) for _ in range(steps)]

    above = multipliers(model.q_threshold + 3.0, 6)  # estimated cost above the threshold
    assert above[0] > 0 and all(b > a for a, b in zip(above, above[1:]))
    below = multipliers(model.q_threshold - 3.0, 12)
    assert below[0] < above[-1] and all(b <= a for a, b in zip(below, below[1:]))
    assert below[-1] == 0.0  # clamped at zero, not negative
    model.eval()  # held fixed outside training
    assert float(model.losses(next(stream))[1]["multiplier"]) == 0.0


class _LinearMembers(torch.nn.Module):
    """A critic ensemble linear in the action: member i of Q(s, a) = a . weights[i]."""

    def __init__(self, weights):
        super().__init__()
        self.weights = torch.tensor(weights)

    def forward(self, obs, actions):
        return torch.einsum("ma,ba->mb", self.weights, actions)


def test_bcq_lag_acts_with_the_candidate_best_under_the_lagrangian():
    """act = argmax_j min_i Q_r,i(s, a_j) - lambda min_i Q_c,i(s, a_j) over the candidates, by hand. Candidates (no
    perturbation, phi = 0): a_0 = (0.9, 0.8), a_1 = (0.5, -0.5), a_2 = (-0.2, -0.9); members Q_r = (a[0], -2 a[1]),
    Q_c = (a[1], a[1] + 0.1 a[0]):
        min_i Q_r = (-1.6, 0.5, -0.2)   (max_i would be (0.9, 1.0, 1.8)),   min_i Q_c = (0.8, -0.5, -0.92)
        lambda = 0:   a_1, the best pessimistic reward (the optimistic max would pick a_2)
        lambda = 1e4: scores ~ -lambda Q_c        -> a_2, the cheapest"""
    candidates = torch.tensor([[0.9, 0.8], [0.5, -0.5], [-0.2, -0.9]])
    model = BCQLag(11, 2, vae_hidden_dim=8, max_episode_steps=300, num_samples=3, phi=0.0, **TINY).eval()
    order = torch.tensor([[0, 1, 2], [2, 0, 1]])  # the second state sees the candidates in another order
    model.vae.decode = lambda obs_rep: candidates[order].reshape(-1, 2)
    model.critic = _LinearMembers([[1.0, 0.0], [0.0, -2.0]])
    model.cost_critic = _LinearMembers([[0.0, 1.0], [0.1, 1.0]])
    for multiplier, best in ((0.0, 1), (1e4, 2)):
        model.lagrangian.multiplier.fill_(multiplier)
        assert model.act(torch.zeros(2, 11)).tolist() == [candidates[best].tolist()] * 2, multiplier


def test_multiplier_states_travel_in_the_checkpoint():
    """A resumed run continues with the multipliers it had (PID integral and last error, CPQ's alpha)."""
    bcq = BCQLag(11, 2, vae_hidden_dim=8, max_episode_steps=300, **TINY)
    for error in (2.0, 3.0):
        bcq.lagrangian.update(torch.tensor(error))
    cpq = CPQ(11, 2, vae_hidden_dim=8, max_episode_steps=300, **TINY)
    cpq.alpha.fill_(0.25)
    resumed_bcq, resumed_cpq = BCQLag(**bcq.hparams), CPQ(**cpq.hparams)
    resumed_bcq.load_state_dict(bcq.state_dict())
    resumed_cpq.load_state_dict(cpq.state_dict())
    assert (float(resumed_bcq.lagrangian.integral), float(resumed_bcq.lagrangian.previous_error)) == (5.0, 3.0)
    assert float(resumed_cpq.alpha) == 0.25


# ------------------------------------------------------------------------------------------------------------
# CPQ: out-of-distribution actions look unsafe
# ------------------------------------------------------------------------------------------------------------
def test_cpq_cost_critic_rates_out_of_distribution_actions_costlier():
    torch.manual_seed(0)
    n = 256
    obs = torch.randn(n, 11)
    data_actions = (0.5 + 0.05 * torch.randn(n, 2)).clamp(-1, 1)  # the data only ever does ~(0.5, 0.5)
    data = columns(obs, data_actions, torch.zeros(n), torch.zeros(n), torch.ones(n))  # and never pays a cost
    model = CPQ(11, 2, vae_hidden_dim=16, lr=3e-3, actor_lr=3e-3, alpha_lr=0.1, alpha_max=1.0, cost_limit=5.0,
                max_episode_steps=300, **TINY)
    train(model, batches(data, 64), 150)
    with torch.no_grad():
        far = torch.full((n, 2), -0.8)
        q_data = model.cost_critic(obs, data_actions).min(0).values
        q_far = model.cost_critic(obs, far).min(0).values
    qc_threshold = model.hparams.qc_scale * model.q_threshold
    # without the OOD term (alpha_max = 0) both stay near 0: measured -0.17 vs -0.12 after 150 steps
    assert float(q_far.mean() - q_data.mean()) > qc_threshold, (float(q_far.mean()), float(q_data.mean()))


def test_cpq_ood_term_averages_the_cost_critic_over_the_ood_samples_only():
    # E_ood[Q_c] of the dual ascent is the mean over the OOD samples (the top quarter of the VAE's KL), not OSRL's
    # masked mean over all n B samples, a quarter of it, which the ascent pushed to 4 qc_thres
    torch.manual_seed(0)
    n = 64
    data = columns(torch.randn(n, 11), torch.rand(n, 2) * 2 - 1, torch.zeros(n), torch.zeros(n), torch.ones(n))
    model = CPQ(11, 2, vae_hidden_dim=16, cost_limit=5.0, max_episode_steps=300, **TINY).train()
    batch = next(batches(data, n))
    torch.manual_seed(1)
    reported = float(model.losses(batch)[1]["q_cost_ood"])
    torch.manual_seed(1)  # the same draws: next actions, then 10 samples per state
    with torch.no_grad():
        model.policy(batch["next_observations"])
        obs_rep = batch["observations"].repeat(10, 1)
        samples, _ = model.policy(obs_rep)
        ood = model.ood_mask(obs_rep, samples).bool()
        by_hand = model.cost_critic(obs_rep[ood], samples[ood]).mean(1).min()
    assert 0.2 < float(ood.float().mean()) < 0.3
    assert reported == pytest.approx(float(by_hand), rel=1e-5)


def test_cpq_actor_leaves_actions_the_cost_critic_rates_unsafe():
    # one-step episodes: the reward and the cost grow with action[0] > 0; q_thres = limit. Trained at limit 2 (all
    # safe) the actor takes the costly reward; lowered to 0.5 it must come back below 0, which only the descent on
    # Q_c where unsafe does (measured a0 1.00 -> 0.03; OSRL's actor gets no gradient there: 1.00 -> 1.00)
    gen = torch.Generator().manual_seed(0)
    n = 512
    obs = torch.randn(4, 11, generator=gen)[torch.arange(n) % 4]
    actions = torch.rand(n, 2, generator=gen) * 2 - 1
    costly = (actions[:, 0] > 0).float()
    data = columns(obs, actions, 1 + actions[:, 0], costly, torch.zeros(n))
    torch.manual_seed(0)
    model = CPQ(11, 2, vae_hidden_dim=16, lr=3e-3, actor_lr=3e-3, alpha_max=0.0, cost_limit=2.0,
                max_episode_steps=1, **TINY)
    stream = batches(data, 128)
    a_loose = float(train(model, stream, 300).act(obs[:4])[:, 0].mean())
    model.hparams.cost_limit = 0.5
    a_tight = float(train(model, stream, 300).act(obs[:4])[:, 0].mean())
    assert a_loose > 0.5 and a_tight < 0.1, (a_loose, a_tight)


# ------------------------------------------------------------------------------------------------------------
# COptiDICE: non-negative, normalised weights that move mass to low-cost transitions as the limit tightens
# ------------------------------------------------------------------------------------------------------------
def _bandit():
    """One-step episodes from 4 states; half the actions cost 1 and earn reward 1, the rest earn and cost nothing."""
    gen = torch.Generator().manual_seed(0)
    n = 512
    states = torch.randn(4, 11, generator=gen)
    obs = states[torch.arange(n) % 4]
    costs = (torch.arange(n) // 4 % 2).float()
    actions = torch.rand(n, 2, generator=gen) * 2 - 1
    return columns(obs, actions, costs.clone(), costs, torch.zeros(n))


def _coptidice(limit: float, data: dict, **kwargs) -> COptiDICE:
    torch.manual_seed(0)
    # discount 0 and one-step episodes: d_pi = p0 pi, so E_D[w] = 1 and the constraint is E_D[w c] <= limit
    model = COptiDICE(11, 2, lr=1e-2, cost_limit=limit, max_episode_steps=1, discount=0.0, **TINY, **kwargs)
    model.initial, model.initial_fraction = torch.ones(len(data["rewards"])), 1.0
    model.initial_observations = data["observations"]
    model.obs_std, model.act_std = data["observations"].std(0), data["actions"].std(0)
    return train(model, batches(data, 128), 250)


def _weights(model: COptiDICE, data: dict) -> torch.Tensor:
    return model.weights({**data, "index": torch.arange(len(data["rewards"]))})


def test_coptidice_weights_are_normalised_and_follow_the_cost_limit():
    data = _bandit()
    loose, tight = _weights(_coptidice(0.9, data), data), _weights(_coptidice(0.1, data), data)
    for w in (loose, tight):
        assert (w >= 0).all()
        assert float(w.mean()) == pytest.approx(1.0, abs=0.2)

    def weighted_cost(w):
        return float((w * data["costs"]).sum() / w.sum())

    assert weighted_cost(loose) > 0.6  # loose: the rewarding, costly half is preferred
    assert weighted_cost(tight) < weighted_cost(loose) - 0.3, (weighted_cost(tight), weighted_cost(loose))
    assert weighted_cost(tight) < 0.3


def test_coptidice_policy_cost_estimate_drives_lambda_where_the_dice_estimate_does_not():
    """Data actions a_0 uniform on [-1, 1]; the middle band |a_0| < 0.3 costs 1 and earns nothing, the rest earns 1.
    w keeps little mass in the band, so E_D[w c] is under the limit 0.5, but weighted BC of a unimodal policy puts
    its mode between the two rewarding sides, in the band: the extracted policy pays ~1. lambda must follow that."""
    gen = torch.Generator().manual_seed(0)
    n = 512
    obs = torch.randn(4, 11, generator=gen)[torch.arange(n) % 4]
    actions = torch.rand(n, 2, generator=gen) * 2 - 1
    costly = (actions[:, 0].abs() < 0.3).float()
    data = columns(obs, actions, 1 - costly, costly, torch.zeros(n))
    dice, policy = _coptidice(0.5, data, cost_ub_epsilon=0.0), _coptidice(0.5, data, cost_estimate="policy")
    policy_cost = float((policy.act(obs[:4])[:, 0].abs() < 0.3).float().mean())
    dice_cost = float((_weights(dice, data) * costly).mean())
    assert policy_cost >= 0.75 and dice_cost < 0.1, (policy_cost, dice_cost)  # the gap the "policy" estimate closes
    lambdas = float(dice.multiplier.detach()), float(policy.multiplier.detach())
    assert lambdas[0] < 0.5 and lambdas[1] > 2.0, lambdas  # from softplus(1) = 1.31: fell / rose
    # the cost critic learned the band (Q_c = c at discount 0), and below the limit lambda falls as before
    q = policy.cost_critic(obs, actions).mean(0).detach()
    assert float(q[costly == 1].mean()) > float(q[costly == 0].mean()) + 0.5
    assert float(_coptidice(1.5, data, cost_estimate="policy").multiplier.detach()) < 0.5


# ------------------------------------------------------------------------------------------------------------
# recipes: every one runs through the pipeline, and its checkpoint loads as a policy
# ------------------------------------------------------------------------------------------------------------
def _smoke(recipe: str, run: Path, *extra: str) -> dict:
    """The recipe as written (networks, settings, evaluation) at batch 32: --smoke runs 5 steps and 2 episodes."""
    config = yaml.safe_load((CONFIGS / recipe).read_text())
    config["stages"]["policy"]["data"]["batch_size"] = 32
    path = run.parent / recipe
    path.write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(path), "--smoke", "--run_dir", str(run), "--trainer", json.dumps(QUIET), *extra])
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("method", ["bcq_lag", "cpq", "coptidice"])
def test_point_robot_recipes_run_and_load(tmp_path, tiny, method):
    summary = _smoke(f"{method}_point_robot.yaml", tmp_path / "run", "--data.path", tiny)
    assert (summary["algorithm"], summary["task"], summary["episodes"]) == (method, "PointRobot-v0", 2)
    policy = load_policy(str(tmp_path / "run" / "policy" / "model.ckpt"))
    actions = policy.act(torch.zeros(3, 11))
    assert actions.shape == (3, 2) and actions.abs().max() <= 1


@pytest.mark.parametrize("method", ["bcq_lag", "cpq", "coptidice"])
def test_dsrl_recipes_follow_the_limit(tmp_path, tiny, method, monkeypatch):
    monkeypatch.setitem(lightning_saferl.envs.ENV_FACTORIES, "OfflineBallRun-v0",
                        lambda **kw: gymnasium.make("PointRobot-v0"))
    recipe = yaml.safe_load((CONFIGS / f"{method}_dsrl.yaml").read_text())
    assert recipe["stages"]["policy"]["model"]["init_args"]["cost_limit"] == recipe["cost_limit"] == 10
    assert recipe["cost_limit_fields"] == ["stages.policy.model.init_args.cost_limit"]  # one recipe, every limit
    summary = _smoke(f"{method}_dsrl.yaml", tmp_path / "run", "--data.task", "OfflineBallRun-v0", "--data.path", tiny)
    assert summary["task"] == "OfflineBallRun-v0" and summary["cost_limit"] == 10
    assert summary["normalized_cost"] == pytest.approx(summary["cost_mean"] / 10)
