"""Byte-level storage for local paths and ``gs://`` URIs (google-cloud-storage).

Local writes are atomic: data goes to a temporary file in the same folder, then ``os.replace``
moves it into place, so a reader never sees a half-written file. A single GCS object upload is
atomic by itself. Transient GCS errors are retried with the client's default policy.

Conditional writes (:func:`write_bytes_if_generation`) are the compare-and-swap the registry's
``latest`` pointer moves by: GCS checks ``ifGenerationMatch`` on the server, atomically with the
write; a local folder takes an exclusive ``flock`` on the parent folder around "compare, then
rename into place".

Set ``STORAGE_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:4443``) to talk to an emulator such as
fake-gcs-server; the client then uses anonymous credentials.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from stage1_pro.errors import PreconditionFailedError, StorageError

if TYPE_CHECKING:
    from google.cloud import storage as gcs

GCS_SCHEME = "gs://"
#: The generation of an object that does not exist: a write conditioned on it only creates.
ABSENT = "0"


class Versioned(NamedTuple):
    """An object's bytes (None when it does not exist) and its generation.

    The generation is an opaque token to hand back to :func:`write_bytes_if_generation`: the GCS
    object generation, or for a local file the sha256 of its content; :data:`ABSENT` when missing.
    """

    data: bytes | None
    generation: str


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
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client()
    except DefaultCredentialsError as exc:
        raise StorageError(
            "no Google credentials on this machine for gs:// access: run 'gcloud auth application-default "
            "login' (or set GOOGLE_APPLICATION_CREDENTIALS); in a pod, bind its service account with "
            "Workload Identity"
        ) from exc


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


@contextlib.contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Raise a Google API error of the block as the :class:`StorageError` of :func:`_gcs_error`."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except gexc.GoogleAPIError as exc:
        raise _gcs_error(uri, exc) from exc


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """Read a whole local file or GCS object."""
    uri = str(uri)
    if is_gcs(uri):
        with _gcs_errors(uri):
            return _blob(uri).download_as_bytes()
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
        from google.cloud.storage.retry import DEFAULT_RETRY

        with _gcs_errors(uri):
            _blob(uri).upload_from_string(
                data, content_type=content_type or "application/octet-stream", retry=DEFAULT_RETRY
            )
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


def read_versioned(uri: str | os.PathLike[str]) -> Versioned:
    """Read an object with its generation; ``Versioned(None, ABSENT)`` when it does not exist."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc

        blob = _blob(uri)
        try:
            data = blob.download_as_bytes()
        except gexc.NotFound:
            return Versioned(None, ABSENT)
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(uri, exc) from exc
        return Versioned(data, str(blob.generation))
    path = Path(uri)
    if not path.is_file():
        return Versioned(None, ABSENT)
    data = read_bytes(path)
    return Versioned(data, _content_generation(data))


def write_bytes_if_generation(
    uri: str | os.PathLike[str], data: bytes, generation: str, content_type: str | None = None
) -> str:
    """Write ``data`` only if the object still has ``generation`` (:data:`ABSENT`: only if missing).

    A compare-and-swap: GCS evaluates the ``ifGenerationMatch`` precondition on the server,
    atomically with the write; locally the comparison and the rename happen under an exclusive
    lock on the parent folder. An object that already holds exactly ``data`` counts as written
    (a retried request whose first attempt succeeded, or a rerun), so the call is idempotent.

    Returns:
        The object's new generation.

    Raises:
        PreconditionFailedError: the object changed since ``generation`` was read (or exists when
            it must not); nothing was written.
        StorageError: the write failed.
    """
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = _blob(uri)
        try:
            blob.upload_from_string(
                data,
                content_type=content_type or "application/octet-stream",
                if_generation_match=int(generation),
                retry=DEFAULT_RETRY,  # safe to retry: the precondition makes the request idempotent
            )
        except gexc.PreconditionFailed as exc:
            current = read_versioned(uri)
            if current.data == data:
                return current.generation
            raise _precondition_error(uri, generation, current.generation) from exc
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(uri, exc) from exc
        return str(blob.generation)
    path = Path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc.strerror})") from exc
    with _folder_lock(path.parent):
        current = read_versioned(path)
        if current.generation != generation:
            if current.data == data:
                return current.generation
            raise _precondition_error(uri, generation, current.generation)
        write_bytes(path, data)
    return _content_generation(data)


