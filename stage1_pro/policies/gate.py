"""Gate exit policy (``gateparams.json``): exit iff ``calibrator(gate_logit) >= gate_threshold``.

The gate is SelectiveNet's selection head g (Geifman & El-Yaniv, ICML 2019, arXiv 1901.09192,
§3): a phase >= 3 model outputs its logit beside the class probabilities. The logit is mapped
to a probability of a correct exit by a calibrator fitted on ``val_select`` (never on
``val_calib``, which certifies the threshold; ``docs/methods.md`` §4.2):

* ``platt`` (default): ``sigmoid(a * logit + b)``, a one-feature logistic regression with
  Platt's smoothed targets (Platt 1999; :func:`platt_fit`). Monotone, so it keeps the gate's
  ranking; only the threshold's scale changes.
* ``isotonic``: a non-decreasing step-linear fit (Zadrozny & Elkan 2002). Its plateaus create
  ties, so fewer distinct coverage levels can be certified.

The exit label is the classifier's argmax. The threshold is certified exactly like the softmax
policy's (:mod:`stage1_pro.certify`). Inference needs numpy only (no scikit-learn).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stage1_pro.decisions import argmax_class
from stage1_pro.errors import ConfigError, DataError
from stage1_pro.policies.base import ConfidenceThresholdPolicy
from stage1_pro.policy_registry import PolicyOption, register_policy

CALIBRATORS: tuple[str, ...] = ("platt", "isotonic")


def check_calibrator(kind: str) -> str:
    """Return ``kind`` if it names a gate calibrator (:data:`CALIBRATORS`).

    Raises:
        ConfigError: an unknown calibrator (the message lists the allowed ones).
    """
    if kind not in CALIBRATORS:
        raise ConfigError(f"unknown gate calibrator {kind!r}; allowed: {', '.join(CALIBRATORS)}")
    return kind


def fit_calibrator(
    kind: str, logits: np.ndarray, correct: np.ndarray, source: str = "val_select"
) -> dict[str, Any]:
    """Fit a gate calibrator on ``val_select``: the probability that an exit is correct given the logit.

    Returns the JSON-ready parameters: ``{"a", "b"}`` for Platt, ``{"x", "y"}`` (the isotonic
    breakpoints) for isotonic. Raises :class:`DataError` when ``correct`` has one class only.
    """
    check_calibrator(kind)
    correct = np.asarray(correct).astype(np.int64)
    if correct.min() == correct.max():
        raise DataError(
            f"{source}: the classifier is {'always' if correct[0] else 'never'} correct, so the gate "
            f"calibrator ({kind}) cannot be fitted; use more val_select data or the softmax policy"
        )
    x = np.asarray(logits, dtype=np.float64)
    if kind == "platt":
        a, b = platt_fit(x, correct)
        return {"a": a, "b": b}
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, correct)
    return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}


def _nll(z: np.ndarray, t: np.ndarray) -> float:
    return float(np.sum(np.logaddexp(0.0, z) - t * z))


def platt_fit(
    x: np.ndarray, y: np.ndarray, *, smooth: bool = True, max_iter: int = 100
) -> tuple[float, float]:
    """Platt scaling: ``P(y = 1 | x) = sigmoid(a x + b)`` by maximum likelihood.

    Newton's method with backtracking (Lin, Lin & Weng, "A note on Platt's probabilistic outputs
    for support vector machines", Machine Learning 2007, Alg. 1). With ``smooth`` the targets are
    Platt's (1999) ``(N+ + 1)/(N+ + 2)`` and ``1/(N- + 2)``, which keeps ``a`` finite when the
    classes separate; ``smooth=False`` is plain logistic regression.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0)) if smooth else y.astype(np.float64)
    a, b = 0.0, float(np.log((n_pos + 1.0) / (n_neg + 1.0)))
    loss = _nll(a * x + b, t)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * x + b)))
        r, w = p - t, p * (1.0 - p)
        grad = np.array([np.dot(r, x), r.sum()])
        if np.abs(grad).max() < 1e-9 * max(1, x.size):
            break
        hess = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), w.sum()]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        s = 1.0
        while s > 1e-10:  # backtracking line search on the negative log-likelihood
            a_new, b_new = a - s * step[0], b - s * step[1]
            new = _nll(a_new * x + b_new, t)
            if new <= loss - 1e-4 * s * float(grad @ step):
                break
            s /= 2.0
        else:
            break
        a, b, loss = a_new, b_new, new
    return float(a), float(b)


