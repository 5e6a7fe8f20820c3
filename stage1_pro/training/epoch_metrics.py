"""What each epoch reports: validation metrics on ``val_select`` and the ``metrics.csv`` file.

The exits shown here are *monitoring only* (a softmax threshold fixed in the config, the gate at
logit 0): deployed thresholds are always certified on ``val_calib`` by ``calibrate``.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from stage1_pro import storage
from stage1_pro.training.scoring import softmax

if TYPE_CHECKING:
    from stage1_pro.config import Stage1ProConfig


def legacy_decisions(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Softmax exit at a fixed confidence (monitoring only): argmax class where max prob >= t."""
    from stage1_pro.decisions import DEFER

    return np.where(probs.max(axis=1) >= threshold, probs.argmax(axis=1), DEFER).astype(np.int8)


def epoch_metrics(
    outputs: dict[str, np.ndarray], labels: np.ndarray, loss_fn: nn.Module, config: Stage1ProConfig
) -> dict[str, float | None]:
    """Validation metrics of one epoch: loss on the whole split, accuracy, monitoring exits.

    Args:
        outputs: the model's outputs on ``val_select`` (``logits``, and ``gate_logit`` from phase 3).
        labels: the split's labels, in the same order.
        loss_fn: the training loss (run in eval mode here, then restored).
        config: the run's settings (``legacy_exit_threshold_for_logging``).

    Returns:
        ``val_loss``, ``val_accuracy``, ``val_aurc``, the legacy softmax exits' coverage and
        FNR_exit, and for a gate its coverage/FNR_exit at logit 0 and the soft coverage/FNR.
    """
    from stage1_pro.decisions import DEFER
    from stage1_pro.metrics import exit_metrics

    tensors = {k: torch.from_numpy(v) for k, v in outputs.items() if k != "row"}
    was_training = loss_fn.training
    loss_fn.eval()
    with torch.no_grad():
        val = loss_fn(tensors, torch.from_numpy(labels))
    loss_fn.train(was_training)
    probs = softmax(outputs["logits"])
    pred = probs.argmax(axis=1)
    legacy = exit_metrics(
        legacy_decisions(probs, config.legacy_exit_threshold_for_logging),
        labels,
        confidence=probs.max(axis=1),
        predictions=pred,
    )
    row: dict[str, float | None] = {
        "val_loss": float(val["loss"]),
        "val_accuracy": float((pred == labels).mean()),
        "val_aurc": legacy.get("aurc"),
        "val_coverage_legacy": legacy["coverage"],
        "val_fnr_exit_legacy": legacy["fnr_exit"],
    }
    if "gate_logit" in outputs:  # phase >= 3: the gate at its untrained-for threshold 0, monitoring only
        gate = exit_metrics(np.where(outputs["gate_logit"] >= 0, pred, DEFER).astype(np.int8), labels)
        row.update(
            {
                "val_gate_coverage": gate["coverage"],
                "val_gate_fnr_exit": gate["fnr_exit"],
                "val_soft_coverage": float(val["coverage"]),
                "val_soft_fnr": float(val["fnr_soft"]),
            }
        )
    return row


def write_metrics_csv(uri: str, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv (one row per finished epoch) atomically."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()}
        )
    storage.write_text(uri, buf.getvalue(), content_type="text/csv")
