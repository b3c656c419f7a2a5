"""The package's import graph has no cycle. Every import counts, also those inside functions (imported lazily, they
are still dependencies: a lazy import that closes a circle only moves the failure to the call)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_saferl"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its `__init__.py`)."""
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source. `from a.b import c` names module `a.b.c`
    where that is a module, else `a.b`; relative imports are not used in the package (each is resolved as absolute
    by `level == 0`, and a relative one would be missed: `test_no_relative_imports`)."""
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in files)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                targets.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files
                               else node.module for alias in node.names)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle [m0, m1, ..., m0] of `graph`, or [] if there is none (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_package_has_no_import_cycle():
    graph = import_graph(module_files())
    assert "lightning_saferl.seeding" in graph["lightning_saferl.base"]  # the graph sees the package's imports
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_relative_imports():
    for name, path in module_files().items():
        relative = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.level > 0]
        assert not relative, f"{path}: relative imports at lines {relative} (the cycle check reads absolute ones)"


def test_a_lazy_import_that_closes_a_circle_is_found(tmp_path):
    package = tmp_path / "lightning_saferl"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("from lightning_saferl.data.loader import load\n")
    (package / "data" / "loader.py").write_text("def load():\n    from lightning_saferl import base\n")
    (package / "base.py").write_text("from lightning_saferl.data import load\n")
    cycle = find_cycle(import_graph(module_files(package)))
    assert cycle[0] == cycle[-1] and set(cycle) == {"lightning_saferl.base", "lightning_saferl.data",
                                                    "lightning_saferl.data.loader"}
    (package / "data" / "loader.py").write_text("def load():\n    pass\n")
    assert find_cycle(import_graph(module_files(package))) == []


#: the most lines a function of the package may span (its signature, docstring and body)
MAX_FUNCTION_LINES = 60


def long_functions(files: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Dotted name (module, classes, function) -> lines, for every function of `files` longer than `limit` lines."""
    found = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > limit:
                    found[name] = lines
                visit(child, name)

    for module, path in files.items():
        visit(ast.parse(path.read_text(), str(path)), module)
    return found


def test_no_function_is_longer_than_the_limit():
    found = long_functions(module_files())
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(
        f"{name} ({lines})" for name, lines in found.items())


def test_a_long_function_is_found(tmp_path):
    package = tmp_path / "lightning_saferl"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (package / "long.py").write_text(f"class A:\n    def run(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n")
    (package / "short.py").write_text("def run():\n    pass\n")
    assert long_functions(module_files(package)) == {"lightning_saferl.long.A.run": MAX_FUNCTION_LINES + 1}
