"""The Kubernetes manifests (``manifests/``): render, validate, and agree with the pipeline.

Each overlay is rendered with ``kubectl kustomize`` (no API server needed). Every rendered core
object is validated strictly against the pinned Kubernetes version's OpenAPI schema
(kubernetes-validate); the Config Connector node pool, whose CRD kubernetes-validate does not
ship, against ``manifests/validation/containernodepool.schema.json``. The rest checks what schema
validation cannot: no ``latest`` images, hardened pods, sane quantities, least-privilege RBAC,
and GPU values consistent with :mod:`stage1_pro.cluster`.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from stage1_pro import cluster

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
ENVIRONMENTS = ("dev", "prod")

#: Kubernetes version the manifests are validated against (GKE regular channel at writing).
K8S_VERSION = "1.33"

#: Shapes of the GPU machine types the node pool may use (GCE machine-type reference).
MACHINE_SHAPES = {"a2-ultragpu-1g": {"cpu": 12, "memory_gib": 158, "gpus": 1}}

KCC_GROUP = "cnrm.cloud.google.com"
KCC_EFFECTS = {
    "NO_SCHEDULE": "NoSchedule",
    "PREFER_NO_SCHEDULE": "PreferNoSchedule",
    "NO_EXECUTE": "NoExecute",
}
CORE_KINDS = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "ResourceQuota",
    "LimitRange",
    "PriorityClass",
    "NetworkPolicy",
}

kubernetes_validate = pytest.importorskip("kubernetes_validate")
from kubernetes.utils import parse_quantity  # noqa: E402  (kfp's kubernetes client)

requires_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not on PATH: it renders the kustomize overlays (`kubectl kustomize`, no server needed)",
)


@functools.cache
def render(env: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize manifests/overlays/<env>`` renders."""
    proc = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS / "overlays" / env)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize overlays/{env} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def is_config_connector(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].split("/")[0].endswith(KCC_GROUP)


