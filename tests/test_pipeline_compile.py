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
    check_parameters,
    config_from_parameters,
    convert,
    parse_assignments,
)
from stage1_pro.sizing import PIPELINE_LOADER_WORKERS, TRAIN_SHM_GIB, train_resources

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


def body(spec: dict) -> dict[str, dict]:
    """The tasks inside the ExitHandler (everything but the exit task)."""
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def containers(spec: dict) -> dict[str, dict]:
    """Executors that run a container (the importer's does not)."""
    return {n: e for n, e in spec["deploymentSpec"]["executors"].items() if "container" in e}


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
        assert names == {f"calibrate-{policy}", "validate", "record-verdict", "blessed"}, names
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
        assert {t["taskInfo"]["name"] for t in in_blessed.values()} == {
            "export",
            "record-bundle",
            "publish-prefix-set",
        }
        publish_group = next(t for t in in_blessed.values() if t["taskInfo"]["name"] == "publish-prefix-set")
        assert publish_group["triggerPolicy"]["condition"] == (
            "inputs.parameter_values['pipelinechannel--publish_prefix'] != ''"
        )
        assert [t["taskInfo"]["name"] for t in group_tasks(spec, publish_group).values()] == ["publish"]
    # no artifact OneOf anywhere (it fails under kfp.local and needs backend >= 2.17)
    assert "artifactSelectors" not in yaml.safe_dump(spec)


