"""The score reference a bundle carries: its val_calib exit-score distribution.

The certificate holds for images exchangeable with ``val_calib``. Export records, per val_calib
image, the score the active policy thresholds (:meth:`~stage1_pro.policies.base.ExitPolicy.confidence`),
the model's p(positive) and whether the policy exited it, as ``score_reference.json`` (schema
``score_reference``). :mod:`stage1_pro.drift` later scores new, unlabelled images with the
bundle's own model and tests them against it; no labels are stored or needed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stage1_pro.artifacts import write_artifact
from stage1_pro.decisions import DEFER
from stage1_pro.provenance import sha256_uri, utc_now

#: The split a reference describes: the one the certificate was computed on.
REFERENCE_SPLIT = "val_calib"


def score_arrays(policy: Any, probs: np.ndarray, gate_logit: np.ndarray | None) -> dict[str, np.ndarray]:
    """What the reference holds per image, for any scored images: exit score, p(positive), exited.

    Args:
        policy: a fitted exit policy.
        probs: ``(n, 2)`` class probabilities.
        gate_logit: ``(n,)`` gate logits, or None for models without a gate head.

    Returns:
        ``{"exit_score": float (n,), "p_positive": float (n,), "exited": bool (n,)}``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    decisions = np.asarray(policy.decide(probs, gate_logit))
    return {
        "exit_score": np.asarray(policy.confidence(probs, gate_logit), dtype=np.float64),
        "p_positive": probs[:, 1],
        "exited": decisions != DEFER,
    }


def build_reference(
    policy: Any, scores: Any, *, exit_policy: str, lineage: dict[str, str] | None = None
) -> dict[str, Any]:
    """The ``score_reference`` object (unstamped) of ``policy`` on the val_calib rows of ``scores``.

    Args:
        policy: the run's fitted exit policy.
        scores: the run's :class:`stage1_pro.scores.Scores` (must hold val_calib rows).
        exit_policy: the policy's name (``softmax``, ``gate``, ``scrc``).
        lineage: sha256 of the scores and policy files, if known.
    """
    calib = scores.subset(REFERENCE_SPLIT)
    arrays = score_arrays(policy, calib.probs, calib.gate_logit)
    n_exited = int(arrays["exited"].sum())
    reference: dict[str, Any] = {
        "created_at": utc_now(),
        "exit_policy": exit_policy,
        "score": policy.spec.score_label,
        "split": REFERENCE_SPLIT,
        "n": len(calib),
        "n_exited": n_exited,
        "exit_rate": n_exited / len(calib),
        "exit_score": arrays["exit_score"].tolist(),
        "p_positive": arrays["p_positive"].tolist(),
        "exited": arrays["exited"].tolist(),
    }
    if lineage:
        reference["lineage"] = lineage
    return reference


def write_reference(
    scores_uri: str | os.PathLike[str], policy_uri: str | os.PathLike[str], out_uri: str | os.PathLike[str]
) -> dict[str, Any]:
    """Compute the reference of a run (its scores.npz and policy file) and write it, validated.

    Returns:
        The artifact as written.

    Raises:
        ArtifactError, DataError: unreadable or invalid scores or policy (naming the file).
    """
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.policies import load_policy
    from stage1_pro.scores import load_scores

    policy = load_policy(policy_uri)
    exit_policy = read_artifact(policy_uri)["policy"]
    reference = build_reference(
        policy,
        load_scores(str(scores_uri)),
        exit_policy=exit_policy,
        lineage={"scores_sha256": sha256_uri(scores_uri), "policy_sha256": sha256_uri(policy_uri)},
    )
    return write_artifact(out_uri, "score_reference", reference)
