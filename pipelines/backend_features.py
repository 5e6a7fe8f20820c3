"""The Kubeflow Pipelines backend version a compiled package needs: one row per backend feature.

Each feature is registered where it is defined, with the first backend release that runs it as
compiled and a detector that finds where the package uses it. :func:`required_backend` takes the
highest minimum over the features a package uses; ``stage1-pro doctor`` compares it with the
server's version. To add a feature, register a detector::

    @backend_feature("dsl.Collected fan-in", "2.14.0", "argocompiler dag.go, #11725")
    def _collected(package: CompiledPackage) -> list[str]:
        return [...]  # where the package uses it (task or executor names); [] if nowhere

Versions are those of kubeflow/pipelines tags (the backend's ``TAG_NAME``); upstream has no tags
between 2.5.0 and 2.14.0. Sources name the backend file and the commit or pull request that
brought the feature.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1_pro.errors import ConfigError

Version = tuple[int, int, int]
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")
_PLACEHOLDER = "{{$.inputs.parameters["


def parse_version(text: str | None) -> Version | None:
    """``(major, minor, patch)`` of a backend tag such as ``2.17.0`` or ``v2.5.0-rc.1``, else None.

    ``unknown`` (what a backend built without ``TAG_NAME`` reports) and empty text give None.
    """
    match = _VERSION.match((text or "").strip())
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def format_version(version: Version) -> str:
    """``2.17.0`` for ``(2, 17, 0)``."""
    return ".".join(map(str, version))


@dataclass(frozen=True)
class CompiledPackage:
    """The two documents of a compiled package: the pipeline spec and the Kubernetes platform spec."""

    spec: dict[str, Any]
    #: ``platforms.kubernetes.deploymentSpec.executors`` (empty without a platform spec).
    executors: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> CompiledPackage:
        """Read a package written by ``stage1-pro compile`` (or any KFP v2 compiler).

        Raises:
            ConfigError: the file is not a KFP v2 pipeline package.
        """
        import yaml

        try:
            docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d]
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the pipeline package: {exc}") from None
        if not docs or not isinstance(docs[0], dict) or "root" not in docs[0]:
            raise ConfigError(
                f"{path}: not a KFP v2 pipeline package (no pipeline spec 'root'); "
                "create one with 'stage1-pro compile'"
            )
        platform = docs[1] if len(docs) > 1 and isinstance(docs[1], dict) else {}
        kubernetes = platform.get("platforms", {}).get("kubernetes", {})
        return cls(docs[0], kubernetes.get("deploymentSpec", {}).get("executors", {}))

    def dags(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(component name, its DAG) for the root and every DAG component."""
        yield "root", self.spec["root"].get("dag", {})
        for name, component in self.spec.get("components", {}).items():
            if "dag" in component:
                yield name, component["dag"]

    def tasks(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(DAG component name, task name, task spec) of every task of every DAG."""
        for dag_name, dag in self.dags():
            for task_name, task in dag.get("tasks", {}).items():
                yield dag_name, task_name, task

    def containers(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(executor name, container spec) of every container executor."""
        for name, executor in self.spec.get("deploymentSpec", {}).get("executors", {}).items():
            if "container" in executor:
                yield name, executor["container"]


Detector = Callable[[CompiledPackage], list[str]]


@dataclass(frozen=True)
class BackendFeature:
    """A compiled-pipeline feature, the first backend release that runs it, and where that is known."""

    name: str
    min_version: Version
    source: str
    detect: Detector


#: Every registered feature, by name (filled by :func:`backend_feature` below).
BACKEND_FEATURES: dict[str, BackendFeature] = {}


def backend_feature(name: str, min_version: str, source: str) -> Callable[[Detector], Detector]:
    """Register ``detect`` as the detector of feature ``name`` (needs backend ``min_version``).

    Raises:
        ValueError: ``min_version`` is not a version, or ``name`` is registered twice.
    """
    version = parse_version(min_version)
    if version is None:
        raise ValueError(f"backend feature {name!r}: {min_version!r} is not a version such as 2.5.0")

    def register(detect: Detector) -> Detector:
        if name in BACKEND_FEATURES:
            raise ValueError(f"backend feature {name!r} is registered twice")
        BACKEND_FEATURES[name] = BackendFeature(name, version, source, detect)
        return detect

    return register


@dataclass(frozen=True)
class Requirement:
    """What a package needs of the backend: the highest minimum and the features behind it."""

    min_version: Version
    #: (feature, where the package uses it), highest minimum first.
    uses: list[tuple[BackendFeature, list[str]]]

    def reasons(self, below: Version | None = None) -> list[str]:
        """``"feature >= x.y.z (where)"`` for each feature needing more than ``below`` (all if None)."""
        return [
            f"{feature.name} >= {format_version(feature.min_version)} ({', '.join(where[:3])})"
            for feature, where in self.uses
            if below is None or feature.min_version > below
        ]


#: The oldest backend the checks here know about: resource placeholders and exit hooks start at 2.4.
BASELINE: Version = (2, 4, 0)


def required_backend(package: CompiledPackage) -> Requirement:
    """The backend version ``package`` needs, from every registered feature it uses."""
    uses = [(feature, where) for feature in BACKEND_FEATURES.values() if (where := feature.detect(package))]
    uses.sort(key=lambda use: use[0].min_version, reverse=True)
    return Requirement(max([BASELINE, *(feature.min_version for feature, _ in uses)]), uses)


# ---- the features ------------------------------------------------------------------------------


def _executors_with(package: CompiledPackage, test: Callable[[dict[str, Any]], bool]) -> list[str]:
    return [name for name, executor in package.executors.items() if test(executor)]


@backend_feature(
    "run-time resource values", "2.4.0", "driver driver.go initPodSpecPatch/getPodResource, #11501"
)
def _resource_placeholders(package: CompiledPackage) -> list[str]:
    def placeholders(resources: dict[str, Any]) -> bool:
        values = [*resources.values(), *resources.get("accelerator", {}).values()]
        return any(isinstance(v, str) and _PLACEHOLDER in v for v in values)

    return [name for name, c in package.containers() if placeholders(c.get("resources", {}))]


@backend_feature(
    "dsl.ExitHandler (exit lifecycle hook)", "2.4.0", "argocompiler common.go addExitTask, #11470"
)
def _exit_handler(package: CompiledPackage) -> list[str]:
    return [
        task
        for _, task, spec in package.tasks()
        if spec.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"
    ]


@backend_feature("nodeSelectorJson", "2.5.0", "driver k8s.go extendPodSpecPatch, #11770")
def _node_selector_json(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: "nodeSelectorJson" in e.get("nodeSelector", {}))


@backend_feature("tolerationJson", "2.5.0", "driver k8s.go extendPodSpecPatch, #11770")
def _toleration_json(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: any("tolerationJson" in t for t in e.get("tolerations", [])))


@backend_feature("pvcMount pvcNameParameter", "2.5.0", "driver k8s.go makeVolumeMountPatch, #11770")
def _pvc_name_parameter(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: any("pvcNameParameter" in m for m in e.get("pvcMount", [])))


@backend_feature(
    "retries of root-DAG tasks", "2.5.0", "argocompiler container.go getTaskRetryPolicySpec, #11673"
)
def _root_retries(package: CompiledPackage) -> list[str]:
    return [task for dag, task, spec in package.tasks() if dag == "root" and "retryPolicy" in spec]


@backend_feature(
    "retries of tasks inside If/ExitHandler/ParallelFor/sub-pipelines",
    "2.14.0",
    "argocompiler container.go task.GetRetryPolicy, #11908",
)
def _nested_retries(package: CompiledPackage) -> list[str]:
    return [task for dag, task, spec in package.tasks() if dag != "root" and "retryPolicy" in spec]


@backend_feature("dsl.PipelineTaskFinalStatus", "2.14.0", "driver resolve.go resolveInputParameter, #11953")
def _final_status(package: CompiledPackage) -> list[str]:
    return [
        task
        for _, task, spec in package.tasks()
        if any("taskFinalStatus" in p for p in spec.get("inputs", {}).get("parameters", {}).values())
    ]


@backend_feature(
    "artifacts passed between tasks inside dsl.ParallelFor",
    "2.5.0",
    "driver resolve.go, #11627 (fixes #11520)",
)
def _loop_artifacts(package: CompiledPackage) -> list[str]:
    return [
        task
        for dag, task, spec in package.tasks()
        if dag.startswith("comp-for-loop-")
        and any("taskOutputArtifact" in a for a in spec.get("inputs", {}).get("artifacts", {}).values())
    ]


@backend_feature(
    "dsl.ParallelFor inside an exit-handled DAG that reports its final status",
    "2.17.0",
    "driver DAG state propagation, #13322 (fixes #13321)",
)
def _loop_in_exit_handler(package: CompiledPackage) -> list[str]:
    if not _final_status(package):
        return []
    return [
        task
        for dag, task, spec in package.tasks()
        if dag.startswith("comp-exit-handler-")
        and spec.get("componentRef", {}).get("name", "").startswith("comp-for-loop-")
    ]


@backend_feature("emptyDir volumes", "2.3.0", "driver k8s.go extendPodSpecPatch, #10913")
def _empty_dir(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: bool(e.get("emptyDirMounts")))


@backend_feature(
    "per-task pod labels and annotations", "2.14.0", "argocompiler container.go extendPodMetadata, #12049"
)
def _pod_metadata(package: CompiledPackage) -> list[str]:
    # Before 2.14 the first task's labels land on every task's shared template: only identical
    # pod metadata on every executor (or none) is safe.
    metadata = {name: repr(e.get("podMetadata")) for name, e in package.executors.items()}
    if len(set(metadata.values())) <= 1 or not any(e.get("podMetadata") for e in package.executors.values()):
        return []
    return _executors_with(package, lambda e: bool(e.get("podMetadata")))


@backend_feature("securityContext", "2.16.0", "driver k8s.go extendPodSpecPatch, #12832")
def _security_context(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: bool(e.get("securityContext")))


@backend_feature("pvcMount subPath", "2.16.0", "driver k8s.go makeVolumeMountPatch, #12595")
def _pvc_sub_path(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: any(m.get("subPath") for m in e.get("pvcMount", [])))


@backend_feature("nodeAffinity", "2.14.0", "driver k8s.go extendPodSpecPatch, #12028")
def _node_affinity(package: CompiledPackage) -> list[str]:
    return _executors_with(package, lambda e: bool(e.get("nodeAffinity")))
