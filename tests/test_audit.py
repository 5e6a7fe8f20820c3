"""The test split's audit (stage1_pro.audit): exact p-values, critical counts, power, and the rate at
which it refuses valid rules (a statistical test: many draws, the rate against its level with its
Monte-Carlo error). The end-to-end version (calibrate, deploy, audit) is in tests/long/."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from stage1_pro import audit as A  # noqa: N812
from stage1_pro.errors import ConfigError

TARGET, GUARD, LEVEL = 0.02, 0.25, 0.05


def counts(n: int, k: int, n_neg: int, fp: int) -> dict[str, int]:
    """exit_metrics-style counts: n exited positives (k missed), n_neg exited negatives (fp positive)."""
    return {
        "n_exited_positives": n,
        "n_false_negatives": k,
        "n_exited": n + n_neg,
        "n_exit_positive": (n - k) + fp,
    }


def test_p_values_are_the_exact_upper_tail() -> None:
    for n, k in ((10, 0), (10, 1), (300, 9), (2000, 55)):
        assert A.upper_tail_p_value(k, n, TARGET) == pytest.approx(
            stats.binomtest(k, n, TARGET, alternative="greater").pvalue
        )
    assert A.upper_tail_p_value(0, 0, TARGET) == 1.0  # nothing exited: no evidence
    assert A.upper_tail_p_value(5, 5, 1.0) == 1.0  # the guard disabled: its null always holds


def test_critical_count_and_power_by_brute_force() -> None:
    for n in (0, 1, 7, 100, 333, 1000):
        for bound in (TARGET, GUARD):
            c = int(A.critical_count(n, bound, 0.025))
            rejecting = [k for k in range(n + 1) if A.upper_tail_p_value(k, n, bound) <= 0.025]
            assert c == (rejecting[0] if rejecting else n + 1), (n, bound)
            alt = 1.5 * bound
            brute = sum(stats.binom.pmf(k, n, alt) for k in rejecting) if n else 0.0
            assert A.power(n, bound, alt, 0.025) == pytest.approx(brute, abs=1e-12)
    n = A.trials_for_power(TARGET, 1.5 * TARGET, 0.025)
    assert A.power(n, TARGET, 1.5 * TARGET, 0.025) >= 0.8 > max(A.power(np.arange(1, n), TARGET, 0.03, 0.025))


def test_audit_of_counts() -> None:
    a = A.audit(counts(500, 20, 1000, 120), target=TARGET, max_fpr=GUARD)
    assert a["refused"] and a["refused_by"] == ["fnr_exit"]  # 20/500 = 0.04
    assert a["test_level"] == LEVEL / 2 and a["bonferroni"]
    assert (a["n_exited_negatives"], a["n_false_positives"]) == (1000, 120)
    assert a["power"] == pytest.approx(float(A.power(500, TARGET, 0.03, 0.025)))
    ok = A.audit(counts(500, 12, 1000, 240), target=TARGET, max_fpr=GUARD)
    assert not ok["refused"]  # 0.024 and 0.24: above the bounds, not significantly
    guard = A.audit(counts(500, 0, 1000, 320), target=TARGET, max_fpr=GUARD)
    assert guard["refused_by"] == ["fpr_exit"]
    # without the guard the FNR test gets the whole level
    assert A.audit(counts(500, 12, 1000, 990), target=TARGET, max_fpr=1.0)["test_level"] == LEVEL
    with pytest.raises(ConfigError, match=r"audit_level=0.7 is outside the valid range \(0, 0.5\]"):
        A.audit(counts(10, 0, 10, 0), target=TARGET, max_fpr=GUARD, level=0.7)
    with pytest.raises(ConfigError, match=r"audit effect=1\.0 must be > 1"):
        A.audit(counts(10, 0, 10, 0), target=TARGET, max_fpr=GUARD, effect=1.0)


@pytest.mark.parametrize("n", [50, 200, 1000, 5000])
def test_false_refusals_of_a_rule_on_both_bounds_stay_within_the_level(n: int) -> None:
    """The worst valid rule (true FNR_exit = target and FPR_exit = guard exactly): over 100,000 test
    splits the refusal rate is <= level + 3 Monte-Carlo s.e."""
    rng = np.random.default_rng(n)
    draws, n_neg = 100_000, 3 * n
    k, fp = rng.binomial(n, TARGET, draws), rng.binomial(n_neg, GUARD, draws)
    verdict = A.refused(k, n, fp, n_neg, target=TARGET, max_fpr=GUARD, level=LEVEL)
    for i in range(0, draws, 5000):  # the vectorised verdict is audit()'s
        assert (
            A.audit(counts(n, int(k[i]), n_neg, int(fp[i])), target=TARGET, max_fpr=GUARD)["refused"]
            == verdict[i]
        )
    assert verdict.mean() <= LEVEL + 3 * math.sqrt(LEVEL * (1 - LEVEL) / draws), verdict.mean()
    # the old point-estimate rule ("test FNR_exit <= target") refuses such a rule far more often
    assert np.mean(k / n > TARGET) > 0.25


def test_reported_power_is_the_refusal_rate_under_the_alternative() -> None:
    rng = np.random.default_rng(1)
    n, draws = 1000, 100_000
    k = rng.binomial(n, 1.5 * TARGET, draws)
    rate = A.refused(k, n, 0, 2000, target=TARGET, max_fpr=GUARD, level=LEVEL).mean()
    power = A.audit(counts(n, 0, 2000, 0), target=TARGET, max_fpr=GUARD)["power"]
    assert abs(rate - power) <= 3 * math.sqrt(power * (1 - power) / draws)
