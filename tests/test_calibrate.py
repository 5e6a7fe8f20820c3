"""calibrate_policy, the `calibrate` verb and scripts 25/33/36: outputs, lineage and every bad input."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stage1_pro.artifacts import read_artifact, write_artifact
from stage1_pro.calibrate import calibrate_policy
from stage1_pro.certify import min_exited_positives
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.policies import load_policy
from stage1_pro.scores import SCORE_SPLITS, save_scores
from stage1_pro.simulation import GaussianScoreModel
from stage1_pro.splits import splits_version

REPO = Path(__file__).resolve().parent.parent
FINGERPRINT = "ab" * 32
N = 3000


def _arrays(n: int = N, seed: int = 0, gate: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = [GaussianScoreModel().sample(n, rng) for _ in SCORE_SPLITS]
    return {
        "index": np.arange(3 * n) + 100,
        "split": np.repeat(np.array(SCORE_SPLITS), n),
        "label": np.concatenate([p["label"] for p in parts]),
        "probs": np.concatenate([p["probs"] for p in parts]),
        "gate_logit": np.concatenate([p["gate_logit"] for p in parts]) if gate else None,
    }


def _write_splits(path: Path, a: dict[str, np.ndarray]) -> None:
    indices = {"train": list(range(100))}
    indices.update({s: a["index"][a["split"] == s].tolist() for s in SCORE_SPLITS})
    total = sum(len(v) for v in indices.values())
    balance = {s: {"n": len(v), "n_positive": 0, "positive_rate": 0.0} for s, v in indices.items()}
    write_artifact(
        path,
        "splits",
        {
            "seed": 0,
            "fractions": {s: len(v) / total for s, v in indices.items()},
            "group_aware": False,
            "dataset": {"fingerprint": FINGERPRINT, "n": total, "n_positive": 0, "source": "synthetic"},
            "indices": indices,
            "class_balance": balance,
            "splits_version": splits_version(FINGERPRINT, indices),
        },
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    a = _arrays()
    save_scores(str(run / "scores.npz"), **a)
    _write_splits(run / "splits.json", a)
    (run / "model_best.pth").write_bytes(b"weights")
    return run


def _raw_scores(path: Path, **arrays) -> str:
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in arrays.items() if v is not None})
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.mark.parametrize(
    ("policy", "options", "kind"),
    [
        ("softmax", {}, "thresholds"),
        ("gate", {"calibrator": "isotonic"}, "gateparams"),
        ("scrc", {}, "scrcparams"),
    ],
)
def test_calibrate_policy_writes_a_certified_policy_with_lineage(
    run_dir, tmp_path, policy, options, kind
) -> None:
    out = tmp_path / f"{kind}.json"
    written = calibrate_policy(policy, str(run_dir / "scores.npz"), str(out), **options)
    assert read_artifact(str(out)) == written and written["artifact"] == kind
    assert written["feasible"] and written["certificate"]["upper_bound"] <= 0.02
    assert written["scores_sha256"] == hashlib.sha256((run_dir / "scores.npz").read_bytes()).hexdigest()
    assert written["model_version"] == hashlib.sha256(b"weights").hexdigest()
    splits = read_artifact(str(run_dir / "splits.json"))
    assert written["splits_version"] == splits["splits_version"]
    assert written["data_fingerprint"] == FINGERPRINT
    assert written["certificate"]["n_calib"] == N
    assert written["val_select_metrics"]["n"] == N


def test_softmax_file_fields(run_dir, tmp_path) -> None:
    written = calibrate_policy("softmax", str(run_dir / "scores.npz"), str(tmp_path / "thresholds.json"))
    for key in (
        "exit_threshold",
        "fnr_on_exits",
        "coverage",
        "exit_accuracy",
        "sweep_results",
        "val_calib_metrics",
    ):
        assert key in written
    cert = written["certificate"]
    assert {"target_fnr_exit", "delta", "n", "k", "upper_bound", "grid"} <= set(cert)
    row = written["sweep_results"][0]
    assert {"threshold", "coverage", "fnr_exit", "p_value", "certified"} <= set(row)
    assert sum(r["certified"] for r in written["sweep_results"]) == cert["n_certified"]


def test_cli_prints_summary_and_scripts_call_the_same_function(run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "thresholds.json"
    rc = main(["calibrate", "--policy", "softmax", "--scores", str(run_dir / "scores.npz"), "--out", str(out),
               "--target-fnr-exit", "0.03", "--delta", "0.05", "--method", "holm"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "exit iff max p >=" in text and "certified: FNR_exit <=" in text and "FPR_exit <=" in text
    assert "n=" in text and "k=" in text
    written = json.loads(out.read_text())
    assert written["target_fnr_exit"] == 0.03 and written["delta"] == 0.05
    assert written["certificate"]["procedure"] == "holm"
    script_out = tmp_path / "script" / "thresholds.json"
    script = str(REPO / "stage1_pro/scripts/25_threshold_sweep.py")
    args = ["--scores", str(run_dir / "scores.npz"), "--out", str(script_out)]
    args += ["--target_fnr_exit", "0.03", "--delta", "0.05", "--method", "holm"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(script_out.read_text())
    assert again["exit_threshold"] == written["exit_threshold"]
    assert again["certificate"] == written["certificate"]
    # the gate and SCRC scripts are the same verb with their policy
    for name, policy in (("33_calibrate_gate.py", "gate"), ("36_calibrate_scrc.py", "scrc")):
        text = (REPO / "stage1_pro/scripts" / name).read_text()
        assert f'run_verb("calibrate", "--policy", "{policy}")' in text


def test_cli_run_dir_takes_policy_and_target_from_config(run_dir, tmp_path, capsys) -> None:
    from stage1_pro.config import Stage1ProConfig, save_config

    run = tmp_path / "run"
    run.mkdir()
    for name in ("scores.npz", "splits.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    save_config(
        Stage1ProConfig(phase=6, exit_policy="scrc", target_fnr_exit=0.03, delta=0.2), run / "config.json"
    )
    assert main(["calibrate", "--run", str(run), "--scrc-variant", "SCRC-T"]) == 0
    written = load_policy(str(run / "scrcparams.json")).to_dict()
    assert (
        written["scrc_variant"] == "SCRC-T" and written["target_fnr_exit"] == 0.03 and written["delta"] == 0.2
    )
    assert "SCRC-T" in capsys.readouterr().out


def test_infeasible_warns_with_the_cause_and_positives_needed(tmp_path, caplog) -> None:
    a = _arrays(n=200)
    save_scores(str(tmp_path / "scores.npz"), **a)
    with caplog.at_level("WARNING"):
        written = calibrate_policy("softmax", str(tmp_path / "scores.npz"), str(tmp_path / "thresholds.json"))
    cert = written["certificate"]
    m = len(cert["grid"])
    needed = min_exited_positives(0.02, 0.1 / m)  # the label-free fallback tests every point at delta/m
    assert not written["feasible"] and cert["positives_needed"] == needed
    n_select_pos = int(a["label"][a["split"] == "val_select"].sum())
    n_calib_pos = int(a["label"][a["split"] == "val_calib"].sum())
    # the message names the causes: val_select too small to learn the order, val_calib too small to certify
    assert f"val_select holds {n_select_pos} positives, fewer than the 114" in caplog.text
    assert f"val_calib holds {n_calib_pos} positives, fewer than the {needed} exited positives" in caplog.text
    assert cert["order_learned_on"] is None and "cannot say where to start" in cert["order_note"]
    assert written["exit_threshold"] > 1 and written["coverage"] == 0.0


def test_starved_val_select_falls_back_to_the_label_free_order(tmp_path) -> None:
    """30 val_select images: the default still certifies on a large val_calib (the learned start alone did
    not: the issue's 4 of 20 draws)."""
    a = _arrays(n=5000)
    keep = (a["split"] != "val_select") | (np.cumsum(a["split"] == "val_select") <= 30)
    a = {k: v[keep] for k, v in a.items()}
    save_scores(str(tmp_path / "scores.npz"), **a)
    written = calibrate_policy("softmax", str(tmp_path / "scores.npz"), str(tmp_path / "thresholds.json"))
    cert = written["certificate"]
    assert written["feasible"] and cert["procedure"] == "split_fallback_sequence"
    assert cert["order_learned_on"] is None and "val_select holds" in cert["order_note"]
    assert cert["upper_bound"] <= 0.02 and cert["fpr_upper_bound"] <= 0.25


# ----------------------------------------------------------------------------- bad input


def _cli_error(capsys, *args: str) -> str:
    rc = main(["calibrate", *args])
    assert rc == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probs": "nan"}, r"key 'probs': 1 row\(s\) hold NaN or inf"),
        ({"probs": "inf"}, r"key 'probs': 1 row\(s\) hold NaN or inf"),
        ({"gate_logit": "nan"}, r"key 'gate_logit': 1 row\(s\) hold NaN or inf"),
        ({"probs": "outside"}, r"key 'probs': probabilities must lie in \[0, 1\]"),
        ({"probs": "sum"}, r"key 'probs': 1 row\(s\) do not sum to 1"),
        ({"label": "two"}, r"key 'label': labels must be 0 or 1"),
    ],
)
def test_bad_scores_rejected(tmp_path, capsys, change, message) -> None:
    a = _arrays(n=50)
    key, how = next(iter(change.items()))
    arr = a[key].astype(float) if key != "label" else a[key].copy()
    if how == "nan":
        arr[3] = np.nan
    elif how == "inf":
        arr[3] = np.inf
    elif how == "outside":
        arr[3] = [1.5, -0.5]
    elif how == "sum":
        arr[3] = [0.3, 0.3]
    elif how == "two":
        arr[3] = 2
    a[key] = arr
    path = _raw_scores(tmp_path / "bad.npz", **a)
    err = _cli_error(
        capsys, "--policy", "softmax", "--scores", path, "--out", str(tmp_path / "thresholds.json")
    )
    assert path in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "thresholds.json").exists()


