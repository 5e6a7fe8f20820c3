"""Retraining over time in the pipeline: the drift-check step, the champion handed to validate, the
UI metrics of both, and two local runs (kfp.local) where the second has the first as its champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stage1_pro.artifacts import read_artifact
from stage1_pro.cli import main
from stage1_pro.components.runtime import log_champion, log_drift


class FakeMetrics:
    """Stands in for kfp.dsl.Metrics: records log_metric calls."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.values[name] = value


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    return next(yaml.safe_load_all(out.read_text()))


def branch_tasks(spec: dict) -> dict[str, dict]:
    tasks: dict[str, dict] = {}
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_drift_check_runs_before_training_and_pins_the_champion_for_validate(spec: dict) -> None:
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]  # the run's body, in its ExitHandler
    drift = body["drift-check"]
    assert drift["cachingOptions"] == {}  # never cached: latest may move between runs
    assert drift["inputs"]["parameters"]["champion_prefix"] == {
        "componentInputParameter": "pipelinechannel--champion_prefix"
    }
    assert drift["inputs"]["parameters"]["data_uri"] == {
        "componentInputParameter": "pipelinechannel--data_uri"
    }
    assert "drift-check" in body["train"]["dependentTasks"]
    validates = {name: t for name, t in branch_tasks(spec).items() if name.startswith("validate")}
    assert len(validates) == 3  # one per exit-policy branch
    for task in validates.values():
        channel = task["inputs"]["parameters"]["champion_uri"]["componentInputParameter"]
        assert channel == "pipelinechannel--drift-check-Output"
        assert task["inputs"]["parameters"]["data_uri"] == {
            "componentInputParameter": "pipelinechannel--data_uri"
        }
    outputs = spec["components"]["comp-drift-check"]["outputDefinitions"]
    artifacts = {name: a["artifactType"]["schemaTitle"] for name, a in outputs["artifacts"].items()}
    assert artifacts == {"drift": "system.Artifact", "metrics": "system.Metrics", "report": "system.HTML"}
    assert outputs["parameters"]["Output"]["parameterType"] == "STRING"
    assert spec["root"]["inputDefinitions"]["parameters"]["champion_prefix"]["defaultValue"] == ""
    assert "baseline_bundle" not in spec["root"]["inputDefinitions"]["parameters"]


def test_log_champion_and_log_drift() -> None:
    metrics = FakeMetrics()
    log_champion({"champion": None}, metrics)
    assert metrics.values == {"champion_compared": 0.0}
    metrics = FakeMetrics()
    log_champion(
        {
            "champion": {
                "version": "v1",
                "test_metrics": {"n": 100, "coverage": 0.6, "fnr_exit": 0.01},
                "certificate": {"upper_bound": 0.018},
                "feasible": True,
                "coverage_difference": -0.05,
                "tolerance": 0.02,
            }
        },
        metrics,
    )
    assert metrics.values == {
        "champion_compared": 1.0,
        "champion_test_n": 100.0,
        "champion_test_coverage": 0.6,
        "champion_test_fnr_exit": 0.01,
        "champion_certified_fnr_exit_upper_bound": 0.018,
        "champion_feasible": 1.0,
        "champion_coverage_difference": -0.05,
        "champion_tolerance": 0.02,
    }
    metrics = FakeMetrics()
    tests = [
        {"name": n, "p_value": p, "drift": p <= 0.01 / 3}
        for n, p in (("exit_score", 0.2), ("p_positive", 1e-5), ("exit_rate", 0.5))
    ]
    result = {
        "drift": True, "level": 0.01, "exit_rate_reference": 0.5, "exit_rate_new": 0.55, "n_new": 300,
        "n_reference": 400, "n_needed": None, "detectable_shift": 0.3, "tests": tests,
    }  # fmt: skip
    log_drift(result, metrics)
    assert metrics.values["drift_detected"] == 1.0 and metrics.values["p_positive_p_value"] == 1e-5
    assert metrics.values["p_positive_drift"] == 1.0 and metrics.values["exit_score_drift"] == 0.0
    assert "n_needed" not in metrics.values  # None is not sent to the UI


@pytest.mark.slow
def test_two_runs_the_second_with_the_first_as_champion(tmp_path: Path) -> None:
    """Run 1 publishes (no champion yet: nothing under the prefix); run 2 has run 1's bundle as champion.

    Same data both times: the drift check finds the training images consistent with the champion's
    val_calib, validate re-scores the champion on run 2's splits, and both versions land in the
    registry's history.
    """
    from stage1_pro.demo_data import write_demo_dataset
    from stage1_pro.pipelines.local import run_local
    from stage1_pro.registry import read_latest

    data = write_demo_dataset(tmp_path / "data", per_digit=250)
    registry = tmp_path / "registry"
    registry.mkdir()
    params = {
        "data_uri": str(data),
        "img_size": 64,
        "epochs": 1,
        "target_fnr_exit": 0.05,
        "config_overrides": {"finetune_mode": "frozen"},
        "publish_prefix": str(registry),
        "champion_prefix": str(registry),
    }
    first = run_local(params, tmp_path / "run1", echo=None)
    assert first.blessed, first.failed_checks
    validation = read_artifact(
        next(Path(first.run_dir).glob("validate*/validation/validation.json")), "validation"
    )
    assert validation["champion"] is None  # the drift step found nothing published: no champion
    report = next(Path(first.run_dir).glob("drift-check/report")).read_text()
    assert "nothing is published under" in report
    champion_version = read_latest(str(registry))["version"]

    second = run_local(params, tmp_path / "run2", echo=None)
    run = Path(second.run_dir)
    drift = read_artifact(next(run.glob("drift-check/drift/drift.json")), "drift")
    assert drift["bundle_version"] == champion_version and drift["drift"] is False
    assert drift["n_new"] == 2000 and drift["n_available"] == 2500
    assert "Drift check" in next(run.glob("drift-check/report")).read_text()
    validation = read_artifact(next(run.glob("validate*/validation/validation.json")), "validation")
    side = validation["champion"]
    assert side["version"] == champion_version and side["uri"] == str(registry / champion_version)
    assert side["n_rescored"] == 1250  # val_select + val_calib + test of 2,500 images
    # the same data and settings train the same model: no regression against itself
    assert abs(side["coverage_difference"]) <= side["tolerance"]
    assert second.blessed, second.failed_checks
    assert any(c["name"] == "champion_coverage" and c["passed"] for c in validation["checks"])
    metrics = json.loads(next(run.glob("validate*/executor_output.json")).read_text())
    assert "champion_test_coverage" in json.dumps(metrics)
    history = [m["version"] for m in read_latest(str(registry))["history"]]
    assert history[1] == champion_version and len(history) == 2
