"""FISOR as published (the official code's defaults and recipe) and the variant's departures that fix its defects:
the ensemble loss, the EMA rate, the acting margin, failed terminations, and leaving a hazard."""
import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_saferl.actors.fisor import FisorActor
from lightning_saferl.critics import CostCritic, FeasibilityCritic, RewardCritic
from lightning_saferl.data.datamodule import OfflineDataModule, failed_terminations
from lightning_saferl.data.format import Transitions, write_dataset
from lightning_saferl.data.tasks import get_task
from lightning_saferl.envs import point_robot as pr
from test_fisor_selection import _CornerCritic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_defaults_are_the_official_codes_settings():
    # ZhengYinan-AIR/FISOR@2097e8b: configs/train_config.py and jaxrl5/agents/fisor/fisor.py
    actor = _defaults(FisorActor)
    assert {k: actor[k] for k in ("num_candidates", "infeasible_temperature", "feasible_temperature",
                                  "infeasible_weight_min", "infeasible_weight_max", "feasible_weight_max",
                                  "diffusion_steps", "num_blocks", "dropout", "hidden_dim", "lr", "ema_tau",
                                  "ema_warmup", "cosine_decay_steps", "feasibility_margin", "select")} == {
        "num_candidates": 16, "infeasible_temperature": 5.0, "feasible_temperature": 3.0,
        "infeasible_weight_min": 0.0, "infeasible_weight_max": 150.0, "feasible_weight_max": 100.0,
        "diffusion_steps": 5, "num_blocks": 3, "dropout": 0.1, "hidden_dim": 256, "lr": 3e-4, "ema_tau": 0.001,
        "ema_warmup": False, "cosine_decay_steps": 3_000_000, "feasibility_margin": 0.0, "select": "min_qh"}
    # every departure is off
    assert (actor["select_tolerance"], actor["select_clearance"], actor["uniform_proposals"], actor["proposal_gain"],
            actor["proposal_snap"], actor["proposal_vertices"], actor["cost_tiebreak"]) == (0, 0, 0, 0, 0, False, 0)
    for cls in (FeasibilityCritic, RewardCritic):
        critic = _defaults(cls)
        assert (tuple(critic["hidden_dims"]), critic["num_q"], critic["expectile"], critic["discount"],
                critic["tau"], critic["lr"]) == ((256, 256), 2, 0.9, 0.99, 0.005, 3e-4)
    assert _defaults(FeasibilityCritic)["failure_violation"] is None and \
        _defaults(FeasibilityCritic)["cost_scale"] == 25.0


def test_published_recipe_is_the_official_point_robot_run_and_the_variant_carries_the_departures():
    published = yaml.safe_load((CONFIGS / "fisor" / "point_robot.yaml").read_text())
    variant = yaml.safe_load((CONFIGS / "fisor_guard" / "point_robot.yaml").read_text())
    assert (published["algorithm"], variant["algorithm"]) == ("fisor", "fisor_guard")
    actor = published["stages"]["actor"]["model"]["init_args"]
    # launcher/examples/train_offline.py's PointRobot overrides: N 8, cost_temperature 2, reward_temperature 5
    assert (actor["num_candidates"], actor["infeasible_temperature"], actor["feasible_temperature"]) == (8, 2.0, 5.0)
    defaults = _defaults(FisorActor)
    departures = {k for k, v in variant["stages"]["actor"]["model"]["init_args"].items()
                  if actor.get(k, defaults.get(k)) != v}
    assert departures == {"infeasible_temperature", "feasibility_margin", "select_tolerance", "select_clearance",
                          "uniform_proposals", "proposal_gain", "proposal_vertices", "cost_tiebreak", "ema_warmup",
                          "cosine_decay_steps"}
    assert all(actor.get(k, defaults[k]) == defaults[k] for k in departures - {"infeasible_temperature",
                                                                                "cosine_decay_steps"})
    assert "precision" not in published["stages"]["actor"]["trainer"]  # the bf16 actor is the variant's
    assert "cost_critic" not in published["stages"] and "cost_critic" in variant["stages"]
    assert "failure_violation" not in published["stages"]["feasibility_critic"]["model"]["init_args"]
    # the same budget in both, so that an ablation differs in its departures only
    for stage in published["stages"]:
        assert published["stages"][stage]["trainer"]["max_steps"] == variant["stages"][stage]["trainer"]["max_steps"]


