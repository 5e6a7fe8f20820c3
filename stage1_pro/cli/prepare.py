"""Decode every image of the splits once into training-resolution shards (+ index.json).

Parallel worker processes decode (JPEG draft mode: libjpeg scales while decoding), convert to
RGB and resize to --img-size; the uint8 shards are written locally or to gs:// with
index.json last. Images that fail to decode are named in the log and index.json, counted and
left out. Train on the result with `stage1-pro train --prepared OUT`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.config import Stage1ProConfig

    parser.add_argument(
        "--data", required=True, metavar="MANIFEST_OR_FOLDER", help="dataset (local or gs://)"
    )
    parser.add_argument("--splits", required=True, metavar="SPLITS_JSON", help="splits.json of the dataset")
    parser.add_argument("--out", required=True, metavar="PREPARED", help="output folder or gs:// prefix")
    parser.add_argument(
        "--img-size",
        "--img_size",
        type=int,
        default=Stage1ProConfig.img_size,
        metavar="N",
        help=f"square side in pixels; must equal the training img_size (default: {Stage1ProConfig.img_size})",
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decoding processes (default: all CPU cores)"
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.prepare import prepare_dataset

    index = prepare_dataset(args.data, args.splits, args.out, args.img_size, workers=args.workers)
    counts = ", ".join(f"{k} {v}" for k, v in index["counts"].items())
    size = sum(s["bytes"] for s in index["shards"]) / 2**20
    print(
        f"prepared {sum(index['counts'].values())} images at {index['img_size']} px "
        f"in {index['seconds']:.1f} s "
        f"({len(index['shards'])} shard(s), {size:.1f} MiB): {counts}"
    )
    if index["n_failed"]:
        print(f"left out {index['n_failed']} image(s) that failed to decode:")
        for item in index["failed"][:20]:
            print(f"  {item['uri']}: {item['error']}")
    print(f"index: {args.out.rstrip('/')}/index.json")
    return 0
