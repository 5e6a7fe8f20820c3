"""Phase recipes: what ``train --phase N`` changes in the one training engine.

Phases are cumulative capability levels. Each is a :class:`PhaseRecipe`, registered where it is
defined: phases 1-3 below, the research phases 4-6 in :mod:`stage1_pro.training.research`.
Importing :mod:`stage1_pro.training` (which importing any of its modules does first) imports every
module of :data:`PHASE_MODULES`, so the registry always holds all phases, each registered once.

A recipe names its heads, its loss (a name in :mod:`stage1_pro.losses`), the value monitored on
``val_select`` to keep the best epoch, and optional hooks for what later phases add:

* ``check_config(config)``: extra checks run with the preflight, before any work;
* ``before_training(ctx)``: runs once before supervised training (phase 4: ExPLoRA's
  self-supervised extended pre-training of the backbone); ``ctx`` is an engine ``PhaseContext``;
* ``create_optimizer(module, config, device=...)``: another optimiser (phase 5: F-SAM);
* ``create_sampler(rows, labels, config, dist)``: another batch sampler (with ``set_epoch``),
  e.g. class-balanced batches (phase 6);
* ``train_step(state, x, y, accum, *, last_micro)``: a custom forward/backward of one
  micro-batch (e.g. SAM's second pass once the last micro-batch of an update is in); the
  engine then calls ``optimizer.step()``; ``state.recipe_state`` is its scratch space;
* ``loss``: another registered loss (phase 6: ConformalRiskLoss).

A recipe registered with ``built=False`` stands for a designed phase whose code has not landed:
``train`` refuses it at once with :class:`NotBuiltError` instead of running another phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stage1_pro.errors import ConfigError, NotBuiltError
from stage1_pro.models.heads import CLASSIFIER_HEADS, SELECTIVE_HEADS


@dataclass(frozen=True, kw_only=True)
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
        built: False for a designed phase that is not implemented yet (``not_built_hint``: what
            it will add, shown in the error).
        check_config, before_training, create_optimizer, create_sampler, train_step: optional
            hooks (see the module docstring).
        extra: free-form facts of the recipe.
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
#: Modules besides this one that register recipes (the package imports them all).
PHASE_MODULES: tuple[str, ...] = ("stage1_pro.training.research",)


def register_phase(recipe: PhaseRecipe) -> PhaseRecipe:
    """Add the recipe of ``recipe.phase`` to :data:`PHASES`.

    Raises:
        ValueError: the phase already has a recipe (one definition per phase).
    """
    if recipe.phase in PHASES:
        raise ValueError(
            f"phase {recipe.phase} is already registered ({PHASES[recipe.phase].name}); "
            f"a phase has one recipe, defined where it is registered"
        )
    PHASES[recipe.phase] = recipe
    return recipe


register_phase(PhaseRecipe(phase=1, name="baseline"))
register_phase(PhaseRecipe(phase=2, name="peft", finetune_modes=("peft",)))
register_phase(
    PhaseRecipe(phase=3, name="selective", heads=SELECTIVE_HEADS, loss="selective", monitor="val_loss",
                monitor_mode="min")
)  # fmt: skip


def get_phase(phase: int) -> PhaseRecipe:
    """The recipe of ``phase``.

    Raises:
        ConfigError: no such phase.
        NotBuiltError: the phase is registered as not built.
    """
    if phase not in PHASES:
        raise ConfigError(f"phase={phase!r} is not a phase; phases are {', '.join(map(str, sorted(PHASES)))}")
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
