"""Validate an artifact (config, splits, thresholds, gateparams, scrcparams, bundle, ...) against
its JSON Schema and print every error with its JSON path.

The kind is read from the file's ``artifact`` field unless ``--kind`` is given. Exit status 0
when valid, 2 when not.
"""

from __future__ import annotations

import argparse

from stage1_pro.schemas import ARTIFACT_KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="artifact files (local paths or gs:// URIs)")
    parser.add_argument(
        "--kind", choices=ARTIFACT_KINDS, help="expected kind (default: the file's 'artifact' field)"
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.errors import ArtifactError

    status = 0
    for uri in args.files:
        try:
            obj = read_artifact(uri, args.kind)
        except ArtifactError as exc:
            print(f"INVALID {exc}")
            status = 2
            continue
        print(f"ok      {uri}: valid {obj['artifact']} artifact (schema {obj.get('schema_version')})")
    return status
