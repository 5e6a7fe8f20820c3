"""The ``scores.npz`` contract: per-image class probabilities (and gate logits) for the
non-training splits.

Training writes one ``scores.npz`` per run; calibration, validation and the SCRC step work from
it alone (no model, no GPU), so they can be rerun, compared and benchmarked on any scores file.

Arrays (all of length ``n``):

``index``
    integer dataset row (unique, >= 0).
``split``
    string, one of :data:`SCORE_SPLITS` (``val_select``, ``val_calib``, ``test``).
``label``
    integer 0/1 ground truth.
``probs``
    float ``(n, 2)`` class probabilities in [0, 1], each row summing to 1 (within 1e-4).
``gate_logit`` (optional, phase >= 3)
    float selection-head logit.

The file is validated on write (:func:`save_scores`) and on read (:func:`load_scores`); every
problem raises :class:`~stage1_pro.errors.DataError` naming the file and the key. Arrays are
stored without pickling (``np.load(allow_pickle=False)``) and written atomically.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stage1_pro import storage
from stage1_pro.errors import DataError

#: The splits a scores file may hold (``train`` is never scored for calibration).
SCORE_SPLITS: tuple[str, ...] = ("val_select", "val_calib", "test")
REQUIRED_KEYS: tuple[str, ...] = ("index", "split", "label", "probs")
OPTIONAL_KEYS: tuple[str, ...] = ("gate_logit",)
#: Tolerance on ``probs.sum(axis=1) == 1``.
PROB_SUM_TOL = 1e-4


def _fail(source: str, key: str | None, msg: str) -> DataError:
    where = f"{source}: key '{key}'" if key else source
    return DataError(f"{where}: {msg}")


def _check_float(source: str, key: str, arr: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise _fail(source, key, f"must be a float array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise _fail(
            source,
            key,
            f"{rows.size} row(s) hold NaN or inf (first rows: {rows[:5].tolist()}); "
            "fix the scoring step (e.g. a diverged model) before calibrating",
        )
    return arr


def _validate(source: str, arrays: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """Check and normalise the arrays; return them with canonical dtypes."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays or arrays[k] is None]
    if missing:
        raise _fail(source, None, f"missing key(s) {missing}; a scores file needs {list(REQUIRED_KEYS)}")
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _fail(
            source, None, f"unexpected key(s) {unknown}; allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}"
        )

    index = np.asarray(arrays["index"])
    if index.ndim != 1:
        raise _fail(source, "index", f"must be 1-D, got shape {index.shape}")
    n = index.shape[0]
    if n == 0:
        raise _fail(source, "index", "the file holds no rows")
    if not np.issubdtype(index.dtype, np.integer):
        raise _fail(source, "index", f"must hold integers (dataset rows), got dtype {index.dtype}")
    index = index.astype(np.int64, copy=False)
    if (index < 0).any():
        raise _fail(source, "index", "dataset rows must be >= 0")
    if np.unique(index).size != n:
        raise _fail(source, "index", "holds duplicate dataset rows; each image is scored once")

    def _shape(key: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
        if arr.shape != shape:
            raise _fail(source, key, f"expected shape {shape} (n = len(index) = {n}), got {arr.shape}")

    split = arrays["split"]
    split = np.full(n, split) if isinstance(split, str) else np.asarray(split)
    _shape("split", split, (n,))
    if split.dtype.kind != "U":
        if split.dtype.kind == "S":
            split = split.astype(str)
        else:
            raise _fail(source, "split", f"must hold strings, got dtype {split.dtype}")
    bad_names = sorted(set(np.unique(split).tolist()) - set(SCORE_SPLITS))
    if bad_names:
        raise _fail(source, "split", f"unknown split name(s) {bad_names}; allowed: {list(SCORE_SPLITS)}")

    label = np.asarray(arrays["label"])
    _shape("label", label, (n,))
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise _fail(
            source, "label", f"must hold integers 0/1, got dtype {label.dtype} (cast with .astype(int))"
        )
    label = label.astype(np.int64, copy=False)
    bad = (label != 0) & (label != 1)
    if bad.any():
        raise _fail(
            source,
            "label",
            f"labels must be 0 or 1 (binary task); found {sorted(np.unique(label[bad]).tolist())[:5]}",
        )

    probs = _check_float(source, "probs", np.asarray(arrays["probs"]))
    _shape("probs", probs, (n, 2))
    if ((probs < 0) | (probs > 1)).any():
        raise _fail(source, "probs", "probabilities must lie in [0, 1]; pass softmax outputs, not logits")
    row_sum = probs.sum(axis=1)
    off = np.abs(row_sum - 1.0) > PROB_SUM_TOL
    if off.any():
        first = int(np.argmax(off))
        raise _fail(
            source,
            "probs",
            f"{int(off.sum())} row(s) do not sum to 1 within {PROB_SUM_TOL} "
            f"(row {first} sums to {row_sum[first]:.6g}); pass softmax over the two classes",
        )

    gate = arrays.get("gate_logit")
    if gate is not None:
        gate = _check_float(source, "gate_logit", np.asarray(gate))
        _shape("gate_logit", gate, (n,))
    return {"index": index, "split": split, "label": label, "probs": probs, "gate_logit": gate}


@dataclass(frozen=True, eq=False)
class Scores:
    """Validated scores of one run (see the module docstring for the arrays).

    Construct with :func:`load_scores`, or directly (the arrays are validated either way).
    """

    index: np.ndarray
    split: np.ndarray
    label: np.ndarray
    probs: np.ndarray
    gate_logit: np.ndarray | None = None
    source: str = field(default="<scores>", repr=True)

    def __post_init__(self) -> None:
        arrays = _validate(
            self.source,
            {
                "index": self.index,
                "split": self.split,
                "label": self.label,
                "probs": self.probs,
                "gate_logit": self.gate_logit,
            },
        )
        for key, value in arrays.items():
            object.__setattr__(self, key, value)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def has_gate(self) -> bool:
        """True when the file carries gate logits (phase >= 3 models)."""
        return self.gate_logit is not None

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names present, in :data:`SCORE_SPLITS` order."""
        present = set(np.unique(self.split).tolist())
        return tuple(s for s in SCORE_SPLITS if s in present)

    def subset(self, split: str) -> Scores:
        """Rows of one split, as a new :class:`Scores`.

        Raises:
            DataError: ``split`` is not a score split, or the file has no rows of it.
        """
        if split not in SCORE_SPLITS:
            raise DataError(f"{self.source}: unknown split {split!r}; allowed: {list(SCORE_SPLITS)}")
        mask = self.split == split
        if not mask.any():
            raise DataError(
                f"{self.source}: key 'split': no rows of split {split!r} (present: {list(self.splits)}); "
                "score this split during training"
            )
        return Scores(
            index=self.index[mask],
            split=self.split[mask],
            label=self.label[mask],
            probs=self.probs[mask],
            gate_logit=None if self.gate_logit is None else self.gate_logit[mask],
            source=f"{self.source}[{split}]",
        )


def save_scores(
    uri: str,
    *,
    index: Any,
    split: Any,
    label: Any,
    probs: Any,
    gate_logit: Any | None = None,
) -> None:
    """Validate the arrays and write them atomically as an uncompressed ``.npz`` (local or gs://).

    ``split`` may be one string (all rows of one split) or an array of split names. Arrays may
    be numpy arrays or anything ``np.asarray`` accepts (convert torch tensors with ``.numpy()``).
    """
    arrays = _validate(
        str(uri),
        {"index": index, "split": split, "label": label, "probs": probs, "gate_logit": gate_logit},
    )
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in arrays.items() if v is not None})
    storage.write_bytes(uri, buf.getvalue(), content_type="application/octet-stream")


def load_scores(uri: str) -> Scores:
    """Read and validate a scores file; raise :class:`DataError` naming the file and the key."""
    uri = str(uri)
    data = storage.read_bytes(uri)
    if not data.startswith(b"PK"):  # np.load would otherwise try to unpickle arbitrary bytes
        raise DataError(f"{uri}: not a readable .npz archive (no zip header); rewrite it with save_scores")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{uri}: not a readable .npz archive ({exc}); rewrite it with save_scores") from exc
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise DataError(
            f"{uri}: holds object arrays or is corrupt ({exc}); rewrite it with save_scores"
        ) from exc
    # check keys here: unknown keys would otherwise surface as a TypeError from the constructor
    _validate(uri, arrays)
    return Scores(**arrays, source=uri)
