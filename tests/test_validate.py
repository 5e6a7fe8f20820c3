"""The blessing gate: metrics on test from stage1_pro.metrics, the rule's checks (the audit as a test),
diagnostics, the policy comparison, the gamed policy, reports, bad input (the champion comparison:
test_champion.py)."""

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
from scipy import stats

from stage1_pro import metrics, validate
from stage1_pro.artifacts import read_artifact, write_artifact
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


def diagnostics(v: dict) -> dict[str, dict]:
    return {c["name"]: c for c in v["diagnostics"]}


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
    # the audit: exact one-sided binomial p-values of the test counts, each at level / 2 (Bonferroni)
    a = v["audit"]
    assert a["level"] == 0.05 and a["test_level"] == 0.025 and not a["refused"]
    assert a["fnr_p_value"] == pytest.approx(float(stats.binom.sf(k - 1, n, config["target_fnr_exit"])))
    exited_neg = v["test_metrics"]["n_exited"] - n
    false_pos = v["test_metrics"]["n_exit_positive"] - (n - k)
    assert (a["n_exited_negatives"], a["n_false_positives"]) == (exited_neg, false_pos)
    assert a["fpr_p_value"] == pytest.approx(float(stats.binom.sf(false_pos - 1, exited_neg, 0.25)))
    assert 0 < a["power"] < 1 and a["alternative_fnr_exit"] == pytest.approx(1.5 * config["target_fnr_exit"])
    assert (
        checks(v)["test_audit"]["passed"] and f"power {a['power']:.2f}" in checks(v)["test_audit"]["message"]
    )
    # the diagnostics are reported, not deciding
    assert {d["name"] for d in v["diagnostics"]} == {"min_coverage", "min_exit_accuracy", "max_fpr_exit"}
    # every policy of phase 6, the active one first; the others fitted in memory, never written
    comparison = v["policy_comparison"]
    assert comparison[0]["policy"] == policy and comparison[0]["active"]
    assert {r["policy"] for r in comparison} == set(POLICIES)
    for row in comparison[1:]:
        assert not row["active"] and row["feasible"] and row["certified_fnr_upper_bound"] <= 0.02
        assert 0 < row["test_coverage"] < 1 and row["procedure"] == pol.certificate_["procedure"]
    assert comparison[0]["test_coverage"] == v["test_metrics"]["coverage"]
    assert [f for f in POLICY_FILES.values() if (run / f).exists()] == [POLICY_FILES[policy]]
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
    assert "BLESSED" in html and "test_audit" in html and "gate exit policy" in html
    assert "Policies compared on the same val_calib and test" in html and "scrc" in html
    assert "Diagnostics (reported, not deciding)" in html and "its power against a true FNR_exit" in html
    card = (run / "model_card.md").read_text()
    for section in ("## Intended use", "## Guarantee", "## Test audit", "## Limitations"):
        assert section in card
    assert f"{v['test_metrics']['coverage']:.4f}" in card
    assert "- Preprocessing: 32 px, squash, bilinear, JPEG draft decoding, EXIF orientation applied" in card


def test_markdown_report(run: Path) -> None:
    v = validate_run(run, report_format="md")
    assert v["report_file"] == "report.md"
    md = (run / "report.md").read_text()
    assert "![risk_coverage.png](risk_coverage.png)" in md and "| test_audit | PASS |" in md
    assert "| softmax (active) | yes |" in md


def always_positive_scores(prevalence: float, n: int = 1000, seed: int = 1) -> dict[str, np.ndarray]:
    """A degenerate classifier: every image 'positive' with probability ~0.99."""
    scores = gaussian_scores(n, seed, prevalence=prevalence)
    rng = np.random.default_rng(seed)
    p1 = 0.985 + 0.01 * rng.random(len(scores["label"]))
    scores["probs"] = np.stack([1 - p1, p1], axis=1)
    return scores


