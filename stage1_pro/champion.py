"""The champion on the challenger's data: re-score a published bundle on this run's images.

Retraining asks "is the new model better than the one in production *on today's data*?". Comparing
coverages recorded on two different test sets does not answer it (the test set changed too).
:func:`rescore_champion` puts the champion through what the challenger went through, on the same
images:

1. the champion bundle (a folder, or a registry prefix / ``latest`` / version, pulled and
   verified) is loaded with :func:`stage1_pro.inference.load_bundle`, and its
   :class:`~stage1_pro.inference.Predictor` scores this run's ``val_select``, ``val_calib`` and
   ``test`` images (the dataset manifest + ``splits.json``) with the champion's own preprocessing;
2. its exit policy (same kind and settings, e.g. the gate's calibrator) is fitted on those
   ``val_select`` scores and certified on those ``val_calib`` scores at *this run's*
   ``target_fnr_exit`` and ``delta``: the same contract as the challenger's certificate.

Images the champion was fitted on (its own ``train`` and ``val_select``) would flatter it where
this run certifies and audits: when a dataset grows, the deterministic split reshuffles and some
of them land in this run's ``val_calib`` or ``test``. They are found through the champion's
``splits.json`` (its dataset's manifest, read again if it still has the recorded fingerprint) and
left out of those two splits — for both models. (In ``val_select`` they are harmless: it only
fits the policy's grid, as the champion's own calibration did.) When that manifest changed in
place, they cannot be identified: the comparison says so (``overlap: "unknown"``).

:mod:`stage1_pro.validate` then audits both policies on the same ``test`` split and blesses the
challenger only if its test coverage is at least the champion's minus a tolerance.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from stage1_pro import storage
from stage1_pro.defaults import DEFAULT_MAX_FPR_EXIT
from stage1_pro.errors import DataError

log = logging.getLogger(__name__)

#: Allowed absolute drop of test coverage against the champion on the same test split.
DEFAULT_CHAMPION_TOLERANCE = 0.02
#: The splits the champion is scored on: fit, certify, audit.
RESCORED_SPLITS = ("val_select", "val_calib", "test")
#: The splits from which images the champion was fitted on are left out.
UNSEEN_SPLITS = ("val_calib", "test")
#: Images scored between two progress lines.
PROGRESS_EVERY = 1024


@dataclass(frozen=True)
class Champion:
    """The champion re-scored and re-certified on this run's data.

    Attributes:
        uri: what was asked for (bundle folder or registry URI).
        bundle: the champion's verified ``bundle.json``.
        policy: its exit policy, refitted on this run's val_select and certified on its val_calib.
        scores: its scores of this run's val_select, val_calib and test images, less ``excluded``.
        excluded: dataset rows of val_calib and test the champion was fitted on (left out).
        overlap_known: whether the champion's fitted images could be identified at all.
    """

    uri: str
    bundle: dict[str, Any]
    policy: Any
    scores: Any
    excluded: np.ndarray
    overlap_known: bool


def nothing_published(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a registry prefix with nothing under it yet: a first run has no champion.

    A ``gs://`` prefix counts when it is neither an object (``PREFIX/latest``) nor has anything
    listed under it; a local path only when it is an existing, empty folder (a path that does not
    exist is a typo, reported as such when loading).
    """
    uri = str(uri).rstrip("/")
    if not storage.is_gcs(uri):
        return os.path.isdir(uri) and not os.listdir(uri)
    return not storage.exists(uri) and not any(True for _ in storage.list_files(uri))


def rescore_champion(
    uri: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str],
    splits: dict[str, Any],
    target_fnr_exit: float,
    delta: float,
    max_fpr_exit: float = DEFAULT_MAX_FPR_EXIT,
    batch_size: int = 64,
    device: str = "cpu",
) -> Champion:
    """Score this run's images with the champion bundle and re-certify its policy on them.

    Args:
        uri: the champion: a bundle folder, or ``PREFIX`` / ``PREFIX/latest`` / ``PREFIX/VERSION``.
        data: this run's dataset (manifest or image folder) — the one ``splits`` was made for.
        splits: this run's ``splits.json``.
        target_fnr_exit: this run's target (the champion is certified for the same contract).
        delta: this run's delta.
        max_fpr_exit: this run's guard (the champion is certified for it too).
        batch_size: images per forward pass.
        device: torch device.

    Returns:
        The re-certified champion (its policy may be infeasible on this data: it then defers all).

    Raises:
        ArtifactError: not a bundle, or one that does not verify.
        DataError: the dataset is not the one the splits were made for, or an image cannot be read.
    """
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.data import load_dataset
    from stage1_pro.inference import load_bundle
    from stage1_pro.registry import local_bundle
    from stage1_pro.splits import check_splits

    dataset = load_dataset(data)
    check_splits(splits, dataset, f"splits.json of this run (dataset {data})")
    with local_bundle(uri) as folder:
        predictor = load_bundle(folder, device=device)
        policy_file = read_artifact(os.path.join(folder, predictor.bundle["policy_file"]))
        champion_splits = read_artifact(os.path.join(folder, predictor.bundle["splits_file"]), "splits")
    fitted = fitted_rows(champion_splits, dataset)
    scored = {s: np.asarray(splits["indices"][s], dtype=np.int64) for s in RESCORED_SPLITS}
    excluded = np.zeros(0, dtype=np.int64)
    if fitted is not None:
        excluded = np.concatenate([scored[s][np.isin(scored[s], fitted)] for s in UNSEEN_SPLITS])
        scored.update({s: scored[s][~np.isin(scored[s], fitted)] for s in UNSEEN_SPLITS})
        if excluded.size:
            log.warning(
                "champion %s was fitted on %d of this run's val_calib/test images; they are left out of the "
                "comparison",
                predictor.version,
                excluded.size,
            )
    else:
        log.warning(
            "champion %s: its dataset manifest %s changed since it was trained; images it was fitted on "
            "cannot be identified, and any among this run's test images flatter it",
            predictor.version,
            champion_splits["dataset"]["source"],
        )
    for name, rows in scored.items():
        if not rows.size:
            raise DataError(
                f"this run's {name} split holds only images champion {predictor.version} was fitted on "
                f"({excluded.size} such images in val_calib/test); there is nothing new to compare it on — "
                "compare on new data"
            )
    log.info(
        "champion %s (%s policy): scoring this run's %s images",
        predictor.version,
        predictor.bundle["active_exit_policy"],
        "/".join(RESCORED_SPLITS),
    )
    scores = score_splits(predictor, dataset, scored, batch_size=batch_size)
    policy = recertify(
        policy_file, scores, target_fnr_exit=target_fnr_exit, delta=delta, max_fpr_exit=max_fpr_exit
    )
    return Champion(
        uri=str(uri),
        bundle=predictor.bundle,
        policy=policy,
        scores=scores,
        excluded=np.sort(excluded),
        overlap_known=fitted is not None,
    )


