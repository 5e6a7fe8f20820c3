"""The compiled pipeline YAML, read back (both documents), and the run-parameter checks.

These tests parse what `stage1-pro compile` writes, the file Kubeflow receives, so they assert
the structure the cluster will act on: branch conditions, GPU scheduling, retries, caching,
images and the parameters a user sees in the UI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stage1_pro import cluster
from stage1_pro.cli import main
from stage1_pro.config import Stage1ProConfig
from stage1_pro.errors import ConfigError
from stage1_pro.run_parameters import (
    LOCAL_PROFILE,
    PARAMETERS,
    PIPELINE_LOADER_WORKERS,
    check_parameters,
    config_from_parameters,
    convert,
    parse_assignments,
    train_resources,
)

POLICIES = ("softmax", "gate", "scrc")
CONDITION_SOFTMAX = "inputs.parameter_values['pipelinechannel--exit_policy'] == 'softmax'"
CONDITION_GATE = (
    "!(inputs.parameter_values['pipelinechannel--exit_policy'] == 'softmax') && "
    "inputs.parameter_values['pipelinechannel--exit_policy'] == 'gate'"
)
CONDITION_ELSE = (
    "!(inputs.parameter_values['pipelinechannel--exit_policy'] == 'softmax') && "
    "!(inputs.parameter_values['pipelinechannel--exit_policy'] == 'gate')"
)


def _compile(tmp: Path, *args: str) -> tuple[dict, dict]:
    out = tmp / "pipeline.yaml"
    assert main(["compile", "--out", str(out), *args]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 2, "pipeline spec + Kubernetes platform spec"
    return docs[0], docs[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _compile(tmp_path_factory.mktemp("compile"))


@pytest.fixture(scope="module")
def spec(compiled: tuple[dict, dict]) -> dict:
    return compiled[0]


@pytest.fixture(scope="module")
def k8s(compiled: tuple[dict, dict]) -> dict:
    return compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (root and condition groups), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def executor_of(spec: dict, task: dict) -> str | None:
    component = spec["components"][task["componentRef"]["name"]]
    return component.get("executorLabel")


def group_tasks(spec: dict, task: dict) -> dict[str, dict]:
    return spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


# ------------------------------------------------------------------------------------------------


def test_both_documents_parse_as_kfp_protos(compiled: tuple[dict, dict]) -> None:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec, platform = compiled
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    assert spec["pipelineInfo"]["name"] == "stage1-pro"


def test_three_exit_policy_branches_each_self_contained(spec: dict) -> None:
    tasks = all_tasks(spec)
    branches = {
        t["taskInfo"]["name"]: t
        for t in tasks.values()
        if "exit_policy" in t.get("triggerPolicy", {}).get("condition", "")
    }
    assert set(branches) == {f"exit-policy-{p}" for p in POLICIES}
    assert branches["exit-policy-softmax"]["triggerPolicy"]["condition"] == CONDITION_SOFTMAX
    assert branches["exit-policy-gate"]["triggerPolicy"]["condition"] == CONDITION_GATE
    assert branches["exit-policy-scrc"]["triggerPolicy"]["condition"] == CONDITION_ELSE

    for policy in POLICIES:
        inner = group_tasks(spec, branches[f"exit-policy-{policy}"])
        names = {t["taskInfo"]["name"] for t in inner.values()}
        assert names == {f"calibrate-{policy}", "validate", "blessed"}, names
        # one calibrate component for every branch, told the branch's policy
        calibrate = next(t for t in inner.values() if t["taskInfo"]["name"] == f"calibrate-{policy}")
        assert spec["components"][calibrate["componentRef"]["name"]]["executorLabel"].startswith(
            "exec-calibrate"
        )
        assert calibrate["inputs"]["parameters"]["exit_policy"] == {"runtimeValue": {"constant": policy}}
        # export only when validate blessed the run; publish only with a prefix
        blessed = next(t for t in inner.values() if t["taskInfo"]["name"] == "blessed")
        validate_key = next(k for k, t in inner.items() if t["taskInfo"]["name"] == "validate")
        assert blessed["triggerPolicy"]["condition"] == (
            f"inputs.parameter_values['pipelinechannel--{validate_key}-Output'] == true"
        )
        in_blessed = group_tasks(spec, blessed)
        assert {t["taskInfo"]["name"] for t in in_blessed.values()} == {"export", "publish-prefix-set"}
        publish_group = next(t for t in in_blessed.values() if t["taskInfo"]["name"] == "publish-prefix-set")
        assert publish_group["triggerPolicy"]["condition"] == (
            "inputs.parameter_values['pipelinechannel--publish_prefix'] != ''"
        )
        assert [t["taskInfo"]["name"] for t in group_tasks(spec, publish_group).values()] == ["publish"]
    # no artifact OneOf anywhere (it fails under kfp.local and needs backend >= 2.17)
    assert "artifactSelectors" not in yaml.safe_dump(spec)


def test_gpu_request_node_selector_and_toleration_on_train_only(spec: dict, k8s: dict) -> None:
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = {name for name, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert with_gpu == {"exec-train"}
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == cluster.GPU_RESOURCE == "nvidia.com/gpu"
    assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpu_count']}}"

    scheduled = {name for name, e in k8s.items() if "nodeSelector" in e or "tolerations" in e}
    assert scheduled == {"exec-train"}
    selector = k8s["exec-train"]["nodeSelector"]["nodeSelectorJson"]["taskOutputParameter"]
    assert selector == {"producerTask": "check-config", "outputParameterKey": "gpu_node_selector"}
    assert k8s["exec-train"]["tolerations"] == [
        {"key": cluster.GPU_TOLERATION_KEY, "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_train_resources_come_from_check_config_and_cpu_tasks_have_requests_and_limits(spec: dict) -> None:
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]["resources"]
    for key in ("resourceCpuRequest", "resourceCpuLimit"):
        assert train[key] == "{{$.inputs.parameters['pipelinechannel--check-config-train_cpu_request']}}"
    for key in ("resourceMemoryRequest", "resourceMemoryLimit"):
        assert train[key] == "{{$.inputs.parameters['pipelinechannel--check-config-train_memory_request']}}"
    for name, executor in executors.items():
        resources = executor["container"].get("resources", {})
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert key in resources, f"{name} lacks {key}"


def test_retries_on_train_only(spec: dict) -> None:
    retried = {name: t["retryPolicy"] for name, t in all_tasks(spec).items() if "retryPolicy" in t}
    assert list(retried) == ["train"]
    assert retried["train"]["maxRetryCount"] >= 2
    assert retried["train"]["backoffDuration"] == "120s"


def test_caching_off_only_for_fingerprint_and_drift_check_and_fingerprint_feeds_data_tasks(
    spec: dict,
) -> None:
    tasks = all_tasks(spec)
    uncached = {
        name
        for name, t in tasks.items()
        if "cachingOptions" in t and not t["cachingOptions"].get("enableCache")
    }
    assert uncached == {"fingerprint", "drift-check"}
    for name in ("split", "prepare", "train"):
        source = tasks[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert source == {"producerTask": "fingerprint", "outputParameterKey": "Output"}


def test_check_config_runs_before_data_is_read_and_before_the_gpu_task(spec: dict) -> None:
    root = spec["root"]["dag"]["tasks"]
    assert "dependentTasks" not in root["check-config"]
    assert "check-config" in root["fingerprint"]["dependentTasks"]
    assert {"check-config", "fingerprint", "prepare", "split"} <= set(root["train"]["dependentTasks"])


def test_train_takes_the_config_by_value(spec: dict) -> None:
    """A string input is compared by value in the cache key, an artifact by identity: a re-run of
    check-config (new publish_prefix, say) must not invalidate an unchanged trained model."""
    inputs = spec["root"]["dag"]["tasks"]["train"]["inputs"]
    assert inputs["parameters"]["config_json"]["taskOutputParameter"] == {
        "producerTask": "check-config",
        "outputParameterKey": "config_json",
    }
    assert set(inputs["artifacts"]) == {"splits", "prepared"}


def test_parameters_defaults_and_descriptions(spec: dict) -> None:
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert list(inputs) == sorted(p.name for p in PARAMETERS)
    kinds = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", dict: "STRUCT"}
    for p in PARAMETERS:
        entry = inputs[p.name]
        assert entry["parameterType"] == kinds[p.type], p.name
        assert entry["description"].split()[0] in p.help, p.name
        if p.required:
            assert "defaultValue" not in entry and not entry.get("isOptional"), p.name
        else:
            assert entry["defaultValue"] == p.default, p.name
    assert inputs["exit_policy"]["defaultValue"] == "softmax"
    assert inputs["target_fnr_exit"]["defaultValue"] == 0.02
    assert inputs["gpu_type"]["defaultValue"] == cluster.DEFAULT_ACCELERATOR
    assert inputs["gpu_count"]["defaultValue"] == 1
    assert inputs["publish_prefix"]["defaultValue"] == ""


def test_images_from_the_one_place_and_no_runtime_installs(spec: dict) -> None:
    from stage1_pro.components.image import component_image

    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        expected = component_image(gpu=True) if name == "exec-train" else component_image()
        assert container["image"] == expected, name
        command = " ".join(container["command"])
        assert "pip install" not in command, name


def test_image_override_at_compile_time(tmp_path: Path) -> None:
    spec, _ = _compile(tmp_path, "--image", "registry.example/s1:9.9")
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-train") == "registry.example/s1:9.9-gpu"
    assert set(images.values()) == {"registry.example/s1:9.9"}

    spec, _ = _compile(tmp_path, "--image", "r/cpu:1", "--gpu-image", "r/cuda:2", "--gpu-type", "nvidia-l4")
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-train") == "r/cuda:2"
    assert set(images.values()) == {"r/cpu:1"}
    assert spec["root"]["inputDefinitions"]["parameters"]["gpu_type"]["defaultValue"] == "nvidia-l4"


def test_compile_rejects_a_bad_gpu_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "--out", str(tmp_path / "p.yaml"), "--gpu-type", "H100 80GB"]) != 0
    err = capsys.readouterr().err
    assert "gpu_type='H100 80GB' is not a Kubernetes label value" in err
    assert not (tmp_path / "p.yaml").exists()


def test_ui_metrics_and_report_outputs_of_validate(spec: dict) -> None:
    outputs = spec["components"]["comp-validate"]["outputDefinitions"]
    artifacts = {name: a["artifactType"]["schemaTitle"] for name, a in outputs["artifacts"].items()}
    assert artifacts == {
        "validation": "system.Artifact",
        "metrics": "system.Metrics",
        "exits": "system.ClassificationMetrics",
        "report": "system.HTML",
        "model_card": "system.Markdown",
    }
    assert outputs["parameters"]["Output"]["parameterType"] == "BOOLEAN"  # blessed


# ------------------------------------------------------------------------------------------------
# run-parameter checks (the check-config step and the CLI run them)


def test_check_parameters_defaults_resolve_to_a_config() -> None:
    checked = check_parameters({"data_uri": "gs://b/data/manifest.csv"})
    assert checked.config.model_name == "vit_small_patch14_dinov2"
    assert checked.config.model_path is None
    assert checked.gpu_node_selector == {cluster.ACCELERATOR_LABEL: cluster.DEFAULT_ACCELERATOR}
    assert checked.config.num_workers == PIPELINE_LOADER_WORKERS
    resources = (checked.train_cpu_request, checked.train_memory_request)
    assert (
        resources == train_resources(1, PIPELINE_LOADER_WORKERS) == (str(1 + PIPELINE_LOADER_WORKERS), "16Gi")
    )
    custom = check_parameters({"data_uri": "m.csv", "gpu_count": 2, "config_overrides": {"num_workers": 3}})
    assert (custom.config.num_workers, custom.train_cpu_request, custom.train_memory_request) == (
        3,
        "8",
        "32Gi",
    )


def test_train_resources_scale_with_gpus() -> None:
    one_cpu, one_mem = train_resources(1, 4)
    four_cpu, four_mem = train_resources(4, 4)
    assert int(four_cpu) == 4 * int(one_cpu) == 4 * 5
    assert four_mem == f"{4 * int(one_mem[:-2])}Gi"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"phase": 1, "exit_policy": "gate"}, "gate needs phase >= 3"),
        ({"phase": 3, "exit_policy": "scrc"}, "scrc needs phase 6"),
        ({"exit_policy": "always"}, "exit_policy='always' is unknown; allowed: softmax, gate, scrc"),
        ({"target_fnr_exit": 0.5}, "$.target_fnr_exit: 0.5 is greater than the maximum of 0.1"),
        ({"phase": 9}, "$.phase: 9 is greater than the maximum of 6"),
        ({"data_uri": "  "}, "data_uri is empty"),
        ({"gpu_count": 0}, "gpu_count=0 is outside 1..16"),
        ({"gpu_type": "nvidia h100"}, "is not a Kubernetes label value"),
        ({"epochs": "3"}, "epochs='3' has type str; expected int"),
        ({"epoch": 3}, "unknown pipeline parameter 'epoch' (did you mean 'epochs'?)"),
        ({"config_overrides": {"peft_rank": 0}}, "$.peft_rank: 0 is less than the minimum of 1"),
        (
            {"config_overrides": {"finetune": "peft"}},
            "unknown setting 'finetune' (did you mean 'finetune_mode'?)",
        ),
        ({"config_overrides": {"img_size": 32}}, "pipeline parameter 'img_size' controls"),
        ({"config_overrides": {"model_path": "x.pth"}}, "pipeline parameter 'weights_uri' controls"),
        ({"publish_prefix": "gs:///x"}, "publish_prefix='gs:///x' has no bucket"),
    ],
)
def test_check_parameters_rejects(params: dict, message: str) -> None:
    params = {"data_uri": "manifest.csv", **params}
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_parameters(params)


def test_check_parameters_requires_data_uri() -> None:
    with pytest.raises(ConfigError, match="data_uri must be set"):
        check_parameters({})


def test_config_overrides_and_local_profile() -> None:
    config = config_from_parameters(
        {"phase": 2, "weights_uri": "gs://b/w.pth", "config_overrides": {"peft_method": "lora"}}
    )
    assert (config.phase, config.model_path, config.peft_method) == (2, "gs://b/w.pth", "lora")
    defaults = Stage1ProConfig()
    assert LOCAL_PROFILE["model_name"] == defaults.model_name
    assert LOCAL_PROFILE["img_size"] == defaults.img_size


def test_parse_assignments_converts_to_parameter_types() -> None:
    parsed = parse_assignments(
        ["phase=3", "exit_policy=gate", "lr=3e-4", 'config_overrides={"peft_rank": 4}', "data_uri=a=b.csv"]
    )
    assert parsed == {
        "phase": 3,
        "exit_policy": "gate",
        "lr": 3e-4,
        "config_overrides": {"peft_rank": 4},
        "data_uri": "a=b.csv",
    }
    with pytest.raises(ConfigError, match=re.escape("phase='three' is not int")):
        convert("phase", "three")
    with pytest.raises(ConfigError, match="is not a JSON object"):
        convert("config_overrides", "[1]")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments(["phase"])


def test_readme_parameter_table_matches_the_pipeline() -> None:
    import json

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Kubeflow pipeline", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", section, re.M)
    assert [name for name, _ in rows] == [p.name for p in PARAMETERS]
    for (name, cell), p in zip(rows, PARAMETERS, strict=True):
        assert cell.strip() == ("required" if p.required else f"`{json.dumps(p.default)}`"), name
