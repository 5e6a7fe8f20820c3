"""Are new images still like the ones the bundle was certified on? A label-free two-sample check.

Scores the new images (a manifest, labels optional and ignored, or a folder of images; local or
gs://) with the bundle's own preprocessing, model and policy, and tests them against the
val_calib score reference the bundle carries: Kolmogorov-Smirnov on the exit score and on
p(positive), Fisher's exact test on the exit rate, Bonferroni-combined so that the false-alarm
rate is at most --level. Prints the verdict, the three tests and how many images it takes to
detect a shift of --shift (KS distance; an exit-rate change of that size is one) with probability
--power; writes drift.json, drift.png (reference vs new distributions) and drift.html to --out.

Exit status: 0 consistent, 3 drift detected, 2 bad input (no such bundle or data, a bundle
without a score reference, an unreadable image without --skip-bad, a setting out of range).
It cannot see concept drift (labels changing meaning on the same images) or a shift the model's
outputs do not reflect: see the README, "Drift".
"""

from __future__ import annotations

import argparse

from stage1_pro.exchangeability import DEFAULT_DRIFT_LEVEL, DEFAULT_POWER, DEFAULT_SHIFT

#: Exit status when drift is detected (0: consistent, 2: bad input).
EXIT_DRIFT = 3
DEFAULT_OUT = "drift"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        required=True,
        metavar="BUNDLE",
        help="bundle folder, or registry PREFIX[/latest|/VERSION]",
    )
    parser.add_argument(
        "--data", required=True, metavar="MANIFEST_OR_FOLDER", help="the new images (labels not needed)"
    )
    parser.add_argument(
        "--level", type=float, default=DEFAULT_DRIFT_LEVEL, metavar="L",
        help=f"false-alarm rate of the check, in (0, 0.5] (default {DEFAULT_DRIFT_LEVEL})",
    )  # fmt: skip
    parser.add_argument(
        "--shift", type=float, default=DEFAULT_SHIFT, metavar="D",
        help=f"shift (KS distance) the sample-size statement is about (default {DEFAULT_SHIFT})",
    )  # fmt: skip
    parser.add_argument(
        "--power", type=float, default=DEFAULT_POWER, metavar="P",
        help=f"probability of detecting --shift that statement guarantees (default {DEFAULT_POWER})",
    )  # fmt: skip
    parser.add_argument(
        "--max-images", "--max_images", type=int, metavar="N",
        help="score at most N images, drawn at random (default: all)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-images draw (0)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"folder for drift.json/.png/.html ({DEFAULT_OUT})"
    )
    parser.add_argument("--json", action="store_true", help="print drift.json instead of the summary")
    parser.add_argument(
        "--skip-bad", "--skip_bad", action="store_true", help="skip unreadable images (default: stop)"
    )
    parser.add_argument(
        "--batch-size", "--batch_size", type=int, default=64, metavar="N", help="images per forward pass (64)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from stage1_pro.cli.options import forwarded_options
    from stage1_pro.drift import check_drift, summary_lines
    from stage1_pro.layout import DRIFT_FILE, DRIFT_PLOT_FILE, DRIFT_REPORT_FILE

    report = check_drift(args.bundle, args.data, **forwarded_options(check_drift, args, out_dir=args.out))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(summary_lines(report)))
        files = ", ".join(os.path.join(args.out, n) for n in (DRIFT_PLOT_FILE, DRIFT_REPORT_FILE, DRIFT_FILE))
        print(f"wrote {files}")
    return EXIT_DRIFT if report["drift"] else 0
