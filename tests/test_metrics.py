"""Exit metrics (stage1_pro.metrics) against hand-computed cases and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from stage1_pro import metrics
from stage1_pro.decisions import DEFER, EXIT_NEGATIVE, EXIT_POSITIVE

# 10 images: labels and decisions chosen so every count differs
#            y: 1  1  1  1  0  0  0  0  1  0
#     decision: 1  1  0  -1 0  0  1  -1 -1 0
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
D = np.array([1, 1, 0, -1, 0, 0, 1, -1, -1, 0], dtype=np.int8)
# exited: 7; TP 2, FN 1, FP 1, TN 3


def test_decision_constants() -> None:
    assert (EXIT_POSITIVE, EXIT_NEGATIVE, DEFER) == (1, 0, -1)


def test_counts_and_ratios_by_hand() -> None:
    c = metrics.exit_counts(D, Y)
    assert c == {"n": 10, "n_exited": 7, "tp": 2, "fn": 1, "fp": 1, "tn": 3}
    assert metrics.fnr_exit(D, Y) == pytest.approx(1 / 3)
    assert metrics.coverage(D) == pytest.approx(0.7)
    assert metrics.fpr_exit(D, Y) == pytest.approx(1 / 4)
    assert metrics.exit_accuracy(D, Y) == pytest.approx(5 / 7)
    assert metrics.selective_risk(D, Y) == pytest.approx(2 / 7)


def test_fnr_exit_counts_only_exited_positives() -> None:
    # a deferred positive is not a miss (definition A: FN_exit / (TP_exit + FN_exit))
    assert metrics.fnr_exit([1, -1, -1], [1, 1, 1]) == 0.0
    assert metrics.fnr_exit([0, -1, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5)  # 1 miss, 1 hit


def test_undefined_ratios_are_nan_and_none() -> None:
    d = np.array([-1, -1, 0])
    y = np.array([1, 1, 0])
    assert math.isnan(metrics.fnr_exit(d, y))
    assert math.isnan(metrics.fpr_exit([-1], [0]))
    assert math.isnan(metrics.coverage([]))
    m = metrics.exit_metrics(d, y, delta=0.1)
    assert m["fnr_exit"] is None and m["fpr_exit"] == 0.0
    assert m["fnr_exit_upper_bound"] == 1.0  # nothing exited: the bound says nothing
    assert m["n_exited_positives"] == 0


def test_exit_metrics_dict() -> None:
    conf = np.linspace(1, 0, 10)
    m = metrics.exit_metrics(D, Y, confidence=conf, predictions=np.where(D == -1, 1, D), delta=0.1)
    assert m["n"] == 10 and m["n_exited"] == 7 and m["n_exit_positive"] == 3 and m["n_exit_negative"] == 4
    assert m["n_exited_positives"] == 3 and m["n_false_negatives"] == 1
    assert m["coverage"] == pytest.approx(0.7)
    assert m["fnr_exit"] == pytest.approx(1 / 3)
    assert m["fnr_exit_upper_bound"] == pytest.approx(stats.beta.ppf(0.9, 2, 2))
    assert 0 <= m["aurc"] <= 1
    assert set(m) >= {"fpr_exit", "exit_accuracy", "selective_risk"}


@pytest.mark.parametrize(
    ("decisions", "labels", "message"), [([2], [1], "decisions must be"), ([1], [3], "labels")]
)
def test_bad_inputs(decisions, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.exit_counts(decisions, labels)
    with pytest.raises(ValueError, match="same length"):
        metrics.exit_counts([1, 0], [1])


@pytest.mark.parametrize(
    ("k", "n", "delta"), [(0, 1, 0.1), (0, 114, 0.1), (3, 333, 0.1), (5, 20, 0.05), (7, 50, 0.01)]
)
def test_clopper_pearson_against_scipy(k: int, n: int, delta: float) -> None:
    u = metrics.clopper_pearson_upper(k, n, delta)
    assert u == pytest.approx(stats.beta.ppf(1 - delta, k + 1, n - k), rel=1e-12)
    # defining property: P(Bin(n, u) <= k) = delta
    assert stats.binom.cdf(k, n, u) == pytest.approx(delta, rel=1e-8)
    # scipy's own exact interval (two-sided at 2*delta has the same upper end)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact")
    assert u == pytest.approx(ci.high, rel=1e-9)


def test_clopper_pearson_by_hand_and_edges() -> None:
    # k = 0: (1 - u)^n = delta  =>  u = 1 - delta^(1/n)
    assert metrics.clopper_pearson_upper(0, 10, 0.1) == pytest.approx(1 - 0.1 ** (1 / 10))
    assert metrics.clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert metrics.clopper_pearson_upper(0, 0, 0.1) == 1.0
    out = metrics.clopper_pearson_upper(np.array([0, 1, 2]), np.array([10, 10, 10]), 0.1)
    assert out.shape == (3,) and np.all(np.diff(out) > 0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        metrics.clopper_pearson_upper(3, 2, 0.1)
    with pytest.raises(ValueError, match="delta"):
        metrics.clopper_pearson_upper(1, 2, 1.5)


def test_risk_coverage_curve_by_hand_with_ties() -> None:
    conf = np.array([0.9, 0.8, 0.8, 0.5])
    y = np.array([1, 0, 1, 1])
    pred = np.array([1, 1, 1, 0])  # errors: image 1 (FP), image 3 (FN)
    sel = metrics.risk_coverage_curve(conf, y, pred)
    np.testing.assert_allclose(sel["threshold"], [0.9, 0.8, 0.5])
    np.testing.assert_allclose(sel["coverage"], [0.25, 0.75, 1.0])
    np.testing.assert_allclose(sel["risk"], [0.0, 1 / 3, 0.5])
    fnr = metrics.risk_coverage_curve(conf, y, pred, risk="fnr_exit")
    np.testing.assert_allclose(fnr["risk"], [0.0, 0.0, 1 / 3])
    only_neg = metrics.risk_coverage_curve([0.9, 0.1], [0, 1], [0, 0], risk="fnr_exit")
    assert math.isnan(only_neg["risk"][0]) and only_neg["risk"][1] == 1.0
    with pytest.raises(ValueError, match="risk="):
        metrics.risk_coverage_curve(conf, y, pred, risk="accuracy")


def test_aurc_by_hand() -> None:
    conf = np.array([0.9, 0.8, 0.8, 0.5])
    y = np.array([1, 0, 1, 1])
    pred = np.array([1, 1, 1, 0])
    # coverage levels 1/4..4/4: risks 0, 1/3, 1/3 (tie run), 1/2
    assert metrics.aurc(conf, y, pred) == pytest.approx((0 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    # constant confidence: AURC is the error rate
    assert metrics.aurc(np.ones(4), y, pred) == pytest.approx(0.5)
    # a perfect ranking puts the errors last
    assert metrics.aurc([4, 3, 2, 1], [1, 1, 0, 0], [1, 1, 1, 1]) == pytest.approx(
        (0 + 0 + 1 / 3 + 1 / 2) / 4
    )
    assert math.isnan(metrics.aurc([], [], []))
