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
from typing import Any

import numpy as np
from scipy import integrate, special, stats

from stage1_pro.defaults import DEFAULT_DELTA, DEFAULT_TARGET_FNR_EXIT


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

    def oracle_gate(self, target: float) -> tuple[float, float]:
        """The loosest gate-logit threshold whose true FNR_exit is ``<= target``: ``(x*, coverage)``.

        FNR_exit decreases in the gate threshold here (the gate is a noisy ``|z - z0|``), so
        ``x*`` is the root of ``FNR(x) = target`` (Brent's method).
        """
        from scipy import optimize

        def excess(x: float) -> float:
            return self.rule_curve(0.5, x)[0] - target

        lo, hi = -5.0, 0.0
        while excess(hi) > 0:
            hi += 2.0
        if excess(lo) <= 0:
            return float("-inf"), 1.0
        x = float(optimize.brentq(excess, lo, hi, xtol=1e-10))
        return x, self.rule_curve(0.5, x)[1]

    def oracle_softmax(self, target: float) -> tuple[float, float]:
        """The loosest softmax threshold whose true FNR_exit is ``<= target``: ``(t*, coverage)``."""
        t = np.linspace(0.5, 1.0, 200001)
        fnr, cov = self.softmax_curve(t)
        ok = np.nan_to_num(fnr, nan=1.0) <= target
        if not ok.any():
            return float("inf"), 0.0
        j = int(np.argmax(np.where(ok, cov, -1.0)))
        return float(t[j]), float(cov[j])


# --------------------------------------------------------------------------- validity harness


def make_scores(
    model: GaussianScoreModel, n_select: int, n_calib: int, rng: np.random.Generator, n_test: int = 0
) -> Any:
    """A :class:`~stage1_pro.scores.Scores` with fresh ``val_select``/``val_calib`` (and ``test``) draws."""
    from stage1_pro.scores import Scores

    sizes = {"val_select": n_select, "val_calib": n_calib, "test": n_test}
    parts = {s: model.sample(n, rng) for s, n in sizes.items() if n > 0}
    total = sum(len(p["label"]) for p in parts.values())
    return Scores(
        index=np.arange(total),
        split=np.concatenate([np.full(len(p["label"]), s) for s, p in parts.items()]),
        label=np.concatenate([p["label"] for p in parts.values()]),
        probs=np.concatenate([p["probs"] for p in parts.values()]),
        gate_logit=np.concatenate([p["gate_logit"] for p in parts.values()]),
        source="<simulated>",
    )


def _gate_logit_threshold(policy: Any, t: float) -> float:
    """The gate-logit threshold equivalent to ``calibrated >= t`` (calibrators are non-decreasing)."""
    params = policy.calibrator_params_
    if policy.calibrator == "platt":
        a, b = params["a"], params["b"]
        if a <= 0:
            raise ValueError("the simulated gate is informative: Platt's slope must be positive")
        return float((special.logit(min(max(t, 1e-300), 1 - 1e-16)) - b) / a)
    x, y = np.asarray(params["x"]), np.asarray(params["y"])
    above = np.nonzero(y >= t)[0]
    if above.size == 0:
        return float("inf")
    i = int(above[0])
    if i == 0:
        return float("-inf")
    return float(x[i - 1] + (t - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))


def rule_truth(
    policy: Any, model: GaussianScoreModel, point: dict[str, float] | None = None
) -> tuple[float, float]:
    """True ``(FNR_exit, coverage)`` of a fitted policy's deployed rule (or of an SCRC ``point``).

    Infeasible policies exit nothing: ``(nan, 0.0)``. Supports the softmax policy, the gate
    policy and SCRC with the ``max_prob``/``margin`` selection score (the rule is then a
    threshold on the max probability).
    """
    from stage1_pro.policies import GatePolicy, SCRCPolicy, SoftmaxThresholdPolicy

    if not policy.feasible_:
        return float("nan"), 0.0
    if isinstance(policy, SoftmaxThresholdPolicy):
        fnr, cov = model.softmax_curve(policy.exit_threshold_)
        return float(fnr), float(cov)
    if isinstance(policy, GatePolicy):
        return model.rule_curve(0.5, _gate_logit_threshold(policy, policy.gate_threshold_))
    if not isinstance(policy, SCRCPolicy):
        raise NotImplementedError(f"rule_truth has no closed form for the {policy.name!r} policy")
    if policy.selection_score == "gate":
        raise NotImplementedError("rule_truth covers SCRC with max_prob/margin selection")
    lam1 = point["lambda1"] if point else policy.lambda1_
    lam2 = point["lambda2"] if point else policy.lambda2_
    sel = 1.0 - lam1 if policy.selection_score == "max_prob" else (2.0 - lam1) / 2.0  # margin = 2 maxp - 1
    single = lam2 if lam2 >= 0.5 else 1.0 - lam2
    fnr, cov = model.softmax_curve(max(sel, single))
    return float(fnr), float(cov)


def validity_run(
    policy: str,
    model: GaussianScoreModel,
    *,
    n_calib: int,
    n_select: int | None = None,
    draws: int = 1000,
    seed: int = 0,
    target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT,
    delta: float = DEFAULT_DELTA,
    **params: Any,
) -> dict[str, Any]:
    """Calibrate ``policy`` on ``draws`` independent (val_select, val_calib) draws from ``model``.

    Returns the fraction of draws whose deployed rule has a true FNR_exit above the target
    (``violation_rate``) with its Monte-Carlo standard error, the mean true coverage of the
    deployed rule (0 when infeasible), the infeasible fraction, and, for SCRC-T, the fraction
    where *any* certified path point violates (``fwer``), which bounds every batch's rule.
    """
    import warnings

    from stage1_pro.policies import InfeasibleCertificateWarning, SCRCPolicy, create_policy

    rng = np.random.default_rng(seed)
    violations, coverages, infeasible, fwer = [], [], 0, []
    for _ in range(draws):
        scores = make_scores(model, n_select or n_calib, n_calib, rng)
        est = create_policy(policy, target_fnr_exit=target_fnr_exit, delta=delta, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InfeasibleCertificateWarning)
            est.fit(scores)
        fnr, cov = rule_truth(est, model)
        violations.append(bool(est.feasible_ and fnr > target_fnr_exit))
        coverages.append(cov)
        infeasible += not est.feasible_
        if isinstance(est, SCRCPolicy):
            fwer.append(any(rule_truth(est, model, p)[0] > target_fnr_exit for p in est.certified_path_))
    rate = float(np.mean(violations))
    return {
        "draws": draws,
        "violation_rate": rate,
        "mc_se": float(np.sqrt(max(delta * (1 - delta), 1e-12) / draws)),
        "mean_coverage": float(np.mean(coverages)),
        "infeasible_rate": infeasible / draws,
        "fwer": float(np.mean(fwer)) if fwer else None,
    }
