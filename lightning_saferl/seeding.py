"""Random streams as pure functions of integers: a 64-bit hash of (base, step), the key of a DDP rank's stream, the
seed of one training batch, and seeding torch's generators without its lazy per-device bookkeeping.

Imports nothing from the package, so the data module, the base module and the policies all use it without import
loops."""
from __future__ import annotations

import torch

__all__ = ["SEED_RANGE", "rank_stream_key", "seed_generators", "step_seed", "stream_seed"]

_MASK64 = (1 << 64) - 1
SEED_RANGE = 1 << 32  # Lightning's seeds: [0, 2^32)


def stream_seed(base: int, step: int) -> int:
    """splitmix64 hash of (base, step), truncated to 63 bits: the generator seed of one batch."""
    z = (base * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def rank_stream_key(seed: int, rank: int) -> int:
    """Key of the batch stream of DDP rank `rank` under seed `seed`: seed + rank 2^32, one-to-one over seeds in
    [0, 2^32) and ranks < 2^31 (rank 0: the seed itself)."""
    return seed + rank * SEED_RANGE


def step_seed(seed: int, rank: int, step: int, micro_batch: int = 0) -> int:
    """Seed of torch's generators for one training batch: a splitmix64 chain over (seed, rank, step, micro-batch),
    63 bits. `step` counts optimiser steps; `micro_batch` is the batch's place in a gradient-accumulation window."""
    return stream_seed(stream_seed(stream_seed(seed, rank), step), micro_batch)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and `device`'s own (~10 us). Not `torch.manual_seed`: for every accelerator type that is
    not initialised it records a lazy seed call with a formatted stack trace, 0.2-0.6 ms per call on CPU."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()] \
            .manual_seed(seed)
    elif device.type != "cpu":
        torch.get_device_module(device).manual_seed(seed)
