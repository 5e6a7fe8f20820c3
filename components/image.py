"""The container image every component runs in: the one place its tag is set.

``images/build.sh`` rewrites ``IMAGE_TAG`` when it builds and pushes a new image. At compile
time ``stage1-pro compile --image IMAGE`` (or the ``STAGE1_PRO_IMAGE`` environment variable)
overrides the whole reference without editing this file.
"""

from __future__ import annotations

import os

IMAGE_REPOSITORY = "us-docker.pkg.dev/stage1-pro/stage1-pro/stage1-pro"
IMAGE_TAG = "0.1.0"
GPU_IMAGE_SUFFIX = "-gpu"


def component_image(gpu: bool = False) -> str:
    """Return the image reference components use (``STAGE1_PRO_IMAGE`` wins when set)."""
    override = os.environ.get("STAGE1_PRO_IMAGE")
    if override:
        return override + (GPU_IMAGE_SUFFIX if gpu and ":" in override and not override.endswith(GPU_IMAGE_SUFFIX) else "")
    return f"{IMAGE_REPOSITORY}:{IMAGE_TAG}{GPU_IMAGE_SUFFIX if gpu else ''}"
