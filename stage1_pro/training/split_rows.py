"""A run's data: the prepared shards (prepared once into the run directory when needed) and each split's rows.

``train --data`` prepares the dataset into ``RUN_DIR/prepared`` (reused on resume and by later
runs into the same folder when it was prepared for the same images, splits and pixel spec);
``train --prepared`` reads an existing ``stage1-pro prepare`` output. Either way every split of
``splits.json`` is mapped to its prepared rows, and images that failed to decode at prepare time
are counted and left out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_pro import storage
from stage1_pro.errors import DataError
from stage1_pro.preprocessing import PixelSpec
from stage1_pro.training.distributed import DistInfo, barrier

if TYPE_CHECKING:
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.prepare import PreparedData

_LOG = logging.getLogger("stage1_pro.training")

#: Folder of the run directory that ``train --data`` prepares into.
PREPARED_DIR = "prepared"


@dataclass(kw_only=True)
class SplitRows:
    """The prepared rows of each split, their dataset indices and labels.

    Attributes:
        rows: split name -> rows of the prepared shards.
        index: split name -> dataset indices (what ``scores.npz`` records).
        label: split name -> int64 labels.
        n_missing: split name -> images of the split that failed to decode at prepare time.
    """

    rows: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    label: dict[str, np.ndarray]
    n_missing: dict[str, int] = field(default_factory=dict)


def _prepared_matches(uri: str, splits: dict[str, Any], spec: PixelSpec) -> bool:
    """True when ``uri`` holds a prepare output of these splits' images made with ``spec``."""
    from stage1_pro.errors import ArtifactError
    from stage1_pro.prepare import INDEX_FILE, open_prepared, splits_sha256

    if not storage.exists(storage.join(uri, INDEX_FILE)):
        return False
    try:
        data = open_prepared(uri)
        made_with = data.pixel_spec
    except ArtifactError:
        return False
    return (
        made_with == spec
        and data.info["dataset"]["fingerprint"] == splits["dataset"]["fingerprint"]
        and data.info["splits"]["sha256"] == splits_sha256(splits)
    )


def _local_prepared_dir(out_dir: str) -> str:
    """Where ``train --data`` prepares: in the run directory, or a local cache for a ``gs://`` run."""
    if not storage.is_gcs(out_dir):
        return storage.join(out_dir, PREPARED_DIR)
    key = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "stage1-pro-prepared", key)


def open_data(
    config: Stage1ProConfig,
    *,
    splits: dict[str, Any],
    splits_uri: str,
    data_uri: str | None,
    prepared_uri: str | None,
    out_dir: str,
    dist: DistInfo,
) -> tuple[PreparedData, SplitRows]:
    """Open (preparing first if needed) the shards for this run and map every split to its rows.

    Args:
        config: the run's settings (its pixel spec: ``img_size`` and the resize modes;
            ``num_workers`` for preparing).
        splits: the loaded ``splits.json``.
        splits_uri: where it was read from (named in errors).
        data_uri: a manifest or image folder to prepare, or None.
        prepared_uri: an existing prepare output, or None (exactly one of the two is set).
        out_dir: the run directory (``train --data`` prepares into it).
        dist: data-parallel position (rank 0 prepares, the others wait).

    Returns:
        The opened prepared data and the rows of every split.

    Raises:
        ConfigError: the prepared images were made with another pixel spec than the config's.
        DataError: the prepared data belongs to other splits, or a split has no image left.
    """
    from stage1_pro.prepare import open_prepared, prepare_dataset, splits_sha256
    from stage1_pro.splits import SPLIT_NAMES

    spec = PixelSpec.from_config(config)
    if prepared_uri is None:
        prepared_uri = _local_prepared_dir(out_dir)
        if dist.is_main and not _prepared_matches(prepared_uri, splits, spec):
            prepare_dataset(data_uri, splits_uri, prepared_uri, spec, workers=max(1, config.num_workers))
        barrier(dist)
    data = open_prepared(prepared_uri)
    data.check_matches(splits, prepared_uri)
    data.check_spec(spec, prepared_uri)  # the pixels trained and scored are the pixels served
    if data.info["splits"]["sha256"] != splits_sha256(splits):
        raise DataError(
            f"{prepared_uri} was prepared for other splits than {splits_uri}; "
            "re-run `stage1-pro prepare` with them"
        )
    rows, index, label, missing = {}, {}, {}, {}
    for name in SPLIT_NAMES:
        found, lost = data.rows_for(splits["indices"][name])
        rows[name], index[name], label[name] = found, data.index[found], data.label[found].astype(np.int64)
        missing[name] = int(lost.size)
        if lost.size:
            _LOG.warning(
                "%s: %d image(s) of split %s failed to decode at prepare time and are left out",
                prepared_uri,
                lost.size,
                name,
            )
        if not found.size:
            raise DataError(
                f"{prepared_uri}: split {name!r} has no images; check the splits and the prepare log"
            )
    return data, SplitRows(rows=rows, index=index, label=label, n_missing=missing)
