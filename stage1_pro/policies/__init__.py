"""Certified exit policies: ``softmax`` (thresholds.json), ``gate`` (gateparams.json), ``scrc``
(scrcparams.json).

>>> from stage1_pro.policies import create_policy, load_policy
>>> policy = create_policy("softmax", target_fnr_exit=0.02, delta=0.1).fit(scores)  # doctest: +SKIP
>>> policy.save("run/thresholds.json")  # doctest: +SKIP
>>> load_policy("run/thresholds.json").decide(probs)  # doctest: +SKIP

Policy classes are imported lazily (PEP 562): importing the package for a constant or the
registry does not import every policy.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from stage1_pro.decisions import DECISION_NAMES, DEFER, EXIT_NEGATIVE, EXIT_POSITIVE
from stage1_pro.policies.base import ExitPolicy, InfeasibleCertificateWarning

if TYPE_CHECKING:
    from stage1_pro.policies.gate import GatePolicy
    from stage1_pro.policies.scrc import SCRCPolicy
    from stage1_pro.policies.softmax import SoftmaxThresholdPolicy

#: policy name -> "module:Class"
POLICIES: dict[str, str] = {
    "softmax": "stage1_pro.policies.softmax:SoftmaxThresholdPolicy",
    "gate": "stage1_pro.policies.gate:GatePolicy",
    "scrc": "stage1_pro.policies.scrc:SCRCPolicy",
}
_CLASS_NAMES = {path.split(":")[1]: path for path in POLICIES.values()}

__all__ = [
    "DECISION_NAMES",
    "DEFER",
    "EXIT_NEGATIVE",
    "EXIT_POSITIVE",
    "POLICIES",
    "ExitPolicy",
    "GatePolicy",
    "InfeasibleCertificateWarning",
    "SCRCPolicy",
    "SoftmaxThresholdPolicy",
    "create_policy",
    "get_policy_class",
    "load_policy",
    "policy_from_dict",
]


def _import(path: str) -> type[ExitPolicy]:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str) -> Any:
    if name in _CLASS_NAMES:
        return _import(_CLASS_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_policy_class(name: str) -> type[ExitPolicy]:
    """The class registered as ``name``; :class:`~stage1_pro.errors.ConfigError` lists the names."""
    from stage1_pro.errors import ConfigError

    if name not in POLICIES:
        raise ConfigError(f"unknown exit policy {name!r}; allowed: {', '.join(POLICIES)}")
    return _import(POLICIES[name])


def create_policy(name: str, **params: Any) -> ExitPolicy:
    """Create an unfitted policy: ``create_policy("gate", calibrator="isotonic", delta=0.05)``."""
    cls = get_policy_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        import inspect

        from stage1_pro.errors import ConfigError

        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ConfigError(f"{name} policy: {exc}; allowed parameters: {', '.join(allowed)}") from exc


def policy_from_dict(d: dict[str, Any]) -> ExitPolicy:
    """Rebuild a fitted policy from a validated policy file's content (kind from ``policy``)."""
    return get_policy_class(d["policy"]).from_dict(d)


def load_policy(uri: str | os.PathLike[str]) -> ExitPolicy:
    """Read a policy file (validated against its schema; the kind is taken from the file)."""
    from stage1_pro.artifacts import POLICY_ARTIFACT_KINDS, read_artifact
    from stage1_pro.errors import ArtifactError

    obj = read_artifact(uri)
    if obj["artifact"] not in POLICY_ARTIFACT_KINDS.values():
        raise ArtifactError(
            f"{uri}: is a {obj['artifact']!r} artifact, not a policy file "
            f"(expected one of {', '.join(sorted(POLICY_ARTIFACT_KINDS.values()))})"
        )
    return policy_from_dict(obj)
