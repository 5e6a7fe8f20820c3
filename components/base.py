"""The decorator every stage1-pro component is defined with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kfp import dsl

from stage1_pro.components.image import component_image


def stage1_component(func: Callable[..., Any] | None = None, *, gpu: bool = False) -> Any:
    """``dsl.component`` on the stage1-pro image, with nothing installed at run time.

    The image already holds stage1-pro and the pinned kfp (``pyproject.toml``), so the container
    runs the function as-is: no ``pip install`` at start-up, hence no network access needed and no
    version drift between the compiled pipeline and the code it runs. The image comes from
    :func:`stage1_pro.components.image.component_image` (the GPU variant for ``gpu=True``); the pipeline may
    still override it per task at compile time (``stage1-pro compile --image``).
    """

    def wrap(f: Callable[..., Any]) -> Any:
        return dsl.component(
            f,
            base_image=component_image(gpu=gpu),
            install_kfp_package=False,
            packages_to_install=[],
        )

    return wrap(func) if func is not None else wrap
