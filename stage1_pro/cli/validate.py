"""Audit a run's exit policy on the held-out test split and decide whether it is blessed.

Reads config.json, splits.json, scores.npz and the run's one policy file (it must match
config.exit_policy); computes on test FNR_exit with its Clopper-Pearson upper bound, coverage,
FPR_exit, exit accuracy, selective risk, AURC and the risk-coverage curve; writes
validation.json, report.html (or report.md) with the risk-coverage and confusion-matrix figures,
and model_card.md into the run directory.

Blessed iff: the policy is feasible and certified for the run's target/delta; the test FNR_exit
point estimate is <= target_fnr_exit (or its upper bound, with --fnr-rule upper_bound);
coverage >= --min-coverage; exit accuracy >= --min-exit-accuracy; FPR_exit <= --max-fpr-exit
(so exit-everything-as-positive cannot pass); and, with --champion, coverage >= the champion's
coverage on this run's test split - --champion-tolerance. The champion (a bundle folder, or a
registry prefix: its latest, or PREFIX/VERSION) scores this run's val_select/val_calib/test images
with its own preprocessing (the dataset from --data, default the source recorded in
splits.json), its policy is re-certified on this val_calib at this run's target and delta, and
both are reported side by side. A registry prefix with nothing published yet (a first run) is
recorded and not compared. (--baseline, which compared coverages recorded on different test
sets, was removed.) Exit status 0 when blessed, 1 when not (validation.json is written either
way), 2 on bad input.
"""

from __future__ import annotations

import argparse

from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.validate import (
    DEFAULT_MAX_FPR_EXIT,
    DEFAULT_MIN_COVERAGE,
    DEFAULT_MIN_EXIT_ACCURACY,
    FNR_RULES,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory")
    parser.add_argument(
        "--policy-file", "--policy_file", metavar="FILE", help="policy file to audit (default: the run's one)"
    )
    parser.add_argument(
        "--champion", metavar="BUNDLE_DIR_OR_gs://PREFIX[/latest|/VERSION]",
        help="the model in production: re-scored on this run's data and compared on the same test split",
    )  # fmt: skip
    parser.add_argument(
        "--data", metavar="MANIFEST_OR_FOLDER",
        help="this run's dataset, for the champion to score (default: the source in splits.json)",
    )  # fmt: skip
    parser.add_argument("--baseline", help=argparse.SUPPRESS)  # removed: a clear error, not 'unrecognized'

    parser.add_argument(
        "--min-coverage", "--min_coverage", type=float, default=DEFAULT_MIN_COVERAGE, metavar="X",
        help=f"test coverage floor (default {DEFAULT_MIN_COVERAGE})",
    )  # fmt: skip
    parser.add_argument(
        "--min-exit-accuracy", "--min_exit_accuracy", type=float, metavar="Y",
        default=DEFAULT_MIN_EXIT_ACCURACY,
        help=f"test exit-accuracy floor (default {DEFAULT_MIN_EXIT_ACCURACY})",
    )  # fmt: skip
    parser.add_argument(
        "--max-fpr-exit", "--max_fpr_exit", type=float, default=DEFAULT_MAX_FPR_EXIT, metavar="Z",
        help=f"test FPR_exit ceiling (default {DEFAULT_MAX_FPR_EXIT})",
    )  # fmt: skip
    parser.add_argument(
        "--champion-tolerance", "--champion_tolerance", type=float, default=DEFAULT_CHAMPION_TOLERANCE,
        metavar="T", help=f"allowed test-coverage drop vs --champion (default {DEFAULT_CHAMPION_TOLERANCE})",
    )  # fmt: skip
    parser.add_argument(
        "--fnr-rule", "--fnr_rule", choices=FNR_RULES, default="point_estimate",
        help="test FNR_exit must be <= target as a point estimate (default) or as its upper bound",
    )  # fmt: skip
    parser.add_argument(
        "--report-format",
        "--report_format",
        choices=("html", "md"),
        default="html",
        help="report format (html)",
    )
    parser.add_argument(
        "--batch-size", "--batch_size", type=int, default=64, metavar="N",
        help="images per forward pass when the champion scores (64)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device the champion scores on (cpu)")


def run(args: argparse.Namespace) -> int:
    from stage1_pro.validate import validate_run

    v = validate_run(
        args.run,
        policy_file=args.policy_file,
        champion=args.champion,
        min_coverage=args.min_coverage,
        min_exit_accuracy=args.min_exit_accuracy,
        max_fpr_exit=args.max_fpr_exit,
        champion_tolerance=args.champion_tolerance,
        fnr_rule=args.fnr_rule,
        report_format=args.report_format,
        data=args.data,
        batch_size=args.batch_size,
        device=args.device,
        baseline=args.baseline,
    )
    for c in v["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']:<18} {c['message']}")
    champion = v.get("champion") or {}
    if champion and "version" not in champion:
        print(f"NOTE  champion {champion['uri']}: {champion['note']}")
    print(f"{'BLESSED' if v['blessed'] else 'NOT BLESSED'}: {args.run}/validation.json, {v['report_file']}")
    return 0 if v["blessed"] else 1
