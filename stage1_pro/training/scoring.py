"""Running a model over prepared rows, and writing ``scores.npz`` for the held-out splits.

:func:`predict` is shared by per-epoch validation and final scoring; with data parallelism
each rank scores its slice of every batch and the results are gathered and put back in row
order. :func:`score_splits` writes the scores contract (:mod:`stage1_pro.scores`) for
``val_select``, ``val_calib`` and ``test`` with :func:`stage1_pro.scores.save_scores`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stage1_pro.training.distributed import DistInfo, gather_objects
from stage1_pro.training.loaders import EpochBatchSampler, device_batches, make_loader

SCORED_SPLITS: tuple[str, ...] = ("val_select", "val_calib", "test")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device when ``dtype`` is set, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    dataset: torch.utils.data.Dataset,
    rows: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    prepare_input: Callable[[torch.Tensor], torch.Tensor],
    amp_dtype: torch.dtype | None = None,
    dist_info: DistInfo | None = None,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """Outputs of ``forward`` for ``rows`` of ``dataset``, as float32 numpy arrays in ``rows`` order.

    Returns a dict with the model's output keys plus ``row`` (the rows, in the given order).
    """
    info = dist_info or DistInfo(device=device)
    sampler = EpochBatchSampler(rows, batch_size, shuffle=False, rank=info.rank, world_size=info.world_size)
    loader = make_loader(dataset, sampler, num_workers=num_workers, pin_memory=device.type == "cuda")
    parts: dict[str, list[np.ndarray]] = {}
    for x, _, batch_rows in device_batches(loader, device):
        x = prepare_input(x)
        with autocast(device, amp_dtype):
            out = forward(x)
        for key, value in out.items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
        parts.setdefault("row", []).append(batch_rows.numpy())
    local = {k: np.concatenate(v) for k, v in parts.items()} if parts else {}
    gathered = [g for g in gather_objects(info, local) if g]
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}
    order = np.argsort(merged["row"], kind="stable")
    position = np.searchsorted(merged["row"][order], np.asarray(rows))
    return {k: v[order][position] for k, v in merged.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (probabilities that sum to 1 for the scores contract)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score_splits(
    uri: str,
    outputs: dict[str, dict[str, np.ndarray]],
    dataset_index: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Write ``scores.npz`` from per-split model outputs; return a small summary per split."""
    from stage1_pro.scores import save_scores

    splits = [s for s in SCORED_SPLITS if s in outputs]
    has_gate = all("gate_logit" in outputs[s] for s in splits)
    save_scores(
        uri,
        index=np.concatenate([dataset_index[s] for s in splits]),
        split=np.concatenate([np.full(len(dataset_index[s]), s) for s in splits]),
        label=np.concatenate([labels[s] for s in splits]),
        probs=np.concatenate([softmax(outputs[s]["logits"]) for s in splits]),
        gate_logit=np.concatenate([outputs[s]["gate_logit"] for s in splits]) if has_gate else None,
    )
    return {
        s: {"n": len(labels[s]), "accuracy": float((outputs[s]["logits"].argmax(1) == labels[s]).mean())}
        for s in splits
    }
