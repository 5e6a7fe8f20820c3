"""The exit-policy registry: every fact about an exit policy, declared where the policy is defined.

A policy class registers itself with :func:`register_policy`, in the style of timm's
``@register_model`` (:mod:`stage1_pro.policies.softmax` is a complete example)::

    @register_policy("softmax", artifact_kind="thresholds", min_phase=1, score_names=("probs",), ...)
    class SoftmaxThresholdPolicy(ConfidenceThresholdPolicy): ...

Everything else derives from the :class:`PolicySpec` it records: the phase/policy matrix and the
``--exit-policy`` choices (:mod:`stage1_pro.config`), the artifact kinds and policy file names
(:mod:`stage1_pro.schemas`, :mod:`stage1_pro.artifacts`, :mod:`stage1_pro.bundle`), the policy-name
enums of the config, bundle and validation schemas (:mod:`stage1_pro.policy_schemas`),
``stage1-pro calibrate``'s policies and flags, and the pipeline's ``dsl.If/Elif/Else`` branches. A
policy registered at run time (a plugin, a test) takes part in all of them with no other file
changed; :func:`unregister_policy` takes it out again.

The built-in policies register when :mod:`stage1_pro.policies` is imported, which the first query
here does. That package is imported by name: its modules import this one to register, so a static
import back would be a cycle (plugins are discovered by name the same way).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stage1_pro.defaults import PHASES
from stage1_pro.errors import ConfigError

#: The package whose import registers the built-in policies (in the order the pipeline branches on).
BUILTIN_POLICIES_PACKAGE = "stage1_pro.policies"
#: Policy names end up in file names, KFP task names and conditions: lower case, digits, '-'.
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_FLAG = re.compile(r"^--[a-z][a-z0-9-]*$")

_T = TypeVar("_T")
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True)
class PolicyOption:
    """A constructor parameter of a policy that ``stage1-pro calibrate`` exposes as a flag.

    Several policies may share a flag (``--calibrator``) with their own parameter behind it.

    Attributes:
        flag: the command-line flag, ``--kebab-case`` (the ``--snake_case`` spelling is added).
        param: the policy constructor parameter the flag sets.
        help: one line for ``--help``, with the default.
        choices: allowed values, if the parameter is one of a fixed set.
    """

    flag: str
    param: str
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """The argparse destination of the flag (``--scrc-variant`` -> ``scrc_variant``)."""
        return self.flag.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class PolicySpec:
    """Every fact about one exit policy (see the module docstring for where each is used).

    Attributes:
        name: registry name (``create_policy(name)``, ``--policy``, ``config.exit_policy``).
        policy_class: the estimator class (an :class:`stage1_pro.policies.base.ExitPolicy`).
        artifact_kind: the kind of its policy file (``artifact`` field, schema name).
        min_phase: the first phase whose models can be calibrated with it.
        score_names: the ``scores.npz`` arrays its decisions read (``probs``, ``gate_logit``).
        score_label: what it ranks images by, for the risk-coverage curve of ``validation.json``.
        rule: its exit rule in one line, for ``stage1-pro calibrate --help``.
        file_name: its policy file's name in a run directory and a bundle.
        script: its numbered script in ``stage1_pro/scripts`` (``None``: only the ``calibrate`` verb).
        options: the constructor parameters ``stage1-pro calibrate`` exposes.
        schema: the JSON Schema of its policy file as a dict; ``None`` reads
            ``schemas/<artifact_kind>.schema.json`` (the built-in policies).
    """

    name: str
    policy_class: type
    artifact_kind: str
    min_phase: int
    score_names: tuple[str, ...]
    score_label: str
    rule: str
    file_name: str
    script: str | None = None
    options: tuple[PolicyOption, ...] = ()
    schema: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def needs_gate(self) -> bool:
        """True when every rule of the policy reads the gate head's logit (a phase >= 3 model)."""
        return "gate_logit" in self.score_names

    @property
    def phases(self) -> tuple[int, ...]:
        """The phases that allow this policy."""
        return tuple(p for p in PHASES if p >= self.min_phase)


