"""Cluster constants the pipeline's GPU task is scheduled with (GKE node pools with NVIDIA GPUs).

The manifests (``manifests/``) and the pipeline (``pipelines/pipeline.py``) both import these, so
the resource name, the taint the GPU node pools carry and the node label that selects a GPU
model are spelled once.
"""

from __future__ import annotations

#: Extended resource a GPU pod requests (``resources.limits``) and the accelerator type passed to
#: ``PipelineTask.set_accelerator_type``.
GPU_RESOURCE = "nvidia.com/gpu"

#: Taint key GKE puts on GPU node pools (``nvidia.com/gpu=present:NoSchedule``); the GPU task
#: tolerates it with ``operator=Exists``.
GPU_TOLERATION_KEY = "nvidia.com/gpu"

#: Node label whose value names the GPU model of a GKE node pool.
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"

#: GPU model the train task asks for unless the run sets ``gpu_type``.
DEFAULT_ACCELERATOR = "nvidia-h100-80gb"
