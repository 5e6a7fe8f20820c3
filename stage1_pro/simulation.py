"""Scores from a known distribution whose true exit rates are computable exactly.

Used by the statistical validity tests (``tests/test_validity*.py``, ``tests/long/``) and the
calibration benchmarks (``bench/calibration_*.py``) to check that a certified policy's *true*
FNR_exit and FPR_exit break their bounds in at most a fraction delta of calibration draws, and to
compare its coverage with the oracle's.

Model (:class:`GaussianScoreModel`): ``y ~ Bernoulli(prevalence)``; a latent ``z | y ~ N(+mu, 1)``
for positives and ``N(-mu, 1)`` for negatives; the classifier's positive-class logit is
``l = logit_scale * z + logit_shift`` (by default the Bayes posterior, ``2 mu z + log(prev /
(1 - prev))``), ``p1 = sigmoid(l)``, optionally rounded to a step (``prob_step``: heavy ties, as
from low-precision or saturated scores). The gate logit is a noisy, partly informative copy of
the classifier's confidence::

    g = gate_scale * |z - z0| + gate_correct_shift * (+1 if the argmax is right else -1) + gate_noise * e

with ``z0`` the decision boundary and ``e ~ N(0, 1)`` independent: correlated with, but not
equal to, the class probability (``gate_correct_shift > 0``: the gate also sees part of the error
signal, as a selection head trained on correctness can), optionally rounded to ``gate_step``.

An exit rule "exit iff ``max(p0, p1) >= t`` and ``g >= x``" (``x = -inf``: no gate condition; the
exit label is the argmax) has closed-form rates for ``x = -inf`` (normal CDFs) and a
one-dimensional integral over ``z`` otherwise, evaluated by Simpson's rule between the exact
ends of the exit intervals (absolute error < 1e-9).

Named models: :data:`REFERENCE_MODEL` (prevalence 0.4, logits N(+-2.2, 1.5^2)),
:data:`INFORMATIVE_GATE_MODEL` (the same with a gate that sees part of the error signal) and
:data:`TIES_MODEL` (prevalence 0.1, the same logits, probabilities rounded to 0.05 and gate
logits to 0.25).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import integrate, special, stats

from stage1_pro import defaults
from stage1_pro.decisions import DEFER, EXIT_NEGATIVE, EXIT_POSITIVE
from stage1_pro.defaults import DEFAULT_DELTA, DEFAULT_MAX_FPR_EXIT, DEFAULT_TARGET_FNR_EXIT

#: A rule's decisions as a function of (probs (n, 2), gate_logit (n,)): what every policy's ``decide`` is.
Decide = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: Logit range searched for a rule's probability thresholds; beyond it float64 probabilities saturate.
_LOGIT_SPAN = 60.0
#: Gate-logit range searched for a rule's gate threshold.
_GATE_SPAN = 1e3
#: Simpson points per exit interval.
_SIMPSON_POINTS = 20001


class RuleRates(NamedTuple):
    """True rates of an exit rule: ``fnr`` (FNR_exit), ``fpr`` (FPR_exit), ``coverage``.

    ``fnr`` is ``nan`` where no positive exits, ``fpr`` where no negative exits.
    """

    fnr: Any
    fpr: Any
    coverage: Any


@dataclass(frozen=True)
class GaussianScoreModel:
    """Two-Gaussian score model with exact exit rates (see the module docstring).

    Args:
        mu: class means of the latent ``z`` (``+mu`` positives, ``-mu`` negatives, unit variance).
        prevalence: ``P(y = 1)``.
        gate_scale, gate_noise, gate_correct_shift: the gate logit's dependence on ``|z - z0|``,
            its noise and its shift towards correct predictions.
        logit_scale, logit_shift: the classifier's logit ``logit_scale * z + logit_shift``;
            ``None``: the Bayes posterior (``2 mu`` and ``log(prevalence / (1 - prevalence))``).
        prob_levels: round the probabilities to multiples of ``1 / prob_levels`` (0: continuous).
        gate_step: round the gate logit to multiples of ``gate_step`` (0: continuous).
    """

    mu: float = 1.6
    prevalence: float = 0.3
    gate_scale: float = 1.0
    gate_noise: float = 0.5
    gate_correct_shift: float = 0.0
    logit_scale: float | None = None
    logit_shift: float | None = None
    prob_levels: int = 0
    gate_step: float = 0.0

    @classmethod
    def from_logits(cls, mean: float, sd: float, prevalence: float, **kwargs: Any) -> GaussianScoreModel:
        """Positive-class logits ``N(+mean, sd^2)`` for positives and ``N(-mean, sd^2)`` for negatives."""
        return cls(mu=mean / sd, prevalence=prevalence, logit_scale=sd, logit_shift=0.0, **kwargs)

    @property
    def _a(self) -> float:
        return 2.0 * self.mu if self.logit_scale is None else float(self.logit_scale)

    @property
    def _b(self) -> float:
        if self.logit_shift is not None:
            return float(self.logit_shift)
        return float(np.log(self.prevalence / (1.0 - self.prevalence)))

    @property
    def boundary(self) -> float:
        """``z0``: the classifier's logit is 0 there (the gate measures the distance to it)."""
        return -self._b / self._a

    def describe(self) -> str:
        """One line naming the model's parameters (for benchmark output)."""
        logit = f"logits {self._a * self.mu:+.2f}/-{self._a * self.mu:.2f} sd {self._a:.2f}"
        ties = []
        if self.prob_levels:
            ties.append(f"probabilities rounded to 1/{self.prob_levels}")
        if self.gate_step:
            ties.append(f"gate logits rounded to {self.gate_step:g}")
        gate = (
            f"gate {self.gate_scale:g}|z - z0| + {self.gate_correct_shift:g} correct + {self.gate_noise:g} e"
        )
        return f"prevalence {self.prevalence:g}, {logit}, {gate}" + (f", {', '.join(ties)}" if ties else "")

    # ------------------------------------------------------------------ sampling
    def _probs_of_logit(self, logit: np.ndarray) -> np.ndarray:
        p1 = special.expit(logit)
        if not self.prob_levels:
            return np.stack([1.0 - p1, p1], axis=1)
        # integer levels, so that max(p0, p1) takes the same float value on both sides of 0.5
        level = np.rint(p1 * self.prob_levels)
        return np.stack([(self.prob_levels - level), level], axis=1) / self.prob_levels

    def _observed_gate(self, g: np.ndarray) -> np.ndarray:
        return np.rint(g / self.gate_step) * self.gate_step if self.gate_step else g

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Draw ``n`` labelled images: ``label``, ``probs`` (n, 2), ``gate_logit`` and latent ``z``."""
        y = (rng.random(n) < self.prevalence).astype(np.int64)
        z = rng.standard_normal(n) + np.where(y == 1, self.mu, -self.mu)
        probs = self._probs_of_logit(self._a * z + self._b)
        correct = (probs[:, 1] >= probs[:, 0]).astype(np.int64) == y
        g = (
            self.gate_scale * np.abs(z - self.boundary)
            + self.gate_correct_shift * np.where(correct, 1.0, -1.0)
            + self.gate_noise * rng.standard_normal(n)
        )
        return {"label": y, "probs": probs, "gate_logit": self._observed_gate(g), "z": z}

    # ------------------------------------------------------------------ exact rates
    def _gate_pass(self, z: np.ndarray, x: float, sign: float) -> np.ndarray:
        """``P(g >= x | z)`` for a correct (``sign`` +1) or wrong (-1) prediction; ``x`` on the raw gate."""
        mean = self.gate_scale * np.abs(z - self.boundary) + sign * self.gate_correct_shift
        return stats.norm.sf((x - mean) / self.gate_noise)

    def _integral(self, a: float, b: float, mean: float, x: float, sign: float) -> float:
        """``P(a < z <= b, g >= x)`` under ``z ~ N(mean, 1)`` (Simpson, split at the gate's kink)."""
        span = 14.0 + abs(self.mu)
        a, b = max(a, -span), min(b, span)
        if b <= a:
            return 0.0
        if not np.isfinite(x):
            return float(stats.norm.cdf(b - mean) - stats.norm.cdf(a - mean))
        cuts = [a] + ([self.boundary] if a < self.boundary < b else []) + [b]
        total = 0.0
        for lo, hi in itertools.pairwise(cuts):
            z = np.linspace(lo, hi, _SIMPSON_POINTS)
            total += float(integrate.simpson(stats.norm.pdf(z - mean) * self._gate_pass(z, x, sign), x=z))
        return total

    def region_rates(self, z_lo: float, z_hi: float, x: float = -math.inf) -> RuleRates:
        """Rates of "exit-negative iff ``z < z_lo``, exit-positive iff ``z >= z_hi``, both iff ``g >= x``".

        ``x`` is a threshold on the raw (unrounded) gate logit; ``-inf``: no gate condition.
        """
        inf = math.inf
        miss = self._integral(-inf, z_lo, self.mu, x, -1.0)
        hit = self._integral(z_hi, inf, self.mu, x, +1.0)
        tn = self._integral(-inf, z_lo, -self.mu, x, +1.0)
        fp = self._integral(z_hi, inf, -self.mu, x, -1.0)
        fnr = miss / (miss + hit) if miss + hit > 0 else math.nan
        fpr = fp / (fp + tn) if fp + tn > 0 else math.nan
        return RuleRates(fnr, fpr, self.prevalence * (miss + hit) + (1 - self.prevalence) * (fp + tn))

    def _z_of_logit(self, logit: Any) -> Any:
        return (np.asarray(logit, dtype=np.float64) - self._b) / self._a

    def _level_logit(self, level: Any) -> Any:
        """The raw logit at which the rounded probability level ``level - 1/2`` is crossed."""
        with np.errstate(divide="ignore"):
            return special.logit(
                np.clip((np.asarray(level, dtype=np.float64) - 0.5) / self.prob_levels, 0, 1)
            )

    def threshold_rates(self, t: Any) -> RuleRates:
        """Rates of "exit iff ``max(p0, p1) >= t``" (argmax label, no gate), vectorised over ``t``."""
        z_lo, z_hi = self._threshold_ends(t)
        miss, hit = stats.norm.cdf(z_lo - self.mu), stats.norm.sf(z_hi - self.mu)
        tn, fp = stats.norm.cdf(z_lo + self.mu), stats.norm.sf(z_hi + self.mu)
        with np.errstate(invalid="ignore", divide="ignore"):
            fnr = np.where(miss + hit > 0, miss / (miss + hit), np.nan)
            fpr = np.where(fp + tn > 0, fp / (fp + tn), np.nan)
        return RuleRates(fnr, fpr, self.prevalence * (miss + hit) + (1 - self.prevalence) * (fp + tn))

    def _threshold_ends(self, t: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(z_lo, z_hi)`` of "exit iff ``max(p0, p1) >= t``" with the argmax label (ties positive)."""
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore"):
            if self.prob_levels:
                levels = self.prob_levels
                need = np.ceil(t * levels - 1e-9)  # the max-probability level needed
                half = math.ceil(levels / 2)  # the argmax is positive iff level >= levels / 2
                hi_level = np.maximum(need, half)
                lo_level = np.minimum(levels - need, half - 1)  # exit-negative iff level <= lo_level
                l_hi = np.where(hi_level <= levels, self._level_logit(hi_level), np.inf)
                l_lo = np.where(lo_level >= 0, self._level_logit(lo_level + 1), -np.inf)
            else:
                l_hi = np.where(t <= 1.0, special.logit(np.clip(t, 0.5, 1.0)), np.inf)
                l_lo = np.where(t <= 1.0, -l_hi, -np.inf)
        return self._z_of_logit(l_lo), self._z_of_logit(l_hi)

    def rule_rates(self, decide: Decide) -> RuleRates:
        """Exact rates of any fitted exit rule, read off its own ``decide`` function.

        Every policy's rule has the form "exit-negative iff the logit is below ``L_lo``,
        exit-positive iff it is at least ``L_hi``, and either only when the gate logit is at least
        ``x``"; the three thresholds are found by bisection on ``decide`` (on the rounded levels
        when the model rounds), then the rates follow from :meth:`region_rates`.
        """
        top = self._probs_of_logit(np.array([_LOGIT_SPAN]))
        gate_x = self._gate_threshold(lambda g: decide(np.repeat(top, g.size, axis=0), g) != DEFER)
        if gate_x == math.inf:
            return RuleRates(math.nan, math.nan, 0.0)
        g_pass = np.array([_GATE_SPAN])

        def decisions(logit: np.ndarray) -> np.ndarray:
            return decide(self._probs_of_logit(logit), np.repeat(g_pass, logit.size))

        if self.prob_levels:
            levels = np.arange(self.prob_levels + 1)
            d = decide(np.stack([self.prob_levels - levels, levels], axis=1) / self.prob_levels,
                       np.repeat(g_pass, levels.size))  # fmt: skip
            pos, neg = np.nonzero(d == EXIT_POSITIVE)[0], np.nonzero(d == EXIT_NEGATIVE)[0]
            if (pos.size and pos[-1] - pos[0] + 1 != pos.size) or (neg.size and neg[0] != 0):
                raise ValueError("the rule's exit regions are not intervals of the probability")
            l_hi = float(self._level_logit(pos[0])) if pos.size else math.inf
            l_lo = float(self._level_logit(neg[-1] + 1)) if neg.size else -math.inf
        else:
            l_hi = _bisect(lambda v: decisions(v) == EXIT_POSITIVE, -_LOGIT_SPAN, _LOGIT_SPAN, rising=True)
            l_lo = _bisect(lambda v: decisions(v) == EXIT_NEGATIVE, -_LOGIT_SPAN, _LOGIT_SPAN, rising=False)
        return self.region_rates(float(self._z_of_logit(l_lo)), float(self._z_of_logit(l_hi)), gate_x)

    def _gate_threshold(self, exits: Callable[[np.ndarray], np.ndarray]) -> float:
        """The raw gate threshold of a rule (``-inf``: no gate condition, ``inf``: nothing exits)."""
        if not self.gate_step:
            return _bisect(exits, -_GATE_SPAN, _GATE_SPAN, rising=True)
        top = math.ceil(_GATE_SPAN / self.gate_step)
        levels = np.arange(-top, top + 1)
        ok = exits(levels * self.gate_step)
        if not ok.any():
            return math.inf
        first = int(np.argmax(ok))
        if ok[first:].sum() != ok.size - first:
            raise ValueError("the rule's gate condition is not a threshold")
        return -math.inf if first == 0 else (levels[first] - 0.5) * self.gate_step

    # ------------------------------------------------------------------ oracles
    def oracle(
        self,
        target: float = DEFAULT_TARGET_FNR_EXIT,
        max_fpr: float = DEFAULT_MAX_FPR_EXIT,
        rule: str = "softmax",
        gate_points: int = 241,
    ) -> float:
        """The largest true coverage of a rule with ``FNR_exit <= target`` and ``FPR_exit <= max_fpr``.

        Args:
            target, max_fpr: the two bounds.
            rule: ``softmax`` (threshold on max p), ``gate`` (threshold on the gate, argmax
                label) or ``two_dim`` (both thresholds: the SCRC rule with a gate selection).
            gate_points: gate thresholds searched (``gate`` and ``two_dim``).
        """
        if rule == "softmax":
            return _best(self.threshold_rates(self._t_grid()), target, max_fpr)
        if rule not in ("gate", "two_dim"):
            raise ValueError(f"rule={rule!r}; allowed: softmax, gate, two_dim")
        t = np.array([0.0]) if rule == "gate" else self._t_grid(4001)
        x_grid = np.linspace(-4.0, 4.0 + 3 * self.gate_scale * self.mu, gate_points)
        if self.gate_step:
            x_grid = np.unique((np.round(x_grid / self.gate_step) - 0.5) * self.gate_step)
        best = 0.0
        for x in np.r_[-math.inf, x_grid]:
            best = max(best, _best(self._gated_threshold_rates(t, x), target, max_fpr))
        return best

    def _t_grid(self, size: int = 200001) -> np.ndarray:
        if self.prob_levels:
            return np.arange(self.prob_levels + 2) / self.prob_levels
        return np.r_[0.5, special.expit(np.linspace(0.0, 40.0, size))]

    def _gated_threshold_rates(self, t: np.ndarray, x: float) -> RuleRates:
        """:meth:`threshold_rates` with the gate condition ``g >= x`` for many ``t`` (cumulative sums)."""
        if not np.isfinite(x):
            return self.threshold_rates(t)
        span = 14.0 + abs(self.mu)
        z = np.linspace(-span, span, 120001)
        ends = self._threshold_ends(t)
        out = {}
        for name, mean, sign, from_left in (
            ("miss", self.mu, -1.0, True),
            ("tn", -self.mu, +1.0, True),
            ("hit", self.mu, +1.0, False),
            ("fp", -self.mu, -1.0, False),
        ):
            f = stats.norm.pdf(z - mean) * self._gate_pass(z, x, sign)
            cum = integrate.cumulative_trapezoid(f, z, initial=0.0)
            if from_left:
                out[name] = np.interp(ends[0], z, cum, left=0.0, right=cum[-1])
            else:
                out[name] = cum[-1] - np.interp(ends[1], z, cum, left=0.0, right=cum[-1])
        with np.errstate(invalid="ignore", divide="ignore"):
            fnr = np.where(out["miss"] + out["hit"] > 0, out["miss"] / (out["miss"] + out["hit"]), np.nan)
            fpr = np.where(out["fp"] + out["tn"] > 0, out["fp"] / (out["fp"] + out["tn"]), np.nan)
        cov = self.prevalence * (out["miss"] + out["hit"]) + (1 - self.prevalence) * (out["fp"] + out["tn"])
        return RuleRates(fnr, fpr, cov)


def _bisect(pred: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, *, rising: bool) -> float:
    """The boundary of ``{v : pred(v)}``, an upper (``rising``) or lower ray of ``[lo, hi]``.

    Returns ``-inf``/``inf`` when the ray is all or none of ``[lo, hi]``.
    """

    def holds(v: float) -> bool:
        return bool(pred(np.array([v]))[0])

    inside, outside = (hi, lo) if rising else (lo, hi)
    if not holds(inside):
        return math.inf if rising else -math.inf
    if holds(outside):
        return -math.inf if rising else math.inf
    for _ in range(200):
        mid = 0.5 * (inside + outside)
        if mid in (inside, outside):
            break
        if holds(mid):
            inside = mid
        else:
            outside = mid
    return inside


def _best(rates: RuleRates, target: float, max_fpr: float) -> float:
    """Largest coverage among rules meeting both bounds (an undefined rate meets its bound)."""
    ok = ~(np.asarray(rates.fnr) > target) & ~(np.asarray(rates.fpr) > max_fpr)
    cov = np.asarray(rates.coverage, dtype=np.float64)
    return float(cov[ok].max()) if ok.any() else 0.0


#: The reference model of the validity tests and benchmarks: prevalence 0.4, positive-class logits
#: N(+2.2, 1.5^2) for positives and N(-2.2, 1.5^2) for negatives (oracle coverage 0.80 at FNR_exit 0.02).
REFERENCE_MODEL = GaussianScoreModel.from_logits(2.2, 1.5, prevalence=0.4)
#: The reference model with a gate that also sees part of the error signal (its mean moves 0.3 towards
#: correct predictions): the gate and two-threshold rules can then beat the softmax threshold.
INFORMATIVE_GATE_MODEL = GaussianScoreModel.from_logits(2.2, 1.5, prevalence=0.4, gate_correct_shift=0.3)
#: A rare-positive model with heavy ties: prevalence 0.1, the same logits, probabilities rounded to
#: multiples of 0.05 (11 distinct max-probability values) and gate logits to multiples of 0.25.
TIES_MODEL = GaussianScoreModel.from_logits(2.2, 1.5, prevalence=0.1, prob_levels=20, gate_step=0.25)


# --------------------------------------------------------------------------- validity harness


#: Every built-in policy with each constructor variant the validity experiments run (bench and tests).
POLICY_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("softmax", {}),
    ("gate", {}),
    ("gate", {"calibrator": "isotonic"}),
    ("scrc", {}),
    ("scrc", {"variant": "SCRC-I"}),
    ("scrc", {"variant": "SCRC-T"}),
)


def mapie_fnr_controller(grid: Any, *, target: float, delta: float) -> Any:
    """MAPIE's ``BinaryClassificationController`` for the softmax rule's FNR_exit on ``grid``.

    The reference implementation the certificate is cross-checked against: exact binomial
    p-values, Holm, FNR_exit only (no FPR_exit guard), the deployed threshold chosen for coverage.
    Needs MAPIE (the ``dev`` extra).

    Args:
        grid: the candidate softmax thresholds.
        target: the FNR_exit target.
        delta: the failure probability.

    Returns:
        The controller; ``.calibrate(probs, label)`` certifies on val_calib.
    """
    from mapie.risk_control import BinaryClassificationController, BinaryRisk

    risk = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: y_pred == 0,
        risk_condition=lambda y_true, y_pred: (y_true == 1) & ~np.isnan(y_pred),
        higher_is_better=False,
    )

    def predict(probs: np.ndarray, t: float) -> np.ndarray:
        out = (probs[:, 1] >= probs[:, 0]).astype(float)
        out[probs.max(axis=1) < t] = np.nan
        return out

    return BinaryClassificationController(
        predict_function=predict,
        risk=risk,
        target_level=target,
        confidence_level=1 - delta,
        best_predict_param_choice="abstention_rate",
        list_predict_params=np.asarray(grid)[:, None],
        fwer_method="bonferroni_holm",
    )


def make_scores(
    model: GaussianScoreModel,
    n_select: int,
    n_calib: int,
    rng: np.random.Generator,
    n_test: int = 0,
    *,
    select_positives: bool = True,
) -> Any:
    """A :class:`~stage1_pro.scores.Scores` with fresh ``val_select``/``val_calib`` (and ``test``) draws.

    ``select_positives=False`` draws a ``val_select`` without positives (a starved split).
    """
    from stage1_pro.scores import Scores

    parts = {}
    if n_select > 0:
        select = model.sample(n_select, rng)
        while not select_positives and select["label"].any():
            keep = select["label"] == 0
            extra = model.sample(n_select, rng)
            select = {k: np.concatenate([v[keep], extra[k]])[:n_select] for k, v in select.items()}
        parts["val_select"] = select
    for split, n in (("val_calib", n_calib), ("test", n_test)):
        if n > 0:
            parts[split] = model.sample(n, rng)
    total = sum(len(p["label"]) for p in parts.values())
    return Scores(
        index=np.arange(total),
        split=np.concatenate([np.full(len(p["label"]), s) for s, p in parts.items()]),
        label=np.concatenate([p["label"] for p in parts.values()]),
        probs=np.concatenate([p["probs"] for p in parts.values()]),
        gate_logit=np.concatenate([p["gate_logit"] for p in parts.values()]),
        source="<simulated>",
    )


def fit_quietly(policy: str, scores: Any, **params: Any) -> Any:
    """``create_policy(policy, **params).fit(scores)`` without the infeasible warning."""
    from stage1_pro.policies import InfeasibleCertificateWarning, create_policy

    estimator = create_policy(policy, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InfeasibleCertificateWarning)
        return estimator.fit(scores)


def policy_rates(policy: Any, model: GaussianScoreModel, point: dict[str, Any] | None = None) -> RuleRates:
    """True rates of a fitted policy's deployed rule (or of one SCRC path ``point``).

    An infeasible policy exits nothing: ``(nan, nan, 0)``. SCRC-T decides per batch, so its
    deployed rule is taken as the deployed path point (every batch uses a certified point).
    """
    if not policy.feasible_ and point is None:
        return RuleRates(math.nan, math.nan, 0.0)
    return model.rule_rates(policy.point_rule(point))


def _one_blas_thread() -> Any:
    """A context limiting BLAS to one thread: these loops work on small arrays, and on a shared
    machine BLAS threads only contend (a 20,000-element dot product was 500x slower with them)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """A repeated-calibration experiment: how its draws are made and the certificate they are judged by.

    Every validity harness (:func:`validity_run`, :func:`procedure_comparison`, :func:`audit_run`)
    takes one, so the same experiment gives the same draws in each of them.

    Args:
        n_calib: val_calib images per draw.
        n_select: val_select images per draw; ``None``: ``n_calib``.
        draws: independent (val_select, val_calib) draws.
        seed: seed of the draws' random generator (the same seed gives the same draws).
        select_positives: ``False`` draws a val_select without positives (a starved split).
        target_fnr_exit: the FNR_exit bound of the certificate.
        delta: the certificate's failure probability.
        max_fpr_exit: the FPR_exit guard of the certificate.

    Raises:
        ConfigError: a certificate setting outside its valid range (see :mod:`stage1_pro.defaults`).
        ValueError: ``draws`` or ``n_calib`` below 1, or ``n_select`` below 0.
    """

    n_calib: int
    n_select: int | None = None
    draws: int = 1000
    seed: int = 0
    select_positives: bool = True
    target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT
    delta: float = DEFAULT_DELTA
    max_fpr_exit: float = DEFAULT_MAX_FPR_EXIT

    def __post_init__(self) -> None:
        defaults.check_target(self.target_fnr_exit)
        defaults.check_delta(self.delta)
        defaults.check_max_fpr_exit(self.max_fpr_exit)
        if self.draws < 1 or self.n_calib < 1:
            raise ValueError(f"draws={self.draws} and n_calib={self.n_calib} must both be at least 1")
        if self.n_select is not None and self.n_select < 0:
            raise ValueError(f"n_select={self.n_select} must be at least 0 (None: n_calib)")

    @property
    def certificate(self) -> dict[str, float]:
        """The certificate settings as policy constructor parameters."""
        return {
            "target_fnr_exit": self.target_fnr_exit,
            "delta": self.delta,
            "max_fpr_exit": self.max_fpr_exit,
        }

    def policy_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A policy's constructor parameters: :attr:`certificate` plus the policy's own ``params``.

        Raises:
            ValueError: ``params`` sets a certificate setting (it belongs to the experiment, which
                also judges the draws by it).
        """
        clash = sorted(set(params) & set(self.certificate))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} set as policy parameters; set them on the experiment instead: "
                f"Experiment(..., {clash[0]}=...)"
            )
        return {**self.certificate, **params}

    def violates(self, rates: RuleRates) -> tuple[bool, bool]:
        """(FNR_exit above the target, FPR_exit above the guard); an undefined rate violates nothing."""
        return bool(rates.fnr > self.target_fnr_exit), bool(rates.fpr > self.max_fpr_exit)

    def score_draws(self, model: GaussianScoreModel, n_test: int = 0) -> Iterator[Any]:
        """The experiment's ``draws`` independent draws from ``model``, one :func:`make_scores` each.

        BLAS is limited to one thread while the draws are consumed (see :func:`_one_blas_thread`).

        Args:
            model: the score model to draw from.
            n_test: test images per draw (0: no test split).

        Yields:
            A :class:`~stage1_pro.scores.Scores` with val_select, val_calib (and test) per draw.
        """
        rng = np.random.default_rng(self.seed)
        n_select = self.n_calib if self.n_select is None else self.n_select
        with _one_blas_thread():
            for _ in range(self.draws):
                yield make_scores(
                    model, n_select, self.n_calib, rng, n_test=n_test, select_positives=self.select_positives
                )


def validity_run(
    policy: str,
    model: GaussianScoreModel,
    experiment: Experiment,
    *,
    every_certified_point: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """Calibrate ``policy`` on each draw of ``experiment`` from ``model`` and judge its deployed rule.

    A draw *violates* when its deployed rule's true FNR_exit exceeds the target or its true
    FPR_exit exceeds ``max_fpr_exit`` (the joint certificate's event).

    Args:
        policy: a registered policy name (``softmax``, ``gate``, ``scrc``).
        model: the score model the draws come from.
        experiment: the draws and the certificate settings.
        every_certified_point: also check every certified path point (SCRC only), which bounds
            every SCRC-T batch's rule.
        **params: the policy's own constructor parameters (not the certificate settings).

    Returns:
        ``draws``; ``violation_rate`` with its Monte-Carlo standard error at rate delta
        (``mc_se``); ``fnr_violation_rate`` and ``fpr_violation_rate`` apart; the deployed rule's
        ``mean_coverage`` (0 when infeasible) with ``coverage_se``; ``certified_rate`` and
        ``infeasible_rate``; ``fwer``: the fraction of draws where *any* certified path point
        violates (``None`` without ``every_certified_point``).
    """
    settings = experiment.policy_params(params)
    fnr_bad, fpr_bad, coverages, feasible, fwer = [], [], [], [], []
    for scores in experiment.score_draws(model):
        est = fit_quietly(policy, scores, **settings)
        rates = policy_rates(est, model)
        bad_fnr, bad_fpr = experiment.violates(rates)
        fnr_bad.append(bad_fnr)
        fpr_bad.append(bad_fpr)
        coverages.append(rates.coverage)
        feasible.append(bool(est.feasible_))
        if every_certified_point:
            points = (policy_rates(est, model, p) for p in est.certified_path_)
            fwer.append(any(any(experiment.violates(r)) for r in points))
    draws, delta = experiment.draws, experiment.delta
    joint = np.logical_or(fnr_bad, fpr_bad)
    return {
        "draws": draws,
        "violation_rate": float(joint.mean()),
        "fnr_violation_rate": float(np.mean(fnr_bad)),
        "fpr_violation_rate": float(np.mean(fpr_bad)),
        "mc_se": float(np.sqrt(delta * (1 - delta) / draws)),
        "mean_coverage": float(np.mean(coverages)),
        "coverage_se": float(np.std(coverages) / np.sqrt(draws)),
        "certified_rate": float(np.mean(feasible)),
        "infeasible_rate": 1.0 - float(np.mean(feasible)),
        "fwer": float(np.mean(fwer)) if fwer else None,
    }


def procedure_comparison(
    model: GaussianScoreModel, methods: tuple[str, ...], experiment: Experiment
) -> dict[str, dict[str, float]]:
    """Every certification procedure of ``methods`` on the same draws (a paired comparison).

    The softmax policy's grid and counts are fitted once per draw, then each procedure certifies them.

    Args:
        model: the score model the draws come from.
        methods: names of :data:`stage1_pro.certify.PROCEDURES`.
        experiment: the draws and the certificate settings.

    Returns:
        Per method: ``violation_rate``, ``mean_coverage`` (0 when infeasible) and ``certified_rate``.
    """
    from stage1_pro.certify import certify

    out: dict[str, dict[str, list]] = {m: {"violation": [], "coverage": [], "certified": []} for m in methods}
    for scores in experiment.score_draws(model):
        policy = fit_quietly("softmax", scores, **experiment.certificate)
        rates = model.threshold_rates(policy.grid_)
        for m in methods:
            cert = certify(
                policy.calib_counts_,
                target=experiment.target_fnr_exit,
                delta=experiment.delta,
                max_fpr=experiment.max_fpr_exit,
                method=m,
                select=policy.select_counts_,
            )
            j = cert.deployed
            out[m]["certified"].append(j is not None)
            out[m]["coverage"].append(0.0 if j is None else float(rates.coverage[j]))
            out[m]["violation"].append(
                j is not None and any(experiment.violates(RuleRates(*(r[j] for r in rates))))
            )
    return {
        m: {
            "violation_rate": float(np.mean(v["violation"])),
            "mean_coverage": float(np.mean(v["coverage"])),
            "certified_rate": float(np.mean(v["certified"])),
        }
        for m, v in out.items()
    }


def audit_run(
    policy: str,
    model: GaussianScoreModel,
    experiment: Experiment,
    *,
    n_test: int,
    audit_level: float | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Calibrate, deploy and audit on a fresh test split, once per draw of ``experiment``.

    Among the draws whose deployed rule is truly valid (both true rates within their bounds),
    how often the audit refuses (``false_refusal_rate``, to compare with ``audit_level``) and how
    often the old rules would have: "test FNR_exit <= target" (``point_estimate_refusal_rate``)
    and "its Clopper-Pearson upper bound at delta <= target" (``upper_bound_refusal_rate``).

    Args:
        policy: a registered policy name.
        model: the score model the draws come from.
        experiment: the draws and the certificate settings.
        n_test: test images per draw.
        audit_level: the audit's level; ``None``: :data:`~stage1_pro.defaults.DEFAULT_AUDIT_LEVEL`.
        **params: the policy's own constructor parameters (not the certificate settings).

    Returns:
        ``draws``, ``valid_draws``, ``false_refusal_rate`` with its Monte-Carlo standard error
        (``mc_se``), ``point_estimate_refusal_rate``, ``upper_bound_refusal_rate`` and
        ``mean_power`` (the rates are ``nan`` when no draw is valid).
    """
    from stage1_pro import audit
    from stage1_pro.decisions import argmax_class
    from stage1_pro.defaults import DEFAULT_AUDIT_LEVEL
    from stage1_pro.metrics import exit_metrics

    level = DEFAULT_AUDIT_LEVEL if audit_level is None else audit_level
    settings = experiment.policy_params(params)
    target = experiment.target_fnr_exit
    refusals, point_refusals, bound_refusals, powers = [], [], [], []
    for scores in experiment.score_draws(model, n_test=n_test):
        est = fit_quietly(policy, scores, **settings)
        if not est.feasible_ or any(experiment.violates(policy_rates(est, model))):
            continue
        test = scores.subset("test")
        m = exit_metrics(est.decide(test.probs, test.gate_logit), test.label,
                         predictions=argmax_class(test.probs), delta=experiment.delta)  # fmt: skip
        a = audit.audit(m, target=target, max_fpr=experiment.max_fpr_exit, level=level)
        refusals.append(a["refused"])
        powers.append(a["power"])
        point_refusals.append(m["fnr_exit"] is not None and m["fnr_exit"] > target)
        bound_refusals.append(m["n_exited_positives"] == 0 or m["fnr_exit_upper_bound"] > target)
    n_valid = len(refusals)
    return {
        "draws": experiment.draws,
        "valid_draws": n_valid,
        "false_refusal_rate": float(np.mean(refusals)) if n_valid else float("nan"),
        "mc_se": float(np.sqrt(level * (1 - level) / max(n_valid, 1))),
        "point_estimate_refusal_rate": float(np.mean(point_refusals)) if n_valid else float("nan"),
        "upper_bound_refusal_rate": float(np.mean(bound_refusals)) if n_valid else float("nan"),
        "mean_power": float(np.mean(powers)) if n_valid else float("nan"),
    }
