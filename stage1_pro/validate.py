"""The blessing gate: audit a run's exit policy on the held-out ``test`` split.

:func:`validate_run` reads the run's config, splits, ``scores.npz`` and its one policy file,
applies the policy to the test scores and computes (definitions in :mod:`stage1_pro.metrics`
only) FNR_exit with its Clopper–Pearson upper bound, coverage, FPR_exit, exit accuracy,
selective risk, AURC and the risk–coverage curve. It writes ``validation.json`` (schema
``validation``), ``report.html`` (or ``.md``) with the risk–coverage and confusion-matrix
figures, and ``model_card.md``.

**Blessing rule.** A run is **blessed** iff every check passes:

``policy_feasible``
    the policy file says ``feasible: true`` (something was certified; an always-defer
    policy is never shipped).
``certified_target``
    the policy was certified for ``target_fnr_exit <= config.target_fnr_exit``,
    ``max_fpr_exit <= config.max_fpr_exit`` and ``delta <= config.delta`` (a certificate for a
    looser contract does not count).
``test_audit``
    the test split does not reject "FNR_exit <= target and FPR_exit <= max_fpr_exit" at
    ``audit_level`` (default 0.05; exact one-sided binomial tests, :mod:`stage1_pro.audit`). A
    valid run is refused with probability at most ``audit_level``; the audit's power against a
    true FNR_exit of ``audit_effect`` x target is reported beside the verdict, so a user knows
    what the test split can see.
``champion_coverage`` (only with ``champion``)
    test coverage >= the champion's test coverage *on this run's test split* - ``champion_tolerance``
    (default :data:`~stage1_pro.champion.DEFAULT_CHAMPION_TOLERANCE`). The champion bundle
    re-scores this run's images with its own preprocessing and its policy is re-certified on this
    run's val_calib for this run's contract (target, guard, delta; :mod:`stage1_pro.champion`);
    both are reported side by side under ``champion`` in validation.json. A champion that is a
    registry prefix with nothing published yet (a first run) is recorded as such and not compared.

The former ``baseline`` comparison (coverage recorded by another bundle on *its* test set) was
removed: coverages measured on different test sets do not say which model is better.

The guard against exiting everything as positive (FNR_exit 0, FPR_exit 1) is certified with the
target (``max_fpr_exit``), not a floor checked afterwards. The point-estimate floors of earlier
releases (test coverage >= :data:`DEFAULT_MIN_COVERAGE`, exit accuracy >=
:data:`DEFAULT_MIN_EXIT_ACCURACY`, FPR_exit <= ``max_fpr_exit``) are reported as
``diagnostics``: they carry no guarantee (exit accuracy depends on the class balance) and never
decide the blessing.

Beside the active policy, ``policy_comparison`` reports what every other policy the run's phase
allows certifies on the same ``val_calib`` (same target, guard, delta and procedure) and achieves
on the same ``test``: fitted in memory, never written as policy files.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from stage1_pro import storage
from stage1_pro.artifacts import DEFAULT_FILENAMES, POLICY_ARTIFACT_KINDS, read_artifact, write_artifact
from stage1_pro.bundle import find_policy_file
from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.defaults import (
    DEFAULT_AUDIT_EFFECT,
    DEFAULT_AUDIT_LEVEL,
    DEFAULT_MAX_FPR_EXIT,
    NO_GUARD,
    check_audit_level,
)
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.layout import CONFIG_FILE, MODEL_FILE, MODEL_INFO_FILE, SCORES_FILE, SPLITS_FILE
from stage1_pro.provenance import sha256_uri, utc_now

log = logging.getLogger(__name__)

#: Diagnostic: test coverage below this is hardly worth deploying as a stage 1 (reported only).
DEFAULT_MIN_COVERAGE = 0.10
#: Diagnostic: exited images labelled correctly at least this often (reported only).
DEFAULT_MIN_EXIT_ACCURACY = 0.90
#: Points kept from the risk-coverage curve in validation.json (enough to plot it).
CURVE_POINTS = 101


def _check(name: str, passed: bool, value: Any, limit: Any, message: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "value": value, "limit": limit, "message": message}


def _clean(x: Any) -> Any:
    """numpy scalars -> Python, NaN -> None (JSON artifacts hold finite numbers only)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _split_metrics(policy: Any, scores: Any, delta: float) -> tuple[dict[str, Any], np.ndarray]:
    """Exit metrics of ``policy`` on one split of the scores (with the CP bound at ``delta`` and AURC)."""
    from stage1_pro import metrics
    from stage1_pro.decisions import argmax_class

    decisions = np.asarray(policy.decide(scores.probs, scores.gate_logit))
    m = metrics.exit_metrics(
        decisions,
        scores.label,
        confidence=policy_confidence(policy, scores),
        predictions=argmax_class(scores.probs),  # the exit label of all three policies
        delta=delta,
    )
    if not m["n_exited_positives"]:  # no exited positive: nothing to bound (the CP formula gives 1)
        m["fnr_exit_upper_bound"] = None
    return _clean(m), decisions


