"""Read and write every JSON artifact, validated against its schema on write and on read.

This is the one place JSON artifacts touch storage. Every artifact carries ``artifact`` (its
kind) and ``schema_version``; :func:`write_artifact` stamps both. Errors name the file, the
JSON path and the reason, e.g.::

    runs/a/thresholds.json: $.certificate.delta: 0.7 is greater than the maximum of 0.5
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from stage1_pro import storage
from stage1_pro.errors import ArtifactError, StorageError
from stage1_pro.layout import (
    BUNDLE_FILE,
    CONFIG_FILE,
    DRIFT_FILE,
    MODEL_INFO_FILE,
    SCORE_REFERENCE_FILE,
    SPLITS_FILE,
    VALIDATION_FILE,
)
from stage1_pro.policy_registry import RegistryMapping, policy_specs
from stage1_pro.schemas import ARTIFACT_KINDS, SCHEMA_VERSION, check_kind, validation_errors

#: The file name of each kind that is not an exit policy's file.
_FILENAMES: dict[str, str] = {
    "config": CONFIG_FILE,
    "splits": SPLITS_FILE,
    "bundle": BUNDLE_FILE,
    "validation": VALIDATION_FILE,
    "latest": "latest",
    "model": MODEL_INFO_FILE,
    "prepared": "index.json",
    "explora": "explora.json",
    "score_reference": SCORE_REFERENCE_FILE,
    "drift": DRIFT_FILE,
}


def _default_filenames() -> Mapping[str, str]:
    policy_files = {spec.artifact_kind: spec.file_name for spec in policy_specs()}
    clash = set(policy_files.values()) & set(_FILENAMES.values())
    if clash:
        raise ValueError(f"exit policy file name(s) {sorted(clash)} clash with stage1-pro's own files")
    return {kind: policy_files.get(kind) or _FILENAMES[kind] for kind in ARTIFACT_KINDS}


#: The file name each artifact kind has inside a run directory or bundle (the exit policies'
#: from the policy registry: a live view).
DEFAULT_FILENAMES: RegistryMapping[str, str] = RegistryMapping(_default_filenames)

#: Exit policy name -> kind of its policy file. Policy files are mutually exclusive.
POLICY_ARTIFACT_KINDS: RegistryMapping[str, str] = RegistryMapping(
    lambda: {spec.name: spec.artifact_kind for spec in policy_specs()}
)


def _kind_or_error(kind: str) -> str:
    try:
        return check_kind(kind)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from exc


def _reject_non_finite(value: Any, where: str = "$") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ArtifactError(
            f"{where}: {value} is not a finite number (JSON artifacts hold finite numbers only)"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{where}[{i}]")


def validate_artifact(obj: Any, kind: str, source: str = "<artifact>") -> None:
    """Raise :class:`ArtifactError` listing every schema violation of ``obj`` as ``kind``."""
    kind = _kind_or_error(kind)
    if isinstance(obj, dict):
        found = obj.get("artifact")
        if found is not None and found != kind and found in ARTIFACT_KINDS:
            raise ArtifactError(
                f"{source}: this is a {found!r} artifact, not {kind!r} "
                f"(pass the {DEFAULT_FILENAMES[kind]} file, or --kind {found})"
            )
    errors = validation_errors(kind, obj)
    if errors:
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        raise ArtifactError(f"{source}: invalid {kind} artifact ({len(errors)} error(s)):\n{lines}")


def detect_kind(obj: Any, source: str = "<artifact>") -> str:
    """Return the kind recorded in an artifact's ``artifact`` field."""
    kind = obj.get("artifact") if isinstance(obj, dict) else None
    if kind not in ARTIFACT_KINDS:
        raise ArtifactError(
            f"{source}: cannot tell the artifact kind (field 'artifact' is {kind!r}); "
            f"pass --kind, one of: {', '.join(ARTIFACT_KINDS)}"
        )
    return kind


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text; raise :class:`ArtifactError` with line/column on malformed input."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if _looks_truncated(text) else ""
        raise ArtifactError(
            f"{source}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{hint}"
        ) from exc


def _looks_truncated(text: str) -> bool:
    """True when ``text`` is empty or stops inside a string or an open ``{``/``[`` (an interrupted write)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return not text.strip() or in_string or depth > 0


def read_artifact(uri: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a JSON artifact from a local path or ``gs://`` URI and validate it.

    Args:
        uri: where the artifact is.
        kind: expected kind; ``None`` takes the kind the file declares.

    Raises:
        ArtifactError: missing/unreadable file, not JSON, wrong kind or schema violations.
    """
    source = str(uri)
    if kind is not None:
        _kind_or_error(kind)
    try:
        text = storage.read_text(source)
    except StorageError as exc:
        raise ArtifactError(str(exc)) from exc
    obj = parse_json(text, source)
    validate_artifact(obj, kind or detect_kind(obj, source), source)
    return obj


def dumps_artifact(obj: dict[str, Any]) -> str:
    """Serialise an artifact deterministically (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def stamp(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """Return a copy of ``obj`` with ``artifact`` and ``schema_version`` set."""
    return {
        **obj,
        "artifact": _kind_or_error(kind),
        "schema_version": obj.get("schema_version", SCHEMA_VERSION),
    }


def write_artifact(uri: str | os.PathLike[str], kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Validate ``obj`` as ``kind`` and write it atomically; return what was written.

    Nothing is written when validation fails.
    """
    target = str(uri)
    full = stamp(obj, kind)
    _reject_non_finite(full)
    validate_artifact(full, kind, target)
    try:
        storage.write_text(target, dumps_artifact(full), content_type="application/json")
    except StorageError as exc:
        raise ArtifactError(str(exc)) from exc
    return full


def is_plain_filename(name: str) -> bool:
    """True for a bare file name (no folder part, not ``.``/``..``): how bundles point at files."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in {".", ".."}
        and PurePosixPath(name).name == name
    )
