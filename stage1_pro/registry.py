"""Publish bundles to a registry prefix and pull them back, verified.

Layout under a prefix (``gs://BUCKET/PREFIX`` or a local folder)::

    PREFIX/<version>/bundle.json, config.json, model_best.pth, ...   one folder per version
    PREFIX/latest                                                    JSON pointer (kind "latest")

Publishing uploads every file of the version, **bundle.json last**, checks that the version folder
holds every listed file, and only then moves the ``latest`` pointer. A version folder without
``bundle.json`` is therefore an unfinished publish: :func:`pull` refuses it, and ``latest`` never
points at it. Published versions are immutable: every file is written *create-only* (a GCS
``ifGenerationMatch=0`` precondition), so two publishers of one version name cannot mix their
files, and publishing a version whose ``bundle.json`` exists is refused.

``latest`` moves by compare-and-swap: read the pointer with its object generation, write the new
pointer on the precondition that the generation is unchanged, re-read and retry when another
writer got there first. Two concurrent publishers therefore both land in the pointer's
``history`` (newest first); with a plain overwrite one of them would vanish from it.
``publish(..., expect_latest=C)`` adds a condition checked on every pointer the swap is decided on:
``latest`` must still name ``C`` (:data:`NO_LATEST`, the empty string: no ``latest`` yet), the
champion the bundle was validated against. Otherwise the version stays published but ``latest``
is left alone (:class:`~stage1_pro.errors.LatestMovedError`): a bundle compared with C only is
never promoted over a newer champion that another run put there meanwhile.
:func:`rollback` moves ``latest`` back (or forward) to a published, verified version the same way.
:func:`describe_versions` reads what ``stage1-pro versions`` prints.

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
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1_pro import storage
from stage1_pro.artifacts import (
    DEFAULT_FILENAMES,
    dumps_artifact,
    is_plain_filename,
    parse_json,
    read_artifact,
    stamp,
    validate_artifact,
)
from stage1_pro.bundle import BUNDLE_FILE, verify_bundle
from stage1_pro.errors import (
    ArtifactError,
    ConfigError,
    LatestMovedError,
    PreconditionFailedError,
    StorageError,
)
from stage1_pro.provenance import sha256_bytes, sha256_file, utc_now

log = logging.getLogger(__name__)

LATEST = DEFAULT_FILENAMES["latest"]
#: Compare-and-swap attempts to move ``latest`` before giving up (each loses only to a writer that
#: succeeded, so running out means a storm of concurrent publishers).
LATEST_CAS_ATTEMPTS = 20
#: Upper bound of the random pause (seconds) before the n-th retry: n * this, jittered.
LATEST_RETRY_PAUSE_S = 0.05
#: Moves of ``latest`` remembered in its ``history``.
LATEST_HISTORY_LENGTH = 100
PUBLISH, ROLLBACK = "publish", "rollback"
#: ``expect_latest`` value meaning "nothing has been published yet": a first run's publish moves
#: ``latest`` only if no pointer exists.
NO_LATEST = ""


def _upload_file(local_path: Path, uri: str) -> bool:
    """Upload one file create-only, retried on transient errors (its own function: tests inject faults).

    Returns:
        True when this call created ``uri``; False when it already held these bytes (a rerun).

    Raises:
        PreconditionFailedError: ``uri`` already holds other bytes.
    """
    return storage.copy_file(local_path, uri, create_only=True)


def read_latest(prefix: str) -> dict[str, Any] | None:
    """The validated ``latest`` pointer under ``prefix``, or None when nothing was published yet."""
    return _read_latest_versioned(prefix)[0]


def _read_latest_versioned(prefix: str) -> tuple[dict[str, Any] | None, str]:
    """(the validated pointer or None, its generation)."""
    uri = storage.join(prefix, LATEST)
    data, generation = storage.read_versioned(uri)
    if data is None:
        return None, generation
    pointer = parse_json(data.decode("utf-8", errors="replace"), uri)
    validate_artifact(pointer, "latest", uri)
    return pointer, generation


def _move_latest(
    prefix: str,
    version: str,
    bundle_sha256: str,
    action: str,
    *,
    seen: tuple[dict[str, Any] | None, str] | None = None,
    expect: str | None = None,
) -> dict[str, Any]:
    """Point ``PREFIX/latest`` at ``version`` by compare-and-swap on the pointer's generation.

    Args:
        prefix: the registry prefix.
        version: a complete, verified version under it.
        bundle_sha256: sha256 of that version's bundle.json.
        action: ``publish`` or ``rollback`` (recorded in the pointer and its history).
        seen: the pointer and generation the caller decided on. The swap then succeeds only if
            ``latest`` is still exactly that (no retry: a concurrent move must not be overridden
            behind an operator's back). Without it, a lost race re-reads and tries again.
        expect: move only from a pointer naming this version (:data:`NO_LATEST`: from no pointer).
            Checked on the very pointer whose generation conditions the write, so a writer that
            slips in between fails the swap, and the re-read then fails this check.

    Returns:
        The pointer as written (or as found, when it already pointed at ``version``).

    Raises:
        LatestMovedError: ``latest`` does not name ``expect``; nothing was written.
        PreconditionFailedError: ``latest`` moved since ``seen``, or another writer kept winning
            for :data:`LATEST_CAS_ATTEMPTS` attempts.
    """
    uri = storage.join(prefix, LATEST)
    attempts = 1 if seen is not None else LATEST_CAS_ATTEMPTS
    for attempt in range(1, attempts + 1):
        current, generation = seen if seen is not None else _read_latest_versioned(prefix)
        if current is not None and current["version"] == version:
            return current
        if expect is not None:
            _check_expected(prefix, version, current, expect)
        now = utc_now()
        history = (current or {}).get("history") or _legacy_history(current)
        entry = {"version": version, "moved_at": now, "action": action}
        pointer = stamp(
            {
                "version": version,
                "bundle_sha256": bundle_sha256,
                "published_at": now,
                "previous_version": current["version"] if current else None,
                "action": action,
                "history": [entry, *history][:LATEST_HISTORY_LENGTH],
            },
            "latest",
        )
        validate_artifact(pointer, "latest", uri)
        try:
            storage.write_bytes_if_generation(
                uri, dumps_artifact(pointer).encode("utf-8"), generation, content_type="application/json"
            )
        except PreconditionFailedError as exc:
            if seen is not None:
                now_at = (read_latest(prefix) or {}).get("version")
                raise PreconditionFailedError(
                    f"{uri}: moved by another writer (to {now_at}) while this {action} was running; nothing "
                    f"was changed — check 'stage1-pro versions {prefix}' and run the {action} again"
                ) from exc
            log.info("%s: lost a race to another writer (attempt %d); re-reading", uri, attempt)
            time.sleep(random.uniform(0, LATEST_RETRY_PAUSE_S * attempt))  # jitter: racers desynchronise
            continue
        log.info("%s -> %s (%s)", uri, version, action)
        return pointer
    raise PreconditionFailedError(
        f"{uri}: still contended after {LATEST_CAS_ATTEMPTS} compare-and-swap attempts; version {version} is "
        f"published but 'latest' was not moved to it — run 'stage1-pro rollback {prefix} --to {version}'"
    )


def _check_expected(prefix: str, version: str, current: dict[str, Any] | None, expect: str) -> None:
    """Raise :class:`LatestMovedError` unless ``current`` (the pointer read) names ``expect``."""
    now_at = current["version"] if current is not None else None
    if (now_at or NO_LATEST) == expect:
        return
    expected = expect or "nothing (no latest yet)"
    raise LatestMovedError(
        f"{storage.join(prefix, LATEST)} points at {now_at or 'nothing'}, not at {expected} as expected: "
        f"another publisher moved it after this bundle was validated. Version {version} is published "
        f"({storage.join(prefix, version)}, immutable, listed by 'stage1-pro versions {prefix}') but "
        f"'latest' was left at {now_at or 'nothing'}. It was compared with {expected}, not with the "
        f"current champion: re-validate the run with 'stage1-pro validate --run RUN_DIR --champion "
        f"{prefix}/{LATEST}', export and publish that bundle; or, to ship this one regardless, move latest "
        f"deliberately with 'stage1-pro rollback {prefix} --to {version}'",
        published=storage.join(prefix, version),
        current=now_at,
        expected=expect,
    )


def _legacy_history(pointer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A one-entry history for a pointer written before pointers kept one."""
    if pointer is None:
        return []
    return [{"version": pointer["version"], "moved_at": pointer["published_at"], "action": PUBLISH}]


def publish(
    bundle_dir: str | os.PathLike[str],
    prefix: str,
    *,
    set_latest: bool = True,
    allow_unblessed: bool = False,
    expect_latest: str | None = None,
) -> str:
    """Upload a verified bundle to ``prefix/<version>/`` and move ``prefix/latest`` to it.

    Args:
        bundle_dir: a local bundle folder (from :func:`stage1_pro.bundle.export_bundle`).
        prefix: ``gs://BUCKET/PREFIX`` (or a local folder acting as a registry).
        set_latest: move the ``latest`` pointer after the upload.
        allow_unblessed: publish a bundle marked ``blessed: false``; ``latest`` is never moved to it.
        expect_latest: move ``latest`` only if it still names this version, the champion the
            bundle was validated against (:data:`NO_LATEST`, ``""``: only if nothing was published
            yet). Checked inside the compare-and-swap. None: move it whatever it names.

    Returns:
        The URI of the published version folder.

    Raises:
        ArtifactError: the bundle does not verify, is unblessed, or the version already exists.
        ConfigError: ``expect_latest`` given with ``set_latest=False``.
        LatestMovedError: ``latest`` no longer names ``expect_latest``; the version is published
            (complete, immutable) but ``latest`` was not moved.
        StorageError: an upload failed after retries (``latest`` is left untouched).
    """
    if expect_latest is not None and not set_latest:
        raise ConfigError(
            "publish: expect_latest (--expect-latest) conditions the move of 'latest', and set_latest=False "
            "(--no-latest) asks not to move it; give one or the other"
        )
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
    created: list[str] = []  # only what this call wrote: a file found in place may be another's
    try:
        for name in sorted(meta["files"]):  # every data file first ...
            uri = storage.join(target, name)
            if _upload_file(root / name, uri):
                created.append(uri)
        uri = storage.join(target, BUNDLE_FILE)  # ... bundle.json last: it marks the version complete
        _upload_file(root / BUNDLE_FILE, uri)
    except BaseException as exc:
        conflict = isinstance(exc, PreconditionFailedError)
        # Best effort: an unfinished version has no bundle.json, so pull refuses it either way. On a
        # conflict another publisher owns the folder and may be using identical files: leave them.
        for uri in [] if conflict else created:
            with contextlib.suppress(StorageError):
                storage.delete(uri)
        if conflict:
            raise ArtifactError(
                f"publish of {version} to {target} refused: {exc}. Another publisher is writing (or has "
                f"written) a different bundle under the version name {version}; published versions are "
                "immutable — export again with a new --version"
            ) from exc
        if isinstance(exc, StorageError):
            raise StorageError(
                f"publish of {version} to {target} failed after {len(created)} of "
                f"{len(meta['files']) + 1} files: {exc}; nothing was marked complete and 'latest' was not "
                "moved — rerun publish"
            ) from exc
        raise
    _check_complete(target, meta)
    log.info("published %s (%d files)", target, len(meta["files"]) + 1)
    if set_latest:
        _move_latest(prefix, version, sha256_file(root / BUNDLE_FILE), PUBLISH, expect=expect_latest)
    return target


def champion_expectation(prefix: str, champion_prefix: str, champion: str) -> str | None:
    """The ``expect_latest`` for publishing to ``prefix`` a bundle validated against ``champion``.

    Args:
        prefix: the registry prefix being published to.
        champion_prefix: the registry the champion was resolved from (``PREFIX`` or
            ``PREFIX/latest``; empty: the run had no champion).
        champion: the version folder the bundle was compared with (``PREFIX/VERSION``, as
            :func:`resolve` returns it), or ``""`` when nothing was published there yet.

    Returns:
        The champion's version (:data:`NO_LATEST` for "nothing published yet") when the champion
        came from ``prefix``'s own ``latest``; None (no condition) when there was no champion, or
        it lives in another registry or was pinned to a version: ``prefix``'s ``latest`` then says
        nothing about what the bundle was compared with.
    """
    champion_prefix = champion_prefix.strip().rstrip("/")
    if not champion_prefix:
        return None
    if champion_prefix.endswith("/" + LATEST):
        champion_prefix = champion_prefix[: -len(LATEST) - 1]
    prefix = _normalised(prefix)
    champion_prefix = _normalised(champion_prefix)
    if champion_prefix != prefix:
        log.warning(
            "champion_prefix %s is not the publish prefix %s: 'latest' is moved without checking it still "
            "names the champion",
            champion_prefix,
            prefix,
        )
        return None
    if not champion:
        return NO_LATEST
    folder, _, version = champion.rstrip("/").rpartition("/")
    return version if _normalised(folder) == prefix else None


def _normalised(uri: str) -> str:
    """``uri`` without a trailing slash (and, for a local path, without ``.``/``..`` detours)."""
    return uri.rstrip("/") if storage.is_gcs(uri) else os.path.normpath(uri)


def _check_complete(source: str, meta: dict[str, Any]) -> None:
    """Raise unless the version folder ``source`` holds exactly the files its bundle.json lists."""
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
    _check_complete(source, meta)

    with storage.staged_folder(dest) as tmp:
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
    log.info("pulled %s -> %s", source, dest)
    return dest


@contextlib.contextmanager
def local_bundle(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """A local bundle folder for ``uri``, for the duration of the ``with`` block.

    Args:
        uri: a bundle folder (used in place; whoever loads it verifies it, as
            :func:`stage1_pro.inference.load_bundle` does), or anything :func:`pull` takes: a
            registry prefix (follows ``latest``), ``PREFIX/latest`` or ``PREFIX/VERSION``, local or
            ``gs://`` (downloaded and verified into a temporary folder, deleted afterwards).

    Raises:
        ArtifactError: neither a bundle folder nor a published bundle, or one that does not verify.
    """
    if not storage.is_gcs(uri) and Path(uri, BUNDLE_FILE).is_file():
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="stage1-pro-bundle-") as tmp:
        yield pull(str(uri), Path(tmp, "bundle"))


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


def rollback(prefix: str, version: str) -> dict[str, Any]:
    """Move ``PREFIX/latest`` to the published ``version``, verified, in one conditional write.

    The version is downloaded and verified like :func:`pull` does (every sha256 and schema) and
    must be blessed. ``latest`` is then swapped on the generation read before the download: if
    another writer moved it meanwhile, nothing changes and the error says so. Works forward too
    (promote a version published with ``--no-latest``).

    Args:
        prefix: the registry prefix (``gs://BUCKET/PREFIX`` or a local folder).
        version: a version folder under it.

    Returns:
        The ``latest`` pointer now in place (unchanged when it already pointed at ``version``).

    Raises:
        ArtifactError: no such complete version, a version that does not verify, or an unblessed one.
        PreconditionFailedError: ``latest`` was moved by someone else during the rollback.
    """
    prefix = prefix.rstrip("/")
    seen = _read_latest_versioned(prefix)
    published = list_versions(prefix)
    if version not in published:
        shown = ", ".join(published[-10:]) or "none"
        raise ArtifactError(
            f"{storage.join(prefix, version)}: not a published version (no {BUNDLE_FILE} there); "
            f"published versions under {prefix}: {shown} — see 'stage1-pro versions {prefix}'"
        )
    with tempfile.TemporaryDirectory(prefix="stage1-pro-rollback-") as tmp:
        dest = pull(storage.join(prefix, version), Path(tmp, version))  # verifies every file
        raw = (dest / BUNDLE_FILE).read_bytes()
    meta = parse_json(raw.decode("utf-8"), storage.join(prefix, version, BUNDLE_FILE))
    if meta["version"] != version:
        raise ArtifactError(
            f"{storage.join(prefix, version, BUNDLE_FILE)}: describes version {meta['version']!r}, not the "
            f"folder's name {version!r}; this folder was not written by publish — refusing it"
        )
    if not meta["blessed"]:
        raise ArtifactError(
            f"{storage.join(prefix, version)}: bundle {version} is not blessed (blessed: false); 'latest' "
            "never points at an unblessed bundle — pick a blessed version"
        )
    return _move_latest(prefix, version, sha256_bytes(raw), ROLLBACK, seen=seen)


@dataclass(frozen=True)
class VersionInfo:
    """One row of ``stage1-pro versions``: what a published version is, read from its files.

    Attributes:
        version: the version folder's name.
        complete: the folder holds ``bundle.json`` (else an unfinished or failed publish).
        latest: ``PREFIX/latest`` points at it.
        created_at: when the bundle was exported.
        blessed: the bundle's blessing.
        policy: the active exit policy.
        test_coverage: coverage of the policy on the run's test split (validation.json).
        certified_bound: the certificate's upper bound on FNR_exit (validation.json).
        target_fnr_exit: the target it was certified for.
        data_fingerprint: the dataset the run was trained and certified on.
        error: why the version's files could not be read (the other fields are then None).
    """

    version: str
    complete: bool
    latest: bool = False
    created_at: str | None = None
    blessed: bool | None = None
    policy: str | None = None
    test_coverage: float | None = None
    certified_bound: float | None = None
    target_fnr_exit: float | None = None
    data_fingerprint: str | None = None
    error: str | None = None


def describe_versions(prefix: str, pointer: dict[str, Any] | None) -> list[VersionInfo]:
    """Every version folder under ``prefix``, complete ones by creation time, then unfinished ones.

    Reads each complete version's ``bundle.json`` and ``validation.json`` (schema-validated; a
    version whose files do not validate is listed with ``error`` set rather than hidden).

    Args:
        prefix: the registry prefix.
        pointer: its ``latest`` pointer as :func:`read_latest` returned it (None: none yet); the
            caller prints it too, so rows and pointer come from one read.
    """
    prefix = prefix.rstrip("/")
    folders: dict[str, set[str]] = {}
    for uri in storage.list_files(prefix):
        folder, _, name = _name_in(prefix, uri).rpartition("/")
        if folder and "/" not in folder:
            folders.setdefault(folder, set()).add(name)
    latest = (pointer or {}).get("version")
    rows = [_describe(prefix, v, latest) if BUNDLE_FILE in names else VersionInfo(v, complete=False)
            for v, names in folders.items()]  # fmt: skip
    return sorted(rows, key=lambda r: (not r.complete, r.created_at or "", r.version))


def _describe(prefix: str, version: str, latest: str | None) -> VersionInfo:
    folder = storage.join(prefix, version)
    try:
        meta = read_artifact(storage.join(folder, BUNDLE_FILE), "bundle")
        validation = None
        if meta.get("validation_file"):
            validation = read_artifact(storage.join(folder, meta["validation_file"]), "validation")
    except (ArtifactError, StorageError) as exc:
        return VersionInfo(version, complete=True, latest=version == latest, error=str(exc))
    test = (validation or {}).get("test_metrics") or {}
    certificate = (validation or {}).get("certificate") or {}
    return VersionInfo(
        version,
        complete=True,
        latest=version == latest,
        created_at=meta["created_at"],
        blessed=meta["blessed"],
        policy=meta["active_exit_policy"],
        test_coverage=test.get("coverage"),
        certified_bound=certificate.get("upper_bound"),
        target_fnr_exit=(validation or {}).get("target_fnr_exit"),
        data_fingerprint=meta["lineage"]["data_fingerprint"],
    )
