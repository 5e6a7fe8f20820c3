"""JSON Schemas: meta-schema, one file per kind, valid examples, and invalid ones with their messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from stage1_pro.artifacts import POLICY_ARTIFACT_KINDS, validate_artifact
from stage1_pro.errors import ArtifactError
from stage1_pro.schemas import ARTIFACT_KINDS, load_schema, schemas_dir, validation_errors

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).parent / "data" / "artifacts"
SCHEMA_FILES = sorted((REPO / "schemas").glob("*.schema.json"))
# The kinds of the foundation issue; kinds added later may bring their own example files.
CORE_KINDS = ("config", "splits", "thresholds", "gateparams", "scrcparams", "bundle")
CLOSED_KINDS = ("thresholds", "gateparams", "scrcparams", "bundle", "splits", "config")


def example(kind: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{kind}.json").read_text())


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schema_passes_meta_schema(path: Path) -> None:
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == f"https://stage1-pro.dev/schemas/{path.name}"


def test_one_schema_file_per_kind() -> None:
    kinds_on_disk = {p.name.removesuffix(".schema.json") for p in SCHEMA_FILES} - {"common"}
    assert kinds_on_disk == set(ARTIFACT_KINDS)
    assert set(CORE_KINDS) <= set(ARTIFACT_KINDS)
    assert set(POLICY_ARTIFACT_KINDS.values()) <= set(ARTIFACT_KINDS)


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_every_kind_is_stamped_and_versioned(kind: str) -> None:
    schema = load_schema(kind)
    assert schema["properties"]["artifact"] == {**schema["properties"]["artifact"], "const": kind}
    assert schema["properties"]["schema_version"]["$ref"] == "common.schema.json#/$defs/schema_version"
    if kind != "config":  # a hand-written config file may omit the stamps
        assert {"artifact", "schema_version"} <= set(schema["required"])


@pytest.mark.parametrize("kind", CLOSED_KINDS)
def test_closed_contracts_forbid_extra_fields(kind: str) -> None:
    assert load_schema(kind)["additionalProperties"] is False


def test_examples_cover_the_core_kinds() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.json")} >= set(CORE_KINDS)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_valid_example(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert validation_errors(path.stem, doc) == []
    validate_artifact(doc, path.stem, str(path))


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


def _del(doc: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    del doc[last]


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()
# (kind, dotted field, new value or DELETE, expected "path: message" fragment)
INVALID = [
    # missing required field
    ("thresholds", "exit_threshold", DELETE, "$: 'exit_threshold' is a required property"),
    ("gateparams", "gate_threshold", DELETE, "$: 'gate_threshold' is a required property"),
    ("scrcparams", "lambda1", DELETE, "$: 'lambda1' is a required property"),
    ("bundle", "policy_file", DELETE, "$: 'policy_file' is a required property"),
    ("splits", "indices", DELETE, "$: 'indices' is a required property"),
    ("thresholds", "certificate.upper_bound", DELETE, "$.certificate: 'upper_bound' is a required property"),
    ("bundle", "lineage.model_version", DELETE, "$.lineage: 'model_version' is a required property"),
    # extra field
    ("thresholds", "target_coverage", 0.9, "$: Additional properties are not allowed ('target_coverage' was"),
    ("gateparams", "threshold", 0.5, "$: Additional properties are not allowed ('threshold' was unexpected)"),
    ("scrcparams", "note", "x", "$: Additional properties are not allowed ('note' was unexpected)"),
    ("bundle", "exit_threshold", 0.9, "$: Additional properties are not allowed ('exit_threshold' was"),
    ("splits", "fractions.holdout", 0.1, "$.fractions: Additional properties are not allowed ('holdout' was"),
    (
        "config",
        "learning_rate",
        0.1,
        "$: Additional properties are not allowed ('learning_rate' was unexpected)",
    ),
    (
        "thresholds",
        "certificate.alpha",
        0.1,
        "$.certificate: Additional properties are not allowed ('alpha' was",
    ),
    # bad enum / const
    ("thresholds", "certificate.procedure", "magic", "$.certificate.procedure: 'magic' is not one of ["),
    ("thresholds", "policy", "gate", "$.policy: 'softmax' was expected"),
    (
        "gateparams",
        "calibrator_type",
        "beta",
        "$.calibrator_type: 'beta' is not one of ['platt', 'isotonic']",
    ),
    (
        "scrcparams",
        "scrc_variant",
        "SCRC-X",
        "$.scrc_variant: 'SCRC-X' is not one of ['pareto', 'SCRC-I', 'SCRC-T']",
    ),
    (
        "bundle",
        "active_exit_policy",
        "magic",
        "$.active_exit_policy: 'magic' is not one of ['softmax', 'gate', 'scrc']",
    ),
    ("bundle", "active_exit_policy", "gate", "$.policy_file: 'gateparams.json' was expected"),
    (
        "config",
        "exit_policy",
        "threshold",
        "$.exit_policy: 'threshold' is not one of ['softmax', 'gate', 'scrc']",
    ),
    # out of range / wrong format
    ("thresholds", "delta", 0.7, "$.delta: 0.7 is greater than the maximum of 0.5"),
    ("thresholds", "target_fnr_exit", 0.2, "$.target_fnr_exit: 0.2 is greater than the maximum of 0.1"),
    ("thresholds", "target_fnr_exit", 0, "$.target_fnr_exit: 0 is less than or equal to the minimum of 0"),
    ("thresholds", "coverage", 1.5, "$.coverage: 1.5 is greater than the maximum of 1"),
    ("thresholds", "certificate.k", -1, "$.certificate.k: -1 is less than the minimum of 0"),
    ("gateparams", "gate_threshold", -0.1, "$.gate_threshold: -0.1 is less than the minimum of 0"),
    ("scrcparams", "lambda2", 1.5, "$.lambda2: 1.5 is greater than the maximum of 1"),
    ("splits", "fractions.train", 1.5, "$.fractions.train: 1.5 is greater than the maximum of 1"),
    ("splits", "seed", -1, "$.seed: -1 is less than the minimum of 0"),
    ("splits", "dataset.fingerprint", "abc", "$.dataset.fingerprint: 'abc' does not match"),
    ("config", "phase", 7, "$.phase: 7 is greater than the maximum of 6"),
    ("bundle", "created_at", "yesterday", "$.created_at: 'yesterday' is not a 'date-time'"),
    ("bundle", "schema_version", "2.0", "$.schema_version: '2.0' does not match"),
    # bundle pointers must be plain file names
    ("bundle", "model_file", "../model_best.pth", "$.model_file: '../model_best.pth' does not match"),
    ("bundle", "splits_file", "sub/splits.json", "$.splits_file: 'sub/splits.json' does not match"),
    ("bundle", "config_file", "..", "$.config_file: '..' does not match"),
    ("bundle", "metrics_file", "..\\metrics.csv", "$.metrics_file: '..\\\\metrics.csv' does not match"),
    ("bundle", "files.../x.pth", "1" * 64, "$.files: '../x.pth' does not match"),
    ("bundle", "files.model_best.pth", "not-a-sha", "$.files.model_best.pth: 'not-a-sha' does not match"),
]


@pytest.mark.parametrize(("kind", "field", "value", "expected"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_artifact_message(kind: str, field: str, value: Any, expected: str) -> None:
    doc = copy.deepcopy(example(kind))
    if field.startswith("files."):  # file names contain dots
        name = field.removeprefix("files.")
        doc["files"][name] = value
    elif value is DELETE:
        _del(doc, field)
    else:
        _set(doc, field, value)
    with pytest.raises(ArtifactError) as info:
        validate_artifact(doc, kind, f"run/{kind}.json")
    message = str(info.value)
    assert message.startswith(f"run/{kind}.json: invalid {kind} artifact")
    assert expected in message, message


def test_all_errors_reported_with_paths() -> None:
    doc = example("thresholds")
    doc["delta"] = 0.9
    doc["coverage"] = -1
    del doc["feasible"]
    errors = validation_errors("thresholds", doc)
    assert [path for path, _ in errors] == ["$", "$.coverage", "$.delta"]
    with pytest.raises(ArtifactError, match=r"\(3 error\(s\)\)"):
        validate_artifact(doc, "thresholds")


def test_wrong_kind_named() -> None:
    with pytest.raises(ArtifactError, match=r"this is a 'gateparams' artifact, not 'thresholds'"):
        validate_artifact(example("gateparams"), "thresholds", "gateparams.json")


def test_unknown_kind() -> None:
    with pytest.raises(
        ArtifactError, match=r"unknown artifact kind 'threshold'; allowed kinds: config, splits"
    ):
        validate_artifact({}, "threshold")


def test_schemas_dir_is_the_repository_folder_in_a_checkout() -> None:
    assert schemas_dir().resolve() == (REPO / "schemas").resolve()
