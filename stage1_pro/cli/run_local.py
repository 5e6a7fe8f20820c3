"""Run the whole Kubeflow pipeline on this machine (kfp.local), on CPU, and leave the bundle in --out.

Without --data it runs on the embedded real dataset (MNIST-5k digits written as PNG files, odd
digit = positive), so this is the first thing to try after installing. With --data it runs on your
own manifest (CSV/JSONL: uri,label[,group]) or image folder (0/ and 1/ sub-folders).

The pipeline is compiled exactly as for the cluster (OUT/pipeline.yaml) and run task by task as
local subprocesses: check-config, fingerprint, split, prepare, train, then the branch of
--exit-policy: calibrate, validate, and export when validation blesses the run. It prints one line
per task and a summary (coverage, FNR_exit, its certified bound, blessed, bundle path); the full
log is OUT/run-local.log, the summary OUT/summary.json, the bundle OUT/bundle.

Model settings default to the laptop profile (the config's defaults: a small timm backbone with
ImageNet weights, 64 px); the cluster defaults of the same parameters are in 'stage1-pro compile'.

Example:
  stage1-pro run-local --out runs/local
  stage1-pro run-local --data my_images/ --phase 3 --exit-policy gate --epochs 5 --out runs/gate
"""

from __future__ import annotations

import argparse

#: Pipeline parameters run-local does not offer: GPU scheduling means nothing on this machine.
_SKIPPED = ("data_uri", "gpu_type", "gpu_count")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.run_parameters import LOCAL_PROFILE, PARAMETERS, convert

    parser.add_argument(
        "--data", metavar="MANIFEST_OR_FOLDER", help="your dataset (default: the embedded demo dataset)"
    )
    parser.add_argument("--out", "-o", default="runs/local", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--cache", action="store_true", help="reuse task results of an earlier run-local into --out"
    )
    group = parser.add_argument_group("pipeline parameters")
    for p in PARAMETERS:
        if p.name in _SKIPPED:
            continue
        default = LOCAL_PROFILE.get(p.name, p.default)
        group.add_argument(
            f"--{p.name.replace('_', '-')}",
            dest=p.name,
            type=lambda text, name=p.name: convert(name, text),
            default=None,
            metavar="JSON" if p.type is dict else p.name.upper(),
            help=f"{p.help} (default: {default!r})",
        )


def run(args: argparse.Namespace) -> int:
    import logging

    from stage1_pro.pipelines.local import format_summary, run_local
    from stage1_pro.run_parameters import PARAMETERS

    overrides = {p.name: getattr(args, p.name) for p in PARAMETERS if p.name not in _SKIPPED}
    overrides["data_uri"] = args.data
    result = run_local(
        overrides, args.out, verbose=logging.getLogger().isEnabledFor(logging.DEBUG), cache=args.cache
    )
    print()
    print(format_summary(result))
    return 0
