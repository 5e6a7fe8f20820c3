"""Certification core: a finite-sample, high-probability joint bound on FNR_exit and FPR_exit.

The promise of every deployed policy is

    P( true FNR_exit > target_fnr_exit  or  true FPR_exit > max_fpr_exit ) <= delta,

the probability being over the draw of ``val_calib``, for the deployed rule. ``target_fnr_exit``
is the one target a user tunes; ``max_fpr_exit`` is the guard against the known way to meet an
FNR-only constraint (calling everything positive: FNR_exit 0, FPR_exit 1). The bound comes from
Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei, arXiv 2110.01052, Thm. 1 and §3)
specialised to 0/1 conditional risks (method notes: ``docs/methods.md`` §2):

1. **A grid fixed before the calibration labels are seen.** Candidate exit rules
   ``r_0, ..., r_{m-1}`` ordered from strictest (least coverage) to loosest; policies build it
   from ``val_select`` only (:func:`quantile_grid`).
2. **One exact p-value per grid point and risk.** With ``n_j`` exited positives of ``val_calib``
   under ``r_j`` and ``k_j`` misses among them, ``p_j = P(Bin(n_j, target) <= k_j)``
   (:func:`binomial_p_values`; 1 when ``n_j = 0``); given ``n_j`` the exited positives are
   i.i.d. draws of the positives ``r_j`` exits, so ``p_j`` is super-uniform under
   ``FNR_exit(r_j) > target`` (LTT §3, conditional risks). The same on exited negatives and
   false alarms gives the guard's p-value ``q_j`` under ``FPR_exit(r_j) > max_fpr_exit``.
3. **Intersection-union.** The null of point ``j`` is the union of the two; ``max(p_j, q_j)``
   is a valid p-value for it (Berger 1982: reject the union only when both are rejected).
4. **A family-wise error procedure at level delta** (:data:`PROCEDURES`) on those p-values;
   every certified point meets both bounds simultaneously with probability ``>= 1 - delta``.
5. **Deploy the certified point with the largest coverage.** Coverage does not use labels, so
   any choice within the certified set keeps the guarantee.

Procedures (all valid; ``bench/calibration_validity.py`` measures their coverage):

``split_fallback_sequence`` (default)
    A fallback procedure (Wiens 2003; Wiens & Dmitrienko 2005, "The fallback procedure for
    evaluating a single family of hypotheses"): the grid is tested strictest to loosest, point
    ``j`` at ``delta * w_j`` plus the level of point ``j - 1`` if that one was certified; weights
    ``sum w_j = 1`` fixed before val_calib's labels are read. Here :data:`LEARNED_START_SHARE`
    (98 %) of delta sits on the start learned on ``val_select`` (the point most likely to pass, by the
    ``val_select`` posterior predictive, :func:`learn_order`) and the rest is spread evenly over
    the grid, so a start that fails on val_calib leaves the points before it certifiable. When
    ``val_select`` cannot inform the order (fewer positives than certifying one point would
    need, or no point predicted to pass) every weight is ``1/m``: a label-free procedure that
    certifies whenever Holm does (each point is tested at ``>= delta/m``).
``split_fixed_sequence``
    All of delta on the learned start, then looser points at delta until the first failure
    (LTT fixed-sequence testing; MAPIE's ``split_fixed_sequence``). Starved by a poor
    ``val_select``; kept for comparison.
``fallback_sequence``
    The fallback procedure with even weights: label-free.
``sgr_binary_search``
    Selection with Guaranteed Risk (Geifman & El-Yaniv, arXiv 1705.08500, Alg. 1): binary
    search over the grid, each test at ``delta / K`` with ``K = ceil(log2(m + 1))``.
``multistart_fixed_sequence``
    ``s`` sequences started at label-free points evenly spread over the grid, each tested
    towards looser points at ``delta / s`` (Bonferroni across sequences; LTT §4).
``holm`` / ``bonferroni``
    Order-free step-down (Holm 1979) / single-step Bonferroni at ``delta / m``.
``fixed_sequence``
    The textbook order, strictest point first. Comparison only: the strictest points exit a
    handful of positives, their p-values are near 1 and it stops at once.

Everything is vectorised: the calibration scores are sorted once and the counts at every grid
point come from cumulative counts via :func:`numpy.searchsorted` (``O(n log n + m log n)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stage1_pro.defaults import DEFAULT_MAX_FPR_EXIT, check_delta, check_max_fpr_exit, check_target
from stage1_pro.errors import ConfigError
from stage1_pro.metrics import clopper_pearson_upper

P_VALUE_METHOD = "binomial_exact"
#: Number of sequences of ``multistart_fixed_sequence``.
DEFAULT_STARTS = 4
#: Default number of grid points.
DEFAULT_GRID_SIZE = 200
#: Share of delta that ``split_fallback_sequence`` puts on the learned start (the rest is spread
#: evenly). Measured (reference model, 300 paired draws): with val_select 300 and val_calib 5,000
#: images the spread 2 % lifts the certified rate from 0.85 to 0.99 (coverage 0.64 -> 0.72), while
#: with val_select = val_calib it costs 0.011 coverage at 1,000 images and < 0.001 at 2,000-5,000
#: (a 10 % spread cost 0.035 at 1,000: moving delta off the start moves its binomial critical count).
LEARNED_START_SHARE = 0.98


# --------------------------------------------------------------------------- p-values


def binomial_p_values(k: Any, n: Any, bound: float) -> np.ndarray:
    """Exact p-values ``P(Bin(n, bound) <= k)`` of ``H: rate > bound`` (1 where ``n = 0``).

    For a 0/1 loss the binomial tail is itself a valid p-value, without the factor ``e`` of
    the Bentkus bound (LTT ``core/bounds.py``; MAPIE ``binary=True``). ``bound >= 1`` makes
    the null empty: the p-value is 0.
    """
    from scipy import stats  # lazy: `stage1-pro calibrate --help` must not import scipy

    k_arr, n_arr = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    if bound >= 1.0:
        return np.zeros(k_arr.shape)
    p = stats.binom.cdf(k_arr, n_arr, bound)
    return np.where(n_arr > 0, p, 1.0)


def binomial_log_p_values(k: Any, n: Any, target: float) -> np.ndarray:
    """``log`` of :func:`binomial_p_values` without underflow (used to rank points)."""
    from scipy import stats

    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    logp = np.asarray(stats.binom.logcdf(k_arr, n_arr, target), dtype=np.float64)
    deep = ~np.isfinite(logp) & (n_arr > 0)
    if deep.any():
        # the cdf underflowed (far lower tail, k << n * target): sum the pmf as a geometric series,
        # log cdf = log pmf(k) - log(1 - r) with r = pmf(k-1)/pmf(k), exact to O(r^2) relative
        kd, nd = k_arr[deep], n_arr[deep]
        r = kd * (1.0 - target) / ((nd - kd + 1.0) * target)
        logp[deep] = stats.binom.logpmf(kd, nd, target) - np.log1p(-np.minimum(r, 1 - 1e-12))
    return np.where(n_arr > 0, logp, 0.0)


def min_exited_positives(target: float, delta: float, misses: int = 0) -> int:
    """Smallest number of exited positives that certifies ``FNR_exit <= target`` at level ``delta``
    when ``misses`` of them are missed: the least ``n`` with ``P(Bin(n, target) <= misses) <= delta``.

    E.g. target 0.02, delta 0.1: 114 with no miss, 194 with one.
    """
    from scipy import stats

    if misses < 0:
        raise ValueError("misses must be >= 0")
    lo = misses  # cdf(misses; misses, target) = 1 > delta
    hi = max(2 * lo, 1)
    while stats.binom.cdf(misses, hi, target) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # invariant: cdf(lo) > delta >= cdf(hi); cdf decreases in n
        mid = (lo + hi) // 2
        if stats.binom.cdf(misses, mid, target) > delta:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------- grid and counts


def quantile_grid(scores: Any, size: int = DEFAULT_GRID_SIZE) -> np.ndarray:
    """Thresholds at evenly spaced coverage levels of ``scores``, strictest (largest) first.

    ``threshold_j`` is the ``ceil(c_j * n)``-th largest score for ``c_j = (j + 1) / size``, so
    exiting ``scores >= threshold_j`` covers about ``c_j``; duplicates (ties) are dropped. Built
    from ``val_select`` only, so it is fixed before any ``val_calib`` label is seen.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("cannot build a grid from no scores")
    if size < 1:
        raise ValueError("grid size must be >= 1")
    levels = np.arange(1, size + 1) / size
    idx = np.clip(np.ceil(levels * s.size).astype(np.int64) - 1, 0, s.size - 1)
    return np.unique(s[idx])[::-1].copy()