def apply_calibrator(kind: str, params: dict[str, Any], logits: np.ndarray) -> np.ndarray:
    """Calibrated gate probability (numpy only; matches scikit-learn's ``predict``)."""
    x = np.asarray(logits, dtype=np.float64)
    if check_calibrator(kind) == "platt":
        # the logistic function via tanh: overflow-free, no scipy needed at inference
        return 0.5 * (1.0 + np.tanh(0.5 * (params["a"] * x + params["b"])))
    return np.interp(x, np.asarray(params["x"], float), np.asarray(params["y"], float))


@register_policy(
    "gate",
    artifact_kind="gateparams",
    min_phase=3,
    score_names=("probs", "gate_logit"),
    score_label="calibrated gate probability",
    rule="exit iff calibrated gate >= gate_threshold (needs gate logits)",
    script="33_calibrate_gate.py",
    options=(
        PolicyOption(
            "--calibrator",
            "calibrator",
            "calibrator of the gate logit, fitted on val_select (default platt)",
            CALIBRATORS,
        ),
    ),
)
class GatePolicy(ConfidenceThresholdPolicy):
    """Exit iff the calibrated gate probability reaches a certified threshold.

    Args:
        target_fnr_exit, delta, method, grid_size, max_fpr_exit: see
            :class:`~stage1_pro.policies.base.ExitPolicy`.
        calibrator: gate calibrator fitted on ``val_select``, ``"platt"`` (default) or
            ``"isotonic"``.

    Attributes:
        calibrator_params_ (dict): fitted calibrator parameters.
        grid_ (ndarray): candidate thresholds on the calibrated probability, strictest first
            (``val_select`` quantiles).
        gate_threshold_ (float): deployed threshold (:data:`DEFER_ALL_THRESHOLD` when infeasible).
    """

    threshold_field = "gate_threshold"

    calibrator: str = "platt"

    def _check_params(self) -> None:
        super()._check_params()
        check_calibrator(self.calibrator)

    def fit(self, scores: Any) -> GatePolicy:
        if not scores.has_gate:
            raise DataError(
                f"{scores.source}: no 'gate_logit' array: the gate policy needs scores from a phase >= 3 "
                "model (three heads); calibrate with --policy softmax instead"
            )
        return super().fit(scores)  # type: ignore[return-value]

    def calibrated(self, gate_logit: np.ndarray) -> np.ndarray:
        """Calibrated gate probability of each image."""
        return apply_calibrator(self.calibrator, self.calibrator_params_, gate_logit)

    def confidence(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """The calibrated gate probability (``probs`` is ignored)."""
        if gate_logit is None:
            raise DataError("gate_logit: the gate policy needs the gate head's logits (phase >= 3 model)")
        return self.calibrated(gate_logit)

    def _fit_select(self, select: Any) -> None:
        correct = argmax_class(select.probs) == select.label
        self.calibrator_params_ = fit_calibrator(self.calibrator, select.gate_logit, correct, select.source)
        super()._fit_select(select)

    def _grid_rule(self) -> str:
        return (
            f"val_select quantiles of the {self.calibrator}-calibrated gate probability at coverage "
            f"levels j/{self.grid_size}, ties removed"
        )

    def _rule_text(self) -> str:
        return f"exit iff {self.calibrator}(gate_logit) >= {self.gate_threshold_:.6g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "calibrator_type": self.calibrator,
            "calibrator_params": self.calibrator_params_,
        }

    @classmethod
    def _params_from_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        return {**super()._params_from_dict(d), "calibrator": d["calibrator_type"]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GatePolicy:
        policy = super().from_dict(d)
        policy.calibrator_params_ = d["calibrator_params"]
        return policy  # type: ignore[return-value]