def test_the_ensemble_loss_averages_over_members_as_the_official_code():
    torch.manual_seed(0)
    critic = RewardCritic(3, 2, hidden_dims=(8,), num_q=3)
    batch = {"observations": torch.randn(5, 3), "actions": torch.rand(5, 2), "rewards": torch.randn(5),
             "costs": torch.zeros(5), "next_observations": torch.randn(5, 3), "masks": torch.ones(5)}
    losses, _ = critic.losses(batch)
    with torch.no_grad():
        residual = critic.q(batch["observations"], batch["actions"]) - critic.batch_target(batch)  # (3, 5)
    assert residual.shape == (3, 5)
    assert losses["q_loss"].item() == pytest.approx(residual.square().mean().item(), rel=1e-6)


def test_an_actor_without_the_warmup_key_steps_its_ema_as_the_default_does():
    # a checkpoint saved before `ema_warmup` existed has no such key: it takes __init__'s default, the reference's
    # constant rate (the step used to read a default of its own)
    actors = [FisorActor(3, 2, hidden_dim=8, num_blocks=1) for _ in range(2)]
    del actors[1].hparams["ema_warmup"]
    actors[1].load_state_dict(actors[0].state_dict())
    with torch.no_grad():
        for actor in actors:
            for p in actor.net.parameters():
                p.add_(1.0)
            actor.after_optimizer_step()  # update 0
    first, second = (torch.cat([p.flatten() for p in a.ema.parameters()]) for a in actors)
    assert torch.equal(first, second)


def test_the_proposal_margin_is_an_acting_setting_of_a_trained_actor(monkeypatch):
    # V_h = -0.1: feasible at the training margin 0, flagged at an acting margin of 0.25
    actor = FisorActor(obs_dim=3, act_dim=2, hidden_dim=16, num_blocks=1, num_candidates=3, uniform_proposals=4,
                       proposal_vertices=True)
    monkeypatch.setattr(actor, "sample_candidates", lambda obs, n: torch.zeros(1, 3, 2))
    actor.feasibility_critic = _CornerCritic()
    obs = torch.tensor([[-0.1, 0.0, 0.0]])
    assert torch.equal(actor.act(obs), torch.zeros(1, 2))
    actor.set_acting_hparams({"proposal_margin": 0.25})
    assert torch.equal(actor.act(obs), torch.tensor([[1.0, -1.0]]))
    assert "proposal_margin" in FisorActor.acting_hparams and "feasibility_margin" not in FisorActor.acting_hparams


def _states_to_observations(states) -> torch.Tensor:
    return pr.observe(torch.tensor(states, dtype=torch.float64)).float()


def test_failed_terminations_take_the_worst_violation_as_target(tmp_path):
    # rows: leaves the arena (terminal), reaches the goal (terminal), in the arena (time limit)
    next_states = [(3.1, 0.0, 1.0, 0.0), (2.2, 2.2, 1.0, 0.0), (3.1, 0.0, 1.0, 0.0)]
    n = len(next_states)
    arrays = {"observations": _states_to_observations([(2.95, 0.0, 1.0, 0.0)] * n).numpy(),
              "next_observations": _states_to_observations(next_states).numpy(),
              "actions": torch.zeros(n, 2).numpy(), "rewards": torch.zeros(n).numpy(), "costs": torch.zeros(n).numpy(),
              "terminals": torch.tensor([1.0, 1.0, 0.0]).numpy(), "timeouts": torch.tensor([0.0, 0.0, 1.0]).numpy(),
              "constraint_values": torch.tensor([-1.2, -2.0, -1.2]).numpy()}
    data = Transitions(**{k: torch.as_tensor(v) for k, v in arrays.items()})
    assert failed_terminations(get_task("PointRobot-v0"), data).tolist() == [1.0, 0.0, 0.0]
    assert failed_terminations(get_task("OfflineCarCircle-v0"), data) is None
    batch = OfflineDataModule(path=str(write_dataset(tmp_path / "d.hdf5", arrays))).full_batch()
    reference = FeasibilityCritic(11, 2, hidden_dims=(8,))
    guarded = FeasibilityCritic(11, 2, hidden_dims=(8,), failure_violation=0.8)
    with torch.no_grad():
        assert reference.batch_target(batch).tolist() == pytest.approx([-1.2, -2.0, -1.2])  # h at every end
        assert guarded.batch_target(batch).tolist() == pytest.approx([0.8, -2.0, -1.2])     # max(h, 0.8) on leaving
        without = {k: v for k, v in batch.items() if k != "failures"}
        with pytest.raises(ValueError, match="failure_violation needs the batch's 'failures' column"):
            guarded.batch_target(without)
    with pytest.raises(ValueError, match="failure_violation is a violation"):
        FeasibilityCritic(11, 2, failure_violation=0.0)


