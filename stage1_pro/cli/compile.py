"""Compile the Kubeflow pipeline to a YAML package (pipeline spec + Kubernetes platform spec).

The package is what 'stage1-pro upload' sends to Kubeflow and what you can upload from the UI.
Images default to components/image.py (or STAGE1_PRO_IMAGE / STAGE1_PRO_GPU_IMAGE); --image sets
the CPU tasks' image and, unless --gpu-image is given, the train task's image to IMAGE-gpu.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", "-o", default="pipeline.yaml", help="output YAML file (default: %(default)s)"
    )
    add_image_arguments(parser)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The compile-time options shared by compile, upload, run and schedule."""
    group = parser.add_argument_group("compile options")
    group.add_argument(
        "--image", metavar="IMAGE", help="image of the CPU tasks (default: components/image.py)"
    )
    group.add_argument("--gpu-image", metavar="IMAGE", help="image of the train task (default: IMAGE-gpu)")
    group.add_argument(
        "--gpu-type",
        metavar="TYPE",
        help="default of the gpu_type run parameter, a cloud.google.com/gke-accelerator label value "
        "(default: stage1_pro/cluster.py DEFAULT_ACCELERATOR)",
    )


def compile_options(args: argparse.Namespace) -> dict[str, str | None]:
    return {"image": args.image, "gpu_image": args.gpu_image, "gpu_type": args.gpu_type}


def run(args: argparse.Namespace) -> int:
    from stage1_pro.pipelines.compile import compile_pipeline
    from stage1_pro.pipelines.pipeline import resolve_images

    path = compile_pipeline(args.out, **compile_options(args))
    cpu, gpu = resolve_images(args.image, args.gpu_image)
    print(f"compiled {path} (CPU image {cpu}, train image {gpu})")
    return 0
