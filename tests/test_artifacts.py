"""Validated artifact I/O (local): round trips, atomic writes, and every bad-input message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stage1_pro.artifacts import (
    DEFAULT_FILENAMES,
    POLICY_ARTIFACT_KINDS,
    detect_kind,
    dumps_artifact,
    is_plain_filename,
    read_artifact,
    write_artifact,
)
from stage1_pro.errors import ArtifactError
from stage1_pro.schemas import ARTIFACT_KINDS, SCHEMA_VERSION

EXAMPLES = Path(__file__).parent / "data" / "artifacts"


def example(kind: str) -> dict:
    doc = json.loads((EXAMPLES / f"{kind}.json").read_text())
    doc.pop("artifact")
    doc.pop("schema_version")
    return doc


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kind", ["config", "splits", "thresholds", "gateparams", "scrcparams", "bundle"])
def test_round_trip(tmp_path: Path, kind: str) -> None:
    path = tmp_path / DEFAULT_FILENAMES[kind]
    written = write_artifact(path, kind, example(kind))
    assert written["artifact"] == kind and written["schema_version"] == SCHEMA_VERSION
    assert read_artifact(path, kind) == written
    assert read_artifact(path) == written  # kind taken from the file
    assert path.read_text() == dumps_artifact(written)
    assert _listing(tmp_path) == [path.name]  # no temporary file left behind


def test_serialisation_is_deterministic() -> None:
    a = dumps_artifact({"b": 1, "a": [1, 2], "c": {"y": 0.5, "x": None}})
    b = dumps_artifact({"c": {"x": None, "y": 0.5}, "a": [1, 2], "b": 1})
    assert a == b and a.endswith("\n") and a.index('"a"') < a.index('"b"')


def test_invalid_write_writes_nothing(tmp_path: Path) -> None:
    doc = example("thresholds")
    doc["delta"] = 0.9
    path = tmp_path / "thresholds.json"
    with pytest.raises(
        ArtifactError, match=r"(?s)thresholds.json: invalid thresholds artifact .*\$\.delta: 0.9 is greater"
    ):
        write_artifact(path, "thresholds", doc)
    assert _listing(tmp_path) == []


def test_invalid_write_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    write_artifact(path, "thresholds", example("thresholds"))
    before = path.read_bytes()
    bad = example("thresholds")
    del bad["certificate"]
    with pytest.raises(ArtifactError, match=r"\$: 'certificate' is a required property"):
        write_artifact(path, "thresholds", bad)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["thresholds.json"]


def test_non_finite_numbers_rejected(tmp_path: Path) -> None:
    doc = example("thresholds")
    doc["sweep_results"][0]["coverage"] = float("nan")
    with pytest.raises(ArtifactError, match=r"\$\.sweep_results\[0\]\.coverage: nan is not a finite number"):
        write_artifact(tmp_path / "t.json", "thresholds", doc)
    assert _listing(tmp_path) == []


def test_wrong_kind_gateparams_passed_as_thresholds(tmp_path: Path) -> None:
    path = tmp_path / "gateparams.json"
    write_artifact(path, "gateparams", example("gateparams"))
    with pytest.raises(ArtifactError) as info:
        read_artifact(path, "thresholds")
    assert str(info.value) == (
        f"{path}: this is a 'gateparams' artifact, not 'thresholds' "
        "(pass the thresholds.json file, or --kind gateparams)"
    )


def test_wrong_kind_on_write(tmp_path: Path) -> None:
    doc = {**example("gateparams"), "artifact": "gateparams"}
    with pytest.raises(
        ArtifactError, match=r"this is a 'gateparams' artifact, not 'thresholds'|invalid thresholds"
    ):
        write_artifact(tmp_path / "thresholds.json", "thresholds", doc)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"artifact": "thresholds", "policy": "softmax", "exit_thr',
            r"not valid JSON at line 1 column 49: Unterminated string.*\(the file looks truncated\)$",
        ),
        ("", r"not valid JSON at line 1 column 1: Expecting value \(the file looks truncated\)"),
        ("exit_threshold: 0.9\n", r"not valid JSON at line 1 column 1: Expecting value$"),
        ("{'artifact': 'thresholds'}", r"not valid JSON at line 1 column 2: Expecting property name"),
    ],
    ids=["truncated", "empty", "yaml", "python-dict"],
)
def test_truncated_or_non_json(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=rf"^{path}: " + message):
        read_artifact(path, "thresholds")


def test_truncated_real_artifact(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    write_artifact(path, "bundle", example("bundle"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"not valid JSON .*\(the file looks truncated\)"):
        read_artifact(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"nope.json: file not found"):
        read_artifact(tmp_path / "nope.json", "splits")


@pytest.mark.parametrize("kind", ["threshold", "policy", ""])
def test_unknown_kind(tmp_path: Path, kind: str) -> None:
    with pytest.raises(
        ArtifactError, match=rf"unknown artifact kind {kind!r}; allowed kinds: {', '.join(ARTIFACT_KINDS)}"
    ):
        read_artifact(tmp_path / "x.json", kind)
    with pytest.raises(ArtifactError, match=r"unknown artifact kind"):
        write_artifact(tmp_path / "x.json", kind, {})
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("doc", [{"artifact": "weights"}, {"policy": "softmax"}, [1, 2]], ids=str)
def test_undetectable_kind(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ArtifactError, match=r"a.json: cannot tell the artifact kind .*pass --kind, one of: config"
    ):
        read_artifact(path)
    with pytest.raises(ArtifactError, match=r"cannot tell"):
        detect_kind(doc, "a.json")


def test_newer_minor_schema_version_is_read_major_is_not(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    write_artifact(path, "splits", {**example("splits"), "schema_version": "1.3"})
    assert read_artifact(path)["schema_version"] == "1.3"
    doc = json.loads(path.read_text())
    doc["schema_version"] = "2.0"
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"\$\.schema_version: '2.0' does not match"):
        read_artifact(path)


def test_policy_kinds_and_filenames() -> None:
    assert POLICY_ARTIFACT_KINDS == {"softmax": "thresholds", "gate": "gateparams", "scrc": "scrcparams"}
    assert set(DEFAULT_FILENAMES) == set(ARTIFACT_KINDS)
    assert {DEFAULT_FILENAMES[k] for k in POLICY_ARTIFACT_KINDS.values()} == {
        "thresholds.json",
        "gateparams.json",
        "scrcparams.json",
    }


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("model_best.pth", True),
        ("thresholds.json", True),
        (".hidden", True),
        ("", False),
        (".", False),
        ("..", False),
        ("../model.pth", False),
        ("a/b.json", False),
        ("/etc/passwd", False),
        ("..\\x.pth", False),
    ],
)
def test_is_plain_filename(name: str, plain: bool) -> None:
    assert is_plain_filename(name) is plain
