"""Certified calibration of an exit policy: one component for every registered policy (the pipeline
runs it once per exit-policy branch, with that branch's policy).

It works from the scores file alone (no model, no GPU): the policy fixes its grid before looking at
calibration labels, exact binomial p-values for "FNR_exit > target" (exited positives of val_calib)
and "FPR_exit > max_fpr_exit" (exited negatives) are computed at each grid point, the family-wise
procedure runs at delta on their maximum, and the loosest certified point (maximum coverage) is
deployed. If nothing certifies, the policy defers every image and says so; there is never an
uncertified fallback.
"""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def calibrate(
    scores: Input[Dataset],
    exit_policy: str,
    target_fnr_exit: float,
    delta: float,
    max_fpr_exit: float,
    policy: Output[Artifact],
    metrics: Output[Metrics],
):
    """Certify an exit policy on the scores: FNR_exit <= target_fnr_exit and FPR_exit <= max_fpr_exit.

    Args:
        scores: scores.npz from the train step (val_select, val_calib, test; gate logits from phase 3).
        exit_policy: The registered exit policy to certify (softmax, gate, scrc...).
        target_fnr_exit: Certified bound on FNR_exit.
        delta: Certificate failure probability.
        max_fpr_exit: Guard certified with the target: FPR_exit bound, in (0, 1].
        policy: The policy's file (thresholds.json, gateparams.json...) with its certificate.
        metrics: val_calib coverage and FNR_exit, both certified bounds.
    """
    from stage1_pro.components import runtime

    runtime.calibrate(exit_policy, scores.path, policy, metrics, target_fnr_exit, delta, max_fpr_exit)
