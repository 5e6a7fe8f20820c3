"""Label-free exchangeability monitor: do new images score like the images the bundle was certified on?

The certificate holds for images exchangeable with ``val_calib``. Labels arrive late or never in
production, so the monitor compares what the deployed model *outputs* on new images with what it
output on val_calib (black-box shift detection: Lipton, Wang & Smola 2018, "Detecting and
Correcting for Label Shift with Black Box Predictors"; Rabanser, Günnemann & Lipton 2019, "Failing
Loudly", where univariate two-sample tests on the softmax outputs, Bonferroni-combined, were among
the most powerful detectors). Three two-sample tests against the reference:

``exit_score``
    Kolmogorov–Smirnov (Smirnov 1939; ``scipy.stats.ks_2samp``, exact for these sizes) on the score
    the policy thresholds: blur, colour casts, a new camera move it.
``p_positive``
    Kolmogorov–Smirnov on p(positive): it moves with the class balance (label shift) even when the
    exit score does not (a symmetric model's max probability ignores which class is confident).
``exit_rate``
    Fisher's exact test (Fisher 1935) on the 2 x 2 table exited/deferred x reference/new.

Each runs at ``level / 3`` (Bonferroni), so ``P(alarm | new images exchangeable with val_calib) <=
level``. KS is exact for continuous scores and conservative with ties (saturated probabilities);
Fisher's test is conservative.

**Sample size.** With ``n`` reference and ``m`` new images, KS at level ``a`` rejects when the
empirical distance exceeds ``c(a) * sqrt(1/n + 1/m)``, ``c(a) = sqrt(ln(2/a) / 2)`` (its asymptotic
critical value). By the Dvoretzky–Kiefer–Wolfowitz inequality with Massart's (1990) constant,
``P(sup |F_k - F| > e) <= 2 exp(-2 k e^2)``, so with probability ``>= 1 - beta`` the empirical
distance is at least ``D - e_n - e_m`` with ``e_k = sqrt(ln(4 / beta) / (2 k))``. A true shift
``D >= c(a) sqrt(1/n + 1/m) + e_n + e_m`` is then detected with probability ``>= 1 - beta =
power``: :func:`n_needed` is the smallest such ``m`` (sufficient, not necessary; ``None`` when even
infinitely many new images would not do, i.e. the reference is too small). An exit-rate change of
``D`` is a KS distance ``>= D`` between the exit-score distributions of a threshold policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stage1_pro.errors import ConfigError, DataError

#: False-alarm rate of the monitor (all three tests together).
DEFAULT_DRIFT_LEVEL = 0.01
#: The shift the sample-size statement is about: a KS distance between exit-score distributions.
DEFAULT_SHIFT = 0.1
#: Probability of detecting that shift at the stated sample size.
DEFAULT_POWER = 0.8
#: Valid level: (0, 0.5].
LEVEL_RANGE = (0.0, 0.5)
TEST_NAMES = ("exit_score", "p_positive", "exit_rate")
_LARGEST_SAMPLE = 10**12


@dataclass(frozen=True)
class TestResult:
    """One two-sample test: its statistic, p-value, the share of the level it ran at, and the verdict."""

    name: str
    method: str
    statistic: float
    p_value: float
    level: float
    drift: bool
    reference: float | None
    new: float | None


@dataclass(frozen=True)
class DriftResult:
    """The monitor's answer for one sample of new images."""

    drift: bool
    level: float
    tests: tuple[TestResult, ...]
    n_reference: int
    n_new: int
    exit_rate_reference: float
    exit_rate_new: float
    shift: float
    power: float
    n_needed: int | None
    detectable_shift: float

    @property
    def underpowered(self) -> bool:
        """True when ``n_new`` is below what detecting ``shift`` with ``power`` needs."""
        return self.n_needed is None or self.n_new < self.n_needed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields of the ``drift`` artifact."""
        out = asdict(self)
        out["tests"] = [asdict(t) for t in self.tests]
        out["underpowered"] = self.underpowered
        return out


def ks_critical_distance(n: int, m: int, alpha: float) -> float:
    """Asymptotic critical KS distance of samples of ``n`` and ``m`` at level ``alpha``."""
    return math.sqrt(math.log(2.0 / alpha) / 2.0) * math.sqrt(1.0 / n + 1.0 / m)


def dkw_margin(k: int, failure: float) -> float:
    """``e`` with ``P(sup |F_k - F| > e) <= failure`` (DKW inequality, Massart's constant)."""
    return math.sqrt(math.log(2.0 / failure) / (2.0 * k))


def detectable_shift(n_reference: int, n_new: int, alpha: float, power: float) -> float:
    """Smallest KS distance detected with probability ``>= power`` by a KS test at level ``alpha``."""
    failure = (1.0 - power) / 2.0  # split between the two empirical distributions
    return (
        ks_critical_distance(n_reference, n_new, alpha)
        + dkw_margin(n_reference, failure)
        + dkw_margin(n_new, failure)
    )


def n_needed(n_reference: int, shift: float, alpha: float, power: float) -> int | None:
    """New images that suffice to detect a KS shift ``shift`` with ``power`` (None: reference too small)."""
    if detectable_shift(n_reference, _LARGEST_SAMPLE, alpha, power) > shift:
        return None
    low, high = 1, _LARGEST_SAMPLE  # detectable_shift decreases in n_new: bisect
    while low < high:
        mid = (low + high) // 2
        if detectable_shift(n_reference, mid, alpha, power) <= shift:
            high = mid
        else:
            low = mid + 1
    return low


def _check_scores(
    exit_score: Any, p_positive: Any, exited: Any, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(exit_score, dtype=np.float64).reshape(-1)
    p = np.asarray(p_positive, dtype=np.float64).reshape(-1)
    e = np.asarray(exited).reshape(-1)
    if s.size == 0:
        raise DataError(f"{what}: no images to compare")
    if not (s.size == p.size == e.size):
        raise DataError(
            f"{what}: exit_score, p_positive and exited must have one entry per image "
            f"(got {s.size}, {p.size}, {e.size})"
        )
    if not (np.isfinite(s).all() and np.isfinite(p).all()):
        raise DataError(f"{what}: exit_score and p_positive must be finite numbers")
    if ((p < 0) | (p > 1)).any():
        raise DataError(f"{what}: p_positive must hold probabilities in [0, 1]")
    if e.dtype != np.bool_ and not np.isin(e, (0, 1)).all():
        raise DataError(f"{what}: exited must hold booleans")
    return s, p, e.astype(bool)


class ExchangeabilityMonitor:
    """Two-sample tests of new images' model outputs against a reference (module docstring).

    Parameters follow scikit-learn conventions: the constructor stores them, :meth:`fit` stores
    the reference (trailing-underscore attributes), :meth:`test` answers for a new sample.

    Args:
        level: false-alarm rate of the three tests together, in (0, 0.5] (default 0.01).
        shift: the KS distance the sample-size statement is about, in (0, 1] (default 0.1).
        power: the probability of detecting ``shift`` that ``n_needed`` guarantees (default 0.8).

    Example:
        >>> monitor = ExchangeabilityMonitor(level=0.01).fit(ref_score, ref_p1, ref_exited)  # doctest: +SKIP
        >>> monitor.test(new_score, new_p1, new_exited).drift  # doctest: +SKIP
    """

    def __init__(
        self, level: float = DEFAULT_DRIFT_LEVEL, shift: float = DEFAULT_SHIFT, power: float = DEFAULT_POWER
    ) -> None:
        self.level = level
        self.shift = shift
        self.power = power

    def validate_params(self) -> None:
        """Raise :class:`ConfigError` naming the first parameter outside its range."""
        low, high = LEVEL_RANGE
        for name, value, ok, allowed in (
            ("level", self.level, lambda v: low < v <= high, f"({low:g}, {high:g}]"),
            ("shift", self.shift, lambda v: 0 < v <= 1, "(0, 1]"),
            ("power", self.power, lambda v: 0 < v < 1, "(0, 1)"),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ConfigError(f"{name}={value!r} is outside {allowed}")

    @property
    def test_level(self) -> float:
        """The level each of the three tests runs at (Bonferroni)."""
        return self.level / len(TEST_NAMES)

    def fit(self, exit_score: Any, p_positive: Any, exited: Any) -> ExchangeabilityMonitor:
        """Store the reference sample (val_calib): exit scores, p(positive), exited flags.

        Returns:
            self
        """
        self.validate_params()
        s, p, e = _check_scores(exit_score, p_positive, exited, "reference")
        self.exit_score_, self.p_positive_, self.exited_ = s, p, e
        self.n_reference_ = int(s.size)
        return self

    @classmethod
    def from_reference(cls, reference: dict[str, Any], **params: Any) -> ExchangeabilityMonitor:
        """A monitor fitted on a ``score_reference`` artifact's arrays."""
        return cls(**params).fit(reference["exit_score"], reference["p_positive"], reference["exited"])

    def n_needed(self) -> int | None:
        """New images that suffice to detect :attr:`shift` with :attr:`power` against this reference."""
        self._check_fitted()
        return n_needed(self.n_reference_, self.shift, self.test_level, self.power)

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_reference_"):
            raise ValueError(
                "this ExchangeabilityMonitor is not fitted: call fit(...) or from_reference(...)"
            )

    def test(self, exit_score: Any, p_positive: Any, exited: Any) -> DriftResult:
        """Test new images' outputs against the reference.

        Args:
            exit_score: per new image, the score the bundle's policy thresholds.
            p_positive: per new image, the model's p(positive).
            exited: per new image, whether the policy exited it.

        Returns:
            The three tests, the verdict (drift iff any rejects at ``level / 3``) and the sample-size
            statement for :attr:`shift`.

        Raises:
            DataError: empty or malformed arrays.
        """
        from scipy import stats

        self._check_fitted()
        s, p, e = _check_scores(exit_score, p_positive, exited, "new images")
        alpha = self.test_level
        results = []
        for name, ref, new in (("exit_score", self.exit_score_, s), ("p_positive", self.p_positive_, p)):
            ks = stats.ks_2samp(ref, new)
            results.append(
                TestResult(
                    name=name,
                    method="two-sample Kolmogorov-Smirnov (scipy.stats.ks_2samp); summaries are medians",
                    statistic=float(ks.statistic),
                    p_value=float(ks.pvalue),
                    level=alpha,
                    drift=bool(ks.pvalue <= alpha),
                    reference=float(np.median(ref)),
                    new=float(np.median(new)),
                )
            )
        table = [[int(self.exited_.sum()), int((~self.exited_).sum())], [int(e.sum()), int((~e).sum())]]
        fisher = stats.fisher_exact(table)
        rate_ref, rate_new = float(self.exited_.mean()), float(e.mean())
        results.append(
            TestResult(
                name="exit_rate",
                method="Fisher's exact test on exited/deferred x reference/new; summaries are exit rates",
                statistic=float(rate_new - rate_ref),
                p_value=float(min(1.0, fisher.pvalue)),
                level=alpha,
                drift=bool(fisher.pvalue <= alpha),
                reference=rate_ref,
                new=rate_new,
            )
        )
        return DriftResult(
            drift=any(r.drift for r in results),
            level=float(self.level),
            tests=tuple(results),
            n_reference=self.n_reference_,
            n_new=int(s.size),
            exit_rate_reference=rate_ref,
            exit_rate_new=rate_new,
            shift=float(self.shift),
            power=float(self.power),
            n_needed=self.n_needed(),
            detectable_shift=detectable_shift(self.n_reference_, int(s.size), alpha, self.power),
        )
