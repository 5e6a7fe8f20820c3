"""Byte-level storage for local paths and ``gs://`` URIs (google-cloud-storage).

Local writes are atomic: data goes to a temporary file in the same folder, then ``os.replace``
moves it into place, so a reader never sees a half-written file. A single GCS object upload is
atomic by itself. Transient GCS errors are retried with the client's default policy.

Set ``STORAGE_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:4443``) to talk to an emulator such as
fake-gcs-server; the client then uses anonymous credentials.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stage1_pro.errors import StorageError

if TYPE_CHECKING:
    from google.cloud import storage as gcs

GCS_SCHEME = "gs://"


def is_gcs(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a ``gs://bucket/object`` URI."""
    return str(uri).startswith(GCS_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/a/b`` into ``("bucket", "a/b")``; raise if the bucket is missing."""
    rest = uri[len(GCS_SCHEME) :]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: not a valid gs:// URI (expected gs://BUCKET/OBJECT)")
    return bucket, name


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or a ``gs://`` prefix."""
    base = str(base)
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


@functools.cache
def gcs_client() -> gcs.Client:
    """Return a (cached) google-cloud-storage client; anonymous against an emulator."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials()
        )
    return storage.Client()


def _blob(uri: str) -> gcs.Blob:
    bucket, name = split_gcs(uri)
    if not name:
        raise StorageError(f"{uri}: names a bucket, not an object")
    return gcs_client().bucket(bucket).blob(name)


def _gcs_error(uri: str, exc: Exception) -> StorageError:
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.NotFound):
        return StorageError(f"{uri}: no such object or bucket (check the bucket name and the path)")
    if isinstance(exc, gexc.Forbidden):
        return StorageError(f"{uri}: access denied (check the credentials / Workload Identity binding)")
    return StorageError(f"{uri}: GCS request failed: {exc}")


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """Read a whole local file or GCS object."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc

        try:
            return _blob(uri).download_as_bytes()
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(uri, exc) from exc
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: file not found") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc.strerror})") from exc


def read_text(uri: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file or object."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: not UTF-8 text ({exc})") from exc


def write_bytes(uri: str | os.PathLike[str], data: bytes, content_type: str | None = None) -> None:
    """Write ``data`` atomically to a local path (temp + rename) or as one GCS object."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc
        from google.cloud.storage.retry import DEFAULT_RETRY

        try:
            _blob(uri).upload_from_string(
                data, content_type=content_type or "application/octet-stream", retry=DEFAULT_RETRY
            )
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(uri, exc) from exc
        return
    path = Path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(f"{uri}: cannot write ({exc.strerror or exc})") from exc
        raise


def write_text(uri: str | os.PathLike[str], text: str, content_type: str = "text/plain") -> None:
    """Write UTF-8 text atomically."""
    write_bytes(uri, text.encode("utf-8"), content_type=content_type)


def exists(uri: str | os.PathLike[str]) -> bool:
    """True when the local file/folder or the GCS object exists."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc

        try:
            return _blob(uri).exists()
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(uri, exc) from exc
    return Path(uri).exists()


def list_files(prefix: str | os.PathLike[str], recursive: bool = True) -> Iterator[str]:
    """Yield the URIs of the files below a local folder or ``gs://`` prefix, sorted.

    With ``recursive=False`` only the files directly inside the folder are listed (one GCS
    list request with ``delimiter="/"``, however deep the tree below it is). Directory
    placeholder objects (names ending in ``/``) are skipped. A missing folder yields nothing.
    """
    prefix = str(prefix)
    if is_gcs(prefix):
        from google.api_core import exceptions as gexc

        bucket, name = split_gcs(prefix)
        name = name.rstrip("/") + "/" if name else ""
        try:
            listing = gcs_client().list_blobs(bucket, prefix=name, delimiter=None if recursive else "/")
            blobs = sorted(b.name for b in listing if not b.name.endswith("/"))
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(prefix, exc) from exc
        for blob_name in blobs:
            yield f"{GCS_SCHEME}{bucket}/{blob_name}"
        return
    root = Path(prefix)
    candidates = root.rglob("*") if recursive else (root.iterdir() if root.is_dir() else ())
    for path in sorted(p for p in candidates if p.is_file()):
        yield str(path)


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy one file between any two locations (local or GCS), atomically at the destination."""
    src, dst = str(src), str(dst)
    if is_gcs(dst) and not is_gcs(src):
        from google.api_core import exceptions as gexc
        from google.cloud.storage.retry import DEFAULT_RETRY

        try:
            _blob(dst).upload_from_filename(src, retry=DEFAULT_RETRY)
        except FileNotFoundError as exc:
            raise StorageError(f"{src}: file not found") from exc
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(dst, exc) from exc
        return
    write_bytes(dst, read_bytes(src))


def delete(uri: str | os.PathLike[str]) -> None:
    """Delete a local file or GCS object if it exists."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc

        try:
            _blob(uri).delete()
        except gexc.NotFound:
            return
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(uri, exc) from exc
        return
    Path(uri).unlink(missing_ok=True)
