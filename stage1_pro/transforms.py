"""Image preprocessing shared by prepare, training, scoring and inference.

One path from a decoded image to the network's input, so the pixels the model sees at
inference are the pixels it was trained and calibrated on:

1. :func:`resize_image`: PIL image -> ``uint8`` array ``(img_size, img_size, 3)``: JPEG draft
   decoding (libjpeg scales by 1/2, 1/4 or 1/8 while decoding, never below the target size),
   conversion to RGB (grey, palette and RGBA images included), then an antialiased bilinear
   resize of the whole image to a square. ``prepare`` stores exactly these arrays.
2. :func:`normalize`: ``uint8`` batch (NHWC) -> float ``(x / 255 - mean) / std`` in NCHW, on
   whichever device the batch is (done on the GPU during training).

:func:`preprocess` chains both for a list of images (the eval-time transform). Training-time
augmentation (:func:`augment`) works on the normalised batch, on device, with an explicit
generator so that runs are reproducible and resumable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

#: Recorded in the prepared index so a reader can tell how shards were made.
RESIZE_METHOD = "draft+RGB+bilinear-antialias-square"
AUGMENTATIONS: tuple[str, ...] = ("none", "shift", "flip_shift")


def resize_image(image: Image.Image, img_size: int) -> np.ndarray:
    """Decode (draft-scaled for JPEG), convert to RGB and resize to a square ``uint8`` HWC array."""
    if getattr(image, "format", None) == "JPEG":
        # Decodes at the smallest 1/2^k scale >= target; a no-op once the pixels are loaded.
        image.draft("RGB", (img_size, img_size))
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    if image.size != (img_size, img_size):
        image = image.resize((img_size, img_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array


def load_image(uri: str, img_size: int) -> np.ndarray:
    """Read one image file (local or ``gs://``) straight to the training-resolution array.

    Unlike :func:`stage1_pro.data.open_image` (full decode), the JPEG decoder is told the target
    size first (draft mode): a 12-MP photo decodes at 1/8 scale, about twice as fast. EXIF
    orientation is applied, as in ``open_image``. This is what ``prepare`` stores and what
    inference on files should call.

    Raises:
        DataError: naming the file, when it cannot be read or decoded.
    """
    import io

    from PIL import ImageOps

    from stage1_pro import storage
    from stage1_pro.errors import DataError, StorageError

    try:
        data = storage.read_bytes(uri)
    except StorageError as exc:
        raise DataError(f"cannot read image: {exc}") from exc
    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            image.draft("RGB", (img_size, img_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return resize_image(image, img_size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{uri}: cannot decode image ({exc}); re-export the file or remove it from the dataset"
        ) from exc


@functools.lru_cache(maxsize=16)
def _norm_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them from Python lists each step would be a blocking host copy.
    mean_t = torch.tensor([m * 255.0 for m in mean], device=device).view(1, -1, 1, 1)
    inv_std = torch.tensor([1.0 / (s * 255.0) for s in std], device=device).view(1, -1, 1, 1)
    return mean_t, inv_std


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8`` NHWC (or float NCHW already in [0, 255]) -> normalised float32 NCHW."""
    if batch.dtype == torch.uint8:
        batch = batch.permute(0, 3, 1, 2)
    x = batch.float()
    mean_t, inv_std = _norm_constants(tuple(float(m) for m in mean), tuple(float(s) for s in std), x.device)
    return (x - mean_t) * inv_std


def preprocess(images: Sequence[Image.Image], model_info: dict[str, Any]) -> torch.Tensor:
    """The eval-time transform: PIL images -> normalised float tensor ``(n, 3, s, s)``."""
    size = int(model_info["img_size"])
    arrays = np.stack([resize_image(img, size) for img in images])
    return normalize(torch.from_numpy(arrays), model_info["mean"], model_info["std"])


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a normalised NCHW batch (on its device).

    ``shift``: random translation by up to 1/8 of the side (zero padding = the mean colour
    after normalisation), per sample. ``flip_shift``: also a horizontal flip with p = 0.5
    (street scenes; not for digits). ``none``: identity.
    """
    if mode == "none":
        return x
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment={mode!r}; allowed: {', '.join(AUGMENTATIONS)}")
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    dev = generator.device  # a generator on the batch's device avoids blocking host-to-device copies
    dy = torch.randint(-pad, pad + 1, (n,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(-pad, pad + 1, (n,), generator=generator, device=dev).to(x.device)
    rows = (torch.arange(h, device=x.device).view(1, h) - dy.view(n, 1)).clamp_(-1, h)
    cols = (torch.arange(w, device=x.device).view(1, w) - dx.view(n, 1)).clamp_(-1, w)
    if mode == "flip_shift":
        flip = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device).view(n, 1)
        cols = torch.where(flip, (w - 1) - cols, cols).clamp_(-1, w)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # zeros outside = mean colour
    idx_r = (rows + 1).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2)
    out = padded.gather(2, idx_r)
    idx_c = (cols + 1).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, idx_c)
