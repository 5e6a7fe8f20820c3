"""The exit-policy registry: the built-in policies' facts, registration errors, the generated schema
parts, and a fourth policy defined in this file alone running calibrate -> validate -> export ->
load_bundle -> predict (library and CLI) and getting its own pipeline branch.

The toy policy (``margin``: exit iff ``|p1 - p0|`` reaches a certified threshold) is registered by
the ``margin_policy`` fixture and removed at teardown, so no other test sees it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from bundle_helpers import build_tiny_model, make_run, tiny_images

from stage1_pro import schemas
from stage1_pro.artifacts import DEFAULT_FILENAMES, POLICY_ARTIFACT_KINDS, read_artifact, validate_artifact
from stage1_pro.bundle import POLICY_FILES
from stage1_pro.cli import main
from stage1_pro.config import EXIT_POLICIES, PHASE_POLICIES, Stage1ProConfig
from stage1_pro.defaults import PHASES
from stage1_pro.errors import ArtifactError, ConfigError
from stage1_pro.policies import POLICIES, create_policy, get_policy_class, load_policy
from stage1_pro.policies.base import ConfidenceThresholdPolicy
from stage1_pro.policy_registry import (
    PolicyOption,
    get_spec,
    list_policies,
    phase_policies,
    policy_specs,
    register_policy,
    unregister_policy,
)
from stage1_pro.schemas import ARTIFACT_KINDS, load_schema

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ("softmax", "gate", "scrc")


# ------------------------------------------------------------------------------------------------
# the toy fourth policy: a class and a schema dict, nothing else


class MarginPolicy(ConfidenceThresholdPolicy):
    """Exit, with the argmax class, iff the probability margin ``|p1 - p0|`` reaches a certified threshold.

    ``score="squared"`` thresholds ``(p1 - p0)^2`` instead (the same ranking, another scale): a
    constructor option for ``stage1-pro calibrate --margin-score``.
    """

    score: str = "margin"

    def confidence(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        margin = np.abs(p[:, 1] - p[:, 0])
        return margin**2 if self.score == "squared" else margin

    def _grid_rule(self) -> str:
        return f"val_select {self.score} quantiles at coverage levels j/{self.grid_size}, ties removed"

    def _rule_text(self) -> str:
        return f"exit iff {self.score} >= {self.exit_threshold_:.6g}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "score": self.score}

    @classmethod
    def _params_from_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        return {**super()._params_from_dict(d), "score": d["score"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"common.schema.json#/$defs/{name}"}


MARGIN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "marginparams.json: certified probability-margin exit policy (test-only)",
    "type": "object",
    "required": ["artifact", "schema_version", "policy", "exit_threshold", "score", "feasible",
                 "certificate", "val_calib_metrics", "target_fnr_exit", "max_fpr_exit", "delta"],
    "properties": {
        "artifact": {"const": "marginparams"},
        "schema_version": _ref("schema_version"),
        "policy": {"const": "margin"},
        "exit_threshold": {"type": "number", "minimum": 0},
        "score": {"enum": ["margin", "squared"]},
        "feasible": {"type": "boolean"},
        "target_fnr_exit": _ref("target_fnr_exit"),
        "max_fpr_exit": _ref("max_fpr_exit"),
        "delta": _ref("delta"),
        "certificate": _ref("certificate"),
        "val_calib_metrics": _ref("exit_metrics"),
        "val_select_metrics": _ref("exit_metrics"),
        "fnr_on_exits": {"type": ["number", "null"]},
        "coverage": _ref("probability"),
        "exit_accuracy": {"type": ["number", "null"]},
        "sweep_results": {"type": "array", "items": {"type": "object"}},
        "created_at": {"type": "string", "format": "date-time"},
        "model_version": {"type": "string"},
        "splits_version": {"type": "string"},
        "data_fingerprint": {"type": "string"},
        "scores_sha256": _ref("sha256"),
    },
    "additionalProperties": False,
}  # fmt: skip


SCORES = ("margin", "squared")


def register_margin(**overrides: Any) -> type[MarginPolicy]:
    facts: dict[str, Any] = {
        "artifact_kind": "marginparams",
        "min_phase": 2,
        "score_names": ("probs",),
        "score_label": "class-probability margin",
        "rule": "exit iff |p1 - p0| >= exit_threshold",
        "options": (PolicyOption("--margin-score", "score", "thresholded score (default margin)", SCORES),),
        "schema": MARGIN_SCHEMA,
    }  # fmt: skip
    facts.update(overrides)
    return register_policy("margin", **facts)(MarginPolicy)


@pytest.fixture
def margin_policy() -> Iterator[type[MarginPolicy]]:
    cls = register_margin()
    try:
        yield cls
    finally:
        unregister_policy("margin")


# ------------------------------------------------------------------------------------------------
# the built-in policies


def test_builtin_policies_in_branch_order_with_their_facts() -> None:
    assert list_policies() == BUILTIN == tuple(EXIT_POLICIES) == tuple(POLICIES)
    facts = {
        s.name: (s.artifact_kind, s.file_name, s.min_phase, s.needs_gate, s.script) for s in policy_specs()
    }
    assert facts == {
        "softmax": ("thresholds", "thresholds.json", 1, False, "25_threshold_sweep.py"),
        "gate": ("gateparams", "gateparams.json", 3, True, "33_calibrate_gate.py"),
        "scrc": ("scrcparams", "scrcparams.json", 6, False, "36_calibrate_scrc.py"),
    }
    for spec in policy_specs():
        assert spec.policy_class.name == spec.name and spec.policy_class.spec is spec
        assert get_policy_class(spec.name) is spec.policy_class


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_schema_and_script_match_the_spec(name: str) -> None:
    spec = get_spec(name)
    schema = json.loads((REPO / "schemas" / f"{spec.artifact_kind}.schema.json").read_text())
    assert schema["properties"]["artifact"]["const"] == spec.artifact_kind
    assert schema["properties"]["policy"]["const"] == name
    script = (REPO / "stage1_pro" / "scripts" / spec.script).read_text()
    assert f'run_verb("calibrate", "--policy", "{name}")' in script


def test_unknown_policy_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"^unknown exit policy 'svm'; allowed: softmax, gate, scrc$"):
        get_spec("svm")


def test_scrc_selecting_on_the_gate_reads_the_gate_logit() -> None:
    assert create_policy("scrc").score_names == ("probs", "gate_logit")  # the default selects on the gate
    assert create_policy("scrc", selection_score="max_prob").score_names == ("probs",)


# ------------------------------------------------------------------------------------------------
# registration errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"artifact_kind": "thresholds"},
            r"artifact_kind 'thresholds' is already registered by the 'softmax'",
        ),
        (
            {"file_name": "gateparams.json"},
            r"file_name 'gateparams.json' is already registered by the 'gate'",
        ),
        ({"min_phase": 7}, r"min_phase=7; phases are 1, 2, 3, 4, 5, 6"),
        ({"score_names": ("logits",)}, r"score_names \('logits',\) must name scores.npz arrays"),
        (
            {"options": (PolicyOption("--margin-score", "scale", "x"),)},
            r"option --margin-score sets 'scale', which is not a parameter of MarginPolicy",
        ),
        (
            {"options": (PolicyOption("-m", "score", "x"),)},
            r"option flag '-m' must look like '--selection-score'",
        ),
        (
            {"schema": {**MARGIN_SCHEMA, "properties": {"artifact": {"const": "marginparams"}}}},
            r"the schema must fix properties.policy to \{'const': 'margin'\}",
        ),
    ],
)
def test_bad_registrations_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_margin(**overrides)
    assert "margin" not in list_policies()


def test_a_name_cannot_be_taken_twice() -> None:
    class Other(MarginPolicy):
        pass

    with pytest.raises(ValueError, match=r"name 'gate' is already registered by the 'gate' policy"):
        register_policy("gate", artifact_kind="other", min_phase=1, score_names=("probs",),
                        score_label="x", rule="x")(Other)  # fmt: skip
    with pytest.raises(ValueError, match=r"a policy name is lower case letters, digits and '-'"):
        register_policy("My Policy", artifact_kind="other", min_phase=1, score_names=("probs",),
                        score_label="x", rule="x")(Other)  # fmt: skip
    assert list_policies() == BUILTIN


def test_unregister_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="unknown exit policy 'margin'"):
        unregister_policy("margin")


# ------------------------------------------------------------------------------------------------
# generated schema parts


def test_committed_schemas_are_what_the_registry_generates() -> None:
    stale = schemas.stale_schema_files()
    assert stale == [], f"{stale} differ from the registry: run '{schemas.REGENERATE_COMMAND}'"


def test_generator_rewrites_a_stale_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "json_schemas"
    shutil.copytree(REPO / "schemas", folder)
    doc = json.loads((folder / "bundle.schema.json").read_text())
    doc["properties"]["active_exit_policy"]["enum"] = ["softmax", "gate"]  # a hand edit that forgot scrc
    doc["allOf"] = doc["allOf"][:1]
    (folder / "bundle.schema.json").write_text(json.dumps(doc, indent=2) + "\n")
    monkeypatch.setattr(schemas, "schemas_dir", lambda: folder)

    assert schemas.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"stale: {folder / 'bundle.schema.json'} (regenerate with 'python -m stage1_pro.schemas')" in err
    assert "config.schema.json" not in err
    assert schemas.main([]) == 0
    assert f"wrote {folder / 'bundle.schema.json'}" in capsys.readouterr().out
    assert schemas.main(["--check"]) == 0
    assert (folder / "bundle.schema.json").read_text() == (
        REPO / "schemas" / "bundle.schema.json"
    ).read_text()


def test_phase_matrix_rules_match_the_registry_for_every_phase_and_policy() -> None:
    for phase in PHASES:
        for policy in BUILTIN:
            doc = {"phase": phase, "exit_policy": policy}
            if policy in phase_policies()[phase]:
                validate_artifact(doc, "config")
            else:
                with pytest.raises(
                    ArtifactError, match=rf"{policy} needs phase (>= )?{get_spec(policy).min_phase}"
                ):
                    validate_artifact(doc, "config")


# ------------------------------------------------------------------------------------------------
# a fourth policy, registered at run time


def test_registered_policy_appears_everywhere_and_leaves_no_trace(margin_policy: type) -> None:
    assert list_policies() == (*BUILTIN, "margin")
    assert tuple(EXIT_POLICIES) == (*BUILTIN, "margin") and "margin" in POLICIES
    assert PHASE_POLICIES[1] == ("softmax",) and PHASE_POLICIES[2] == ("softmax", "margin")
    assert PHASE_POLICIES[6] == (*BUILTIN, "margin")
    assert POLICY_ARTIFACT_KINDS["margin"] == "marginparams" and POLICY_FILES["margin"] == "marginparams.json"
    assert "marginparams" in ARTIFACT_KINDS and DEFAULT_FILENAMES["marginparams"] == "marginparams.json"
    assert load_schema("config")["properties"]["exit_policy"]["enum"] == [*BUILTIN, "margin"]
    assert load_schema("validation")["properties"]["exit_policy"]["enum"] == [*BUILTIN, "margin"]
    # the config: dataclass check and schema agree on the new matrix
    assert Stage1ProConfig(phase=2, exit_policy="margin").exit_policy == "margin"
    with pytest.raises(ConfigError, match=r"phase 1 allows softmax; 'margin' needs phase >= 2"):
        Stage1ProConfig(phase=1, exit_policy="margin")
    phase1 = (
        r"phase 1 allows exit_policy softmax only \(gate needs phase >= 3, scrc needs phase 6, margin needs"
    )
    with pytest.raises(ArtifactError, match=phase1):
        validate_artifact({"phase": 1, "exit_policy": "margin"}, "config")
    validate_artifact({"phase": 2, "exit_policy": "margin"}, "config")
    with pytest.raises(
        ArtifactError, match=r"phase 2 allows exit_policy softmax \| margin \(gate needs phase"
    ):
        validate_artifact({"phase": 2, "exit_policy": "gate"}, "config")

    unregister_policy("margin")
    try:
        assert list_policies() == BUILTIN and "marginparams" not in ARTIFACT_KINDS
        assert load_schema("config")["properties"]["exit_policy"]["enum"] == list(BUILTIN)
        with pytest.raises(ArtifactError, match="'margin' is not one of"):
            validate_artifact({"phase": 6, "exit_policy": "margin"}, "config")
        assert schemas.stale_schema_files() == []
    finally:
        register_margin()  # for the fixture's teardown


def test_registered_policy_gets_a_pipeline_branch(margin_policy: type, tmp_path: Path) -> None:
    """Compiled: four dsl.If/Elif/Elif/Else groups, the new policy last (the Else)."""
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    groups = {t["taskInfo"]["name"]: t for d in dags for t in d["tasks"].values()}
    assert {g for g in groups if g.startswith("exit-policy-")} == {
        f"exit-policy-{p}" for p in (*BUILTIN, "margin")
    }
    channel = "inputs.parameter_values['pipelinechannel--exit_policy']"
    assert groups["exit-policy-margin"]["triggerPolicy"]["condition"] == " && ".join(
        f"!({channel} == '{p}')" for p in BUILTIN
    )
    assert groups["exit-policy-scrc"]["triggerPolicy"]["condition"].endswith(f"{channel} == 'scrc'")
    calibrate = groups["calibrate-margin"]
    assert calibrate["inputs"]["parameters"]["exit_policy"] == {"runtimeValue": {"constant": "margin"}}
    assert "margin" in spec["root"]["inputDefinitions"]["parameters"]["exit_policy"]["description"]


@pytest.fixture(scope="module")
def jpeg_images(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Street-photo format: the tiny dataset's digits saved as RGB JPEGs."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("jpeg")
    out = []
    for path in tiny_images(tiny_dataset, count=40):
        target = folder / f"{path.parent.name}-{path.stem}.jpg"
        Image.open(path).convert("RGB").save(target, quality=95)
        out.append(target)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, jpeg_images: list[Path]) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"), jpeg_images)


def _expected_decisions(run: Path, images: list[Path]) -> np.ndarray:
    """What the run's own policy file decides on a bare forward pass of the run's own model."""
    import torch

    from stage1_pro.models import load_model
    from stage1_pro.preprocessing import PreprocessSpec, preprocess

    model = load_model(run)
    spec = PreprocessSpec.from_model_info(read_artifact(run / "model.json", "model"))
    with torch.no_grad():
        out = model(preprocess(spec, images))
    probs = torch.softmax(out["logits"], dim=1).numpy().astype(np.float64)
    return np.asarray(load_policy(run / "marginparams.json").decide(probs))


@pytest.mark.slow
def test_margin_policy_through_the_library(
    margin_policy: type, model_dir: Path, jpeg_images: list[Path], tmp_path: Path
) -> None:
    from stage1_pro.bundle import export_bundle, verify_bundle
    from stage1_pro.calibrate import calibrate_policy
    from stage1_pro.inference import load_bundle
    from stage1_pro.validate import validate_run

    run = make_run(tmp_path / "run", model_dir, policy="margin", calibrate=False)
    written = calibrate_policy(
        "margin", str(run / "scores.npz"), str(run / "marginparams.json"), score="squared"
    )
    assert written["artifact"] == "marginparams" and written["feasible"] and written["score"] == "squared"
    with pytest.raises(
        ConfigError, match=r"the margin policy writes marginparams.json, never thresholds.json"
    ):
        calibrate_policy("margin", str(run / "scores.npz"), str(tmp_path / "thresholds.json"))

    validation = validate_run(run)
    assert validation["blessed"], [c["message"] for c in validation["checks"] if not c["passed"]]
    assert validation["exit_policy"] == "margin" and validation["policy_file"] == "marginparams.json"
    assert validation["risk_coverage"]["score"] == "class-probability margin"

    bundle = export_bundle(run, tmp_path / "bundle", version="margin-1")
    meta = verify_bundle(bundle)
    assert meta["active_exit_policy"] == "margin" and meta["policy_file"] == "marginparams.json"
    predictor = load_bundle(bundle)
    assert type(predictor.policy) is MarginPolicy and predictor.policy.score == "squared"
    got = [p.decision for p in predictor.predict([str(p) for p in jpeg_images])]
    want = _expected_decisions(run, jpeg_images)
    assert got == want.tolist() and len(set(got)) >= 2, "decisions should be mixed on these images"


@pytest.mark.slow
def test_margin_policy_through_the_cli(
    margin_policy: type,
    model_dir: Path,
    jpeg_images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = make_run(tmp_path / "run", model_dir, policy="margin", calibrate=False)
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    help_text = capsys.readouterr().out
    assert re.search(r"--policy \{softmax,gate,scrc,margin\}", help_text)
    assert "margin: thresholded score (default margin)" in help_text
    assert re.search(r"^  margin +marginparams.json +phases 2-6$", help_text, re.M)

    assert main(["calibrate", "--run", str(run), "--scrc-variant", "SCRC-T"]) == 2
    assert "--policy margin does not take --scrc-variant" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(run), "--margin-score", "squared"]) == 0  # policy from config.json
    assert "margin [certified] exit iff squared >=" in capsys.readouterr().out
    assert main(["calibrate", "--run", str(run), "--policy", "softmax", "--margin-score", "margin"]) == 2
    assert "--policy softmax does not take --margin-score" in capsys.readouterr().err

    assert main(["validate", "--run", str(run)]) == 0
    assert (
        main(["export", "--run", str(run), "--out", str(tmp_path / "bundle"), "--version", "margin-2"]) == 0
    )
    assert main(["check", str(tmp_path / "bundle" / "marginparams.json")]) == 0
    capsys.readouterr()
    assert main(["predict", "--bundle", str(tmp_path / "bundle"), "--json", *map(str, jpeg_images)]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {1: "exit-positive", 0: "exit-negative", -1: "defer"}
    assert [r["decision"] for r in rows] == [names[int(d)] for d in _expected_decisions(run, jpeg_images)]
    assert [r["source"] for r in rows] == [str(p) for p in jpeg_images]