def test_no_positives_in_val_calib(tmp_path, capsys) -> None:
    a = _arrays(n=200)
    a["label"][a["split"] == "val_calib"] = 0
    save_scores(str(tmp_path / "s.npz"), **a)
    err = _cli_error(
        capsys, "--policy", "softmax", "--scores", str(tmp_path / "s.npz"), "--out", str(tmp_path / "t.json")
    )
    assert "val_calib holds no positives, so FNR_exit cannot be certified" in err


def test_gate_without_gate_logits(tmp_path, capsys) -> None:
    save_scores(str(tmp_path / "s.npz"), **_arrays(n=200, gate=False))
    err = _cli_error(
        capsys, "--policy", "gate", "--scores", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g.json")
    )
    assert "no 'gate_logit' array: the gate policy needs scores from a phase >= 3 model" in err
    assert "--policy softmax" in err
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("delta", ["0", "0.6", "-1"])
def test_delta_outside_range(run_dir, tmp_path, capsys, delta) -> None:
    err = _cli_error(capsys, "--policy", "softmax", "--scores", str(run_dir / "scores.npz"),
                     "--out", str(tmp_path / "t.json"), "--delta", delta)  # fmt: skip
    assert f"delta={float(delta)} is outside the valid range (0, 0.5]" in err
    with pytest.raises(ConfigError, match=r"outside the valid range \(0, 0.5\]"):
        calibrate_policy("softmax", str(run_dir / "scores.npz"), str(tmp_path / "t.json"), delta=float(delta))


