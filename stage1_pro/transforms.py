"""Tensor transforms on batches of images, on whichever device the batch is.

* :func:`normalize`: ``uint8`` batch (NHWC) -> float ``(x / 255 - mean) / std`` in NCHW (done on
  the GPU during training; the last step of :mod:`stage1_pro.preprocessing`).
* :func:`augment`: training-time augmentation of the normalised batch, with an explicit
  generator so that runs are reproducible and resumable.

How an image file becomes the ``uint8`` array is :mod:`stage1_pro.preprocessing`'s job.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

AUGMENTATIONS: tuple[str, ...] = ("none", "shift", "flip_shift")


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
