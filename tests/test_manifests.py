"""The Kubernetes manifests (``manifests/``): render, validate, and agree with the pipeline.

Each overlay has two kustomizations, rendered with ``kubectl kustomize`` (no API server needed):
``stage1-pro`` (what the project owns: ``kubectl delete -k`` is safe) and ``kfp-patches`` (changes
to Kubeflow Pipelines' own objects: apply only). Every rendered core object is validated strictly
against the pinned Kubernetes version's OpenAPI schema (kubernetes-validate); the Config Connector
node pool, whose CRD kubernetes-validate does not ship, against
``manifests/validation/containernodepool.schema.json``. The rest checks what schema validation
cannot: the owned/patched split, no ``latest`` images, hardened pods, sane quantities,
least-privilege RBAC, a NetworkPolicy that lets pipeline pods reach KFP in single- and multi-user
installs (evaluated by Kubernetes' own peer rules), the workflow-defaults merge, and GPU values
consistent with :mod:`stage1_pro.cluster`.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from stage1_pro import cluster

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
ENVIRONMENTS = ("dev", "prod")
#: The two kustomizations of an overlay: what stage1-pro owns, and its patches to KFP's objects.
OWNED, PATCHES = "stage1-pro", "kfp-patches"

#: Objects a Kubeflow Pipelines 2.17 install creates that stage1-pro changes: the namespace
#: (manifests/kustomize/cluster-scoped-resources/namespace.yaml), and pipeline-runner-sa.yaml,
#: pipeline-runner-role.yaml, pipeline-runner-rolebinding.yaml and kfp-launcher-configmap.yaml of
#: manifests/kustomize/base/pipeline/ (kubeflow/pipelines at tag 2.17.0).
KFP_OWNED = {
    ("Namespace", cluster.PIPELINE_NAMESPACE),
    ("ServiceAccount", cluster.PIPELINE_SERVICE_ACCOUNT),
    ("Role", "pipeline-runner"),
    ("RoleBinding", "pipeline-runner-binding"),
    ("ConfigMap", cluster.KFP_LAUNCHER_CONFIGMAP),
}

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
OWNED_CORE_KINDS = {"Namespace", "ResourceQuota", "LimitRange", "PriorityClass", "NetworkPolicy"}
CORE_KINDS = OWNED_CORE_KINDS | {kind for kind, _ in KFP_OWNED}

kubernetes_validate = pytest.importorskip("kubernetes_validate")
from kubernetes.utils import parse_quantity  # noqa: E402  (kfp's kubernetes client)

requires_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not on PATH: it renders the kustomize overlays (`kubectl kustomize`, no server needed)",
)


def kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False, timeout=120
    )


@functools.cache
def render_part(env: str, part: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize manifests/overlays/<env>/<part>`` renders."""
    proc = kustomize(MANIFESTS / "overlays" / env / part)
    assert proc.returncode == 0, f"kubectl kustomize overlays/{env}/{part} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(env: str) -> tuple[dict[str, Any], ...]:
    """Everything an environment applies: its owned objects and its patches to KFP's."""
    return render_part(env, OWNED) + render_part(env, PATCHES)


def settings_of(env: str) -> dict[str, str]:
    return yaml.safe_load((MANIFESTS / "overlays" / env / "settings" / "settings.yaml").read_text())["data"]


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
    owned, patches = render_part(env, OWNED), render_part(env, PATCHES)
    kinds = sorted(o["kind"] for o in owned)
    assert kinds == sorted([*OWNED_CORE_KINDS, "ContainerNodePool"]), kinds
    assert {(o["kind"], o["metadata"]["name"]) for o in patches} == KFP_OWNED
    names = {(o["kind"], o["metadata"]["name"]) for o in owned + patches}
    # settings.yaml is local-config: kustomize reads it, the cluster never sees it.
    assert ("ConfigMap", "stage1-pro-settings") not in names
    for obj in owned:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stage1-pro", obj["metadata"]["name"]
    # KFP's objects stay KFP's: no stage1-pro ownership label on them.
    for obj in patches:
        assert "app.kubernetes.io/part-of" not in obj["metadata"].get("labels", {}), obj["metadata"]["name"]


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_delete_k_of_the_owned_overlay_spares_kfps_objects(env: str) -> None:
    """``kubectl delete -k overlays/<env>/stage1-pro`` deletes exactly what it renders: none of KFP's."""
    owned = {(o["kind"], o["metadata"]["name"]) for o in render_part(env, OWNED)}
    assert not owned & KFP_OWNED, f"the owned overlay would delete KFP's {owned & KFP_OWNED}"
    # No namespace of KFP's (deleting a namespace deletes everything in it), only stage1-pro's own.
    namespaces = {name for kind, name in owned if kind == "Namespace"}
    assert namespaces == {"stage1-pro-infra"}
    # The old single-kustomization path no longer builds, so the old `delete -k` command is an error.
    old = kustomize(MANIFESTS / "overlays" / env)
    assert old.returncode != 0 and "unable to find one of 'kustomization.yaml'" in old.stderr


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
        o["metadata"]["name"]
        for o in render(env)
        if "stage1-pro.dev/requires" in o["metadata"].get("labels", {})
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
    settings = settings_of(env)
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["name"] == cluster.PIPELINE_SERVICE_ACCOUNT
    assert account["metadata"]["namespace"] == cluster.PIPELINE_NAMESPACE
    assert (
        account["metadata"]["annotations"][cluster.WORKLOAD_IDENTITY_ANNOTATION]
        == settings["runnerServiceAccount"]
    )
    launcher = one(objects, "ConfigMap", cluster.KFP_LAUNCHER_CONFIGMAP)
    assert launcher["metadata"]["namespace"] == cluster.PIPELINE_NAMESPACE
    assert launcher["data"][cluster.DEFAULT_PIPELINE_ROOT_KEY] == settings["pipelineRoot"]
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
    data = settings_of(env)
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


