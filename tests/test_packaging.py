"""What the distribution installs: one import root, ``stage1_pro``, holding the repository's folders.

The repository keeps ``components/``, ``pipelines/`` and ``schemas/`` as top-level folders (the
design's layout) and links them into the package as ``stage1_pro/components``,
``stage1_pro/pipelines`` and ``stage1_pro/json_schemas``: the wheel installs one import root,
``stage1_pro``, and nothing with a generic name (``components``, ``pipelines``) lands in a user's
site-packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_LINKS = {"components": "components", "pipelines": "pipelines", "json_schemas": "schemas"}


def package_folders() -> set[str]:
    """Every package of the checkout under stage1_pro/ (through the links), as wheel paths."""
    found = set()
    for folder, _, files in os.walk(REPO / "stage1_pro", followlinks=True):
        if "__init__.py" in files:
            found.add(Path(folder).relative_to(REPO).as_posix())
    return found


def test_the_design_folders_are_linked_into_the_import_root() -> None:
    for link, target in PACKAGE_LINKS.items():
        path = REPO / "stage1_pro" / link
        assert path.is_symlink() and path.resolve() == REPO / target, f"stage1_pro/{link} -> ../{target}"
    assert {"stage1_pro/components", "stage1_pro/pipelines"} <= package_folders()


def test_the_editable_install_imports_the_folders_under_stage1_pro() -> None:
    import stage1_pro.components.base as components_base
    import stage1_pro.pipelines.pipeline as pipeline

    assert Path(components_base.__file__).resolve() == REPO / "components" / "base.py"
    assert Path(pipeline.__file__).resolve() == REPO / "pipelines" / "pipeline.py"
    # From outside the checkout the generic names are not importable.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; print(u.find_spec('components'), u.find_spec('pipelines'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert probe.stdout.split() == ["None", "None"]


@pytest.mark.slow
def test_the_wheel_holds_one_import_root_and_the_schemas(built_wheel: Path, tmp_path: Path) -> None:
    from stage1_pro.schemas import ARTIFACT_KINDS

    with zipfile.ZipFile(built_wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"stage1_pro"}
    for package in package_folders():
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    for kind in (*ARTIFACT_KINDS, "common"):
        assert f"stage1_pro/json_schemas/{kind}.schema.json" in names, kind
    for module in ("components/image.py", "pipelines/pipeline.py", "cluster.py", "scripts/20_train.py"):
        assert f"stage1_pro/{module}" in names, module
    # The installed package finds its schemas inside itself (not in a checkout).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from stage1_pro.schemas import ARTIFACT_KINDS, load_schema, schemas_dir;"
        "[load_schema(k) for k in ARTIFACT_KINDS]; print(schemas_dir())"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path / "site")],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert Path(out.stdout.strip()) == tmp_path / "site" / "stage1_pro" / "json_schemas"