def count_at_least(values: Any, thresholds: Any) -> np.ndarray:
    """``#{i : values_i >= t}`` for every ``t`` in ``thresholds`` (one sort, one searchsorted)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return v.size - np.searchsorted(v, np.asarray(thresholds, dtype=np.float64), side="left")


@dataclass(frozen=True)
class GridCounts:
    """What each grid point's rule exits on one split (arrays in grid order, strictest first).

    Args:
        exited_positives: positives the rule exits (the FNR_exit denominator ``n``).
        misses: exited positives called negative (``k``).
        exited_negatives: negatives the rule exits (the FPR_exit denominator).
        false_alarms: exited negatives called positive.
        coverage: fraction of the split's images the rule exits (label-free).
        n_images, n_positives: size of the split and its positives.
    """

    exited_positives: np.ndarray
    misses: np.ndarray
    exited_negatives: np.ndarray
    false_alarms: np.ndarray
    coverage: np.ndarray
    n_images: int
    n_positives: int

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("exited_positives", "misses", "exited_negatives", "false_alarms"):
            arrays[name] = np.asarray(getattr(self, name), dtype=np.int64)
        arrays["coverage"] = np.asarray(self.coverage, dtype=np.float64)
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or arrays["misses"].ndim != 1 or arrays["misses"].size == 0:
            raise ValueError("grid counts must be 1-D arrays of the same, non-zero length")
        if (arrays["misses"] > arrays["exited_positives"]).any() or (
            arrays["false_alarms"] > arrays["exited_negatives"]
        ).any():
            raise ValueError("misses/false alarms cannot exceed the exited positives/negatives")
        for name, value in arrays.items():
            object.__setattr__(self, name, value)

    @property
    def size(self) -> int:
        return int(self.misses.size)

    @classmethod
    def from_decisions(cls, decisions: np.ndarray, labels: Any) -> GridCounts:
        """Counts from a ``(m, n)`` array of every grid point's decisions on ``n`` labelled images."""
        from stage1_pro.decisions import DEFER, EXIT_NEGATIVE, EXIT_POSITIVE

        d = np.atleast_2d(np.asarray(decisions))
        y = np.asarray(labels) == 1
        exited = d != DEFER
        return cls(
            exited_positives=(exited & y).sum(axis=1),
            misses=((d == EXIT_NEGATIVE) & y).sum(axis=1),
            exited_negatives=(exited & ~y).sum(axis=1),
            false_alarms=((d == EXIT_POSITIVE) & ~y).sum(axis=1),
            coverage=exited.mean(axis=1) if d.shape[1] else np.zeros(d.shape[0]),
            n_images=int(d.shape[1]),
            n_positives=int(y.sum()),
        )


