"""Inference from a bundle: decisions = the bundle's policy on the model's probabilities; the
contract (bundle.json first, checksums, weights_only, never a threshold from config); predict CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import make_run

from stage1_pro.artifacts import read_artifact, write_artifact
from stage1_pro.bundle import export_bundle
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, DataError
from stage1_pro.inference import Prediction, Predictor, load_bundle
from stage1_pro.models import load_model
from stage1_pro.policies import load_policy
from stage1_pro.preprocessing import PreprocessSpec, decode_image, preprocess
from stage1_pro.provenance import sha256_file


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, bundle_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for policy in ("softmax", "gate"):
        run = make_run(root / f"run-{policy}", bundle_model_dir, policy=policy)
        out[policy] = export_bundle(run, root / policy, version=f"{policy}-1")
    return out


@pytest.fixture
def bundle(bundles: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundles["softmax"], tmp_path / "bundle"))


def bare_outputs(bundle: Path, images: list[Path]) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and gate logits computed without the Predictor: model + preprocess + softmax."""
    model = load_model(bundle)
    info = read_artifact(bundle / "model.json", "model")
    with torch.no_grad():
        out = model(preprocess(PreprocessSpec.from_model_info(info), images))
    probs = torch.softmax(out["logits"], dim=1).numpy().astype(np.float64)
    gate = out.get("gate_logit")
    return probs, None if gate is None else gate.numpy().astype(np.float64)


def refresh_checksums(bundle: Path) -> None:
    meta = read_artifact(bundle / "bundle.json", "bundle")
    meta["files"] = {name: sha256_file(bundle / name) for name in meta["files"]}
    write_artifact(bundle / "bundle.json", "bundle", meta)


@pytest.mark.parametrize("policy", ["softmax", "gate"])
def test_decisions_are_the_policy_on_the_model_probabilities(
    bundles: dict[str, Path], bundle_images: list[Path], policy: str
) -> None:
    bundle = bundles[policy]
    predictor = load_bundle(bundle)
    preds = predictor.predict(bundle_images, batch_size=16)
    probs, gate = bare_outputs(bundle, bundle_images)
    expected = load_policy(str(bundle / read_artifact(bundle / "bundle.json", "bundle")["policy_file"]))
    want = np.asarray(expected.decide(probs, gate))
    got = np.array([p.decision for p in preds])
    assert len(set(want.tolist())) >= 2, "the test model should give mixed decisions"
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose([p.probs for p in preds], probs, atol=1e-5)
    assert [p.source for p in preds] == [str(p) for p in bundle_images]
    if policy == "gate":
        np.testing.assert_allclose([p.gate_logit for p in preds], gate, atol=1e-5)
        assert all(p.gate_prob is not None and 0.0 <= p.gate_prob <= 1.0 for p in preds)
    else:
        assert all(p.gate_prob is None for p in preds)


def test_input_forms_agree(bundles: dict[str, Path], bundle_images: list[Path]) -> None:
    predictor = load_bundle(bundles["softmax"])
    by_path = predictor.predict(bundle_images[:8])
    pil = [decode_image(p) for p in bundle_images[:8]]
    by_image = predictor.predict(pil, batch_size=3)
    by_tensor = predictor.predict(predictor.preprocess(pil))
    single = predictor.predict(str(bundle_images[0]))
    for a, b, c in zip(by_path, by_image, by_tensor, strict=True):
        assert a.decision == b.decision == c.decision
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
        np.testing.assert_allclose(a.probs, c.probs, atol=1e-6)
    assert single[0].decision == by_path[0].decision and len(single) == 1
    assert by_image[0].source is None
    assert predictor.predict(predictor.preprocess(pil)[0])[0].decision == by_path[0].decision  # (C, H, W)


def test_prediction_fields() -> None:
    p = Prediction(decision=1, probs=(0.1, 0.9), source="a.png")
    assert p.decision_name == "exit-positive" and p.exited
    assert Prediction(decision=-1, probs=(0.5, 0.5)).decision_name == "defer"
    assert not Prediction(decision=-1, probs=(0.5, 0.5)).exited
    skipped = Prediction(decision=None, probs=None, source="x.png", error="bad")
    assert skipped.decision_name is None and not skipped.exited
    assert skipped.to_dict() == {
        "source": "x.png", "decision": None, "p_negative": None, "p_positive": None, "confidence": None,
        "gate_prob": None, "gate_logit": None, "error": "bad",
    }  # fmt: skip


def test_config_threshold_is_never_used(bundle: Path, bundle_images: list[Path]) -> None:
    before = load_bundle(bundle).predict(bundle_images)
    config = read_artifact(bundle / "config.json", "config")
    for legacy in (0.0, 0.5, 1.0):
        write_artifact(
            bundle / "config.json", "config", {**config, "legacy_exit_threshold_for_logging": legacy}
        )
        refresh_checksums(bundle)  # a consistent bundle, so load_bundle accepts it
        after = load_bundle(bundle).predict(bundle_images)
        assert [p.decision for p in after] == [p.decision for p in before]


