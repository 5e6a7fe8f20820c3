"""Decode every image once into training-resolution shards (``stage1-pro prepare``).

A 12-megapixel street JPEG decodes at ~5 img/s per CPU core (11 with draft decoding) while a
GPU trains a ViT-S/14 at thousands of img/s: decoding per epoch would starve the GPU. So the
images of every split are decoded once, in parallel worker processes, brought to the training
resolution by :func:`stage1_pro.preprocessing.load_pixels` under a
:class:`~stage1_pro.preprocessing.PixelSpec` (the same function, under the same spec recorded in
``model.json``, gives inference its pixels) and stored as raw ``uint8`` shards that training
memory-maps.

Layout of ``PREPARED/`` (local folder or ``gs://`` prefix)::

    shard-00000.npy ...  uint8 (n, img_size, img_size, 3), NHWC RGB; ~256 MB each
    rows.npz             per prepared row: index (dataset row), label, split (code), shard, offset
    index.json           artifact "prepared", written last: img_size and preprocessing (the
                         pixel spec), dataset fingerprint, split hash, counts per split, and
                         every image that failed to decode (by name)

Images that fail to decode are left out, named in ``index.json`` and counted (``n_failed``);
training on such a folder simply has fewer rows. Raw shards take ``img_size^2 * 3`` bytes per
image (12 kB at 64 px, 150 kB at 224 px).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage1_pro import storage
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.preprocessing import PixelSpec

_LOG = logging.getLogger(__name__)

INDEX_FILE = "index.json"
ROWS_FILE = "rows.npz"
LAYOUT = "NHWC-uint8-RGB"
DEFAULT_SHARD_BYTES = 256 * 2**20
_FAILED_LISTED = 1000  # names kept in index.json; n_failed counts all


def splits_sha256(splits: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a splits object's indices (what the shards were made for)."""
    from stage1_pro.splits import SPLIT_NAMES

    payload = json.dumps({k: [int(i) for i in splits["indices"][k]] for k in SPLIT_NAMES}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _decode(task: tuple[int, str, PixelSpec]) -> tuple[int, np.ndarray | None, str | None]:
    from stage1_pro.preprocessing import load_pixels

    row, uri, spec = task
    try:
        return row, load_pixels(uri, spec), None
    except DataError as exc:
        return row, None, str(exc)


def _decoded(
    tasks: list[tuple[int, str, PixelSpec]], workers: int
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    if workers <= 1:
        yield from map(_decode, tasks)
        return
    # Never plain fork: the caller may hold threads (torch's OpenMP pool, the GCS client's HTTP
    # threads) and a forked child can deadlock on a lock one of them held (seen in CI).
    ctx = multiprocessing.get_context(
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_decode, tasks, chunksize=chunk)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def prepare_dataset(
    data_uri: str,
    splits_uri: str,
    out_uri: str,
    spec: PixelSpec | int,
    workers: int | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Decode the images of every split once and write training-resolution shards + index.

    Args:
        data_uri: manifest or image-folder tree (local or ``gs://``).
        splits_uri: the ``splits.json`` made for that dataset (fingerprint checked).
        out_uri: output folder or ``gs://`` prefix.
        spec: how images become pixels (``PixelSpec.from_config(config)``); an integer means
            that many pixels with the default modes.
        workers: decoding processes (default: all CPU cores).
        shard_bytes: target size of one shard file.

    Returns:
        The written ``index.json`` object.

    Raises:
        ConfigError: an invalid spec (size below 1, unknown mode).
        DataError: dataset/splits mismatch, or no image could be decoded.
    """
    from stage1_pro.artifacts import write_artifact
    from stage1_pro.data import load_dataset
    from stage1_pro.preprocessing import RECORD_KEY
    from stage1_pro.splits import SPLIT_NAMES, load_splits

    if not isinstance(spec, PixelSpec):
        spec = PixelSpec(spec)
    img_size = spec.size
    start = time.perf_counter()
    dataset = load_dataset(data_uri)
    splits = load_splits(splits_uri, dataset)
    split_of = np.full(len(dataset), -1, dtype=np.int16)
    for code, name in enumerate(SPLIT_NAMES):
        split_of[np.asarray(splits["indices"][name], dtype=np.int64)] = code
    rows = np.flatnonzero(split_of >= 0)
    workers = max(1, workers or os.cpu_count() or 1)
    per_image = img_size * img_size * 3
    shard_rows = max(1, shard_bytes // per_image)
    _LOG.info("preparing %d images (%s), %d worker(s) -> %s", rows.size, spec.describe(), workers, out_uri)

    shards: list[dict[str, Any]] = []
    kept_rows: list[int] = []
    kept_shard: list[int] = []
    kept_offset: list[int] = []
    failed: list[dict[str, Any]] = []
    n_failed = 0
    buffer: list[np.ndarray] = []

    def flush() -> None:
        if not buffer:
            return
        name = f"shard-{len(shards):05d}.npy"
        data = _npy_bytes(np.stack(buffer))
        storage.write_bytes(storage.join(out_uri, name), data)
        shards.append({"file": name, "n": len(buffer), "bytes": len(data)})
        buffer.clear()

    tasks = [(int(r), dataset.uris[r], spec) for r in rows]
    for row, array, error in _decoded(tasks, workers):
        if array is None:
            n_failed += 1
            _LOG.warning("left out: %s", error)
            if len(failed) < _FAILED_LISTED:
                failed.append(
                    {
                        "index": row,
                        "uri": dataset.uris[row],
                        "split": SPLIT_NAMES[split_of[row]],
                        "error": error,
                    }
                )
            continue
        kept_rows.append(row)
        kept_shard.append(len(shards))
        kept_offset.append(len(buffer))
        buffer.append(array)
        if len(buffer) >= shard_rows:
            flush()
    flush()
    if not kept_rows:
        raise DataError(f"{data_uri}: none of the {rows.size} images could be decoded (first: {failed[:1]})")

    index = np.asarray(kept_rows, dtype=np.int64)
    table = {
        "index": index,
        "label": dataset.labels[index].astype(np.int8),
        "split": split_of[index].astype(np.int8),
        "shard": np.asarray(kept_shard, dtype=np.int32),
        "offset": np.asarray(kept_offset, dtype=np.int32),
    }
    buf = io.BytesIO()
    np.savez(buf, **table)
    storage.write_bytes(storage.join(out_uri, ROWS_FILE), buf.getvalue())
    counts = {name: int((table["split"] == code).sum()) for code, name in enumerate(SPLIT_NAMES)}
    obj = {
        "img_size": int(img_size),
        "layout": LAYOUT,
        RECORD_KEY: spec.record(),
        "dataset": {"fingerprint": dataset.fingerprint, "n": len(dataset), "source": dataset.source},
        "splits": {"sha256": splits_sha256(splits), "seed": int(splits["seed"])},
        "shards": shards,
        "rows_file": ROWS_FILE,
        "counts": counts,
        "n_failed": n_failed,
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 3),
        "workers": workers,
    }
    written = write_artifact(storage.join(out_uri, INDEX_FILE), "prepared", obj)
    _LOG.info("prepared %d images (%d failed) in %.1f s", len(kept_rows), n_failed, obj["seconds"])
    return written


# ------------------------------------------------------------------------------------------
# reading


def _cache_root() -> Path:
    return Path(os.environ.get("STAGE1_PRO_CACHE", Path.home() / ".cache" / "stage1-pro"))


@dataclass
class PreparedData:
    """A prepared folder opened for reading: per-row metadata in memory, pixels memory-mapped.

    Attributes:
        root: local folder holding the shards (a cache copy for ``gs://``).
        info: the validated ``index.json`` object.
        index, label, split, shard, offset: per-row arrays (``split`` as codes into
            :data:`stage1_pro.splits.SPLIT_NAMES`).
    """

    root: Path
    info: dict[str, Any]
    index: np.ndarray
    label: np.ndarray
    split: np.ndarray
    shard: np.ndarray
    offset: np.ndarray

    @property
    def img_size(self) -> int:
        return int(self.info["img_size"])

    @property
    def pixel_spec(self) -> PixelSpec:
        """How these shards' pixels were made (pre-spec folders: the default modes they used)."""
        from stage1_pro.preprocessing import RECORD_KEY

        return PixelSpec.from_record(self.img_size, self.info.get(RECORD_KEY), f"{self.root}/{INDEX_FILE}")

    def check_spec(self, spec: PixelSpec, source: str) -> None:
        """Raise :class:`ConfigError` unless these shards were made with ``spec`` (what training expects).

        The message names each differing setting and both ways out (train with the shards'
        settings, or prepare again with the config's).
        """
        diff = self.pixel_spec.differences(spec)
        if diff:

            def flags(i: int) -> str:
                return " ".join(f"--{name.replace('_', '-')} {values[i]}" for name, values in diff.items())

            raise ConfigError(
                f"{source} was prepared with {', '.join(f'{k}={v[0]}' for k, v in diff.items())} but the "
                f"config has {', '.join(f'{k}={v[1]}' for k, v in diff.items())}; train with {flags(0)}, "
                f"or re-run `stage1-pro prepare` with {flags(1)}"
            )

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.root / s["file"]) for s in self.info["shards"]]

    def rows_for(self, dataset_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Prepared row numbers of the given dataset rows; also the dataset rows that are missing."""
        where = {int(r): i for i, r in enumerate(self.index.tolist())}
        wanted = np.asarray(dataset_indices, dtype=np.int64)
        found = np.array([where.get(int(r), -1) for r in wanted], dtype=np.int64)
        return found[found >= 0], wanted[found < 0]

    def check_matches(self, splits: dict[str, Any], source: str) -> None:
        """Raise :class:`DataError` unless these shards were prepared from ``splits``' dataset."""
        fp = splits["dataset"]["fingerprint"]
        if fp != self.info["dataset"]["fingerprint"]:
            raise DataError(
                f"{source}: prepared from dataset {self.info['dataset']['fingerprint'][:12]}… "
                "but the splits are for "
                f"{fp[:12]}…; re-run `stage1-pro prepare` with these splits"
            )


def open_prepared(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> PreparedData:
    """Open a prepared folder (local, or ``gs://`` copied once into a local cache) for reading.

    Raises:
        ArtifactError: missing/invalid ``index.json``, or a shard missing or of the wrong size.
    """
    from stage1_pro.artifacts import read_artifact

    info = read_artifact(storage.join(uri, INDEX_FILE), "prepared")
    if storage.is_gcs(uri):
        key = hashlib.sha256((uri + json.dumps(info, sort_keys=True)).encode()).hexdigest()[:16]
        root = Path(cache_dir or _cache_root() / "prepared") / key
        for name in [s["file"] for s in info["shards"]] + [info["rows_file"]]:
            local = root / name
            if not local.exists():
                _LOG.info("downloading %s", storage.join(uri, name))
                storage.copy_file(storage.join(uri, name), str(local))
    else:
        root = Path(uri)
    for shard in info["shards"]:
        path = root / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise ArtifactError(
                f"{storage.join(uri, shard['file'])}: shard missing or truncated "
                f"(expected {shard['bytes']} bytes); "
                "re-run `stage1-pro prepare`"
            )
    with np.load(root / info["rows_file"], allow_pickle=False) as table:
        arrays = {k: table[k] for k in ("index", "label", "split", "shard", "offset")}
    return PreparedData(root=root, info=info, **arrays)