@functools.cache
def node_pool_schema() -> dict[str, Any]:
    schema = json.loads((MANIFESTS / "validation" / "containernodepool.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


# ---- generic checks (each also exercised on a bad example below, so they can fail) -------------


def image_problems(obj: Any, path: str = "") -> list[str]:
    """Every ``image:`` reference under ``obj`` that is untagged or ``latest``."""
    problems: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{path}.{key}" if path else key
            if key == "image" and isinstance(value, str):
                problem = image_ref_problem(value)
                if problem:
                    problems.append(f"{here}: {problem}")
            else:
                problems += image_problems(value, here)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            problems += image_problems(item, f"{path}[{i}]")
    return problems


def image_ref_problem(ref: str) -> str | None:
    """Why ``ref`` is not a pinned image reference, or None (a digest or a non-latest tag)."""
    if "@sha256:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{ref!r} has no tag (means :latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"{ref!r} uses the mutable tag latest"
    return None


def pod_specs(obj: Any) -> list[dict[str, Any]]:
    """Every pod spec (a mapping with ``containers``) inside a rendered object."""
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            return [obj]
        return [spec for value in obj.values() for spec in pod_specs(value)]
    if isinstance(obj, list):
        return [spec for item in obj for spec in pod_specs(item)]
    return []


def pod_problems(spec: dict[str, Any]) -> list[str]:
    """Pod-hardening gaps: runAsNonRoot, resource requests and limits, privilege escalation."""
    problems = []
    pod_nonroot = (spec.get("securityContext") or {}).get("runAsNonRoot") is True
    for container in spec.get("initContainers", []) + spec["containers"]:
        name = container.get("name", "?")
        context = container.get("securityContext") or {}
        if not (pod_nonroot or context.get("runAsNonRoot") is True):
            problems.append(f"container {name}: runAsNonRoot is not true (pod or container securityContext)")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {name}: allowPrivilegeEscalation is not false")
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (resources.get(kind) or {}):
                    problems.append(f"container {name}: no {kind}.{resource}")
    return problems


def tolerates(toleration: dict[str, Any], taint: dict[str, str]) -> bool:
    """Kubernetes' toleration-matches-taint rule (core/v1 Toleration.ToleratesTaint)."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    operator = toleration.get("operator", "Equal")
    if operator == "Exists":
        return not toleration.get("key") or toleration["key"] == taint["key"]
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", "")


def test_checks_catch_bad_examples() -> None:
    bad_pod = {
        "kind": "Deployment",
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "python"}]}}},
    }
    assert image_problems(bad_pod) == [
        "spec.template.spec.containers[0].image: 'python' has no tag (means :latest)"
    ]
    assert image_ref_problem("us-docker.pkg.dev/p/r/img:latest") is not None
    assert image_ref_problem("localhost:5000/img") is not None  # the port is not a tag
    assert image_ref_problem("localhost:5000/img:1.0") is None
    assert image_ref_problem("img@sha256:" + "0" * 64) is None
    problems = pod_problems(pod_specs(bad_pod)[0])
    assert "container c: runAsNonRoot is not true (pod or container securityContext)" in problems
    assert "container c: no limits.memory" in problems
    good = {
        "securityContext": {"runAsNonRoot": True},
        "containers": [
            {
                "name": "c",
                "securityContext": {"allowPrivilegeEscalation": False},
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi"},
                    "limits": {"cpu": "1", "memory": "1Gi"},
                },
            }
        ],
    }
    assert pod_problems(good) == []
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    assert tolerates({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, taint)
    assert not tolerates({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, taint)
    assert not tolerates({"key": "gpu", "operator": "Exists"}, taint)
    assert not tolerates({"key": "nvidia.com/gpu", "value": "true"}, taint)


# ---- rendering and schema validation -----------------------------------------------------------


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_overlay_renders_every_piece(env: str) -> None:
    objects = render(env)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted([*CORE_KINDS, "Namespace", "ContainerNodePool"]), kinds
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ConfigMap", "kfp-launcher") in names
    # settings.yaml is local-config: kustomize reads it, the cluster never sees it.
    assert ("ConfigMap", "stage1-pro-settings") not in names
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stage1-pro", obj["metadata"]["name"]


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_core_objects_pass_strict_schema_validation(env: str) -> None:
    core = [o for o in render(env) if not is_config_connector(o)]
    assert {o["kind"] for o in core} == CORE_KINDS
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@requires_kubectl
def test_strict_validation_rejects_an_unknown_field() -> None:
    quota = copy.deepcopy(one(render("prod"), "ResourceQuota"))
    quota["spec"]["hardd"] = quota["spec"].pop("hard")
    with pytest.raises(kubernetes_validate.ValidationError, match="hardd"):
        kubernetes_validate.validate(quota, K8S_VERSION, strict=True)


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_config_connector_objects_match_their_schema(env: str) -> None:
    kcc = [o for o in render(env) if is_config_connector(o)]
    assert [o["kind"] for o in kcc] == ["ContainerNodePool"]
    jsonschema.Draft202012Validator(node_pool_schema()).validate(kcc[0])
    # Only Config Connector objects (and their namespace) carry the label README's
    # `kubectl apply -l 'stage1-pro.dev/requires!=config-connector'` filters on.
    needs_kcc = {
        o["metadata"]["name"] for o in render(env) if "stage1-pro.dev/requires" in o["metadata"]["labels"]
    }
    assert needs_kcc == {"stage1-pro-gpu", "stage1-pro-infra"}


@requires_kubectl
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda np: np["spec"]["nodeConfig"].update(taints=np["spec"]["nodeConfig"].pop("taint")), "taints"),
        (lambda np: np["spec"]["nodeConfig"]["taint"][0].update(effect="NoSchedule"), "NoSchedule"),
        (lambda np: np["spec"]["autoscaling"].update(maxNodeCount="4"), "'4' is not of type 'integer'"),
    ],
)
def test_node_pool_schema_rejects_mistakes(mutate: Any, message: str) -> None:
    pool = copy.deepcopy(one(render("prod"), "ContainerNodePool"))
    mutate(pool)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        jsonschema.Draft202012Validator(node_pool_schema()).validate(pool)


# ---- what schemas do not catch -----------------------------------------------------------------


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_no_latest_images_and_hardened_pods(env: str) -> None:
    objects = render(env)
    assert [p for o in objects for p in image_problems(o)] == []
    # The manifests define no workload of their own (pipeline pods come from KFP); any added
    # later must be hardened.
    assert [p for o in objects for spec in pod_specs(o) for p in pod_problems(spec)] == []


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_limit_range_and_quota_quantities_are_sane(env: str) -> None:
    objects = render(env)
    (limits,) = one(objects, "LimitRange")["spec"]["limits"]
    assert limits["type"] == "Container"
    shape = MACHINE_SHAPES[cluster.GPU_MACHINE_TYPE]
    for resource in ("cpu", "memory"):
        request, default, maximum = (
            parse_quantity(limits[k][resource]) for k in ("defaultRequest", "default", "max")
        )
        assert 0 < request <= default <= maximum, (
            f"LimitRange {resource}: need 0 < defaultRequest <= default <= max"
        )
    # The largest container must fit on one GPU node (else it can never schedule).
    assert parse_quantity(limits["max"]["cpu"]) < shape["cpu"]
    assert parse_quantity(limits["max"]["memory"]) < parse_quantity(f"{shape['memory_gib']}Gi")

    hard = one(objects, "ResourceQuota")["spec"]["hard"]
    for resource in ("cpu", "memory"):
        assert parse_quantity(hard[f"requests.{resource}"]) <= parse_quantity(hard[f"limits.{resource}"])
        # The quota must admit at least one container of the LimitRange's maximum size.
        assert parse_quantity(hard[f"requests.{resource}"]) >= parse_quantity(limits["max"][resource])
    gpus = parse_quantity(hard[f"requests.{cluster.GPU_RESOURCE}"])
    assert gpus == int(gpus), "a GPU quota must be a whole number"


@pytest.fixture(scope="module")
def compiled_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, Kubernetes platform spec) of the pipeline as ``stage1-pro compile`` writes it."""
    compile_module = pytest.importorskip("stage1_pro.pipelines.compile")
    package = compile_module.compile_pipeline(tmp_path_factory.mktemp("pipeline") / "pipeline.yaml")
    spec, platform = yaml.safe_load_all(package.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_compiled_train_task_schedules_on_the_node_pool(
    env: str, compiled_pipeline: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """End to end: the compiled pipeline's train pod, with default parameters, fits this overlay."""
    parameters = pytest.importorskip("stage1_pro.run_parameters")
    spec, platform = compiled_pipeline
    objects = render(env)
    pool = one(objects, "ContainerNodePool")["spec"]
    node = pool["nodeConfig"]
    (accelerator,) = node["guestAccelerator"]

    train = platform["exec-train"]
    taints = [{**t, "effect": KCC_EFFECTS[t["effect"]]} for t in node["taint"]]
    for taint in taints:
        assert any(tolerates(t, taint) for t in train["tolerations"]), f"train does not tolerate {taint}"
    # The node selector is computed at run time (check-config) from the gpu_type parameter.
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    gpu_type = defaults["gpu_type"]["defaultValue"]
    checked = parameters.check_parameters({"data_uri": "gs://bucket/data/manifest.csv", "gpu_type": gpu_type})
    node_labels = {cluster.ACCELERATOR_LABEL: accelerator["type"], **node.get("labels", {})}
    assert checked.gpu_node_selector.items() <= node_labels.items(), (
        f"train selects {checked.gpu_node_selector}; the pool's nodes carry {node_labels}"
    )
    # GPUs: the resource the quota counts, no more per pod than a node has, within the quota.
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == cluster.GPU_RESOURCE
    gpu_count = int(defaults["gpu_count"]["defaultValue"])
    hard = one(objects, "ResourceQuota")["spec"]["hard"]
    assert gpu_count <= accelerator["count"] and gpu_count <= parse_quantity(
        hard[f"requests.{cluster.GPU_RESOURCE}"]
    )
    # CPU/memory: within the LimitRange ceiling and the node.
    (limits,) = one(objects, "LimitRange")["spec"]["limits"]
    assert parse_quantity(checked.train_cpu_request) <= parse_quantity(limits["max"]["cpu"])
    assert parse_quantity(checked.train_memory_request) <= parse_quantity(limits["max"]["memory"])
    # The security context names the user the images run as.
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "images" / "Dockerfile.gpu").read_text(), re.M)
    assert train["securityContext"]["runAsNonRoot"] is True
    assert (int(train["securityContext"]["runAsUser"]), int(train["securityContext"]["runAsGroup"])) == tuple(
        map(int, dockerfile_user.groups())
    )


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_gpu_node_pool_agrees_with_the_pipeline(env: str) -> None:
    objects = render(env)
    pool = one(objects, "ContainerNodePool")["spec"]
    node = pool["nodeConfig"]
    (accelerator,) = node["guestAccelerator"]
    # GKE derives the node label cloud.google.com/gke-accelerator from guestAccelerator.type.
    assert accelerator["type"] == cluster.DEFAULT_ACCELERATOR
    assert accelerator["count"] == cluster.GPUS_PER_NODE == MACHINE_SHAPES[node["machineType"]]["gpus"]
    assert node["machineType"] == cluster.GPU_MACHINE_TYPE
    assert 1 <= cluster.DEFAULT_GPU_COUNT <= cluster.GPUS_PER_NODE
    assert accelerator["gpuDriverInstallationConfig"]["gpuDriverVersion"] == "LATEST"  # CUDA 13: R580+

    taints = [{**t, "effect": KCC_EFFECTS[t["effect"]]} for t in node["taint"]]
    gpu_taints = [t for t in taints if t["key"] == cluster.GPU_TOLERATION_KEY]
    assert gpu_taints == [
        {
            "key": cluster.GPU_TOLERATION_KEY,
            "value": cluster.GPU_TAINT_VALUE,
            "effect": cluster.GPU_TAINT_EFFECT,
        }
    ]
    # The train task's toleration must tolerate every taint of the pool, or it never schedules.
    assert all(tolerates(cluster.GPU_TOLERATION, t) for t in taints)

    # Scale to zero when idle; the GPU quota neither blocks one train task nor exceeds the pool.
    assert pool["autoscaling"]["minNodeCount"] == 0 <= pool["initialNodeCount"]
    capacity = pool["autoscaling"]["maxNodeCount"] * len(pool["nodeLocations"]) * accelerator["count"]
    quota = parse_quantity(one(objects, "ResourceQuota")["spec"]["hard"][f"requests.{cluster.GPU_RESOURCE}"])
    assert cluster.DEFAULT_GPU_COUNT <= quota <= capacity
    assert pool["location"] in pool["nodeLocations"][0]  # the zones lie in the cluster's region


@requires_kubectl
def test_spot_is_the_dev_overlays_option() -> None:
    assert one(render("dev"), "ContainerNodePool")["spec"]["nodeConfig"]["spot"] is True
    assert one(render("prod"), "ContainerNodePool")["spec"]["nodeConfig"]["spot"] is False


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_runner_identity_and_pipeline_root(env: str) -> None:
    objects = render(env)
    settings = yaml.safe_load((MANIFESTS / "overlays" / env / "settings.yaml").read_text())["data"]
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["name"] == cluster.PIPELINE_SERVICE_ACCOUNT
    assert account["metadata"]["namespace"] == cluster.PIPELINE_NAMESPACE
    assert (
        account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == settings["runnerServiceAccount"]
    )
    launcher = one(objects, "ConfigMap", "kfp-launcher")
    assert launcher["metadata"]["namespace"] == cluster.PIPELINE_NAMESPACE
    assert launcher["data"]["defaultPipelineRoot"] == settings["pipelineRoot"]
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "pipeline-runner",
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": cluster.PIPELINE_SERVICE_ACCOUNT,
            "namespace": cluster.PIPELINE_NAMESPACE,
        }
    ]
    assert one(objects, "PriorityClass")["metadata"]["name"] == cluster.TRAINING_PRIORITY_CLASS
    pool = one(objects, "ContainerNodePool")
    assert pool["spec"]["clusterRef"]["external"] == settings["clusterName"]
    assert pool["spec"]["nodeConfig"]["serviceAccountRef"]["external"] == settings["nodeServiceAccount"]
    infra = one(objects, "Namespace", pool["metadata"]["namespace"])
    assert infra["metadata"]["annotations"]["cnrm.cloud.google.com/project-id"] == settings["projectId"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_settings_are_well_formed(env: str) -> None:
    data = yaml.safe_load((MANIFESTS / "overlays" / env / "settings.yaml").read_text())["data"]
    project = r"[a-z][-a-z0-9]{4,28}[a-z0-9]"
    assert re.fullmatch(project, data["projectId"]), "projectId: 6-30 lowercase letters, digits, hyphens"
    assert re.fullmatch(r"gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9](/[^\s]*)?", data["pipelineRoot"]), (
        "pipelineRoot"
    )
    for key in ("runnerServiceAccount", "nodeServiceAccount"):
        email = data[key]
        assert re.fullmatch(
            rf"[a-z][-a-z0-9]{{4,28}}[a-z0-9]@{data['projectId']}\.iam\.gserviceaccount\.com", email
        ), f"{key} must be a service account of projectId {data['projectId']}"
    location, zone = data["location"], data["gpuZone"]
    assert re.fullmatch(r"[a-z]+-[a-z]+[0-9]+(-[a-z])?", location), "location: a region or a zone"
    assert re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", zone), "gpuZone: a zone such as us-central1-c"
    region = location if location.count("-") == 1 else location.rsplit("-", 1)[0]
    assert zone.startswith(f"{region}-"), f"gpuZone {zone} is not in the cluster's region {region}"


@requires_kubectl
def test_role_is_least_privilege() -> None:
    role = one(render("prod"), "Role", "pipeline-runner")
    writes = {"create", "update", "patch", "delete", "deletecollection", "*"}
    for rule in role["rules"]:
        assert "*" not in rule["resources"] and "*" not in rule["verbs"] and "*" not in rule["apiGroups"], (
            rule
        )
        assert not {"pods/exec", "pods/attach", "pods/portforward"} & set(rule["resources"]), rule
        if {"secrets", "configmaps"} & set(rule["resources"]):
            assert rule.get("resourceNames"), f"secrets/configmaps must be limited by resourceNames: {rule}"
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        if set(rule["verbs"]) & writes:
            # The only writes: Argo's executor reporting step outputs.
            assert rule["apiGroups"] == ["argoproj.io"] and rule["resources"] == ["workflowtaskresults"], rule
    readable = {name for r in role["rules"] if "secrets" in r["resources"] for name in r["resourceNames"]}
    assert readable == {"mlpipeline-minio-artifact"}


@requires_kubectl
def test_network_policy_denies_ingress_and_allows_what_a_run_needs() -> None:
    policy = one(render("prod"), "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchExpressions"] == [
        {"key": "workflows.argoproj.io/workflow", "operator": "Exists"}
    ]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["ingress"] == []
    ports = {
        (p.get("protocol", "TCP"), p["port"]) for rule in policy["egress"] for p in rule.get("ports", [])
    }
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 80), ("TCP", 988)} <= ports
    # Same-namespace egress (KFP API, ML Metadata, MinIO) without opening other namespaces.
    same_namespace = [r for r in policy["egress"] if r["to"] == [{"podSelector": {}}]]
    assert len(same_namespace) == 1