# ---- NetworkPolicy, evaluated by Kubernetes' peer rules --------------------------------------


@dataclass(frozen=True)
class Destination:
    """Where a pipeline pod connects to: a pod (namespace and labels) or an address outside."""

    namespace: str = ""
    namespace_labels: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] | None = None
    ip: str | None = None


def in_namespace(name: str, **labels: str) -> dict[str, str]:
    # Kubernetes sets kubernetes.io/metadata.name on every namespace (NamespaceDefaultLabelName).
    return {"kubernetes.io/metadata.name": name, **labels}


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics (apimachinery LabelSelectorAsSelector); {} matches everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def peer_matches(peer: dict[str, Any], policy_namespace: str, to: Destination) -> bool:
    """networking/v1 NetworkPolicyPeer (k8s.io/api networking/v1/types.go): a podSelector alone
    selects pods of the policy's own namespace; a namespaceSelector alone, every pod of the matching
    namespaces; both, the matching pods of the matching namespaces; an ipBlock, addresses."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        if to.ip is None:
            return False
        address = ipaddress.ip_address(to.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if to.pod_labels is None:
        return False
    if "namespaceSelector" in peer:
        namespace_ok = selector_matches(peer["namespaceSelector"], to.namespace_labels)
    else:
        namespace_ok = to.namespace == policy_namespace
    return namespace_ok and selector_matches(peer.get("podSelector") or {}, to.pod_labels)


def port_matches(ports: list[dict[str, Any]] | None, protocol: str, port: int) -> bool:
    """NetworkPolicyPort: no ports matches all; protocol defaults to TCP; endPort makes a range."""
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == protocol
        and (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
        for p in ports
    )


def egress_allowed(
    policy: dict[str, Any], policy_namespace: str, to: Destination, protocol: str, port: int
) -> bool:
    """Whether one egress rule of ``policy`` admits the connection (rules are OR-ed, NetworkPolicySpec)."""
    return any(
        (not rule.get("to") or any(peer_matches(p, policy_namespace, to) for p in rule["to"]))
        and port_matches(rule.get("ports"), protocol, port)
        for rule in policy["spec"].get("egress", [])
    )


#: KFP's control-plane pods and ports as pipeline pods reach them (labels of kubeflow/pipelines
#: 2.17.0 manifests: base/pipeline/ml-pipeline-apiserver-deployment.yaml, base/metadata/base/
#: metadata-grpc-deployment.yaml, third-party/seaweedfs and third-party/minio), and the rest of
#: what a run needs: kube-dns, the GKE metadata server, Google APIs over HTTPS.
KFP_NAMESPACE = in_namespace(cluster.KFP_SYSTEM_NAMESPACE)
NEEDED = {
    "ml-pipeline gRPC": (Destination("kubeflow", KFP_NAMESPACE, {"app": "ml-pipeline"}), "TCP", 8887),
    "ml-pipeline HTTP": (Destination("kubeflow", KFP_NAMESPACE, {"app": "ml-pipeline"}), "TCP", 8888),
    "metadata-grpc": (
        Destination("kubeflow", KFP_NAMESPACE, {"component": "metadata-grpc-server"}),
        "TCP",
        8080,
    ),
    "seaweedfs": (Destination("kubeflow", KFP_NAMESPACE, {"app": "seaweedfs"}), "TCP", 8333),
    "minio": (Destination("kubeflow", KFP_NAMESPACE, {"app": "minio"}), "TCP", 9000),
    "kube-dns": (
        Destination("kube-system", in_namespace("kube-system"), {"k8s-app": "kube-dns"}),
        "UDP",
        53,
    ),
    "metadata server": (Destination(ip="169.254.169.254"), "TCP", 80),
    "storage.googleapis.com": (Destination(ip="142.250.1.207"), "TCP", 443),
}
NOT_NEEDED = {
    "KFP's database": (Destination("kubeflow", KFP_NAMESPACE, {"app": "mysql"}), "TCP", 3306),
    "ml-pipeline on another port": (
        Destination("kubeflow", KFP_NAMESPACE, {"app": "ml-pipeline"}),
        "TCP",
        22,
    ),
    "another team's pod": (Destination("team-b", in_namespace("team-b"), {"app": "web"}), "TCP", 8080),
    "ssh to the internet": (Destination(ip="203.0.113.7"), "TCP", 22),
}
#: Where pipeline pods run: KFP standalone's namespace, and a multi-user Kubeflow profile namespace.
PIPELINE_NAMESPACES = (cluster.PIPELINE_NAMESPACE, "team-a")


def test_network_policy_evaluator_follows_kubernetes_rules() -> None:
    policy = {"spec": {"egress": [{"to": [{"podSelector": {}}]}]}}
    same = Destination("ns-a", in_namespace("ns-a"), {"app": "x"})
    other = Destination("ns-b", in_namespace("ns-b"), {"app": "x"})
    assert egress_allowed(policy, "ns-a", same, "TCP", 1)
    assert not egress_allowed(policy, "ns-a", other, "TCP", 1), "a bare podSelector is namespace-local"
    assert not egress_allowed(policy, "ns-a", Destination(ip="10.0.0.1"), "TCP", 1)
    both = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-b"}}, "podSelector": {}}
    assert peer_matches(both, "ns-a", other) and not peer_matches(both, "ns-a", same)
    assert not port_matches([{"port": 53, "protocol": "UDP"}], "TCP", 53)
    assert port_matches([{"port": 8000, "endPort": 8100}], "TCP", 8080)
    assert not selector_matches({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {})
    assert peer_matches(
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}, "n", Destination(ip="1.1.1.1")
    )
    assert not peer_matches(
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}, "n", Destination(ip="10.1.1.1")
    )


@requires_kubectl
@pytest.mark.parametrize("namespace", PIPELINE_NAMESPACES)
def test_network_policy_lets_pipeline_pods_reach_kfp_and_nothing_else(namespace: str) -> None:
    """Standalone (pods in ``kubeflow``) and multi-user (pods in a profile namespace) alike."""
    policy = one(render("prod"), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchExpressions"] == [
        {"key": "workflows.argoproj.io/workflow", "operator": "Exists"}
    ]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert spec["ingress"] == []
    blocked = [
        name
        for name, (to, proto, port) in NEEDED.items()
        if not egress_allowed(policy, namespace, to, proto, port)
    ]
    assert blocked == [], f"pipeline pods in {namespace} cannot reach {blocked}"
    opened = [
        name
        for name, (to, proto, port) in NOT_NEEDED.items()
        if egress_allowed(policy, namespace, to, proto, port)
    ]
    assert opened == [], f"pipeline pods in {namespace} may reach {opened}"
    assert egress_allowed(policy, namespace, Destination(ip="169.254.169.252"), "TCP", 988)  # GKE WI


@requires_kubectl
def test_a_namespace_local_rule_blocks_kfp_from_a_profile_namespace() -> None:
    """Today's defect, caught: the old same-namespace rule works standalone but not multi-user."""
    policy = copy.deepcopy(one(render("prod"), "NetworkPolicy"))
    egress = policy["spec"]["egress"]
    policy["spec"]["egress"] = [
        r for r in egress if not any("namespaceSelector" in p and "kube-dns" not in str(p) for p in r["to"])
    ] + [{"to": [{"podSelector": {}}]}]
    to, proto, port = NEEDED["ml-pipeline gRPC"]
    assert egress_allowed(policy, cluster.PIPELINE_NAMESPACE, to, proto, port)
    assert not egress_allowed(policy, "team-a", to, proto, port)


