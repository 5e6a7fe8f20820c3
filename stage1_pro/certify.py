"""Certification core: a finite-sample, high-probability bound on FNR_exit for a family of exit rules.

The promise of every deployed policy is

    P( true FNR_exit of the deployed rule > target_fnr_exit ) <= delta,

the probability being over the draw of ``val_calib``. It is obtained with Learn-then-Test
(Angelopoulos, Bates, Candès, Jordan, Lei, arXiv 2110.01052, Thm. 1 and §3) specialised to a
0/1 conditional risk (``research/methods.md`` §7.3, §9):

1. **A grid fixed before the calibration labels are seen.** Candidate exit rules
   ``r_0, ..., r_{m-1}`` ordered from strictest (least coverage) to loosest; policies build it
   from ``val_select`` only (:func:`quantile_grid`).
2. **One exact p-value per grid point.** With ``n_j`` exited positives of ``val_calib`` under
   ``r_j`` and ``k_j`` misses among them, ``p_j = P(Bin(n_j, target) <= k_j)``
   (:func:`binomial_p_values`; ``p_j = 1`` when ``n_j = 0``). Given ``n_j``, the exited positives
   are i.i.d. draws of the positives that ``r_j`` exits, so ``p_j`` is super-uniform under
   ``H_j: FNR_exit(r_j) > target`` (LTT §3, "conditional risks": n is the number of
   conditioning samples).
3. **A family-wise error procedure at level delta** (:data:`PROCEDURES`); every certified point
   has ``FNR_exit <= target`` simultaneously with probability ``>= 1 - delta``.
4. **Deploy the certified point with the largest coverage.** Coverage does not use labels, so any
   choice within the certified set keeps the guarantee.

Procedures (all valid; see ``bench/calibration_validity.py`` for the measured coverage):

``split_fixed_sequence`` (default)
    The start of the sequence is learned on ``val_select``: the grid point most likely to pass
    on ``val_calib`` under the ``val_select`` posterior predictive
    (:func:`predicted_pass_probability`); on ``val_calib`` the grid is then tested from that
    point towards looser points at level delta, stopping at the first failure (LTT
    fixed-sequence testing with a data-independent order, Bauer 1991; MAPIE calls the split
    variant ``split_fixed_sequence``). No multiplicity cost.
``sgr_binary_search``
    Selection with Guaranteed Risk (Geifman & El-Yaniv, arXiv 1705.08500, Alg. 1): binary
    search over the grid, each test at ``delta / K`` with ``K = ceil(log2(m + 1))`` the largest
    number of tests the search can make. Its union bound assumes the search visits at most K
    hypotheses, which is exact; its power relies on a roughly monotone risk.
``multistart_fixed_sequence``
    ``s`` sequences started at label-free points evenly spread over the grid, each tested
    towards looser points at ``delta / s`` (Bonferroni across sequences; LTT §4).
``holm`` / ``bonferroni``
    Order-free step-down (Holm 1979) / single-step Bonferroni at ``delta / m``.
``fixed_sequence``
    The textbook order, strictest point first. Kept for comparison only: the strictest points
    exit a handful of positives, their p-values are near 1 and it stops at once (DESIGN.md,
    "Beware the textbook recipe").

Everything is vectorised: the calibration scores are sorted once and the counts at every grid
point come from cumulative counts via :func:`numpy.searchsorted` (``O(n log n + m log n)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stage1_pro.defaults import check_delta, check_target
from stage1_pro.errors import ConfigError
from stage1_pro.metrics import clopper_pearson_upper

P_VALUE_METHOD = "binomial_exact"
#: Number of sequences of ``multistart_fixed_sequence``.
DEFAULT_STARTS = 4
#: Default number of grid points.
DEFAULT_GRID_SIZE = 200


# --------------------------------------------------------------------------- p-values


def binomial_p_values(k: Any, n: Any, target: float) -> np.ndarray:
    """Exact p-values ``P(Bin(n, target) <= k)`` of ``H: risk > target`` (1 where ``n = 0``).

    For a 0/1 loss the binomial tail is itself a valid p-value, without the factor ``e`` of
    the Bentkus bound (LTT ``core/bounds.py``; MAPIE ``binary=True``).
    """
    from scipy import stats  # lazy: `stage1-pro calibrate --help` must not import scipy

    k_arr, n_arr = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    p = stats.binom.cdf(k_arr, n_arr, target)
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

    E.g. target 0.02, delta 0.1: 114 with no miss, 194 with one (``research/methods.md`` §9).
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


# --------------------------------------------------------------------------- procedures

#: A procedure maps (calibration p-values in grid order, delta, learned information) to the
#: level at which each point was certified (``nan`` = not certified).
Procedure = Callable[..., np.ndarray]


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


def predicted_pass_probability(
    n_select: Any, k_select: Any, *, target: float, level: float, scale: float = 1.0
) -> np.ndarray:
    """Probability that each grid point passes its test on ``val_calib``, predicted from ``val_select``.

    A point passes iff its misses ``K <= k_max(n)``, the largest count with
    ``P(Bin(n, target) <= k_max) <= level``. Its ``val_calib`` exited positives are predicted as
    ``n = round(scale * n_select)`` (``scale = |val_calib| / |val_select|``, label-free), and
    ``K`` by the Jeffreys posterior predictive of its ``val_select`` miss rate,
    ``BetaBinomial(n, k_select + 1/2, n_select - k_select + 1/2)``. Uses ``val_select`` only.
    """
    from scipy import stats

    ns = np.asarray(n_select, dtype=np.float64)
    ks = np.asarray(k_select, dtype=np.float64)
    n_hat = np.rint(ns * scale)
    k0 = stats.binom.ppf(level, n_hat, target)  # least k with cdf >= level
    k_max = np.where(stats.binom.cdf(k0, n_hat, target) <= level, k0, k0 - 1)
    ok = (n_hat > 0) & (k_max >= 0)
    out = np.zeros(ns.shape)
    out[ok] = stats.betabinom.cdf(k_max[ok], n_hat[ok], ks[ok] + 0.5, ns[ok] - ks[ok] + 0.5)
    return out


def split_fixed_sequence(
    p: np.ndarray, delta: float, *, start_scores: np.ndarray | None = None, **_: Any
) -> np.ndarray:
    """Fixed sequence from the point most likely to pass (learned on ``val_select``), then looser.

    ``start_scores`` rank the possible starts (:func:`predicted_pass_probability`; ties go to
    the looser point, since a stricter start only costs coverage). The order depends on
    ``val_select`` only, so fixed-sequence testing on ``val_calib`` controls the family-wise
    error at ``delta`` (Bauer 1991; LTT §3). On the validity benchmark this start beats the
    point with the smallest ``val_select`` p-value (MAPIE's ``learn_fixed_sequence_order``
    ranking) by 1-30% coverage, most at small n.
    """
    if start_scores is None or len(start_scores) != p.size:
        raise ValueError("split_fixed_sequence needs start scores learned on val_select for the same grid")
    sc = np.asarray(start_scores, dtype=np.float64)
    start = int(p.size - 1 - np.argmax(sc[::-1]))
    out = np.full(p.size, np.nan)
    _fixed_sequence_from(p, start, delta, out)
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

    Keeps every point that passed (not the last one visited: the reference script's pitfall,
    ``research/methods.md`` §7.1).
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


#: name -> procedure. ``split_fixed_sequence`` has the highest certified coverage on the
#: validity benchmark (README, "Certified exit policies") and is the default.
PROCEDURES: dict[str, Procedure] = {
    "split_fixed_sequence": split_fixed_sequence,
    "sgr_binary_search": sgr_binary_search,
    "multistart_fixed_sequence": multistart_fixed_sequence,
    "holm": holm,
    "bonferroni": bonferroni,
    "fixed_sequence": fixed_sequence,
}
DEFAULT_PROCEDURE = "split_fixed_sequence"
#: Procedures that need the ``val_select`` p-values.
NEEDS_SELECT = frozenset({"split_fixed_sequence"})


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
    n: np.ndarray
    """Exited positives of val_calib at each grid point."""
    k: np.ndarray
    """Misses among them."""
    p_values: np.ndarray
    levels: np.ndarray
    """Level each point was certified at (``nan`` = not certified)."""
    deployed: int | None
    """Index of the deployed point (max coverage among the certified), ``None`` if none."""
    extra: dict[str, Any] = field(default_factory=dict)

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
        """Clopper–Pearson bound at the deployed point, at the level it was certified at.

        It is ``<= target`` by the p-value/bound duality; ``None`` when infeasible.
        """
        if self.deployed is None:
            return None
        j = self.deployed
        return float(clopper_pearson_upper(int(self.k[j]), int(self.n[j]), float(self.levels[j])))

    def smallest_level(self) -> float:
        """The smallest level this procedure tests a point at (delta for fixed sequences,
        ``delta / m`` for Bonferroni and Holm, ``delta / K`` for SGR, ``delta / s`` multi-start)."""
        m = self.n.size
        return {
            "bonferroni": self.delta / m,
            "holm": self.delta / m,
            "sgr_binary_search": self.delta / max(1, math.ceil(math.log2(m + 1))),
            "multistart_fixed_sequence": self.delta
            / max(1, min(self.extra.get("starts", DEFAULT_STARTS), m)),
        }.get(self.method, self.delta)

    def positives_needed(self, misses: int = 0) -> int:
        """Exited positives that would certify with ``misses`` misses at :meth:`smallest_level`."""
        return min_exited_positives(self.target, self.smallest_level(), misses)


def certify(
    n: Any,
    k: Any,
    *,
    target: float,
    delta: float,
    method: str | None = None,
    coverage: Any | None = None,
    n_select: Any | None = None,
    k_select: Any | None = None,
    calib_scale: float = 1.0,
    starts: int = DEFAULT_STARTS,
) -> Certification:
    """Certify a grid of exit rules on ``val_calib`` and choose the one to deploy.

    Parameters
    ----------
    n, k : array (m,)
        Exited positives of ``val_calib`` and misses among them, per grid point (grid ordered
        strictest first).
    target, delta : float
        ``target_fnr_exit`` in (0, 0.1] and the failure probability in (0, 0.5].
    method : str, optional
        One of :data:`PROCEDURES` (default :data:`DEFAULT_PROCEDURE`).
    coverage : array (m,), optional
        Label-free coverage of each point on ``val_calib``; the deployed point is the certified
        one with the largest coverage (ties: the looser). Default: grid order.
    n_select, k_select : array (m,), optional
        The same counts on ``val_select``; required by ``split_fixed_sequence``.
    calib_scale : float
        ``|val_calib| / |val_select|`` (row counts, label-free), to predict the calibration counts.
    starts : int
        Number of sequences for ``multistart_fixed_sequence``.
    """
    target = check_target(target)
    delta = check_delta(delta)
    name = resolve_procedure(method)
    n_arr = np.asarray(n, dtype=np.int64)
    k_arr = np.asarray(k, dtype=np.int64)
    if n_arr.ndim != 1 or n_arr.shape != k_arr.shape or n_arr.size == 0:
        raise ValueError("n and k must be 1-D arrays of the same, non-zero length")
    p = binomial_p_values(k_arr, n_arr, target)
    start_scores = None
    if name in NEEDS_SELECT:
        if n_select is None or k_select is None:
            raise ValueError(f"{name} needs the val_select counts (n_select, k_select)")
        start_scores = predicted_pass_probability(
            n_select, k_select, target=target, level=delta, scale=calib_scale
        )
    levels = PROCEDURES[name](p, delta, start_scores=start_scores, starts=starts)
    cert = ~np.isnan(levels)
    deployed = None
    if cert.any():
        cov = np.arange(n_arr.size, dtype=np.float64) if coverage is None else np.asarray(coverage, float)
        idx = np.nonzero(cert)[0]
        best = cov[idx].max()
        deployed = int(idx[cov[idx] == best].max())
    extra: dict[str, Any] = {"starts": starts} if name == "multistart_fixed_sequence" else {}
    return Certification(name, target, delta, n_arr, k_arr, p, levels, deployed, extra)
