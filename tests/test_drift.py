"""``stage1-pro drift`` end to end on JPEG photos: the bundle's score reference, consistent and
shifted (blurred, colour-cast, another class balance) new images, the plot, bad input.

The champion bundle (``champion_world`` in conftest.py) was certified on 400 val_calib JPEGs; the
new images are 400 other digits from the same pool, never seen by the run. One consistent sample
can raise a false alarm with probability <= level (0.01 here, a fixed seed); the rate itself is
tested over many draws in test_exchangeability.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stage1_pro.artifacts import read_artifact, write_artifact
from stage1_pro.bundle import verify_bundle
from stage1_pro.cli import main
from stage1_pro.layout import DRIFT_FILE, DRIFT_PLOT_FILE, DRIFT_REPORT_FILE, SCORE_REFERENCE_FILE
from stage1_pro.policies import load_policy
from stage1_pro.scores import load_scores

pytestmark = pytest.mark.slow


def transformed(world: dict, out: Path, transform) -> Path:
    """The world's new images, each passed through ``transform`` (a PIL image -> PIL image), as JPEGs."""
    out.mkdir(parents=True, exist_ok=True)
    for path in world["new"]:
        transform(Image.open(path).convert("RGB")).save(out / path.name, format="JPEG", quality=90)
    return out


