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

from stage1_pro.policies.base import ConfidenceThresholdPolicy
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

    def _grid_rule(self) -> str:
        return f"val_select max-probability quantiles at coverage levels j/{self.grid_size}, ties removed"

    def _rule_text(self) -> str:
        return f"exit iff max p >= {self.exit_threshold_:.6g}"
