"""Phase recipes: what ``train --phase N`` changes in the one training engine.

Phases are cumulative capability levels (DESIGN.md). Each is a :class:`PhaseRecipe`: its heads,
its loss (a name in :mod:`stage1_pro.losses`), the value monitored on ``val_select`` to keep the
best epoch, and optional hooks for what later phases add:

* ``check_config(config)``: extra checks run with the preflight, before any work;
* ``before_training(ctx)``: runs once before supervised training (phase 4: ExPLoRA's
  self-supervised extended pre-training of the backbone); ``ctx`` is an engine ``PhaseContext``;
* ``create_optimizer(module, config, device=...)``: another optimiser (phase 5: F-SAM);
* ``create_sampler(rows, labels, config, dist)``: another batch sampler (with ``set_epoch``),
  e.g. class-balanced batches (phase 6);
* ``train_step(state, x, y, accum, *, last_micro)``: a custom forward/backward of one
  micro-batch (e.g. SAM's second pass once the last micro-batch of an update is in); the
  engine then calls ``optimizer.step()``;
* ``loss``: another registered loss (phase 6: ConformalRiskLoss).

Phases 4-6 are registered as *not built*: ``train --phase 4`` fails at once with a clear
:class:`NotBuiltError` instead of silently running another phase. Filling one in is
``register_phase(PhaseRecipe(4, ...))`` from the module that implements it (listed in
:data:`PHASE_MODULES`, imported on demand).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stage1_pro.errors import ConfigError, NotBuiltError
from stage1_pro.models.heads import CLASSIFIER_HEADS, SELECTIVE_HEADS


@dataclass(frozen=True)
class PhaseRecipe:
    """How one phase trains.

    Attributes:
        phase: 1..6.
        name: short name shown in logs and errors.
        heads: heads of the model (``classifier`` or the three SelectiveNet heads).
        loss: registered loss name.
        monitor: metrics.csv column chosen on ``val_select`` for ``model_best.pth``.
        monitor_mode: ``max`` or ``min``.
        finetune_modes: allowed resolved fine-tune modes.
        built: False for a designed phase that is not implemented yet.
        before_training, create_optimizer, train_step: optional hooks (see module docstring).
    """

    phase: int
    name: str
    heads: tuple[str, ...] = CLASSIFIER_HEADS
    loss: str = "ce"
    monitor: str = "val_accuracy"
    monitor_mode: str = "max"
    finetune_modes: tuple[str, ...] = ("full", "frozen", "peft")
    built: bool = True
    not_built_hint: str = ""
    check_config: Callable[[Any], None] | None = None
    before_training: Callable[[Any], None] | None = None
    create_optimizer: Callable[..., Any] | None = None
    create_sampler: Callable[..., Any] | None = None
    train_step: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


PHASES: dict[int, PhaseRecipe] = {}
#: Module that registers the full recipe of a phase when imported (research phases).
PHASE_MODULES: dict[int, str] = {
    4: "stage1_pro.training.research",
    5: "stage1_pro.training.research",
    6: "stage1_pro.training.research",
}


def register_phase(recipe: PhaseRecipe) -> PhaseRecipe:
    """Add or replace the recipe of ``recipe.phase``."""
    PHASES[recipe.phase] = recipe
    return recipe


register_phase(PhaseRecipe(1, "baseline", CLASSIFIER_HEADS, "ce", "val_accuracy", "max"))
register_phase(
    PhaseRecipe(2, "peft", CLASSIFIER_HEADS, "ce", "val_accuracy", "max", finetune_modes=("peft",))
)
register_phase(PhaseRecipe(3, "selective", SELECTIVE_HEADS, "selective", "val_loss", "min"))
for _phase, _name, _hint in (
    (
        4,
        "ExPLoRA",
        "self-supervised extended pre-training on unlabeled in-domain images, then phase-3 training",
    ),
    (5, "F-SAM", "the Friendly-SAM optimiser with SelectiveLoss"),
    (6, "conformal risk training", "ConformalRiskLoss, a differentiable CRC threshold"),
):
    register_phase(
        PhaseRecipe(
            _phase, _name, SELECTIVE_HEADS, "selective", "val_loss", "min", built=False, not_built_hint=_hint
        )
    )


def get_phase(phase: int) -> PhaseRecipe:
    """The recipe of ``phase``; raises :class:`NotBuiltError` for a phase not implemented yet."""
    if phase not in PHASES:
        raise ConfigError(f"phase={phase!r} is not a phase; phases are {', '.join(map(str, sorted(PHASES)))}")
    recipe = PHASES[phase]
    if not recipe.built and phase in PHASE_MODULES:
        try:
            importlib.import_module(PHASE_MODULES[phase])  # registers the real recipe
        except ModuleNotFoundError as exc:
            if exc.name is None or not PHASE_MODULES[phase].startswith(exc.name):
                raise
        recipe = PHASES[phase]
    if not recipe.built:
        raise NotBuiltError(
            f"phase {phase} ({recipe.name}) is not built yet: it adds {recipe.not_built_hint}. "
            f"Run --phase 3 (SelectiveNet heads + SelectiveLoss) or lower until it lands; "
            "no other phase is run in its place."
        )
    return recipe


def check_finetune_mode(recipe: PhaseRecipe, mode: str) -> None:
    """Raise :class:`ConfigError` if the phase cannot train with this fine-tune mode."""
    if mode not in recipe.finetune_modes:
        raise ConfigError(
            f"phase {recipe.phase} ({recipe.name}) trains with finetune_mode "
            f"{' | '.join(recipe.finetune_modes)}, not {mode!r}; use --finetune-mode auto"
        )
