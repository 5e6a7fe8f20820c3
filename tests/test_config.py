"""Stage1ProConfig: the phase/policy matrix, the target range, no target_coverage, files and flags."""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stage1_pro
from stage1_pro.artifacts import read_artifact, validate_artifact
from stage1_pro.config import (
    PHASE_POLICIES,
    Stage1ProConfig,
    add_config_arguments,
    check_phase_policy,
    field_help,
    load_config,
    resolve_config,
    save_config,
)
from stage1_pro.errors import ArtifactError, ConfigError
from stage1_pro.schemas import load_schema

# The plan's matrix, written out independently of PHASE_POLICIES so a change to either is caught.
ALLOWED = {
    1: {"softmax"},
    2: {"softmax"},
    3: {"softmax", "gate"},
    4: {"softmax", "gate"},
    5: {"softmax", "gate"},
    6: {"softmax", "gate", "scrc"},
}
MATRIX = [(phase, policy) for phase in range(1, 7) for policy in ("softmax", "gate", "scrc")]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(("phase", "policy"), MATRIX)
def test_phase_policy_matrix_dataclass(phase: int, policy: str) -> None:
    if policy in ALLOWED[phase]:
        assert Stage1ProConfig(phase=phase, exit_policy=policy).exit_policy == policy
        return
    with pytest.raises(ConfigError) as info:
        Stage1ProConfig(phase=phase, exit_policy=policy)
    message = str(info.value)
    assert (
        f"phase {phase} allows {' | '.join(sorted(ALLOWED[phase], key=['softmax', 'gate', 'scrc'].index))}"
        in message
    )
    assert f"{policy!r} needs phase >= {min(p for p, a in ALLOWED.items() if policy in a)}" in message


@pytest.mark.parametrize(("phase", "policy"), MATRIX)
def test_phase_policy_matrix_schema(phase: int, policy: str) -> None:
    """`stage1-pro check config.json` catches the matrix too (config schema allOf)."""
    doc = {"phase": phase, "exit_policy": policy}
    if policy in ALLOWED[phase]:
        validate_artifact(doc, "config")
        return
    with pytest.raises(ArtifactError) as info:
        validate_artifact(doc, "config")
    assert "$.exit_policy" in str(info.value)
    assert "allow exit_policy" in str(info.value)


def test_matrix_constant_matches_plan() -> None:
    assert {p: set(a) for p, a in PHASE_POLICIES.items()} == ALLOWED


def test_missing_phase_means_phase_1_in_schema() -> None:
    with pytest.raises(ArtifactError, match=r"phases 1-2 allow exit_policy softmax only"):
        validate_artifact({"exit_policy": "gate"}, "config")
    validate_artifact({}, "config")


@pytest.mark.parametrize("phase", [0, 7, -1])
def test_unknown_phase(phase: int) -> None:
    with pytest.raises(ConfigError, match=r"is not a phase; phases are 1..6"):
        check_phase_policy(phase, "softmax")


def test_unknown_policy_lists_allowed() -> None:
    with pytest.raises(ConfigError, match=r"'threshold' is unknown; allowed: softmax, gate, scrc"):
        Stage1ProConfig(exit_policy="threshold")


@pytest.mark.parametrize("value", [1e-9, 0.001, 0.02, 0.05, 0.1])
def test_target_fnr_exit_in_range(value: float) -> None:
    config = Stage1ProConfig(target_fnr_exit=value)
    assert config.target_fnr_exit == value
    validate_artifact({"target_fnr_exit": value}, "config")


@pytest.mark.parametrize("value", [0.0, -0.01, 0.1000001, 0.2, 1.0, float("nan")])
def test_target_fnr_exit_out_of_range(value: float) -> None:
    with pytest.raises(ConfigError, match=r"outside the valid range \(0, 0.1\]; the default is 0.02"):
        Stage1ProConfig(target_fnr_exit=value)


