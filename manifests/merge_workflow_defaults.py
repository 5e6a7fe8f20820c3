#!/usr/bin/env python3
"""Merge settings into Argo's ``workflowDefaults`` without wiping what Kubeflow Pipelines put there.

The workflow controller's ConfigMap holds ``workflowDefaults`` as one YAML *string*. A
``kubectl patch --type merge`` of that key replaces the whole string, and with it KFP's own
defaults (KFP 2.17 ships ``spec.ttlStrategy`` and ``spec.templateDefaults.retryStrategy`` there).
This filter reads the ConfigMap (``kubectl get -o yaml`` or ``-o json``) on stdin, deep-merges the
``--merge`` fragment into the parsed ``workflowDefaults`` (mappings merge key by key; any other
value in the fragment replaces the old one) and writes the ConfigMap on stdout. It keeps
``metadata.resourceVersion``, so ``kubectl replace`` refuses to write if the ConfigMap changed in
between. Every changed key is reported on stderr::

    kubectl -n kubeflow get configmap workflow-controller-configmap -o yaml \\
      | python3 manifests/merge_workflow_defaults.py \\
          --merge 'spec: {podPriorityClassName: stage1-pro-training}' \\
      | kubectl replace -f -

Needs only Python 3 and PyYAML. Exit status 2, with the reason, on input it cannot merge.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

KEY = "workflowDefaults"


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's embedded YAML documents) as readable blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


class MergeError(Exception):
    """Input this filter cannot merge: the message says what and how to fix it."""


def deep_merge(base: dict[str, Any], fragment: dict[str, Any], path: str = "") -> list[str]:
    """Merge ``fragment`` into ``base`` in place; return one line per changed key.

    Args:
        base: the parsed ``workflowDefaults`` (changed in place).
        fragment: the settings to merge in.
        path: dotted prefix of ``base`` in the whole document (for the report).

    Returns:
        ``"path: old -> new"`` for each value that changed or was added.
    """
    changes = []
    for key, value in fragment.items():
        here = f"{path}.{key}" if path else str(key)
        old = base.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            changes += deep_merge(old, value, here)
        elif old != value:
            base[key] = value
            changes.append(f"{here}: {json.dumps(old)} -> {json.dumps(value)}")
    return changes


def merge_configmap(configmap: Any, fragment: Any) -> tuple[dict[str, Any], list[str]]:
    """The ConfigMap with ``fragment`` merged into its ``workflowDefaults``, and the changes.

    Raises:
        MergeError: the input is not a ConfigMap, its ``workflowDefaults`` is not a YAML mapping,
            or the fragment is not a mapping.
    """
    if not isinstance(configmap, dict) or configmap.get("kind") != "ConfigMap":
        kind = configmap.get("kind") if isinstance(configmap, dict) else type(configmap).__name__
        raise MergeError(
            f"stdin is not a ConfigMap (kind: {kind}); pipe in "
            "'kubectl -n kubeflow get configmap workflow-controller-configmap -o yaml'"
        )
    if not isinstance(fragment, dict):
        raise MergeError(f"--merge must be a YAML mapping such as 'spec: {{...}}', not {fragment!r}")
    data = configmap.setdefault("data", {}) or {}
    configmap["data"] = data
    try:
        defaults = yaml.safe_load(data.get(KEY) or "") or {}
    except yaml.YAMLError as exc:
        raise MergeError(f"data.{KEY} of the ConfigMap is not valid YAML: {exc}") from None
    if not isinstance(defaults, dict):
        raise MergeError(f"data.{KEY} of the ConfigMap is not a YAML mapping: {defaults!r}")
    changes = deep_merge(defaults, fragment)
    data[KEY] = yaml.dump(defaults, Dumper=_BlockDumper, sort_keys=False)
    return configmap, changes


def main(argv: list[str] | None = None) -> int:
    """Read the ConfigMap on stdin, write the merged one on stdout; return the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for the full pipeline."
    )
    parser.add_argument(
        "--merge",
        required=True,
        metavar="YAML",
        help="mapping to deep-merge, e.g. 'spec: {podPriorityClassName: X}'",
    )
    args = parser.parse_args(argv)
    try:
        text = sys.stdin.read()
        if not text.strip():
            raise MergeError("nothing on stdin: pipe in the ConfigMap from 'kubectl get ... -o yaml'")
        try:
            fragment = yaml.safe_load(args.merge)
        except yaml.YAMLError as exc:
            raise MergeError(f"--merge is not valid YAML: {exc}") from None
        try:
            configmap = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MergeError(f"stdin is not YAML or JSON: {exc}") from None
        merged, changes = merge_configmap(configmap, fragment)
    except MergeError as exc:
        print(f"merge_workflow_defaults: error: {exc}", file=sys.stderr)
        return 2
    for change in changes or ["nothing to change: the settings are already there"]:
        print(f"merge_workflow_defaults: {change}", file=sys.stderr)
    yaml.dump(merged, sys.stdout, Dumper=_BlockDumper, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
