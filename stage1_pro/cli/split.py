"""Split a dataset into train / val_select / val_calib / test and write ``splits.json``.

Deterministic (same data + seed + fractions give a byte-identical file), stratified by label
and group-aware (all images of a group go to one split). The dataset is a manifest
(.csv/.jsonl with uri,label[,group]) or a folder with 0/ and 1/ subfolders, local or gs://.
Prints the per-split class balance.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.splits import DEFAULT_FRACTIONS, SPLIT_NAMES

    default = " ".join(f"{DEFAULT_FRACTIONS[s]:g}" for s in SPLIT_NAMES)
    parser.add_argument(
        "--data", required=True, metavar="MANIFEST_OR_FOLDER", help="dataset (local path or gs:// URI)"
    )
    parser.add_argument(
        "--out", required=True, metavar="SPLITS_JSON", help="where to write splits.json (local or gs://)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed, an integer >= 0 (default: 0)")
    parser.add_argument(
        "--fractions",
        nargs="+",
        metavar="F",
        default=None,
        help=f"four fractions in the order {' '.join(SPLIT_NAMES)}, or name=value pairs; they must sum "
        f"to 1 (default: {default})",
    )
    parser.add_argument(
        "--no-check-files",
        "--no_check_files",
        dest="check_files",
        action="store_false",
        help="do not check that every image of the manifest exists (faster on huge gs:// datasets)",
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.splits import SPLIT_NAMES, split_dataset

    splits = split_dataset(
        args.data, args.out, seed=args.seed, fractions=args.fractions, check_files=args.check_files
    )
    ds = splits["dataset"]
    print(
        f"wrote {args.out}: splits_version {splits['splits_version']}, seed {splits['seed']}, "
        f"dataset {ds['fingerprint'][:12]} ({ds['n']} images, {ds['n_positive']} positive)"
    )
    print(f"{'split':<11}{'fraction':>9}{'n':>8}{'positive':>10}{'rate':>8}{'groups':>8}")
    for name in SPLIT_NAMES:
        b = splits["class_balance"][name]
        print(
            f"{name:<11}{splits['fractions'][name]:>9.3g}{b['n']:>8}{b['n_positive']:>10}"
            f"{b['positive_rate']:>8.3f}{b['n_groups']:>8}"
        )
    return 0
