"""The JSON Schemas of every artifact, loaded from the single source in ``schemas/``.

The wheel ships them as ``stage1_pro/json_schemas/*.schema.json``; in a checkout that folder is
a link to the repository's top-level ``schemas/``. An exit policy's kind and schema come from the
policy registry (:mod:`stage1_pro.policy_registry`): the built-in policies' schemas are files
here, a policy registered at run time may bring its schema as a dict. The parts of the config,
bundle and validation schemas that list policies are generated from the registry
(:mod:`stage1_pro.policy_schemas`) whenever a schema is loaded; ``python -m stage1_pro.schemas``
rewrites the committed files from it (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

from stage1_pro.policy_registry import RegistrySequence, policy_specs, registry_generation, spec_for_kind
from stage1_pro.policy_schemas import GENERATED_KINDS, apply_policy_facts

#: The kinds before and after the exit policies' kinds in :data:`ARTIFACT_KINDS`.
_KINDS_BEFORE_POLICIES: tuple[str, ...] = ("config", "splits")
_KINDS_AFTER_POLICIES: tuple[str, ...] = (
    "bundle",
    "validation",
    "latest",
    "model",
    "prepared",
    "explora",
    "score_reference",
    "drift",
)


def _artifact_kinds() -> tuple[str, ...]:
    policy_kinds = tuple(spec.artifact_kind for spec in policy_specs())
    clash = set(policy_kinds) & {*_KINDS_BEFORE_POLICIES, *_KINDS_AFTER_POLICIES}
    if clash:
        raise ValueError(f"exit policy artifact kind(s) {sorted(clash)} clash with stage1-pro's own kinds")
    return (*_KINDS_BEFORE_POLICIES, *policy_kinds, *_KINDS_AFTER_POLICIES)


#: Artifact kinds, each with a schema: the one list of kinds (the exit policies' kinds are those
#: registered, so a live view).
ARTIFACT_KINDS: RegistrySequence[str] = RegistrySequence(_artifact_kinds)

#: The shared definitions every schema refers to (``common.schema.json``).
COMMON = "common"

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


def load_schema(kind: str) -> dict[str, Any]:
    """The schema of ``kind``, with its policy parts generated from the registry (cached)."""
    return _load_schema(check_kind(kind), registry_generation())


def _read(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _base_uri() -> str:
    """``https://.../schemas/``: the folder every schema's ``$id`` (and relative ``$ref``) is in."""
    return _read(schemas_dir() / f"{COMMON}.schema.json")["$id"].rsplit("/", 1)[0] + "/"


@functools.cache
def _load_schema(kind: str, generation: int) -> dict[str, Any]:
    spec = spec_for_kind(kind)
    if spec is not None and spec.schema is not None:
        schema = copy.deepcopy(dict(spec.schema))
        # its $refs to common.schema.json resolve against its $id, which sits beside the others
        schema.setdefault("$id", f"{_base_uri()}{kind}.schema.json")
        return schema
    return apply_policy_facts(kind, _read(schemas_dir() / f"{kind}.schema.json"))


@functools.cache
def _registry(generation: int) -> referencing.Registry:
    """All schemas (shared ``common.schema.json`` included) by their ``$id``."""
    docs = {
        path.name.removesuffix(".schema.json"): _read(path)
        for path in sorted(schemas_dir().glob("*.schema.json"))
    }
    docs.update({kind: load_schema(kind) for kind in ARTIFACT_KINDS})
    resources = [
        (doc["$id"], referencing.Resource.from_contents(doc, default_specification=DRAFT202012))
        for doc in docs.values()
    ]
    return referencing.Registry().with_resources(resources)


@functools.cache
def _validator(kind: str, generation: int) -> jsonschema.protocols.Validator:
    schema = load_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=_registry(generation), format_checker=cls.FORMAT_CHECKER)


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
    validator = _validator(check_kind(kind), registry_generation())
    errors = sorted(
        validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    )
    return [(json_path(e), _message(e)) for e in errors]


# ------------------------------------------------------------------------------------------
# the committed files' generated parts


def render_schema(kind: str) -> str:
    """The text ``schemas/<kind>.schema.json`` should have: the file with its generated parts."""
    doc = apply_policy_facts(kind, _read(schemas_dir() / f"{kind}.schema.json"))
    return json.dumps(doc, indent=2) + "\n"


def stale_schema_files() -> list[Path]:
    """The schema files whose policy parts differ from what the registry generates."""
    paths = [(schemas_dir() / f"{kind}.schema.json").resolve() for kind in GENERATED_KINDS]
    return [p for p in paths if p.read_text(encoding="utf-8") != render_schema(p.name.split(".")[0])]


REGENERATE_COMMAND = "python -m stage1_pro.schemas"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stage1_pro.schemas [--check]``: rewrite (or compare) the generated schema parts."""
    parser = argparse.ArgumentParser(
        prog=REGENERATE_COMMAND,
        description="Write the exit-policy parts of schemas/{config,bundle,validation,score_reference,drift}"
        ".schema.json "
        "from the policy registry (run it in a checkout after registering a built-in policy).",
    )
    parser.add_argument("--check", action="store_true", help="only list stale files; exit 1 if any")
    args = parser.parse_args(argv)
    stale = stale_schema_files()
    for path in stale:
        if args.check:
            print(f"stale: {path} (regenerate with '{REGENERATE_COMMAND}')", file=sys.stderr)
        else:
            path.write_text(render_schema(path.name.split(".")[0]), encoding="utf-8")
            print(f"wrote {path}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
