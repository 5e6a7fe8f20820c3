"""Train the stage-1 model for one phase and write the run directory.

Phases (cumulative): 1 timm backbone + classifier (cross-entropy); 2 DoRA/LoRA adapters;
3 SelectiveNet heads (classifier, gate, auxiliary) with SelectiveLoss (maximise coverage under a
soft FNR_exit <= target_fnr_exit); 4 ExPLoRA self-supervised extended pre-training of a ViT
backbone, then phase 3; 5 phase 3 with the F-SAM optimiser; 6 conformal risk training
(ConformalRiskLoss on class-balanced batches; SCRC is its recommended policy). The phase/policy
matrix is checked before any work: phases 1-2 train for the softmax policy only, 3-5 for
softmax|gate, 6 also scrc.

Writes into --out: config.json, splits.json, metrics.csv (per epoch), model_best.pth (chosen on
val_select; plain weights, adapters merged), model.json, scores.npz (val_select, val_calib,
test) and checkpoints/last.pth. Re-running the same command resumes from the last finished
epoch (a checkpoint of another config is refused). --nproc-per-node N trains data-parallel in
N local processes (one per GPU; gloo on CPU), like torchrun.

Example:
  stage1-pro train --data demo/manifest.csv --splits splits.json --out runs/p1 --phase 1 --exit-policy softmax
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.config import add_config_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        metavar="MANIFEST_OR_FOLDER",
        help="dataset (local or gs://); prepared once into OUT/prepared",
    )
    source.add_argument(
        "--prepared", metavar="PREPARED", help="output folder of `stage1-pro prepare` (local or gs://)"
    )
    parser.add_argument("--splits", required=True, metavar="SPLITS_JSON", help="splits.json of the dataset")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local or gs://)")
    parser.add_argument(
        "--no-resume",
        "--no_resume",
        dest="resume",
        action="store_false",
        help="start over even if OUT/checkpoints/last.pth exists (default: resume)",
    )
    parser.add_argument(
        "--nproc-per-node",
        "--nproc_per_node",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes on this machine (one per GPU), default 1",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import os

    from stage1_pro.config import resolve_config
    from stage1_pro.training.engine import preflight
    from stage1_pro.training.launcher import train_processes

    config = resolve_config(args)  # validates the phase/policy matrix before anything else
    preflight(config, args.data, args.prepared)
    summary = train_processes(
        config,
        args.nproc_per_node,
        data_uri=args.data,
        prepared_uri=args.prepared,
        splits_uri=args.splits,
        out_dir=args.out,
        resume=args.resume,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    best = summary["best"]
    print(
        f"trained phase {summary['phase']} for {summary['epochs']} epoch(s) in {summary['seconds']:.1f} s: "
        f"best {summary['monitor']} {best:.4f} at epoch {summary['best_epoch']}; "
        + ", ".join(f"{s} accuracy {summary[s]['accuracy']:.4f}" for s in ("val_select", "val_calib", "test"))
    )
    print(f"run directory: {summary['out_dir']}")
    return 0