def test_gpu_request_node_selector_and_toleration_on_train_only(spec: dict, k8s: dict) -> None:
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = {
        name for name, e in containers(spec).items() if "accelerator" in e["container"].get("resources", {})
    }
    assert with_gpu == {"exec-train"}
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == cluster.GPU_RESOURCE == "nvidia.com/gpu"
    # A string output of check-config: the driver resolves the count by its string value
    # (tests/test_backend_pods.py runs it; an int parameter there gives no GPU limit at all).
    assert (
        accelerator["resourceCount"]
        == "{{$.inputs.parameters['pipelinechannel--check-config-train_gpu_count']}}"
    )
    outputs = spec["components"]["comp-check-config"]["outputDefinitions"]["parameters"]
    assert outputs["train_gpu_count"]["parameterType"] == "STRING"

    scheduled = {name for name, e in k8s.items() if "nodeSelector" in e or "tolerations" in e}
    assert scheduled == {"exec-train"}
    selector = k8s["exec-train"]["nodeSelector"]["nodeSelectorJson"]["taskOutputParameter"]
    assert selector == {"producerTask": "check-config", "outputParameterKey": "gpu_node_selector"}
    assert k8s["exec-train"]["tolerations"] == [
        {"key": cluster.GPU_TOLERATION_KEY, "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_train_resources_come_from_check_config_and_cpu_tasks_have_requests_and_limits(spec: dict) -> None:
    executors = containers(spec)
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


def test_caching_off_where_a_task_must_see_this_run(spec: dict) -> None:
    """fingerprint (the data's cache key), check-config (the weights' version), drift-check (the
    champion's latest), the outcome records and the report: all must run in every run; everything
    else is cached."""
    tasks = all_tasks(spec)
    tasks["report-run"] = spec["root"]["dag"]["tasks"]["report-run"]
    uncached = {
        t["taskInfo"]["name"]
        for t in tasks.values()
        if "cachingOptions" in t and not t["cachingOptions"].get("enableCache")
    }
    assert uncached == {
        "fingerprint",
        "check-config",
        "drift-check",
        "record-verdict",
        "record-bundle",
        "report-run",
    }
    inner = body(spec)
    for name in ("split", "merge-prepared", "train"):
        source = inner[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert source == {"producerTask": "fingerprint", "outputParameterKey": "Output"}
    weights = inner["train"]["inputs"]["parameters"]["weights_version"]["taskOutputParameter"]
    assert weights == {"producerTask": "check-config", "outputParameterKey": "weights_version"}


def test_check_config_runs_before_data_is_read_and_before_the_gpu_task(spec: dict) -> None:
    inner = body(spec)
    assert "dependentTasks" not in inner["check-config"]
    assert "check-config" in inner["importer"]["dependentTasks"]
    assert "importer" in inner["fingerprint"]["dependentTasks"]
    assert {"check-config", "fingerprint", "merge-prepared", "split"} <= set(inner["train"]["dependentTasks"])


def test_the_body_runs_inside_an_exit_handler_that_reports_the_run(spec: dict) -> None:
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "report-run"}
    report = root["report-run"]
    assert report["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert report["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert report["inputs"]["parameters"]["webhook_url"] == {"componentInputParameter": "webhook_url"}


def test_the_dataset_comes_in_through_an_importer_of_the_data_uri_parameter(spec: dict) -> None:
    inner = body(spec)
    importer = inner["importer"]
    # A pipeline parameter: the backend resolves an importer URI only from a parent-DAG input.
    assert importer["inputs"]["parameters"]["uri"] == {"componentInputParameter": "pipelinechannel--data_uri"}
    executor = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert executor["typeSchema"]["schemaTitle"] == "system.Dataset" and not executor.get("reimport")
    for name in ("fingerprint", "split"):
        assert (
            inner[name]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "importer"
        )


def test_prepare_fans_out_and_one_merge_feeds_train(spec: dict) -> None:
    inner = body(spec)
    loop = next(t for t in inner.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-shards-Output"
    loop_tasks = group_tasks(spec, loop)
    assert [t["taskInfo"]["name"] for t in loop_tasks.values()] == ["prepare"]
    slices = inner["merge-prepared"]["inputs"]["parameters"]["slices"]["taskOutputParameter"]
    assert slices["producerTask"] == loop["taskInfo"]["name"]
    assert inner["train"]["inputs"]["artifacts"]["prepared"]["taskOutputArtifact"] == {
        "producerTask": "merge-prepared",
        "outputArtifactKey": "prepared",
    }


def test_train_takes_the_config_by_value(spec: dict) -> None:
    """A string input is compared by value in the cache key, an artifact by identity: a re-run of
    check-config (it is never cached) must not invalidate an unchanged trained model."""
    inputs = body(spec)["train"]["inputs"]
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

    for name, executor in containers(spec).items():
        container = executor["container"]
        expected = component_image(gpu=True) if name == "exec-train" else component_image()
        assert container["image"] == expected, name
        command = " ".join(container["command"])
        assert "pip install" not in command, name


def test_image_override_at_compile_time(tmp_path: Path) -> None:
    spec, _ = _compile(tmp_path, "--image", "registry.example/s1:9.9")
    images = {name: e["container"]["image"] for name, e in containers(spec).items()}
    assert images.pop("exec-train") == "registry.example/s1:9.9-gpu"
    assert set(images.values()) == {"registry.example/s1:9.9"}

    spec, _ = _compile(tmp_path, "--image", "r/cpu:1", "--gpu-image", "r/cuda:2", "--gpu-type", "nvidia-l4")
    images = {name: e["container"]["image"] for name, e in containers(spec).items()}
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
    assert checked.config.num_workers == PIPELINE_LOADER_WORKERS == 2
    resources = (checked.train_gpu_count, checked.train_cpu_request, checked.train_memory_request)
    expected = train_resources(1, PIPELINE_LOADER_WORKERS)
    assert resources == (expected.gpu, expected.cpu, expected.memory) == ("1", "3", f"{16 + TRAIN_SHM_GIB}Gi")
    custom = check_parameters({"data_uri": "m.csv", "config_overrides": {"num_workers": 3}})
    assert (custom.config.num_workers, custom.train_cpu_request) == (3, "4")


def test_train_resources_scale_with_gpus_and_count_shm_once() -> None:
    one, four = train_resources(1, 4), train_resources(4, 4)
    assert int(four.cpu) == 4 * int(one.cpu) == 4 * 5
    assert four.gpu == "4"
    per_gpu = int(four.memory[:-2]) - int(one.memory[:-2])
    assert per_gpu == 3 * 16 and int(one.memory[:-2]) == 16 + TRAIN_SHM_GIB


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"phase": 1, "exit_policy": "gate"}, "gate needs phase >= 3"),
        ({"phase": 3, "exit_policy": "scrc"}, "scrc needs phase 6"),
        ({"exit_policy": "always"}, "exit_policy='always' is unknown; allowed: softmax, gate, scrc"),
        ({"target_fnr_exit": 0.5}, "$.target_fnr_exit: 0.5 is greater than the maximum of 0.1"),
        ({"phase": 9}, "$.phase: 9 is greater than the maximum of 6"),
        ({"data_uri": "  "}, "data_uri is empty"),
        ({"gpu_count": 0}, "gpu_count=0: the train task needs at least one GPU (allowed: 1..1)"),
        (
            {"gpu_count": 2},
            "gpu_count=2 cannot run on the shipped infrastructure: the GPU node pool (a2-ultragpu-1g, "
            "nvidia-a100-80gb) has 1 GPU per node and a pod runs on one node",
        ),
        ({"config_overrides": {"num_workers": 12}}, "the train pod would ask for 13 CPUs and 20Gi of memory"),
        (
            {"config_overrides": {"num_workers": 6}, "img_size": 448},
            "more than the train pod's 4 GiB /dev/shm",
        ),
        ({"prepare_shards": 0}, "prepare_shards=0 is outside 1..64"),
        ({"webhook_url": "hooks.slack.com/x"}, "webhook_url='hooks.slack.com/x' is not an http(s) URL"),
        ({"data_uri": "gs://b/street/"}, "data_uri='gs://b/street/' is a gs:// image-folder prefix"),
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