@pytest.mark.parametrize("value", ["0", "1.2", "-0.1"])
def test_max_fpr_exit_outside_range(run_dir, tmp_path, capsys, value) -> None:
    err = _cli_error(capsys, "--policy", "softmax", "--scores", str(run_dir / "scores.npz"),
                     "--out", str(tmp_path / "t.json"), "--max-fpr-exit", value)  # fmt: skip
    assert f"max_fpr_exit={float(value)} is outside the valid range (0, 1]; the default is 0.25" in err
    assert not (tmp_path / "t.json").exists()


def test_max_fpr_exit_from_the_flag_or_the_config(run_dir, tmp_path) -> None:
    from stage1_pro.config import Stage1ProConfig, save_config

    out = tmp_path / "t.json"
    args = ["--policy", "softmax", "--scores", str(run_dir / "scores.npz"), "--out", str(out)]
    assert main(["calibrate", *args, "--max-fpr-exit", "0.1"]) == 0
    written = json.loads(out.read_text())
    assert written["max_fpr_exit"] == written["certificate"]["max_fpr_exit"] == 0.1
    assert written["certificate"]["fpr_upper_bound"] <= 0.1
    run = tmp_path / "run"
    run.mkdir()
    for name in ("scores.npz", "splits.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    save_config(Stage1ProConfig(max_fpr_exit=0.05), run / "config.json")
    assert main(["calibrate", "--run", str(run)]) == 0
    assert json.loads((run / "thresholds.json").read_text())["max_fpr_exit"] == 0.05


def gamed_scores(n: int = 4000, seed: int = 3) -> dict[str, np.ndarray]:
    """The issue's gamed score file: 70 % of the negatives are confidently called positive."""
    a = _arrays(n=n, seed=seed)
    rng = np.random.default_rng(seed)
    gamed = (a["label"] == 0) & (rng.random(a["label"].size) < 0.7)
    p1 = np.where(gamed, 0.97 + 0.029 * rng.random(a["label"].size), a["probs"][:, 1])
    a["probs"] = np.stack([1 - p1, p1], axis=1)
    return a


@pytest.mark.parametrize("policy", ["softmax", "gate", "scrc"])
def test_gamed_scores_certify_nothing_or_only_rules_that_meet_the_guard(tmp_path, capsys, policy) -> None:
    """An FNR-only certificate deploys 'exit everything' here (FPR_exit ~0.7); the joint one refuses
    every rule that exits the gamed negatives, on val_calib and on the test split."""
    from stage1_pro.audit import upper_tail_p_value
    from stage1_pro.metrics import exit_metrics

    a = gamed_scores()
    save_scores(str(tmp_path / "scores.npz"), **a)
    out = tmp_path / "policy.json"
    assert (
        main(["calibrate", "--policy", policy, "--scores", str(tmp_path / "scores.npz"), "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    written = json.loads(out.read_text())
    cert = written["certificate"]
    test = a["split"] == "test"
    decisions = load_policy(str(out)).point_rule()(a["probs"][test], a["gate_logit"][test])
    m = exit_metrics(decisions, a["label"][test])
    if written["feasible"]:
        assert cert["fpr_upper_bound"] <= 0.25 and written["val_calib_metrics"]["fpr_exit"] <= 0.25
        # on test the guard is not rejected either (exact binomial test at 0.025)
        n_neg = m["n_exited"] - m["n_exited_positives"]
        false_pos = m["n_exit_positive"] - (m["n_exited_positives"] - m["n_false_negatives"])
        assert upper_tail_p_value(false_pos, n_neg, 0.25) > 0.025
    else:
        assert "no grid point certifies" in cert["notes"]
    # without the guard the softmax policy deploys the gamed rule, as the issue measured
    if policy == "softmax":
        unguarded = calibrate_policy("softmax", str(tmp_path / "scores.npz"), str(tmp_path / "off.json"),
                                     max_fpr_exit=1.0)  # fmt: skip
        off = load_policy(str(tmp_path / "off.json")).decide(a["probs"][test])
        assert unguarded["feasible"] and exit_metrics(off, a["label"][test])["fpr_exit"] > 0.5


def test_splits_scores_mismatch(run_dir, tmp_path, capsys) -> None:
    a = _arrays()
    a["index"] = a["index"] + 1  # scored rows shifted by one: another split
    save_scores(str(tmp_path / "scores.npz"), **a)
    err = _cli_error(capsys, "--policy", "softmax", "--scores", str(tmp_path / "scores.npz"),
                     "--splits", str(run_dir / "splits.json"), "--out", str(tmp_path / "t.json"))  # fmt: skip
    assert "split 'val_select' holds 3000 rows but" in err and "the scores were made with other splits" in err
    assert "(1 listed rows missing from the scores, 1 scored rows not in that split)" in err
    with pytest.raises(DataError, match="made with other splits"):
        calibrate_policy(
            "softmax",
            str(tmp_path / "scores.npz"),
            str(tmp_path / "t.json"),
            splits_uri=str(run_dir / "splits.json"),
        )


def test_policy_file_names_and_exclusivity(run_dir, tmp_path) -> None:
    scores = str(run_dir / "scores.npz")
    with pytest.raises(ConfigError, match=r"the gate policy writes gateparams.json, never thresholds.json"):
        calibrate_policy("gate", scores, str(tmp_path / "thresholds.json"))
    calibrate_policy("softmax", scores, str(tmp_path / "thresholds.json"))
    with pytest.raises(ArtifactError, match="a run directory holds exactly one policy file; pass --replace"):
        calibrate_policy("gate", scores, str(tmp_path / "gateparams.json"))
    assert not (tmp_path / "gateparams.json").exists()
    calibrate_policy("gate", scores, str(tmp_path / "gateparams.json"), replace=True)
    assert (tmp_path / "gateparams.json").exists() and not (tmp_path / "thresholds.json").exists()


def test_unknown_policy_and_option(run_dir, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="unknown exit policy 'tree'"):
        calibrate_policy("tree", str(run_dir / "scores.npz"), str(tmp_path / "x.json"))
    err = _cli_error(capsys, "--policy", "softmax", "--scores", str(run_dir / "scores.npz"),
                     "--out", str(tmp_path / "t.json"), "--scrc-variant", "SCRC-T")  # fmt: skip
    assert "apply to --policy scrc only" in err
    err = _cli_error(capsys, "--out", str(tmp_path / "t.json"))
    assert "pass --scores" in err
