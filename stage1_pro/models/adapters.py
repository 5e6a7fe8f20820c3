"""Parameter-efficient fine-tuning (phase 2): DoRA (default) or LoRA adapters on the backbone.

Targets: the linear layers of the attention and MLP blocks (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2`` in a timm ViT), never the patch embedding, the stem or a head. A
convolutional backbone has no such layers; there the per-pixel MLP of each block, its 1x1
(pointwise) convolutions, is the target, so phase 2 also runs on the local default
``tf_efficientnet_lite0``.

DoRA (Liu et al. 2024, arXiv 2402.09353, Eq. 5): ``W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_c``
with the magnitude ``m`` initialised to ``||W0||_c`` and ``B = 0``, so training starts from the
pretrained function. The backbone is frozen; only adapters and the stage-1 heads train.

Adapters are implemented through a small registry (:data:`ADAPTER_METHODS`) so that another
backend plugs in without touching the callers: ``register_adapter_method(name, apply_fn)`` and
``register_layer_merger(test, merge)``. Both methods use the project's own layers
(:mod:`stage1_pro.models.dora`: outputs, gradients and merge identical to HF PEFT's, the DoRA
about 1.4x faster than PEFT's on CPU; ``bench/dora.py``); ``_peft_apply`` keeps HF PEFT
(``LoraConfig(use_dora=...)``) at hand as the baseline, e.g.
``register_adapter_method("dora", _peft_apply(use_dora=True))``. :func:`merge_adapters` folds
every adapter into a plain ``nn.Linear``/``nn.Conv2d``, so exported weights are a plain model.
``doran`` is refused: see :data:`stage1_pro.models.dora.DORAN_NOT_BUILT`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from stage1_pro.errors import ConfigError, NotBuiltError

_LOG = logging.getLogger(__name__)

#: Module path segments that mark attention / MLP sub-modules in timm models.
_BLOCK_PART = re.compile(r"(^|\.)(attn|attention|mlp|ffn)(\.|$)")
#: Never adapted: input embeddings / stems and classifier heads.
_EXCLUDED = re.compile(r"(^|\.)(patch_embed|stem|conv_stem|head|fc_norm|classifier)(\.|$)")


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter method (``s = alpha / rank``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


ApplyFn = Callable[[nn.Module, list[str], AdapterSpec], None]


def _peft_apply(use_dora: bool) -> ApplyFn:
    def apply(module: nn.Module, targets: list[str], spec: AdapterSpec) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            use_dora=use_dora,
            target_modules=targets,  # full names: matched exactly, nothing else is wrapped
        )
        inject_adapter_in_model(config, module)

    return apply


def _native_apply(method: str) -> ApplyFn:
    def apply(module: nn.Module, targets: list[str], spec: AdapterSpec) -> None:
        from stage1_pro.models.dora import wrap_modules

        wrap_modules(module, targets, method, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout)

    return apply


def _doran_not_built(module: nn.Module, targets: list[str], spec: AdapterSpec) -> None:
    from stage1_pro.models.dora import DORAN_NOT_BUILT

    raise NotBuiltError(DORAN_NOT_BUILT)


#: method name -> function wrapping the named target modules of a module in place.
ADAPTER_METHODS: dict[str, ApplyFn] = {
    "dora": _native_apply("dora"),
    "lora": _native_apply("lora"),
    "doran": _doran_not_built,
}


def _is_peft_layer(module: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no PEFT layer can exist; importing peft costs seconds
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _merge_peft_layer(module: nn.Module) -> nn.Module:
    module.merge(safe_merge=True)  # safe_merge: raise on NaN instead of writing it
    return module.get_base_layer()


def _is_native_layer(module: nn.Module) -> bool:
    from stage1_pro.models.dora import LowRankAdapter

    return isinstance(module, LowRankAdapter)


def _merge_native_layer(module: nn.Module) -> nn.Module:
    return module.merge()


#: (is-adapter-layer test, merge returning the plain module) pairs, tried in order.
LAYER_MERGERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = [
    (_is_native_layer, _merge_native_layer),
    (_is_peft_layer, _merge_peft_layer),
]


def register_adapter_method(name: str, apply: ApplyFn) -> None:
    """Add or replace an adapter method (e.g. a faster native DoRA)."""
    ADAPTER_METHODS[name] = apply


def register_layer_merger(test: Callable[[nn.Module], bool], merge: Callable[[nn.Module], nn.Module]) -> None:
    """Teach :func:`merge_adapters` a new adapter layer type (checked before the PEFT one)."""
    LAYER_MERGERS.insert(0, (test, merge))


def adapter_targets(backbone: nn.Module) -> list[str]:
    """Names (relative to ``backbone``) of the layers that get adapters.

    Linear layers inside attention/MLP blocks; if the backbone has none (a convnet), its
    ungrouped 1x1 convolutions inside blocks. Patch embedding, stem and heads are excluded.
    """
    linear = [
        name
        for name, mod in backbone.named_modules()
        if isinstance(mod, nn.Linear) and _BLOCK_PART.search(name) and not _EXCLUDED.search(name)
    ]
    if linear:
        return linear
    return [
        name
        for name, mod in backbone.named_modules()
        if isinstance(mod, nn.Conv2d)
        and mod.kernel_size == (1, 1)
        and mod.groups == 1
        and not _EXCLUDED.search(name)
        and re.search(r"(^|\.)(blocks|stages|layers|layer\d)\.", name)
    ]


def apply_adapters(model: nn.Module, method: str = "dora", spec: AdapterSpec | None = None) -> list[str]:
    """Add adapters to ``model.backbone`` in place and freeze every other backbone weight.

    The stage-1 heads (``model.heads``) stay trainable. Returns the adapted module names.

    Raises:
        ConfigError: unknown method, or a backbone without attention/MLP layers to adapt.
        NotBuiltError: a method that is designed but not implemented (doran).
    """
    if method not in ADAPTER_METHODS:
        raise ConfigError(f"peft_method={method!r} is unknown; allowed: {', '.join(ADAPTER_METHODS)}")
    spec = spec or AdapterSpec()
    backbone = model.backbone
    targets = adapter_targets(backbone)
    if not targets:
        raise ConfigError(
            f"{type(backbone).__name__} has no attention/MLP linear layers (nor pointwise convolutions) for "
            f"{method} adapters; choose finetune_mode=full or frozen, or another model_name"
        )
    ADAPTER_METHODS[method](backbone, targets, spec)
    adapter_params = 0
    for name, param in backbone.named_parameters():
        is_adapter = "lora_" in name or getattr(param, "_is_adapter", False)
        param.requires_grad_(is_adapter)
        adapter_params += param.numel() if is_adapter else 0
    for param in model.heads.parameters():
        param.requires_grad_(True)
    _LOG.info(
        "%s adapters (rank %d) on %d layers: %d trainable backbone parameters",
        method,
        spec.rank,
        len(targets),
        adapter_params,
    )
    return targets


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the adapter layers in ``model`` (empty for a plain model)."""
    return [name for name, m in model.named_modules() if any(test(m) for test, _ in LAYER_MERGERS)]


def has_adapters(model: nn.Module) -> bool:
    """True when any module of ``model`` is an adapter layer."""
    return bool(adapted_layers(model))


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer in place; return ``model`` (now plain modules)."""
    for name, module in list(model.named_modules()):
        for test, merge in LAYER_MERGERS:
            if name and test(module):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, merge(module))
                break
    for param in model.parameters():
        param.requires_grad_(True)
    return model
