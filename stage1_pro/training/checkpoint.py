"""Per-epoch checkpoints (``RUN_DIR/checkpoints/last.pth``) and automatic resume.

Training pods on preemptible GPU nodes get killed; the KFP task retries and the run continues
from the last finished epoch. A checkpoint holds the trainable state (model, optimiser,
scheduler, loss buffers such as the Lagrange multiplier), the epoch, the best monitored value
and the metrics rows so far, plus the run's *identity*: the resolved config (minus settings
that do not change the result) and the data/split fingerprints. Every epoch's sampling and
augmentation is seeded from ``(seed, epoch)``, so no RNG state is needed: a resumed run on CPU
ends with the same weights as an uninterrupted one.

Resuming from a checkpoint of another config or data is refused (:class:`ConfigError` naming
the differing settings), never silently mixed. Files are written atomically and loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from stage1_pro import storage
from stage1_pro.errors import ConfigError, StorageError

#: Settings that do not change the trained weights; they may differ on resume.
RUNTIME_FIELDS: frozenset[str] = frozenset({"num_workers", "log_every", "notes", "compile", "device"})
FORMAT = 1


def run_identity(config: dict[str, Any], data_fingerprint: str, splits_version: str) -> dict[str, Any]:
    """What must be equal for a checkpoint to be resumable."""
    return {
        "config": {k: v for k, v in sorted(config.items()) if k not in RUNTIME_FIELDS},
        "data_fingerprint": data_fingerprint,
        "splits_version": splits_version,
    }


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run identities (empty when equal)."""
    diffs = []
    for key in sorted(set(saved["config"]) | set(current["config"])):
        a, b = saved["config"].get(key, "<unset>"), current["config"].get(key, "<unset>")
        if a != b:
            diffs.append(f"{key}: {a!r} (checkpoint) vs {b!r} (now)")
    for key in ("data_fingerprint", "splits_version"):
        if saved.get(key) != current.get(key):
            diffs.append(
                f"{key}: {str(saved.get(key))[:16]} (checkpoint) vs {str(current.get(key))[:16]} (now)"
            )
    return diffs


def save_checkpoint(uri: str, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temp file + rename locally; one object upload on GCS)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_checkpoint(uri: str, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``uri`` if there is one and it belongs to this run; ``None`` if absent.

    Raises:
        ConfigError: the checkpoint was written by a run with another config or data.
        StorageError: the file exists but cannot be read as a checkpoint.
    """
    if not storage.exists(uri):
        return None
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(
            f"{uri}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to start over"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "identity" not in state:
        raise StorageError(f"{uri}: not a stage1-pro checkpoint (format {FORMAT}); delete it to start over")
    diffs = identity_differences(state["identity"], identity)
    if diffs:
        raise ConfigError(
            f"{uri} was written by a run with a different config or data, so it cannot be resumed: "
            + "; ".join(diffs)
            + ". Train into a new --out folder, or pass --no-resume to start this one over."
        )
    return state