# ---- Argo workflow defaults: merge, never replace ---------------------------------------------

MERGE_SCRIPT = MANIFESTS / "merge_workflow_defaults.py"
#: KFP 2.17.0's workflow-controller-configmap as `kubectl get -o yaml` returns it.
WORKFLOW_CONFIGMAP = ROOT / "tests" / "data" / "kfp" / "workflow-controller-configmap-2.17.0.yaml"


def merge_script(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MERGE_SCRIPT), *args], input=stdin, capture_output=True, text=True, check=False
    )


def documented_merge() -> str:
    """The ``--merge`` fragment of the PriorityClass command in manifests/README.md."""
    match = re.search(
        r"merge_workflow_defaults\.py[^\n]*\n?\s*--merge '([^']+)'", (MANIFESTS / "README.md").read_text()
    )
    assert match, "manifests/README.md has no merge_workflow_defaults.py --merge '...' command"
    return match.group(1)


def workflow_defaults(configmap: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(configmap["data"]["workflowDefaults"])


def test_a_merge_patch_of_workflow_defaults_wipes_kfps_defaults() -> None:
    """Why a filter: ``kubectl patch --type merge`` (RFC 7386) replaces the one string value whole."""
    live = yaml.safe_load(WORKFLOW_CONFIGMAP.read_text())
    patched = copy.deepcopy(live)
    patched["data"]["workflowDefaults"] = "spec:\n  podPriorityClassName: stage1-pro-training\n"
    assert "ttlStrategy" in workflow_defaults(live)["spec"]
    assert "ttlStrategy" not in workflow_defaults(patched)["spec"]


def test_documented_priority_class_command_merges_into_kfps_defaults() -> None:
    live_text = WORKFLOW_CONFIGMAP.read_text()
    live = yaml.safe_load(live_text)
    proc = merge_script(live_text, "--merge", documented_merge())
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)
    spec = workflow_defaults(merged)["spec"]
    assert spec["podPriorityClassName"] == cluster.TRAINING_PRIORITY_CLASS
    before = workflow_defaults(live)["spec"]
    assert spec["ttlStrategy"] == before["ttlStrategy"]
    assert spec["templateDefaults"] == before["templateDefaults"]
    # Everything else is untouched, and resourceVersion stays for `kubectl replace`'s conflict check.
    for key, value in live["data"].items():
        if key != "workflowDefaults":
            assert merged["data"][key] == value, key
    assert merged["metadata"] == live["metadata"]
    assert 'spec.podPriorityClassName: null -> "stage1-pro-training"' in proc.stderr
    # Idempotent: a second run changes nothing and says so.
    again = merge_script(proc.stdout, "--merge", documented_merge())
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == merged
    assert "nothing to change" in again.stderr


