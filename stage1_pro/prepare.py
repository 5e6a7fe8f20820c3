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

Shard ``k`` holds the decodable images among rows ``[k * shard_rows, (k + 1) * shard_rows)`` of
the splits (dataset order), so its content depends on those rows only. That makes a shard the
unit of parallel work: ``prepare_dataset(..., part=i, parts=N)`` decodes the i-th contiguous
block of shards only (one pod of the pipeline's fan-out), and :func:`merge_prepared` copies the
slices' shards side by side and writes the one ``rows.npz`` + ``index.json``: the same files, byte
for byte, as one ``prepare_dataset`` over everything.
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
#: Most images per shard, whatever their size: a shard is also the unit of parallel decoding, so
#: a dataset of a few thousand small images still splits into several.
MAX_SHARD_ROWS = 1024
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
    part: int = 0,
    parts: int = 1,
) -> dict[str, Any]:
    """Decode the images of every split once and write training-resolution shards + index.

    Args:
        data_uri: manifest or image-folder tree (local or ``gs://``).
        splits_uri: the ``splits.json`` made for that dataset (fingerprint checked).
        out_uri: output folder or ``gs://`` prefix.
        spec: how images become pixels (``PixelSpec.from_config(config)``); an integer means
            that many pixels with the default modes.
        workers: decoding processes (default: all CPU cores).
        shard_bytes: target size of one shard file (at most :data:`MAX_SHARD_ROWS` images).
        part: with ``parts`` > 1, which contiguous block of shards this call decodes (0-based).
        parts: how many calls share the shards; their outputs go to :func:`merge_prepared`.

    Returns:
        The written ``index.json`` object.

    Raises:
        ConfigError: an invalid spec (size below 1, unknown mode).
        DataError: dataset/splits mismatch, a bad ``part``, or no image could be decoded.
    """
    from stage1_pro.data import load_dataset
    from stage1_pro.preprocessing import RECORD_KEY
    from stage1_pro.splits import SPLIT_NAMES, load_splits

    if not isinstance(spec, PixelSpec):
        spec = PixelSpec(spec)
    img_size = spec.size
    if not 0 <= part < parts:
        raise DataError(f"part={part} of parts={parts}: need 0 <= part < parts")
    start = time.perf_counter()
    dataset = load_dataset(data_uri)
    splits = load_splits(splits_uri, dataset)
    split_of = np.full(len(dataset), -1, dtype=np.int16)
    for code, name in enumerate(SPLIT_NAMES):
        split_of[np.asarray(splits["indices"][name], dtype=np.int64)] = code
    rows = np.flatnonzero(split_of >= 0)
    workers = max(1, workers or os.cpu_count() or 1)
    per_image = img_size * img_size * 3
    shard_rows = min(MAX_SHARD_ROWS, max(1, shard_bytes // per_image))
    mine = part_shards(-(-rows.size // shard_rows), part, parts)
    rows_todo = rows[mine.start * shard_rows : mine.stop * shard_rows]
    _LOG.info(
        "preparing %d of %d images (shards %d..%d; %s), %d worker(s) -> %s",
        rows_todo.size,
        rows.size,
        mine.start,
        mine.stop - 1,
        spec.describe(),
        workers,
        out_uri,
    )

    shards: list[dict[str, Any]] = []
    kept_rows: list[int] = []
    kept_shard: list[int] = []
    kept_offset: list[int] = []
    failed: list[dict[str, Any]] = []
    n_failed = 0
    buffer: list[np.ndarray] = []

    def flush(number: int) -> None:
        if not buffer:
            return
        name = shard_file_name(number)
        data = _npy_bytes(np.stack(buffer))
        storage.write_bytes(storage.join(out_uri, name), data)
        shards.append({"file": name, "n": len(buffer), "bytes": len(data)})
        buffer.clear()

    tasks = [(int(r), dataset.uris[r], spec) for r in rows_todo]
    current = mine.start
    for position, (row, array, error) in enumerate(_decoded(tasks, workers)):
        number = mine.start + position // shard_rows
        if number != current:
            flush(current)
            current = number
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
    flush(current)
    if not kept_rows and parts == 1:
        raise DataError(f"{data_uri}: none of the {rows.size} images could be decoded (first: {failed[:1]})")

    index = np.asarray(kept_rows, dtype=np.int64)
    table = {
        "index": index,
        "label": dataset.labels[index].astype(np.int8),
        "split": split_of[index].astype(np.int8),
        "shard": np.asarray(kept_shard, dtype=np.int32),
        "offset": np.asarray(kept_offset, dtype=np.int32),
    }
    obj = {
        "img_size": int(img_size),
        "layout": LAYOUT,
        RECORD_KEY: spec.record(),
        "dataset": {"fingerprint": dataset.fingerprint, "n": len(dataset), "source": dataset.source},
        "splits": {"sha256": splits_sha256(splits), "seed": int(splits["seed"])},
        "shards": shards,
        "rows_file": ROWS_FILE,
        "counts": {},
        "n_failed": n_failed,
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 3),
        "workers": workers,
    }
    if parts > 1:
        obj["part"] = {"index": part, "count": parts}
    written = _write_rows_and_index(out_uri, table, obj)
    _LOG.info("prepared %d images (%d failed) in %.1f s", len(kept_rows), n_failed, obj["seconds"])
    return written


def part_shards(n_shards: int, part: int, parts: int) -> range:
    """The contiguous block of shard numbers that slice ``part`` of ``parts`` decodes."""
    return range(n_shards * part // parts, n_shards * (part + 1) // parts)


def shard_file_name(number: int) -> str:
    """File name of shard ``number``: the same whichever slice of a fan-out wrote it."""
    return f"shard-{number:05d}.npy"


def _write_rows_and_index(out_uri: str, table: dict[str, np.ndarray], obj: dict[str, Any]) -> dict[str, Any]:
    """Write ``rows.npz`` then ``index.json`` (last: it marks the folder complete); fill the counts."""
    from stage1_pro.artifacts import write_artifact
    from stage1_pro.splits import SPLIT_NAMES

    buf = io.BytesIO()
    np.savez(buf, **table)
    storage.write_bytes(storage.join(out_uri, ROWS_FILE), buf.getvalue())
    obj["counts"] = {name: int((table["split"] == code).sum()) for code, name in enumerate(SPLIT_NAMES)}
    return write_artifact(storage.join(out_uri, INDEX_FILE), "prepared", obj)


def merge_prepared(part_uris: Sequence[str], out_uri: str) -> dict[str, Any]:
    """Merge the slices of a fanned-out prepare into one prepared folder.

    Copies every slice's shards into ``out_uri`` (server-side on GCS) and writes the combined
    ``rows.npz`` and ``index.json``: the same files one :func:`prepare_dataset` over all shards
    writes (``seconds`` and ``workers`` aside).

    Args:
        part_uris: the slices' output folders, in any order.
        out_uri: output folder or ``gs://`` prefix.

    Returns:
        The written ``index.json`` object.

    Raises:
        ArtifactError: slices of different preparations, a slice missing or given twice.
        DataError: no image of any slice could be decoded.
    """
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.preprocessing import RECORD_KEY

    start = time.perf_counter()
    infos = [(uri, read_artifact(storage.join(uri, INDEX_FILE), "prepared")) for uri in part_uris]
    if not infos:
        raise ArtifactError("merge_prepared: no slices given")
    infos.sort(key=lambda item: item[1].get("part", {}).get("index", 0))
    count = infos[0][1].get("part", {}).get("count", 1)
    found = [info.get("part", {}).get("index", 0) for _, info in infos]
    if found != list(range(count)) or any(info.get("part", {}).get("count", 1) != count for _, info in infos):
        raise ArtifactError(
            f"merge_prepared: expected slices 0..{count - 1} of one fan-out, got {found} "
            f"({', '.join(part_uris)})"
        )
    first = infos[0][1]
    same = ("img_size", "layout", RECORD_KEY, "dataset", "splits")
    for uri, info in infos[1:]:
        differing = [key for key in same if info.get(key) != first.get(key)]
        if differing:
            raise ArtifactError(
                f"{uri}: a slice of another preparation ({', '.join(differing)} differ from "
                f"{infos[0][0]}); prepare every slice from the same dataset, splits and img_size"
            )

    shards: list[dict[str, Any]] = []
    tables: list[dict[str, np.ndarray]] = []
    failed: list[dict[str, Any]] = []
    for uri, info in infos:
        with np.load(
            io.BytesIO(storage.read_bytes(storage.join(uri, info["rows_file"]))), allow_pickle=False
        ) as z:
            table = {k: z[k] for k in ("index", "label", "split", "shard", "offset")}
        table["shard"] = table["shard"] + len(shards)
        tables.append(table)
        for shard in info["shards"]:
            storage.copy_file(storage.join(uri, shard["file"]), storage.join(out_uri, shard["file"]))
            shards.append(shard)
        failed.extend(info["failed"])
    n_failed = sum(int(info["n_failed"]) for _, info in infos)
    merged = {key: np.concatenate([t[key] for t in tables]) for key in tables[0]}
    if merged["index"].size == 0:
        raise DataError(
            f"{first['dataset']['source']}: none of the images could be decoded (first: {failed[:1]})"
        )
    obj = {key: first[key] for key in same if key in first}
    obj.update(
        {
            "shards": shards,
            "rows_file": ROWS_FILE,
            "counts": {},
            "n_failed": n_failed,
            "failed": failed[:_FAILED_LISTED],
            "seconds": round(time.perf_counter() - start, 3),
            "workers": max(int(info["workers"]) for _, info in infos),
        }
    )
    return _write_rows_and_index(out_uri, merged, obj)


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
    if "part" in info:
        part = info["part"]
        raise ArtifactError(
            f"{uri}: slice {part['index']} of {part['count']} of a fanned-out prepare, not a whole prepared "
            "folder; merge the slices first (stage1_pro.prepare.merge_prepared)"
        )
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
