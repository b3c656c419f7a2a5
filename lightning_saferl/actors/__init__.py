"""The actors. What each one's cost budget means (`cost_limit`, CDT's `target_cost`):

* undiscounted episode budget (the sum of one episode's costs, the unit of DSRL's cost limits): BCSafe (which
  episodes to imitate), BCQLag, CPQ and COptiDICE (turned into a per-step threshold by `common.cost_threshold`) and
  CDT (the cost-to-go it is conditioned on);
* discounted episode budget (gamma = `cost_discount`): DrcorlPolicy, against its offline estimate of the policy's
  discounted episode cost;
* none: FisorActor (a hard constraint: the feasible region of the zero-cost constraint), BCAll, BehaviorDiffusion.
"""
from lightning_saferl.actors.bc import BCAll, BCSafe
from lightning_saferl.actors.fisor import FisorActor

__all__ = ["BCAll", "BCSafe", "FisorActor"]
from lightning_saferl.actors.drcorl import BehaviorDiffusion, DrcorlPolicy

__all__ += ["BehaviorDiffusion", "DrcorlPolicy"]
from lightning_saferl.actors.bcq_lag import BCQLag
from lightning_saferl.actors.coptidice import COptiDICE
from lightning_saferl.actors.cpq import CPQ

__all__ += ["BCQLag", "COptiDICE", "CPQ"]
from lightning_saferl.actors.cdt import CDT

__all__ += ["CDT"]
