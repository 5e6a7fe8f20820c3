"""Datasets: a manifest (CSV/JSONL) or an image-folder tree, local or ``gs://``.

Two input formats, both binary (label 1 = positive class, 0 = negative):

* **Manifest** ``*.csv`` with the header ``uri,label[,group]``, or ``*.jsonl`` / ``*.ndjson`` with one
  object per line holding the same keys. Relative ``uri`` values are resolved against the
  manifest's folder (local or ``gs://``); absolute paths and ``gs://`` URIs are used as written.
  ``group`` (a capture sequence, route or session) keeps near-duplicate images in one split.
  Other columns/keys (e.g. the demo's ``digit``) are ignored, so a manifest may carry metadata.
* **Image-folder tree**: a folder (or ``gs://`` prefix) with the subfolders ``0/`` (negatives) and
  ``1/`` (positives) only; images may sit in nested folders below them; files at the top level
  (a README, a manifest) are ignored; hidden files and folders (``.name``) are skipped.

The **fingerprint** (:attr:`Dataset.fingerprint`) is the sha256 of the canonical manifest content:
a version line, then one JSON line ``[uri, label, group]`` per row **in manifest order** (order
matters: split indices refer to rows). ``uri`` is the value as written in the manifest (for a
folder tree: the path relative to the root, rows sorted by path), so the same manifest gives the
same fingerprint in CSV or JSONL, locally or copied to ``gs://``. Image bytes are not hashed:
replacing an image in place under the same name keeps the fingerprint (rename it instead).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_pro import storage
from stage1_pro.errors import DataError, StorageError

if TYPE_CHECKING:
    from collections.abc import Sequence

MANIFEST_COLUMNS: tuple[str, ...] = ("uri", "label", "group")
REQUIRED_COLUMNS: tuple[str, ...] = ("uri", "label")
CSV_SUFFIXES: tuple[str, ...] = (".csv",)
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CLASS_FOLDERS: tuple[str, ...] = ("0", "1")
_FINGERPRINT_HEADER = "stage1-pro-manifest-v1\n"
_MAX_LISTED = 5  # how many offending rows an error message lists


@dataclass(eq=False)
class Dataset:
    """An ordered list of labelled images; row ``i`` is what split indices call ``i``.

    Attributes:
        uris: absolute local paths or ``gs://`` URIs, one per row.
        labels: ``int64`` array of 0/1, one per row.
        groups: group name per row, or ``None`` when the source has no groups.
        source: where the dataset was read from (absolute local path or ``gs://`` URI).
        keys: each row's ``uri`` as written in the manifest (relative to the dataset root where
            it was relative); what the fingerprint hashes.
        fingerprint: sha256 hex of the canonical manifest content (see the module docstring).
    """

    uris: list[str]
    labels: np.ndarray
    groups: list[str] | None
    source: str
    keys: list[str]
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.uris)
        if not (len(self.labels) == len(self.keys) == n) or (
            self.groups is not None and len(self.groups) != n
        ):
            raise ValueError("uris, labels, keys and groups must have one entry per row")
        self.fingerprint = manifest_fingerprint(self.keys, self.labels, self.groups)

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def n_positive(self) -> int:
        """Number of rows with label 1."""
        return int(self.labels.sum())

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """Return the rows ``indices`` (in that order) as a new dataset with its own fingerprint."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"subset indices must be in [0, {len(self)}); got min {idx.min()}, max {idx.max()}"
            )
        rows = idx.tolist()
        return Dataset(
            uris=[self.uris[i] for i in rows],
            labels=self.labels[idx],
            groups=None if self.groups is None else [self.groups[i] for i in rows],
            source=self.source,
            keys=[self.keys[i] for i in rows],
        )


