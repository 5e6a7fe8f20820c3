"""The test split's audit of a certified exit rule: an exact hypothesis test, with its power.

Method notes: ``docs/methods.md`` §3.

The certificate comes from ``val_calib``; ``test`` is an independent audit that must catch a
broken certificate (a shift between calibration and test, leakage, a bug), not re-certify. So
the audit is a test of the certified claim itself,

    H0: FNR_exit <= target_fnr_exit  and  FPR_exit <= max_fpr_exit,

refused only when the test split rejects it at the stated ``level``: the exact one-sided
binomial p-values ``P(Bin(n, target) >= k)`` (``k`` misses among ``n`` exited test positives)
and ``P(Bin(n_neg, max_fpr) >= fp)`` on exited negatives, each at ``level / 2`` (Bonferroni over
the two, so a rule that meets both bounds is refused with probability <= ``level``; with the
guard disabled the FNR test gets all of ``level``). A point estimate above the target is not
evidence enough: the deployed rule is the loosest certified one, so its true FNR_exit sits just
under the target and a point-estimate rule refuses 10-12 % of valid runs.

What the test split can see is reported beside the verdict: the audit's power against a true
FNR_exit of ``effect * target`` (default 1.5x) with the test's own number of exited positives,
and how many exited positives a power of :data:`POWER_GOAL` would need.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from stage1_pro.defaults import DEFAULT_AUDIT_EFFECT, DEFAULT_AUDIT_LEVEL, check_audit_level

#: Power goal for the "exited positives needed" figure of the audit.
POWER_GOAL = 0.8


def upper_tail_p_value(k: Any, n: Any, bound: float) -> np.ndarray:
    """Exact p-values ``P(Bin(n, bound) >= k)`` of ``H0: rate <= bound`` (1 where ``n = 0``).

    ``bound >= 1``: the null always holds, the p-value is 1.
    """
    from scipy import stats

    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    if bound >= 1.0:
        return np.ones(k_arr.shape)
    p = stats.binom.sf(k_arr - 1.0, n_arr, bound)
    return np.where(n_arr > 0, p, 1.0)


def critical_count(n: Any, bound: float, level: float) -> np.ndarray:
    """The least ``k`` with ``P(Bin(n, bound) >= k) <= level`` (``n + 1``: no count rejects)."""
    from scipy import stats

    n_arr = np.asarray(n, dtype=np.float64)
    # isf gives the least c with sf(c) <= level, and P(X >= c + 1) = sf(c)
    c = stats.binom.isf(level, n_arr, bound) + 1.0
    c = np.where(stats.binom.sf(c - 2.0, n_arr, bound) <= level, c - 1.0, c)  # guard rounding of isf
    return np.where(n_arr > 0, np.minimum(c, n_arr + 1.0), 1.0)


def power(n: Any, bound: float, alternative: float, level: float) -> np.ndarray:
    """Probability that the one-sided test of ``rate <= bound`` at ``level`` rejects when the rate is
    ``alternative``, with ``n`` trials (0 when ``n = 0``)."""
    from scipy import stats

    n_arr = np.asarray(n, dtype=np.float64)
    c = critical_count(n_arr, bound, level)
    out = stats.binom.sf(c - 1.0, n_arr, min(alternative, 1.0))
    return np.where(n_arr > 0, out, 0.0)


@functools.lru_cache(maxsize=64)
def trials_for_power(bound: float, alternative: float, level: float, goal: float = POWER_GOAL) -> int:
    """The fewest trials whose test of ``rate <= bound`` at ``level`` has power ``>= goal`` against
    ``alternative`` (power is not monotone in ``n`` for a discrete test: the first such ``n``)."""
    n = 1
    while power(n, bound, alternative, level) < goal:
        n *= 2
    lo = n // 2
    grid = np.arange(lo, n + 1)
    return int(grid[np.argmax(power(grid, bound, alternative, level) >= goal)])


def test_level(level: float, max_fpr: float) -> float:
    """Level of each of the audit's tests: ``level / 2`` with the guard (Bonferroni), else ``level``."""
    return level / 2 if max_fpr < 1.0 else level


def refused(
    misses: Any, exited_positives: Any, false_alarms: Any, exited_negatives: Any, *, target: float,
    max_fpr: float, level: float = DEFAULT_AUDIT_LEVEL,
) -> np.ndarray:  # fmt: skip
    """Vectorised verdict of :func:`audit`: whether the test counts reject the certified bounds."""
    each = test_level(level, max_fpr)
    return (upper_tail_p_value(misses, exited_positives, target) <= each) | (
        upper_tail_p_value(false_alarms, exited_negatives, max_fpr) <= each
    )


def audit(
    counts: dict[str, Any],
    *,
    target: float,
    max_fpr: float,
    level: float = DEFAULT_AUDIT_LEVEL,
    effect: float = DEFAULT_AUDIT_EFFECT,
) -> dict[str, Any]:
    """Audit one rule's exits on the test split (see the module docstring).

    Args:
        counts: the test split's exit counts, as :func:`stage1_pro.metrics.exit_metrics` returns
            them (``n_exited_positives``, ``n_false_negatives``, ``n_exit_positive`` and
            ``n_exited`` give the exited negatives and false alarms).
        target: ``target_fnr_exit``.
        max_fpr: ``max_fpr_exit`` (1: no guard).
        level: the audit's level.
        effect: report the power against a true FNR_exit of ``effect * target``.

    Returns:
        JSON-ready: the two p-values and levels, ``refused`` and by what, and the power.
    """
    level = check_audit_level(level)
    if not effect > 1.0:
        from stage1_pro.errors import ConfigError

        raise ConfigError(f"audit effect={effect!r} must be > 1 (a violation is a rate above the bound)")
    guard = max_fpr < 1.0
    fnr_level = test_level(level, max_fpr)
    n, k = int(counts["n_exited_positives"]), int(counts["n_false_negatives"])
    n_neg = int(counts["n_exited"]) - n
    fp = int(counts["n_exit_positive"]) - (n - k)
    p_fnr = float(upper_tail_p_value(k, n, target))
    p_fpr = float(upper_tail_p_value(fp, n_neg, max_fpr))
    refused_by = [name for name, p in (("fnr_exit", p_fnr), ("fpr_exit", p_fpr)) if p <= fnr_level]
    alternative = effect * target
    return {
        "level": level,
        "test_level": fnr_level,
        "bonferroni": guard,
        "n_exited_positives": n,
        "n_false_negatives": k,
        "n_exited_negatives": n_neg,
        "n_false_positives": fp,
        "fnr_p_value": p_fnr,
        "fpr_p_value": p_fpr,
        "refused": bool(refused_by),
        "refused_by": refused_by,
        "effect": effect,
        "alternative_fnr_exit": alternative,
        "power": float(power(n, target, alternative, fnr_level)),
        "positives_for_power": trials_for_power(target, alternative, fnr_level),
        "power_goal": POWER_GOAL,
    }