def policy_confidence(policy: Any, scores: Any) -> np.ndarray:
    """The score by which ``policy`` ranks images for exiting (higher exits first)."""
    return np.asarray(policy.confidence(scores.probs, scores.gate_logit), dtype=np.float64)


def confusion(decisions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Counts of true label (rows 0, 1) x decision (exit-negative, exit-positive, defer)."""
    from stage1_pro.decisions import DECISION_NAMES, DEFER, EXIT_NEGATIVE, EXIT_POSITIVE

    cols = (EXIT_NEGATIVE, EXIT_POSITIVE, DEFER)
    matrix = [[int(np.sum((labels == y) & (decisions == d))) for d in cols] for y in (0, 1)]
    return {"rows": ["label 0", "label 1"], "columns": [DECISION_NAMES[d] for d in cols], "matrix": matrix}


def risk_coverage(policy: Any, scores: Any, m: dict[str, Any]) -> dict[str, Any]:
    """FNR_exit and selective risk against coverage on one split, subsampled to CURVE_POINTS."""
    from stage1_pro import metrics
    from stage1_pro.decisions import argmax_class

    confidence, predictions = policy_confidence(policy, scores), argmax_class(scores.probs)
    curves = {
        risk: metrics.risk_coverage_curve(confidence, scores.label, predictions, risk=risk)
        for risk in ("fnr_exit", "selective")
    }
    coverage = np.asarray(curves["fnr_exit"]["coverage"], dtype=np.float64)
    keep = np.arange(coverage.size)
    if coverage.size > CURVE_POINTS:
        keep = np.unique(np.linspace(0, coverage.size - 1, CURVE_POINTS).round().astype(int))
    return {
        "score": policy.spec.score_label,
        "coverage": _clean(coverage[keep].tolist()),
        "fnr_exit": _clean(np.asarray(curves["fnr_exit"]["risk"])[keep].tolist()),
        "selective_risk": _clean(np.asarray(curves["selective"]["risk"])[keep].tolist()),
        "operating_point": {
            "coverage": m["coverage"],
            "fnr_exit": m.get("fnr_exit"),
            "selective_risk": m.get("selective_risk"),
        },
    }


def champion_comparison(
    champion: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str],
    splits: dict[str, Any],
    challenger: Any,
    challenger_test: Any,
    target: float,
    delta: float,
    max_fpr: float,
    tolerance: float,
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The ``champion_coverage`` check and the champion's side of the comparison (validation.json).

    Args:
        champion: the champion bundle folder or registry URI.
        data: this run's dataset.
        splits: this run's splits.json.
        challenger: this run's fitted policy.
        challenger_test: this run's test :class:`~stage1_pro.scores.Scores`.
        target, delta, max_fpr: this run's contract.
        tolerance: allowed test-coverage drop.
        batch_size, device: how the champion scores.

    Returns:
        ``(check, info)``; ``check`` is None when ``champion`` is a registry prefix with nothing
        published yet (a first run: nothing to compare against, which ``info`` records). Test
        images the champion was fitted on are left out for both models.
    """
    from stage1_pro.champion import nothing_published, rescore_champion
    from stage1_pro.scores import Scores

    if nothing_published(champion):
        log.warning("champion %s: nothing published there yet (a first run?); not compared", champion)
        return None, {"uri": str(champion), "note": "nothing published under this prefix yet: not compared"}
    found = rescore_champion(
        champion, data=data, splits=splits, target_fnr_exit=target, delta=delta, max_fpr_exit=max_fpr,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    test_scores = found.scores.subset("test")
    test, decisions = _split_metrics(found.policy, test_scores, delta)
    calib, _ = _split_metrics(found.policy, found.scores.subset("val_calib"), delta)
    ours = challenger_test
    if found.excluded.size:  # the challenger on exactly the champion's test rows
        keep = np.isin(challenger_test.index, test_scores.index)
        ours = Scores(
            index=challenger_test.index[keep], split=challenger_test.split[keep],
            label=challenger_test.label[keep], probs=challenger_test.probs[keep],
            gate_logit=None if challenger_test.gate_logit is None else challenger_test.gate_logit[keep],
            source=challenger_test.source,
        )  # fmt: skip
    mine, _ = _split_metrics(challenger, ours, delta)
    meta = found.bundle
    floor = max(test["coverage"] - tolerance, 0.0)
    overlap = "unknown" if not found.overlap_known else ("excluded" if found.excluded.size else "none")
    info = {
        "uri": str(champion),
        "version": meta["version"],
        "exit_policy": meta["active_exit_policy"],
        "model_version": meta["lineage"]["model_version"],
        "data_fingerprint": meta["lineage"]["data_fingerprint"],
        "feasible": bool(found.policy.feasible_),
        "certificate": _clean(found.policy.certificate_),
        "val_calib_metrics": calib,
        "test_metrics": test,
        "challenger_test_metrics": mine,
        "confusion": confusion(decisions, test_scores.label),
        "coverage_difference": mine["coverage"] - test["coverage"],
        "tolerance": tolerance,
        "n_rescored": len(found.scores),
        "overlap": overlap,
        "n_excluded": int(found.excluded.size),
    }
    notes = {
        "none": "",
        "excluded": f"; {found.excluded.size} images the champion was fitted on left out for both",
        "unknown": "; the champion's training images could not be identified (its manifest changed): "
        "any among this test split flatter it",
    }
    check = _check(
        "champion_coverage",
        mine["coverage"] >= floor,
        mine["coverage"],
        floor,
        f"test coverage {mine['coverage']:.4f} vs champion {meta['version']} {test['coverage']:.4f} on "
        f"the same {test['n']} test images (re-certified on this val_calib: "
        f"{'feasible' if found.policy.feasible_ else 'INFEASIBLE, defers all'}) - tolerance {tolerance}"
        f"{notes[overlap]}",
    )
    return check, info


def blessing_checks(
    policy_obj: dict[str, Any],
    audit_result: dict[str, Any],
    *,
    target: float,
    max_fpr: float,
    delta: float,
) -> list[dict[str, Any]]:
    """The checks of the blessing rule (see the module docstring), in report order."""
    checks = [
        _check(
            "policy_feasible",
            policy_obj["feasible"],
            policy_obj["feasible"],
            True,
            "the policy certified an exit region"
            if policy_obj["feasible"]
            else "the policy is infeasible (always defers): nothing was certified on val_calib",
        )
    ]
    p_target, p_delta = policy_obj["target_fnr_exit"], policy_obj["delta"]
    p_fpr = policy_obj.get("max_fpr_exit", NO_GUARD)
    ok = p_target <= target + 1e-12 and p_fpr <= max_fpr + 1e-12 and p_delta <= delta + 1e-12
    legacy = (
        ""
        if "max_fpr_exit" in policy_obj
        else " (a policy file written before the guard existed: recalibrate it)"
    )
    checks.append(
        _check(
            "certified_target",
            ok,
            p_target,
            target,
            f"certified for target {p_target}, max_fpr_exit {p_fpr} at delta {p_delta}{legacy}; the run's "
            f"contract is target {target}, max_fpr_exit {max_fpr}, delta {delta}",
        )
    )
    a = audit_result
    if a["n_exited_positives"] == 0:
        what = "no exited positives on test: the audit cannot see FNR_exit (power 0)"
    else:
        what = (
            f"test FNR_exit {a['n_false_negatives']}/{a['n_exited_positives']} "
            f"(p-value {a['fnr_p_value']:.3g}), FPR_exit {a['n_false_positives']}/{a['n_exited_negatives']} "
            f"(p-value {a['fpr_p_value']:.3g}), each tested at {a['test_level']:g}"
        )
    verdict = f"rejected ({', '.join(a['refused_by'])} above its bound)" if a["refused"] else "not rejected"
    checks.append(
        _check(
            "test_audit",
            not a["refused"],
            min(a["fnr_p_value"], a["fpr_p_value"]),
            a["test_level"],
            f"H0 'FNR_exit <= {target} and FPR_exit <= {max_fpr}' {verdict} at level {a['level']:g}: {what}; "
            f"power {a['power']:.2f} against a true FNR_exit of {a['alternative_fnr_exit']:g} "
            f"({a['positives_for_power']} exited test positives give power {a['power_goal']:g})",
        )
    )
    return checks


def diagnostics(
    test: dict[str, Any], *, min_coverage: float, min_exit_accuracy: float, max_fpr: float
) -> list:
    """Point-estimate floors reported beside the blessing (never deciding it; module docstring)."""
    cov, acc, fpr = test["coverage"], test.get("exit_accuracy"), test.get("fpr_exit")
    return [
        _check(
            "min_coverage",
            cov >= min_coverage,
            cov,
            min_coverage,
            f"test coverage {cov:.4f} vs {min_coverage}",
        ),
        _check(
            "min_exit_accuracy",
            acc is not None and acc >= min_exit_accuracy,
            acc,
            min_exit_accuracy,
            "no exits on test" if acc is None else f"test exit accuracy {acc:.4f} vs {min_exit_accuracy}",
        ),
        _check(
            "max_fpr_exit",
            fpr is None or fpr <= max_fpr,
            fpr,
            max_fpr,
            "no exited negatives on test"
            if fpr is None
            else f"test FPR_exit point estimate {fpr:.4f} vs {max_fpr}",
        ),
    ]


def policy_comparison(
    scores: Any,
    policy: Any,
    *,
    policies: tuple[str, ...],
    delta: float,
) -> list[dict[str, Any]]:
    """What each policy of ``policies`` certifies on val_calib and achieves on test, the active one first.

    The others are fitted in memory with the active policy's target, guard, delta and procedure
    (those their constructor takes) and their default options; a policy that cannot be fitted on
    these scores (no gate logits, a degenerate val_select) gets a ``note`` instead of numbers.
    """
    import inspect
    import warnings

    from stage1_pro.policies import InfeasibleCertificateWarning, create_policy, get_policy_class

    test = scores.subset("test")
    settings = {
        "target_fnr_exit": policy.target_fnr_exit,
        "max_fpr_exit": policy.max_fpr_exit,
        "delta": policy.delta,
        "method": policy.certificate_["procedure"],
    }
    rows = [_comparison_row(policy, test, delta, active=True)]
    for name in policies:
        if name == policy.name:
            continue
        accepted = inspect.signature(get_policy_class(name).__init__).parameters
        try:
            other = create_policy(name, **{k: v for k, v in settings.items() if k in accepted})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InfeasibleCertificateWarning)
                other.fit(scores)
        except DataError as exc:
            rows.append({"policy": name, "active": False, "feasible": None, "note": str(exc)})
            continue
        rows.append(_comparison_row(other, test, delta, active=False))
    return rows


def _comparison_row(policy: Any, test_scores: Any, delta: float, *, active: bool) -> dict[str, Any]:
    test, _ = _split_metrics(policy, test_scores, delta)
    cert = policy.certificate_
    return _clean(
        {
            "policy": policy.name,
            "active": active,
            "feasible": bool(policy.feasible_),
            "procedure": cert["procedure"],
            "val_calib_coverage": policy.val_calib_metrics_["coverage"],
            "certified_fnr_upper_bound": cert["upper_bound"],
            "certified_fpr_upper_bound": cert.get("fpr_upper_bound"),
            "test_coverage": test["coverage"],
            "test_fnr_exit": test["fnr_exit"],
            "test_fpr_exit": test["fpr_exit"],
            "test_exit_accuracy": test["exit_accuracy"],
        }
    )


def _check_fraction(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{name}={value!r} must be a fraction in [0, 1]")
    return float(value)


def validate_run(
    run_dir: str | os.PathLike[str],
    *,
    policy_file: str | os.PathLike[str] | None = None,
    champion: str | os.PathLike[str] | None = None,
    audit_level: float = DEFAULT_AUDIT_LEVEL,
    audit_effect: float = DEFAULT_AUDIT_EFFECT,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    min_exit_accuracy: float = DEFAULT_MIN_EXIT_ACCURACY,
    champion_tolerance: float = DEFAULT_CHAMPION_TOLERANCE,
    report_format: str = "html",
    data: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    baseline: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Audit the run's policy on ``test``, decide the blessing, write validation.json and reports.

    Args:
        run_dir: run directory holding config.json, splits.json, scores.npz and one policy file.
        policy_file: the policy file to audit (default: the run's one policy file, which must
            match ``config.exit_policy``).
        champion: the model in production to compare with on this run's data: a bundle folder or a
            registry URI (``PREFIX`` follows ``latest``; ``PREFIX/VERSION``); see the module docstring.
        audit_level: level of the test audit, in (0, 0.5].
        audit_effect: the audit's power is reported against a true FNR_exit of this multiple of
            the target (> 1).
        min_coverage, min_exit_accuracy: levels of the reported diagnostics (module docstring).
        champion_tolerance: allowed test-coverage drop against the champion; a fraction in [0, 1].
        report_format: ``html`` or ``md``.
        data: this run's dataset, for the champion to score (default: the ``dataset.source``
            recorded in splits.json).
        batch_size, device: how the champion scores the images.
        baseline: removed (raises); use ``champion``.

    Returns:
        The written validation.json object (``blessed`` says the verdict).

    Raises:
        ArtifactError, DataError, ConfigError: missing or invalid inputs, naming the file.
    """
    from stage1_pro import audit
    from stage1_pro.calibrate import check_scores_match_splits
    from stage1_pro.config import PHASE_POLICIES
    from stage1_pro.policies import load_policy
    from stage1_pro.report import REPORT_FORMATS, write_reports
    from stage1_pro.scores import load_scores

    if report_format not in REPORT_FORMATS:
        raise ConfigError(f"report_format={report_format!r} is unknown; allowed: {', '.join(REPORT_FORMATS)}")
    if baseline is not None:
        raise ConfigError(
            "baseline was removed: it compared coverages recorded on two different test sets; pass "
            "champion=BUNDLE_OR_REGISTRY_URI (--champion), which re-scores that bundle on this run's data"
        )
    audit_level = check_audit_level(audit_level)
    if not (isinstance(audit_effect, int | float) and audit_effect > 1.0):
        raise ConfigError(f"audit_effect={audit_effect!r} must be a number > 1 (e.g. 1.5: a 50% violation)")
    min_coverage = _check_fraction("min_coverage", min_coverage)
    min_exit_accuracy = _check_fraction("min_exit_accuracy", min_exit_accuracy)
    champion_tolerance = _check_fraction("champion_tolerance", champion_tolerance)

    run = str(run_dir)
    uri = {name: storage.join(run, name) for name in (CONFIG_FILE, SPLITS_FILE, SCORES_FILE)}
    config = read_artifact(uri[CONFIG_FILE], "config")
    splits = read_artifact(uri[SPLITS_FILE], "splits")
    exit_policy = config["exit_policy"]
    target, delta = float(config["target_fnr_exit"]), float(config["delta"])
    max_fpr = float(config.get("max_fpr_exit", DEFAULT_MAX_FPR_EXIT))
    policy_uri = str(find_policy_file(run, exit_policy) if policy_file is None else policy_file)
    policy_name = os.path.basename(policy_uri)
    policy_obj = read_artifact(policy_uri)
    expected_kind = POLICY_ARTIFACT_KINDS[exit_policy]
    if policy_obj["artifact"] != expected_kind:
        raise ArtifactError(
            f"{policy_uri}: a {policy_obj['artifact']} policy file, but config.json says exit_policy="
            f"{exit_policy!r} (needs {DEFAULT_FILENAMES[expected_kind]})"
        )
    policy = load_policy(policy_uri)
    scores = load_scores(uri[SCORES_FILE])
    check_scores_match_splits(scores, splits, uri[SCORES_FILE], uri[SPLITS_FILE])
    if "gate_logit" in policy.score_names and not scores.has_gate:
        raise DataError(
            f"{uri[SCORES_FILE]}: no 'gate_logit' array; the {exit_policy} policy needs phase >= 3 scores"
        )

    test_scores = scores.subset("test")
    test, decisions = _split_metrics(policy, test_scores, delta)
    calib, _ = _split_metrics(policy, scores.subset("val_calib"), delta)
    audit_result = audit.audit(test, target=target, max_fpr=max_fpr, level=audit_level, effect=audit_effect)
    checks = blessing_checks(policy_obj, audit_result, target=target, max_fpr=max_fpr, delta=delta)
    champion_info = None
    if champion is not None:
        check, champion_info = champion_comparison(
            champion, data=data or splits["dataset"]["source"], splits=splits, challenger=policy,
            challenger_test=test_scores, target=target, delta=delta, max_fpr=max_fpr,
            tolerance=champion_tolerance, batch_size=batch_size, device=device,
        )  # fmt: skip
        if check is not None:
            checks.append(check)
    comparison = policy_comparison(
        scores, policy, policies=PHASE_POLICIES.get(int(config.get("phase", 1)), (exit_policy,)), delta=delta
    )

    inputs = {name: sha256_uri(u) for name, u in uri.items()}
    inputs[policy_name] = sha256_uri(policy_uri)
    for name in (MODEL_FILE, MODEL_INFO_FILE):
        if storage.exists(storage.join(run, name)):
            inputs[name] = sha256_uri(storage.join(run, name))
    lineage = {
        "data_fingerprint": splits["dataset"]["fingerprint"],
        "splits_version": splits["splits_version"],
    }
    if MODEL_FILE in inputs:
        lineage["model_version"] = inputs[MODEL_FILE]
    rule_text = (
        f"feasible policy certified for target <= {target}, max_fpr_exit <= {max_fpr} at delta <= {delta}; "
        f"the test split does not reject 'FNR_exit <= {target} and FPR_exit <= {max_fpr}' at level "
        f"{audit_level:g} (exact binomial)"
        + (f"; coverage >= champion's on this test split - {champion_tolerance}" if champion_info else "")
    )
    validation: dict[str, Any] = {
        "created_at": utc_now(),
        "exit_policy": exit_policy,
        "policy_file": policy_name,
        "target_fnr_exit": target,
        "max_fpr_exit": max_fpr,
        "delta": delta,
        "blessed": all(c["passed"] for c in checks),
        "rule": {
            "audit_level": audit_level,
            "audit_effect": float(audit_effect),
            "min_coverage": min_coverage,
            "min_exit_accuracy": min_exit_accuracy,
            "champion_tolerance": champion_tolerance,
            "description": rule_text,
        },
        "checks": _clean(checks),
        "audit": _clean(audit_result),
        "diagnostics": _clean(
            diagnostics(test, min_coverage=min_coverage, min_exit_accuracy=min_exit_accuracy, max_fpr=max_fpr)
        ),
        "test_metrics": test,
        "val_calib_metrics": calib,
        "certificate": policy_obj["certificate"],
        "policy_comparison": comparison,
        "confusion": confusion(decisions, test_scores.label),
        "risk_coverage": risk_coverage(policy, test_scores, test),
        "champion": champion_info,
        "inputs": inputs,
        "lineage": lineage,
    }
    model_info = None
    if MODEL_INFO_FILE in inputs:
        info_uri = storage.join(run, MODEL_INFO_FILE)
        model_info = read_artifact(info_uri, "model")
    validation.update(
        write_reports(run, validation, config=config, splits=splits, model_info=model_info, fmt=report_format)
    )
    written = write_artifact(storage.join(run, DEFAULT_FILENAMES["validation"]), "validation", validation)
    failed = [c["name"] for c in checks if not c["passed"]]
    if failed:
        log.warning("run %s is NOT blessed; failed checks: %s", run, ", ".join(failed))
    else:
        log.info(
            "run %s is blessed (test coverage %.4f, FNR_exit %s)", run, test["coverage"], test.get("fnr_exit")
        )
    return written
