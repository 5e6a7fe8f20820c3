"""Audit a run's exit policy on the held-out test split and decide whether it is blessed.

Reads config.json, splits.json, scores.npz and the run's one policy file (it must match
config.exit_policy); computes on test FNR_exit with its Clopper-Pearson upper bound, coverage,
FPR_exit, exit accuracy, selective risk, AURC and the risk-coverage curve; writes
validation.json, report.html (or report.md) with the risk-coverage and confusion-matrix figures,
and model_card.md into the run directory.

Blessed iff: the policy is feasible and certified for the run's target_fnr_exit, max_fpr_exit and
delta; the test split does not reject "FNR_exit <= target and FPR_exit <= max_fpr_exit" at
--audit-level (exact one-sided binomial tests; a valid run is refused with probability at most
that level); and, with --champion, coverage >= the champion's coverage on this run's test split -
--champion-tolerance. The audit's power against a true FNR_exit of --audit-effect x target is
printed with the verdict. Test coverage, exit accuracy and the FPR_exit point estimate are
reported against --min-coverage, --min-exit-accuracy and max_fpr_exit as diagnostics; they do not
decide the blessing. Every other policy the run's phase allows is certified on the same val_calib
and reported beside the active one. The champion (a bundle folder, or a registry prefix: its
latest, or PREFIX/VERSION) scores this run's val_select/val_calib/test images with its own
preprocessing (the dataset from --data, default the source recorded in splits.json), its policy is
re-certified on this val_calib for this run's contract, and both are reported side by side. A
registry prefix with nothing published yet (a first run) is recorded and not compared.
(--baseline, which compared coverages recorded on different test sets, was removed.) Exit status 0
when blessed, 1 when not (validation.json is written either way), 2 on bad input.
"""

from __future__ import annotations

import argparse

from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.defaults import DEFAULT_AUDIT_EFFECT, DEFAULT_AUDIT_LEVEL
from stage1_pro.validate import DEFAULT_MIN_COVERAGE, DEFAULT_MIN_EXIT_ACCURACY


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
        "--audit-level", "--audit_level", type=float, default=DEFAULT_AUDIT_LEVEL, metavar="A",
        help=f"level of the test audit: the run is refused when test rejects the certified bounds at A "
        f"(default {DEFAULT_AUDIT_LEVEL})",
    )  # fmt: skip
    parser.add_argument(
        "--audit-effect", "--audit_effect", type=float, default=DEFAULT_AUDIT_EFFECT, metavar="E",
        help=f"report the audit's power against a true FNR_exit of E x target "
        f"(default {DEFAULT_AUDIT_EFFECT})",
    )  # fmt: skip
    parser.add_argument(
        "--min-coverage", "--min_coverage", type=float, default=DEFAULT_MIN_COVERAGE, metavar="X",
        help=f"diagnostic (reported, not blessing): test coverage floor (default {DEFAULT_MIN_COVERAGE})",
    )  # fmt: skip
    parser.add_argument(
        "--min-exit-accuracy", "--min_exit_accuracy", type=float, metavar="Y",
        default=DEFAULT_MIN_EXIT_ACCURACY,
        help=f"diagnostic (reported, not blessing): test exit-accuracy floor "
        f"(default {DEFAULT_MIN_EXIT_ACCURACY})",
    )  # fmt: skip
    parser.add_argument(
        "--champion-tolerance", "--champion_tolerance", type=float, default=DEFAULT_CHAMPION_TOLERANCE,
        metavar="T", help=f"allowed test-coverage drop vs --champion (default {DEFAULT_CHAMPION_TOLERANCE})",
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
    from stage1_pro.cli.options import forwarded_options
    from stage1_pro.validate import validate_run

    v = validate_run(args.run, **forwarded_options(validate_run, args))
    for c in v["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']:<18} {c['message']}")
    for c in v["diagnostics"]:
        print(
            f"{'ok' if c['passed'] else 'LOW':<4}  {c['name']:<18} {c['message']} (diagnostic, not blessing)"
        )
    for row in v["policy_comparison"]:
        if not row["active"]:
            print(f"      compare {row['policy']:<10} {_comparison_text(row)}")
    champion = v.get("champion") or {}
    if champion and "version" not in champion:
        print(f"NOTE  champion {champion['uri']}: {champion['note']}")
    print(f"{'BLESSED' if v['blessed'] else 'NOT BLESSED'}: {args.run}/validation.json, {v['report_file']}")
    return 0 if v["blessed"] else 1


def _comparison_text(row: dict) -> str:
    if row["feasible"] is None:
        return f"not fitted: {row.get('note', '')}"
    if not row["feasible"]:
        return "infeasible on the same val_calib"
    return (
        f"would certify coverage {row['val_calib_coverage']:.4f} on val_calib (FNR_exit bound "
        f"{row['certified_fnr_upper_bound']:.4f}), test coverage {row['test_coverage']:.4f}"
    )
