"""Train in one process or in several data-parallel ones: the call behind `train` and the KFP train task."""

from __future__ import annotations

import os
from typing import Any

from stage1_pro.errors import ConfigError
from stage1_pro.training.distributed import launch


def _train_worker(config_dict: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """One training process (module level, so that spawned processes can import it)."""
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.training.engine import train

    return train(Stage1ProConfig(**config_dict), **kwargs)


def train_processes(config: Any, nproc_per_node: int = 1, **train_kwargs: Any) -> dict[str, Any]:
    """Train ``config`` in ``nproc_per_node`` data-parallel processes; rank 0's summary.

    One process trains in this one. More start local workers as ``torchrun --standalone`` would,
    unless this process already is a torchrun worker (``LOCAL_RANK`` set), which then trains its
    own share. ``train_kwargs`` are :func:`stage1_pro.training.train`'s keyword arguments.

    Raises:
        ConfigError: ``nproc_per_node`` below 1.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node={nproc_per_node}: must be >= 1 (one process per GPU)")
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch(nproc_per_node, _train_worker, config.to_dict(), train_kwargs)[0]
    return _train_worker(config.to_dict(), train_kwargs)