def _content_generation(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _precondition_error(uri: str, expected: str, found: str) -> PreconditionFailedError:
    if expected == ABSENT:
        return PreconditionFailedError(f"{uri}: already exists (it was written to be created only)")
    if found == ABSENT:
        return PreconditionFailedError(f"{uri}: deleted since it was read")
    return PreconditionFailedError(f"{uri}: changed since it was read (another writer got there first)")


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on a local folder (POSIX ``flock``), released on exit."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike[str], *, replace_contents: bool = False) -> Iterator[Path]:
    """A new local folder to fill, renamed to ``dest`` when the block succeeds and removed if it fails.

    The folder is a hidden sibling of ``dest`` (the same file system, so the swap is a rename):
    ``dest`` is never left half-written.

    Args:
        dest: the local folder to create or replace (its parent is created).
        replace_contents: remove an existing ``dest`` with everything in it; otherwise an existing
            ``dest`` must be empty (the caller has checked), and a non-empty one fails the swap.

    Yields:
        The staging folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() and replace_contents:
            shutil.rmtree(dest)
        elif dest.exists():
            dest.rmdir()  # renaming onto an existing folder is not portable
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(uri: str | os.PathLike[str], text: str, content_type: str = "text/plain") -> None:
    """Write UTF-8 text atomically."""
    write_bytes(uri, text.encode("utf-8"), content_type=content_type)


def exists(uri: str | os.PathLike[str]) -> bool:
    """True when the local file/folder or the GCS object exists."""
    uri = str(uri)
    if is_gcs(uri):
        with _gcs_errors(uri):
            return _blob(uri).exists()
    return Path(uri).exists()


def list_files(prefix: str | os.PathLike[str], recursive: bool = True) -> Iterator[str]:
    """Yield the URIs of the files below a local folder or ``gs://`` prefix, sorted.

    With ``recursive=False`` only the files directly inside the folder are listed (one GCS
    list request with ``delimiter="/"``, however deep the tree below it is). Directory
    placeholder objects (names ending in ``/``) are skipped. A missing folder yields nothing.
    """
    prefix = str(prefix)
    if is_gcs(prefix):
        bucket, name = split_gcs(prefix)
        name = name.rstrip("/") + "/" if name else ""
        with _gcs_errors(prefix):
            listing = gcs_client().list_blobs(bucket, prefix=name, delimiter=None if recursive else "/")
            blobs = sorted(b.name for b in listing if not b.name.endswith("/"))
        for blob_name in blobs:
            yield f"{GCS_SCHEME}{bucket}/{blob_name}"
        return
    root = Path(prefix)
    candidates = root.rglob("*") if recursive else (root.iterdir() if root.is_dir() else ())
    for path in sorted(p for p in candidates if p.is_file()):
        yield str(path)


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, create_only: bool = False) -> bool:
    """Copy one file between any two locations (local or GCS), atomically at the destination.

    GCS to GCS is a server-side copy (unless ``create_only``): the bytes never pass through this
    machine.

    Args:
        src: the file to copy.
        dst: where to write it.
        create_only: refuse to replace an existing ``dst`` that holds other bytes (a conditional
            write on :data:`ABSENT`); the same bytes already there count as copied.

    Returns:
        True when this call wrote ``dst``; False when ``create_only`` found the same bytes there.

    Raises:
        PreconditionFailedError: ``create_only`` and ``dst`` holds other bytes.
        StorageError: the copy failed.
    """
    src, dst = str(src), str(dst)
    if is_gcs(src) and is_gcs(dst) and not create_only:
        from google.cloud.storage.retry import DEFAULT_RETRY

        source = _blob(src)
        target_bucket, target_name = split_gcs(dst)
        with _gcs_errors(src):
            source.bucket.copy_blob(
                source, gcs_client().bucket(target_bucket), target_name, retry=DEFAULT_RETRY
            )
        return True
    if is_gcs(dst) and not is_gcs(src):
        from google.api_core import exceptions as gexc
        from google.cloud.storage.retry import DEFAULT_RETRY

        try:
            _blob(dst).upload_from_filename(
                src, if_generation_match=int(ABSENT) if create_only else None, retry=DEFAULT_RETRY
            )
        except FileNotFoundError as exc:
            raise StorageError(f"{src}: file not found") from exc
        except gexc.PreconditionFailed as exc:
            if read_bytes(dst) == read_bytes(src):
                return False
            raise _precondition_error(dst, ABSENT, "?") from exc
        except gexc.GoogleAPIError as exc:
            raise _gcs_error(dst, exc) from exc
        return True
    data = read_bytes(src)
    if create_only:
        if exists(dst) and read_bytes(dst) == data:
            return False
        write_bytes_if_generation(dst, data, ABSENT)
    else:
        write_bytes(dst, data)
    return True


def object_generation(uri: str) -> tuple[int, str]:
    """(generation, CRC32C) of a GCS object: a new upload under the same name gets a new generation.

    Raises:
        StorageError: the object does not exist or cannot be read.
    """
    blob = _blob(uri)
    with _gcs_errors(uri):
        blob.reload()
    return int(blob.generation), str(blob.crc32c)


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