def test_merge_keeps_sibling_keys_of_a_nested_setting() -> None:
    proc = merge_script(
        WORKFLOW_CONFIGMAP.read_text(),
        "--merge",
        "spec: {templateDefaults: {retryStrategy: {retryPolicy: OnFailure}}}",
    )
    assert proc.returncode == 0, proc.stderr
    retry = workflow_defaults(yaml.safe_load(proc.stdout))["spec"]["templateDefaults"]["retryStrategy"]
    assert retry == {"limit": "2", "retryPolicy": "OnFailure"}
    assert 'retryStrategy.retryPolicy: "OnError" -> "OnFailure"' in proc.stderr


@pytest.mark.parametrize(
    ("stdin", "fragment", "message"),
    [
        ("", "spec: {}", "nothing on stdin"),
        ("kind: Pod\nmetadata: {name: p}\n", "spec: {}", "stdin is not a ConfigMap (kind: Pod)"),
        (
            "kind: ConfigMap\ndata: {workflowDefaults: '- a'}\n",
            "spec: {}",
            "data.workflowDefaults of the ConfigMap is not a YAML mapping",
        ),
        ("kind: ConfigMap\ndata: {}\n", "just-a-string", "--merge must be a YAML mapping"),
        ("kind: ConfigMap\ndata: {}\n", "spec: [", "--merge is not valid YAML"),
        ("{not yaml", "spec: {}", "stdin is not YAML or JSON"),
    ],
)
def test_merge_refuses_what_it_cannot_merge(stdin: str, fragment: str, message: str) -> None:
    proc = merge_script(stdin, "--merge", fragment)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == "", "nothing reaches `kubectl replace` on an error"


def test_merge_starts_workflow_defaults_when_there_are_none() -> None:
    proc = merge_script("kind: ConfigMap\nmetadata: {name: w}\n", "--merge", documented_merge())
    assert proc.returncode == 0, proc.stderr
    assert workflow_defaults(yaml.safe_load(proc.stdout)) == {
        "spec": {"podPriorityClassName": cluster.TRAINING_PRIORITY_CLASS}
    }


def test_documented_manifest_paths_exist_and_no_command_targets_a_whole_overlay() -> None:
    """Every manifests/overlays/... path the READMEs name exists; none applies or deletes both halves."""
    for readme in (ROOT / "README.md", MANIFESTS / "README.md"):
        text = readme.read_text()
        paths = set(re.findall(r"manifests/overlays/(?:dev|prod)(?:/[\w.-]+)*", text))
        assert paths, readme
        for path in paths:
            assert (ROOT / path).exists(), f"{readme.name} names {path}, which does not exist"
        bare = re.findall(r"kubectl \w+ -k manifests/overlays/(?:dev|prod)(?![\w/-])", text)
        assert bare == [], f"{readme.name}: {bare} would not build (the overlay has two halves)"
