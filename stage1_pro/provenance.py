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