def manifest_fingerprint(
    keys: Sequence[str], labels: Sequence[int] | np.ndarray, groups: Sequence[str] | None
) -> str:
    """sha256 hex of the canonical manifest content (version line + one JSON row per line, in order)."""
    digest = hashlib.sha256(_FINGERPRINT_HEADER.encode())
    for i, (key, label) in enumerate(zip(keys, np.asarray(labels).tolist(), strict=True)):
        row = [key, int(label), None if groups is None else groups[i]]
        digest.update((json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# loading


def load_dataset(uri: str | os.PathLike[str], check_files: bool = True) -> Dataset:
    """Load a manifest (CSV/JSONL) or an image-folder tree (``0/``, ``1/``), local or ``gs://``.

    Args:
        uri: manifest file, folder or ``gs://`` URI/prefix. A ``gs://`` URI ending in a manifest
            suffix is a manifest, any other ``gs://`` URI is an image-folder prefix.
        check_files: verify that every image a manifest names exists (local: one ``stat`` per
            file; ``gs://``: one listing per distinct parent folder, not one request per file).
            Images are not decoded here; :func:`stage1_pro.preprocessing.decode_image`
            reports undecodable files.

    Raises:
        DataError: naming the file and line (or image path) and the fix, for labels other
            than 0/1, missing columns, duplicate or empty URIs, missing images, an empty
            manifest, a folder tree with other subfolders than ``0/`` and ``1/`` or non-image
            files, or a path that does not exist.
    """
    uri = str(uri)
    lowered = uri.lower()
    if storage.is_gcs(uri):
        if lowered.endswith(CSV_SUFFIXES + JSONL_SUFFIXES):
            return _load_manifest(uri, check_files)
        return _load_folder(uri)
    path = Path(uri)
    if path.is_dir():
        return _load_folder(os.path.abspath(uri))
    if not path.exists():
        raise DataError(
            f"{uri}: no such file or folder; pass a manifest (.csv/.jsonl with uri,label[,group]) or a "
            "folder with 0/ and 1/ subfolders"
        )
    if not lowered.endswith(CSV_SUFFIXES + JSONL_SUFFIXES):
        raise DataError(
            f"{uri}: unsupported dataset file; a manifest must end in "
            f"{', '.join(CSV_SUFFIXES + JSONL_SUFFIXES)} (or pass a folder with 0/ and 1/ subfolders)"
        )
    return _load_manifest(os.path.abspath(uri), check_files)


@dataclass
class _Row:
    line: int
    key: str
    label: Any
    group: Any = None


def _load_manifest(source: str, check_files: bool) -> Dataset:
    rows, has_group = _read_manifest(source, REQUIRED_COLUMNS)
    uris, keys = _resolve_rows(source, rows)
    labels = np.empty(len(rows), dtype=np.int64)
    groups: list[str] | None = [] if has_group else None
    for i, row in enumerate(rows):
        where = f"{source}: line {row.line}"
        labels[i] = _parse_label(row.label, where)
        if groups is not None:
            groups.append(_parse_group(row.group, where))
    if check_files:
        _check_files_exist(source, uris, [r.line for r in rows])
    return Dataset(uris=uris, labels=labels, groups=groups, source=source, keys=keys)


def _read_manifest(source: str, required: tuple[str, ...]) -> tuple[list[_Row], bool]:
    """The manifest's rows (and whether it has a group column); ``required`` columns must be there."""
    try:
        text = storage.read_text(source)
    except StorageError as exc:
        raise DataError(str(exc)) from exc
    text = text.removeprefix("\ufeff")  # spreadsheet exports often start with a BOM
    parse = _parse_jsonl if source.lower().endswith(JSONL_SUFFIXES) else _parse_csv
    rows, has_group = parse(text, source, required)
    if not rows:
        raise DataError(
            f"{source}: the manifest has no rows; add one line per image ({_columns_help(required)})"
        )
    return rows, has_group


def _resolve_rows(source: str, rows: list[_Row]) -> tuple[list[str], list[str]]:
    """(resolved URIs, URIs as written) of the rows; a repeated image is an error."""
    root = _parent(source)
    uris: list[str] = []
    keys: list[str] = []
    first_line: dict[str, int] = {}
    for row in rows:
        where = f"{source}: line {row.line}"
        key = _clean_uri(row.key, where)
        resolved = _resolve(root, key, where)
        if resolved in first_line:
            raise DataError(
                f"{where}: duplicate uri {key!r} (same image as line {first_line[resolved]}); "
                "each image must appear once: remove the repeated row"
            )
        first_line[resolved] = row.line
        uris.append(resolved)
        keys.append(key)
    return uris, keys


def _columns_help(required: tuple[str, ...]) -> str:
    return "uri,label[,group]" if "label" in required else "uri[,label][,group]"


def _parse_csv(text: str, source: str, required: tuple[str, ...]) -> tuple[list[_Row], bool]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return [], False
    except csv.Error as exc:
        raise DataError(f"{source}: line 1: not valid CSV ({exc})") from exc
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{source}: line 1: missing column(s) {', '.join(missing)}; the header must be "
            f"{_columns_help(required)} (found: {','.join(header) or 'an empty line'})"
        )
    duplicated = sorted({h for h in header if header.count(h) > 1 and h in MANIFEST_COLUMNS})
    if duplicated:
        raise DataError(
            f"{source}: line 1: column(s) {', '.join(duplicated)} appear more than once in the header"
        )
    col = {name: header.index(name) for name in MANIFEST_COLUMNS if name in header}
    rows: list[_Row] = []
    try:
        for values in reader:
            if not values or all(not v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                raise DataError(
                    f"{source}: line {reader.line_num}: {len(values)} field(s) but the header has "
                    f"{len(header)} ({','.join(header)}); quote values that contain commas"
                )
            rows.append(
                _Row(
                    line=reader.line_num,
                    key=values[col["uri"]],
                    label=values[col["label"]] if "label" in col else None,
                    group=values[col["group"]] if "group" in col else None,
                )
            )
    except csv.Error as exc:
        raise DataError(f"{source}: line {reader.line_num}: not valid CSV ({exc})") from exc
    return rows, "group" in col


def _parse_jsonl(text: str, source: str, required: tuple[str, ...]) -> tuple[list[_Row], bool]:
    rows: list[_Row] = []
    first_group_line: int | None = None
    first_plain_line: int | None = None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}: line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be one object") from exc
        if not isinstance(obj, dict):
            raise DataError(
                f'{where}: expected a JSON object like {{"uri": ..., "label": 0}}, got {type(obj).__name__}'
            )
        missing = [c for c in required if c not in obj]
        if missing:
            raise DataError(
                f"{where}: missing key(s) {', '.join(missing)}; "
                f"each line needs {' and '.join(required)} (group optional)"
            )
        if "group" in obj:
            first_group_line = first_group_line or line_no
        else:
            first_plain_line = first_plain_line or line_no
        rows.append(_Row(line=line_no, key=obj["uri"], label=obj.get("label"), group=obj.get("group")))
    if first_group_line is not None and first_plain_line is not None:
        raise DataError(
            f"{source}: line {first_plain_line}: no 'group' key, but line {first_group_line} has one; "
            "give every line a group or none"
        )
    return rows, first_group_line is not None


def _clean_uri(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(
            f"{where}: uri is empty or not a string ({raw!r}); give the image's path or gs:// URI"
        )
    value = raw.strip()
    if storage.is_gcs(value) or posixpath.isabs(value):
        return value
    return posixpath.normpath(value.replace("\\", "/"))


def _parent(uri: str) -> str:
    if storage.is_gcs(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def _resolve(root: str, key: str, where: str) -> str:
    if storage.is_gcs(key):
        storage.split_gcs(key)  # rejects gs:// without a bucket
        return key
    if storage.is_gcs(root):
        if posixpath.isabs(key):
            raise DataError(
                f"{where}: local absolute path {key!r} in a gs:// manifest; use gs:// URIs or relative paths"
            )
        bucket, prefix = storage.split_gcs(root)
        name = posixpath.normpath(posixpath.join(prefix, key)) if prefix else posixpath.normpath(key)
        if name == ".." or name.startswith("../"):
            raise DataError(f"{where}: uri {key!r} points outside the bucket gs://{bucket}")
        return f"{storage.GCS_SCHEME}{bucket}/{name}"
    return os.path.normpath(os.path.join(root, key))


def _parse_label(raw: Any, where: str) -> int:
    if isinstance(raw, bool):
        value = None  # JSON true/false: ambiguous, refuse
    elif isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.strip() in ("0", "1"):
        value = int(raw.strip())
    else:
        value = None
    if value not in (0, 1):
        raise DataError(
            f"{where}: label {raw!r} is not 0 or 1; stage1-pro trains a binary classifier "
            "(1 = positive class, 0 = negative): map your classes to 0/1"
        )
    return int(value)


def _parse_group(raw: Any, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int) or not str(raw).strip():
        raise DataError(
            f"{where}: group is empty or not a string/integer ({raw!r}); give every row a group "
            "(e.g. its capture sequence) or drop the group column"
        )
    return str(raw).strip()


def _check_files_exist(source: str, uris: list[str], lines: list[int]) -> None:
    missing: list[int] = []  # row positions
    by_parent: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(uris):
        if storage.is_gcs(uri):
            by_parent[uri.rsplit("/", 1)[0]].append(i)
        elif not (os.path.isfile(uri) and os.access(uri, os.R_OK)):
            missing.append(i)
    for parent, rows in by_parent.items():
        try:
            present = set(storage.list_files(parent, recursive=False))
        except StorageError as exc:
            raise DataError(f"{source}: cannot list {parent}/ to check the images: {exc}") from exc
        missing.extend(i for i in rows if uris[i] not in present)
    if missing:
        missing.sort()
        shown = "; ".join(f"line {lines[i]}: {uris[i]}" for i in missing[:_MAX_LISTED])
        more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{source}: line {lines[missing[0]]}: image file not found or unreadable: {uris[missing[0]]}; "
            f"{len(missing)} of {len(uris)} image(s) missing: {shown}{more}. Fix the paths (relative "
            "paths are resolved against the manifest's folder) or remove the rows"
        )


def _visible_files(root: str) -> list[tuple[str, str]]:
    """``(URI, path below root with / separators)`` of every file under ``root``, hidden entries skipped.

    Raises:
        DataError: ``root`` cannot be listed.
    """
    try:
        files = list(storage.list_files(root))
    except StorageError as exc:
        raise DataError(str(exc)) from exc
    sep = "/" if storage.is_gcs(root) else os.sep
    out = []
    for uri in files:
        rel = uri[len(root) :].lstrip(sep).replace(os.sep, "/")
        if not any(p.startswith(".") for p in rel.split("/")):
            out.append((uri, rel))
    return out


def _load_folder(root: str) -> Dataset:
    root = root.rstrip("/") if storage.is_gcs(root) else root
    by_class: dict[str, list[str]] = {c: [] for c in CLASS_FOLDERS}
    for uri, rel in _visible_files(root):
        parts = rel.split("/")
        if len(parts) == 1:
            continue  # top-level files (README, manifest) are not images
        if parts[0] not in CLASS_FOLDERS:
            raise DataError(
                f"{root}: unexpected folder {parts[0]!r} ({uri}); an image-folder dataset holds only "
                "0/ (negatives) and 1/ (positives): move or remove it, or write a manifest"
            )
        if not rel.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(
                f"{uri}: not an image file (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); "
                "remove it from the class folder"
            )
        by_class[parts[0]].append(rel)
    rels = sorted(by_class["0"] + by_class["1"])
    if not rels:
        raise DataError(
            f"{root}: no images found; an image-folder dataset needs images in 0/ (negatives) and/or "
            f"1/ (positives) with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    uris = [
        storage.join(root, r) if storage.is_gcs(root) else os.path.join(root, *r.split("/")) for r in rels
    ]
    labels = np.array([int(r.split("/", 1)[0]) for r in rels], dtype=np.int64)
    return Dataset(uris=uris, labels=labels, groups=None, source=root, keys=rels)


def load_image_uris(uri: str | os.PathLike[str], check_files: bool = True) -> list[str]:
    """The images of an unlabelled dataset: a manifest (labels optional, ignored) or any image folder.

    Args:
        uri: a manifest (``.csv`` with a ``uri`` column, or ``.jsonl``; ``label``/``group`` may be
            there and are ignored), or a folder / ``gs://`` prefix whose image files (any depth,
            extensions :data:`IMAGE_EXTENSIONS`; hidden entries and other files skipped) are taken,
            sorted by path. A labelled ``0/``, ``1/`` tree is such a folder too.
        check_files: verify that every image a manifest names exists.

    Returns:
        Absolute local paths or ``gs://`` URIs, in manifest order (folders: sorted).

    Raises:
        DataError: a missing path, a manifest without a ``uri`` column or with missing images,
            or no image at all (naming the file and the fix).
    """
    uri = str(uri)
    is_manifest = uri.lower().endswith(CSV_SUFFIXES + JSONL_SUFFIXES)
    is_folder = not is_manifest
    if not storage.is_gcs(uri):
        path = Path(uri)
        if not path.exists():
            raise DataError(
                f"{uri}: no such file or folder; pass a manifest (.csv/.jsonl with a uri column) or a "
                "folder of images"
            )
        is_folder = path.is_dir()
        if not is_folder and not is_manifest:
            raise DataError(
                f"{uri}: unsupported dataset file; a manifest must end in "
                f"{', '.join(CSV_SUFFIXES + JSONL_SUFFIXES)} (or pass a folder of images)"
            )
        uri = os.path.abspath(uri)
    if not is_folder:
        rows, _ = _read_manifest(uri, ("uri",))
        uris, _ = _resolve_rows(uri, rows)
        if check_files:
            _check_files_exist(uri, uris, [r.line for r in rows])
        return uris
    root = uri.rstrip("/") if storage.is_gcs(uri) else uri
    images = [file for file, rel in _visible_files(root) if rel.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise DataError(
            f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)}); pass a folder of "
            "images or a manifest"
        )
    return images