def test_changing_the_policy_file_changes_decisions(bundle: Path, bundle_images: list[Path]) -> None:
    """The counterpart of the test above: the policy file *is* what decides."""
    before = [p.decision for p in load_bundle(bundle).predict(bundle_images)]
    policy = read_artifact(bundle / "thresholds.json", "thresholds")
    write_artifact(bundle / "thresholds.json", "thresholds", {**policy, "exit_threshold": 1.5})
    refresh_checksums(bundle)
    after = [p.decision for p in load_bundle(bundle).predict(bundle_images)]
    assert after == [-1] * len(bundle_images) != before


@pytest.mark.parametrize("name", ["thresholds.json", "model_best.pth"])
def test_tampered_bundle_is_refused_naming_the_file(bundle: Path, name: str) -> None:
    with (bundle / name).open("ab") as fh:
        fh.write(b" ")
    with pytest.raises(ArtifactError, match=rf"{name}: sha256 mismatch"):
        load_bundle(bundle)


def test_policy_pointer_escape_is_refused(bundle: Path, tmp_path: Path) -> None:
    shutil.copyfile(bundle / "thresholds.json", tmp_path / "x.json")
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["policy_file"] = "../x.json"
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"\$\.policy_file: '\.\./x\.json' does not match"):
        load_bundle(bundle)


def test_weights_are_loaded_without_unpickling_code(bundle: Path) -> None:
    class Payload:  # any pickled object other than tensors/containers needs weights_only=False
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"weight": Payload()}, bundle / "model_best.pth")
    meta = read_artifact(bundle / "bundle.json", "bundle")
    meta["lineage"]["model_version"] = sha256_file(bundle / "model_best.pth")
    write_artifact(bundle / "bundle.json", "bundle", meta)
    refresh_checksums(bundle)
    with pytest.raises(ArtifactError, match=r"model_best.pth: not a weights-only state dict"):
        load_bundle(bundle)


def test_gate_policy_needs_a_gate_head(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(bundles["gate"], tmp_path / "gate"))
    info = read_artifact(bundle / "model.json", "model")
    write_artifact(bundle / "model.json", "model", {**info, "heads": ["classifier"]})
    refresh_checksums(bundle)
    with pytest.raises(
        ArtifactError,
        match=r"model.json: the gate policy decides on the gate head's logit, but the model's heads are "
        r"\['classifier'\]",
    ):
        load_bundle(bundle)


