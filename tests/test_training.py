"""Training engine: phase dispatch and bad input, run directory, resume, frozen/PEFT paths, phase 3."""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import tiny_config

from stage1_pro.artifacts import read_artifact
from stage1_pro.cli import main
from stage1_pro.config import Stage1ProConfig
from stage1_pro.errors import ConfigError, DataError
from stage1_pro.splits import split_dataset
from stage1_pro.training import engine, train


def _cli(tiny_prepared: dict[str, str], out: Path, *flags: str) -> int:
    return main(
        [
            "train",
            "--prepared",
            tiny_prepared["prepared"],
            "--splits",
            tiny_prepared["splits"],
            "--out",
            str(out),
            "--model-name",
            "test_efficientnet",
            "--pretrained",
            "false",
            "--img-size",
            "32",
            "--batch-size",
            "32",
            "--num-workers",
            "0",
            *flags,
        ]
    )


# ------------------------------------------------------------------------------------------
# refused before any work


def test_phase_policy_mismatch_fails_before_any_work(tiny_prepared, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _cli(tiny_prepared, out, "--phase", "1", "--exit_policy", "gate") == 2
    err = capsys.readouterr().err
    assert "exit_policy" in err and "gate needs phase >= 3" in err
    assert not out.exists()


@pytest.mark.parametrize(("phase", "name"), [(4, "ExPLoRA"), (5, "F-SAM"), (6, "conformal risk training")])
def test_unbuilt_phases_fail_clearly_and_run_nothing(
    tiny_prepared, tmp_path, capsys, monkeypatch, phase: int, name: str
) -> None:
    from dataclasses import replace

    from stage1_pro.training import phases

    # As before the research phases landed: the phase is registered but not built.
    monkeypatch.setitem(
        phases.PHASES, phase, replace(phases.PHASES[phase], built=False, not_built_hint="more")
    )
    out = tmp_path / "run"
    assert _cli(tiny_prepared, out, "--phase", str(phase), "--exit-policy", "gate") == 2
    err = capsys.readouterr().err
    assert f"phase {phase} ({name}) is not built yet" in err and "no other phase is run in its place" in err
    assert not out.exists()


def test_phase_two_needs_adapters_and_data_needs_one_source(tiny_prepared, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"phase 2 \(peft\) trains with finetune_mode peft, not 'full'"):
        train(
            tiny_config(phase=2, finetune_mode="full"),
            prepared_uri=tiny_prepared["prepared"],
            splits_uri=tiny_prepared["splits"],
            out_dir=str(tmp_path / "a"),
        )
    with pytest.raises(ConfigError, match="pass exactly one of --data"):
        train(
            tiny_config(),
            data_uri=tiny_prepared["data"],
            prepared_uri=tiny_prepared["prepared"],
            splits_uri=tiny_prepared["splits"],
            out_dir=str(tmp_path / "b"),
        )
    with pytest.raises(ConfigError, match="batch_size=64 does not split over 3 processes"):
        from stage1_pro.training.distributed import DistInfo, per_rank_batch

        per_rank_batch(64, DistInfo(rank=0, world_size=3))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prepared_at_another_size_is_refused(tiny_prepared, tmp_path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"was prepared with img_size=32 but the config has img_size=48; train with --img-size 32, or "
        r"re-run `stage1-pro prepare` with --img-size 48",
    ):
        train(
            tiny_config(img_size=48),
            prepared_uri=tiny_prepared["prepared"],
            splits_uri=tiny_prepared["splits"],
            out_dir=str(tmp_path),
        )


# ------------------------------------------------------------------------------------------
# a full phase-1 run from a manifest (prepare included) and what it writes


def test_phase_one_run_directory(tiny_dataset: Path, tmp_path) -> None:
    from stage1_pro.data import load_dataset
    from stage1_pro.models import load_model
    from stage1_pro.preprocessing import PreprocessSpec, preprocess
    from stage1_pro.scores import load_scores

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.parent, data)
    manifest = data / tiny_dataset.name
    splits = tmp_path / "splits.json"
    split_dataset(str(manifest), str(splits))
    dataset = load_dataset(str(manifest))
    test_rows = read_artifact(splits, "splits")["indices"]["test"]
    broken = Path(dataset.uris[test_rows[0]])
    broken.write_bytes(b"not an image")
    out = tmp_path / "run"
    summary = train(tiny_config(epochs=2), data_uri=str(manifest), splits_uri=str(splits), out_dir=str(out))

    for name in (
        "config.json",
        "splits.json",
        "metrics.csv",
        "model_best.pth",
        "model.json",
        "scores.npz",
        "checkpoints/last.pth",
        "prepared/index.json",
    ):
        assert (out / name).is_file(), name
    assert read_artifact(out / "config.json", "config")["epochs"] == 2
    assert (out / "splits.json").read_bytes() == splits.read_bytes()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in (
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_coverage_legacy",
        "val_fnr_exit_legacy",
        "lr",
    ):
        assert column in rows[0]
    assert summary["n_missing"]["test"] == 1  # the broken image is left out, the run goes on

    state = torch.load(out / "model_best.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    scores = load_scores(str(out / "scores.npz"))
    assert set(scores.split) == {"val_select", "val_calib", "test"} and not scores.has_gate
    test = scores.subset("test")
    assert len(test) == len(test_rows) - 1 and int(test_rows[0]) not in test.index.tolist()

    # inference path: load_model + preprocess on the image files gives the scores training wrote,
    # compared at the precision training scored with: fp32 on CPU, bf16 autocast on CUDA (a
    # probability near 1 then carries about 8 significant bits, not 24).
    from stage1_pro.training.distributed import resolve_device

    config = tiny_config(epochs=2)
    scored_in = engine.resolve_amp(config, resolve_device(config.device)) or torch.float32
    model = load_model(out)
    images = [dataset.uris[i] for i in test.index[:8]]
    with torch.no_grad():
        probs = torch.softmax(
            model(preprocess(PreprocessSpec.from_model_info(model.info), images))["logits"], 1
        ).numpy()
    tolerance = 1e-5 if scored_in == torch.float32 else torch.finfo(scored_in).eps
    assert np.allclose(probs, test.probs[:8], atol=tolerance)


# ------------------------------------------------------------------------------------------
# checkpoints and resume


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pth", weights_only=True)["module"]


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(
    tiny_prepared, tmp_path, monkeypatch
) -> None:
    config = tiny_config(epochs=3, augment="shift", phase=3, exit_policy="gate", selective_dual_lr=0.1)
    kwargs = {"prepared_uri": tiny_prepared["prepared"], "splits_uri": tiny_prepared["splits"]}
    train(config, out_dir=str(tmp_path / "straight"), **kwargs)

    real_epoch = engine.train_one_epoch
    calls = {"n": 0}

    def dies_in_second_epoch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("pod preempted")
        return real_epoch(*args, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=str(tmp_path / "resumed"), **kwargs)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    summary = train(config, out_dir=str(tmp_path / "resumed"), **kwargs)

    assert summary["epochs"] == 3
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pth", weights_only=True)
    assert torch.equal(a["loss"]["mu"], b["loss"]["mu"])  # the Lagrange multiplier resumes too
    keep = ("epoch", "train_loss", "val_loss", "val_accuracy")
    assert [{k: r[k] for k in keep} for r in a["rows"]] == [{k: r[k] for k in keep} for r in b["rows"]]
    assert (tmp_path / "straight" / "scores.npz").read_bytes() == (
        tmp_path / "resumed" / "scores.npz"
    ).read_bytes()


def test_resume_from_another_config_is_refused(tiny_prepared, tmp_path) -> None:
    kwargs = {
        "prepared_uri": tiny_prepared["prepared"],
        "splits_uri": tiny_prepared["splits"],
        "out_dir": str(tmp_path),
    }
    train(tiny_config(), **kwargs)
    with pytest.raises(
        ConfigError, match=r"different config or data.*lr: 0\.003 \(checkpoint\) vs 0\.001 \(now\)"
    ):
        train(tiny_config(lr=1e-3), **kwargs)
    summary = train(tiny_config(lr=1e-3), resume=False, **kwargs)  # --no-resume starts over
    assert summary["best_epoch"] == 1
    assert read_artifact(tmp_path / "config.json", "config")["lr"] == 1e-3


def test_finished_run_is_not_retrained(tiny_prepared, tmp_path, monkeypatch) -> None:
    kwargs = {
        "prepared_uri": tiny_prepared["prepared"],
        "splits_uri": tiny_prepared["splits"],
        "out_dir": str(tmp_path),
    }
    train(tiny_config(), **kwargs)
    before = (tmp_path / "model_best.pth").read_bytes()
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("retrained a finished run"))
    train(tiny_config(num_workers=1), **kwargs)  # a runtime-only setting may differ (e.g. a KFP retry)
    assert (tmp_path / "model_best.pth").read_bytes() == before