@pytest.mark.parametrize("prevalence", [0.3, 0.95])
def test_exit_everything_as_positive_is_not_certified(tmp_path: Path, prevalence: float) -> None:
    """The guard is certified with the target: calling everything positive (FNR_exit 0, FPR_exit 1)
    certifies nothing, whatever the class balance, so the run is not blessed."""
    run = make_run(tmp_path / "run", scores=always_positive_scores(prevalence))
    v = read_artifact(run / "validation.json", "validation")
    cert = v["certificate"]
    assert not cert["feasible"] and "the FPR_exit guard failed" in cert["notes"]
    assert v["blessed"] is False and failed(v) == {"policy_feasible"}
    # without the guard (max_fpr_exit 1 in the config and the certificate) the trick certifies, the
    # audit cannot see it (FNR_exit 0) and only the exit-accuracy diagnostic says something is off
    no_guard = {"max_fpr_exit": 1.0}
    off = make_run(tmp_path / "off", scores=always_positive_scores(prevalence), config_overrides=no_guard,
                   calibrate_kwargs=no_guard)  # fmt: skip
    v = read_artifact(off / "validation.json", "validation")
    assert v["certificate"]["feasible"] and v["test_metrics"]["fpr_exit"] == 1.0 and v["blessed"]
    assert diagnostics(v)["max_fpr_exit"]["passed"]  # limit 1: the guard is off
    assert diagnostics(v)["min_exit_accuracy"]["passed"] == (prevalence >= 0.9)


