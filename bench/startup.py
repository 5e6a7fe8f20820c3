"""Start-up with ``compile=true``: time to the first training step, whole-model vs block-by-block compilation.

Each variant is one fresh process running the real engine (``stage1_pro.training.train``, phase 1,
full fine-tuning, one epoch) on the embedded digits prepared at ``--img-size``; the first training
step pays the compilation. Variants:

* ``eager``: ``compile=false`` (the baseline step);
* ``whole cold``: the whole model compiled by one ``torch.compile`` (what the engine did before),
  with an empty inductor cache;
* ``per-block cold``: the engine's default now (``stage1_pro/training/compilation.py``: each
  repeated block compiled in place, the generated code reused by every identical block);
* ``... warm``: the same again in a new process with the first one's ``TORCHINDUCTOR_CACHE_DIR``,
  i.e. what a retried or resumed pod gets when the cache directory lives on persistent storage.

Times are CPU time of the process and of the C++ compiler processes it runs (inductor compiles
in-process: ``TORCHINDUCTOR_COMPILE_THREADS=1``; one intra-op thread), so that other load on a
shared machine does not distort them; wall times are shown beside. ``first step`` is the first
forward/backward (compilation included), ``step`` the median of the later ones.

    python bench/startup.py [--model vit_small_patch14_dinov2] [--img-size 56] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: variant -> (compile, per block); a "warm" variant runs after its "cold" one with the same cache dir.
VARIANTS: dict[str, tuple[bool, bool]] = {
    "eager": (False, False),
    "whole cold": (True, False),
    "whole warm": (True, False),
    "per-block cold": (True, True),
    "per-block warm": (True, True),
}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (inductor runs the C++ compiler as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def child(args: argparse.Namespace) -> None:
    """One training run; prints the step timings as JSON on the last line."""
    import torch

    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.training import compilation, engine, train

    torch.set_num_threads(1)
    if not args.per_block:  # the whole-model compile the engine did before
        compilation.repeated_blocks = lambda module: []
    steps: list[tuple[float, float]] = []
    real_step = engine.default_train_step

    def timed_step(*a, **kw):
        cpu, wall = cpu_seconds(), time.perf_counter()
        out = real_step(*a, **kw)
        steps.append((cpu_seconds() - cpu, time.perf_counter() - wall))
        return out

    engine.default_train_step = timed_step
    config = Stage1ProConfig(
        model_name=args.model,
        pretrained=False,
        img_size=args.img_size,
        batch_size=args.batch_size,
        epochs=1,
        num_workers=0,
        compile=args.compile,
        log_every=10**9,
    )
    train(config, prepared_uri=args.prepared, splits_uri=args.splits, out_dir=args.out, resume=False)
    later = sorted(steps[1:])
    print(
        json.dumps(
            {"first_cpu": steps[0][0], "first_wall": steps[0][1], "step_cpu": later[len(later) // 2][0]}
        )
    )


def prepare(root: Path, img_size: int) -> tuple[str, str]:
    from stage1_pro.demo_data import write_demo_dataset
    from stage1_pro.prepare import prepare_dataset
    from stage1_pro.splits import split_dataset

    manifest = write_demo_dataset(root / "data", per_digit=20)
    split_dataset(str(manifest), str(root / "splits.json"), seed=0)
    prepare_dataset(str(manifest), str(root / "splits.json"), str(root / "prepared"), img_size, workers=1)
    return str(root / "prepared"), str(root / "splits.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2", help="timm ViT (%(default)s)")
    p.add_argument("--img-size", type=int, default=56, help="input side (56: 4x4 patches; compilation "
                   "does not depend on it)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--per-block", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--splits", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared, splits = prepare(root, args.img_size)
        results = {}
        for name in args.variants.split(","):
            compile_, per_block = VARIANTS[name]
            cache = root / f"inductor-{'block' if per_block else 'whole'}"  # warm reuses its cold cache
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            cmd = [sys.executable, __file__, "--child", "--model", args.model,
                   "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
                   "--prepared", prepared, "--splits", splits,
                   "--out", str(root / f"run-{len(results)}")]  # fmt: skip
            cmd += ["--compile"] * compile_ + ["--per-block"] * per_block
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]}", flush=True)
    import torch

    print(f"\n{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {args.model} @ {args.img_size} px, "
          f"batch {args.batch_size}, CPU, 1 thread; CPU s incl. the C++ compiler (wall beside)")  # fmt: skip
    print(f"{'variant':<18}{'first step s':>14}{'(wall)':>10}{'step s':>9}")
    for name, r in results.items():
        print(f"{name:<18}{r['first_cpu']:>14.1f}{r['first_wall']:>10.1f}{r['step_cpu']:>9.3f}")
    if "whole cold" in results and "per-block cold" in results:
        whole, block = results["whole cold"], results["per-block cold"]
        print(f"\nper block / whole, first step: {block['first_cpu'] / whole['first_cpu']:.2f}; "
              f"steady step: {block['step_cpu'] / whole['step_cpu']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
