"""Passing a verb's options on to the library function that does its work."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any


def forwarded_options(func: Callable[..., Any], args: argparse.Namespace, **renamed: Any) -> dict[str, Any]:
    """The keyword arguments a verb passes to ``func``: its options named like ``func``'s parameters.

    A verb's ``--min-coverage`` is ``args.min_coverage`` and the library function's keyword-only
    ``min_coverage``: naming the option after the parameter is what lets one call pass them all.
    An option named otherwise (``--out`` for ``out_dir``) is given in ``renamed``.

    Args:
        func: the library function; only its keyword-only parameters are filled.
        args: the parsed options.
        renamed: values for parameters whose option has another name (they take precedence).

    Returns:
        The keyword arguments, ``func``'s parameter order.
    """
    params = inspect.signature(func).parameters
    return {
        name: renamed[name] if name in renamed else getattr(args, name)
        for name, param in params.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and (name in renamed or hasattr(args, name))
    }
