"""Scores from a known distribution whose true exit-risk curves are computable exactly.

Used by the statistical validity tests (``tests/test_validity*.py``) and the calibration
benchmarks (``bench/calibration_*.py``) to check that a certified policy's *true* FNR_exit
exceeds the target in at most a fraction delta of calibration draws, and to compare its
coverage with the oracle's.

Model (:class:`GaussianScoreModel`): ``y ~ Bernoulli(prevalence)``; a latent
``z | y ~ N(+mu, 1)`` for positives and ``N(-mu, 1)`` for negatives; the classifier outputs the
Bayes posterior ``p1 = sigmoid(2 mu z + log(prev / (1 - prev)))``; the gate logit is
``g = gate_scale * |z - z0| + gate_noise * e`` with ``z0`` the decision boundary and
``e ~ N(0, 1)`` independent (a noisy but informative selection head).

An exit rule "exit iff ``max(p0, p1) >= t`` and ``g >= x``" (``x = -inf``: no gate condition)
has closed-form coverage and FNR_exit for ``x = -inf`` (normal CDFs) and a one-dimensional
integral over ``z`` otherwise, evaluated on a fine fixed grid (absolute error < 1e-9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import integrate, special, stats


@dataclass(frozen=True)
class GaussianScoreModel:
    """Two-Gaussian score model with an exact FNR_exit / coverage curve (see module docstring)."""

    mu: float = 1.6
    prevalence: float = 0.3
    gate_scale: float = 1.0
    gate_noise: float = 0.5

    @property
    def _w(self) -> float:
        return 2.0 * self.mu

    @property
    def _c(self) -> float:
        return float(np.log(self.prevalence / (1.0 - self.prevalence)))

    @property
    def boundary(self) -> float:
        """``z0``: the classifier predicts positive iff ``z >= z0``."""
        return -self._c / self._w

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Draw ``n`` labelled images: ``label``, ``probs`` (n, 2), ``gate_logit`` and latent ``z``."""
        y = (rng.random(n) < self.prevalence).astype(np.int64)
        z = rng.standard_normal(n) + np.where(y == 1, self.mu, -self.mu)
        p1 = special.expit(self._w * z + self._c)
        g = self.gate_scale * np.abs(z - self.boundary) + self.gate_noise * rng.standard_normal(n)
        return {"label": y, "probs": np.stack([1.0 - p1, p1], axis=1), "gate_logit": g, "z": z}

    def _z_bounds(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``max p >= t`` iff ``z >= upper`` or ``z <= lower`` (``t >= 0.5``)."""
        lt = special.logit(np.clip(t, 0.5, 1.0))
        return (lt - self._c) / self._w, (-lt - self._c) / self._w

    def softmax_curve(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """True ``(fnr_exit, coverage)`` of "exit iff ``max p >= t``", in closed form.

        ``fnr_exit`` is ``nan`` where no positive exits (``t > 1``).
        """
        t = np.asarray(t, dtype=np.float64)
        upper, lower = self._z_bounds(t)
        exits = t <= 1.0

        def tails(mean: float) -> tuple[np.ndarray, np.ndarray]:
            low = stats.norm.cdf(lower - mean)  # z <= lower: exit-negative
            high = stats.norm.sf(upper - mean)  # z >= upper: exit-positive
            return np.where(exits, low, 0.0), np.where(exits, high, 0.0)

        miss, hit = tails(self.mu)
        neg_low, neg_high = tails(-self.mu)
        with np.errstate(invalid="ignore", divide="ignore"):
            fnr = np.where(miss + hit > 0, miss / (miss + hit), np.nan)
        cov = self.prevalence * (miss + hit) + (1 - self.prevalence) * (neg_low + neg_high)
        return fnr, cov

    def rule_curve(self, t: float, x: float) -> tuple[float, float]:
        """True ``(fnr_exit, coverage)`` of "exit iff ``max p >= t`` and ``g >= x``" (1-D integral).

        Simpson's rule on the two exit intervals ``z <= lower`` (exit-negative) and
        ``z >= upper`` (exit-positive), whose ends are the exact bounds, so the result is
        accurate to about 1e-10.
        """
        if t > 1.0:
            return float("nan"), 0.0
        upper, lower = (float(b) for b in self._z_bounds(np.asarray(t, dtype=np.float64)))
        span = 14.0 + self.mu

        def integral(a: float, b: float, mean: float) -> float:
            if b <= a:
                return 0.0
            z = np.linspace(a, b, 20001)
            f = stats.norm.pdf(z - mean)
            if np.isfinite(x):
                f = f * stats.norm.sf((x - self.gate_scale * np.abs(z - self.boundary)) / self.gate_noise)
            return float(integrate.simpson(f, x=z))

        miss = integral(-span, lower, self.mu)
        exited_pos = miss + integral(upper, span, self.mu)
        exited_neg = integral(-span, lower, -self.mu) + integral(upper, span, -self.mu)
        fnr = miss / exited_pos if exited_pos > 0 else float("nan")
        return fnr, self.prevalence * exited_pos + (1 - self.prevalence) * exited_neg

    def oracle_softmax(self, target: float) -> tuple[float, float]:
        """The loosest softmax threshold whose true FNR_exit is ``<= target``: ``(t*, coverage)``."""
        t = np.linspace(0.5, 1.0, 200001)
        fnr, cov = self.softmax_curve(t)
        ok = np.nan_to_num(fnr, nan=1.0) <= target
        if not ok.any():
            return float("inf"), 0.0
        j = int(np.argmax(np.where(ok, cov, -1.0)))
        return float(t[j]), float(cov[j])
