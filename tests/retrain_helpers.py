"""A champion bundle certified on real JPEG images, and challenger runs on the same data.

The champion test and the drift tests need a bundle whose scores come from its own model on real
images (so re-scoring them, or scoring new images, means something), and a model that is good at
the labels. With no time to train one, the labels are made to fit the model: a tiny timm network
(:func:`bundle_helpers.build_tiny_model`) scores MNIST digits re-encoded as RGB JPEGs, and each
image's label is drawn as Bernoulli(p_positive) of that network. The network is then a calibrated
predictor of these labels, and any other scores can play a weaker or a stronger challenger.

* :func:`jpeg_pool` writes the images (RGB JPEG, quality 90) in a random order.
* :func:`score_with_bundle_model` scores paths with :class:`stage1_pro.inference.Predictor`: the
  serving path, so the run's scores are what the bundle's model gives on those files.
* :func:`image_run` writes a run directory on a labelled manifest: splits made by
  :func:`stage1_pro.splits.make_splits`, ``scores.npz`` from given per-row probabilities, the tiny
  model's files, then calibrate and validate (target 0.1: val_calib here has ~300 positives).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from bundle_helpers import tiny_config

#: The target these runs certify (the default 0.02 needs more val_calib positives than these hold).
TARGET = 0.1
FRACTIONS = {"train": 0.1, "val_select": 0.2, "val_calib": 0.4, "test": 0.3}
SCORED = ("val_select", "val_calib", "test")


def jpeg_pool(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` MNIST-5k digits (random order) as 28 x 28 RGB JPEG files; returns their paths."""
    from PIL import Image

    from stage1_pro.demo_data import load_mnist_5k

    images, _ = load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(images))[:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in order.tolist():
        path = out_dir / f"{i:05d}.jpg"
        Image.fromarray(images[i]).convert("RGB").save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def score_with_bundle_model(model_dir: Path, policy_file: Path, paths: list[Path]) -> tuple[Any, Any]:
    """(probs ``(n, 2)``, gate logits ``(n,)``) of the model in ``model_dir`` on ``paths``, as served."""
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.inference import Predictor
    from stage1_pro.models import load_model
    from stage1_pro.policies import load_policy

    info = read_artifact(model_dir / "model.json", "model")
    predictor = Predictor(load_model(str(model_dir)), load_policy(policy_file), info)
    preds = predictor.predict([str(p) for p in paths])
    probs = np.array([p.probs for p in preds], dtype=np.float64)
    gate = np.array([p.gate_logit for p in preds], dtype=np.float64)
    return probs, gate


def write_manifest(path: Path, images: list[Path], labels: np.ndarray) -> Path:
    lines = ["uri,label"] + [f"{p},{int(y)}" for p, y in zip(images, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def image_run(
    run: Path,
    model_dir: Path,
    manifest: Path,
    probs: np.ndarray,
    gate_logit: np.ndarray,
    *,
    validate: bool = True,
    **validate_kwargs: Any,
) -> Path:
    """A calibrated (and validated) softmax run on ``manifest`` whose scores are ``probs`` by dataset row."""
    from stage1_pro.artifacts import write_artifact
    from stage1_pro.calibrate import calibrate_policy
    from stage1_pro.config import save_config
    from stage1_pro.data import load_dataset
    from stage1_pro.scores import save_scores
    from stage1_pro.splits import make_splits
    from stage1_pro.validate import validate_run

    run.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(manifest)
    splits = write_artifact(run / "splits.json", "splits", make_splits(dataset, seed=0, fractions=FRACTIONS))
    save_config(tiny_config("softmax", target_fnr_exit=TARGET), run / "config.json")
    rows = np.concatenate([np.asarray(splits["indices"][s], dtype=np.int64) for s in SCORED])
    save_scores(
        str(run / "scores.npz"),
        index=rows,
        split=np.concatenate([np.full(len(splits["indices"][s]), s) for s in SCORED]),
        label=dataset.labels[rows],
        probs=probs[rows],
        gate_logit=gate_logit[rows],
    )
    for name in ("model_best.pth", "model.json"):
        shutil.copyfile(model_dir / name, run / name)
    (run / "metrics.csv").write_text("epoch,train_loss,val_select_loss\n0,0.69,0.68\n", encoding="utf-8")
    calibrate_policy(
        "softmax", str(run / "scores.npz"), str(run / "thresholds.json"), target_fnr_exit=TARGET, delta=0.1
    )
    if validate:
        validate_run(run, **validate_kwargs)
    return run


#: Images of the pool: the first DATASET_SIZE form the labelled dataset, the rest are "new" images.
POOL_SIZE = 1400
DATASET_SIZE = 1000


def build_world(root: Path) -> dict[str, Any]:
    """The champion world (module docstring): pool, model, labels, dataset, champion run and bundle.

    Returns:
        ``pool`` (paths), ``probs``/``gate`` (the model's scores of the pool), ``labels``,
        ``model_dir``, ``manifest`` (the dataset), ``run`` (champion run, validated), ``bundle``
        (champion bundle, version ``champ``) and ``new`` (pool images outside the dataset).
    """
    import torch
    from bundle_helpers import build_tiny_model, make_run

    from stage1_pro.bundle import export_bundle

    pool = jpeg_pool(root / "pool", POOL_SIZE)
    model_dir = build_tiny_model(root / "model", pool[:64])
    any_policy = make_run(root / "any-policy", model_dir, n=300, validate=False) / "thresholds.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: extra threads only contend on a shared machine
    try:
        probs, gate = score_with_bundle_model(model_dir, any_policy, pool)
    finally:
        torch.set_num_threads(threads)
    # labels drawn from a sharpened p(positive): the model is better than it thinks, so the certified
    # point sits well inside the target and the champion is blessed whatever the draw
    sharp = 1.0 / (1.0 + np.exp(-2.0 * np.log(probs[:, 1] / probs[:, 0])))
    labels = (np.random.default_rng(1).random(len(pool)) < sharp).astype(np.int64)
    manifest = write_manifest(root / "data.csv", pool[:DATASET_SIZE], labels[:DATASET_SIZE])
    run = image_run(root / "champion-run", model_dir, manifest, probs[:DATASET_SIZE], gate[:DATASET_SIZE])
    bundle = export_bundle(run, root / "champion", version="champ")
    return {
        "pool": pool,
        "probs": probs,
        "gate": gate,
        "labels": labels,
        "model_dir": model_dir,
        "manifest": manifest,
        "run": run,
        "bundle": bundle,
        "new": pool[DATASET_SIZE:],
    }