class _TiedHazardCritic(torch.nn.Module):
    """Q_h(s, a) = h(s') + 0.01 u0, V_h(s) = h(s): inside a hazard every action scores about the same violation;
    the critic's error (0.01 u0) tilts the lowest Q_h towards full braking, as a trained critic's does."""

    def q_value(self, obs, act):
        state = pr.state_from_observation(obs.double())
        return (pr.constraint_value(pr.step_states(state, act.double())) + 0.01 * act[:, 0]).float()

    def q_value_rows(self, obs, rows, act):  # the actor scores many actions per state through this
        return self.q_value(obs[rows], act)

    def value(self, obs):
        return pr.constraint_value(pr.state_from_observation(obs.double())).float()


class _HoldCostCritic(torch.nn.Module):
    """Q_c(s, a) = sum_t 0.99^t c(s_{t+1}) over 30 steps holding a: a duration-aware cost, by the dynamics."""

    def q_value(self, obs, act):
        state, total = pr.state_from_observation(obs.double()), torch.zeros(obs.shape[0], dtype=torch.float64)
        for t in range(30):
            state = pr.step_states(state, act.double())
            total += 0.99 ** t * pr.in_hazard(state).double()
        return total.float()

    def q_value_rows(self, obs, rows, act):  # the actor scores many actions per state through this
        return self.q_value(obs[rows], act)


def test_from_a_start_inside_a_hazard_the_cost_tiebreak_leaves_where_the_lowest_qh_parks():
    start = (HAZARD := pr.HAZARD_CENTERS[0])[0], HAZARD[1] + 0.2, 0.0, math.pi / 4  # 0.6 deep, at rest

    def violating_steps(cost_tiebreak: float, steps: int = 60) -> int:
        torch.manual_seed(0)
        actor = FisorActor(obs_dim=pr.OBS_DIM, act_dim=pr.ACT_DIM, hidden_dim=16, num_blocks=1, num_candidates=8,
                           uniform_proposals=64, proposal_vertices=True, cost_tiebreak=cost_tiebreak).eval()
        actor.feasibility_critic, actor.cost_critic = _TiedHazardCritic(), _HoldCostCritic()
        state, violations = torch.tensor([start], dtype=torch.float64), 0
        for _ in range(steps):
            state = pr.step_states(state, actor.act(pr.observe(state).float()).double())
            violations += int(pr.in_hazard(state))
        return violations

    assert violating_steps(0.0) == 60    # the lowest Q_h is full braking: at rest, the state repeats
    assert violating_steps(0.05) < 40    # the shortest violation among the tied actions: it drives out
    without_cost_critic = FisorActor(obs_dim=pr.OBS_DIM, act_dim=pr.ACT_DIM, hidden_dim=8, num_blocks=1,
                                     num_candidates=2, cost_tiebreak=0.05)
    without_cost_critic.feasibility_critic = _TiedHazardCritic()
    with pytest.raises(ValueError, match="cost_tiebreak > 0 needs a cost critic"):
        without_cost_critic.act(pr.observe(torch.tensor([start], dtype=torch.float64)).float())
    with pytest.raises(ValueError, match="cost_tiebreak is a Q_h tolerance >= 0"):
        FisorActor(obs_dim=3, act_dim=2, cost_tiebreak=-1.0)

