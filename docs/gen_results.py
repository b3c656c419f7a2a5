"""Regenerates every results table in README.md and docs/ from the JSON files in docs/results/.

    python docs/gen_results.py           rewrite the tables in place
    python docs/gen_results.py --check   exit 1 and name the pages whose tables differ from their JSON

A page holds a table between two markers; what lies between them is replaced by the rendering of one table of one
JSON file (``docs/results/<file>.json``, key ``tables.<name>``):

    <!-- results: point_robot.json#dsrl -->
    ...
    <!-- /results -->

Options after the name: ``algorithms=a,b`` keeps those rows of a DSRL-protocol table, ``brief`` leaves out the
protocol and the command (the title, machine and date stay). A table is either a DSRL-protocol table (``rows`` of
objects with ``algorithm``, ``cost_limit``, ``reward`` and ``cost`` as ``{mean, std}``, ``seeds``; safe iff
cost <= 1) or a plain one (``columns`` and ``rows`` of cells: a string, a number, or ``{mean, std, [seeds], [unit]}``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
MARKER = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def number(x: float) -> str:
    return f"{x:g}"


def cell(value: Any) -> str:
    """A plain table's cell: '0.5, 1, 0.8 % (0.77 ± 0.25)' from {seeds, mean, std, unit}."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return number(value)
    unit = f" {value['unit']}" if "unit" in value else ""
    summary = f"{number(value['mean'])} ± {number(value['std'])}"
    if "seeds" in value:
        return f"{', '.join(number(s) for s in value['seeds'])}{unit} ({summary})"
    return summary + unit


def dsrl_rows(table: dict[str, Any], algorithms: list[str] | None) -> list[str]:
    lines = ["| task | algorithm | cost limit | reward | cost | seeds | safe |", "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        if algorithms and row["algorithm"] not in algorithms:
            continue
        reward, cost = row["reward"], row["cost"]
        safe = "yes" if cost["mean"] <= 1.0 else "**no**"
        lines.append(f"| {table['task']} | {row['algorithm']} | {number(row['cost_limit'])} | "
                     f"{reward['mean']:.3f} ± {reward['std']:.3f} (raw) | {cost['mean']:.3f} ± {cost['std']:.3f} | "
                     f"{row['seeds']} | {safe} |")
    return lines


def plain_rows(table: dict[str, Any]) -> list[str]:
    width = len(table["columns"])
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * width]
    for row in table["rows"]:
        if len(row) != width:
            raise ValueError(f"{table['title']}: row {row[0]!r} has {len(row)} cells for {width} columns")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines


def load_table(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The table named by a marker's spec ('file.json#name [options]') and its options."""
    target, *words = spec.split()
    file, _, name = target.partition("#")
    path = RESULTS / file
    if not path.is_file():
        raise FileNotFoundError(f"results marker {spec!r}: no file {path}")
    tables = json.loads(path.read_text())["tables"]
    if name not in tables:
        raise KeyError(f"results marker {spec!r}: {file} has tables {sorted(tables)}")
    options = dict(w.partition("=")[::2] for w in words)
    return tables[name], options


def render(spec: str) -> str:
    """The Markdown between the markers of ``spec``."""
    table, options = load_table(spec)
    algorithms = options["algorithms"].split(",") if options.get("algorithms") else None
    lines = dsrl_rows(table, algorithms) if "task" in table else plain_rows(table)
    lines = [f"**{table['title']}.** Measured on {table['machine']}; {table['date']}.", "", *lines]
    if "brief" not in options:
        lines += ["", table["protocol"], "", "Produced by:", "", "```bash", table["command"], "```"]
    return "\n".join(lines) + "\n"


def regenerate(text: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + render(m.group("spec")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report differing pages instead of rewriting them")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("tables differ from docs/results/*.json in: " + ", ".join(map(str, stale))
              + " (run python docs/gen_results.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
