"""Recipes of the research phases 4-6, registered into :mod:`stage1_pro.training.phases` on import.

Each is phase 3 (SelectiveNet heads: classifier, gate, auxiliary) plus one change:

* **4, ExPLoRA** (:mod:`stage1_pro.training.explora`): before supervised training, the ViT backbone gets
  DINO-style extended pre-training on unlabeled in-domain images (or a saved extended backbone
  is reused, ``explora_backbone``); then phase-3 training with SelectiveLoss.
* **5, F-SAM** (:mod:`stage1_pro.optim.fsam`): phase 3 with the Friendly-SAM optimiser around
  AdamW. Each update runs two forward/backward passes over all micro-batches of the step: at
  ``w`` (the engine's pass), then at ``w + eps`` with BatchNorm statistics frozen and the loss in
  eval mode (SelectiveLoss's dual ascent moves once per step); the engine's
  ``optimizer.step()`` then restores ``w`` and steps AdamW with the second gradient.
* **6, conformal risk training** (:mod:`stage1_pro.losses.conformal_risk`): ConformalRiskLoss on
  class-balanced batches (:class:`~stage1_pro.training.loaders.ClassBalancedBatchSampler`) of
  ``crt_batch_size`` images, by default large enough that each pseudo-calibration half holds
  twice the ``ceil(1/target_fnr_exit) - 1`` positives the CRC threshold needs. All three
  policies can be calibrated afterwards; SCRC is the recommended production policy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from stage1_pro.errors import ConfigError
from stage1_pro.models.heads import SELECTIVE_HEADS
from stage1_pro.training.phases import PhaseRecipe, register_phase

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.training.distributed import DistInfo
    from stage1_pro.training.engine import PhaseContext, TrainState

_LOG = logging.getLogger("stage1_pro.training")


# ------------------------------------------------------------------------------------------
# phase 4


def _check_explora(config: Stage1ProConfig) -> None:
    from stage1_pro.training.explora import check_explora_model

    check_explora_model(config.model_name)
    if config.explora_epochs < 1 and not config.explora_backbone:
        raise ConfigError(
            "explora_epochs=0 with no explora_backbone: phase 4 would not extend the backbone; "
            "set --explora-epochs >= 1 or pass --explora-backbone DIR (or use phase 3)"
        )


def _explora_before_training(ctx: PhaseContext) -> None:
    from stage1_pro.training.explora import run_phase4

    run_phase4(ctx)


# ------------------------------------------------------------------------------------------
# phase 5


def _fsam_optimizer(
    module: nn.Module, config: Stage1ProConfig, *, device: Any = None
) -> torch.optim.Optimizer:
    from stage1_pro.optim import create_optimizer
    from stage1_pro.optim.fsam import FSAM

    base = create_optimizer(module, config, device=device)
    return FSAM(base, rho=config.fsam_rho, sigma=config.fsam_sigma, lmbda=config.fsam_lambda)


def _fsam_train_step(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, accum: int, *, last_micro: bool = True
) -> dict[str, torch.Tensor]:
    """First pass per micro-batch; after the last micro-batch of an update, the perturbed pass."""
    from stage1_pro.optim.fsam import frozen_bn_stats
    from stage1_pro.training.engine import default_train_step

    losses = default_train_step(state, x, y, accum)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = state.recipe_state.setdefault("fsam_pending", [])
    pending.append((x, y))
    if not last_micro:
        return losses
    optimizer = state.optimizer
    optimizer.first_step(zero_grad=True)  # gradient accumulation of this update is complete
    was_training = state.loss_fn.training
    try:
        state.loss_fn.eval()
        with frozen_bn_stats(state.module):
            sync = getattr(state.step_module, "no_sync", None)
            for i, (xb, yb) in enumerate(pending):
                last = i == len(pending) - 1
                if sync is not None and not last:
                    with sync():
                        default_train_step(state, xb, yb, accum)
                else:
                    default_train_step(state, xb, yb, accum)
    except BaseException:
        optimizer.restore()
        raise
    finally:
        state.loss_fn.train(was_training)
        pending.clear()
    return losses  # the engine's optimizer.step() restores w and steps the base optimiser


# ------------------------------------------------------------------------------------------
# phase 6


def crt_batch_size(config: Stage1ProConfig, world_size: int = 1) -> int:
    """Phase 6's global batch: ``crt_batch_size``, else the larger of ``batch_size`` and 2x the CRC minimum.

    ConformalRiskLoss works on each process's batch, so every process needs the minimum
    (:func:`~stage1_pro.losses.conformal_risk.min_batch_size`: each pseudo-calibration half must hold
    ``ceil(1/target) - 1`` positives). At exactly the minimum the threshold exists only when *every*
    calibration positive is classified right (``k* = n``); twice as many positives leave room for
    the threshold to sit above a few low-confidence misses, hence the default. An explicit value
    below the minimum is an error.
    """
    from stage1_pro.losses.conformal_risk import min_batch_size, min_positives

    minimum = min_batch_size(config.target_fnr_exit) * world_size
    if config.crt_batch_size is None:
        batch = max(config.batch_size, 2 * minimum)
        return -(-batch // world_size) * world_size  # a multiple of the process count
    if config.crt_batch_size < minimum:
        per = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise ConfigError(
            f"crt_batch_size={config.crt_batch_size} is too small for "
            f"target_fnr_exit={config.target_fnr_exit}: each pseudo-calibration half of a class-balanced "
            f"batch needs >= {min_positives(config.target_fnr_exit)} positives before the CRC threshold "
            f"exists, i.e. a batch of >= {minimum // world_size}{per}; pass --crt-batch-size {2 * minimum} "
            "(or leave it unset for that default)"
        )
    return config.crt_batch_size


def _check_crt(config: Stage1ProConfig) -> None:
    crt_batch_size(config)


def _crt_sampler(
    rows: np.ndarray, labels: np.ndarray, config: Stage1ProConfig, dist: DistInfo
) -> torch.utils.data.Sampler:
    from stage1_pro.training.distributed import per_rank_batch
    from stage1_pro.training.loaders import ClassBalancedBatchSampler

    batch = crt_batch_size(config, dist.world_size)
    per_rank_batch(batch, dist)  # ConfigError unless it splits evenly
    if batch != config.batch_size:
        _LOG.info(
            "phase 6: class-balanced batches of %d (batch_size=%d is below twice the CRC minimum for "
            "target_fnr_exit=%g; set --crt-batch-size to choose)",
            batch, config.batch_size, config.target_fnr_exit,
        )  # fmt: skip
    return ClassBalancedBatchSampler(
        rows, labels, batch, seed=config.seed, rank=dist.rank, world_size=dist.world_size
    )


# ------------------------------------------------------------------------------------------

register_phase(
    PhaseRecipe(phase=4, name="ExPLoRA", heads=SELECTIVE_HEADS, loss="selective", monitor="val_loss",
                monitor_mode="min", check_config=_check_explora, before_training=_explora_before_training)
)  # fmt: skip
register_phase(
    PhaseRecipe(phase=5, name="F-SAM", heads=SELECTIVE_HEADS, loss="selective", monitor="val_loss",
                monitor_mode="min", create_optimizer=_fsam_optimizer, train_step=_fsam_train_step)
)  # fmt: skip
register_phase(
    PhaseRecipe(phase=6, name="conformal risk training", heads=SELECTIVE_HEADS, loss="conformal_risk",
                monitor="val_loss", monitor_mode="min", check_config=_check_crt, create_sampler=_crt_sampler)
)  # fmt: skip