def test_infeasible_policy_is_not_blessed(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", n=80)  # ~24 positives in val_calib: nothing can certify
    v = read_artifact(run / "validation.json", "validation")
    assert v["blessed"] is False and failed(v) == {"policy_feasible"}
    assert "infeasible (always defers)" in checks(v)["policy_feasible"]["message"]
    # nothing exits: the audit rejects nothing and says it sees nothing
    assert (
        "no exited positives on test: the audit cannot see FNR_exit (power 0)"
        in checks(v)["test_audit"]["message"]
    )
    assert v["audit"]["power"] == 0.0 and not diagnostics(v)["min_coverage"]["passed"]
    assert v["test_metrics"]["fnr_exit_upper_bound"] is None


def test_a_test_split_that_breaks_the_certificate_is_caught(run: Path) -> None:
    """A shift between val_calib and test that the test split can see (a changed label definition:
    some images the rule calls negative are positives on test): the audit refuses the run."""
    scores = load_scores(str(run / "scores.npz"))
    test = scores.split == "test"
    decisions = load_policy(run / "thresholds.json").decide(scores.probs[test])
    label = scores.label.copy()
    called_negative = np.nonzero(test)[0][(decisions == 0) & (scores.label[test] == 0)]
    label[called_negative[::12]] = 1  # 1 in 12 exit-negative negatives is a positive on test
    save_scores(str(run / "scores.npz"), index=scores.index, split=scores.split, label=label,
                probs=scores.probs, gate_logit=scores.gate_logit)  # fmt: skip
    v = validate_run(run)
    direct = metrics.exit_metrics(decisions, label[test])
    n, k = direct["n_exited_positives"], direct["n_false_negatives"]
    assert k / n > 0.05
    assert v["audit"]["fnr_p_value"] == pytest.approx(float(stats.binom.sf(k - 1, n, 0.02)))
    assert v["audit"]["refused"] and v["audit"]["refused_by"] == ["fnr_exit"]
    assert failed(v) == {"test_audit"} and v["blessed"] is False
    assert "rejected (fnr_exit above its bound)" in checks(v)["test_audit"]["message"]


def test_a_shift_the_test_split_cannot_see_is_reported_with_its_power(run: Path) -> None:
    """A much harder test set: the certified threshold exits a handful of test positives, too few for
    any test to reject; the audit says so (its power) and the coverage diagnostic flags the collapse."""
    scores = load_scores(str(run / "scores.npz"))
    shifted = gaussian_scores(1500, seed=7, mu=0.9)  # much weaker separation on test
    test = scores.split == "test"
    probs, label = scores.probs.copy(), scores.label.copy()
    probs[test], label[test] = shifted["probs"][:1500], shifted["label"][:1500]
    save_scores(str(run / "scores.npz"), index=scores.index, split=scores.split, label=label, probs=probs,
                gate_logit=scores.gate_logit)  # fmt: skip
    v = validate_run(run)
    a = v["audit"]
    assert a["n_exited_positives"] < 50 and a["power"] < 0.1 and not a["refused"]
    assert f"power {a['power']:.2f} against a true FNR_exit of 0.03" in checks(v)["test_audit"]["message"]
    assert not diagnostics(v)["min_coverage"]["passed"]


def test_audit_level_and_effect(run: Path) -> None:
    base = read_artifact(run / "validation.json", "validation")["audit"]
    v = validate_run(run, audit_level=0.2, audit_effect=2.0)
    a = v["audit"]
    assert a["level"] == 0.2 and a["test_level"] == 0.1 and a["effect"] == 2.0
    assert a["fnr_p_value"] == base["fnr_p_value"] and a["power"] > base["power"]
    assert v["rule"]["audit_level"] == 0.2 and "at level 0.2" in v["rule"]["description"]


def test_diagnostics_are_recorded_and_overridable_and_never_decide(run: Path) -> None:
    v = read_artifact(run / "validation.json", "validation")
    assert v["rule"] == {
        **v["rule"],
        "audit_level": 0.05,
        "audit_effect": 1.5,
        "min_coverage": validate.DEFAULT_MIN_COVERAGE,
        "min_exit_accuracy": validate.DEFAULT_MIN_EXIT_ACCURACY,
        "champion_tolerance": DEFAULT_CHAMPION_TOLERANCE,
    }
    assert diagnostics(v)["max_fpr_exit"]["limit"] == v["max_fpr_exit"] == 0.25
    cov = v["test_metrics"]["coverage"]
    v = validate_run(run, min_coverage=round(cov + 0.01, 4), min_exit_accuracy=1.0)
    assert not diagnostics(v)["min_coverage"]["passed"] and diagnostics(v)["min_coverage"]["limit"] == round(
        cov + 0.01, 4
    )
    assert diagnostics(v)["min_exit_accuracy"]["passed"] == (v["test_metrics"]["exit_accuracy"] >= 1.0)
    assert v["blessed"] and failed(v) == set()


def test_certificate_for_a_looser_target_does_not_count(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", calibrate_kwargs={"target_fnr_exit": 0.05})
    v = read_artifact(run / "validation.json", "validation")
    assert failed(v) >= {"certified_target"} and v["blessed"] is False
    assert "certified for target 0.05" in checks(v)["certified_target"]["message"]
    # a looser guard does not count either
    run = make_run(tmp_path / "guard", calibrate_kwargs={"max_fpr_exit": 0.5})
    v = read_artifact(run / "validation.json", "validation")
    assert (
        failed(v) == {"certified_target"} and "max_fpr_exit 0.5" in checks(v)["certified_target"]["message"]
    )


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
        ({"audit_level": 0.0}, r"audit_level=0.0 is outside the valid range \(0, 0.5\]; the default is 0.05"),
        ({"audit_effect": 0.9}, r"audit_effect=0.9 must be a number > 1"),
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
    assert "PASS  test_audit" in out and out.strip().splitlines()[-1].startswith("BLESSED")
    assert "compare gate" in out and "compare scrc" in out
    # a diagnostic below its level is printed, and does not change the verdict
    assert main(["validate", "--run", str(run), "--min-coverage", "0.99"]) == 0
    assert "LOW   min_coverage" in capsys.readouterr().out
    # a refusal by the audit does (an audit at level 0.5 on a run whose test FNR_exit exceeds the target)
    assert main(["validate", "--run", str(run), "--audit-level", "0.6"]) == 2
    assert "audit_level=0.6 is outside the valid range" in capsys.readouterr().err
    assert main(["validate", "--run", str(run), "--min-coverage", "2"]) == 2
    assert "min_coverage=2.0 must be a fraction" in capsys.readouterr().err


def test_cli_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {validate.DEFAULT_MIN_COVERAGE})" in text
    assert f"(default {validate.DEFAULT_MIN_EXIT_ACCURACY})" in text
    assert "(default 0.05)" in text and "(default 1.5)" in text


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


def test_a_policy_file_from_before_the_guard_is_not_certified_for_it(run: Path) -> None:
    policy = read_artifact(run / "thresholds.json")
    policy.pop("max_fpr_exit")
    for key in ("max_fpr_exit", "n_exited_negatives", "n_false_positives", "fpr_p_value", "fpr_upper_bound"):
        policy["certificate"].pop(key)
    write_artifact(
        run / "thresholds.json", "thresholds", {k: v for k, v in policy.items() if k != "artifact"}
    )
    v = validate_run(run)
    assert failed(v) == {"certified_target"}
    assert (
        "max_fpr_exit 1.0 at delta 0.1 (a policy file written before the guard existed: recalibrate it)"
        in (checks(v)["certified_target"]["message"])
    )
