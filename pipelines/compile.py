"""Compile the pipeline to the YAML package that is uploaded to Kubeflow (or run with kfp.local)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stage1_pro.errors import StorageError


def compile_pipeline(
    out: str | os.PathLike[str],
    *,
    image: str | None = None,
    gpu_image: str | None = None,
    gpu_type: str | None = None,
) -> Path:
    """Compile the pipeline to ``out`` (written atomically) and return its path.

    The YAML holds two documents: the pipeline spec, then the Kubernetes platform spec (node
    selector, toleration, security contexts).

    Args:
        out: destination ``.yaml`` file.
        image: image of the CPU tasks (default: ``stage1_pro.components.image.component_image()``).
        gpu_image: image of the train task (default: ``<image>-gpu``).
        gpu_type: default of the ``gpu_type`` run parameter.
    """
    from kfp import compiler

    from stage1_pro.pipelines.pipeline import build_pipeline

    target = Path(out)
    if target.is_dir() or target.suffix not in (".yaml", ".yml"):
        raise StorageError(f"{target}: the package must be a .yaml file, e.g. pipeline.yaml")
    target.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(image=image, gpu_image=gpu_image, gpu_type=gpu_type)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.yaml", dir=target.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@contextmanager
def compiled_package(
    package: str | os.PathLike[str] | None = None, **compile_options: str | None
) -> Iterator[Path]:
    """Yield ``package`` if given, else a freshly compiled package in a temporary folder."""
    if package is not None:
        path = Path(package)
        if not path.is_file():
            raise StorageError(
                f"{path}: pipeline package not found; create it with 'stage1-pro compile --out {path}'"
            )
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="stage1-pro-compile-") as tmp:
        yield compile_pipeline(Path(tmp, "pipeline.yaml"), **compile_options)
