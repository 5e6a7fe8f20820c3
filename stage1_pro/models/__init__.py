"""Stage-1 models: timm backbones, SelectiveNet heads, DoRA/LoRA adapters.

Public API:

* :func:`create_model` ``(config, *, pretrained=None) -> Stage1Model``
* :func:`load_model` ``(run_or_bundle_dir, model_file="model_best.pth", model_json="model.json")``
* :class:`Stage1Model`: ``forward(x) -> {"logits": (n, 2)[, "gate_logit": (n,), "aux_logits": (n, 2)]}``
"""

from stage1_pro.models.adapters import (
    AdapterSpec,
    adapted_layers,
    adapter_targets,
    apply_adapters,
    has_adapters,
    merge_adapters,
)
from stage1_pro.models.backbones import check_model_name, create_backbone
from stage1_pro.models.heads import CLASSIFIER_HEADS, SELECTIVE_HEADS, SelectiveGate, StageHeads
from stage1_pro.models.stage1 import (
    Stage1Model,
    build_model,
    create_model,
    export_state_dict,
    heads_for_phase,
    load_into,
    load_model,
    load_state_file,
    save_model_info,
)

__all__ = [
    "CLASSIFIER_HEADS",
    "SELECTIVE_HEADS",
    "AdapterSpec",
    "SelectiveGate",
    "Stage1Model",
    "StageHeads",
    "adapted_layers",
    "adapter_targets",
    "apply_adapters",
    "build_model",
    "check_model_name",
    "create_backbone",
    "create_model",
    "export_state_dict",
    "has_adapters",
    "heads_for_phase",
    "load_into",
    "load_model",
    "load_state_file",
    "merge_adapters",
    "save_model_info",
]
