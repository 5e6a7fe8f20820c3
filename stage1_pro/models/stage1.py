"""The stage-1 network: a timm backbone plus the stage-1 heads, and its ``model.json`` description."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stage1_pro import storage
from stage1_pro.errors import ArtifactError, ConfigError
from stage1_pro.layout import MODEL_FILE, MODEL_INFO_FILE
from stage1_pro.models.adapters import AdapterSpec, apply_adapters, has_adapters, merge_adapters
from stage1_pro.models.backbones import create_backbone, data_config
from stage1_pro.models.heads import CLASSIFIER_HEADS, NUM_CLASSES, SELECTIVE_HEADS, StageHeads
from stage1_pro.preprocessing import RECORD_KEY, PixelSpec

if TYPE_CHECKING:
    from stage1_pro.config import Stage1ProConfig


class Stage1Model(nn.Module):
    """Backbone + heads. ``forward(x) -> {"logits", ["gate_logit", "aux_logits"]}``.

    ``forward_features`` / ``forward_head`` split the two halves so a frozen backbone's
    features can be cached and the heads trained alone. ``info`` is the ``model.json`` dict.
    """

    def __init__(self, backbone: nn.Module, heads: StageHeads, info: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.info = dict(info)

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.backbone(x))


def heads_for_phase(phase: int) -> tuple[str, ...]:
    """The heads a phase trains: the classifier alone (1-2), the three SelectiveNet heads (>= 3)."""
    return SELECTIVE_HEADS if phase >= 3 else CLASSIFIER_HEADS


def build_model(
    info: dict[str, Any], *, pretrained: bool = False, model_path: str | None = None
) -> Stage1Model:
    """Build the architecture a ``model.json`` dict describes (weights: see ``create_backbone``)."""
    backbone = create_backbone(
        info["model_name"], pretrained=pretrained, model_path=model_path, img_size=info["img_size"]
    )
    heads = StageHeads(backbone.num_features, tuple(info["heads"]), gate_hidden=info.get("gate_hidden", 256))
    return Stage1Model(backbone, heads, info)


def create_model(config: Stage1ProConfig, *, pretrained: bool | None = None) -> Stage1Model:
    """Create the stage-1 model of a config (heads chosen by phase; adapters for finetune_mode=peft).

    Args:
        config: the run's settings (``model_name``, ``img_size``, ``pretrained``, ``model_path``,
            ``phase``, ``finetune_mode``, ``peft_*``, ``gate_hidden``).
        pretrained: override ``config.pretrained`` (e.g. ``False`` to rebuild before loading).

    Returns:
        A :class:`Stage1Model` in train mode. In ``peft`` mode the backbone carries unmerged
        adapters (see :func:`export_state_dict`); in ``frozen`` mode the backbone is frozen.
    """
    use_pretrained = config.pretrained if pretrained is None else pretrained
    backbone = create_backbone(
        config.model_name, pretrained=use_pretrained, model_path=config.model_path, img_size=config.img_size
    )
    cfg = data_config(backbone)
    info = {
        "model_name": config.model_name,
        "img_size": int(config.img_size),
        "num_classes": NUM_CLASSES,
        "heads": list(heads_for_phase(config.phase)),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        RECORD_KEY: PixelSpec.from_config(config).record(),
        "in_chans": 3,
        "grayscale_to_rgb": True,
        "gate_hidden": int(config.gate_hidden),
    }
    heads = StageHeads(backbone.num_features, tuple(info["heads"]), gate_hidden=config.gate_hidden)
    model = Stage1Model(backbone, heads, info)
    mode = config.resolved_finetune_mode
    if mode == "peft":
        apply_adapters(
            model, config.peft_method, AdapterSpec(config.peft_rank, config.peft_alpha, config.peft_dropout)
        )
    elif mode == "frozen":
        for param in model.backbone.parameters():
            param.requires_grad_(False)
    return model


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain float32 CPU state dict of ``model`` with adapters merged (``model`` is left as is)."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if has_adapters(model):
        model = merge_adapters(copy.deepcopy(model))
    return {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
        for k, v in model.state_dict().items()
    }


def save_model_info(info: dict[str, Any], uri: str) -> None:
    """Write ``model.json`` (validated artifact of kind ``model``)."""
    from stage1_pro.artifacts import write_artifact

    write_artifact(uri, "model", info)


def load_model(
    run_or_bundle_dir: str | os.PathLike[str],
    model_file: str = MODEL_FILE,
    model_json: str = MODEL_INFO_FILE,
) -> Stage1Model:
    """Rebuild the network of a run directory or bundle and load its plain weights (eval mode).

    Weights are read with ``torch.load(weights_only=True)``: no code is unpickled.

    Raises:
        ArtifactError: missing/invalid ``model.json``, missing weights file, or weights that do
            not fit the architecture (the keys are named).
    """
    from stage1_pro.artifacts import read_artifact

    base = str(run_or_bundle_dir)
    info = read_artifact(storage.join(base, model_json), "model")
    info = {k: v for k, v in info.items() if k not in ("artifact", "schema_version")}
    weights_uri = storage.join(base, model_file)
    state = load_state_file(weights_uri)
    try:
        model = build_model(info, pretrained=False)
    except ConfigError as exc:
        raise ArtifactError(f"{storage.join(base, model_json)}: {exc}") from exc
    load_into(model, state, weights_uri)
    return model.eval()


def load_state_file(uri: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a local or ``gs://`` file, as an ArtifactError on failure."""
    import io

    from stage1_pro.errors import StorageError

    try:
        data = storage.read_bytes(uri)
    except StorageError as exc:
        raise ArtifactError(str(exc)) from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{uri}: not a weights-only state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"{uri}: holds a {type(state).__name__}, not a state dict")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` whose error names the missing/unexpected/mis-shaped keys."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)})" if len(keys) > 6 else "")

        parts = [
            f"{label}: {show(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        ]
        raise ArtifactError(
            f"{source}: weights do not fit the model described by model.json ({'; '.join(parts)})"
        )
    model.load_state_dict(state, strict=True)
