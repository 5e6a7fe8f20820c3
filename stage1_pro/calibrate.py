"""Calibrate and certify an exit policy from a ``scores.npz`` file: the one function behind
``stage1-pro calibrate``, the numbered scripts 25/33/36 and the KFP calibrate components.

No model and no torch: it works on any scores file in the contract of :mod:`stage1_pro.scores`.
The policy's grid and anything it fits come from ``val_select``; the certificate comes from
``val_calib`` (see :mod:`stage1_pro.certify` for what is guaranteed).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from stage1_pro import storage
from stage1_pro.artifacts import DEFAULT_FILENAMES, POLICY_ARTIFACT_KINDS, read_artifact
from stage1_pro.defaults import (
    DEFAULT_DELTA,
    DEFAULT_MAX_FPR_EXIT,
    DEFAULT_TARGET_FNR_EXIT,
    check_delta,
    check_max_fpr_exit,
    check_target,
)
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.layout import MODEL_FILE, SPLITS_FILE
from stage1_pro.provenance import sha256_uri

log = logging.getLogger(__name__)


def check_scores_match_splits(scores: Any, splits: dict[str, Any], scores_uri: str, splits_uri: str) -> None:
    """Raise :class:`DataError` unless every split of the scores holds exactly that split's indices."""
    for split in scores.splits:
        got = set(scores.subset(split).index.tolist())
        want = set(int(i) for i in splits["indices"].get(split, []))
        if got != want:
            missing, extra = len(want - got), len(got - want)
            raise DataError(
                f"{scores_uri}: split '{split}' holds {len(got)} rows but {splits_uri} lists {len(want)} "
                f"({missing} listed rows missing from the scores, {extra} scored rows not in that split): "
                "the scores were made with other splits; rescore the run or pass its own splits.json"
            )


def _sibling(uri: str, name: str) -> str:
    uri = str(uri)
    if storage.is_gcs(uri):
        return uri.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(os.path.abspath(uri)), name)


def _check_out_name(policy: str, out_uri: str) -> None:
    """Refuse to write one policy's file under another policy's file name (e.g. gate -> thresholds.json)."""
    name = str(out_uri).rstrip("/").rsplit("/", 1)[-1]
    for other, kind in POLICY_ARTIFACT_KINDS.items():
        if other != policy and name == DEFAULT_FILENAMES[kind]:
            own = DEFAULT_FILENAMES[POLICY_ARTIFACT_KINDS[policy]]
            raise ConfigError(
                f"--out {out_uri}: the {policy} policy writes {own}, never {name} "
                f"(that is the {other} policy's file)"
            )


def _other_policy_files(policy: str, out_uri: str) -> list[str]:
    found = []
    for other, kind in POLICY_ARTIFACT_KINDS.items():
        if other != policy:
            sibling = _sibling(out_uri, DEFAULT_FILENAMES[kind])
            if storage.exists(sibling):
                found.append(sibling)
    return found


def calibrate_policy(
    policy: str,
    scores_uri: str,
    out_uri: str,
    *,
    target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT,
    delta: float = DEFAULT_DELTA,
    max_fpr_exit: float = DEFAULT_MAX_FPR_EXIT,
    method: str | None = None,
    splits_uri: str | None = None,
    model_version: str | None = None,
    replace: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fit ``policy`` on ``scores_uri`` (val_select), certify it on val_calib, write ``out_uri``.

    On any error nothing is written.

    Args:
        policy: a registered exit policy (:func:`stage1_pro.policy_registry.list_policies`).
        scores_uri: ``scores.npz`` (local or gs://) with ``val_select`` and ``val_calib`` rows.
        out_uri: the policy file to write, named as the policy's (``thresholds.json`` for softmax...).
        target_fnr_exit, delta: certified
            ``P(FNR_exit > target_fnr_exit or FPR_exit > max_fpr_exit) <= delta``.
        max_fpr_exit: the guard certified with the target (default 0.25; 1 disables it).
        method: family-wise procedure (:data:`stage1_pro.certify.PROCEDURES`), default split
            fallback sequence.
        splits_uri: ``splits.json``: the scores' rows must be exactly its val_select/val_calib/test
            indices. Default: the ``splits.json`` next to the scores file, if there is one.
        model_version: lineage; default the sha256 of ``model_best.pth`` next to the scores file,
            if present.
        replace: delete another policy's file next to ``out_uri`` (a run holds exactly one policy
            file); without it such a file is an error.
        **options: policy parameters, e.g. ``calibrator="isotonic"`` (gate), ``variant="SCRC-T"``,
            ``selection_score="gate"`` (scrc), ``grid_size``.

    Returns:
        The artifact as written (validated against its schema).

    Raises:
        ConfigError: bad settings (an unknown policy or option, a value out of range, ``out_uri``
            named as another policy's file).
        DataError: bad scores, or scores that do not match the splits.
        ArtifactError: another policy's file next to ``out_uri`` (without ``replace``), or an
            invalid splits file.
        StorageError: an unreadable input or an unwritable output.
    """
    from stage1_pro.policies import InfeasibleCertificateWarning, create_policy, get_policy_class
    from stage1_pro.scores import load_scores

    get_policy_class(policy)
    target_fnr_exit = check_target(target_fnr_exit)
    delta = check_delta(delta)
    max_fpr_exit = check_max_fpr_exit(max_fpr_exit)
    scores_uri, out_uri = str(scores_uri), str(out_uri)
    _check_out_name(policy, out_uri)
    others = _other_policy_files(policy, out_uri)
    if others and not replace:
        raise ArtifactError(
            f"{others[0]} already exists next to {out_uri}: a run directory holds exactly one policy "
            "file; pass --replace (replace=True) to delete it, or write elsewhere"
        )
    estimator = create_policy(
        policy,
        target_fnr_exit=target_fnr_exit,
        delta=delta,
        max_fpr_exit=max_fpr_exit,
        method=method,
        **options,
    )

    scores = load_scores(scores_uri)
    lineage: dict[str, Any] = {"scores_sha256": sha256_uri(scores_uri)}
    if splits_uri is None and storage.exists(_sibling(scores_uri, SPLITS_FILE)):
        splits_uri = _sibling(scores_uri, SPLITS_FILE)
    if splits_uri is not None:
        splits = read_artifact(str(splits_uri), "splits")
        check_scores_match_splits(scores, splits, scores_uri, str(splits_uri))
        lineage["splits_version"] = splits["splits_version"]
        lineage["data_fingerprint"] = splits["dataset"]["fingerprint"]
    if model_version is None and storage.exists(_sibling(scores_uri, MODEL_FILE)):
        model_version = sha256_uri(_sibling(scores_uri, MODEL_FILE))
    if model_version is not None:
        lineage["model_version"] = str(model_version)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InfeasibleCertificateWarning)
        estimator.fit(scores)
    for w in caught:
        if issubclass(w.category, InfeasibleCertificateWarning):
            log.warning("%s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    estimator.lineage_ = lineage
    written = estimator.save(out_uri)
    for other in others:
        storage.delete(other)
        log.info("deleted %s (replaced by %s)", other, out_uri)
    log.debug("%s", estimator.summary())  # the CLI and the KFP component print their own summary
    return written


def default_out(policy: str, scores_uri: str) -> str:
    """The policy file name next to the scores file (``RUN/thresholds.json`` for softmax...)."""
    return _sibling(scores_uri, DEFAULT_FILENAMES[POLICY_ARTIFACT_KINDS[policy]])


__all__ = ["calibrate_policy", "check_scores_match_splits", "default_out"]