def threshold_counts(confidence: Any, labels: Any, predictions: Any, grid: Any) -> GridCounts:
    """Counts of the rules "exit with ``predictions`` where ``confidence >= t``" for every ``t`` of ``grid``.

    One sort per class and outcome, then :func:`count_at_least`: ``O(n log n + m log n)``.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(labels) == 1
    pred = np.asarray(predictions) == 1
    return GridCounts(
        exited_positives=count_at_least(conf[y], grid),
        misses=count_at_least(conf[y & ~pred], grid),
        exited_negatives=count_at_least(conf[~y], grid),
        false_alarms=count_at_least(conf[~y & pred], grid),
        coverage=count_at_least(conf, grid) / max(conf.size, 1),
        n_images=int(conf.size),
        n_positives=int(y.sum()),
    )


# --------------------------------------------------------------------------- the order learned on val_select


def predicted_pass_probability(
    n_select: Any, k_select: Any, *, target: float, level: float, scale: float = 1.0
) -> np.ndarray:
    """Probability that each grid point passes its test on ``val_calib``, predicted from ``val_select``.

    A point passes iff its misses ``K <= k_max(n)``, the largest count with
    ``P(Bin(n, target) <= k_max) <= level``. Its ``val_calib`` exited positives are predicted as
    ``n = round(scale * n_select)`` (``scale = |val_calib| / |val_select|``, label-free), and
    ``K`` by the Jeffreys posterior predictive of its ``val_select`` miss rate,
    ``BetaBinomial(n, k_select + 1/2, n_select - k_select + 1/2)``. ``target >= 1``: always
    passes. Uses ``val_select`` only.
    """
    from scipy import stats

    ns = np.asarray(n_select, dtype=np.float64)
    ks = np.asarray(k_select, dtype=np.float64)
    if target >= 1.0:
        return np.ones(ns.shape)
    n_hat = np.rint(ns * scale)
    k0 = stats.binom.ppf(level, n_hat, target)  # least k with cdf >= level
    k_max = np.where(stats.binom.cdf(k0, n_hat, target) <= level, k0, k0 - 1)
    ok = (n_hat > 0) & (k_max >= 0)
    out = np.zeros(ns.shape)
    out[ok] = stats.betabinom.cdf(k_max[ok], n_hat[ok], ks[ok] + 0.5, ns[ok] - ks[ok] + 0.5)
    return out


@dataclass(frozen=True)
class LearnedOrder:
    """Where ``val_select`` says testing should start (fixed before val_calib's labels are read).

    Attributes:
        start: grid index most likely to pass both tests on val_calib (ties: the looser).
        informative: whether val_select can inform the order at all.
        pass_probability: predicted probability of passing, per grid point.
        reason: why it is (not) informative, in words.
    """

    start: int
    informative: bool
    pass_probability: np.ndarray
    reason: str


def learn_order(
    select: GridCounts, *, target: float, delta: float, max_fpr: float, calib_size: int
) -> LearnedOrder:
    """The start learned on ``val_select`` and whether ``val_select`` can inform the order.

    The predicted probability of passing both tests is the product of the two
    :func:`predicted_pass_probability` (positives and negatives are independent given the
    rule). ``val_select`` is uninformative when it holds fewer positives than certifying one
    point with no miss needs (:func:`min_exited_positives`; then its posterior is dominated by
    the prior and the learned start is a guess) or when no point is predicted to pass.
    """
    scale = calib_size / max(select.n_images, 1)
    pp = predicted_pass_probability(
        select.exited_positives, select.misses, target=target, level=delta, scale=scale
    ) * predicted_pass_probability(
        select.exited_negatives, select.false_alarms, target=max_fpr, level=delta, scale=scale
    )
    start = int(pp.size - 1 - np.argmax(pp[::-1]))
    needed = min_exited_positives(target, delta)
    if select.n_positives < needed:
        reason = (
            f"val_select holds {select.n_positives} positives, fewer than the {needed} that certifying one "
            "point with no miss needs, so it cannot say where to start"
        )
        return LearnedOrder(start, False, pp, reason)
    if pp[start] <= 0.0:
        reason = "on val_select no grid point is predicted to pass on val_calib"
        return LearnedOrder(start, False, pp, reason)
    return LearnedOrder(start, True, pp, f"start learned on val_select ({select.n_positives} positives)")


# --------------------------------------------------------------------------- procedures

#: A procedure maps (joint p-values in grid order, delta, the learned order) to the level at
#: which each point was certified (``nan`` = not certified).
Procedure = Callable[..., np.ndarray]


def fallback_weights(m: int, order: LearnedOrder | None) -> np.ndarray:
    """Weights of :func:`split_fallback_sequence`: :data:`LEARNED_START_SHARE` on the learned start
    and the rest spread evenly, or even weights when ``order`` is uninformative or missing."""
    weights = np.full(m, 1.0 / m)
    if order is not None and order.informative:
        weights *= 1.0 - LEARNED_START_SHARE
        weights[order.start] += LEARNED_START_SHARE
    return weights


def fallback_sequence(p: np.ndarray, delta: float, *, weights: Any | None = None, **_: Any) -> np.ndarray:
    """The fallback procedure (Wiens 2003): point ``j`` is tested at ``delta * w_j`` plus the level
    of point ``j - 1`` when that one was certified; default weights ``1/m`` (label-free).

    Strong FWER control at delta for any fixed weights summing to 1 (Wiens & Dmitrienko 2005);
    it is the chain-graph procedure of Bretz et al. (2009). Every point is tested at
    ``>= delta * w_j``, so with even weights it certifies whenever Holm does.
    """
    m = p.size
    w = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64)
    own = delta * w
    out = np.full(m, np.nan)
    carry = 0.0
    for j in range(m):
        level = own[j] + carry
        if level > 0.0 and p[j] <= level:
            out[j] = level
            carry = level
        else:
            carry = 0.0
    return out


def split_fallback_sequence(
    p: np.ndarray, delta: float, *, order: LearnedOrder | None = None, **_: Any
) -> np.ndarray:
    """The default: :func:`fallback_sequence`, weights learned on val_select (:func:`fallback_weights`)."""
    if order is None:
        raise ValueError("split_fallback_sequence needs the order learned on val_select for the same grid")
    return fallback_sequence(p, delta, weights=fallback_weights(p.size, order))


def _fixed_sequence_from(p: np.ndarray, start: int, level: float, out: np.ndarray) -> None:
    """Test ``start, start + 1, ...`` at ``level``; stop at the first failure (writes ``out``)."""
    fails = np.nonzero(p[start:] > level)[0]
    stop = p.size if fails.size == 0 else start + int(fails[0])
    seg = out[start:stop]
    out[start:stop] = np.where(np.isnan(seg), level, np.maximum(np.nan_to_num(seg), level))


def fixed_sequence(p: np.ndarray, delta: float, **_: Any) -> np.ndarray:
    """Fixed-sequence test from the strictest point (comparison only; see module docstring)."""
    out = np.full(p.size, np.nan)
    _fixed_sequence_from(p, 0, delta, out)
    return out


def split_fixed_sequence(
    p: np.ndarray, delta: float, *, order: LearnedOrder | None = None, **_: Any
) -> np.ndarray:
    """Fixed sequence from the learned start (:func:`learn_order`), then looser points, all at delta.

    The order depends on ``val_select`` only, so fixed-sequence testing on ``val_calib``
    controls the family-wise error at ``delta`` (Bauer 1991; LTT §3).
    """
    if order is None or order.pass_probability.size != p.size:
        raise ValueError("split_fixed_sequence needs the order learned on val_select for the same grid")
    out = np.full(p.size, np.nan)
    _fixed_sequence_from(p, order.start, delta, out)
    return out


def multistart_fixed_sequence(
    p: np.ndarray, delta: float, *, starts: int = DEFAULT_STARTS, **_: Any
) -> np.ndarray:
    """``starts`` fixed sequences from label-free points spread over the grid, each at ``delta/starts``."""
    s = max(1, min(int(starts), p.size))
    # starts at coverage levels 1/(s+1) ... s/(s+1) of the (quantile) grid: label-free
    first = np.unique(np.floor(np.arange(1, s + 1) * p.size / (s + 1)).astype(np.int64))
    out = np.full(p.size, np.nan)
    for start in first:
        _fixed_sequence_from(p, int(start), delta / s, out)
    return out


def sgr_binary_search(p: np.ndarray, delta: float, **_: Any) -> np.ndarray:
    """SGR binary search (Geifman & El-Yaniv 2017, Alg. 1) at ``delta / ceil(log2(m + 1))``.

    Keeps every point that passed (not the last one visited: the reference script's pitfall).
    """
    m = p.size
    level = delta / max(1, math.ceil(math.log2(m + 1)))
    out = np.full(m, np.nan)
    lo, hi = 0, m - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if p[mid] <= level:
            out[mid] = level
            lo = mid + 1
        else:
            hi = mid - 1
    return out


def bonferroni(p: np.ndarray, delta: float, **_: Any) -> np.ndarray:
    """Single-step Bonferroni at ``delta / m``."""
    level = delta / p.size
    return np.where(p <= level, level, np.nan)


def holm(p: np.ndarray, delta: float, **_: Any) -> np.ndarray:
    """Holm's step-down procedure (Holm 1979): the i-th smallest p-value is tested at ``delta/(m-i)``."""
    m = p.size
    order = np.argsort(p, kind="stable")
    levels = delta / (m - np.arange(m))
    fails = np.nonzero(p[order] > levels)[0]
    stop = m if fails.size == 0 else int(fails[0])
    out = np.full(m, np.nan)
    out[order[:stop]] = levels[:stop]
    return out


#: name -> procedure. ``split_fallback_sequence`` is the default (README, "Certified exit policies").
PROCEDURES: dict[str, Procedure] = {
    "split_fallback_sequence": split_fallback_sequence,
    "split_fixed_sequence": split_fixed_sequence,
    "fallback_sequence": fallback_sequence,
    "sgr_binary_search": sgr_binary_search,
    "multistart_fixed_sequence": multistart_fixed_sequence,
    "holm": holm,
    "bonferroni": bonferroni,
    "fixed_sequence": fixed_sequence,
}
DEFAULT_PROCEDURE = "split_fallback_sequence"
#: Procedures that need the ``val_select`` counts.
NEEDS_SELECT = frozenset({"split_fallback_sequence", "split_fixed_sequence"})


def resolve_procedure(method: str | None) -> str:
    """Return the procedure name (``None`` -> default); raise :class:`ConfigError` if unknown."""
    name = DEFAULT_PROCEDURE if method is None else str(method)
    if name not in PROCEDURES:
        raise ConfigError(f"unknown certification method {name!r}; allowed: {', '.join(PROCEDURES)}")
    return name


# --------------------------------------------------------------------------- certify


@dataclass
class Certification:
    """Result of :func:`certify` on one grid (arrays are in grid order, strictest first)."""

    method: str
    target: float
    delta: float
    max_fpr: float
    counts: GridCounts
    """val_calib's counts at every grid point."""
    fnr_p_values: np.ndarray
    fpr_p_values: np.ndarray
    levels: np.ndarray
    """Level each point was certified at (``nan`` = not certified)."""
    deployed: int | None
    """Index of the deployed point (max coverage among the certified), ``None`` if none."""
    order: LearnedOrder | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def p_values(self) -> np.ndarray:
        """The joint (intersection-union) p-values ``max(p_fnr, p_fpr)`` the procedure tested."""
        return np.maximum(self.fnr_p_values, self.fpr_p_values)

    @property
    def n(self) -> np.ndarray:
        """Exited positives of val_calib at each grid point."""
        return self.counts.exited_positives

    @property
    def k(self) -> np.ndarray:
        """Misses among them."""
        return self.counts.misses

    @property
    def certified(self) -> np.ndarray:
        return ~np.isnan(self.levels)

    @property
    def feasible(self) -> bool:
        return self.deployed is not None

    @property
    def n_certified(self) -> int:
        return int(self.certified.sum())

    def upper_bound(self) -> float | None:
        """Clopper–Pearson bound on FNR_exit at the deployed point, at the level it was certified at.

        It is ``<= target`` by the p-value/bound duality; ``None`` when infeasible.
        """
        if self.deployed is None:
            return None
        j = self.deployed
        return float(clopper_pearson_upper(int(self.k[j]), int(self.n[j]), float(self.levels[j])))

    def fpr_upper_bound(self) -> float | None:
        """Clopper–Pearson bound on FPR_exit at the deployed point and level (``<= max_fpr``)."""
        if self.deployed is None:
            return None
        j, c = self.deployed, self.counts
        return float(
            clopper_pearson_upper(int(c.false_alarms[j]), int(c.exited_negatives[j]), float(self.levels[j]))
        )

    def first_level(self) -> float:
        """The largest level at which any point is tested before anything was certified: delta for
        fixed sequences, the learned start's weight for the default, ``delta / m`` for Bonferroni,
        Holm and the even fallback sequence, ``delta / K`` for SGR, ``delta / s`` multi-start."""
        m = self.counts.size
        if self.method == "split_fallback_sequence":
            return self.delta * float(fallback_weights(m, self.order).max())
        return {
            "bonferroni": self.delta / m,
            "holm": self.delta / m,
            "fallback_sequence": self.delta / m,
            "sgr_binary_search": self.delta / max(1, math.ceil(math.log2(m + 1))),
            "multistart_fixed_sequence": self.delta
            / max(1, min(self.extra.get("starts", DEFAULT_STARTS), m)),
        }.get(self.method, self.delta)

    def positives_needed(self, misses: int = 0) -> int:
        """Exited positives that would certify FNR_exit with ``misses`` misses at :meth:`first_level`."""
        return min_exited_positives(self.target, self.first_level(), misses)

    def infeasible_cause(self) -> str:
        """Why nothing certified, naming the binding cause (``""`` when something did)."""
        if self.feasible:
            return ""
        c, level = self.counts, self.first_level()
        needed = self.positives_needed()
        parts = []
        if self.order is not None and not self.order.informative and self.method == DEFAULT_PROCEDURE:
            parts.append(
                f"{self.order.reason}; every point was therefore tested at level >= delta/m = "
                f"{self.delta / c.size:.3g} (label-free fallback sequence)"
            )
        if c.n_positives < needed:
            parts.append(
                f"val_calib holds {c.n_positives} positives, fewer than the {needed} exited positives with "
                f"no miss that certifying needs at level {level:.3g}"
            )
            return "; ".join(parts)
        fnr_ok = self.fnr_p_values <= level
        if fnr_ok.any() and not (fnr_ok & (self.fpr_p_values <= level)).any():
            j = int(np.nonzero(fnr_ok)[0][np.argmin(self.fpr_p_values[fnr_ok])])
            parts.append(
                f"the FPR_exit guard failed: every point that meets FNR_exit <= {self.target} exits "
                f"negatives called positive too often (best: {int(c.false_alarms[j])} of "
                f"{int(c.exited_negatives[j])} exited negatives, guard max_fpr_exit {self.max_fpr})"
            )
            return "; ".join(parts)
        if self.order is not None and self.order.informative and self.method in NEEDS_SELECT:
            s = self.order.start
            predicted = float(self.order.pass_probability[s])
            why = (
                f"as val_select predicted (pass probability {predicted:.2g})"
                if predicted < 0.5
                else f"although val_select predicted it would pass (probability {predicted:.2f}): val_select "
                "and val_calib disagree (too small a val_select, or a shift between them)"
            )
            parts.append(
                f"the start learned on val_select (grid point {s}, val_calib coverage {c.coverage[s]:.3f}) "
                f"failed on val_calib: {int(c.misses[s])} misses among {int(c.exited_positives[s])} exited "
                f"positives, joint p-value {self.p_values[s]:.3g}, {why}"
            )
        j = int(np.argmin(self.fnr_p_values))
        n, k = int(c.exited_positives[j]), int(c.misses[j])
        if n > 0:
            parts.append(
                f"the most promising point exited {n} positives with {k} misses (FNR_exit {k / n:.4f}, "
                f"p-value {self.fnr_p_values[j]:.3g})"
                + (
                    f"; with {k} misses it would need {self.positives_needed(k)} exited positives"
                    if k / n < self.target
                    else "; the model misses too many positives even at its strictest thresholds"
                )
            )
        return "; ".join(parts)


def certify(
    calib: GridCounts,
    *,
    target: float,
    delta: float,
    max_fpr: float = DEFAULT_MAX_FPR_EXIT,
    method: str | None = None,
    select: GridCounts | None = None,
    starts: int = DEFAULT_STARTS,
) -> Certification:
    """Certify a grid of exit rules on ``val_calib`` for both bounds and choose the one to deploy.

    Args:
        calib: val_calib's counts per grid point (grid ordered strictest first).
        target: ``target_fnr_exit`` in (0, 0.1].
        delta: the failure probability in (0, 0.5].
        max_fpr: ``max_fpr_exit``, the guard, in (0, 1] (1 disables it).
        method: one of :data:`PROCEDURES` (default :data:`DEFAULT_PROCEDURE`).
        select: the same counts on ``val_select``; required by :data:`NEEDS_SELECT` procedures.
        starts: number of sequences for ``multistart_fixed_sequence``.

    Returns:
        The :class:`Certification`; ``deployed`` is the certified point with the largest
        val_calib coverage (ties: the looser), ``None`` when nothing certified.

    Raises:
        ConfigError: a setting out of range or an unknown method.
        ValueError: counts of different lengths, or a procedure without its val_select counts.
    """
    target = check_target(target)
    delta = check_delta(delta)
    max_fpr = check_max_fpr_exit(max_fpr)
    name = resolve_procedure(method)
    p_fnr = binomial_p_values(calib.misses, calib.exited_positives, target)
    p_fpr = binomial_p_values(calib.false_alarms, calib.exited_negatives, max_fpr)
    order = None
    if name in NEEDS_SELECT:
        if select is None:
            raise ValueError(f"{name} needs the val_select counts")
        if select.size != calib.size:
            raise ValueError("val_select and val_calib counts must cover the same grid")
        order = learn_order(select, target=target, delta=delta, max_fpr=max_fpr, calib_size=calib.n_images)
    levels = PROCEDURES[name](np.maximum(p_fnr, p_fpr), delta, order=order, starts=starts)
    cert = ~np.isnan(levels)
    deployed = None
    if cert.any():
        idx = np.nonzero(cert)[0]
        cov = calib.coverage[idx]
        deployed = int(idx[cov == cov.max()].max())
    extra: dict[str, Any] = {"starts": starts} if name == "multistart_fixed_sequence" else {}
    return Certification(name, target, delta, max_fpr, calib, p_fnr, p_fpr, levels, deployed, order, extra)
