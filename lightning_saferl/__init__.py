"""lightning-saferl: safe offline reinforcement learning with PyTorch Lightning."""
import os

# How long an idle OpenMP thread spins before it sleeps. GNU OpenMP's default (300k spins) makes every small torch op
# crawl as soon as another process wants a core (measured: a critic step 448 ms instead of 8.5 ms with one other
# busy process on 2 cores); never spinning (OMP_WAIT_POLICY=PASSIVE) makes a second thread useless for the critics'
# small ops (two threads 107 critic steps/s, one 110). 1000 spins: two threads 161-192 steps/s alone, 61 beside two
# busy processes (passive: 71). GNU OpenMP (Linux torch wheels) reads GOMP_SPINCOUNT; LLVM / Intel OpenMP read
# KMP_BLOCKTIME (0: passive). Set before torch starts OpenMP; a user's own OMP_WAIT_POLICY or values win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    os.environ.setdefault("KMP_BLOCKTIME", "0")

from lightning_saferl import envs as _envs  # noqa: F401  (registers PointRobot-v0 with gymnasium)

__version__ = "0.2.0"
