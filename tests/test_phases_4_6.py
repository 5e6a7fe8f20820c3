"""Phases 4-6 through the training engine: ExPLoRA, F-SAM, conformal risk training; the balanced sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import tiny_config

from stage1_pro.cli import main
from stage1_pro.errors import ConfigError, DataError
from stage1_pro.training import engine, train
from stage1_pro.training.loaders import ClassBalancedBatchSampler


def _train(tiny_prepared: dict[str, str], out: Path, **kw) -> dict:
    return train(
        tiny_config(**kw),
        prepared_uri=tiny_prepared["prepared"],
        splits_uri=tiny_prepared["splits"],
        out_dir=str(out),
    )


# ------------------------------------------------------------------------------------------
# the class-balanced sampler


def test_balanced_sampler_batches_are_balanced_replayable_and_split_over_ranks() -> None:
    rows = np.arange(100, 300)
    labels = (np.arange(200) < 30).astype(int)  # 15 % positives
    sampler = ClassBalancedBatchSampler(rows, labels, 40, seed=3)
    assert len(sampler) == 5
    sampler.set_epoch(2)
    first = list(sampler)
    assert first == list(sampler)  # (seed, epoch) alone decide the batches
    sampler.set_epoch(3)
    assert first != list(sampler)
    pos = set(rows[labels == 1].tolist())
    for batch in first:
        assert len(batch) == 40 and sum(r in pos for r in batch) == 20 and set(batch) <= set(rows.tolist())
    seen = [r for b in first for r in b if r in pos]
    counts = np.bincount([r - 100 for r in seen], minlength=30)
    assert counts.max() - counts.min() <= 1  # the rare class is cycled through evenly
    # data parallel: the global batch of 40 splits into two balanced per-process batches of 20
    ranks = [list(ClassBalancedBatchSampler(rows, labels, 40, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    for b0, b1 in zip(*ranks, strict=True):
        assert len(b0) == len(b1) == 20
        assert sum(r in pos for r in b0) == sum(r in pos for r in b1) == 10


def test_balanced_sampler_needs_both_classes() -> None:
    with pytest.raises(
        DataError, match="need both classes in the training split; it has 0 positive and 10 negative"
    ):
        ClassBalancedBatchSampler(np.arange(10), np.zeros(10), 4)


# ------------------------------------------------------------------------------------------
# refused before any work


def test_phase4_refuses_a_non_vit_before_any_work(tiny_prepared, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"phase 4 \(ExPLoRA\) needs a ViT backbone.*test_efficientnet"):
        _train(tiny_prepared, tmp_path / "run", phase=4)
    assert not (tmp_path / "run").exists()


def test_phase6_refuses_a_too_small_crt_batch_before_any_work(tiny_prepared, tmp_path) -> None:
    with pytest.raises(
        ConfigError, match=r"crt_batch_size=100 is too small for target_fnr_exit=0.02.*>= 196"
    ):
        _train(tiny_prepared, tmp_path / "run", phase=6, crt_batch_size=100)
    assert not (tmp_path / "run").exists()


def test_doran_is_refused_with_the_reason(tiny_prepared, tmp_path) -> None:
    with pytest.raises(Exception, match=r"DoRAN .*abstract"):
        _train(tiny_prepared, tmp_path / "run", phase=2, peft_method="doran")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# the phases run


@pytest.mark.slow
def test_phase5_runs_two_passes_per_update_and_checkpoints_the_ema(
    tiny_prepared, tmp_path, monkeypatch
) -> None:
    calls = []
    real = engine.default_train_step

    def counting(state, x, y, accum, **kw):
        calls.append(state.loss_fn.training)
        return real(state, x, y, accum)

    monkeypatch.setattr(engine, "default_train_step", counting)
    summary = _train(tiny_prepared, tmp_path / "run", phase=5, exit_policy="gate", grad_accum_steps=2)
    n_batches = len(json.loads(Path(tiny_prepared["splits"]).read_text())["indices"]["train"]) // 32
    assert len(calls) == 2 * n_batches  # pass at w for each micro-batch, then again at w + eps
    assert calls.count(False) == n_batches  # the second passes run the loss in eval mode
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=True)
    assert set(saved["optimizer"]) == {"fsam", "base"} and saved["optimizer"]["fsam"]["state"]
    assert summary["phase"] == 5 and (tmp_path / "run" / "scores.npz").exists()


@pytest.mark.slow
def test_phase6_trains_with_conformal_risk_loss_and_calibrates_scrc(tiny_prepared, tmp_path) -> None:
    from stage1_pro.calibrate import calibrate_policy
    from stage1_pro.scores import load_scores

    out = tmp_path / "run"
    # target 0.1: the CRC threshold needs 9 positives per pseudo-calibration half, batches of >= 36
    assert main(["train", "--prepared", tiny_prepared["prepared"], "--splits", tiny_prepared["splits"],
                 "--out", str(out), "--model-name", "test_efficientnet", "--pretrained", "false",
                 "--img-size", "32", "--batch-size", "32", "--num-workers", "0", "--epochs", "2",
                 "--phase", "6", "--exit_policy", "scrc", "--target-fnr-exit", "0.1"]) == 0  # fmt: skip
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_crt", "train_feasible", "train_k_star", "train_lambda_softmax", "val_loss"} <= set(header)
    scores = load_scores(str(out / "scores.npz"))
    assert scores.has_gate
    art = calibrate_policy("scrc", str(out / "scores.npz"), str(out / "scrcparams.json"), target_fnr_exit=0.1)
    assert art["policy"] == "scrc" and (out / "scrcparams.json").exists()


@pytest.mark.slow
def test_phase4_extends_a_vit_saves_the_backbone_and_reuses_it(tiny_prepared, tmp_path) -> None:
    import timm

    from stage1_pro.training.explora import load_extended_backbone

    vit = {
        "model_name": "test_vit",
        "explora_epochs": 1,
        "explora_unfrozen_blocks": 1,
        "explora_lora_rank": 4,
    }
    summary = _train(tiny_prepared, tmp_path / "run", phase=4, **vit)
    art = tmp_path / "run" / "explora"
    info = json.loads((art / "explora.json").read_text())
    assert (
        info["artifact"] == "explora"
        and info["model_name"] == "test_vit"
        and len(info["dino_loss_per_epoch"]) == 1
    )
    state, _ = load_extended_backbone(str(art), model_name="test_vit", img_size=32)
    timm.create_model("test_vit", num_classes=0, img_size=32).load_state_dict(state, strict=True)
    assert summary["phase"] == 4
    # a second run reuses the artifact instead of pre-training again
    reused = _train(tiny_prepared, tmp_path / "run2", phase=4, explora_backbone=str(art), **vit)
    assert reused["phase"] == 4 and not (tmp_path / "run2" / "explora").exists()
    with pytest.raises(
        ConfigError, match="made for test_vit at 32 px, but this run trains test_vit at 48 px"
    ):
        train(tiny_config(phase=4, img_size=48, explora_backbone=str(art), **vit),
              data_uri=tiny_prepared["data"], splits_uri=tiny_prepared["splits"],
              out_dir=str(tmp_path / "run3"))  # fmt: skip