# ------------------------------------------------------------------------------------------
# frozen backbone (cached features) and PEFT


def test_frozen_backbone_trains_heads_on_cached_features(tiny_prepared, tmp_path, monkeypatch) -> None:
    from stage1_pro.models import create_model
    from stage1_pro.models.stage1 import Stage1Model

    calls = {"n": 0}
    real = Stage1Model.forward_features

    def counting(self, x):
        calls["n"] += 1
        return real(self, x)

    monkeypatch.setattr(Stage1Model, "forward_features", counting)
    config = tiny_config(finetune_mode="frozen", head_epochs=4, batch_size=16)
    train(
        config,
        prepared_uri=tiny_prepared["prepared"],
        splits_uri=tiny_prepared["splits"],
        out_dir=str(tmp_path),
    )
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 4
    n_batches = -(-100 // 32) + -(-30 // 32)  # one pass over train (100) and val_select (30), eval batch 32
    assert calls["n"] == n_batches  # features were extracted once, not per epoch (scoring uses forward)
    torch.manual_seed(config.seed)
    init = create_model(config).state_dict()
    best = torch.load(tmp_path / "model_best.pth", weights_only=True)
    assert all(
        torch.equal(best[k], init[k]) for k in init if k.startswith("backbone.") and "running" not in k
    )
    assert not torch.equal(best["heads.classifier.weight"], init["heads.classifier.weight"])


def test_phase_two_exports_merged_weights(tiny_prepared, tmp_path) -> None:
    from stage1_pro.models import load_model

    train(
        tiny_config(phase=2, model_name="test_vit", peft_method="lora", lr=1e-2),
        prepared_uri=tiny_prepared["prepared"],
        splits_uri=tiny_prepared["splits"],
        out_dir=str(tmp_path),
    )
    best = torch.load(tmp_path / "model_best.pth", weights_only=True)
    assert not any("lora" in k or "base_layer" in k for k in best)
    assert "lora" in str(
        torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)["module"].keys()
    )
    model = load_model(tmp_path)
    assert model.info["model_name"] == "test_vit"


