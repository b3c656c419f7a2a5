"""The results tables in README.md and docs/ are the rendering of docs/results/*.json (docs/gen_results.py)."""
import json
from pathlib import Path

import pytest

from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
gen_results = load_script("docs/gen_results.py")


@pytest.mark.parametrize("page", gen_results.pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_tables_match_their_json(page):
    text = page.read_text()
    assert gen_results.regenerate(text) == text, f"{page.name}: run python docs/gen_results.py"


def test_every_results_table_is_on_a_page():
    shown = {m.group("spec").split()[0] for page in gen_results.pages()
             for m in gen_results.MARKER.finditer(page.read_text())}
    stored = {f"{path.name}#{name}" for path in gen_results.RESULTS.glob("*.json")
              for name in json.loads(path.read_text())["tables"]}
    assert stored <= shown, f"tables in docs/results/ on no page: {sorted(stored - shown)}"


def test_each_table_names_machine_date_and_command():
    for path in gen_results.RESULTS.glob("*.json"):
        for name, table in json.loads(path.read_text())["tables"].items():
            missing = [k for k in ("title", "machine", "date", "command", "protocol") if not table.get(k)]
            assert not missing, f"{path.name}#{name} lacks {missing}"


def test_stored_means_agree_with_their_seeds():
    """A mean typed beside its per-seed figures must be their mean, to the figures' rounding."""
    for path in gen_results.RESULTS.glob("*.json"):
        for name, table in json.loads(path.read_text())["tables"].items():
            for row in table.get("rows", []):
                for value in row if isinstance(row, list) else []:
                    if isinstance(value, dict) and "seeds" in value:
                        seeds = value["seeds"]
                        slack = 0.5 * max(_unit(value["mean"]), *map(_unit, seeds))
                        assert abs(sum(seeds) / len(seeds) - value["mean"]) <= slack + 1e-9, (path.name, name, row[0])


def _unit(x: float) -> float:
    """The last digit's place of a figure as typed: 0.77 -> 0.01, 13 -> 1."""
    text = f"{x:g}"
    return 10.0 ** -len(text.partition(".")[2])


def test_a_changed_figure_is_caught(tmp_path):
    page = "<!-- results: point_robot.json#dsrl algorithms=bc_safe brief -->\nold\n<!-- /results -->\n"
    rendered = gen_results.regenerate(page)
    assert "| PointRobot-v0 | bc_safe | 0 |" in rendered and "bc_all" not in rendered
    assert gen_results.regenerate(rendered) == rendered
    assert gen_results.regenerate(rendered.replace("0.653", "0.553")) != rendered.replace("0.653", "0.553")
