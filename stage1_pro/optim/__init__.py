"""Optimiser and learning-rate schedule factories (timm-style ``create_*``).

* :func:`create_optimizer`: AdamW over the trainable parameters, without weight decay on
  biases and normalisation/1-D parameters (the usual ViT/timm recipe); the fused kernel (one
  pass over each parameter for the whole update) on CUDA and CPU, the multi-tensor (foreach)
  path elsewhere.
* :func:`create_scheduler`: per-update linear warm-up then cosine decay to zero, as a
  ``LambdaLR`` (so its state is saved in checkpoints and resumes exactly).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from stage1_pro.config import Stage1ProConfig


#: Device types with a fused AdamW kernel.
FUSED_ADAMW_DEVICES: frozenset[str] = frozenset({"cuda", "cpu"})


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices, kernels) and not decayed (1-D, biases)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(
    model: nn.Module,
    config: Stage1ProConfig | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    device: torch.device | str | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters (``lr``/``weight_decay`` from ``config`` unless given).

    ``fused=True`` on CUDA and CPU (one pass per parameter for the whole update: on one CPU thread
    a ViT-S step is 4 % faster than with ``foreach``, ``bench/train_throughput.py``), ``foreach=True``
    elsewhere.
    """
    lr = lr if lr is not None else (config.lr if config is not None else 1e-3)
    weight_decay = (
        weight_decay if weight_decay is not None else (config.weight_decay if config is not None else 0.05)
    )
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if device is None:
        device = next(p.device for g in groups for p in g["params"])
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None, foreach=None if fused else True)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier at optimiser update ``step``: linear warm-up to 1, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    config: Stage1ProConfig | None = None,
    *,
    updates_per_epoch: int,
    epochs: int | None = None,
    warmup_epochs: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine schedule with linear warm-up, stepped once per optimiser update."""
    epochs = epochs if epochs is not None else (config.epochs if config is not None else 1)
    warmup_epochs = warmup_epochs if warmup_epochs is not None else (config.warmup_epochs if config else 0.0)
    total = max(1, epochs * updates_per_epoch)
    warmup = round(warmup_epochs * updates_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))


__all__ = ["create_optimizer", "create_scheduler", "param_groups", "warmup_cosine"]
