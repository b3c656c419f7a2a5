"""benchmarks/hazard_starts.py: its starts inside the hazards and its split of the random starts."""

import numpy as np
import torch

from lightning_saferl.envs import point_robot as pr
from scripts import load_script


def _bench():
    return load_script("benchmarks/hazard_starts.py")


def test_hazard_starts_are_at_rest_inside_each_hazard_in_turn():
    starts = _bench().hazard_starts(6)
    states = torch.tensor([s["state"] for s in starts], dtype=torch.float64)
    assert pr.in_hazard(states).all() and (states[:, 2] == 0).all()
    centers = torch.tensor(pr.HAZARD_CENTERS, dtype=torch.float64)
    nearest = torch.cdist(states[:, :2], centers).argmin(dim=1)
    assert nearest.tolist() == [i % len(pr.HAZARD_CENTERS) for i in range(6)]
    assert starts == _bench().hazard_starts(6)  # seeded


def test_random_starts_split_into_inside_doomed_and_feasible():
    kinds = _bench().random_start_kinds(60)
    stacked = np.stack([kinds["inside"], kinds["doomed"], kinds["feasible"]])
    assert (stacked.sum(axis=0) == 1).all()  # each start in exactly one kind
    assert kinds["inside"].any() and kinds["feasible"].any()
