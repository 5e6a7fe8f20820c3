"""The JSON Schemas of every artifact, loaded from the single source in ``schemas/``.

The wheel ships them as ``stage1_pro/json_schemas/*.schema.json``; in a checkout that folder is
a link to the repository's top-level ``schemas/``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

#: Artifact kinds, each with ``schemas/<kind>.schema.json``. The one list of kinds.
ARTIFACT_KINDS: tuple[str, ...] = (
    "config",
    "splits",
    "thresholds",
    "gateparams",
    "scrcparams",
    "bundle",
    "validation",
    "latest",
    "model",
    "prepared",
    "explora",
)

#: Version written into every artifact this release produces (``schema_version``).
SCHEMA_VERSION = "1.0"

# Keywords a (sub)schema uses to replace jsonschema's generic message with one that says what
# to do: why a property is forbidden (a removed setting), or a rule such as the phase/policy matrix.
_REMOVED_KEYWORD = "x-removed-message"
_MESSAGE_KEYWORD = "x-message"


def schemas_dir() -> Path:
    """The folder holding ``<kind>.schema.json``: ``stage1_pro/json_schemas``.

    In a wheel it holds copies of the repository's ``schemas/``; in a checkout it is a link to it.
    """
    folder = Path(__file__).resolve().parent / "json_schemas"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"stage1-pro's JSON Schemas were not found in {folder}; reinstall the package "
            "(a checkout needs the link stage1_pro/json_schemas -> ../schemas)"
        )
    return folder


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a known artifact kind, else raise ``ValueError`` listing them."""
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; allowed kinds: {', '.join(ARTIFACT_KINDS)}")
    return kind


@functools.cache
def load_schema(kind: str) -> dict[str, Any]:
    """Load and return the schema of ``kind`` (cached)."""
    path = schemas_dir() / f"{check_kind(kind)}.schema.json"
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


@functools.cache
def _registry() -> referencing.Registry:
    """All schemas of the folder (shared ``common.schema.json`` included), by their ``$id``."""
    resources_ = []
    for path in sorted(schemas_dir().glob("*.schema.json")):
        with path.open(encoding="utf-8") as fh:
            contents = json.load(fh)
        resource = referencing.Resource.from_contents(contents, default_specification=DRAFT202012)
        resources_.append((contents["$id"], resource))
    return referencing.Registry().with_resources(resources_)


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = load_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=_registry(), format_checker=cls.FORMAT_CHECKER)


def json_path(error: jsonschema.ValidationError) -> str:
    """Render the location of a validation error as a JSON path (``$.a.b[0]``)."""
    out = "$"
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _message(error: jsonschema.ValidationError) -> str:
    if not isinstance(error.schema, dict):
        return error.message
    custom = error.schema.get(_REMOVED_KEYWORD) or error.schema.get(_MESSAGE_KEYWORD)
    return (
        f"{error.instance!r}: {custom}"
        if custom and _MESSAGE_KEYWORD in error.schema
        else custom or error.message
    )


def validation_errors(kind: str, instance: Any) -> list[tuple[str, str]]:
    """Return every schema violation of ``instance`` as ``(json_path, message)``, sorted by path."""
    errors = sorted(
        _validator(kind).iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    )
    return [(json_path(e), _message(e)) for e in errors]
