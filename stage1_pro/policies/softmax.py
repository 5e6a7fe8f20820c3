"""Softmax-threshold exit policy (``thresholds.json``): exit iff ``max(p0, p1) >= exit_threshold``.

The exit label is the argmax class (ties to positive). This is selective classification with
the softmax response as confidence (Geifman & El-Yaniv, "Selective classification for deep
neural networks", NeurIPS 2017, arXiv 1705.08500, §3), with the threshold certified by
Learn-then-Test (arXiv 2110.01052) instead of SGR's bound on the selective risk: the certified
risk is FNR_exit among exited positives (:mod:`stage1_pro.metrics`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stage1_pro.certify import quantile_grid
from stage1_pro.decisions import DEFER, argmax_class
from stage1_pro.policies.base import DEFER_ALL_THRESHOLD, ConfidenceThresholdPolicy, check_probs
from stage1_pro.policy_registry import register_policy


@register_policy(
    "softmax",
    artifact_kind="thresholds",
    min_phase=1,
    score_names=("probs",),
    score_label="max class probability",
    rule="exit iff max p >= exit_threshold",
    script="25_threshold_sweep.py",
)
class SoftmaxThresholdPolicy(ConfidenceThresholdPolicy):
    """Exit iff the max class probability reaches a certified threshold.

    Args:
        target_fnr_exit, delta, method, grid_size, max_fpr_exit: see
            :class:`~stage1_pro.policies.base.ExitPolicy`.

    Attributes:
        grid_ (ndarray): candidate thresholds, strictest (largest) first: quantiles of the
            ``val_select`` max probability at coverage levels ``1/grid_size, ..., 1``.
        exit_threshold_ (float): the deployed threshold (:data:`DEFER_ALL_THRESHOLD` when
            infeasible).
        feasible_ (bool): whether any grid point was certified.
        certificate_, val_calib_metrics_, val_select_metrics_, sweep_results_ (dict / list): as
            written to ``thresholds.json``.

    Examples:
        >>> policy = SoftmaxThresholdPolicy(target_fnr_exit=0.02, delta=0.1).fit(scores)  # doctest: +SKIP
        >>> policy.decide(probs)  # doctest: +SKIP
        array([ 1, -1,  0], dtype=int8)
    """

    def confidence(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """Softmax response ``max(p0, p1)`` (``gate_logit`` is ignored)."""
        return np.asarray(probs, dtype=np.float64).max(axis=1)

    def _fit_select(self, select: Any) -> None:
        self.grid_ = quantile_grid(self.confidence(select.probs), self.grid_size)

    def _set_deployed(self, j: int | None) -> None:
        self.exit_threshold_ = DEFER_ALL_THRESHOLD if j is None else float(self.grid_[j])

    def _grid_rule(self) -> str:
        return f"val_select max-probability quantiles at coverage levels j/{self.grid_size}, ties removed"

    def decide(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """Decisions (int8): the argmax class where ``max p >= exit_threshold_``, else -1 (defer)."""
        self._check_fitted()
        p, _ = check_probs(probs, gate_logit)
        out = argmax_class(p)
        if not self.feasible_:
            return np.full(p.shape[0], DEFER, dtype=np.int8)
        out[self.confidence(p) < self.exit_threshold_] = DEFER
        return out

    def _rule_text(self) -> str:
        return f"exit iff max p >= {self.exit_threshold_:.6g}"

    def to_dict(self) -> dict[str, Any]:
        return {**self._common_dict(), "exit_threshold": float(self.exit_threshold_)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SoftmaxThresholdPolicy:
        c = d["certificate"]
        policy = cls(**cls._params_from_dict(d))
        policy._restore_common(d)
        policy.grid_ = np.asarray(c["grid"], dtype=np.float64)
        policy.exit_threshold_ = float(d["exit_threshold"])
        return policy
