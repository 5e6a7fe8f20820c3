"""Cluster facts the pipeline must agree on with ``manifests/`` and ``images/``: the one place.

The GPU node pool (``manifests/gke/gpu-nodepool.yaml``), the namespace quota and the component
images are written to match these values, and ``tests/test_manifests.py`` /
``tests/test_images.py`` fail when they drift apart. The pipeline imports them instead of
repeating the strings::

    from kfp import kubernetes
    from stage1_pro import cluster

    task.set_accelerator_type(cluster.GPU_RESOURCE)
    task.set_accelerator_limit(str(cluster.DEFAULT_GPU_COUNT))  # a run-time value must be a str
    kubernetes.add_node_selector(task, cluster.ACCELERATOR_LABEL, cluster.DEFAULT_ACCELERATOR)
    kubernetes.add_toleration(task, **cluster.GPU_TOLERATION)
    kubernetes.set_security_context(task, **cluster.SECURITY_CONTEXT)

Every task should set CPU and memory *requests and limits*: the namespace's LimitRange fills in
a default limit where none is given, and a request above that default would be rejected.

Why A100 80GB: it is the largest single-GPU GKE machine (``a2-ultragpu-1g``) sold on demand as
well as Spot; the one-GPU H100 shape (``a3-highgpu-1g``) is sold only as Spot or flex-start VMs,
which would leave the prod overlay (on-demand) without a valid machine type. Change
``DEFAULT_ACCELERATOR``, ``GPU_MACHINE_TYPE`` and the node pool together (the tests enforce it).
"""

from __future__ import annotations

from typing import Final

#: Extended resource the NVIDIA device plugin advertises; ``set_accelerator_type`` takes it.
GPU_RESOURCE: Final = "nvidia.com/gpu"

#: Taint key GKE puts on every GPU node (``nvidia.com/gpu=present:NoSchedule``); the node pool
#: declares it too, so CPU pods never land on (and keep alive) an expensive GPU node.
GPU_TOLERATION_KEY: Final = "nvidia.com/gpu"
GPU_TAINT_VALUE: Final = "present"
GPU_TAINT_EFFECT: Final = "NoSchedule"

#: Keyword arguments for ``kfp.kubernetes.add_toleration``. ``Exists`` rather than
#: ``Equal present``: the toleration must keep matching whatever value GKE puts on the taint.
GPU_TOLERATION: Final = {"key": GPU_TOLERATION_KEY, "operator": "Exists", "effect": GPU_TAINT_EFFECT}

#: Node label GKE sets from the node pool's ``guestAccelerator.type`` (users cannot set it).
ACCELERATOR_LABEL: Final = "cloud.google.com/gke-accelerator"

#: The GPU the train task asks for; the node pool's ``guestAccelerator.type``.
DEFAULT_ACCELERATOR: Final = "nvidia-a100-80gb"

#: GCE machine type of the GPU node pool (one A100 80GB, 12 vCPU, 170 GB memory).
GPU_MACHINE_TYPE: Final = "a2-ultragpu-1g"

#: GPUs per node of the pool (``guestAccelerator.count``): the most a single train pod can get.
GPUS_PER_NODE: Final = 1

#: GPUs per train task by default (the pipeline's ``gpu_count`` parameter may ask for up to
#: ``GPUS_PER_NODE``).
DEFAULT_GPU_COUNT: Final = 1

#: Machine type of the cluster's default node pool, where every task but train runs (README
#: "Running on a GKE cluster" creates the cluster with it). The CPU tasks' requests must fit one
#: of its nodes after GKE's reservations and the system DaemonSets.
CPU_MACHINE_TYPE: Final = "e2-standard-8"

#: The most CPU (cores) and memory (GiB) one container may ask for: the namespace LimitRange's
#: ``max`` (manifests/base/limitrange.yaml; a test keeps them equal), which is one GPU node minus
#: GKE's reservations. check-config refuses a train pod above it before any node is requested.
MAX_CONTAINER_CPU: Final = 11
MAX_CONTAINER_MEMORY_GIB: Final = 140

#: Namespace KFP standalone (single-user) runs every pipeline pod in, and its runner account
#: (the Kubernetes service account bound to a Google service account by Workload Identity).
PIPELINE_NAMESPACE: Final = "kubeflow"
PIPELINE_SERVICE_ACCOUNT: Final = "pipeline-runner"

#: Namespace of KFP's control plane (API server, ML Metadata, object store) in both KFP standalone
#: and multi-user Kubeflow; pipeline pods must reach it (``manifests/base/networkpolicy.yaml``).
KFP_SYSTEM_NAMESPACE: Final = "kubeflow"

#: Annotation that binds a Kubernetes service account to a Google service account (GKE Workload
#: Identity); the runner account needs it to reach gs:// without a key file.
WORKLOAD_IDENTITY_ANNOTATION: Final = "iam.gke.io/gcp-service-account"

#: ConfigMap the KFP v2 driver and launcher read in the pipeline namespace, and its key holding
#: the default pipeline root (kubeflow/pipelines backend/src/v2/config/env.go).
KFP_LAUNCHER_CONFIGMAP: Final = "kfp-launcher"
DEFAULT_PIPELINE_ROOT_KEY: Final = "defaultPipelineRoot"

#: PriorityClass for training pods (``manifests/base/priorityclass.yaml``). kfp-kubernetes 2.17
#: cannot set ``priorityClassName`` per task; see manifests/README.md for how it is attached.
TRAINING_PRIORITY_CLASS: Final = "stage1-pro-training"

#: The numeric user and group the images run as (``USER`` in images/Dockerfile.*).
IMAGE_UID: Final = 10001
IMAGE_GID: Final = 10001

#: Keyword arguments for ``kfp.kubernetes.set_security_context``: run as the image's own user.
SECURITY_CONTEXT: Final = {"run_as_user": IMAGE_UID, "run_as_group": IMAGE_GID, "run_as_non_root": True}
