"""The Kubeflow Pipelines backend, as it turns a compiled package into pods: a test double.

Not a text search of the YAML: a run of the package's DAGs by the driver's rules, then each
container task's pod built the way the backend builds it, admitted the way the API server admits
it, and placed on the node pools the way the scheduler places it. Every rule names the source
it mirrors: kubeflow/pipelines at tag 2.17.0 (``backend/src/v2/...``), argoproj/argo-workflows
v4.0.5 (the Argo KFP 2.17 pins), Kubernetes (``pkg/...``) and GKE's documented node
reservations. What it does not model is said where it matters.

- :class:`Run` walks the pipeline spec like the root DAG, DAG and container drivers: task inputs
  resolved by ``resolveInputParameter`` (``backend/src/v2/driver/resolve.go``), types checked and
  converted by ``resolveInputs``' ``handleParamTypeValidationAndConversion``, ``dsl.ParallelFor``
  items by ``getItems`` (``driver/util.go``), fan-in by ``CollectInputs``. Every branch of a
  condition is taken: any of them may run. Outputs come from really running the component's
  compiled command (``run_commands``: the launcher's job) or, for the others, from values of the
  declared types.
- :func:`build_pod` is ``initPodSpecPatch`` (``driver/driver.go``) and ``extendPodSpecPatch``
  (``driver/k8s.go``) merged onto the executor template of ``addContainerExecutorTemplate``
  (``compiler/argocompiler/container.go``) with Argo's ``init`` and ``wait`` containers
  (``workflow/controller/workflowpod.go``).
- :func:`admit` is the API server's defaulting (``pkg/apis/core/v1/defaults.go``) and the
  LimitRanger admission plugin (``plugin/pkg/admission/limitranger/admission.go``).
- :func:`placement_problems` is the scheduler's NodeResourcesFit / NodeAffinity / TaintToleration
  filters against node pools sized with GKE's allocatable formula.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format, struct_pb2
from kubernetes.utils import parse_quantity

KFP_TAG = "2.17.0"
ARGO_TAG = "v4.0.5"
#: Kubernetes minor version GKE's regular channel runs (the manifests are validated against it too).
K8S_VERSION = "1.33"

#: ``backend/src/v2/driver/util.go`` inputPipelineChannelPattern (unanchored, as the driver uses it).
_INPUT_CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
#: Runtime placeholders ``resolveInputParameter`` substitutes in a constant (resolve.go).
_RUN_PLACEHOLDERS = {
    "{{$.pipeline_job_name}}": "run_display_name",
    "{{$.pipeline_job_resource_name}}": "run_name",
    "{{$.pipeline_job_uuid}}": "run_id",
}

#: ``compiler/argocompiler/argo.go`` launcherResources (the kfp-launcher init container).
LAUNCHER_RESOURCES = {"limits": {"memory": "256Mi", "cpu": "0.5"}, "requests": {"cpu": "0.1"}}
#: ``compiler/argocompiler/container.go``: the executor template's emptyDir scratch volumes.
TEMPLATE_VOLUMES = ("kfp-launcher", "gcs-scratch", "s3-scratch", "minio-scratch", "dot-local-scratch",
                    "dot-cache-scratch", "dot-config-scratch")  # fmt: skip
TEMPLATE_MOUNTS = {"kfp-launcher": "/kfp-launcher", "gcs-scratch": "/gcs", "s3-scratch": "/s3",
                   "minio-scratch": "/minio", "dot-local-scratch": "/.local", "dot-cache-scratch": "/.cache",
                   "dot-config-scratch": "/.config"}  # fmt: skip
#: KFP's ``manifests/kustomize/third-party/argo/base/workflow-controller-configmap-patch.yaml``:
#: the ``executor`` block (security context only, no resources) and ``workflowDefaults``.
ARGO_EXECUTOR_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
KFP_WORKFLOW_DEFAULTS = {
    "spec": {
        "ttlStrategy": {"secondsAfterCompletion": 3600},
        "templateDefaults": {"retryStrategy": {"limit": "2", "retryPolicy": "OnError"}},
    }
}
#: ``backend/src/apiserver/common/const.go``: KFP standalone runs pipeline pods as this account.
PIPELINE_RUNNER = "pipeline-runner"


class BackendError(Exception):
    """What the KFP driver, the API server or Argo would fail with; ``rule`` names the source."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(f"{message} [{rule}]")
        self.rule = rule


# ------------------------------------------------------------------------------------------------
# the package and structpb values


