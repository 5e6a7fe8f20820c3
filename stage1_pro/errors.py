"""Exception types. Every error a user can cause derives from :class:`Stage1ProError`.

The CLI prints these as one clear message (what was wrong, where, how to fix it) and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Stage1ProError(Exception):
    """Base class of the errors the CLI reports without a traceback."""

    exit_code = 2


class ConfigError(Stage1ProError):
    """A setting is invalid (unknown field, out of range, phase/policy mismatch...)."""


class ArtifactError(Stage1ProError):
    """An artifact file is missing, unreadable, not JSON, of the wrong kind or fails its schema."""


class DataError(Stage1ProError):
    """A dataset, manifest, image or split is invalid."""


class StorageError(Stage1ProError):
    """A local path or ``gs://`` object cannot be read or written."""


class PreconditionFailedError(StorageError):
    """A conditional write found the object changed since it was read (or present when it must not be)."""


class LatestMovedError(PreconditionFailedError):
    """``publish --expect-latest``: ``latest`` no longer names the champion the bundle was validated against.

    The version itself was published (it is immutable and listed); only ``latest`` was left alone.

    Attributes:
        published: URI of the version folder that was uploaded.
        current: the version ``latest`` names now (None: no ``latest``).
        expected: the version the publisher expected (``""``: no ``latest`` yet).
    """

    def __init__(self, message: str, *, published: str, current: str | None, expected: str) -> None:
        super().__init__(message)
        self.published = published
        self.current = current
        self.expected = expected


class NotBuiltError(Stage1ProError):
    """A designed feature that is deliberately not built (e.g. DoRAN): refused, never replaced by another."""


class DeviceError(Stage1ProError):
    """A step did not get the hardware it asked for (a GPU task whose pod sees no GPU)."""
