"""Data-parallel helpers: one process per device, launched by ``torchrun`` (or ``train --nproc-per-node``).

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_distributed` reads them
and joins the process group (NCCL on GPU, gloo on CPU). Without them it is a no-op and the run
is single-process. The effective batch does not depend on the number of processes: the
config's ``batch_size`` is the *global* batch per forward pass, each of ``world_size``
processes takes its ``batch_size / world_size`` slice of every global batch, and DDP averages
the gradients, so one optimiser step sees the same samples as on one device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stage1_pro.errors import ConfigError

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is present, else CPU; ``cuda`` gets the local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use --device cpu or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; return this process's :class:`DistInfo`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        _LOG.info("joined %s process group: rank %d of %d on %s", backend, dist.get_rank(), world, dev)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """``obj`` of rank 0 on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(info: DistInfo, value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (logging only)."""
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / info.world_size


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """This rank's share of the global batch; the global batch must split evenly."""
    if batch_size % info.world_size:
        raise ConfigError(
            f"batch_size={batch_size} does not split over {info.world_size} processes; "
            f"use a multiple of {info.world_size}"
        )
    return batch_size // info.world_size


def launch(nproc_per_node: int, fn: Any, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc_per_node`` local processes, as ``torchrun --standalone`` would.

    Each process gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (so :func:`init_distributed` joins
    the group); ``fn`` must be importable (a module-level function). Returns ``{rank: result}``.
    """
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"stage1-pro-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    return elastic_launch(config, fn)(*args)
