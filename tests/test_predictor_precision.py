"""The Predictor's device options: precision (bf16 autocast), compile, and the predict CLI flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import build_tiny_model, make_run, tiny_images

from stage1_pro.bundle import export_bundle
from stage1_pro.cli import main
from stage1_pro.errors import ConfigError
from stage1_pro.inference import load_bundle


@pytest.fixture(scope="module")
def images(tiny_dataset: Path) -> list[Path]:
    return tiny_images(tiny_dataset, count=16)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Path:
    root = tmp_path_factory.mktemp("precision")
    run = make_run(root / "run", build_tiny_model(root / "model", images), policy="softmax")
    return export_bundle(run, root / "bundle", version="p-1")


def test_bf16_on_cpu_is_close_to_fp32_and_auto_is_fp32_off_cuda(bundle: Path, images: list[Path]) -> None:
    fp32 = load_bundle(bundle, precision="fp32")
    auto = load_bundle(bundle)
    bf16 = load_bundle(bundle, precision="bf16")
    assert auto.autocast_dtype is None and fp32.autocast_dtype is None and bf16.autocast_dtype is not None
    x = fp32.preprocess(images)
    p32, _ = fp32.forward(x)
    pa, _ = auto.forward(x)
    p16, _ = bf16.forward(x)
    np.testing.assert_array_equal(pa, p32)
    assert p16.dtype == np.float64 and np.allclose(p16.sum(axis=1), 1.0)
    # bf16 keeps 8 bits of mantissa: the logits move by ~1 %, a probability by up to ~0.1 near 0.5
    assert 0 < np.abs(p16 - p32).max() < 0.1
    decisions = [p.decision for p in bf16.predict(x)]
    assert len(decisions) == len(images)


def test_unknown_precision_names_the_choices(bundle: Path) -> None:
    with pytest.raises(ConfigError, match=r"precision='fp16'; allowed: auto, fp32, bf16"):
        load_bundle(bundle, precision="fp16")


def test_predict_cli_takes_precision_and_refuses_a_bad_one(bundle: Path, images: list[Path], capsys) -> None:
    assert (
        main(["predict", "--bundle", str(bundle), "--precision", "bf16", "--json", *map(str, images[:3])])
        == 0
    )
    assert capsys.readouterr().out.count('"decision"') == 3
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--bundle", str(bundle), "--precision", "fp16", str(images[0])])
    assert exc.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_auto_follows_the_scores_precision_on_their_device_and_warns_otherwise(bundle: Path, caplog) -> None:
    from stage1_pro.inference import Predictor

    loaded = load_bundle(bundle)
    scored_bf16_cpu = {**loaded.model_info, "scored_with": {"device": "cpu", "precision": "bf16"}}
    auto = Predictor(loaded.model, loaded.policy, scored_bf16_cpu)
    assert auto.serving == {"device": "cpu", "precision": "bf16"}
    scored_on_gpu = {**loaded.model_info, "scored_with": {"device": "cuda", "precision": "bf16"}}
    with caplog.at_level("WARNING", logger="stage1_pro.inference"):
        cpu = Predictor(loaded.model, loaded.policy, scored_on_gpu)
    assert cpu.serving == {"device": "cpu", "precision": "fp32"}
    assert "computed on cuda in bf16, but this predictor serves on cpu in fp32" in caplog.text
