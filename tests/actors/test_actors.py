"""BC baselines, the Policy interface and one-call checkpoint loading."""
import lightning as L
import pytest
import torch

from lightning_saferl.actors import BCAll, BCSafe, FisorActor
from lightning_saferl.critics import FeasibilityCritic, RewardCritic
from lightning_saferl.data.format import Transitions
from lightning_saferl.policy import Policy, load_module, load_policy


def _transitions(costs, dones):
    n = len(costs)
    return Transitions(
        observations=torch.randn(n, 3), actions=torch.zeros(n, 2), rewards=torch.zeros(n),
        costs=torch.tensor(costs, dtype=torch.float32), next_observations=torch.randn(n, 3),
        terminals=torch.tensor(dones, dtype=torch.float32), timeouts=torch.zeros(n))


def test_bc_safe_keeps_only_episodes_within_the_limit():
    # episodes: rows 0-1 (cost 0), rows 2-4 (cost 2), rows 5-6 (cost 1), row 7 (cost 0, cut at the end)
    data = _transitions([0, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 1, 0, 1, 0])
    assert BCSafe(3, 2).compute_sample_weights(data).tolist() == [1, 1, 0, 0, 0, 0, 0, 1]
    assert BCSafe(3, 2, cost_limit=1.0).compute_sample_weights(data).tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no episode has total cost <= 0"):
        BCSafe(3, 2).compute_sample_weights(_transitions([1, 1], [0, 1]))


def test_bc_loss_is_the_weighted_mean_over_kept_transitions():
    model = BCSafe(3, 2)
    obs, actions = torch.randn(4, 3), torch.rand(4, 2) * 2 - 1
    model.sample_weights = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = model.losses({"observations": obs, "actions": actions, "index": torch.arange(4)})[0]["bc_loss"]
    per_sample = (model.policy(obs) - actions).square().sum(-1)
    assert loss.item() == pytest.approx(((per_sample[0] + per_sample[2]) / 2).item(), rel=1e-5)


def test_gaussian_bc_minimises_negative_log_likelihood():
    torch.manual_seed(0)
    model = BCAll(1, 1, hidden_dims=(32,), head="gaussian", lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        actions = (0.5 + 0.1 * torch.randn(256, 1)).clamp(-0.99, 0.99)
        loss = model.losses({"observations": torch.zeros(256, 1), "actions": actions})[0]["bc_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.act(torch.zeros(1, 1)).item() == pytest.approx(0.5, abs=0.05)


def test_actor_checkpoint_loads_in_one_call_and_acts_identically(tmp_path):
    torch.manual_seed(0)
    feas = FeasibilityCritic(3, 2, hidden_dims=(16,))
    reward = RewardCritic(3, 2, hidden_dims=(16,))
    actor = FisorActor(3, 2, feasibility_critic=feas, reward_critic=reward, hidden_dim=16, num_blocks=1,
                       num_candidates=4)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(actor)
    path = tmp_path / "actor.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_policy(str(path))
    assert isinstance(loaded, Policy) and isinstance(loaded, FisorActor)
    obs = torch.randn(5, 3)
    torch.manual_seed(1)
    expected = actor.eval().act(obs)
    torch.manual_seed(1)
    assert torch.equal(loaded.act(obs), expected)
    # the frozen critics travel with the actor
    assert torch.equal(loaded.feasibility_critic.value(obs), feas.value(obs))


def test_loading_checks_the_module_type_and_refuses_foreign_classes(tmp_path):
    critic = RewardCritic(3, 2, hidden_dims=(8,))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(critic)
    path = tmp_path / "reward.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(TypeError, match="holds a RewardCritic, expected a FeasibilityCritic"):
        load_module(str(path), expected=FeasibilityCritic)
    with pytest.raises(TypeError, match="not a policy"):
        load_policy(str(path))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_module(str(tmp_path / "missing.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["lightning_saferl_class"] = "os.system"
    torch.save(checkpoint, tmp_path / "forged.ckpt")
    with pytest.raises(ValueError, match="not a lightning_saferl module"):
        load_module(str(tmp_path / "forged.ckpt"))
