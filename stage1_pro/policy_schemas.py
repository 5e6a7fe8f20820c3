"""The parts of the config, bundle and validation schemas that list exit policies, generated from
the policy registry (:mod:`stage1_pro.policy_registry`).

* ``config``: the ``exit_policy`` enum and the phase/policy matrix (``allOf`` rules, one per run of
  phases that does not allow every policy, each with the message a user sees);
* ``bundle``: the ``active_exit_policy`` enum and which ``policy_file`` each policy has;
* ``validation``: the ``exit_policy`` enum (the run's, and the champion's) and that of the
  ``policy_comparison`` rows;
* ``score_reference`` and ``drift``: the ``exit_policy`` enum.

:func:`apply_policy_facts` writes them into a schema document. :mod:`stage1_pro.schemas` applies it
to every schema it loads, so a policy registered at run time validates at once; the committed files
under ``schemas/`` are what the built-in policies generate (``python -m stage1_pro.schemas``
rewrites them, and a test fails when they differ). Generated parts carry :data:`GENERATED`
as their ``$comment``; every other part of a schema is left as written.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from stage1_pro.defaults import PHASES
from stage1_pro.policy_registry import PolicySpec, phase_policies, policy_specs

#: ``$comment`` of every generated part of a schema (how the generator finds what to replace).
GENERATED = "generated from the exit-policy registry: python -m stage1_pro.schemas"


def _names(specs: tuple[PolicySpec, ...]) -> list[str]:
    return [s.name for s in specs]


def _policy_enum(prop: dict[str, Any], specs: tuple[PolicySpec, ...]) -> None:
    prop.pop("enum", None)
    prop.pop("$comment", None)
    prop["enum"] = _names(specs)
    prop["$comment"] = GENERATED


def _replace_rules(doc: dict[str, Any], rules: list[dict[str, Any]]) -> None:
    """Put ``rules`` into ``doc['allOf']`` where the generated rules were, keeping the others."""
    existing = doc.get("allOf", [])
    generated_at = [i for i, rule in enumerate(existing) if rule.get("$comment") == GENERATED]
    at = generated_at[0] if generated_at else len(existing)
    kept = [rule for rule in existing if rule.get("$comment") != GENERATED]
    kept[at:at] = rules
    doc["allOf"] = kept


def _span(phases: list[int]) -> str:
    return str(phases[0]) if len(phases) == 1 else f"{phases[0]}-{phases[-1]}"


def _needs(spec: PolicySpec) -> str:
    if spec.min_phase == PHASES[-1]:
        return f"{spec.name} needs phase {spec.min_phase}"
    return f"{spec.name} needs phase >= {spec.min_phase}"


def phase_matrix_rules(specs: tuple[PolicySpec, ...]) -> list[dict[str, Any]]:
    """One ``if phase in ... then exit_policy in ...`` rule per run of phases with the same allowed set.

    Phases that allow every policy need no rule. A rule covering phase 1 does not require
    ``phase`` (a config without it is a phase-1 config).
    """
    matrix = phase_policies()
    groups: list[list[int]] = []
    for phase in PHASES:
        if groups and matrix[groups[-1][-1]] == matrix[phase]:
            groups[-1].append(phase)
        else:
            groups.append([phase])
    rules = []
    for phases in groups:
        allowed = list(matrix[phases[0]])
        if len(allowed) == len(specs):
            continue
        plural = len(phases) > 1
        message = (
            f"phase{'s' if plural else ''} {_span(phases)} allow{'' if plural else 's'} exit_policy "
            f"{' | '.join(allowed)}{' only' if len(allowed) == 1 else ''} "
            f"({', '.join(_needs(s) for s in specs if s.name not in allowed)})"
        )
        condition: dict[str, Any] = {"properties": {"phase": {"enum": phases}}}
        if PHASES[0] not in phases:
            condition["required"] = ["phase"]
        rules.append(
            {
                "$comment": GENERATED,
                "if": condition,
                "then": {"properties": {"exit_policy": {"enum": allowed, "x-message": message}}},
            }
        )
    return rules


def policy_file_rules(specs: tuple[PolicySpec, ...]) -> list[dict[str, Any]]:
    """One ``if active_exit_policy is X then policy_file is X's file`` rule per policy."""
    return [
        {
            "$comment": GENERATED,
            "if": {"properties": {"active_exit_policy": {"const": s.name}}},
            "then": {"properties": {"policy_file": {"const": s.file_name}}},
        }
        for s in specs
    ]


def _config(doc: dict[str, Any], specs: tuple[PolicySpec, ...]) -> None:
    _policy_enum(doc["properties"]["exit_policy"], specs)
    _replace_rules(doc, phase_matrix_rules(specs))


def _bundle(doc: dict[str, Any], specs: tuple[PolicySpec, ...]) -> None:
    _policy_enum(doc["properties"]["active_exit_policy"], specs)
    _replace_rules(doc, policy_file_rules(specs))


def _validation(doc: dict[str, Any], specs: tuple[PolicySpec, ...]) -> None:
    _policy_enum(doc["properties"]["exit_policy"], specs)
    _policy_enum(doc["properties"]["champion"]["properties"]["exit_policy"], specs)
    comparison = doc["properties"].get("policy_comparison")
    if comparison is not None:
        _policy_enum(comparison["items"]["properties"]["policy"], specs)


def _exit_policy(doc: dict[str, Any], specs: tuple[PolicySpec, ...]) -> None:
    _policy_enum(doc["properties"]["exit_policy"], specs)


_GENERATORS: dict[str, Callable[[dict[str, Any], tuple[PolicySpec, ...]], None]] = {
    "config": _config,
    "bundle": _bundle,
    "validation": _validation,
    "score_reference": _exit_policy,
    "drift": _exit_policy,
}
#: The artifact kinds whose schema lists exit policies.
GENERATED_KINDS: tuple[str, ...] = tuple(_GENERATORS)


def apply_policy_facts(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of the schema ``doc`` of ``kind`` with its policy parts generated from the registry.

    Kinds outside :data:`GENERATED_KINDS` come back as they are (a copy).
    """
    out = copy.deepcopy(doc)
    if kind in _GENERATORS:
        _GENERATORS[kind](out, policy_specs())
    return out


__all__ = ["GENERATED", "GENERATED_KINDS", "apply_policy_facts", "phase_matrix_rules", "policy_file_rules"]
