"""Certified calibration of the three exit policies, one component each (one per pipeline branch).

Each works from the scores file alone (no model, no GPU): it fixes a threshold grid before looking
at calibration labels, computes an exact binomial p-value for "FNR_exit > target" from the exited
positives of val_calib at each grid point, applies the family-wise procedure at delta, and deploys
the loosest certified point (maximum coverage). If nothing certifies, the policy defers every
image and says so; there is never an uncertified fallback.
"""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def calibrate_softmax(
    scores: Input[Dataset],
    target_fnr_exit: float,
    delta: float,
    policy: Output[Artifact],
    metrics: Output[Metrics],
):
    """Certify a pair of softmax-probability exit thresholds (thresholds.json).

    An image exits as positive when p(positive) is high enough and as negative when p(negative) is,
    with FNR_exit <= target_fnr_exit certified on val_calib with probability >= 1 - delta.

    Args:
        scores: scores.npz from the train step (val_select, val_calib, test).
        target_fnr_exit: Certified bound on FNR_exit.
        delta: Certificate failure probability.
        policy: thresholds.json with the certificate (grid, n, k, Clopper-Pearson bound).
        metrics: val_calib coverage and FNR_exit, the certified bound.
    """
    from stage1_pro.components.runtime import calibrate

    calibrate("softmax", scores.path, policy, metrics, target_fnr_exit, delta)


@stage1_component
def calibrate_gate(
    scores: Input[Dataset],
    target_fnr_exit: float,
    delta: float,
    policy: Output[Artifact],
    metrics: Output[Metrics],
):
    """Certify a threshold on the calibrated SelectiveNet gate (gateparams.json); phases 3-6.

    The gate logit is calibrated (Platt or isotonic) on val_select, then its exit threshold is
    certified on val_calib exactly as for the softmax policy.

    Args:
        scores: scores.npz from the train step, with gate logits.
        target_fnr_exit: Certified bound on FNR_exit.
        delta: Certificate failure probability.
        policy: gateparams.json with the calibrator and the certificate.
        metrics: val_calib coverage and FNR_exit, the certified bound.
    """
    from stage1_pro.components.runtime import calibrate

    calibrate("gate", scores.path, policy, metrics, target_fnr_exit, delta)


@stage1_component
def calibrate_scrc(
    scores: Input[Dataset],
    target_fnr_exit: float,
    delta: float,
    policy: Output[Artifact],
    metrics: Output[Metrics],
):
    """Certify the two SCRC thresholds (selection, then conformal risk control) (scrcparams.json); phase 6.

    Args:
        scores: scores.npz from the train step.
        target_fnr_exit: Certified bound on FNR_exit.
        delta: Certificate failure probability.
        policy: scrcparams.json with both thresholds and the certificate.
        metrics: val_calib coverage and FNR_exit, the certified bound.
    """
    from stage1_pro.components.runtime import calibrate

    calibrate("scrc", scores.path, policy, metrics, target_fnr_exit, delta)
