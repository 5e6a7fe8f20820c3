"""Bundle export and verification: contents, lineage, refusals, tamper detection, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import build_tiny_model, make_run, tiny_images

from stage1_pro.artifacts import read_artifact, write_artifact
from stage1_pro.bundle import export_bundle, verify_bundle
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"), tiny_images(tiny_dataset))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", model_dir, policy="softmax")


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of a validated, blessed softmax run."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def base_bundle(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(base_run, tmp_path_factory.mktemp("bundles") / "b", version="v1")


@pytest.fixture
def bundle(base_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_bundle, tmp_path / "bundle"))


def rewrite_bundle_json(bundle: Path, **changes) -> None:
    """Change fields of bundle.json (bypassing export) and refresh the checksums of edited files."""
    meta = read_artifact(bundle / "bundle.json", "bundle")
    meta.update(changes)
    meta["files"] = {name: sha(bundle / name) for name in meta["files"] if (bundle / name).exists()}
    write_artifact(bundle / "bundle.json", "bundle", meta)


# ---------------------------------------------------------------------------------------------
# export


def test_export_contents_lineage_and_checksums(base_run: Path, base_bundle: Path) -> None:
    meta = verify_bundle(base_bundle)
    names = {p.name for p in base_bundle.iterdir()}
    expected = {
        "bundle.json", "config.json", "splits.json", "metrics.csv", "model_best.pth", "model.json",
        "thresholds.json", "validation.json", "report.html", "model_card.md", "risk_coverage.png",
        "confusion.png", "README.md", "score_reference.json",
    }  # fmt: skip
    assert names == expected
    assert set(meta["files"]) == expected - {"bundle.json"}
    for name, digest in meta["files"].items():
        assert sha(base_bundle / name) == digest, name
    # copied byte for byte from the run
    for name in ("thresholds.json", "model_best.pth", "config.json", "validation.json"):
        assert (base_bundle / name).read_bytes() == (base_run / name).read_bytes()
    splits = read_artifact(base_run / "splits.json", "splits")
    assert meta["lineage"]["data_fingerprint"] == splits["dataset"]["fingerprint"]
    assert meta["lineage"]["splits_version"] == splits["splits_version"]
    assert meta["lineage"]["model_version"] == sha(base_run / "model_best.pth")
    assert meta["active_exit_policy"] == "softmax" and meta["policy_file"] == "thresholds.json"
    assert meta["version"] == "v1" and meta["blessed"] is True
    readme = (base_bundle / "README.md").read_text()
    assert "Inference contract" in readme and "legacy_exit_threshold_for_logging" in readme
    assert "certified for FNR_exit <= 0.02 and FPR_exit <=\n0.25" in readme
    assert "the audit did not reject the certified bounds at level 0.05 (power" in readme
    assert not [p for p in base_bundle.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_default_version_is_time_and_model_hash(run: Path, tmp_path: Path) -> None:
    meta = verify_bundle(export_bundle(run, tmp_path / "b"))
    assert meta["version"].endswith("-" + sha(run / "model_best.pth")[:8])


def test_export_into_existing_empty_folder(run: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert verify_bundle(export_bundle(run, tmp_path / "out", version="v2"))["version"] == "v2"


def test_export_refuses_a_second_policy_file(run: Path, tmp_path: Path) -> None:
    shutil.copyfile(run / "thresholds.json", run / "gateparams.json")
    with pytest.raises(ArtifactError, match=r"2 policy files \(gateparams.json, thresholds.json\).*mutually"):
        export_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_policy_that_does_not_match_the_config(run: Path, tmp_path: Path) -> None:
    config = read_artifact(run / "config.json", "config")
    write_artifact(run / "config.json", "config", {**config, "exit_policy": "gate"})
    with pytest.raises(ArtifactError, match=r"holds thresholds.json but config.json says exit_policy='gate'"):
        export_bundle(run, tmp_path / "b")


def test_export_refuses_a_run_without_policy_or_validation(run: Path, tmp_path: Path) -> None:
    (run / "validation.json").unlink()
    with pytest.raises(ArtifactError, match=r"validation.json: not found; run 'stage1-pro validate"):
        export_bundle(run, tmp_path / "b")
    (run / "thresholds.json").unlink()
    with pytest.raises(ArtifactError, match=r"no policy file .*calibrate --policy softmax"):
        export_bundle(run, tmp_path / "b")


def test_export_refuses_a_stale_validation(run: Path, tmp_path: Path) -> None:
    policy = read_artifact(run / "thresholds.json", "thresholds")
    write_artifact(run / "thresholds.json", "thresholds", {**policy, "exit_threshold": 0.5})
    with pytest.raises(ArtifactError, match=r"thresholds.json: changed since validation.json was written"):
        export_bundle(run, tmp_path / "b")


def test_export_refuses_unblessed_unless_allowed(model_dir: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", model_dir, calibrate_kwargs={"target_fnr_exit": 0.05})
    assert read_artifact(run / "validation.json", "validation")["blessed"] is False
    with pytest.raises(
        ArtifactError,
        match=r"not blessed by validation \(\d failed check\(s\): certified for target 0.05",
    ):
        export_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    meta = verify_bundle(export_bundle(run, tmp_path / "b", allow_unblessed=True))
    assert meta["blessed"] is False
    assert "NO** (exported with --allow-unblessed" in (tmp_path / "b" / "README.md").read_text()


def test_export_refuses_a_non_empty_destination(run: Path, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"already exists and is not an empty folder"):
        export_bundle(run, tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundles" / "b"
    with pytest.raises(ArtifactError, match=r"\$\.version: 'bad/version' does not match"):
        export_bundle(run, out, version="bad/version")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the temporary build folder is gone too


# ---------------------------------------------------------------------------------------------
# verify (what load_bundle, publish and pull call first)


@pytest.mark.parametrize("name", ["thresholds.json", "model_best.pth", "config.json", "README.md"])
def test_tampered_file_is_named(bundle: Path, name: str) -> None:
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{name}: sha256 mismatch"):
        verify_bundle(bundle)


def test_tampered_policy_value_is_caught(bundle: Path) -> None:
    policy = json.loads((bundle / "thresholds.json").read_text())
    policy["exit_threshold"] = 0.51  # still schema-valid: only the checksum can tell
    (bundle / "thresholds.json").write_text(json.dumps(policy))
    with pytest.raises(ArtifactError, match=r"thresholds.json: sha256 mismatch"):
        verify_bundle(bundle)


@pytest.mark.parametrize("pointer", ["../x.json", "sub/thresholds.json", "..", "/etc/passwd"])
def test_pointer_escape_is_rejected(bundle: Path, pointer: str) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["policy_file"] = pointer
    (bundle / "bundle.json").write_text(json.dumps(meta))
    expected = rf"(?s)bundle.json: invalid bundle artifact.*\$\.policy_file: '{re.escape(pointer)}' does not"
    with pytest.raises(ArtifactError, match=expected):
        verify_bundle(bundle)


def test_pointer_not_listed_in_files_is_rejected(bundle: Path) -> None:
    meta = read_artifact(bundle / "bundle.json", "bundle")
    del meta["files"]["model.json"]
    write_artifact(bundle / "bundle.json", "bundle", meta)
    with pytest.raises(ArtifactError, match=r"model_info_file='model.json' is not listed under 'files'"):
        verify_bundle(bundle)


def test_second_policy_file_in_bundle_is_rejected(bundle: Path) -> None:
    shutil.copyfile(bundle / "thresholds.json", bundle / "scrcparams.json")
    with pytest.raises(ArtifactError, match=r"holds scrcparams.json beside the active thresholds.json"):
        verify_bundle(bundle)
    # even when someone also lists it with a correct checksum
    rewrite_bundle_json(bundle)
    meta = read_artifact(bundle / "bundle.json", "bundle")
    meta["files"]["scrcparams.json"] = sha(bundle / "scrcparams.json")
    write_artifact(bundle / "bundle.json", "bundle", meta)
    with pytest.raises(ArtifactError, match=r"exactly one policy file"):
        verify_bundle(bundle)


def test_unlisted_missing_and_symlinked_files(bundle: Path) -> None:
    (bundle / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"notes.txt: not listed in bundle.json"):
        verify_bundle(bundle)
    (bundle / "notes.txt").unlink()
    (bundle / "notes.txt").symlink_to(bundle / "README.md")
    with pytest.raises(ArtifactError, match=r"notes.txt: is a symbolic link"):
        verify_bundle(bundle)
    (bundle / "notes.txt").unlink()
    (bundle / "metrics.csv").unlink()
    with pytest.raises(ArtifactError, match=r"metrics.csv: listed in bundle.json but missing"):
        verify_bundle(bundle)


def test_blessed_flag_must_agree_with_validation(model_dir: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", model_dir, calibrate_kwargs={"target_fnr_exit": 0.05})
    bundle = export_bundle(run, tmp_path / "b", allow_unblessed=True)
    rewrite_bundle_json(bundle, blessed=True)
    with pytest.raises(ArtifactError, match=r"says blessed: true but validation.json says the run failed"):
        verify_bundle(bundle)


def test_invalid_policy_json_inside_bundle_is_rejected(bundle: Path) -> None:
    policy = json.loads((bundle / "thresholds.json").read_text())
    policy["delta"] = 0.9
    (bundle / "thresholds.json").write_text(json.dumps(policy))
    rewrite_bundle_json(bundle)  # checksums match: the schema must still catch it
    with pytest.raises(ArtifactError, match=r"(?s)thresholds.json: invalid thresholds artifact.*\$\.delta"):
        verify_bundle(bundle)


# ---------------------------------------------------------------------------------------------
# CLI and script


def test_cli_export(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b"), "--version", "cli-1"]) == 0
    assert "bundle cli-1: policy softmax (thresholds.json), blessed=True" in capsys.readouterr().out
    shutil.copyfile(run / "thresholds.json", run / "scrcparams.json")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "c")]) == 2
    assert "mutually exclusive" in capsys.readouterr().err


def test_script_50_export_bundle(run: Path, tmp_path: Path) -> None:
    script = REPO / "stage1_pro" / "scripts" / "50_export_bundle.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), "--run", str(run), "--out", str(tmp_path / "b"), "--version", "s1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_bundle(tmp_path / "b")["version"] == "s1"
