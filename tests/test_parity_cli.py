"""Parity end to end through the CLI on real-photo JPEGs: what ``predict`` answers for an image file
is that image's row of the run's ``scores.npz`` (from which the certificate was computed).

The photos are crops of scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``, 640 x 427,
shipped inside the scikit-learn wheel), cut at several places and sizes, some enlarged to street-
camera sizes (so that JPEG draft decoding scales by 1/2 .. 1/8 at 64 px), and re-encoded as JPEG
(baseline and progressive). The chain is the user's: manifest -> split -> prepare -> train (Lite0
with its shipped ImageNet weights, one epoch) -> calibrate -> validate -> export -> predict.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stage1_pro.cli import main
from stage1_pro.data import load_dataset
from stage1_pro.scores import load_scores

pytestmark = pytest.mark.slow

IMG_SIZE = 64
PER_PHOTO = 36
#: float32 CPU inference on the same pixels: the same numbers up to summation order.
PROB_TOLERANCE = 1e-5


def write_photo_dataset(root: Path, per_photo: int = PER_PHOTO, seed: int = 0) -> Path:
    """Crops of the two sample photos as JPEG files + ``manifest.csv`` (china = 1, flower = 0)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # china, flower: (427, 640, 3) uint8
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, photo in zip((1, 0), photos, strict=True):
        h, w, _ = photo.shape
        for i in range(per_photo):
            cw = int(rng.integers(w // 4, w + 1))
            ch = int(rng.integers(h // 4, h + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
            scale = (1, 2, 3, 5)[i % 4]  # up to ~3200 px wide: draft decoding at 1/2, 1/4, 1/8
            if scale > 1:
                crop = crop.resize((cw * scale, ch * scale), Image.Resampling.BICUBIC)
            name = f"{'china' if label else 'flower'}-{i:03d}.jpg"
            crop.save(root / name, "JPEG", quality=int(rng.integers(75, 96)), progressive=bool(i % 3 == 0))
            rows.append((name, label))
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label"])
        writer.writerows(rows)
    return manifest


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def test_predict_on_jpeg_photos_equals_scores_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_photo_dataset(tmp_path / "photos")
    splits, prepared, run = tmp_path / "splits.json", tmp_path / "prepared", tmp_path / "run"
    assert cli("split", "--data", manifest, "--out", splits) == 0
    assert cli("prepare", "--data", manifest, "--splits", splits, "--out", prepared,
               "--img-size", IMG_SIZE, "--workers", 1) == 0  # fmt: skip
    assert cli("train", "--prepared", prepared, "--splits", splits, "--out", run, "--phase", 1, "--epochs", 1,
               "--batch-size", 16, "--img-size", IMG_SIZE, "--num-workers", 0) == 0  # fmt: skip
    assert cli("calibrate", "--run", run, "--policy", "softmax") == 0
    cli("validate", "--run", run)  # 72 photos certify little: blessed or not, the pixels are the point
    assert cli("export", "--run", run, "--out", tmp_path / "bundle", "--allow-unblessed") == 0

    scores = load_scores(str(run / "scores.npz"))
    uris = load_dataset(str(manifest)).uris
    images = [uris[i] for i in scores.index]
    capsys.readouterr()
    assert cli("predict", "--bundle", tmp_path / "bundle", "--json", *images) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in rows] == images
    served = np.array([[r["p_negative"], r["p_positive"]] for r in rows])
    gap = np.abs(served - scores.probs).max()
    assert gap <= PROB_TOLERANCE, (
        f"predict differs from scores.npz by up to {gap:.2e} on {len(images)} JPEG photos "
        f"(median {np.median(np.abs(served - scores.probs)[:, 1]):.2e})"
    )
