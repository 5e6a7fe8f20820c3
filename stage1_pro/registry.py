"""Publish bundles to a registry prefix and pull them back, verified.

Layout under a prefix (``gs://BUCKET/PREFIX`` or a local folder)::

    PREFIX/<version>/bundle.json, config.json, model_best.pth, ...   one folder per version
    PREFIX/latest                                                    JSON pointer (kind "latest")

Publishing uploads every file of the version, **bundle.json last**, and only then rewrites the
``latest`` pointer (one object write, atomic in GCS). A version folder without ``bundle.json`` is
therefore an unfinished publish: :func:`pull` refuses it, and ``latest`` never points at it.
Published versions are immutable: publishing a version whose ``bundle.json`` exists is refused.

Pulling reads ``bundle.json`` first, refuses a version folder holding files it does not list,
downloads and checks each listed file's sha256, verifies the whole bundle
(:func:`stage1_pro.bundle.verify_bundle`) in a temporary folder and renames it into place.
Transient GCS errors (429, 5xx, connection resets) are retried by google-cloud-storage's
``DEFAULT_RETRY`` (google-api-core exponential backoff) inside :mod:`stage1_pro.storage`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stage1_pro import storage
from stage1_pro.artifacts import (
    DEFAULT_FILENAMES,
    is_plain_filename,
    parse_json,
    read_artifact,
    validate_artifact,
    write_artifact,
)
from stage1_pro.bundle import BUNDLE_FILE, verify_bundle
from stage1_pro.errors import ArtifactError, StorageError
from stage1_pro.provenance import sha256_bytes, sha256_file, utc_now

log = logging.getLogger(__name__)

LATEST = DEFAULT_FILENAMES["latest"]


def _upload_file(local_path: Path, uri: str) -> None:
    """Upload one file (retried on transient errors); a separate function so tests can inject faults."""
    storage.copy_file(local_path, uri)


def read_latest(prefix: str) -> dict[str, Any] | None:
    """The validated ``latest`` pointer under ``prefix``, or None when nothing was published yet."""
    uri = storage.join(prefix, LATEST)
    if not storage.exists(uri):
        return None
    return read_artifact(uri, "latest")


def publish(
    bundle_dir: str | os.PathLike[str],
    prefix: str,
    *,
    set_latest: bool = True,
    allow_unblessed: bool = False,
) -> str:
    """Upload a verified bundle to ``prefix/<version>/`` and move ``prefix/latest`` to it.

    Args:
        bundle_dir: a local bundle folder (from :func:`stage1_pro.bundle.export_bundle`).
        prefix: ``gs://BUCKET/PREFIX`` (or a local folder acting as a registry).
        set_latest: move the ``latest`` pointer after the upload.
        allow_unblessed: publish a bundle marked ``blessed: false``; ``latest`` is never moved to it.

    Returns:
        The URI of the published version folder.

    Raises:
        ArtifactError: the bundle does not verify, is unblessed, or the version already exists.
        StorageError: an upload failed after retries (``latest`` is left untouched).
    """
    root = Path(bundle_dir)
    meta = verify_bundle(root)
    version = meta["version"]
    if not meta["blessed"]:
        if not allow_unblessed:
            raise ArtifactError(
                f"{root}: bundle {version} is not blessed (blessed: false in bundle.json); publishing it "
                "needs --allow-unblessed, and even then 'latest' is not moved to it"
            )
        set_latest = False
    target = storage.join(prefix, version)
    if storage.exists(storage.join(target, BUNDLE_FILE)):
        raise ArtifactError(
            f"{target}: version {version} is already published (published versions are immutable); "
            "export again with a new --version"
        )
    uploaded: list[str] = []
    try:
        for name in sorted(meta["files"]):  # every data file first ...
            uri = storage.join(target, name)
            _upload_file(root / name, uri)
            uploaded.append(uri)
        uri = storage.join(target, BUNDLE_FILE)  # ... bundle.json last: it marks the version complete
        _upload_file(root / BUNDLE_FILE, uri)
    except BaseException as exc:
        # Best effort: an unfinished version has no bundle.json, so pull refuses it either way.
        for uri in uploaded:
            with contextlib.suppress(StorageError):
                storage.delete(uri)
        if isinstance(exc, StorageError):
            raise StorageError(
                f"publish of {version} to {target} failed after {len(uploaded)} of "
                f"{len(meta['files']) + 1} files: {exc}; nothing was marked complete and 'latest' was not "
                "moved — rerun publish"
            ) from exc
        raise
    log.info("published %s (%d files)", target, len(meta["files"]) + 1)
    if set_latest:
        previous = read_latest(prefix)
        pointer = {
            "version": version,
            "bundle_sha256": sha256_file(root / BUNDLE_FILE),
            "published_at": utc_now(),
            "previous_version": previous["version"] if previous else None,
        }
        write_artifact(storage.join(prefix, LATEST), "latest", pointer)
        log.info("%s -> %s", storage.join(prefix, LATEST), version)
    return target


def resolve(uri: str) -> tuple[str, str | None]:
    """Resolve ``PREFIX``, ``PREFIX/latest`` or ``PREFIX/VERSION`` to ``(version folder, expected sha)``.

    The expected sha256 of ``bundle.json`` comes from the ``latest`` pointer when it was followed.
    """
    uri = uri.rstrip("/")
    if uri.endswith("/" + LATEST) or uri == LATEST:
        prefix = uri[: -len(LATEST)].rstrip("/")
        pointer = read_latest(prefix)
        if pointer is None:
            raise ArtifactError(f"{uri}: no such pointer; nothing has been published under {prefix}")
        return storage.join(prefix, pointer["version"]), pointer["bundle_sha256"]
    if storage.exists(storage.join(uri, BUNDLE_FILE)):
        return uri, None
    pointer = read_latest(uri)
    if pointer is not None:
        return storage.join(uri, pointer["version"]), pointer["bundle_sha256"]
    if any(True for _ in storage.list_files(uri)):
        raise ArtifactError(
            f"{uri}: holds files but no {BUNDLE_FILE}: an unfinished or failed publish; "
            "pull a complete version (or PREFIX/latest), or publish this one again"
        )
    raise ArtifactError(f"{uri}: no bundle here (neither {uri}/{BUNDLE_FILE} nor {uri}/{LATEST} exists)")


def pull(uri: str, dest_dir: str | os.PathLike[str]) -> Path:
    """Download a published bundle into ``dest_dir``, verified; return ``dest_dir``.

    Args:
        uri: ``gs://BUCKET/PREFIX`` (follows ``latest``), ``.../latest`` or ``.../VERSION``
            (a local registry folder works the same way).
        dest_dir: local folder to create (must not exist, or be empty); written atomically.

    Raises:
        ArtifactError: incomplete version, unlisted or tampered files, schema or checksum errors
            (naming the file); ``dest_dir`` is then not created.
    """
    source, expected_sha = resolve(uri)
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArtifactError(f"{dest}: already exists and is not an empty folder; pull into a new folder")
    bundle_uri = storage.join(source, BUNDLE_FILE)
    raw = storage.read_bytes(bundle_uri)
    if expected_sha is not None and sha256_bytes(raw) != expected_sha:
        raise ArtifactError(
            f"{bundle_uri}: does not match the sha256 recorded in the 'latest' pointer; "
            "the published bundle.json was replaced after publishing"
        )
    meta = parse_json(raw.decode("utf-8", errors="replace"), bundle_uri)
    validate_artifact(meta, "bundle", bundle_uri)
    listed = set(meta["files"])
    remote = {_name_in(source, u) for u in storage.list_files(source)}
    unlisted = sorted(remote - listed - {BUNDLE_FILE})
    if unlisted:
        raise ArtifactError(
            f"{source}: holds {', '.join(unlisted)}, not listed in its bundle.json; the published "
            "version was modified after publishing — refusing it"
        )
    missing = sorted(listed - remote)
    if missing:
        raise ArtifactError(f"{source}: incomplete bundle, missing {', '.join(missing)}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for name, digest in sorted(meta["files"].items()):
            if not is_plain_filename(name):  # schema-enforced; never join a path that could escape
                raise ArtifactError(f"{bundle_uri}: file name {name!r} is not a bare file name")
            data = storage.read_bytes(storage.join(source, name))
            actual = sha256_bytes(data)
            if actual != digest:
                raise ArtifactError(
                    f"{storage.join(source, name)}: sha256 mismatch (bundle.json has {digest[:12]}…, "
                    f"downloaded {actual[:12]}…): tampered or corrupted — refusing the bundle"
                )
            (tmp / name).write_bytes(data)
        (tmp / BUNDLE_FILE).write_bytes(raw)
        verify_bundle(tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pulled %s -> %s", source, dest)
    return dest


def _name_in(prefix: str, uri: str) -> str:
    """The part of ``uri`` below ``prefix`` (``a/b`` for nested objects, which bundles never have)."""
    if storage.is_gcs(prefix):
        return uri[len(prefix.rstrip("/")) + 1 :]
    return Path(uri).relative_to(prefix).as_posix()


def list_versions(prefix: str) -> list[str]:
    """Complete versions under ``prefix`` (folders holding a bundle.json), sorted."""
    out = set()
    for uri in storage.list_files(prefix):
        rel = _name_in(prefix, uri)
        folder, _, name = rel.rpartition("/")
        if name == BUNDLE_FILE and folder and "/" not in folder:
            out.add(folder)
    return sorted(out)