# ------------------------------------------------------------------------------------------
# phase 3 on the embedded data


@pytest.mark.slow
def test_phase_three_gate_trains_and_does_not_collapse(demo_dataset: Path, tmp_path) -> None:
    """The local default (pretrained Lite0 @ 64 px) with the three heads on the embedded digits."""
    from stage1_pro.scores import load_scores

    splits = tmp_path / "splits.json"
    split_dataset(str(demo_dataset), str(splits))
    config = Stage1ProConfig(phase=3, exit_policy="gate", num_workers=0, log_every=1000)
    summary = train(config, data_uri=str(demo_dataset), splits_uri=str(splits), out_dir=str(tmp_path / "run"))
    assert summary["test"]["accuracy"] > 0.9
    scores = load_scores(str(tmp_path / "run" / "scores.npz"))
    assert scores.has_gate
    test = scores.subset("test")
    exits = test.gate_logit >= 0
    assert 0.02 < exits.mean() < 0.98, f"gate collapsed: coverage {exits.mean():.3f}"
    wrong = test.probs.argmax(1) != test.label
    assert wrong[~exits].mean() > 2 * wrong[exits].mean()  # the gate defers the harder images
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert {"val_gate_coverage", "val_gate_fnr_exit", "val_soft_fnr"} <= set(rows[0])


def test_empty_train_split_is_a_clear_error(tiny_prepared, tmp_path) -> None:
    with pytest.raises(DataError, match="fewer than one batch of 256; lower --batch-size"):
        train(
            tiny_config(batch_size=256),
            prepared_uri=tiny_prepared["prepared"],
            splits_uri=tiny_prepared["splits"],
            out_dir=str(tmp_path),
        )


# ------------------------------------------------------------------------------------------
# optimiser, schedule, progress


def test_adamw_groups_and_warmup_cosine_schedule() -> None:
    from stage1_pro.optim import create_optimizer, create_scheduler, warmup_cosine

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    opt = create_optimizer(model, tiny_config(lr=0.1, weight_decay=0.05))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and [p.shape for p in decayed["params"]] == [(2, 8)]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # LayerNorm weight/bias, Linear bias
    assert opt.defaults["fused"] and not opt.defaults["foreach"]  # the fused kernel on CPU too
    sched = create_scheduler(opt, tiny_config(epochs=2, warmup_epochs=0.5), updates_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])  # linear warm-up over 2 updates
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))  # then cosine decay
    assert warmup_cosine(8, 8, 2) == pytest.approx(0.0)


def test_progress_logs_lines_when_not_on_a_terminal(caplog) -> None:
    from stage1_pro.training.progress import Progress

    caplog.set_level("INFO", logger="stage1_pro.training")
    progress = Progress(5, "epoch 1/1", log_every=2)
    for _ in range(5):
        progress.update(loss=torch.tensor(0.5))
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("epoch 1/1 step 5/5") and "loss=0.5" in lines[-1]