@dataclass(frozen=True)
class Package:
    """A compiled package: the pipeline spec and the Kubernetes platform spec's executors."""

    spec: dict[str, Any]
    k8s: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Package:
        docs = list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
        platform = docs[1] if len(docs) > 1 else {}
        executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
        return cls(docs[0], executors.get("executors", {}))

    def mutated(self, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> Package:
        """A deep copy with ``change(spec, k8s_executors)`` applied: how the tests plant a defect."""
        spec, k8s = copy.deepcopy(self.spec), copy.deepcopy(self.k8s)
        change(spec, k8s)
        return Package(spec, k8s)

    def component(self, name: str) -> dict[str, Any]:
        return self.spec["components"][name]

    def container(self, executor_label: str) -> dict[str, Any] | None:
        return self.spec["deploymentSpec"]["executors"][executor_label].get("container")

    def executor(self, executor_label: str) -> dict[str, Any]:
        return self.spec["deploymentSpec"]["executors"][executor_label]


def to_value(python: Any) -> struct_pb2.Value:
    """A Python value as the ``structpb.Value`` the launcher stores (protojson of the JSON value)."""
    value = struct_pb2.Value()
    json_format.Parse(json.dumps(python), value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """The JSON value Go's protojson writes for ``value`` (a whole number without a fraction: 1, not
    1.0 as Python's json_format writes), as the launcher hands it to the component."""
    return _whole(json_format.MessageToDict(value))


def _whole(obj: Any) -> Any:
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, list):
        return [_whole(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _whole(v) for k, v in obj.items()}
    return obj


def kind(value: struct_pb2.Value) -> str:
    return value.WhichOneof("kind") or "null_value"


def string_value(value: struct_pb2.Value) -> str:
    """``structpb.Value.GetStringValue()``: the string, or "" for any other kind (a number too)."""
    return value.string_value if kind(value) == "string_value" else ""


def text(value: struct_pb2.Value) -> str:
    """``metadata.PbValueToText`` (``backend/src/v2/metadata/converter.go``): a JSON text of the value."""
    if kind(value) == "string_value":
        return value.string_value
    return json.dumps(from_value(value), separators=(",", ":"))


_KIND_OF_TYPE = {
    "STRING": ("string_value",),
    "NUMBER_INTEGER": ("number_value",),
    "NUMBER_DOUBLE": ("number_value",),
    "BOOLEAN": ("bool_value",),
    "LIST": ("list_value",),
    "STRUCT": ("struct_value",),
    "TASK_FINAL_STATUS": ("struct_value",),
}


def check_types(
    inputs: dict[str, struct_pb2.Value], definitions: Mapping[str, Any], where: str
) -> dict[str, struct_pb2.Value]:
    """``handleParamTypeValidationAndConversion`` (driver/resolve.go ``resolveInputs``).

    Only the component's *declared* inputs are checked: a declared STRING receives any value as its
    JSON text; a declared number, bool, list or struct must receive that kind. Undeclared inputs
    (the compiler's ``pipelinechannel--*`` resource channels) pass through unconverted.
    """
    out = dict(inputs)
    for name, spec in definitions.items():
        if name not in out:
            if not spec.get("isOptional") and "defaultValue" not in spec:
                raise BackendError(
                    f"{where}: neither value nor default value provided for non-optional parameter {name!r}",
                    "driver/resolve.go resolveInputs",
                )
            continue
        value, wanted = out[name], spec["parameterType"]
        if wanted == "STRING":
            out[name] = to_value(text(value))
        elif kind(value) not in _KIND_OF_TYPE[wanted]:
            raise BackendError(
                f"{where}: input parameter {name!r} type mismatch: expect {wanted}, got {kind(value)}",
                "driver/resolve.go handleParamTypeValidationAndConversion",
            )
    return out


# ------------------------------------------------------------------------------------------------
# running the DAGs


@dataclass
class Task:
    """A container or importer task the run reached, with what the driver resolved for it."""

    path: str
    name: str
    spec: dict[str, Any]
    component: dict[str, Any]
    executor_label: str
    inputs: dict[str, struct_pb2.Value]
    artifacts: dict[str, list[dict[str, Any]]]
    outputs: dict[str, struct_pb2.Value] = field(default_factory=dict)
    output_artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.spec.get("taskInfo", {}).get("name", self.name)


class Run:
    """One run of a package: every reachable task, its inputs resolved by the drivers' rules.

    Args:
        package: the compiled package.
        parameters: the run's parameters (missing ones take the pipeline's defaults).
        run_commands: display names of tasks whose compiled command really runs (in a subprocess,
            as the launcher runs it) to produce their outputs; other tasks get values of their
            declared output types.
        scratch: folder for those tasks' artifacts and executor outputs.
    """

    run_id = "8f2c3f0e-0d5e-4a53-9e4b-3c1a5ce3b0a7"
    run_name = "stage1-pro-x7k2p"
    run_display_name = "stage1-pro nightly"

    def __init__(
        self,
        package: Package,
        parameters: Mapping[str, Any],
        *,
        run_commands: Iterable[str] = (),
        scratch: str | os.PathLike[str] | None = None,
    ) -> None:
        self.package = package
        self.run_commands = set(run_commands)
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="kfp-backend-"))
        self.tasks: list[Task] = []
        root = package.spec["root"]
        definitions = root.get("inputDefinitions", {}).get("parameters", {})
        values = {n: to_value(d["defaultValue"]) for n, d in definitions.items() if "defaultValue" in d}
        values.update({n: to_value(v) for n, v in parameters.items()})
        unknown = set(parameters) - set(definitions)
        if unknown:
            raise BackendError(f"unknown run parameters {sorted(unknown)}", "apiserver: run parameters")
        # The root DAG driver does not type-check run parameters (root_dag.go: "TODO(Bobgy): validate").
        self._run_dag(root["dag"], values, {}, "root")

    def task(self, display_name: str) -> Task:
        found = [t for t in self.tasks if t.display_name == display_name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} tasks named {display_name!r}")
        return found[0]

    def tasks_named(self, display_name: str) -> list[Task]:
        return [t for t in self.tasks if t.display_name == display_name]

    # -- the DAG driver ---------------------------------------------------------------------------

    def _run_dag(
        self,
        dag: dict[str, Any],
        params: dict[str, struct_pb2.Value],
        artifacts: dict[str, list[dict[str, Any]]],
        path: str,
    ) -> dict[str, Any]:
        """Run one DAG's tasks in dependency order; return each task's outputs (params, artifacts)."""
        done: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        pending = dict(dag.get("tasks", {}))
        while pending:
            ready = [n for n, t in pending.items() if set(t.get("dependentTasks", [])) <= set(done)]
            if not ready:
                raise BackendError(f"{path}: dependency cycle among {sorted(pending)}", "argocompiler dag.go")
            for name in sorted(ready):
                done[name] = self._run_task(
                    name, pending.pop(name), params, artifacts, done, f"{path}/{name}"
                )
        return done

    def _resolve_parameter(
        self,
        spec: dict[str, Any],
        params: dict[str, struct_pb2.Value],
        done: dict[str, tuple[dict[str, Any], dict[str, Any]]],
        where: str,
    ) -> struct_pb2.Value:
        """``resolveInputParameter`` (driver/resolve.go)."""
        if "componentInputParameter" in spec:
            name = spec["componentInputParameter"]
            if name not in params:
                raise BackendError(
                    f"{where}: parent DAG does not have input parameter {name}",
                    "driver/resolve.go resolveInputParameter",
                )
            return params[name]
        if "taskOutputParameter" in spec:
            ref = spec["taskOutputParameter"]
            producer = ref["producerTask"]
            if producer not in done:
                raise BackendError(f"{where}: producer task {producer} not in tasks", "driver/resolve.go")
            outputs = done[producer][0]
            if ref["outputParameterKey"] not in outputs:
                raise BackendError(
                    f"{where}: {producer} has no output parameter {ref['outputParameterKey']}",
                    "driver/resolve.go resolveUpstreamParameters",
                )
            return outputs[ref["outputParameterKey"]]
        if "runtimeValue" in spec:
            constant = spec["runtimeValue"]["constant"]
            if isinstance(constant, str) and constant in _RUN_PLACEHOLDERS:
                return to_value(getattr(self, _RUN_PLACEHOLDERS[constant]))
            return to_value(constant)
        if "taskFinalStatus" in spec:
            # resolve.go: the state is the MLMD execution state of the exit handler's DAG.
            return to_value(
                {
                    "state": "COMPLETE",
                    "pipelineTaskName": spec["taskFinalStatus"]["producerTask"],
                    "pipelineJobResourceName": self.run_name,
                    "error": {},
                }
            )
        raise BackendError(f"{where}: parameter spec {spec} not implemented", "driver/resolve.go")

    def _run_task(
        self,
        name: str,
        task: dict[str, Any],
        params: dict[str, struct_pb2.Value],
        artifacts: dict[str, list[dict[str, Any]]],
        done: dict[str, tuple[dict[str, Any], dict[str, Any]]],
        path: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        component = self.package.component(task["componentRef"]["name"])
        inputs = {
            key: self._resolve_parameter(spec, params, done, f"{path} input {key}")
            for key, spec in task.get("inputs", {}).get("parameters", {}).items()
        }
        in_artifacts = {
            key: self._resolve_artifact(spec, artifacts, done, f"{path} input {key}")
            for key, spec in task.get("inputs", {}).get("artifacts", {}).items()
        }
        definitions = component.get("inputDefinitions", {}).get("parameters", {})
        if "dag" in component:
            if "parameterIterator" in task:
                return self._run_iterations(task, component, inputs, in_artifacts, path)
            inner = self._run_dag(
                component["dag"], check_types(inputs, definitions, path), in_artifacts, path
            )
            return self._dag_outputs(component, inner, iterations=None)
        executor_label = component["executorLabel"]
        if "importer" in self.package.executor(executor_label):
            return self._run_importer(name, task, component, executor_label, inputs, path)
        resolved = check_types(inputs, definitions, path)
        run_task = Task(path, name, task, component, executor_label, resolved, in_artifacts)
        self.tasks.append(run_task)
        self._execute(run_task)
        return run_task.outputs, run_task.output_artifacts

    def _resolve_artifact(
        self,
        spec: dict[str, Any],
        artifacts: dict[str, list[dict[str, Any]]],
        done: dict[str, tuple[dict[str, Any], dict[str, Any]]],
        where: str,
    ) -> list[dict[str, Any]]:
        if "componentInputArtifact" in spec:
            name = spec["componentInputArtifact"]
            if name not in artifacts:
                raise BackendError(
                    f"{where}: parent DAG does not have input artifact {name}", "driver/resolve.go"
                )
            return artifacts[name]
        ref = spec["taskOutputArtifact"]
        found = done[ref["producerTask"]][1].get(ref["outputArtifactKey"])
        if found is None:
            raise BackendError(f"{where}: no artifact {ref}", "driver/resolve.go resolveUpstreamArtifacts")
        return found if isinstance(found, list) else [found]

    def _run_iterations(
        self,
        task: dict[str, Any],
        component: dict[str, Any],
        inputs: dict[str, struct_pb2.Value],
        artifacts: dict[str, list[dict[str, Any]]],
        path: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``dsl.ParallelFor``: ``getItems`` (driver/util.go), then one iteration DAG per item."""
        iterator = task["parameterIterator"]
        items_input = iterator["items"].get("inputParameter")
        if items_input is None:
            items = json.loads(iterator["items"]["raw"])
        else:
            value = inputs.pop(items_input)
            if kind(value) == "list_value":
                items = from_value(value)
            elif kind(value) == "string_value":
                items = json.loads(value.string_value)
            else:
                raise BackendError(
                    f"{path}: value of type {kind(value)} cannot be iterated", "driver/util.go getItems"
                )
        definitions = {
            k: v
            for k, v in component.get("inputDefinitions", {}).get("parameters", {}).items()
            if k != items_input
        }
        results = []
        for index, item in enumerate(items):
            values = dict(inputs)
            values[iterator["itemInput"]] = to_value(item)
            inner = self._run_dag(
                component["dag"], check_types(values, definitions, path), artifacts, f"{path}[{index}]"
            )
            results.append(inner)
        return self._dag_outputs(component, None, iterations=results)

    @staticmethod
    def _dag_outputs(
        component: dict[str, Any], inner: dict[str, Any] | None, iterations: list[dict[str, Any]] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A DAG's outputs (``dag.outputs``); of a loop, one list per output (``CollectInputs``)."""
        spec = component["dag"].get("outputs", {})
        params: dict[str, Any] = {}
        arts: dict[str, Any] = {}
        for name, out in spec.get("parameters", {}).items():
            ref = out["valueFromParameter"]
            if iterations is None:
                params[name] = inner[ref["producerSubtask"]][0][ref["outputParameterKey"]]
            else:
                params[name] = to_value(
                    [from_value(r[ref["producerSubtask"]][0][ref["outputParameterKey"]]) for r in iterations]
                )
        for name, out in spec.get("artifacts", {}).items():
            (ref,) = out["artifactSelectors"]
            if iterations is None:
                arts[name] = inner[ref["producerSubtask"]][1][ref["outputArtifactKey"]]
            else:
                arts[name] = [r[ref["producerSubtask"]][1][ref["outputArtifactKey"]] for r in iterations]
        return params, arts

    def _run_importer(
        self,
        name: str,
        task: dict[str, Any],
        component: dict[str, Any],
        executor_label: str,
        inputs: dict[str, struct_pb2.Value],
        path: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``component/importer_launcher.go`` ``ImportSpecToMLMDArtifact``: the URI is a constant or a
        parent-DAG input; one from a task output fails at run time."""
        importer = self.package.executor(executor_label)["importer"]
        uri_spec = importer["artifactUri"]
        if "constant" in uri_spec:
            uri = uri_spec["constant"]
        else:
            source = task["inputs"]["parameters"][uri_spec["runtimeParameter"]]
            if "componentInputParameter" not in source:
                raise BackendError(
                    f"{path}: error resolving artifact URI: the importer URI comes from {source}, not a "
                    "parent DAG input parameter",
                    "component/importer_launcher.go ImportSpecToMLMDArtifact",
                )
            uri = string_value(inputs[uri_spec["runtimeParameter"]])
        (out_name,) = component["outputDefinitions"]["artifacts"]
        return {}, {out_name: {"uri": uri, "type": importer["typeSchema"]["schemaTitle"]}}

    def resolve_json_parameter(self, spec: Mapping[str, Any], task: Task) -> struct_pb2.Value:
        """``resolveK8sJsonParameter`` (driver/resolve.go): the platform spec's input, resolved like a
        task input against the task's own resolved inputs and its DAG's producers."""
        if "taskOutputParameter" in spec:
            ref = spec["taskOutputParameter"]
            producer = next(
                (
                    t
                    for t in self.tasks
                    if t.name == ref["producerTask"]
                    and t.path.rsplit("/", 1)[0] == task.path.rsplit("/", 1)[0]
                ),
                None,
            )
            if producer is None:
                raise BackendError(
                    f"{task.path}: producer {ref['producerTask']} not in tasks", "driver/resolve.go"
                )
            return producer.outputs[ref["outputParameterKey"]]
        if "componentInputParameter" in spec:
            name = spec["componentInputParameter"]
            if name not in task.inputs:
                raise BackendError(
                    f"{task.path}: parent DAG does not have input parameter {name}", "driver/resolve.go"
                )
            return task.inputs[name]
        return to_value(spec["runtimeValue"]["constant"])

    # -- the launcher -----------------------------------------------------------------------------

    def _execute(self, task: Task) -> None:
        definitions = task.component.get("outputDefinitions", {})
        folder = self.scratch / task.path.replace("/", "_").replace("[", "_").replace("]", "")
        task.output_artifacts = {
            name: {"uri": str(folder / name), "type": spec["artifactType"]["schemaTitle"]}
            for name, spec in definitions.get("artifacts", {}).items()
        }
        if task.display_name in self.run_commands:
            task.outputs = self._run_command(task, folder)
            return
        task.outputs = {
            name: to_value(_value_of_type(spec["parameterType"], f"{task.display_name}.{name}"))
            for name, spec in definitions.get("parameters", {}).items()
        }

    def _run_command(self, task: Task, folder: Path) -> dict[str, struct_pb2.Value]:
        """Run the compiled command with the executor input, as the launcher does; read its outputs."""
        folder.mkdir(parents=True, exist_ok=True)
        declared = task.component.get("inputDefinitions", {}).get("parameters", {})
        parameters = {name: from_value(v) for name, v in task.inputs.items() if name in declared}
        outputs = task.component.get("outputDefinitions", {})
        executor_input = {
            "inputs": {
                "parameterValues": parameters,
                "artifacts": {
                    name: {"artifacts": [{"name": name, "uri": a["uri"], "metadata": {}} for a in arts]}
                    for name, arts in task.artifacts.items()
                },
            },
            "outputs": {
                "parameters": {
                    name: {"outputFile": str(folder / f"param-{name}")}
                    for name in outputs.get("parameters", {})
                },
                "artifacts": {
                    name: {
                        "artifacts": [
                            {
                                "name": name,
                                "type": {"schemaTitle": spec["artifactType"]["schemaTitle"]},
                                "uri": task.output_artifacts[name]["uri"],
                                "metadata": {},
                            }
                        ]
                    }
                    for name, spec in outputs.get("artifacts", {}).items()
                },
                "outputFile": str(folder / "executor_output.json"),
            },
        }
        container = self.package.container(task.executor_label)
        argv = [
            json.dumps(executor_input) if a == "{{$}}" else a
            for a in container["command"] + container["args"]
        ]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
        if proc.returncode != 0:
            raise BackendError(
                f"{task.path}: the component failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                "component/launcher_v2.go execute",
            )
        result = json.loads((folder / "executor_output.json").read_text())
        return {name: to_value(v) for name, v in result.get("parameterValues", {}).items()}


def _value_of_type(parameter_type: str, label: str) -> Any:
    return {
        "STRING": label,
        "NUMBER_INTEGER": 1,
        "NUMBER_DOUBLE": 1.0,
        "BOOLEAN": True,  # validate's "blessed": the export branch is built too
        "LIST": [],
        "STRUCT": {},
    }[parameter_type]


# ------------------------------------------------------------------------------------------------
# the pod


def resolve_pod_spec_parameter(value: str, inputs: Mapping[str, struct_pb2.Value]) -> str:
    """``resolvePodSpecInputRuntimeParameter`` (driver/resolve.go): a placeholder resolves to the
    input's *string* value (``GetStringValue``: "" for a number); anything else is a constant."""
    match = _INPUT_CHANNEL.search(value)
    if not match:
        return value
    if match.group(1) not in inputs:
        raise BackendError(
            "executorInput did not contain container Image input parameter",
            "driver/resolve.go resolvePodSpecInputRuntimeParameter",
        )
    return string_value(inputs[match.group(1)])


def _quantity(text_value: str, field_name: str) -> str:
    """``k8sres.ParseQuantity``: an empty or malformed quantity fails the driver."""
    try:
        parse_quantity(text_value)
    except (ValueError, TypeError) as exc:
        raise BackendError(
            f"failed to init podSpecPatch: {field_name}={text_value!r}: quantities must match the regular "
            "expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
            "driver/driver.go getPodResource",
        ) from exc
    if not text_value:
        raise BackendError(
            f"failed to init podSpecPatch: {field_name} resolved to an empty quantity",
            "driver/driver.go getPodResource",
        )
    return text_value


def main_container(container: Mapping[str, Any], inputs: Mapping[str, struct_pb2.Value]) -> dict[str, Any]:
    """The user container of the pod spec patch: ``initPodSpecPatch`` (driver/driver.go)."""
    resources = container.get("resources", {})
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    # getPodResource: the placeholder-capable field wins; the legacy float (GB for memory) otherwise.
    for new, old, target, name, unit in (
        ("resourceMemoryLimit", "memoryLimit", limits, "memory", "G"),
        ("resourceMemoryRequest", "memoryRequest", requests, "memory", "G"),
        ("resourceCpuLimit", "cpuLimit", limits, "cpu", ""),
        ("resourceCpuRequest", "cpuRequest", requests, "cpu", ""),
    ):
        if resources.get(new):
            target[name] = _quantity(resolve_pod_spec_parameter(resources[new], inputs), new)
        elif resources.get(old):
            target[name] = _quantity(f"{resources[old]:g}{unit}", old)
    accelerator = resources.get("accelerator")
    if accelerator:
        kind_name = (
            resolve_pod_spec_parameter(accelerator["resourceType"], inputs)
            if accelerator.get("resourceType")
            else accelerator.get("type", "")
        )
        count = (
            resolve_pod_spec_parameter(accelerator["resourceCount"], inputs)
            if accelerator.get("resourceCount")
            else (str(accelerator["count"]) if accelerator.get("count", 0) > 0 else "")
        )
        # "if acceleratorType != "" && acceleratorCount != """: no error, just no limit.
        if kind_name and count:
            limits[kind_name] = _quantity(count, "accelerator.resourceCount")
    return {
        "name": "main",  # "argo task user container is always called "main""
        "image": resolve_pod_spec_parameter(container["image"], inputs),
        "command": ["/kfp-launcher/launch", "--", *container.get("command", [])],
        "args": list(container.get("args", [])),
        "resources": {"limits": limits, "requests": requests},
    }


def extend_pod_spec(pod_spec: dict[str, Any], config: Mapping[str, Any], run: Run, task: Task) -> None:
    """``extendPodSpecPatch`` (driver/k8s.go) for the fields this project's packages use.

    An unknown field fails loudly here: silently ignoring one would let the test pass a pod the
    backend builds differently.
    """
    handled = {
        "nodeSelector",
        "tolerations",
        "emptyDirMounts",
        "securityContext",
        "activeDeadlineSeconds",
        "fieldPathAsEnv",
        "podMetadata",  # the Argo compiler's (extendPodMetadata), see build_pod
        "imagePullPolicy",
    }
    unknown = set(config) - handled
    if unknown:
        raise NotImplementedError(f"kfp_backend does not model platform-spec fields {sorted(unknown)}")
    main = pod_spec["containers"][0]
    if "imagePullPolicy" in config:
        main["imagePullPolicy"] = config["imagePullPolicy"]
    selector = config.get("nodeSelector")
    if selector:
        if "nodeSelectorJson" in selector:
            value = run.resolve_json_parameter(selector["nodeSelectorJson"], task)
            # resolveK8sJsonParameter: GetStructValue().MarshalJSON(); a non-struct gives {}.
            pod_spec["nodeSelector"] = from_value(value) if kind(value) == "struct_value" else {}
        else:
            pod_spec["nodeSelector"] = dict(selector.get("labels", {}))
    tolerations = []
    for toleration in config.get("tolerations", []):
        if "tolerationJson" in toleration:
            value = run.resolve_json_parameter(toleration["tolerationJson"], task)
            if kind(value) == "struct_value":
                tolerations.append(from_value(value))
            elif kind(value) == "list_value":
                tolerations.extend(from_value(value))
            else:
                raise BackendError(
                    "encountered unexpected toleration proto value, must be either struct or list type",
                    "driver/k8s.go extendPodSpecPatch",
                )
        else:
            tolerations.append({k: v for k, v in toleration.items() if v not in (None, "")})
    if config.get("tolerations") is not None:
        pod_spec["tolerations"] = tolerations
    for env in config.get("fieldPathAsEnv", []):
        main.setdefault("env", []).append(
            {"name": env["name"], "valueFrom": {"fieldRef": {"fieldPath": env["fieldPath"]}}}
        )
    if int(config.get("activeDeadlineSeconds", 0)) > 0:
        pod_spec["activeDeadlineSeconds"] = int(config["activeDeadlineSeconds"])
    for mount in config.get("emptyDirMounts", []):
        empty_dir: dict[str, Any] = {}
        if mount.get("medium"):
            empty_dir["medium"] = mount["medium"]
        if mount.get("sizeLimit"):
            # k8sres.MustParse: an invalid size panics the driver at 2.17.0.
            empty_dir["sizeLimit"] = _quantity(mount["sizeLimit"], "emptyDirMounts.sizeLimit")
        pod_spec.setdefault("volumes", []).append({"name": mount["volumeName"], "emptyDir": empty_dir})
        main.setdefault("volumeMounts", []).append(
            {"name": mount["volumeName"], "mountPath": mount["mountPath"]}
        )
    context = config.get("securityContext")
    if context:
        sc = main.setdefault("securityContext", {})
        for key in ("runAsUser", "runAsGroup"):
            if key in context:
                sc[key] = int(context[key])
        if "runAsNonRoot" in context:
            sc["runAsNonRoot"] = bool(context["runAsNonRoot"])
        sc["capabilities"] = {"drop": ["ALL"]}  # "Always drop all capabilities to comply with PSS baseline."


def build_pod(run: Run, task: Task, *, namespace: str = "kubeflow") -> dict[str, Any]:
    """The pod Argo creates for a container task (a Pod manifest).

    The driver's pod spec patch (:func:`main_container`, :func:`extend_pod_spec`) merged onto the
    executor template (argocompiler container.go ``addContainerExecutorTemplate``, security
    defaults from security_context.go ``applySecurityContextToExecutorTemplate``), plus Argo's
    ``init`` and ``wait`` containers (workflowpod.go ``newInitContainers``/``newWaitContainer``:
    the executor config's resources, none in KFP's install, and its security context).
    """
    container = run.package.container(task.executor_label)
    config = run.package.k8s.get(task.executor_label, {})
    patch: dict[str, Any] = {"containers": [main_container(container, task.inputs)]}
    extend_pod_spec(patch, config, run, task)

    template_main = {
        "name": "main",
        # argocompiler common.go commonEnvs
        "env": [
            {"name": "KFP_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "KFP_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        ],
        "volumeMounts": [{"name": v, "mountPath": TEMPLATE_MOUNTS[v]} for v in TEMPLATE_VOLUMES],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    main = _merge_container(template_main, patch["containers"][0])
    launcher = {
        "name": "kfp-launcher",
        "image": "ghcr.io/kubeflow/kfp-launcher:2.17.0",
        "command": ["launcher-v2"],
        "args": ["--copy", "/kfp-launcher/launch"],
        "volumeMounts": [{"name": "kfp-launcher", "mountPath": "/kfp-launcher"}],
        "resources": copy.deepcopy(LAUNCHER_RESOURCES),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    argo = {
        "image": "quay.io/argoproj/argoexec:v4.0.5",
        "securityContext": dict(ARGO_EXECUTOR_SECURITY_CONTEXT),
    }
    argo_mounts = [{"name": "var-run-argo", "mountPath": "/var/run/argo"}]
    spec: dict[str, Any] = {
        "serviceAccountName": PIPELINE_RUNNER,
        "restartPolicy": "Never",
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [
            {
                "name": "init",
                "command": ["argoexec", "init"],
                "volumeMounts": argo_mounts,
                **copy.deepcopy(argo),
            },
            launcher,
        ],
        "containers": [
            {
                "name": "wait",
                "command": ["argoexec", "wait"],
                "volumeMounts": argo_mounts,
                **copy.deepcopy(argo),
            },
            main,
        ],
        "volumes": [
            {"name": "var-run-argo", "emptyDir": {}},
            *({"name": v, "emptyDir": {}} for v in TEMPLATE_VOLUMES),
            *patch.get("volumes", []),
        ],
    }
    for key in ("nodeSelector", "tolerations", "activeDeadlineSeconds"):
        if key in patch:
            spec[key] = patch[key]
    labels = {"workflows.argoproj.io/workflow": run.run_name}
    labels.update(config.get("podMetadata", {}).get("labels", {}))  # argocompiler extendPodMetadata
    annotations = dict(config.get("podMetadata", {}).get("annotations", {}))
    annotations["sidecar.istio.io/inject"] = "false"  # apiserver/template/v2_template.go
    name = re.sub(r"[^a-z0-9-]", "-", f"{run.run_name}-{task.display_name}".lower())[:63].strip("-")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    }


def _merge_container(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Strategic merge of one container (patch keys: volumeMounts by mountPath, env by name)."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "volumeMounts":
            by_path = {m["mountPath"]: m for m in merged.get(key, [])}
            by_path.update({m["mountPath"]: m for m in value})
            merged[key] = list(by_path.values())
        elif key == "env":
            by_name = {e["name"]: e for e in merged.get(key, [])}
            by_name.update({e["name"]: e for e in value})
            merged[key] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ------------------------------------------------------------------------------------------------
# admission: defaulting and the LimitRange


def admit(pod: dict[str, Any], limit_range: Mapping[str, Any] | None) -> dict[str, Any]:
    """The pod as stored: API defaulting, then the LimitRanger admission plugin.

    - ``pkg/apis/core/v1/defaults.go`` ``SetDefaults_Pod``: a resource with a limit but no
      request gets the limit as its request.
    - ``plugin/pkg/admission/limitranger/admission.go`` ``defaultContainerResourceRequirements``:
      a container without a request/limit gets the LimitRange's ``defaultRequest``/``default``;
      ``maxConstraint``: any request or limit above ``max`` is Forbidden.

    Raises:
        BackendError: the pod is Forbidden (Argo then marks the step as errored).
    """
    pod = copy.deepcopy(pod)
    containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    for container in containers:
        resources = container.setdefault("resources", {})
        limits = resources.setdefault("limits", {})
        requests = resources.setdefault("requests", {})
        for name, value in limits.items():
            requests.setdefault(name, value)
    for item in (limit_range or {}).get("spec", {}).get("limits", []):
        if item.get("type") != "Container":
            continue
        for container in containers:
            resources = container["resources"]
            for name, value in item.get("defaultRequest", {}).items():
                if name not in resources["requests"]:
                    resources["requests"][name] = resources["limits"].get(name, value)
            for name, value in item.get("default", {}).items():
                resources["limits"].setdefault(name, value)
            for name, ceiling in item.get("max", {}).items():
                for which in ("requests", "limits"):
                    value = resources[which].get(name)
                    if value is not None and parse_quantity(value) > parse_quantity(ceiling):
                        raise BackendError(
                            f"pods {pod['metadata']['name']!r} is forbidden: maximum {name} usage per "
                            f"Container is {ceiling}, but {which[:-1]} is {value} "
                            f"(container {container['name']})",
                            "plugin/pkg/admission/limitranger/admission.go maxConstraint",
                        )
    return pod


def pod_requests(pod: Mapping[str, Any], which: str = "requests") -> dict[str, float]:
    """``resourcehelper.PodRequests`` (``pkg/api/v1/resource``): per resource, the larger of the
    containers' sum and the largest init container (init containers run one at a time)."""
    totals: dict[str, float] = {}
    for container in pod["spec"]["containers"]:
        for name, value in container.get("resources", {}).get(which, {}).items():
            totals[name] = totals.get(name, 0.0) + float(parse_quantity(value))
    for container in pod["spec"].get("initContainers", []):
        for name, value in container.get("resources", {}).get(which, {}).items():
            totals[name] = max(totals.get(name, 0.0), float(parse_quantity(value)))
    return totals


def quota_problems(pods: Iterable[Mapping[str, Any]], quota: Mapping[str, Any]) -> list[str]:
    """ResourceQuota admission (``pkg/quota/v1/evaluator/core/pods.go``): the pods running at once
    must fit the quota's ``requests.*`` / ``limits.*`` (extended resources: ``requests.<name>``)."""
    pods = list(pods)
    problems = []
    for key, hard in quota["spec"]["hard"].items():
        which, _, name = key.partition(".")
        if which not in ("requests", "limits"):
            continue
        used = sum(pod_requests(p, which).get(name, 0.0) for p in pods)
        if used > float(parse_quantity(hard)):
            problems.append(f"exceeded quota {quota['metadata']['name']}: {key} {used:g} > {hard}")
    return problems


# ------------------------------------------------------------------------------------------------
# placement


#: GCE machine types the pools use: vCPUs, memory (GB), GPUs (GCE machine-type reference).
MACHINE_SHAPES: dict[str, dict[str, float]] = {
    "e2-standard-8": {"cpu": 8, "memory_gb": 32, "gpus": 0},
    "a2-ultragpu-1g": {"cpu": 12, "memory_gb": 170, "gpus": 1},
}
#: Requests of GKE's system DaemonSets on every node (anetd/Dataplane V2, fluentbit, the metadata
#: server, netd, the PD CSI node plugin, the NVIDIA device plugin on GPU nodes...). An assumption,
#: rounded up from their manifests' requests; ``kubectl describe node`` shows a cluster's own.
DAEMONSET_RESERVE = {"cpu": 0.5, "memory": 1.0 * 2**30}


def gke_allocatable(machine_type: str) -> dict[str, float]:
    """Node allocatable CPU (cores) and memory (bytes) of a GKE Standard node, minus DaemonSets.

    GKE's documented reservations ("Standard cluster architecture: node allocatable resources"):
    CPU 6% of the first core, 1% of the second, 0.5% of the next two, 0.25% above four; memory
    25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above
    128 GiB, plus a 100 MiB eviction threshold.
    """
    shape = MACHINE_SHAPES[machine_type]
    cores = shape["cpu"]
    reserved_cpu = (
        0.06 * min(cores, 1)
        + 0.01 * min(max(cores - 1, 0), 1)
        + 0.005 * min(max(cores - 2, 0), 2)
        + 0.0025 * max(cores - 4, 0)
    )
    gib = shape["memory_gb"] * 1e9 / 2**30
    tiers = ((4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02))
    reserved, left = 0.0, gib
    for size, share in tiers:
        part = min(left, size)
        reserved += part * share
        left -= part
    memory = (gib - reserved) * 2**30 - 100 * 2**20
    return {
        "cpu": cores - reserved_cpu - DAEMONSET_RESERVE["cpu"],
        "memory": memory - DAEMONSET_RESERVE["memory"],
        "nvidia.com/gpu": float(shape["gpus"]),
    }


@dataclass(frozen=True)
class NodePool:
    """A node pool as the scheduler sees one of its nodes: labels, taints, allocatable."""

    name: str
    machine_type: str
    labels: dict[str, str]
    taints: tuple[dict[str, str], ...]
    allocatable: dict[str, float]


def gpu_pool(node_pool: Mapping[str, Any]) -> NodePool:
    """The Config Connector ContainerNodePool's nodes: GKE labels each node with its accelerator and
    pool name and puts the declared taints on it."""
    config = node_pool["spec"]["nodeConfig"]
    (accelerator,) = config["guestAccelerator"]
    effects = {
        "NO_SCHEDULE": "NoSchedule",
        "PREFER_NO_SCHEDULE": "PreferNoSchedule",
        "NO_EXECUTE": "NoExecute",
    }
    allocatable = gke_allocatable(config["machineType"])
    allocatable["nvidia.com/gpu"] = float(accelerator["count"])
    return NodePool(
        name=node_pool["metadata"]["name"],
        machine_type=config["machineType"],
        labels={
            "cloud.google.com/gke-accelerator": accelerator["type"],
            "cloud.google.com/gke-nodepool": node_pool["metadata"]["name"],
            **config.get("labels", {}),
        },
        taints=tuple({**t, "effect": effects[t["effect"]]} for t in config.get("taint", [])),
        allocatable=allocatable,
    )


def cpu_pool(machine_type: str, name: str = "default-pool") -> NodePool:
    """The cluster's default pool (README ``gcloud container clusters create --machine-type``)."""
    return NodePool(
        name, machine_type, {"cloud.google.com/gke-nodepool": name}, (), gke_allocatable(machine_type)
    )


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, str]) -> bool:
    """``Toleration.ToleratesTaint`` (``k8s.io/api/core/v1/toleration.go``)."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint["key"]
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", "")


def fit_problems(pod: Mapping[str, Any], pool: NodePool) -> list[str]:
    """Why a node of ``pool`` cannot take ``pod``: the scheduler's NodeAffinity (node selector),
    TaintToleration and NodeResourcesFit filters (``pkg/scheduler/framework/plugins``)."""
    spec = pod["spec"]
    problems = []
    for key, value in spec.get("nodeSelector", {}).items():
        if pool.labels.get(key) != value:
            problems.append(f"node selector {key}={value} does not match")
    for taint in pool.taints:
        if taint["effect"] in ("NoSchedule", "NoExecute") and not any(
            tolerates(t, taint) for t in spec.get("tolerations", [])
        ):
            problems.append(f"untolerated taint {taint['key']}={taint.get('value', '')}:{taint['effect']}")
    for name, wanted in pod_requests(pod).items():
        if wanted > pool.allocatable.get(name, 0.0):
            problems.append(
                f"Insufficient {name} (requests {wanted:g}, allocatable {pool.allocatable.get(name, 0.0):g})"
            )
    return problems


def placement_problems(pod: Mapping[str, Any], pools: Iterable[NodePool]) -> list[str]:
    """[] when some pool's node can take the pod, else every pool's reasons (a Pending pod's event)."""
    reasons = []
    for pool in pools:
        problems = fit_problems(pod, pool)
        if not problems:
            return []
        reasons.append(f"{pool.name} ({pool.machine_type}): {'; '.join(problems)}")
    return [f"pod {pod['metadata']['name']} fits no node: " + " | ".join(reasons)]


# ------------------------------------------------------------------------------------------------
# the project's own rules on the pods


def gpu_limit(pod: Mapping[str, Any], resource: str = "nvidia.com/gpu") -> float:
    return sum(
        float(parse_quantity(c.get("resources", {}).get("limits", {}).get(resource, "0")))
        for c in pod["spec"]["containers"]
    )


def shm_size(pod: Mapping[str, Any]) -> float:
    """Bytes of the memory-backed emptyDir mounted at /dev/shm in the main container (0: none, so
    the container runtime's 64 MiB default)."""
    main = next(c for c in pod["spec"]["containers"] if c["name"] == "main")
    names = [m["name"] for m in main.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    for volume in pod["spec"].get("volumes", []):
        if volume["name"] in names and volume.get("emptyDir", {}).get("medium") == "Memory":
            return float(parse_quantity(volume["emptyDir"].get("sizeLimit", "0")))
    return 0.0


# ------------------------------------------------------------------------------------------------
# Argo's retry decision


FAILURES = {
    "main container exits non-zero (OOMKilled, CUDA error, SIGTERM at graceful node shutdown)": "Failed",
    "pod deleted (node removed, Spot VM reclaimed and the pod garbage-collected)": "Error",
    "init or wait container fails": "Error",
}


def effective_retry_strategy(
    template_strategy: Mapping[str, Any] | None, workflow_defaults: Mapping[str, Any]
) -> dict[str, Any] | None:
    """``mergedTemplateDefaultsInto`` (argo workflow/controller/operator.go): the controller's
    ``templateDefaults`` merged under the template's own fields (the template's win)."""
    default = workflow_defaults.get("spec", {}).get("templateDefaults", {}).get("retryStrategy")
    if template_strategy is None and default is None:
        return None
    return {**(default or {}), **(template_strategy or {})}


def retried(strategy: Mapping[str, Any] | None, node_phase: str) -> bool:
    """Argo's choice to retry a failed node (operator.go ``processNodeRetries``;
    ``RetryPolicyActual`` in workflow_types.go: no policy and no expression means OnFailure)."""
    if not strategy or str(strategy.get("limit", "0")) == "0":
        return False
    policy = strategy.get("retryPolicy") or ("OnFailure" if not strategy.get("expression") else "Always")
    return {
        "Always": True,
        "OnFailure": node_phase == "Failed",
        "OnError": node_phase == "Error",
        "OnTransientError": False,
    }[policy]


def compiled_retry_strategy(task: Mapping[str, Any]) -> dict[str, Any] | None:
    """The retryStrategy KFP's compiler gives a task's executor template (argocompiler
    container.go ``getTaskRetryStrategyFromInput``): limit and backoff, never a retryPolicy."""
    policy = task.get("retryPolicy")
    if not policy:
        return None
    return {
        "limit": str(policy["maxRetryCount"]),
        "backoff": {
            "duration": policy.get("backoffDuration", "0s").removesuffix("s"),
            "factor": _integral(policy.get("backoffFactor", 2.0)),
            "maxDuration": policy.get("backoffMaxDuration", "3600s").removesuffix("s"),
        },
    }


def _integral(factor: float) -> str:
    """Argo reads the factor with ``intstr.Int`` (``strconv.Atoi``): 1.5 fails the workflow."""
    if float(factor) != int(factor):
        raise BackendError(
            f"value '{factor}' cannot be resolved to an int (retry backoff factor)", "argo util/intstr Int"
        )
    return str(int(factor))
