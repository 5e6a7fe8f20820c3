"""Cross-entropy on the classifier head (phases 1-2), with class weights and label smoothing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the PyTorch convention)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy of ``outputs["logits"]``; ``forward`` returns ``{"loss": scalar}``.

    Args:
        class_weights: weight per class ``[w_negative, w_positive]`` (e.g. to make a missed
            positive cost more), or ``None``.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)
        self.label_smoothing = float(label_smoothing)

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(
            outputs["logits"].float(), target, weight=self.class_weights, label_smoothing=self.label_smoothing
        )
        return {"loss": loss}
