"""``torch.compile`` for the training step: the repeated block compiled once (regional compilation).

A ViT is the same block twelve times. Compiling the whole model traces, optimises and generates
code for all of it before the first step; compiling each block instead (``block.compile()``, in
place) traces the block once and reuses the generated code for every other block whose guards
match (same code, shapes and dtypes; the parameters are inputs, not constants). Measured with
``bench/startup.py``, this cuts the time to the first step by about half at the same steady
step time (README, "Training speed").

Modules without a run of identical blocks (a convnet's stages of different blocks, the heads
alone on cached features) are compiled whole. Validation and scoring run eagerly
(:func:`eager`): their no-gradient, larger-batch graphs would otherwise be compiled too.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

_LOG = logging.getLogger("stage1_pro.training")

#: Shortest run of same-class sibling blocks compiled block by block.
MIN_REPEATED_BLOCKS = 2
#: Smallest share of the module's parameters those blocks must hold (else the whole module is
#: compiled: compiling a few blocks of a convnet stage would leave the rest eager).
MIN_BLOCK_PARAMETER_SHARE = 0.5


def _parameter_count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of ``module`` to compile one by one, or ``[]`` when it should be compiled whole.

    The longest ``ModuleList``/``Sequential`` whose children are blocks of one class (not
    containers themselves), when it holds at least :data:`MIN_BLOCK_PARAMETER_SHARE` of the
    parameters: a timm ViT's ``blocks``.
    """
    best: list[nn.Module] = []
    for container in module.modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        children = list(container.children())
        kinds = {type(c) for c in children}
        if (
            len(children) > len(best)
            and len(kinds) == 1
            and not issubclass(kinds.pop(), nn.ModuleList | nn.Sequential)
        ):
            best = children
    total = _parameter_count([module])
    if len(best) < MIN_REPEATED_BLOCKS or _parameter_count(best) < MIN_BLOCK_PARAMETER_SHARE * total:
        return []
    return best


def compile_for_training(module: nn.Module) -> nn.Module:
    """``module`` compiled for the training step: block by block when it repeats a block, else whole.

    Args:
        module: the module the step calls (already wrapped by DDP when data-parallel).

    Returns:
        The module to call: ``module`` itself with its blocks compiled in place, or
        ``torch.compile(module)``.
    """
    blocks = repeated_blocks(module)
    if not blocks:
        return torch.compile(module)
    for block in blocks:
        block.compile()
    _LOG.info("torch.compile: %d %s blocks compiled one by one", len(blocks), type(blocks[0]).__name__)
    return module


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside the context (validation, feature caching, scoring)."""
    return torch.compiler.set_stance("force_eager")