@pytest.mark.parametrize(
    ("value", "reason"), [(0.0, "less than or equal to the minimum"), (0.11, "greater than")]
)
def test_target_fnr_exit_range_in_schema(value: float, reason: str) -> None:
    with pytest.raises(ArtifactError, match=rf"\$\.target_fnr_exit: {value} is {reason}"):
        validate_artifact({"target_fnr_exit": value}, "config")


def test_defaults_of_the_contract() -> None:
    config = Stage1ProConfig()
    assert (config.phase, config.exit_policy, config.target_fnr_exit) == (1, "softmax", 0.02)
    assert config.legacy_exit_threshold_for_logging == 0.88
    assert config.delta == 0.1
    assert config.max_fpr_exit == 0.25


def test_target_coverage_does_not_exist() -> None:
    assert "target_coverage" not in {f.name for f in dataclasses.fields(Stage1ProConfig)}
    with pytest.raises(TypeError):
        Stage1ProConfig(target_coverage=0.8)  # type: ignore[call-arg]
    with pytest.raises(SystemExit):
        _parse(["--target-coverage", "0.8"])
    with pytest.raises(SystemExit):
        _parse(["--target_coverage", "0.8"])


def test_target_coverage_rejected_with_removed_message(tmp_path) -> None:
    removed = "target_coverage was removed: stage1-pro has no coverage target"
    with pytest.raises(ConfigError, match=r"\$\.target_coverage: " + removed):
        Stage1ProConfig.from_dict({"phase": 3, "target_coverage": 0.8})
    path = tmp_path / "old.yaml"
    path.write_text("phase: 3\nexit_policy: gate\ntarget_coverage: 0.8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and removed in str(info.value)
    # ... and from the file passed to any verb with --config.
    with pytest.raises(ConfigError, match=removed):
        resolve_config(_parse(["--config", str(path)]))


def test_dataclass_fields_match_schema_properties() -> None:
    fields = {f.name for f in dataclasses.fields(Stage1ProConfig)}
    props = set(load_schema("config")["properties"]) - {"artifact", "schema_version", "target_coverage"}
    assert fields == props


def test_schema_descriptions_match_field_docs_and_every_field_has_a_flag() -> None:
    schema = load_schema("config")["properties"]
    args = _parse([])
    for f in dataclasses.fields(Stage1ProConfig):
        assert schema[f.name].get("description", "") == field_help(f.name), f.name
        if f.name != "notes":  # free-form mapping: file only
            assert hasattr(args, f.name), f"no CLI flag for {f.name}"


def test_help_needs_no_source_file(tmp_path: Path) -> None:
    """--help text comes from the fields' metadata: it works from a byte-code-only install."""
    package = Path(stage1_pro.__file__).parent
    copy = tmp_path / "site" / "stage1_pro"
    shutil.copytree(
        package, copy, ignore=lambda folder, names: [n for n in names if Path(folder, n).is_symlink()]
    )
    assert compileall.compile_dir(copy, legacy=True, quiet=1)  # config.pyc beside where config.py was
    for source in copy.rglob("*.py"):
        source.unlink()
    code = (
        "import argparse, inspect, stage1_pro.config as c\n"
        "assert c.__file__.endswith('config.pyc'), c.__file__\n"
        "try:\n    inspect.getsource(c.Stage1ProConfig)\nexcept OSError:\n    print('no source')\n"
        "p = argparse.ArgumentParser(); c.add_config_arguments(p); print(p.format_help())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no source")
    help_text = " ".join(out.stdout.split())  # argparse wraps lines
    assert " ".join(f"{field_help('target_fnr_exit')} (default: 0.02)".split()) in help_text
    assert "Width of the SelectiveNet gate head's hidden layer (phase >= 3). (default: 256)" in help_text


def test_default_config_validates_and_round_trips(tmp_path) -> None:
    config = Stage1ProConfig(phase=6, exit_policy="scrc", target_fnr_exit=0.05, class_weights=[1.0, 3.0])
    path = tmp_path / "config.json"
    save_config(config, path)
    doc = read_artifact(path, "config")
    assert doc["artifact"] == "config" and doc["schema_version"] == "1.0"
    assert load_config(path) == config


def test_yaml_config_and_flag_precedence(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("phase: 3\nexit_policy: gate\nepochs: 7\nlr: 0.01\n")
    config = resolve_config(_parse(["--config", str(path), "--epochs", "2", "--target_fnr_exit", "0.03"]))
    assert (config.phase, config.exit_policy, config.lr) == (3, "gate", 0.01)  # from the file
    assert (config.epochs, config.target_fnr_exit) == (2, 0.03)  # flags win over the file
    assert resolve_config(_parse(["--config", str(path)]), epochs=9).epochs == 9  # overrides win over all


def test_both_flag_spellings_and_bools() -> None:
    a = _parse(["--target-fnr-exit", "0.01", "--pretrained", "false", "--class-weights", "1", "2"])
    b = _parse(["--target_fnr_exit", "0.01", "--pretrained", "no", "--class_weights", "1", "2"])
    assert resolve_config(a) == resolve_config(b)
    assert resolve_config(a).pretrained is False and resolve_config(a).class_weights == [1.0, 2.0]
    with pytest.raises(SystemExit):
        _parse(["--pretrained", "maybe"])


def test_flag_phase_policy_mismatch_lists_allowed() -> None:
    with pytest.raises(ConfigError, match=r"phases 1-2 allow exit_policy softmax only"):
        resolve_config(_parse(["--phase", "2", "--exit-policy", "gate"]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"phase": 1, "epoch": 3}', r"\$: Additional properties are not allowed \('epoch' was unexpected\)"),
        ('{"phase": "one"}', r"\$\.phase: 'one' is not of type 'integer'"),
        ('{"delta": 0.7}', r"\$\.delta: 0.7 is greater than the maximum of 0.5"),
        ('["phase", 1]', r"must hold a mapping of settings"),
        ('{"phase": 1,', r"not valid JSON at line 1 .*truncated"),
    ],
)
def test_bad_config_files(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises((ConfigError, ArtifactError), match=message):
        load_config(path)


def test_bad_yaml(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("phase: [1\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not valid YAML"):
        load_config(path)


def test_config_holds_no_thresholds_indices_or_calibration_parameters() -> None:
    """No field of a policy file or of splits.json leaks into the config (shared settings aside)."""
    config_fields = set(load_schema("config")["properties"])
    for kind in ("thresholds", "gateparams", "scrcparams", "splits"):
        shared = config_fields & set(load_schema(kind)["properties"])
        assert shared <= {"artifact", "schema_version", "target_fnr_exit", "max_fpr_exit", "delta", "seed"}, (
            kind,
            shared,
        )


def test_config_json_is_plain_json(tmp_path) -> None:
    path = tmp_path / "c.json"
    save_config(Stage1ProConfig(), path)
    assert json.loads(path.read_text())["target_fnr_exit"] == 0.02


def test_schema_ranges_and_defaults_are_the_constants() -> None:
    """schemas/common.schema.json states the ranges that stage1_pro/defaults.py defines."""
    import json

    from stage1_pro import defaults
    from stage1_pro.schemas import schemas_dir

    common = json.loads((schemas_dir() / "common.schema.json").read_text())["$defs"]
    for name, bounds in (
        ("target_fnr_exit", defaults.TARGET_FNR_EXIT_RANGE),
        ("delta", defaults.DELTA_RANGE),
        ("max_fpr_exit", defaults.MAX_FPR_EXIT_RANGE),
        ("audit_level", defaults.AUDIT_LEVEL_RANGE),
    ):
        assert (common[name]["exclusiveMinimum"], common[name]["maximum"]) == bounds, name
    config = Stage1ProConfig()
    assert (config.target_fnr_exit, config.delta, config.max_fpr_exit) == (
        defaults.DEFAULT_TARGET_FNR_EXIT,
        defaults.DEFAULT_DELTA,
        defaults.DEFAULT_MAX_FPR_EXIT,
    )
