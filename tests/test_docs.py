"""The repository explains itself: docs/ exists, what it names exists, and the code cites only it.

- every ``docs/methods.md`` §N (or §N.M) cited in the code is a heading of docs/methods.md;
- every repository path written in docs/ (``stage1_pro/...``, ``tests/...``, ...) exists;
- every relative Markdown link in docs/ and the README resolves;
- nothing refers to notes outside the repository (a research notes folder, a design document).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Folders whose files may cite docs/methods.md or name files.
SOURCE_FOLDERS = ("stage1_pro", "components", "pipelines", "tests", "bench", "images", "manifests", "schemas")
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".sh", ".toml", ".csv", ".txt"}
#: Top-level folders a repository path in the docs starts with.
REPO_FOLDERS = ("stage1_pro", "components", "pipelines", "schemas", "tests", "bench", "images", "manifests")


def source_files() -> Iterator[Path]:
    """Text files of the repository's own folders (links into the package are not followed)."""
    for folder in SOURCE_FOLDERS:
        for parent, dirs, files in os.walk(ROOT / folder):  # os.walk does not follow links
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(files):
                path = Path(parent, name)
                if not path.is_symlink() and (
                    path.suffix in SOURCE_SUFFIXES or name.startswith("Dockerfile")
                ):
                    yield path
    yield ROOT / "README.md"
    yield ROOT / "pyproject.toml"


def methods_sections() -> set[str]:
    text = (DOCS / "methods.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))


def test_the_docs_exist_and_the_readme_points_to_them() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/architecture.md)" in section and "(docs/methods.md)" in section
    assert {"1", "2", "2.4", "3", "4.3", "5.1", "6", "7", "8"} <= methods_sections()


def test_every_cited_methods_section_exists() -> None:
    sections = methods_sections()
    cited = []
    for path in source_files():
        for match in re.finditer(
            r"docs/methods\.md`{0,2}\s*§\s*(\d+(?:\.\d+)?)", path.read_text(errors="replace")
        ):
            cited.append((path.relative_to(ROOT), match.group(1)))
    assert cited, "the code cites no section of docs/methods.md"
    missing = [f"{path}: §{number}" for path, number in cited if number not in sections]
    assert missing == []


@pytest.mark.parametrize("doc", ["architecture.md", "methods.md"])
def test_every_path_named_in_the_docs_exists(doc: str) -> None:
    text = (DOCS / doc).read_text()
    named = set()
    for code in re.findall(r"`([^`\n]+)`", text):
        for token in re.split(r"[\s,()]+", code):
            if token.split("/", 1)[0] in REPO_FOLDERS and "/" in token:
                named.add(token.rstrip(".:"))
    assert named, f"docs/{doc} names no repository path"
    assert sorted(p for p in named if not any(ROOT.glob(p))) == []  # a pattern (components/*.py) matches


@pytest.mark.parametrize("doc", ["docs/architecture.md", "docs/methods.md", "README.md"])
def test_relative_links_resolve(doc: str) -> None:
    path = ROOT / doc
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" not in target and not (path.parent / target).exists():
            broken.append(target)
    assert broken == []


def test_nothing_refers_to_notes_outside_the_repository() -> None:
    outside = re.compile(r"research/\w+\.md|DESIGN\.md|\bmethods\.md Sec\.")
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path in source_files()
        if path != Path(__file__).resolve()
        for m in outside.finditer(path.read_text(errors="replace"))
    ]
    assert found == []
