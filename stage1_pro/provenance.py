"""Time stamps and content hashes recorded in artifacts (lineage): the one definition of each."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os

_CHUNK = 1 << 20


def utc_now() -> str:
    """The current UTC time to the second, as artifacts record it: ``2026-11-29T23:24:30Z``."""
    return utc_iso(_dt.datetime.now(_dt.UTC))


def utc_iso(moment: _dt.datetime) -> str:
    """``moment`` in UTC, to the second, with a ``Z`` suffix (RFC 3339, JSON Schema ``date-time``)."""
    return moment.astimezone(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_uri(uri: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file given by local path or ``gs://`` URI."""
    from stage1_pro import storage

    if storage.is_gcs(uri):
        return sha256_bytes(storage.read_bytes(str(uri)))
    return sha256_file(uri)


def content_version(uri: str | os.PathLike[str]) -> str:
    """An identifier of the bytes at ``uri`` that changes whenever they change.

    A GCS object's generation (every upload under the name gets a new one) and CRC32C; a local
    file's sha256. Used as a cache key in place of the URI string, it never lets a cache serve
    results computed from older bytes at the same name.

    Raises:
        StorageError: the file or object does not exist.
    """
    from stage1_pro import storage
    from stage1_pro.errors import StorageError

    uri = str(uri)
    if storage.is_gcs(uri):
        generation, crc32c = storage.object_generation(uri)
        return f"{uri}#generation={generation},crc32c={crc32c}"
    if not os.path.isfile(uri):
        raise StorageError(f"{uri}: file not found")
    return f"{os.path.abspath(uri)}#sha256={sha256_file(uri)}"
