"""Certify an exit policy on a scores file: FNR_exit <= target with probability >= 1 - delta.

Works from scores.npz alone (no model, no GPU). The grid and anything fitted (gate calibrator,
SCRC path, testing order) come from val_select; each grid point is tested on val_calib with an
exact binomial p-value on its exited positives, a family-wise procedure at delta keeps the
certificate, and the certified point with the largest coverage is written:

  softmax -> thresholds.json   exit iff max p >= exit_threshold
  gate    -> gateparams.json   exit iff calibrated gate >= gate_threshold (needs gate logits)
  scrc    -> scrcparams.json   SCRC-I (default) or SCRC-T (lambda1, lambda2)

When nothing certifies, the file says feasible: false, the policy defers every image, and a
warning says how many exited positives certifying would need.

Examples:
  stage1-pro calibrate --policy softmax --scores runs/a/scores.npz --out runs/a/thresholds.json
  stage1-pro calibrate --run runs/a --policy gate --calibrator isotonic
  stage1-pro calibrate --policy scrc --scores s.npz --out scrcparams.json --scrc-variant SCRC-T
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage1_pro.certify import DEFAULT_PROCEDURE, PROCEDURES
    from stage1_pro.policies import POLICIES
    from stage1_pro.policies.gate import CALIBRATORS
    from stage1_pro.policies.scrc import SCRC_VARIANTS, SELECTION_SCORES

    a = parser.add_argument
    a("--policy", choices=tuple(POLICIES), help="exit policy (default: config.json's exit_policy with --run)")
    a("--scores", metavar="SCORES.npz", help="scores file (default RUN/scores.npz with --run)")
    a("--out", metavar="FILE", help="policy file to write (default: the policy's file next to the scores)")
    a(
        "--run",
        metavar="RUN_DIR",
        help="run directory: scores.npz, splits.json and config.json are read from it",
    )
    a(
        "--splits",
        metavar="SPLITS.json",
        help="check the scores' rows against these splits (default: RUN/splits.json)",
    )
    a(
        "--config",
        metavar="CONFIG.json",
        help="take target_fnr_exit and delta from this config (default RUN/config.json)",
    )
    a("--target-fnr-exit", "--target_fnr_exit", type=float, metavar="X",
      help="certified FNR_exit bound in (0, 0.1] (default: the config's, else 0.02)")  # fmt: skip
    a(
        "--delta",
        type=float,
        metavar="D",
        help="failure probability in (0, 0.5] (default: the config's, else 0.1)",
    )
    a("--method", choices=tuple(PROCEDURES), help=f"family-wise procedure (default {DEFAULT_PROCEDURE})")
    a(
        "--grid-size",
        "--grid_size",
        type=int,
        metavar="N",
        help="grid points (default 200; scrc: xi grid, 100)",
    )
    a("--calibrator", choices=CALIBRATORS, help="gate calibrator, fitted on val_select (default platt)")
    a("--scrc-variant", "--scrc_variant", choices=SCRC_VARIANTS, help="SCRC variant (default SCRC-I)")
    a("--selection-score", "--selection_score", choices=SELECTION_SCORES,
      help="SCRC selection score (default max_prob)")  # fmt: skip
    a(
        "--model-version",
        "--model_version",
        metavar="V",
        help="lineage (default: sha256 of model_best.pth next to the scores)",
    )
    a("--replace", action="store_true", help="delete another policy's file next to --out (a run holds one)")


def run(args: argparse.Namespace) -> int:
    from stage1_pro import storage
    from stage1_pro.calibrate import calibrate_policy, default_out
    from stage1_pro.config import load_config
    from stage1_pro.defaults import DEFAULT_DELTA, DEFAULT_TARGET_FNR_EXIT
    from stage1_pro.errors import ConfigError
    from stage1_pro.layout import RunDir
    from stage1_pro.policies import load_policy

    run = RunDir(args.run) if args.run else None
    scores = args.scores or (run.scores if run else None)
    if scores is None:
        raise ConfigError("pass --scores SCORES.npz (or --run RUN_DIR)")
    config_uri = args.config or (run.config if run else None)
    config = None
    if config_uri and (args.config or storage.exists(config_uri)):
        config = load_config(config_uri)
    policy = args.policy or (config.exit_policy if config else None)
    if policy is None:
        raise ConfigError("pass --policy softmax|gate|scrc")
    target = (
        args.target_fnr_exit
        if args.target_fnr_exit is not None
        else (config.target_fnr_exit if config else DEFAULT_TARGET_FNR_EXIT)
    )
    delta = args.delta if args.delta is not None else (config.delta if config else DEFAULT_DELTA)
    splits = args.splits or (run.splits if run else None)
    if splits and not args.splits and not storage.exists(splits):
        splits = None
    options = {}
    if args.grid_size is not None:
        options["grid_size"] = args.grid_size
    if args.calibrator is not None:
        options["gate_calibrator" if policy == "scrc" else "calibrator"] = args.calibrator
    if args.scrc_variant is not None:
        options["variant"] = args.scrc_variant
    if args.selection_score is not None:
        options["selection_score"] = args.selection_score
    if options and policy != "scrc" and ({"variant", "selection_score"} & set(options)):
        raise ConfigError("--scrc-variant and --selection-score apply to --policy scrc only")
    if policy == "softmax" and "calibrator" in options:
        raise ConfigError("--calibrator applies to --policy gate (or scrc with --selection-score gate)")
    out = args.out or default_out(policy, scores)
    calibrate_policy(
        policy, scores, out, target_fnr_exit=target, delta=delta, method=args.method, splits_uri=splits,
        model_version=args.model_version, replace=args.replace, **options,
    )  # fmt: skip
    print(load_policy(out).summary())
    print(f"wrote {out}")
    return 0
