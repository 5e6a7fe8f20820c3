"""Builders shared by the validate, bundle, registry, inference and end-to-end tests.

A *run directory* here is what ``train`` + ``calibrate`` leave behind, made quickly:

* scores from :class:`stage1_pro.simulation.GaussianScoreModel` (known distribution, with gate
  logits), ``n`` images per scored split, written with :func:`stage1_pro.scores.save_scores`;
* ``splits.json`` whose indices match the scores;
* ``config.json`` at phase 6 (every policy allowed);
* a real tiny timm network (``test_efficientnet``, 32 px, classifier + gate + aux heads) saved
  as ``model_best.pth`` + ``model.json`` exactly as training saves it. Its output layers are
  rescaled so that, on MNIST digits, its probabilities and gate logits spread over the range
  where the calibrated thresholds fall: predictions then mix exit-positive, exit-negative and
  defer, so comparing decisions is a real test (an untouched random network outputs ~0.5);
* the policy file from :func:`stage1_pro.calibrate.calibrate_policy`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stage1_pro.artifacts import DEFAULT_FILENAMES, POLICY_ARTIFACT_KINDS, write_artifact

TINY_MODEL = "test_efficientnet"
TINY_IMG = 32
SCORED_SPLITS = ("val_select", "val_calib", "test")
FINGERPRINT = "5" * 64
N_TRAIN = 100
POLICY_FILE = {policy: DEFAULT_FILENAMES[kind] for policy, kind in POLICY_ARTIFACT_KINDS.items()}


def tiny_config(exit_policy: str = "softmax", **overrides: Any):
    from stage1_pro.config import Stage1ProConfig

    settings = {"phase": 6, "exit_policy": exit_policy, "model_name": TINY_MODEL, "img_size": TINY_IMG}
    settings.update(pretrained=False, **overrides)
    return Stage1ProConfig(**settings)


def build_tiny_model(out_dir: Path, images: list[Path] | None = None, seed: int = 0) -> Path:
    """Save a tiny phase-6 network (``model_best.pth``, ``model.json``) into ``out_dir``.

    With ``images``, the classifier and gate output layers are rescaled on them so that the
    positive-class logit margin has mean 0 and std 3 and the gate logit mean 1.5 and std 2.
    """
    import torch

    from stage1_pro.models import create_model, export_state_dict, save_model_info
    from stage1_pro.preprocessing import PreprocessSpec, preprocess

    torch.manual_seed(seed)
    model = create_model(tiny_config(), pretrained=False).eval()
    if images:
        x = preprocess(PreprocessSpec.from_model_info(model.info), images)
        with torch.no_grad():
            out = model(x)
            margin = out["logits"][:, 1] - out["logits"][:, 0]
            cls = model.heads.classifier
            scale = 3.0 / float(margin.std().clamp_min(1e-6))
            cls.weight.mul_(scale)
            cls.bias.mul_(scale)
            cls.bias[1] -= float(margin.mean()) * scale
            gate = model.heads.gate.fc2
            g = out["gate_logit"]
            g_scale = 2.0 / float(g.std().clamp_min(1e-6))
            gate.weight.mul_(g_scale)
            gate.bias.mul_(g_scale)
            gate.bias += 1.5 - float(g.mean()) * g_scale
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(export_state_dict(model), out_dir / "model_best.pth")
    save_model_info(model.info, str(out_dir / "model.json"))
    return out_dir


def gaussian_scores(n: int = 1500, seed: int = 0, **model_kwargs: Any) -> dict[str, np.ndarray]:
    """Scores arrays for val_select / val_calib / test (``n`` each) from the Gaussian model."""
    from stage1_pro.simulation import GaussianScoreModel

    rng = np.random.default_rng(seed)
    sim = GaussianScoreModel(**model_kwargs)
    parts = [sim.sample(n, rng) for _ in SCORED_SPLITS]
    return {
        "index": np.arange(len(SCORED_SPLITS) * n) + N_TRAIN,  # dataset rows after the train rows
        "split": np.repeat(np.array(SCORED_SPLITS), n),
        "label": np.concatenate([p["label"] for p in parts]),
        "probs": np.concatenate([p["probs"] for p in parts]),
        "gate_logit": np.concatenate([p["gate_logit"] for p in parts]),
    }


def write_splits(run: Path, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """splits.json for a dataset of N_TRAIN training rows followed by the scored rows."""
    from stage1_pro.splits import splits_version

    indices = {"train": list(range(N_TRAIN))}
    labels = {"train": np.arange(N_TRAIN) % 2}
    for split in SCORED_SPLITS:
        mask = scores["split"] == split
        indices[split] = scores["index"][mask].tolist()
        labels[split] = scores["label"][mask]
    n = sum(len(v) for v in indices.values())
    balance = {
        s: {
            "n": len(indices[s]),
            "n_positive": int(labels[s].sum()),
            "positive_rate": float(labels[s].mean()),
        }
        for s in indices
    }
    splits = {
        "seed": 0,
        "fractions": {s: len(indices[s]) / n for s in indices},
        "group_aware": False,
        "dataset": {
            "fingerprint": FINGERPRINT,
            "n": n,
            "n_positive": sum(b["n_positive"] for b in balance.values()),
            "source": "synthetic",
        },
        "indices": indices,
        "class_balance": balance,
        "splits_version": splits_version(FINGERPRINT, indices),
    }
    return write_artifact(run / "splits.json", "splits", splits)


def write_placeholder_model(out_dir: Path) -> Path:
    """``model.json`` + a few bytes as ``model_best.pth``: for tests that never load the network."""
    from stage1_pro.models import save_model_info

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_best.pth").write_bytes(b"placeholder weights: never loaded by these tests")
    info = {
        "model_name": TINY_MODEL, "img_size": TINY_IMG, "num_classes": 2,
        "heads": ["classifier", "gate", "aux"], "mean": [0.5] * 3, "std": [0.5] * 3, "in_chans": 3,
        "grayscale_to_rgb": True,
    }  # fmt: skip
    save_model_info(info, str(out_dir / "model.json"))
    return out_dir


def make_run(
    run: Path,
    model_dir: Path | None = None,
    *,
    policy: str = "softmax",
    n: int = 1500,
    seed: int = 0,
    scores: dict[str, np.ndarray] | None = None,
    score_kwargs: dict[str, Any] | None = None,
    config_overrides: dict[str, Any] | None = None,
    calibrate_kwargs: dict[str, Any] | None = None,
    calibrate: bool = True,
    validate: bool = True,
    **validate_kwargs: Any,
) -> Path:
    """A complete run directory (see the module docstring); validated unless ``validate=False``.

    ``model_dir`` holds the network files to copy (default: :func:`write_placeholder_model`);
    ``scores`` replaces the Gaussian scores (arrays as :func:`gaussian_scores` returns them).
    """
    from stage1_pro.calibrate import calibrate_policy
    from stage1_pro.config import save_config
    from stage1_pro.scores import save_scores
    from stage1_pro.validate import validate_run

    run.mkdir(parents=True, exist_ok=True)
    config = tiny_config(policy, **(config_overrides or {}))
    save_config(config, run / "config.json")
    if scores is None:
        scores = gaussian_scores(n, seed, **(score_kwargs or {}))
    save_scores(str(run / "scores.npz"), **scores)
    write_splits(run, scores)
    if model_dir is None:
        model_dir = write_placeholder_model(run.parent / f".{run.name}-model")
    for name in ("model_best.pth", "model.json"):
        shutil.copyfile(model_dir / name, run / name)
    (run / "metrics.csv").write_text("epoch,train_loss,val_select_loss\n0,0.69,0.68\n", encoding="utf-8")
    if calibrate:
        settings = {
            "target_fnr_exit": config.target_fnr_exit,
            "delta": config.delta,
            **(calibrate_kwargs or {}),
        }
        calibrate_policy(policy, str(run / "scores.npz"), str(run / POLICY_FILE[policy]), **settings)
    if calibrate and validate:
        validate_run(run, **validate_kwargs)
    return run


def tiny_images(manifest: Path, count: int = 24) -> list[Path]:
    """The first ``count`` image paths of a demo-layout manifest (``uri,label``)."""
    from stage1_pro.data import load_dataset

    return [Path(u) for u in load_dataset(str(manifest)).uris[:count]]
