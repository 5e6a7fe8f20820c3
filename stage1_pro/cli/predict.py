"""Exit decisions for images from a bundle: exit-positive, exit-negative or defer.

Loads the bundle (bundle.json first, checksums verified, policy from its policy file — never a
threshold from config.json) and prints one row per image: the decision and the class
probabilities (and the gate probability for the gate policy). Images are local paths or gs://
URIs. A corrupt or missing image stops the run naming it; with --skip-bad it is reported and
the others are decided (exit status 1 when any image was skipped).
"""

from __future__ import annotations

import argparse

from stage1_pro.inference import DEFAULT_BATCH_SIZE, PRECISIONS

#: Images per forward pass on a GPU (``--batch-size`` default there).
CUDA_BATCH_SIZE = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, metavar="DIR", help="bundle folder (from export or pull)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or gs:// URIs")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--skip-bad",
        "--skip_bad",
        action="store_true",
        help="report unreadable images and go on (default: stop)",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=None,
        metavar="N",
        help=f"images per forward pass (default: {CUDA_BATCH_SIZE} on CUDA, {DEFAULT_BATCH_SIZE} elsewhere)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (cpu)")
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="auto",
        help="forward precision: auto = bf16 autocast on CUDA (as training scores), fp32 elsewhere",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network (pays off on many batches)"
    )


def _table(rows: list[dict]) -> str:
    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    header = ("image", "decision", "p_positive", "gate_prob")
    body = [
        (
            r["source"] or "",
            r["decision"] or f"ERROR: {r['error']}",
            fmt(r["p_positive"]),
            fmt(r["gate_prob"]),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    from stage1_pro.inference import load_bundle

    predictor = load_bundle(args.bundle, device=args.device, precision=args.precision, compile=args.compile)
    batch_size = args.batch_size or (
        CUDA_BATCH_SIZE if args.device.startswith("cuda") else DEFAULT_BATCH_SIZE
    )
    preds = predictor.predict(args.images, batch_size=batch_size, skip_bad=args.skip_bad)
    rows = [p.to_dict() for p in preds]
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 1 if any(p.error for p in preds) else 0