def test_corrupt_image_is_named_and_skipped_on_request(
    bundles: dict[str, Path], bundle_images: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    missing = tmp_path / "missing.png"
    predictor = load_bundle(bundles["softmax"])
    with pytest.raises(DataError, match=r"corrupt.png: cannot decode image"):
        predictor.predict([bundle_images[0], bad, bundle_images[1]])
    preds = predictor.predict(
        [bundle_images[0], bad, bundle_images[1], missing, bundle_images[2]], batch_size=2, skip_bad=True
    )
    assert [p.source for p in preds] == [
        str(bundle_images[0]),
        str(bad),
        str(bundle_images[1]),
        str(missing),
        str(bundle_images[2]),
    ]
    assert [p.error is None for p in preds] == [True, False, True, False, True]
    assert "corrupt.png" in preds[1].error and "missing.png" in preds[3].error
    good = predictor.predict([bundle_images[0], bundle_images[1], bundle_images[2]])
    assert [p.decision for p in preds if p.error is None] == [p.decision for p in good]


def test_bad_inputs(bundles: dict[str, Path]) -> None:
    predictor = load_bundle(bundles["softmax"])
    with pytest.raises(
        DataError, match=r"a tensor input must be float \(n, 3, 32, 32\) .*got float32 \(3, 4\)"
    ):
        predictor.predict(torch.zeros(3, 4))
    with pytest.raises(DataError, match=r"cannot read an image from a int: pass a path, a gs:// URI, bytes"):
        predictor.predict([1])
    with pytest.raises(DataError, match=r"batch_size must be >= 1"):
        predictor.predict(torch.zeros(1, 3, 32, 32), batch_size=0)
    with pytest.raises(ArtifactError, match=r"bundle.json: file not found"):
        load_bundle(Path(bundles["softmax"]).parent / "nope")


def test_input_it_was_not_calibrated_for_is_refused(
    bundles: dict[str, Path], bundle_images: list[Path]
) -> None:
    predictor = load_bundle(bundles["softmax"])  # 32 px
    calibrated = (
        "this bundle was calibrated on 32 x 32 RGB inputs \\(32 px, squash, bilinear, JPEG draft decoding"
    )
    for tensor in (torch.zeros(2, 3, 64, 64), torch.zeros(3, 224, 224), torch.zeros(1, 1, 32, 32)):
        with pytest.raises(
            DataError, match=calibrated + r".*got float32 " + re.escape(str(tuple(tensor.shape)))
        ):
            predictor.predict(tensor)
    with pytest.raises(DataError, match=r"a tensor input must be float .*got uint8 \(1, 3, 32, 32\)"):
        predictor.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert len(predictor.predict(predictor.preprocess(bundle_images[:2]))) == 2  # the spec's own tensors pass


def test_bytes_and_model_outputs_agree_with_paths(
    bundles: dict[str, Path], bundle_images: list[Path]
) -> None:
    predictor = load_bundle(bundles["gate"])
    by_path = predictor.predict(bundle_images[:6])
    by_bytes = predictor.predict([p.read_bytes() for p in bundle_images[:6]], batch_size=4)
    single = predictor.predict(bundle_images[0].read_bytes())
    probs, gate = predictor.model_outputs(bundle_images[:6], batch_size=4)
    np.testing.assert_array_equal([p.probs for p in by_bytes], [p.probs for p in by_path])
    assert single[0].probs == by_path[0].probs and by_bytes[0].source is None
    np.testing.assert_array_equal(probs, [p.probs for p in by_path])
    np.testing.assert_array_equal(gate, [p.gate_logit for p in by_path])
    assert predictor.model_outputs([])[0].shape == (0, 2)
    with pytest.raises(DataError, match=r"missing.png: file not found"):
        predictor.model_outputs([bundle_images[0], bundle_images[0].parent / "missing.png"])


def test_serving_unlike_the_scores_is_warned(
    bundles: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    bundle = bundles["softmax"]
    model, policy = load_model(bundle), load_policy(str(bundle / "thresholds.json"))
    info = read_artifact(bundle / "model.json", "model")
    with caplog.at_level("WARNING", logger="stage1_pro.inference"):
        Predictor(model, policy, {**info, "scored_with": {"device": "cpu", "precision": "fp32"}})
        Predictor(model, policy, info)  # not recorded (bundles made before it was): nothing to compare
    assert not caplog.records
    with caplog.at_level("WARNING", logger="stage1_pro.inference"):
        predictor = Predictor(model, policy, {**info, "scored_with": {"device": "cuda", "precision": "bf16"}})
    assert predictor.serving == {"device": "cpu", "precision": "fp32"}
    assert (
        "the certificate's scores were computed on cuda in bf16, but this predictor serves on cpu in fp32"
        in caplog.text
    )


def test_bundle_readme_states_the_preprocessing(bundles: dict[str, Path]) -> None:
    readme = (bundles["softmax"] / "README.md").read_text()
    assert "## Preprocessing (the certificate holds for these pixels only)" in readme
    assert (
        "'size': 32, 'resize_mode': 'squash', 'decode_mode': 'draft', 'interpolation': 'bilinear'" in readme
    )
    assert 'image.draft("RGB", (32, 32))' in readme and "resize the whole image to 32 x 32" in readme


def test_predictor_from_parts_needs_no_bundle(bundles: dict[str, Path], bundle_images: list[Path]) -> None:
    """Predictor is usable on any model + policy (what load_bundle assembles after its checks)."""
    bundle = bundles["softmax"]
    predictor = Predictor(
        load_model(bundle), load_policy(str(bundle / "thresholds.json")), read_artifact(bundle / "model.json")
    )
    assert predictor.version is None
    got = [p.decision for p in predictor.predict(bundle_images)]
    assert got == [p.decision for p in load_bundle(bundle).predict(bundle_images)]


def test_cli_predict_table_json_and_skip_bad(
    bundles: dict[str, Path], bundle_images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = str(bundles["softmax"])
    paths = [str(p) for p in bundle_images[:3]]
    assert main(["predict", "--bundle", bundle, *paths]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "decision", "p_positive", "gate_prob"]
    assert [line.split()[0] for line in table[1:]] == paths
    assert main(["predict", "--bundle", bundle, "--json", "--batch-size", "2", *paths]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = load_bundle(bundle).predict(paths)
    assert [r["decision"] for r in rows] == [p.decision_name for p in expected]
    assert [r["source"] for r in rows] == paths

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert main(["predict", "--bundle", bundle, paths[0], str(bad), paths[1]]) == 2
    assert "broken.jpg: cannot decode image" in capsys.readouterr().err
    assert main(["predict", "--bundle", bundle, "--json", "--skip-bad", paths[0], str(bad), paths[1]]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in rows] == [paths[0], str(bad), paths[1]]
    assert rows[1]["decision"] is None and "broken.jpg" in rows[1]["error"]
    assert [rows[0]["decision"], rows[2]["decision"]] == [p.decision_name for p in expected[:2]]