def colour_cast(image: Image.Image) -> Image.Image:
    cast = np.array([1.0, 0.5, 0.2])  # a strong sodium-light cast
    pixels = np.asarray(image, dtype=np.float64) * cast
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def drift(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["drift", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def champion_drift(
    champion_world: dict, capsys: pytest.CaptureFixture[str], data: Path, out: Path
) -> tuple[int, str, dict]:
    """``stage1-pro drift`` of ``data`` against the champion bundle: exit code, stdout, drift.json."""
    code, stdout, _ = drift(
        capsys, "--bundle", str(champion_world["bundle"]), "--data", str(data), "--out", str(out)
    )
    return code, stdout, read_artifact(out / DRIFT_FILE, "drift")


def test_bundle_carries_its_val_calib_score_reference(champion_world: dict) -> None:
    bundle, run = champion_world["bundle"], champion_world["run"]
    meta = verify_bundle(bundle)
    assert meta["score_reference_file"] == SCORE_REFERENCE_FILE and SCORE_REFERENCE_FILE in meta["files"]
    reference = read_artifact(bundle / SCORE_REFERENCE_FILE, "score_reference")
    calib = load_scores(str(run / "scores.npz")).subset("val_calib")
    policy = load_policy(run / "thresholds.json")
    assert reference["n"] == len(calib) == 400
    np.testing.assert_array_equal(reference["exit_score"], policy.confidence(calib.probs))
    np.testing.assert_array_equal(reference["p_positive"], calib.probs[:, 1])
    validation = read_artifact(run / "validation.json", "validation")
    assert reference["exit_rate"] == pytest.approx(validation["val_calib_metrics"]["coverage"])


def test_new_images_like_val_calib_are_consistent(
    champion_world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = transformed(champion_world, tmp_path / "same", lambda im: im)
    out = tmp_path / "report"
    code, stdout, report = champion_drift(champion_world, capsys, same, out)
    assert code == 0, stdout
    assert stdout.startswith("CONSISTENT: 400 new images vs 400 val_calib images of bundle champ")
    assert report["drift"] is False and report["n_new"] == 400 and report["plot_file"] == DRIFT_PLOT_FILE
    assert [t["name"] for t in report["tests"]] == ["exit_score", "p_positive", "exit_rate"]
    assert all(t["level"] == pytest.approx(0.01 / 3) for t in report["tests"])
    with Image.open(out / DRIFT_PLOT_FILE) as png:
        assert png.format == "PNG" and png.size[0] > 600
    assert "data:image/png;base64," in (out / DRIFT_REPORT_FILE).read_text()


@pytest.mark.parametrize(
    ("name", "transform"),
    [("blur", lambda im: im.filter(ImageFilter.GaussianBlur(1.5))), ("colour-cast", colour_cast)],
    ids=["blur", "colour-cast"],
)
def test_shifted_images_are_detected(
    champion_world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, transform
) -> None:
    shifted = transformed(champion_world, tmp_path / name, transform)
    code, stdout, report = champion_drift(champion_world, capsys, shifted, tmp_path / "report")
    assert code == 3, stdout
    assert stdout.startswith("DRIFT DETECTED: 400 new images")
    assert report["drift"] and any(t["drift"] and t["p_value"] <= t["level"] for t in report["tests"])
    print(stdout)  # which test moved, for the log


def test_a_changed_class_balance_is_detected(
    champion_world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only positives (by the world's labels) in a label-free manifest (a bare ``uri`` column)."""
    labels = champion_world["labels"][-len(champion_world["new"]) :]
    positives = [p for p, y in zip(champion_world["new"], labels, strict=True) if y == 1]
    manifest = tmp_path / "new.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in positives), encoding="utf-8")
    code, stdout, _ = champion_drift(champion_world, capsys, manifest, tmp_path / "r")
    assert code == 3, stdout
    assert f"DRIFT DETECTED: {len(positives)} new images" in stdout
    assert "DRIFT  p_positive" in stdout


def test_bundle_from_a_registry_and_a_sample_of_the_images(
    champion_world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stage1_pro.registry import publish

    prefix = str(tmp_path / "registry")
    publish(champion_world["bundle"], prefix)
    same = transformed(champion_world, tmp_path / "same", lambda im: im)
    code, stdout, _ = drift(
        capsys,
        "--bundle",
        prefix,
        "--data",
        str(same),
        "--max-images",
        "120",
        "--out",
        str(tmp_path / "r"),
        "--json",
    )
    report = json.loads(stdout)
    assert code == 0 and report["bundle_version"] == "champ"
    assert report["n_new"] == 120 and report["n_available"] == 400
    assert report["underpowered"] is True and report["n_needed"] is None  # 400 reference images: too few


def test_bad_input(champion_world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = str(champion_world["bundle"])
    same = transformed(champion_world, tmp_path / "same", lambda im: im)

    def refused(args: list[str], message: str) -> None:
        code, _, err = drift(capsys, *args, "--out", str(tmp_path / "r"))
        assert code == 2 and message in err, err
        assert not (tmp_path / "r" / DRIFT_FILE).exists()

    refused(["--bundle", bundle, "--data", str(tmp_path / "nope")], "nope: no such file or folder")
    refused(["--bundle", bundle, "--data", str(same), "--level", "0.9"], "level=0.9 is outside (0, 0.5]")
    refused(["--bundle", str(tmp_path / "no-bundle"), "--data", str(same)], "no-bundle: no bundle here")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    refused(["--bundle", bundle, "--data", str(empty)], "empty: no images found")

    # a bundle exported before bundles carried a score reference
    old = Path(shutil.copytree(bundle, tmp_path / "old"))
    meta = read_artifact(old / "bundle.json", "bundle")
    del meta["score_reference_file"], meta["files"][SCORE_REFERENCE_FILE]
    (old / SCORE_REFERENCE_FILE).unlink()
    write_artifact(old / "bundle.json", "bundle", meta)
    refused(
        ["--bundle", str(old), "--data", str(same)],
        "no score_reference_file — bundle champ was exported before",
    )

    # an unreadable image stops the check, naming it; --skip-bad goes on
    broken = Path(shutil.copytree(same, tmp_path / "broken"))
    (broken / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    refused(["--bundle", bundle, "--data", str(broken)], "zz-broken.jpg: cannot decode image")
    code, _, _ = drift(
        capsys, "--bundle", bundle, "--data", str(broken), "--skip-bad", "--out", str(tmp_path / "s")
    )
    assert code == 0 and read_artifact(tmp_path / "s" / DRIFT_FILE, "drift")["n_skipped"] == 1
