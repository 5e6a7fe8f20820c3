"""The import rules ``lint-imports`` cannot see: no private name crosses a package.

``lint-imports`` (pyproject's ``[tool.importlinter]``) keeps the layers (library <- components <-
pipelines <- cli), the library acyclic and private *modules* inside their package. A private
*name* (``from stage1_pro.cli.train import _worker``) is checked here: a name starting with ``_``
is imported only inside the package that defines it.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import stage1_pro

PACKAGE_ROOT = Path(stage1_pro.__file__).parent


def python_files() -> Iterator[Path]:
    """Every module of the package, through the links to components/ and pipelines/."""
    for folder, _, files in os.walk(PACKAGE_ROOT, followlinks=True):
        yield from (Path(folder, f) for f in sorted(files) if f.endswith(".py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str) -> str:
    """``stage1_pro.<first level>``: the unit a private name must not leave."""
    return ".".join(module.split(".")[:2])


def private_imports_across_packages() -> list[str]:
    found = []
    for path in python_files():
        if "scripts" in path.relative_to(PACKAGE_ROOT).parts:
            continue
        importer = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                not isinstance(node, ast.ImportFrom)
                or node.level
                or not (node.module or "").startswith("stage1_pro")
            ):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and _package_of(node.module) != _package_of(importer):
                    found.append(f"{importer}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def test_no_private_name_is_imported_from_another_package() -> None:
    assert private_imports_across_packages() == []


def test_the_check_sees_the_linked_folders() -> None:
    modules = {_module_name(p) for p in python_files()}
    assert {"stage1_pro.components.train", "stage1_pro.pipelines.pipeline", "stage1_pro.cli.train"} <= modules
