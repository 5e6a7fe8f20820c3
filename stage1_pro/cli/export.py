"""Export a validated run directory as a deployable bundle folder.

The bundle holds bundle.json (written last; sha256 of every file, lineage), config.json,
splits.json, metrics.csv, model_best.pth, model.json, exactly one policy file matching
config.exit_policy, validation.json, the report, the model card and a README with the inference
contract. Refuses a run with zero or several policy files, a policy that does not match the
config, a validation older than the files it judged, or a run that is not blessed (unless
--allow-unblessed, which marks the bundle blessed: false).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory (after validate)")
    parser.add_argument(
        "--out", required=True, metavar="BUNDLE_DIR", help="bundle folder to create (new or empty)"
    )
    parser.add_argument(
        "--allow-unblessed",
        "--allow_unblessed",
        action="store_true",
        help="export a run that failed validation, marked blessed: false (default: refuse)",
    )
    parser.add_argument(
        "--version",
        default=None,
        help="bundle version [A-Za-z0-9._-] (default: UTC time + model sha256 prefix)",
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.bundle import bundle_summary, export_bundle, verify_bundle

    out = export_bundle(args.run, args.out, allow_unblessed=args.allow_unblessed, version=args.version)
    print(f"{out}: {bundle_summary(verify_bundle(out))}")
    return 0
