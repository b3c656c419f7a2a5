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
