"""Champion vs challenger on the same data: the champion bundle re-scores this run's JPEGs with its
own preprocessing, is re-certified on this val_calib, and both are audited on the same test split.

The world (``champion_world`` in conftest.py, built by ``tests/retrain_helpers.py``): a champion
bundle certified on 1,000 JPEG digits whose labels its model predicts well. Challengers are runs on
the *same* manifest and splits with other scores: a weaker one (the champion's scores with noise on
the logit) and a stronger one (near-oracle scores).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from retrain_helpers import DATASET_SIZE, image_run, write_manifest

from stage1_pro.artifacts import read_artifact
from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, DataError
from stage1_pro.validate import validate_run

pytestmark = pytest.mark.slow


def challenger(world: dict, root: Path, name: str, probs: np.ndarray) -> Path:
    """A calibrated, not yet validated, run on the world's dataset with these per-row probabilities."""
    gate = world["gate"][:DATASET_SIZE]
    return image_run(root / name, world["model_dir"], world["manifest"], probs, gate, validate=False)


def weaker_probs(world: dict) -> np.ndarray:
    p1 = world["probs"][:DATASET_SIZE, 1]
    logit = np.log(p1 / (1 - p1)) + np.random.default_rng(7).normal(0.0, 1.0, p1.size)
    p1 = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p1, p1], axis=1)


def stronger_probs(world: dict) -> np.ndarray:
    labels = world["labels"][:DATASET_SIZE]
    margin = np.random.default_rng(8).normal(6.0, 1.0, labels.size) * np.where(labels == 1, 1, -1)
    p1 = 1 / (1 + np.exp(-margin))
    return np.stack([1 - p1, p1], axis=1)


def checks(v: dict) -> dict[str, dict]:
    return {c["name"]: c for c in v["checks"]}


