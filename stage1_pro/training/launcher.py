"""Train in one process or in several data-parallel ones: the call behind `train` and the KFP train task."""

from __future__ import annotations

import os
from typing import Any

import torch

from stage1_pro.errors import ConfigError
from stage1_pro.training.distributed import launch, resolve_device


def _train_worker(config_dict: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """One training process (module level, so that spawned processes can import it)."""
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.training.engine import train

    return train(Stage1ProConfig(**config_dict), **kwargs)


def check_process_count(nproc_per_node: int, device: str = "auto") -> None:
    """Refuse a process count this machine cannot run, before any process is started.

    On CUDA every process takes the GPU of its local rank, so ``nproc_per_node`` may not exceed the
    visible GPUs (else rank 1 dies with CUDA's ``invalid device ordinal`` traceback). On CPU any
    count runs (gloo).

    Args:
        nproc_per_node: data-parallel processes asked for.
        device: the config's ``device`` (``auto`` picks CUDA when present).

    Raises:
        ConfigError: ``nproc_per_node`` below 1, or above the visible GPU count on CUDA.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node={nproc_per_node}: must be >= 1 (one process per GPU)")
    if nproc_per_node == 1 or resolve_device(device).type != "cuda":
        return
    visible = torch.cuda.device_count()
    if nproc_per_node > visible:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={devices})" if devices is not None else ""
        raise ConfigError(
            f"--nproc-per-node={nproc_per_node} but this machine shows {visible} GPU(s){shown}: one "
            f"process per GPU; use --nproc-per-node {visible}, or --device cpu to run "
            f"{nproc_per_node} gloo processes on CPU"
        )


def train_processes(config: Any, nproc_per_node: int = 1, **train_kwargs: Any) -> dict[str, Any]:
    """Train ``config`` in ``nproc_per_node`` data-parallel processes; rank 0's summary.

    One process trains in this one. More start local workers as ``torchrun --standalone`` would,
    unless this process already is a torchrun worker (``LOCAL_RANK`` set), which then trains its
    own share. ``train_kwargs`` are :func:`stage1_pro.training.train`'s keyword arguments.

    Raises:
        ConfigError: see :func:`check_process_count`.
    """
    check_process_count(nproc_per_node, config.device)
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch(nproc_per_node, _train_worker, config.to_dict(), train_kwargs)[0]
    return _train_worker(config.to_dict(), train_kwargs)
