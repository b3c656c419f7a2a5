"""The classes a recipe names (`class_path`): imported only when that is safe, checked to be what the stage needs."""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

from lightning_saferl.base import SafeRLModule
from lightning_saferl.errors import InputError
from lightning_saferl.pipeline.recipe import one_line

#: packages whose modules a recipe's class_path may import directly; a module elsewhere is imported only once its
#: source, read without running it, is seen to define the class (`_defines_class`)
TRUSTED_PACKAGES = ("lightning_saferl", "lightning", "torch")


def _defines_class(module_name: str, class_name: str) -> bool:
    """Whether the source of module `module_name` binds `class_name` at its top level (a class, an assignment or an
    import), found and read without executing the module or its packages (importlib's PathFinder, then ast)."""
    search, spec = None, None
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), search)
        if spec is None:
            return False
        search = spec.submodule_search_locations
    if spec.origin is None or not spec.origin.endswith(".py"):
        return False
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8", errors="replace"))
    bound = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return class_name in bound


def import_class(class_path: str, where: str) -> Any:
    """The object `class_path` names, importing its module only when that is safe: the module is already imported,
    lies in `TRUSTED_PACKAGES`, or its source defines the name (`_defines_class`). Else InputError, with nothing
    imported: a recipe naming e.g. `this.Nothing` runs no module."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name or not all(part.isidentifier() for part in class_path.split(".")):
        raise InputError(f"{where}: {class_path!r} is not a dotted class path (e.g. lightning_saferl.actors.BCAll)")
    if not (module_name in sys.modules or module_name.split(".")[0] in TRUSTED_PACKAGES
            or _defines_class(module_name, class_name)):
        raise InputError(f"{where}: no class '{class_name}' found in the source of module '{module_name}' (the "
                         "module was not imported)")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"{where}: cannot import '{class_path}' ({one_line(err)})") from None


def check_class_paths(name: str, config: Any) -> None:
    """Every `class_path` in a stage config (model, callbacks, loggers, ...) names an existing object, found
    without running a module that does not define it (`import_class`); jsonargparse then checks its kind."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "class_path" and isinstance(value, str) and "." in value:  # a bare name: jsonargparse's lookup
                import_class(value, f"stage '{name}'")
            else:
                check_class_paths(name, value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            check_class_paths(name, value)


def model_class(name: str, model: dict) -> type:
    class_path = model.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise InputError(f"stage '{name}': model needs a 'class_path' (e.g. lightning_saferl.actors.BCAll), "
                         f"got {class_path!r}")
    cls = import_class(class_path, f"stage '{name}': model class")
    if not (isinstance(cls, type) and issubclass(cls, SafeRLModule)):
        raise InputError(f"stage '{name}': '{class_path}' is not a lightning_saferl module (SafeRLModule subclass)")
    return cls