@pytest.fixture(scope="module")
def challengers(champion_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("challengers")
    return {
        "weaker": challenger(champion_world, root, "weaker", weaker_probs(champion_world)),
        "stronger": challenger(champion_world, root, "stronger", stronger_probs(champion_world)),
    }


def test_weaker_challenger_is_refused_and_a_stronger_one_blessed(
    champion_world: dict, challengers: dict[str, Path], tmp_path: Path
) -> None:
    champion = champion_world["bundle"]
    own = read_artifact(champion_world["run"] / "validation.json", "validation")

    weak = validate_run(Path(shutil.copytree(challengers["weaker"], tmp_path / "weak")), champion=champion)
    assert not weak["blessed"]
    failed = {c["name"] for c in weak["checks"] if not c["passed"]}
    assert failed == {"champion_coverage"}  # its own certificate holds: the champion is what it loses to
    side = weak["champion"]
    assert side["version"] == "champ" and side["n_rescored"] == 900 and side["feasible"]
    # the champion re-scored from the JPEG files, refit on the same val_select and re-certified on
    # the same val_calib at the same target, lands exactly where its own validation did
    assert side["test_metrics"]["coverage"] == pytest.approx(own["test_metrics"]["coverage"])
    assert side["certificate"]["upper_bound"] == pytest.approx(own["certificate"]["upper_bound"])
    assert side["coverage_difference"] == pytest.approx(
        weak["test_metrics"]["coverage"] - side["test_metrics"]["coverage"]
    )
    assert side["coverage_difference"] < -DEFAULT_CHAMPION_TOLERANCE
    check = checks(weak)["champion_coverage"]
    assert check["limit"] == pytest.approx(side["test_metrics"]["coverage"] - DEFAULT_CHAMPION_TOLERANCE)
    expected = f"vs champion champ {side['test_metrics']['coverage']:.4f} on the same 300 test images"
    assert expected in check["message"]
    assert side["overlap"] == "none" and side["n_excluded"] == 0  # same dataset, same splits

    strong = validate_run(
        Path(shutil.copytree(challengers["stronger"], tmp_path / "strong")), champion=champion
    )
    assert strong["blessed"] and checks(strong)["champion_coverage"]["passed"]
    assert strong["champion"]["test_metrics"]["coverage"] == pytest.approx(own["test_metrics"]["coverage"])
    assert strong["test_metrics"]["coverage"] >= strong["champion"]["test_metrics"]["coverage"]
    # both figures, side by side, in validation.json and the report
    written = read_artifact(tmp_path / "strong" / "validation.json", "validation")
    assert written["champion"] == strong["champion"] and written["rule"]["champion_tolerance"] == 0.02
    report = (tmp_path / "strong" / "report.html").read_text()
    assert "Champion vs challenger (same test split)" in report
    assert f"{strong['champion']['test_metrics']['coverage']:.4f}" in report
    assert f"{strong['test_metrics']['coverage']:.4f}" in report


def test_cli_with_a_published_champion(
    champion_world: dict, challengers: dict[str, Path], tmp_path: Path, capsys, gcs_emulator
) -> None:
    """--champion gs://.../latest: pulled and verified from the registry (fake-gcs-server)."""
    from stage1_pro.registry import publish

    prefix = gcs_emulator.make_bucket() + "/bundles/stage1"
    publish(champion_world["bundle"], prefix)
    run = Path(shutil.copytree(challengers["weaker"], tmp_path / "weak"))
    args = [
        "validate",
        "--run",
        str(run),
        "--champion",
        f"{prefix}/latest",
        "--data",
        str(champion_world["manifest"]),
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  champion_coverage" in out and "vs champion champ" in out
    assert main([*args, "--champion-tolerance", "1"]) == 0  # a tolerance that forgives everything
    assert "PASS  champion_coverage" in capsys.readouterr().out


def test_first_run_nothing_published_yet(challengers: dict[str, Path], tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    v = validate_run(Path(shutil.copytree(challengers["stronger"], tmp_path / "run")), champion=registry)
    assert v["blessed"] and "champion_coverage" not in checks(v)
    assert v["champion"] == {
        "uri": str(registry),
        "note": "nothing published under this prefix yet: not compared",
    }


def test_champion_bad_input(
    champion_world: dict, challengers: dict[str, Path], tmp_path: Path, capsys
) -> None:
    run = Path(shutil.copytree(challengers["weaker"], tmp_path / "run"))
    before = (run / "scores.npz").read_bytes()
    with pytest.raises(ArtifactError, match=r"no-such-bundle: no bundle here"):
        validate_run(run, champion=tmp_path / "no-such-bundle")
    # a dataset other than the one the splits were made for
    other = write_manifest(
        tmp_path / "other.csv", champion_world["new"], champion_world["labels"][DATASET_SIZE:]
    )
    with pytest.raises(DataError, match=r"made for dataset .* the data changed"):
        validate_run(run, champion=champion_world["bundle"], data=other)
    assert not (run / "validation.json").exists() and (run / "scores.npz").read_bytes() == before
    code = main(
        ["validate", "--run", str(run), "--champion", str(champion_world["bundle"]), "--data", str(other)]
    )
    assert code == 2 and "the data changed" in capsys.readouterr().err


def test_images_the_champion_was_fitted_on_are_left_out(
    champion_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dataset grew by 400 images and was split again: some of the champion's training images now
    sit in this run's val_calib and test. They are left out for both models; if the champion's
    manifest cannot be read back, the comparison says it could not check."""
    from stage1_pro import data as data_module
    from stage1_pro.errors import DataError as DataErr

    world = champion_world
    grown = write_manifest(tmp_path / "grown.csv", world["pool"], world["labels"])
    run = image_run(
        tmp_path / "grown-run", world["model_dir"], grown, world["probs"], world["gate"], validate=False
    )
    splits = read_artifact(run / "splits.json", "splits")
    old = read_artifact(world["bundle"] / "splits.json", "splits")
    old_uris = [str(p) for p in world["pool"][:DATASET_SIZE]]
    fitted = {old_uris[i] for s in ("train", "val_select") for i in old["indices"][s]}
    new_uris = [str(p) for p in world["pool"]]
    in_split = {s: sum(new_uris[i] in fitted for i in splits["indices"][s]) for s in ("val_calib", "test")}
    assert in_split["test"] > 0 and in_split["val_calib"] > 0

    v = validate_run(run, champion=world["bundle"])
    side = v["champion"]
    assert side["overlap"] == "excluded" and side["n_excluded"] == sum(in_split.values())
    n_test = len(splits["indices"]["test"]) - in_split["test"]
    assert (
        side["test_metrics"]["n"] == side["challenger_test_metrics"]["n"] == n_test < v["test_metrics"]["n"]
    )
    assert side["coverage_difference"] == pytest.approx(
        side["challenger_test_metrics"]["coverage"] - side["test_metrics"]["coverage"]
    )
    assert (
        f"{side['n_excluded']} images the champion was fitted on left out for both"
        in (checks(v)["champion_coverage"]["message"])
    )

    real = data_module.load_dataset

    def champion_manifest_gone(uri, check_files=True):
        if str(uri) == old["dataset"]["source"]:
            raise DataErr(f"{uri}: no such file or folder")
        return real(uri, check_files=check_files)

    monkeypatch.setattr(data_module, "load_dataset", champion_manifest_gone)
    v = validate_run(run, champion=world["bundle"], data=grown)
    assert v["champion"]["overlap"] == "unknown" and v["champion"]["n_excluded"] == 0
    assert "could not be identified" in checks(v)["champion_coverage"]["message"]


def test_the_champion_is_certified_for_this_runs_guard(champion_world: dict) -> None:
    """The run's max_fpr_exit reaches the champion's re-certification, not the default guard."""
    from stage1_pro.champion import rescore_champion
    from stage1_pro.defaults import DEFAULT_MAX_FPR_EXIT

    world = champion_world
    splits = read_artifact(world["run"] / "splits.json", "splits")
    guard = 0.5
    assert guard != DEFAULT_MAX_FPR_EXIT
    found = rescore_champion(
        world["bundle"], data=world["manifest"], splits=splits, target_fnr_exit=0.02, delta=0.1,
        max_fpr_exit=guard,
    )  # fmt: skip
    assert found.policy.max_fpr_exit == guard and found.policy.certificate_["max_fpr_exit"] == guard