def fitted_rows(champion_splits: dict[str, Any], dataset: Any) -> np.ndarray | None:
    """Rows of ``dataset`` that the champion was fitted on (its train and val_select images).

    Its ``splits.json`` names its dataset's source and fingerprint; the source is read again and
    used only if it still has that fingerprint (otherwise None: not identifiable).
    """
    from stage1_pro.data import load_dataset
    from stage1_pro.errors import Stage1ProError

    recorded = champion_splits["dataset"]
    if recorded["fingerprint"] == dataset.fingerprint:
        old = dataset
    else:
        try:
            old = load_dataset(recorded["source"], check_files=False)
        except Stage1ProError:
            return None
        if old.fingerprint != recorded["fingerprint"]:
            return None
    seen = {old.uris[i] for s in ("train", "val_select") for i in champion_splits["indices"][s]}
    return np.asarray([i for i, u in enumerate(dataset.uris) if u in seen], dtype=np.int64)


def score_splits(
    predictor: Any, dataset: Any, rows_by_split: dict[str, np.ndarray], *, batch_size: int = 64
) -> Any:
    """:class:`~stage1_pro.scores.Scores` of ``predictor`` on the given dataset rows of each split."""
    from stage1_pro.scores import Scores

    rows = np.concatenate([np.asarray(rows_by_split[s], dtype=np.int64) for s in RESCORED_SPLITS])
    names = np.concatenate([np.full(len(rows_by_split[s]), s) for s in RESCORED_SPLITS])
    uris = [dataset.uris[i] for i in rows.tolist()]
    probs = np.empty((len(uris), 2), dtype=np.float64)
    gate = np.empty(len(uris), dtype=np.float64)
    has_gate = True
    for start in range(0, len(uris), PROGRESS_EVERY):
        chunk = predictor.predict(uris[start : start + PROGRESS_EVERY], batch_size=batch_size)
        for i, p in enumerate(chunk, start=start):
            probs[i] = p.probs
            has_gate = has_gate and p.gate_logit is not None
            gate[i] = np.nan if p.gate_logit is None else p.gate_logit
        log.info("champion scored %d / %d images", min(start + PROGRESS_EVERY, len(uris)), len(uris))
    return Scores(
        index=rows,
        split=names,
        label=dataset.labels[rows],
        probs=probs,
        gate_logit=gate if has_gate else None,
        source=f"champion {predictor.version} on this run's images",
    )


def recertify(
    policy_file: dict[str, Any],
    scores: Any,
    *,
    target_fnr_exit: float,
    delta: float,
    max_fpr_exit: float = DEFAULT_MAX_FPR_EXIT,
) -> Any:
    """The champion's policy (kind and settings from its file) fitted and certified on ``scores``.

    The grid and anything learned come from ``scores``' val_select, the certificate from its
    val_calib, at ``target_fnr_exit``, ``max_fpr_exit`` and ``delta``: exactly what calibrating
    the challenger did (a champion whose file predates the guard is certified with it here).
    """
    from stage1_pro.policies import InfeasibleCertificateWarning, create_policy, policy_from_dict

    params = policy_from_dict(policy_file).get_params()
    params.update(target_fnr_exit=target_fnr_exit, delta=delta)
    if "max_fpr_exit" in params:  # a plugin policy may not take the guard
        params["max_fpr_exit"] = max_fpr_exit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InfeasibleCertificateWarning)
        policy = create_policy(policy_file["policy"], **params).fit(scores)
    for w in caught:
        if issubclass(w.category, InfeasibleCertificateWarning):
            log.warning("champion on this run's data: %s", w.message)
    return policy
