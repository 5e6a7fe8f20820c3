"""Training losses, created by name (timm-style registry).

Every loss is an ``nn.Module`` with ``forward(outputs: dict, target) -> dict``: ``"loss"`` is the
scalar to back-propagate, other entries are detached values for logging.

``create_loss("ce" | "selective" | "conformal_risk", config=None, **overrides)``; other losses
can be added with :func:`register_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from stage1_pro.errors import ConfigError
from stage1_pro.losses.classification import CrossEntropyLoss
from stage1_pro.losses.conformal_risk import ConformalRiskLoss
from stage1_pro.losses.selective import SelectiveLoss

if TYPE_CHECKING:
    from stage1_pro.config import Stage1ProConfig


def _ce_kwargs(config: Stage1ProConfig) -> dict[str, Any]:
    return {"class_weights": config.class_weights, "label_smoothing": config.label_smoothing}


def _selective_kwargs(config: Stage1ProConfig) -> dict[str, Any]:
    return {
        **_ce_kwargs(config),
        "target_fnr_exit": config.target_fnr_exit,
        "penalty": config.selective_penalty,
        "aux_weight": config.selective_aux_weight,
        "dual_lr": config.selective_dual_lr,
    }


def _conformal_risk_kwargs(config: Stage1ProConfig) -> dict[str, Any]:
    return {
        **_ce_kwargs(config),
        "target_fnr_exit": config.target_fnr_exit,
        "temperature": config.crt_temperature,
        "window": config.crt_window,
        "ce_weight": config.crt_ce_weight,
        "aux_weight": config.selective_aux_weight,
    }


#: name -> (loss class, function reading its keyword arguments from a config).
LOSSES: dict[str, tuple[Callable[..., nn.Module], Callable[[Stage1ProConfig], dict[str, Any]]]] = {
    "ce": (CrossEntropyLoss, _ce_kwargs),
    "selective": (SelectiveLoss, _selective_kwargs),
    "conformal_risk": (ConformalRiskLoss, _conformal_risk_kwargs),
}


def register_loss(
    name: str, factory: Callable[..., nn.Module], from_config: Callable[[Stage1ProConfig], dict[str, Any]]
) -> None:
    """Register a loss under ``name``: ``factory(**from_config(config), **overrides)``."""
    LOSSES[name] = (factory, from_config)


def create_loss(name: str, config: Stage1ProConfig | None = None, **overrides: Any) -> nn.Module:
    """Create the loss ``name``, its arguments read from ``config`` then ``overrides``."""
    if name not in LOSSES:
        raise ConfigError(f"loss {name!r} is unknown; registered losses: {', '.join(LOSSES)}")
    factory, from_config = LOSSES[name]
    kwargs = from_config(config) if config is not None else {}
    kwargs.update(overrides)
    return factory(**kwargs)


__all__ = ["LOSSES", "ConformalRiskLoss", "CrossEntropyLoss", "SelectiveLoss", "create_loss", "register_loss"]
