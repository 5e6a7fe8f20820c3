"""Default values and valid ranges of shared settings: the one place each is written.

The certificate's settings (target_fnr_exit, delta) and the preprocessing modes (resize, decode,
interpolation). The config, the policies, the certificate, the preprocessing, the CLI and the
pipeline parameters take these values from here; the JSON schemas state the same values and
tests keep them equal.
"""

from __future__ import annotations

import math

from stage1_pro.errors import ConfigError

#: Certified bound on FNR_exit = FN_exit / (TP_exit + FN_exit), the miss rate among exited positives.
DEFAULT_TARGET_FNR_EXIT = 0.02
#: Valid target_fnr_exit: (low, high], open below, closed above.
TARGET_FNR_EXIT_RANGE = (0.0, 0.1)

#: Failure probability of the certificate: P(true FNR_exit of the deployed rule > target) <= delta.
DEFAULT_DELTA = 0.1
#: Valid delta: (low, high], open below, closed above.
DELTA_RANGE = (0.0, 0.5)

#: The capability levels (training phases) a run can have; an exit policy names the first it needs.
PHASES: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

#: The guard certified with the target: FPR_exit = FP_exit / (FP_exit + TN_exit), the fraction of
#: exited negatives called positive, is certified <= this bound in the same family-wise test (an
#: FNR-only constraint is met by calling everything positive: FPR_exit 1).
DEFAULT_MAX_FPR_EXIT = 0.25
#: Valid max_fpr_exit: (low, high], open below, closed above; 1 disables the guard.
MAX_FPR_EXIT_RANGE = (0.0, 1.0)
#: The guard a policy file written before the guard existed was certified for: none.
NO_GUARD = MAX_FPR_EXIT_RANGE[1]

#: Level of the test split's audit: a run is refused when the test split rejects "FNR_exit <= target"
#: (or the guard) at this level (exact one-sided binomial tests, Bonferroni over the two).
DEFAULT_AUDIT_LEVEL = 0.05
#: Valid audit level: (low, high], open below, closed above.
AUDIT_LEVEL_RANGE = (0.0, 0.5)
#: The audit's power is reported against a true FNR_exit of this multiple of the target.
DEFAULT_AUDIT_EFFECT = 1.5


def _interval(bounds: tuple[float, float]) -> str:
    return f"({bounds[0]:g}, {bounds[1]:g}]"


def check_target(target: float, source: str = "target_fnr_exit") -> float:
    """Return ``target`` as a float if it lies in :data:`TARGET_FNR_EXIT_RANGE`.

    Raises:
        ConfigError: naming ``source``, the valid range and the default.
    """
    return _check_in(target, TARGET_FNR_EXIT_RANGE, source, f"the default is {DEFAULT_TARGET_FNR_EXIT:g}")


def check_delta(delta: float, source: str = "delta") -> float:
    """Return ``delta`` as a float if it lies in :data:`DELTA_RANGE`.

    Raises:
        ConfigError: naming ``source``, the valid range and a usual value.
    """
    return _check_in(delta, DELTA_RANGE, source, f"use e.g. {DEFAULT_DELTA:g} (90% confidence) or 0.05")


def check_max_fpr_exit(max_fpr_exit: float, source: str = "max_fpr_exit") -> float:
    """Return ``max_fpr_exit`` as a float if it lies in :data:`MAX_FPR_EXIT_RANGE`.

    Raises:
        ConfigError: naming ``source``, the valid range and the default.
    """
    return _check_in(
        max_fpr_exit,
        MAX_FPR_EXIT_RANGE,
        source,
        f"the default is {DEFAULT_MAX_FPR_EXIT:g}; 1 disables the guard",
    )


def check_audit_level(level: float, source: str = "audit_level") -> float:
    """Return ``level`` as a float if it lies in :data:`AUDIT_LEVEL_RANGE`.

    Raises:
        ConfigError: naming ``source``, the valid range and the default.
    """
    return _check_in(level, AUDIT_LEVEL_RANGE, source, f"the default is {DEFAULT_AUDIT_LEVEL:g}")


def _check_in(value: float, bounds: tuple[float, float], source: str, hint: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}={value!r} is not a number; {hint}") from exc
    low, high = bounds
    if math.isnan(number) or not low < number <= high:
        raise ConfigError(f"{source}={number} is outside the valid range {_interval(bounds)}; {hint}")
    return number


# ------------------------------------------------------------------------------------------
# preprocessing (stage1_pro.preprocessing): how an image file becomes the network's input

#: ``squash``: resize the whole image to a square (aspect ratio not kept). ``center_crop``: cut the
#: central square (side = the shorter side), then resize it.
RESIZE_MODES: tuple[str, ...] = ("squash", "center_crop")
DEFAULT_RESIZE_MODE = "squash"
#: ``draft``: JPEGs are decoded by libjpeg at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps
#: both sides >= img_size (fast on big photos). ``full``: every image is decoded at full size.
DECODE_MODES: tuple[str, ...] = ("draft", "full")
DEFAULT_DECODE_MODE = "draft"
#: Pillow resampling filters (antialiased when shrinking).
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")
DEFAULT_INTERPOLATION = "bilinear"


def check_choice(value: object, allowed: tuple[str, ...], source: str) -> str:
    """Return ``value`` if it is one of ``allowed``.

    Raises:
        ConfigError: naming ``source`` and listing the allowed values.
    """
    if value not in allowed:
        raise ConfigError(f"{source}={value!r}; allowed: {', '.join(allowed)}")
    return str(value)
