"""Exit metrics of a stage-1 policy: the single definition of FNR_exit used everywhere.

A policy's decision per image is one of ``EXIT_POSITIVE`` (1), ``EXIT_NEGATIVE`` (0) or
``DEFER`` (-1) (constants in :mod:`stage1_pro.decisions`). With ``y`` the true label:

* ``coverage = #exited / #all`` (exited = not deferred);
* ``FNR_exit = FN_exit / (TP_exit + FN_exit)``: the miss rate among **exited positives**
  (definition A, ``docs/methods.md`` §1.1); undefined (``nan``) when no positive exits;
* ``FPR_exit = FP_exit / (FP_exit + TN_exit)`` among exited negatives (the guard, ``docs/methods.md`` §1.2);
* ``exit_accuracy`` = correct exits / exits; ``selective_risk = 1 - exit_accuracy``
  (error rate among exits, Geifman & El-Yaniv 2017);
* the risk–coverage curve and its area (AURC) rank images by a confidence score;
* :func:`clopper_pearson_upper`: the exact one-sided binomial upper confidence bound.

Functions taking arrays return ``float('nan')`` for an undefined ratio; :func:`exit_metrics`
returns ``None`` there so the dict can be written to JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stage1_pro.decisions import DEFER as _DEFER
from stage1_pro.decisions import EXIT_NEGATIVE as _EXIT_NEGATIVE
from stage1_pro.decisions import EXIT_POSITIVE as _EXIT_POSITIVE


def _arrays(decisions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(decisions)
    y = np.asarray(labels)
    if d.shape != y.shape or d.ndim != 1:
        raise ValueError(f"decisions {d.shape} and labels {y.shape} must be 1-D arrays of the same length")
    bad = ~np.isin(d, (_EXIT_POSITIVE, _EXIT_NEGATIVE, _DEFER))
    if bad.any():
        raise ValueError(
            f"decisions must be 1 (exit-positive), 0 (exit-negative) or -1 (defer); got {d[bad][:5]}"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return d, y


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else float("nan")


def exit_counts(decisions: Any, labels: Any) -> dict[str, int]:
    """Confusion counts restricted to exited images: ``tp``, ``fn``, ``fp``, ``tn``, ``n``, ``n_exited``."""
    d, y = _arrays(decisions, labels)
    pos, neg = y == 1, y == 0
    return {
        "n": int(d.size),
        "n_exited": int((d != _DEFER).sum()),
        "tp": int((pos & (d == _EXIT_POSITIVE)).sum()),
        "fn": int((pos & (d == _EXIT_NEGATIVE)).sum()),
        "fp": int((neg & (d == _EXIT_POSITIVE)).sum()),
        "tn": int((neg & (d == _EXIT_NEGATIVE)).sum()),
    }


def fnr_exit(decisions: Any, labels: Any) -> float:
    """``FN_exit / (TP_exit + FN_exit)``: misses among exited positives (``nan`` if none exited)."""
    c = exit_counts(decisions, labels)
    return _ratio(c["fn"], c["tp"] + c["fn"])


def coverage(decisions: Any) -> float:
    """Fraction of images that exit (are not deferred); ``nan`` for an empty array."""
    d = np.asarray(decisions)
    return _ratio(int((d != _DEFER).sum()), int(d.size))


def fpr_exit(decisions: Any, labels: Any) -> float:
    """``FP_exit / (FP_exit + TN_exit)``: false alarms among exited negatives."""
    c = exit_counts(decisions, labels)
    return _ratio(c["fp"], c["fp"] + c["tn"])


def exit_accuracy(decisions: Any, labels: Any) -> float:
    """Correct exits / exits."""
    c = exit_counts(decisions, labels)
    return _ratio(c["tp"] + c["tn"], c["n_exited"])


def selective_risk(decisions: Any, labels: Any) -> float:
    """Error rate among exits, ``1 - exit_accuracy`` (the selective risk of SGR/SelectiveNet)."""
    c = exit_counts(decisions, labels)
    return _ratio(c["fp"] + c["fn"], c["n_exited"])


def clopper_pearson_upper(k: Any, n: Any, delta: float) -> np.ndarray | float:
    """One-sided exact (Clopper–Pearson) upper confidence bound on a binomial proportion.

    Returns ``u`` with ``P(Bin(n, u) <= k) = delta``, i.e. ``Beta(1 - delta; k + 1, n - k)``;
    ``u = 1`` when ``k = n`` (including ``n = 0``). With probability at least ``1 - delta`` the
    true proportion is ``<= u``. Duality used by :mod:`stage1_pro.certify`: the exact binomial
    p-value ``P(Bin(n, target) <= k)`` is ``<= delta`` iff ``u <= target``.

    Vectorised over ``k`` and ``n``; returns a float for scalar input.
    """
    from scipy import stats  # lazy: keeps `import stage1_pro.metrics` light

    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1)")
    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    if (k_arr < 0).any() or (k_arr > n_arr).any():
        raise ValueError("need 0 <= k <= n")
    out = np.ones(k_arr.shape)
    ok = k_arr < n_arr
    out[ok] = stats.beta.ppf(1.0 - delta, k_arr[ok] + 1.0, n_arr[ok] - k_arr[ok])
    return float(out) if out.ndim == 0 else out


def _confidence_order(confidence: Any, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    if c.shape != errors.shape:
        raise ValueError(f"confidence {c.shape} must match the labels {errors.shape}")
    order = np.argsort(-c, kind="stable")
    return c[order], errors[order]


def risk_coverage_curve(
    confidence: Any, labels: Any, predictions: Any, *, risk: str = "selective"
) -> dict[str, np.ndarray]:
    """Risk against coverage when exiting the most confident images first.

    Args:
        confidence: array (n,); higher means "exit earlier" (max softmax, calibrated gate
            probability...).
        labels, predictions: arrays (n,): true labels and the class each image would exit with.
        risk: ``"selective"``: error rate among exits; ``"fnr_exit"``: misses among exited positives.

    Returns:
        ``threshold`` (descending unique confidences), ``coverage`` and ``risk`` (same length):
        exiting every image with ``confidence >= threshold[j]`` has coverage ``coverage[j]`` and
        risk ``risk[j]`` (``nan`` where undefined). Ties share one point.
    """
    y = np.asarray(labels)
    pred = np.asarray(predictions)
    if risk == "selective":
        errors, weights = (pred != y).astype(np.float64), np.ones(y.shape)
    elif risk == "fnr_exit":
        errors, weights = ((y == 1) & (pred == 0)).astype(np.float64), (y == 1).astype(np.float64)
    else:
        raise ValueError(f"risk={risk!r}; allowed: 'selective', 'fnr_exit'")
    c, e = _confidence_order(confidence, errors)
    _, w = _confidence_order(confidence, weights)
    if c.size == 0:
        return {"threshold": c, "coverage": c, "risk": c}
    # last index of each run of equal confidences: ties enter together
    last = np.r_[np.nonzero(np.diff(c))[0], c.size - 1]
    cum_e, cum_w = np.cumsum(e)[last], np.cumsum(w)[last]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(cum_w > 0, cum_e / np.where(cum_w > 0, cum_w, 1.0), np.nan)
    return {"threshold": c[last], "coverage": (last + 1) / c.size, "risk": r}


def aurc(confidence: Any, labels: Any, predictions: Any) -> float:
    """Area under the selective risk–coverage curve (Geifman et al. 2019), ties grouped.

    ``AURC = (1/n) * sum_i risk(coverage_i)`` over the n coverage levels i/n, where a run of
    tied confidences exits together (each of its levels gets the risk after the whole run).
    Lower is better; it is the error rate for a constant confidence.
    """
    y = np.asarray(labels)
    if y.size == 0:
        return float("nan")
    curve = risk_coverage_curve(confidence, labels, predictions)
    counts = np.diff(np.r_[0, np.rint(curve["coverage"] * y.size).astype(np.int64)])
    return float(np.sum(curve["risk"] * counts) / y.size)


def exit_metrics(
    decisions: Any,
    labels: Any,
    *,
    confidence: Any | None = None,
    predictions: Any | None = None,
    delta: float | None = None,
) -> dict[str, Any]:
    """All exit metrics of one split as a JSON-ready dict (``None`` where a ratio is undefined).

    Keys: ``n``, ``n_exited``, ``n_exit_positive``, ``n_exit_negative``, ``n_exited_positives``,
    ``n_false_negatives``, ``coverage``, ``fnr_exit``, ``fpr_exit``, ``exit_accuracy``,
    ``selective_risk``; ``fnr_exit_upper_bound`` (Clopper–Pearson at ``delta``) when ``delta``
    is given; ``aurc`` when ``confidence`` and ``predictions`` (the class each image would
    exit with) are given.
    """
    c = exit_counts(decisions, labels)
    d = np.asarray(decisions)
    n_pos_exit = c["tp"] + c["fn"]

    def _num(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    out: dict[str, Any] = {
        "n": c["n"],
        "n_exited": c["n_exited"],
        "n_exit_positive": int((d == _EXIT_POSITIVE).sum()),
        "n_exit_negative": int((d == _EXIT_NEGATIVE).sum()),
        "n_exited_positives": n_pos_exit,
        "n_false_negatives": c["fn"],
        "coverage": _num(_ratio(c["n_exited"], c["n"])) or 0.0,
        "fnr_exit": _num(_ratio(c["fn"], n_pos_exit)),
        "fpr_exit": _num(_ratio(c["fp"], c["fp"] + c["tn"])),
        "exit_accuracy": _num(_ratio(c["tp"] + c["tn"], c["n_exited"])),
        "selective_risk": _num(_ratio(c["fp"] + c["fn"], c["n_exited"])),
    }
    if delta is not None:
        out["fnr_exit_upper_bound"] = float(clopper_pearson_upper(c["fn"], n_pos_exit, delta))
    if confidence is not None and predictions is not None:
        out["aurc"] = _num(aurc(confidence, labels, predictions))
    return out
