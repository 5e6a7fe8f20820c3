"""How big the pipeline's train pod is, from measured rates: the one place.

The train pod runs one training process per GPU, each fed by ``num_workers`` DataLoader workers
that gather rows of the memory-mapped prepared shards (training never decodes JPEGs). Its CPU,
memory and ``/dev/shm`` follow from three measured numbers (``bench/train_throughput.py``, README
"Sizing the train task's CPUs"):

- one loader worker delivers ~7,000 img/s of 224-px prepared images (batch 256) on an H200
  host (16 cores);
- a compiled ViT-S/14 training step consumes ~6,600 img/s on that H200 (bf16, batch 256);
- so ``ceil(6600 x headroom / 7000)`` workers keep one GPU fed: 2 with the 1.5x headroom below.

DataLoader workers hand batches to the training process through shared memory (``/dev/shm``),
which a container gets only 64 MiB of unless the pod mounts a memory-backed emptyDir there. At
most ``num_workers x prefetch_factor`` batches are in flight per process; the largest batch is an
evaluation batch (``EVAL_BATCH_FACTOR`` x the training batch), so a pod needs
``num_workers x LOADER_PREFETCH_FACTOR x EVAL_BATCH_FACTOR x batch_size x img_size^2 x 3`` bytes
(the global batch is split over the GPUs, so the GPU count cancels out). Memory-backed emptyDir
pages count against the pod's memory, so the memory request includes the shm size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stage1_pro.errors import ConfigError

#: Images/s one loader worker gathered from prepared 224-px shards on an H200 host (16 cores).
LOADER_WORKER_IMG_PER_S = 7000
#: Images/s a compiled ViT-S/14 training step consumed on one H200 (bf16, batch 256).
GPU_STEP_IMG_PER_S = 6600
#: Loader capacity over GPU demand: one worker would run at 94% of its measured rate, so any
#: hiccup (a page-cache miss on a shard, a busier node) would stall the GPU.
LOADER_HEADROOM = 1.5
#: Batches each DataLoader worker prepares ahead (``stage1_pro.training.loaders.make_loader``).
LOADER_PREFETCH_FACTOR = 4
#: Evaluation batches are this many times the training batch (``stage1_pro.training.engine``).
EVAL_BATCH_FACTOR = 2
#: Bytes per pixel of a prepared image (uint8 RGB).
PREPARED_BYTES_PER_PIXEL = 3
#: Margin on the computed shared-memory need (labels and row ids ride along; the allocator rounds).
SHM_MARGIN = 1.5

#: One CPU per GPU for its training process (Python, the host-to-device copies).
TRAIN_CPU_PER_GPU_PROCESS = 1
#: Host memory per GPU: the process, pinned staging buffers and the shards' page cache.
TRAIN_MEMORY_GIB_PER_GPU = 16
#: Size of the train pod's memory-backed ``/dev/shm``. A compile-time constant: kfp-kubernetes'
#: ``empty_dir_mount`` takes no run-time value, so check-config refuses a loader that needs more.
TRAIN_SHM_GIB = 4

_GIB = 2**30


def loader_workers_per_gpu(
    worker_img_per_s: float = LOADER_WORKER_IMG_PER_S,
    step_img_per_s: float = GPU_STEP_IMG_PER_S,
    headroom: float = LOADER_HEADROOM,
) -> int:
    """Loader workers that keep one GPU fed: ``ceil(step rate x headroom / worker rate)``.

    Args:
        worker_img_per_s: images/s one loader worker delivers (measure with bench/train_throughput.py).
        step_img_per_s: images/s one GPU's training step consumes.
        headroom: loader capacity over GPU demand.

    Returns:
        The worker count, at least 1.
    """
    if worker_img_per_s <= 0 or step_img_per_s <= 0 or headroom < 1:
        raise ConfigError(
            f"loader sizing needs positive rates and headroom >= 1 (got worker {worker_img_per_s} img/s, "
            f"step {step_img_per_s} img/s, headroom {headroom})"
        )
    return max(1, math.ceil(step_img_per_s * headroom / worker_img_per_s))


#: Loader workers per GPU in pipeline runs unless ``config_overrides`` sets ``num_workers``.
PIPELINE_LOADER_WORKERS = loader_workers_per_gpu()


def loader_shm_bytes(batch_size: int, img_size: int, num_workers: int) -> int:
    """Shared memory the train pod's loaders can hold at once (bytes, with :data:`SHM_MARGIN`).

    Args:
        batch_size: the global training batch.
        img_size: the prepared images' side in pixels.
        num_workers: loader workers per training process (0: batches never leave the process).
    """
    if num_workers <= 0:
        return 0
    batch_bytes = EVAL_BATCH_FACTOR * batch_size * img_size * img_size * PREPARED_BYTES_PER_PIXEL
    return math.ceil(SHM_MARGIN * num_workers * LOADER_PREFETCH_FACTOR * batch_bytes)


@dataclass(frozen=True)
class TrainResources:
    """The train pod's requests as Kubernetes quantity strings (the KFP driver resolves strings only)."""

    gpu: str
    cpu: str
    memory: str


def train_resources(gpu_count: int, loader_workers: int) -> TrainResources:
    """GPU count, CPU and memory (``/dev/shm`` included) of the train pod for ``gpu_count`` GPUs.

    Args:
        gpu_count: GPUs (= training processes) of the pod.
        loader_workers: loader workers per training process.
    """
    cpu = gpu_count * (TRAIN_CPU_PER_GPU_PROCESS + max(loader_workers, 0))
    memory_gib = gpu_count * TRAIN_MEMORY_GIB_PER_GPU + TRAIN_SHM_GIB
    return TrainResources(gpu=str(gpu_count), cpu=str(cpu), memory=f"{memory_gib}Gi")


def shm_size() -> str:
    """The train pod's ``/dev/shm`` size as a Kubernetes quantity."""
    return f"{TRAIN_SHM_GIB}Gi"


def check_loader_fits_shm(batch_size: int, img_size: int, num_workers: int) -> None:
    """Refuse a loader whose in-flight batches would overflow the train pod's ``/dev/shm``.

    Raises:
        ConfigError: naming the need, the size and the settings to change.
    """
    need = loader_shm_bytes(batch_size, img_size, num_workers)
    if need > TRAIN_SHM_GIB * _GIB:
        raise ConfigError(
            f"num_workers={num_workers} with batch_size={batch_size} at img_size={img_size} keeps up to "
            f"{need / _GIB:.1f} GiB of batches in shared memory, more than the train pod's "
            f"{TRAIN_SHM_GIB} GiB /dev/shm; lower num_workers or batch_size (config_overrides), or raise "
            "TRAIN_SHM_GIB in stage1_pro/sizing.py and recompile"
        )
