"""Shadow recall and false-infeasible rate: the feasibility figures the trivial rule h(s) <= 0 cannot fake."""
import math

import torch
from test_callbacks import CriticActor, _trainer

from lightning_saferl.callbacks import FeasibleRegionPlot
from lightning_saferl.callbacks.feasible_region import region_scores
from lightning_saferl.data.tasks import TaskSpec
from lightning_saferl.envs import point_robot as pr
from lightning_saferl.envs.oracle import is_feasible

SLICES = ((1.0, math.pi / 2), (1.5, math.pi / 4))


def oracle_value(obs: torch.Tensor) -> torch.Tensor:
    """+1 where the oracle calls the state infeasible, -1 where feasible."""
    return 1.0 - 2.0 * is_feasible(pr.state_from_observation(obs.double())).float()


def trivial_value(obs: torch.Tensor) -> torch.Tensor:
    """h(s) = radius - distance to the nearest hazard centre (observation entries 5, 8 are the distances)."""
    return pr.HAZARD_RADIUS - obs[:, 5::3].min(dim=-1).values


def test_region_scores_separate_the_oracle_from_the_trivial_rule():
    perfect, trivial = region_scores(oracle_value, SLICES, 41), region_scores(trivial_value, SLICES, 41)
    assert perfect["shadow_share"] > 0.02  # the slices hold shadow states
    assert perfect["shadow_recall"] == 1.0 and perfect["false_infeasible_rate"] == 0.0 and perfect["iou"] == 1.0
    assert trivial["shadow_recall"] == 0.0 and trivial["false_infeasible_rate"] == 0.0
    assert trivial["iou"] > 0.9  # IoU alone does not tell the two apart


class OracleCriticActor(CriticActor):
    def __init__(self):
        super().__init__()
        self.feasibility_critic.value = oracle_value


def test_feasible_region_callback_logs_shadow_figures(tmp_path):
    task = TaskSpec(task_id="PointRobot-v0", max_episode_steps=300, simulator="point_robot", cost_limit=0.0)
    for module, recall in ((CriticActor(), 0.0), (OracleCriticActor(), 1.0)):
        trainer = _trainer(tmp_path, 1, [FeasibleRegionPlot(every_n_steps=1, slices=SLICES, n=21, task=task)])
        trainer.fit(module)
        assert float(trainer.callback_metrics["feasible_region/shadow_recall"]) == recall
        assert float(trainer.callback_metrics["feasible_region/false_infeasible_rate"]) == 0.0
