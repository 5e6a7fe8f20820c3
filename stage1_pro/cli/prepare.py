"""Decode every image of the splits once into training-resolution shards (+ index.json).

Parallel worker processes decode (--decode-mode draft: libjpeg scales JPEGs while decoding),
apply the EXIF orientation, convert to RGB and bring each image to --img-size squared
(--resize-mode squash: the whole image; center_crop: its central square); the uint8 shards are
written locally or to gs:// with index.json last, which records these settings. Images that fail
to decode are named in the log and index.json, counted and left out. Train on the result with
`stage1-pro train --prepared OUT` and the same settings (train refuses shards made otherwise);
the bundle records them and `predict` applies them to every image.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.defaults import DECODE_MODES, INTERPOLATIONS, RESIZE_MODES

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
    for name, choices, meaning in (
        ("resize_mode", RESIZE_MODES, "squash: resize the whole image; center_crop: its central square"),
        ("decode_mode", DECODE_MODES, "draft: libjpeg decodes JPEGs at 1/2..1/8 scale, never below N"),
        ("interpolation", INTERPOLATIONS, "resampling filter of the resize"),
    ):
        default = getattr(Stage1ProConfig, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            *([f"--{name}"] if "_" in name else []),
            choices=choices,
            default=default,
            help=f"{meaning}; must equal the training {name} (default: {default})",
        )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decoding processes (default: all CPU cores)"
    )


def run(args: argparse.Namespace) -> int:
    from stage1_pro.prepare import prepare_dataset
    from stage1_pro.preprocessing import PixelSpec

    spec = PixelSpec(args.img_size, args.resize_mode, args.decode_mode, args.interpolation)
    index = prepare_dataset(args.data, args.splits, args.out, spec, workers=args.workers)
    counts = ", ".join(f"{k} {v}" for k, v in index["counts"].items())
    size = sum(s["bytes"] for s in index["shards"]) / 2**20
    print(
        f"prepared {sum(index['counts'].values())} images ({spec.describe()}) "
        f"in {index['seconds']:.1f} s "
        f"({len(index['shards'])} shard(s), {size:.1f} MiB): {counts}"
    )
    if index["n_failed"]:
        print(f"left out {index['n_failed']} image(s) that failed to decode:")
        for item in index["failed"][:20]:
            print(f"  {item['uri']}: {item['error']}")
    print(f"index: {args.out.rstrip('/')}/index.json")
    return 0