_SPECS: dict[str, PolicySpec] = {}
_generation = 0
_builtins_loaded = False


def register_policy(
    name: str,
    *,
    artifact_kind: str,
    min_phase: int,
    score_names: tuple[str, ...],
    score_label: str,
    rule: str,
    file_name: str | None = None,
    script: str | None = None,
    options: Sequence[PolicyOption] = (),
    schema: Mapping[str, Any] | None = None,
) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: register the decorated exit-policy class as ``name``.

    It sets the class attributes ``name``, ``artifact_kind`` and ``spec`` and returns the class
    unchanged otherwise. Arguments are the fields of :class:`PolicySpec`; ``file_name`` defaults to
    ``<artifact_kind>.json``.

    Raises:
        ValueError: a malformed fact, or a name, kind or file name another policy already has.
    """

    def register(cls: type[_T]) -> type[_T]:
        spec = PolicySpec(
            name=name,
            policy_class=cls,
            artifact_kind=artifact_kind,
            min_phase=min_phase,
            score_names=tuple(score_names),
            score_label=score_label,
            rule=rule,
            file_name=file_name or f"{artifact_kind}.json",
            script=script,
            options=tuple(options),
            schema=schema,
        )
        _check_spec(spec)
        global _generation
        _SPECS[name] = spec
        _generation += 1
        cls.name = name  # type: ignore[attr-defined]
        cls.artifact_kind = artifact_kind  # type: ignore[attr-defined]
        cls.spec = spec  # type: ignore[attr-defined]
        return cls

    return register


def unregister_policy(name: str) -> PolicySpec:
    """Remove a registered policy (a test's teardown, a plugin unloading); return its spec.

    Raises:
        ConfigError: ``name`` is not registered.
    """
    global _generation
    spec = get_spec(name)
    del _SPECS[name]
    _generation += 1
    return spec


def _check_spec(spec: PolicySpec) -> None:
    from stage1_pro.scores import OPTIONAL_KEYS, REQUIRED_KEYS

    where = f"register_policy({spec.name!r})"
    if not _NAME.match(spec.name):
        raise ValueError(f"{where}: a policy name is lower case letters, digits and '-', e.g. 'gate'")
    if not _NAME.match(spec.artifact_kind):
        raise ValueError(f"{where}: artifact_kind {spec.artifact_kind!r} must look like 'thresholds'")
    for other in _SPECS.values():
        if other.name == spec.name and _same_class(other.policy_class, spec.policy_class):
            continue  # the defining module was imported again (importlib.reload)
        for attr in ("name", "artifact_kind", "file_name"):
            if getattr(other, attr) == getattr(spec, attr):
                raise ValueError(
                    f"{where}: {attr} {getattr(spec, attr)!r} is already registered by the "
                    f"{other.name!r} policy ({_qualname(other.policy_class)}); pick another"
                )
    if spec.min_phase not in PHASES:
        raise ValueError(f"{where}: min_phase={spec.min_phase!r}; phases are {', '.join(map(str, PHASES))}")
    known = (*REQUIRED_KEYS, *OPTIONAL_KEYS)
    if not spec.score_names or not set(spec.score_names) <= set(known):
        raise ValueError(f"{where}: score_names {spec.score_names!r} must name scores.npz arrays ({known})")
    params = set(inspect.signature(spec.policy_class.__init__).parameters) - {"self"}
    for option in spec.options:
        if not _FLAG.match(option.flag):
            raise ValueError(f"{where}: option flag {option.flag!r} must look like '--selection-score'")
        if option.param not in params:
            raise ValueError(
                f"{where}: option {option.flag} sets {option.param!r}, which is not a parameter of "
                f"{spec.policy_class.__name__} ({', '.join(sorted(params))})"
            )
    if spec.schema is not None:
        properties = spec.schema.get("properties", {})
        for key, want in (("artifact", spec.artifact_kind), ("policy", spec.name)):
            if properties.get(key, {}).get("const") != want:
                raise ValueError(
                    f"{where}: the schema must fix properties.{key} to {{'const': {want!r}}} "
                    "(how a policy file says what it is)"
                )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(a: type, b: type) -> bool:
    return _qualname(a) == _qualname(b)


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # before the import: the policy modules call back into this module
    try:
        importlib.import_module(BUILTIN_POLICIES_PACKAGE)
    except BaseException:
        _builtins_loaded = False
        raise


# ------------------------------------------------------------------------------------------
# queries


def registry_generation() -> int:
    """A counter that changes whenever a policy is registered or removed (a cache key)."""
    _ensure_builtins()
    return _generation


def policy_specs() -> tuple[PolicySpec, ...]:
    """The registered policies' specs, in registration order (built-ins first)."""
    _ensure_builtins()
    return tuple(_SPECS.values())


def list_policies() -> tuple[str, ...]:
    """The registered policy names, in registration order (``softmax, gate, scrc`` + plugins)."""
    return tuple(spec.name for spec in policy_specs())


def get_spec(name: str) -> PolicySpec:
    """The spec of policy ``name``.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the registered names).
    """
    _ensure_builtins()
    if name not in _SPECS:
        raise ConfigError(f"unknown exit policy {name!r}; allowed: {', '.join(_SPECS)}")
    return _SPECS[name]


def spec_for_kind(kind: str) -> PolicySpec | None:
    """The policy whose policy file has artifact kind ``kind``, or ``None`` for another kind."""
    return next((s for s in policy_specs() if s.artifact_kind == kind), None)


def phase_policies() -> dict[int, tuple[str, ...]]:
    """The phase/policy matrix: phase -> the policies a run of that phase may calibrate."""
    specs = policy_specs()
    return {phase: tuple(s.name for s in specs if s.min_phase <= phase) for phase in PHASES}


def phases_text(spec: PolicySpec) -> str:
    """``1-6``, ``3-6`` or ``6``: the phases that allow ``spec``."""
    first, last = spec.min_phase, PHASES[-1]
    return str(first) if first == last else f"{first}-{last}"


def describe_policies() -> str:
    """The policies and their phases in words: ``softmax (phases 1-6), gate (3-6) or scrc (6)``."""
    items = [
        f"{s.name} ({'phases ' if i == 0 else ''}{phases_text(s)})" for i, s in enumerate(policy_specs())
    ]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


# ------------------------------------------------------------------------------------------
# live views: module constants that always show the current registry


class _RegistryView:
    """What the live views share: their content, rebuilt by ``build`` when the registry changes."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._cached: tuple[int, Any] = (-1, None)

    def _data(self) -> Any:
        generation = registry_generation()
        if self._cached[0] != generation:
            self._cached = (generation, self._build())
        return self._cached[1]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __repr__(self) -> str:
        return repr(self._data())


class RegistryMapping(_RegistryView, Mapping[_K, _V]):
    """A read-only mapping rebuilt from the registry when it changes.

    Modules keep their established constants (``POLICY_FILES``, ``PHASE_POLICIES``...) as these
    views, so a policy registered after import appears in them.
    """

    def __init__(self, build: Callable[[], Mapping[_K, _V]]) -> None:
        super().__init__(lambda: dict(build()))

    def __getitem__(self, key: _K) -> _V:
        return self._data()[key]


class RegistrySequence(_RegistryView, Sequence[_V]):
    """A read-only tuple-like view rebuilt from the registry when it changes (as :class:`RegistryMapping`)."""

    def __init__(self, build: Callable[[], Sequence[_V]]) -> None:
        super().__init__(lambda: tuple(build()))

    def __getitem__(self, index: Any) -> Any:
        return self._data()[index]

    def __contains__(self, value: object) -> bool:
        return value in self._data()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return self._data() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


__all__ = [
    "BUILTIN_POLICIES_PACKAGE",
    "PolicyOption",
    "PolicySpec",
    "RegistryMapping",
    "RegistrySequence",
    "describe_policies",
    "get_spec",
    "list_policies",
    "phase_policies",
    "phases_text",
    "policy_specs",
    "register_policy",
    "registry_generation",
    "spec_for_kind",
    "unregister_policy",
]
