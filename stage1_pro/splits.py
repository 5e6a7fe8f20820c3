"""Deterministic, stratified, group-aware split of a dataset into ``train``, ``val_select``,
``val_calib`` and ``test`` (``splits.json``).

What each split is for: ``train`` fits the weights; ``val_select`` picks the checkpoint and fits
anything the exit policy learns (calibrators, gate, testing order); ``val_calib`` is touched
once, by the certified calibration; ``test`` reports what the certificate promised.

Default fractions (:data:`DEFAULT_FRACTIONS`) are 0.5 / 0.15 / 0.2 / 0.15. ``val_calib`` gets
the largest held-out share because the certificate is only as strong as its count of exited
positives: certifying ``FNR_exit <= 0.02`` at ``delta = 0.1`` needs at least 114 exited positives
with zero misses (``0.98**114 <= 0.1``), 211 once the family-wise procedure spends ``delta`` over
~7 tests, and a few hundred to tolerate a handful of misses. On the embedded MNIST-5k task
(odd vs even) that gives 1,000 images and ~500 positives in ``val_calib``.

Algorithm (scikit-learn's ``StratifiedGroupKFold`` idea, for unequal fractions): every group
(without groups, every image) goes whole to one split. Groups are taken in random order
(``numpy.random.default_rng(seed)``), largest first, and each goes to the split that most needs
its classes: the split maximising ``sum_c n_c(group) * deficit_{split,c} / N_c``, where the
deficit is ``fraction * N_c`` minus what the split already holds of class ``c``. Without groups
this puts every split's count of each class within one sample of ``fraction * N_c``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stage1_pro.data import Dataset, load_dataset
from stage1_pro.errors import ConfigError, DataError

#: The four splits, in the order the fractions are given on the command line.
SPLIT_NAMES: tuple[str, ...] = ("train", "val_select", "val_calib", "test")
#: Default split fractions; see the module docstring for why ``val_calib`` gets 0.2.
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.5, "val_select": 0.15, "val_calib": 0.2, "test": 0.15}
FRACTION_TOLERANCE = 1e-6


def parse_fractions(
    fractions: Mapping[str, float] | Sequence[float] | Sequence[str] | None,
) -> dict[str, float]:
    """Normalise split fractions to ``{split: fraction}`` and check them.

    Accepts ``None`` (defaults), a mapping, four numbers in :data:`SPLIT_NAMES` order, or
    strings ``"name=value"`` (all four names).

    Raises:
        ConfigError: unknown or missing split names, negative or non-finite values, or a sum
            that differs from 1 by more than 1e-6.
    """
    if fractions is None:
        return dict(DEFAULT_FRACTIONS)
    if isinstance(fractions, Mapping):
        items = dict(fractions)
    else:
        values = list(fractions)
        if values and all(isinstance(v, str) and "=" in v for v in values):
            items = {}
            for v in values:
                name, _, number = v.partition("=")
                items[name.strip()] = _number(number, name.strip())
        elif len(values) == len(SPLIT_NAMES):
            items = dict(zip(SPLIT_NAMES, values, strict=True))
        else:
            raise ConfigError(
                f"fractions: expected {len(SPLIT_NAMES)} numbers ({' '.join(SPLIT_NAMES)}) or name=value "
                f"pairs, got {values!r}"
            )
    unknown = [k for k in items if k not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(
            f"fractions: unknown split name(s) {', '.join(map(repr, unknown))}; "
            f"splits are {', '.join(SPLIT_NAMES)}"
        )
    missing = [k for k in SPLIT_NAMES if k not in items]
    if missing:
        raise ConfigError(
            f"fractions: missing split(s) {', '.join(missing)}; give all of {', '.join(SPLIT_NAMES)}"
        )
    out = {name: _number(items[name], name) for name in SPLIT_NAMES}
    for name, value in out.items():
        if value < 0:
            raise ConfigError(
                f"fractions: {name}={value} is negative; fractions are shares of the dataset in [0, 1]"
            )
    total = sum(out.values())
    if abs(total - 1.0) > FRACTION_TOLERANCE:
        shown = ", ".join(f"{k}={v:g}" for k, v in out.items())
        raise ConfigError(f"fractions: {shown} sum to {total:.10g}, not 1; adjust them so they add up to 1")
    return out


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"fractions: {name}={value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"fractions: {name}={value!r} is not a finite number")
    return number


def splits_version(fingerprint: str, indices: Mapping[str, Sequence[int]]) -> str:
    """Short content hash (16 hex) of the dataset fingerprint and the split indices."""
    payload = json.dumps(
        {"fingerprint": fingerprint, "indices": {k: list(indices[k]) for k in SPLIT_NAMES}}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_splits(
    dataset: Dataset,
    seed: int = 0,
    fractions: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Split ``dataset`` and return the ``splits.json`` object (unstamped).

    Args:
        dataset: the rows to split (see :func:`stage1_pro.data.load_dataset`).
        seed: non-negative seed of the ``numpy`` generator; same dataset + seed + fractions
            gives the same indices.
        fractions: see :func:`parse_fractions`; default :data:`DEFAULT_FRACTIONS`.

    Raises:
        ConfigError: invalid seed or fractions.
        DataError: a split would be empty or would lack one of the two classes.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed={seed!r}: the split seed must be an integer >= 0")
    fr = parse_fractions(fractions)
    n = len(dataset)
    labels = dataset.labels
    class_total = np.bincount(labels, minlength=2)[:2]

    if dataset.groups is None:
        group_of_row = np.arange(n)
        n_groups = n
    else:
        ids: dict[str, int] = {}
        group_of_row = np.array([ids.setdefault(g, len(ids)) for g in dataset.groups], dtype=np.int64)
        n_groups = len(ids)
    size = np.bincount(group_of_row, minlength=n_groups)
    pos = np.bincount(group_of_row, weights=labels, minlength=n_groups).astype(np.int64)
    counts = np.stack([size - pos, pos], axis=1)  # (groups, 2): negatives, positives

    rng = np.random.default_rng(int(seed))
    order = rng.permutation(n_groups)
    order = order[np.argsort(-size[order], kind="stable")]  # largest groups first, random among ties

    frac = [fr[s] for s in SPLIT_NAMES]
    target = [[f * class_total[c] for c in (0, 1)] for f in frac]
    held = [[0, 0] for _ in SPLIT_NAMES]
    weight = [
        1.0 / max(int(class_total[c]), 1) for c in (0, 1)
    ]  # rare class counts as much as the common one
    split_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order.tolist():
        c0, c1 = int(counts[g, 0]), int(counts[g, 1])
        best, best_score = 0, -math.inf
        for s in range(len(SPLIT_NAMES)):
            score = (
                c0 * (target[s][0] - held[s][0]) * weight[0] + c1 * (target[s][1] - held[s][1]) * weight[1]
            )
            if score > best_score:
                best, best_score = s, score
        held[best][0] += c0
        held[best][1] += c1
        split_of_group[g] = best

    split_of_row = split_of_group[group_of_row]
    indices: dict[str, list[int]] = {}
    balance: dict[str, dict[str, Any]] = {}
    for s, name in enumerate(SPLIT_NAMES):
        rows = np.flatnonzero(split_of_row == s)
        n_pos = int(labels[rows].sum())
        _check_split(dataset, name, fr[name], len(rows), n_pos, n_groups)
        indices[name] = rows.tolist()
        balance[name] = {
            "n": len(rows),
            "n_positive": n_pos,
            "positive_rate": n_pos / len(rows),
            "n_groups": int(np.unique(group_of_row[rows]).size),
        }
    return {
        "seed": int(seed),
        "fractions": fr,
        "group_aware": dataset.groups is not None,
        "dataset": {
            "fingerprint": dataset.fingerprint,
            "n": n,
            "n_positive": int(class_total[1]),
            "source": dataset.source,
        },
        "indices": indices,
        "class_balance": balance,
        "splits_version": splits_version(dataset.fingerprint, indices),
    }


def _check_split(dataset: Dataset, name: str, fraction: float, n: int, n_pos: int, n_groups: int) -> None:
    about = (
        f"{dataset.source} ({len(dataset)} samples: {dataset.n_positive} positive, "
        f"{len(dataset) - dataset.n_positive} negative"
        + (f", {n_groups} groups" if dataset.groups is not None else "")
        + ")"
    )
    if n == 0:
        raise DataError(
            f"split {name!r} would be empty: fraction {fraction:g} of {about} gives it no sample; "
            f"raise its fraction or add data"
        )
    for cls, count, what in ((1, n_pos, "positive"), (0, n - n_pos, "negative")):
        if count == 0:
            raise DataError(
                f"split {name!r} would have no {what} sample (label {cls}): "
                f"it gets {n} of the samples of {about}; "
                f"every split needs both classes: add {what} images or raise the fraction of {name!r}"
            )


def split_dataset(
    data_uri: str | os.PathLike[str],
    out_uri: str | os.PathLike[str],
    seed: int = 0,
    fractions: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """Load a dataset, split it and write ``splits.json`` (validated, atomic); return what was written.

    This is what ``stage1-pro split``, ``stage1_pro/scripts/00_make_splits.py`` and the KFP
    ``split`` component call. Nothing is written when anything fails.
    """
    from stage1_pro.artifacts import write_artifact

    splits = make_splits(load_dataset(data_uri, check_files=check_files), seed=seed, fractions=fractions)
    return write_artifact(out_uri, "splits", splits)


def load_splits(uri: str | os.PathLike[str], dataset: Dataset | None = None) -> dict[str, Any]:
    """Read and validate ``splits.json``; with ``dataset``, also check that it was made for it.

    Raises:
        ArtifactError: not a valid splits artifact.
        DataError: indices overlapping, out of range or not covering the dataset, or (with
            ``dataset``) a different dataset fingerprint.
    """
    from stage1_pro.artifacts import read_artifact

    source = str(uri)
    splits = read_artifact(source, "splits")
    n = splits["dataset"]["n"]
    seen = np.zeros(n, dtype=np.int64)
    for name in SPLIT_NAMES:
        idx = np.asarray(splits["indices"][name], dtype=np.int64)
        if idx.size and idx.max() >= n:
            raise DataError(
                f"{source}: indices.{name} holds row {int(idx.max())} but the dataset has {n} rows"
            )
        np.add.at(seen, idx, 1)
    if (seen != 1).any():
        row = int(np.flatnonzero(seen != 1)[0])
        what = "is in no split" if seen[row] == 0 else "is in more than one split"
        raise DataError(f"{source}: dataset row {row} {what}; splits must be disjoint and cover the dataset")
    if dataset is not None:
        check_splits(splits, dataset, source)
    return splits


def check_splits(splits: Mapping[str, Any], dataset: Dataset, source: str = "splits.json") -> None:
    """Raise :class:`DataError` unless ``splits`` was made for ``dataset`` (same fingerprint and size)."""
    expected = splits["dataset"]["fingerprint"]
    if expected != dataset.fingerprint or splits["dataset"]["n"] != len(dataset):
        raise DataError(
            f"{source}: made for dataset {expected[:12]}… ({splits['dataset']['n']} rows) but "
            f"{dataset.source} is {dataset.fingerprint[:12]}… ({len(dataset)} rows); the data changed: "
            "re-run `stage1-pro split` on it"
        )
