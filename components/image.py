"""The container images components run in: the one place their tag is set.

``images/build.sh`` rewrites ``IMAGE_TAG`` when it builds and pushes new images. The train
task runs the GPU image (``<tag>-gpu``, CUDA from torch's wheels); every other task the CPU image.
At compile time ``stage1-pro compile --image IMAGE [--gpu-image IMAGE]`` (or the environment
variables ``STAGE1_PRO_IMAGE`` / ``STAGE1_PRO_GPU_IMAGE``) override the references without
editing this file.
"""

from __future__ import annotations

import os

IMAGE_REPOSITORY = "us-docker.pkg.dev/stage1-pro/stage1-pro/stage1-pro"
IMAGE_TAG = "0.1.0"
GPU_TAG_SUFFIX = "-gpu"


def component_image(gpu: bool = False) -> str:
    """Return the image reference for CPU tasks, or for the GPU task when ``gpu``."""
    cpu = os.environ.get("STAGE1_PRO_IMAGE") or f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    if not gpu:
        return cpu
    return os.environ.get("STAGE1_PRO_GPU_IMAGE") or f"{cpu}{GPU_TAG_SUFFIX}"
