"""Certified exit policies: ``softmax`` (thresholds.json), ``gate`` (gateparams.json), ``scrc``
(scrcparams.json), and any policy registered with :func:`stage1_pro.policy_registry.register_policy`.

>>> from stage1_pro.policies import create_policy, load_policy
>>> policy = create_policy("softmax", target_fnr_exit=0.02, delta=0.1).fit(scores)  # doctest: +SKIP
>>> policy.save("run/thresholds.json")  # doctest: +SKIP
>>> load_policy("run/thresholds.json").decide(probs)  # doctest: +SKIP

Importing this package registers the built-in policies, in the order the pipeline branches on
them (the last one is its ``dsl.Else``): each module registers its class where it is defined.
"""

from __future__ import annotations

import os
from typing import Any

from stage1_pro.decisions import DECISION_NAMES, DEFER, EXIT_NEGATIVE, EXIT_POSITIVE
from stage1_pro.policies.base import ExitPolicy, InfeasibleCertificateWarning
from stage1_pro.policy_registry import PolicySpec, RegistryMapping, get_spec, policy_specs

# The built-in policies register on import, in this order (the pipeline's If, Elif, Else).
# isort: off
from stage1_pro.policies.softmax import SoftmaxThresholdPolicy
from stage1_pro.policies.gate import GatePolicy
from stage1_pro.policies.scrc import SCRCPolicy

# isort: on

#: policy name -> :class:`~stage1_pro.policy_registry.PolicySpec` (a live view of the registry).
POLICIES: RegistryMapping[str, PolicySpec] = RegistryMapping(lambda: {s.name: s for s in policy_specs()})

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


def get_policy_class(name: str) -> type[ExitPolicy]:
    """The class registered as ``name``; :class:`~stage1_pro.errors.ConfigError` lists the names."""
    return get_spec(name).policy_class


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
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.errors import ArtifactError
    from stage1_pro.policy_registry import list_policies, spec_for_kind

    obj = read_artifact(uri)
    if spec_for_kind(obj["artifact"]) is None:
        kinds = sorted(get_spec(name).artifact_kind for name in list_policies())
        raise ArtifactError(
            f"{uri}: is a {obj['artifact']!r} artifact, not a policy file "
            f"(expected one of {', '.join(kinds)})"
        )
    return policy_from_dict(obj)
