"""What the training tests share: the tiny CPU training settings."""

from __future__ import annotations

from typing import Any

from stage1_pro.config import Stage1ProConfig

#: A randomly initialised tiny EfficientNet at 32 px, one epoch: seconds on a CPU.
TINY_TRAINING: dict[str, Any] = {
    "model_name": "test_efficientnet",
    "pretrained": False,
    "img_size": 32,
    "batch_size": 32,
    "epochs": 1,
    "num_workers": 0,
    "lr": 3e-3,
    "log_every": 1000,
}


def tiny_config(**overrides: Any) -> Stage1ProConfig:
    """The tiny training settings with ``overrides``."""
    return Stage1ProConfig(**{**TINY_TRAINING, **overrides})
