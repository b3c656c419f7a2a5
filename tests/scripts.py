"""Test helper: the repository's scripts (benchmarks/, docs/), which are not a package, imported as modules."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The module of ROOT / `relative_path` (e.g. "benchmarks/acting.py"), executed once per call."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
