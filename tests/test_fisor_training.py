"""Short FISOR runs on real PointRobot data: what the critics learn, not just that they run."""
import math

import lightning as L
import pytest
import torch

from lightning_saferl.critics import FeasibilityCritic
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.envs.oracle import is_feasible
from lightning_saferl.envs.point_robot import HAZARD_CENTERS, HAZARD_RADIUS, in_hazard, observe


@pytest.fixture(scope="module")
def point_robot_data(tmp_path_factory):
    return OfflineDataModule(task="PointRobot-v0", num_transitions=30_000, batch_size=256, steps_per_epoch=500,
                             cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_feasibility_critic_ranks_hazard_infeasible_and_far_slow_state_feasible(point_robot_data):
    L.seed_everything(0)
    critic = FeasibilityCritic(obs_dim=11, act_dim=2, hidden_dims=(128, 128), lr=1e-3)
    trainer = L.Trainer(max_steps=1500, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(critic, datamodule=point_robot_data)
    states = torch.tensor([
        [0.4, -1.2, 1.0, 0.0],              # at a hazard's centre
        [-0.4, 1.0, 0.5, math.pi / 2],      # inside the other hazard
        [1.8, 0.0, 0.3, math.pi / 2],       # far from both hazards, slow
        [-2.0, -2.0, 0.2, math.pi],         # far corner, slow, heading away
    ])
    values = critic.value(observe(states)).detach()
    assert values[0] > 0 and values[1] > 0, values
    assert values[2] <= 0 and values[3] <= 0, values
    assert critic.feasible(observe(states)).tolist() == [False, False, True, True]


def doomed_states(n: int = 400) -> torch.Tensor:
    """States just outside a hazard (gap 0.05-0.3) heading at its centre at speed 1.2-1.5: too fast to stop."""
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor(HAZARD_CENTERS, dtype=torch.float64)[torch.randint(0, 2, (n,), generator=g)]
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    gap = 0.05 + 0.25 * torch.rand(n, generator=g, dtype=torch.float64)
    speed = 1.2 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    position = centre + (HAZARD_RADIUS + gap)[:, None] * torch.stack((angle.cos(), angle.sin()), dim=-1)
    return torch.cat((position, speed[:, None], (angle + math.pi)[:, None]), dim=-1)


def test_hj_recursion_marks_doomed_states_outside_hazards_infeasible(point_robot_data):
    """The shadow: a critic regressing h alone (discount 0: target = h) calls doomed states feasible; the HJ
    recursion (discount 0.99) propagates the coming violation back to them."""
    states = doomed_states()
    assert not is_feasible(states).any() and not in_hazard(states).any()  # all in the oracle's shadow
    recall = {}
    for discount in (0.99, 0.0):
        L.seed_everything(0)
        critic = FeasibilityCritic(obs_dim=11, act_dim=2, hidden_dims=(128, 128), lr=1e-3, tau=0.05,
                                   discount=discount)
        L.Trainer(max_steps=1000, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(critic, datamodule=point_robot_data)
        with torch.no_grad():
            recall[discount] = float((~critic.feasible(observe(states).float())).float().mean())
    assert recall[0.0] < 0.15, recall    # h(s) <= 0 there: regressing h says "feasible"
    assert recall[0.99] > 0.4, recall    # measured 0.55 (seed 0, 1000 steps)
