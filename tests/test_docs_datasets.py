"""The dataset cards committed under docs/datasets/ (issued by `build-dataset`): complete, with their picture, on the
datasets page, and covering the reward-cost plane as the Bullet table needs (cost up to the registry's max; a
frontier: the best return at cost <= 10 at least half the best, and below the best at cost <= 40)."""
import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
CARDS = sorted((DOCS / "datasets").glob("*.card.json"))
KEYS = {"task", "episodes", "transitions", "episode_cost_min", "episode_cost_max", "episode_return_max",
        "best_return_at_cost", "max_episode_cost_ref", "minutes", "sha256"}


def test_the_bullet_tables_tasks_have_cards():
    assert {card.name for card in CARDS} >= {"OfflineBallCircle-v0.card.json", "OfflineCarCircle-v0.card.json"}


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.name)
def test_card_is_complete_pictured_and_covers_the_plane(path):
    card = json.loads(path.read_text())
    assert KEYS <= set(card) and not card.get("partial")
    assert (DOCS / "datasets" / f"{card['task']}.png").is_file()
    assert f"datasets/{path.name}" in (DOCS / "datasets.md").read_text()
    assert card["episode_cost_min"] == 0 and card["episode_cost_max"] >= card["max_episode_cost_ref"]
    best = card["best_return_at_cost"]
    assert best["10"] >= 0.5 * card["episode_return_max"] and best["10"] < best["40"] <= card["episode_return_max"]
    assert card["minutes"] <= 120  # built within 2 hours on 2 cores
