"""The blessing gate: metrics on test from stage1_pro.metrics, the rule's checks, the gamed
policy, reports, bad input (the champion comparison: test_champion.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import gaussian_scores, make_run
from PIL import Image

from stage1_pro import metrics, validate
from stage1_pro.artifacts import read_artifact
from stage1_pro.bundle import POLICY_FILES
from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.cli import main
from stage1_pro.decisions import argmax_class
from stage1_pro.errors import ArtifactError, ConfigError, DataError, StorageError
from stage1_pro.policies import load_policy
from stage1_pro.scores import load_scores, save_scores
from stage1_pro.validate import validate_run

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("softmax", "gate", "scrc")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {p: make_run(root / p, policy=p) for p in POLICIES}


@pytest.fixture
def run(runs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs["softmax"], tmp_path / "run"))


def checks(v: dict) -> dict[str, dict]:
    return {c["name"]: c for c in v["checks"]}


def failed(v: dict) -> set[str]:
    return {c["name"] for c in v["checks"] if not c["passed"]}


@pytest.mark.parametrize("policy", POLICIES)
def test_blessed_run_reports_the_metrics_of_the_policy_on_test(runs: dict[str, Path], policy: str) -> None:
    run = runs[policy]
    v = read_artifact(run / "validation.json", "validation")
    config = read_artifact(run / "config.json", "config")
    pol = load_policy(run / POLICY_FILES[policy])
    test = load_scores(str(run / "scores.npz")).subset("test")
    decisions = pol.decide(test.probs, test.gate_logit)
    direct = metrics.exit_metrics(decisions, test.label)

    assert v["blessed"] is True and failed(v) == set()
    assert v["exit_policy"] == policy and v["policy_file"] == POLICY_FILES[policy]
    for key in (
        "n",
        "n_exited",
        "n_exited_positives",
        "n_false_negatives",
        "coverage",
        "fnr_exit",
        "fpr_exit",
    ):
        assert v["test_metrics"][key] == pytest.approx(direct[key]), key
    assert 0 < v["test_metrics"]["coverage"] < 1 and v["test_metrics"]["n_exited_positives"] > 0
    k, n = direct["n_false_negatives"], direct["n_exited_positives"]
    assert v["test_metrics"]["fnr_exit_upper_bound"] == pytest.approx(
        metrics.clopper_pearson_upper(k, n, config["delta"])
    )
    assert v["test_metrics"]["aurc"] == pytest.approx(
        metrics.aurc(pol.confidence(test.probs, test.gate_logit), test.label, argmax_class(test.probs))
    )
    # the confusion matrix is the decisions against the labels
    matrix = np.array(v["confusion"]["matrix"])
    assert matrix.sum() == len(test.label)
    assert matrix[1, 0] == k and matrix[:, 2].sum() == int((decisions == -1).sum())
    assert v["confusion"]["columns"] == ["exit-negative", "exit-positive", "defer"]
    # the deployed point lies on the curve
    rc = v["risk_coverage"]
    assert len(rc["coverage"]) == len(rc["fnr_exit"]) == len(rc["selective_risk"]) <= validate.CURVE_POINTS
    assert rc["operating_point"]["coverage"] == v["test_metrics"]["coverage"]
    # val_calib metrics agree with the policy file's own record
    assert v["val_calib_metrics"]["coverage"] == pytest.approx(pol.val_calib_metrics_["coverage"])
    # the judged files are pinned
    for name, digest in v["inputs"].items():
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digest
    assert set(v["inputs"]) >= {
        "config.json",
        "splits.json",
        "scores.npz",
        "model_best.pth",
        v["policy_file"],
    }


def test_report_model_card_and_figures(runs: dict[str, Path]) -> None:
    run = runs["gate"]
    v = read_artifact(run / "validation.json", "validation")
    assert v["report_file"] == "report.html" and v["model_card_file"] == "model_card.md"
    assert v["figures"] == ["risk_coverage.png", "confusion.png"]
    for name in v["figures"]:
        with Image.open(run / name) as img:
            assert img.format == "PNG" and img.size[0] > 300
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # self-contained (KFP UI shows it alone)
    assert "BLESSED" in html and "test_fnr_exit" in html and "gate exit policy" in html
    card = (run / "model_card.md").read_text()
    for section in ("## Intended use", "## Guarantee", "## Test audit", "## Limitations"):
        assert section in card
    assert f"{v['test_metrics']['coverage']:.4f}" in card
    assert "- Preprocessing: 32 px, squash, bilinear, JPEG draft decoding, EXIF orientation applied" in card


def test_markdown_report(run: Path) -> None:
    v = validate_run(run, report_format="md")
    assert v["report_file"] == "report.md"
    md = (run / "report.md").read_text()
    assert "![risk_coverage.png](risk_coverage.png)" in md and "| test_fnr_exit | PASS |" in md


def always_positive_scores(prevalence: float, n: int = 1000, seed: int = 1) -> dict[str, np.ndarray]:
    """A degenerate classifier: every image 'positive' with probability ~0.99."""
    scores = gaussian_scores(n, seed, prevalence=prevalence)
    rng = np.random.default_rng(seed)
    p1 = 0.985 + 0.01 * rng.random(len(scores["label"]))
    scores["probs"] = np.stack([1 - p1, p1], axis=1)
    return scores


@pytest.mark.parametrize(
    ("prevalence", "expected_failures"),
    [(0.3, {"min_exit_accuracy", "max_fpr_exit"}), (0.95, {"max_fpr_exit"})],
)
def test_exit_everything_as_positive_cannot_pass(
    tmp_path: Path, prevalence: float, expected_failures: set
) -> None:
    run = make_run(tmp_path / "run", scores=always_positive_scores(prevalence))
    v = read_artifact(run / "validation.json", "validation")
    test = v["test_metrics"]
    # the trick satisfies the FNR constraint and the coverage floor...
    assert test["fnr_exit"] == 0.0 and test["coverage"] > 0.99 and test["fpr_exit"] == 1.0
    assert checks(v)["test_fnr_exit"]["passed"] and checks(v)["policy_feasible"]["passed"]
    # ...and is still refused, whatever the class balance (FPR_exit is 1 either way)
    assert v["blessed"] is False and failed(v) == expected_failures


def test_infeasible_policy_is_not_blessed(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", n=80)  # ~24 positives in val_calib: nothing can certify
    v = read_artifact(run / "validation.json", "validation")
    assert v["blessed"] is False
    assert {"policy_feasible", "test_fnr_exit", "min_coverage"} <= failed(v)
    assert "infeasible (always defers)" in checks(v)["policy_feasible"]["message"]
    assert checks(v)["test_fnr_exit"]["message"] == "no exited positives on test: FNR_exit cannot be audited"
    assert v["test_metrics"]["fnr_exit_upper_bound"] is None


def test_a_test_split_that_breaks_the_certificate_is_caught(run: Path) -> None:
    """Shift between val_calib and test (a harder test set): the audit must fail the run."""
    scores = load_scores(str(run / "scores.npz"))
    shifted = gaussian_scores(1500, seed=7, mu=0.9)  # much weaker separation on test
    test = scores.split == "test"
    probs = scores.probs.copy()
    gate = scores.gate_logit.copy()
    probs[test] = shifted["probs"][:1500]
    gate[test] = shifted["gate_logit"][:1500]
    label = scores.label.copy()
    label[test] = shifted["label"][:1500]
    save_scores(str(run / "scores.npz"), index=scores.index, split=scores.split, label=label, probs=probs,
                gate_logit=gate)  # fmt: skip
    v = validate_run(run)
    direct = metrics.exit_metrics(load_policy(run / "thresholds.json").decide(probs[test]), label[test])
    assert direct["fnr_exit"] > 0.02
    assert checks(v)["test_fnr_exit"]["value"] == pytest.approx(direct["fnr_exit"])
    assert "test_fnr_exit" in failed(v) and v["blessed"] is False


def test_fnr_rule_upper_bound(run: Path) -> None:
    v = validate_run(run, fnr_rule="upper_bound")
    check = checks(v)["test_fnr_exit"]
    assert check["value"] == v["test_metrics"]["fnr_exit_upper_bound"]
    assert check["passed"] == (check["value"] <= v["target_fnr_exit"])
    assert v["rule"]["fnr_rule"] == "upper_bound" and "upper bound" in v["rule"]["description"]


def test_default_floors_are_recorded_and_overridable(run: Path) -> None:
    v = read_artifact(run / "validation.json", "validation")
    assert v["rule"] == {
        **v["rule"],
        "fnr_rule": "point_estimate",
        "min_coverage": validate.DEFAULT_MIN_COVERAGE,
        "min_exit_accuracy": validate.DEFAULT_MIN_EXIT_ACCURACY,
        "max_fpr_exit": validate.DEFAULT_MAX_FPR_EXIT,
        "champion_tolerance": DEFAULT_CHAMPION_TOLERANCE,
    }
    cov = v["test_metrics"]["coverage"]
    v = validate_run(run, min_coverage=round(cov + 0.01, 4), min_exit_accuracy=1.0)
    assert failed(v) >= {"min_coverage"}
    assert checks(v)["min_coverage"]["limit"] == round(cov + 0.01, 4)
    assert checks(v)["min_exit_accuracy"]["passed"] == (v["test_metrics"]["exit_accuracy"] >= 1.0)
    assert validate_run(run, max_fpr_exit=0.0)["rule"]["max_fpr_exit"] == 0.0


def test_certificate_for_a_looser_target_does_not_count(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", calibrate_kwargs={"target_fnr_exit": 0.05})
    v = read_artifact(run / "validation.json", "validation")
    assert failed(v) >= {"certified_target"} and v["blessed"] is False
    assert "certified for target 0.05" in checks(v)["certified_target"]["message"]


def test_baseline_was_removed_with_a_clear_error(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--baseline compared coverages recorded on two test sets; --champion (test_champion.py) replaces it."""
    before = (run / "validation.json").read_bytes()
    with pytest.raises(ConfigError, match=r"baseline was removed: .*pass champion="):
        validate_run(run, baseline=str(run))
    assert main(["validate", "--run", str(run), "--baseline", str(run)]) == 2
    assert "baseline was removed" in capsys.readouterr().err
    assert (run / "validation.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, and validation.json not (re)written


def test_two_policy_files_are_refused(run: Path) -> None:
    before = (run / "validation.json").read_bytes()
    shutil.copyfile(run / "thresholds.json", run / "gateparams.json")
    with pytest.raises(ArtifactError, match=r"2 policy files .*mutually exclusive"):
        validate_run(run)
    assert (run / "validation.json").read_bytes() == before


def test_policy_file_of_another_policy_is_refused(runs: dict[str, Path], run: Path) -> None:
    with pytest.raises(
        ArtifactError, match=r"a gateparams policy file, but config.json says exit_policy='softmax'"
    ):
        validate_run(run, policy_file=runs["gate"] / "gateparams.json")


def test_explicit_policy_file(runs: dict[str, Path], run: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "thresholds.json"
    other.parent.mkdir()
    shutil.copyfile(run / "thresholds.json", other)
    (run / "thresholds.json").unlink()
    v = validate_run(run, policy_file=other)
    assert v["policy_file"] == "thresholds.json" and v["blessed"]


def test_missing_or_mismatched_inputs(run: Path) -> None:
    (run / "validation.json").unlink()
    scores = load_scores(str(run / "scores.npz"))
    test_rows = np.nonzero(scores.split == "test")[0]
    for dropped, message in (
        (test_rows[:10], r"scores.npz: split 'test' holds 1490 rows but .*splits.json lists 1500"),
        (test_rows, r"scores.npz: key 'split': no rows of split 'test'"),
    ):
        keep = np.ones(len(scores.index), dtype=bool)
        keep[dropped] = False
        kept = {k: getattr(scores, k)[keep] for k in ("index", "split", "label", "probs", "gate_logit")}
        save_scores(str(run / "scores.npz"), **kept)
        with pytest.raises(DataError, match=message):
            validate_run(run)
    (run / "scores.npz").unlink()
    with pytest.raises((DataError, StorageError), match=r"scores.npz: file not found"):
        validate_run(run)
    (run / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config.json: file not found"):
        validate_run(run)
    assert not (run / "validation.json").exists()


def test_gate_policy_needs_gate_logits(runs: dict[str, Path], tmp_path: Path) -> None:
    run = Path(shutil.copytree(runs["gate"], tmp_path / "gate"))
    scores = load_scores(str(run / "scores.npz"))
    save_scores(str(run / "scores.npz"), index=scores.index, split=scores.split, label=scores.label,
                probs=scores.probs)  # fmt: skip
    with pytest.raises(DataError, match=r"no 'gate_logit' array; the gate policy needs phase >= 3 scores"):
        validate_run(run)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_coverage": 1.5}, r"min_coverage=1.5 must be a fraction in \[0, 1\]"),
        ({"max_fpr_exit": -0.1}, r"max_fpr_exit=-0.1 must be a fraction"),
        ({"fnr_rule": "lenient"}, r"fnr_rule='lenient' is unknown; allowed: point_estimate, upper_bound"),
        ({"report_format": "pdf"}, r"report_format='pdf' is unknown; allowed: html, md"),
    ],
)
def test_bad_settings(run: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_run(run, **kwargs)


# ---------------------------------------------------------------------------------------------
# CLI and script


def test_cli_validate_exit_status(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "PASS  test_fnr_exit" in out and out.strip().splitlines()[-1].startswith("BLESSED")
    assert main(["validate", "--run", str(run), "--min-coverage", "0.99"]) == 1
    assert "FAIL  min_coverage" in capsys.readouterr().out
    assert main(["validate", "--run", str(run), "--min-coverage", "2"]) == 2
    assert "min_coverage=2.0 must be a fraction" in capsys.readouterr().err


def test_cli_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {validate.DEFAULT_MIN_COVERAGE})" in text
    assert f"(default {validate.DEFAULT_MIN_EXIT_ACCURACY})" in text
    assert f"(default {validate.DEFAULT_MAX_FPR_EXIT})" in text


def test_script_40_validate(run: Path) -> None:
    script = REPO / "stage1_pro" / "scripts" / "40_validate.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--run", str(run), "--report-format", "md"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert read_artifact(run / "validation.json", "validation")["report_file"] == "report.md"
