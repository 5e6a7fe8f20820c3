"""Preflight of a live cluster before a run (``stage1-pro doctor``): what would stop the pipeline.

Each check reads the cluster with the official ``kubernetes`` client (your kubeconfig, or the
in-cluster service account), the Kubeflow Pipelines API with ``kfp.Client`` and the pipeline
root's bucket with google-cloud-storage, and returns a :class:`Check` whose failure names its fix:

- the KFP backend version against what the compiled package needs (:mod:`.backend_features`);
- the pipeline namespace; the runner ServiceAccount and its Workload Identity annotation;
- the ``kfp-launcher`` ConfigMap with a ``gs://`` default pipeline root;
- a GPU node (or a Config Connector node pool) with the accelerator label the train task selects,
  allocatable ``nvidia.com/gpu`` and only taints the train task tolerates;
- quota and LimitRange headroom for one run's largest pod (train);
- the pipeline root's bucket (and the runner's access to it).

An unreachable Kubernetes API raises :class:`ClusterUnreachableError` (one line, no traceback):
nothing else can be checked then. Values the cluster must agree on come from
:mod:`stage1_pro.cluster`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1_pro import cluster
from stage1_pro.errors import Stage1ProError
from stage1_pro.pipelines.backend_features import (
    CompiledPackage,
    format_version,
    parse_version,
    required_backend,
)

OK, WARN, FAIL = "ok", "warn", "FAIL"
#: Seconds to connect, and to read an answer, for every request to the cluster and to KFP.
REQUEST_TIMEOUT = (5, 30)
#: ConfigMap of a KFP install that records its version (manifests/kustomize/base/installs/generic).
KFP_INSTALL_CONFIGMAP = "pipeline-install-config"
KFP_API_DEPLOYMENT = "ml-pipeline"
#: Roles that let the runner read and write the pipeline root's objects.
BUCKET_WRITER_ROLES = frozenset(
    {"roles/storage.objectUser", "roles/storage.objectAdmin", "roles/storage.admin"}
)
_GSA = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9.:]{4,60}\.iam\.gserviceaccount\.com$")
_PLACEHOLDER_PROJECT = "your-project-id"
_CNRM = ("container.cnrm.cloud.google.com", "v1beta1", "containernodepools")
_KCC_EFFECTS = {
    "NO_SCHEDULE": "NoSchedule",
    "PREFER_NO_SCHEDULE": "PreferNoSchedule",
    "NO_EXECUTE": "NoExecute",
}


class ClusterUnreachableError(Stage1ProError):
    """No Kubernetes credentials, or the API server does not answer: no check can run."""


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Target:
    """What the checks compare the cluster with: where runs go and what one run asks for."""

    namespace: str = cluster.PIPELINE_NAMESPACE
    service_account: str = cluster.PIPELINE_SERVICE_ACCOUNT
    gpu_node_selector: dict[str, str] = field(
        default_factory=lambda: {cluster.ACCELERATOR_LABEL: cluster.DEFAULT_ACCELERATOR}
    )
    gpu_count: int = cluster.DEFAULT_GPU_COUNT
    train_cpu: str = "6"
    train_memory: str = "16Gi"
    #: Further gs:// URIs the run reads or writes (data_uri, publish_prefix): their buckets are checked.
    uris: tuple[str, ...] = ()


# ---- connecting --------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A Kubernetes API client and where it points."""

    api: Any
    host: str
    context: str

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Cluster:
        """Load credentials (kubeconfig, else in-cluster) and make sure the API server answers.

        Raises:
            ClusterUnreachableError: no credentials, or the API server does not answer.
        """
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            if kubeconfig or os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists():
                config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=configuration
                )
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                name = context or (active or {}).get("name", "")
            else:
                config.load_incluster_config(client_configuration=configuration)
                name = "in-cluster"
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise ClusterUnreachableError(
                f"no Kubernetes credentials ({_first_line(exc)}); get them with 'gcloud container clusters "
                "get-credentials CLUSTER --location REGION', or pass --kubeconfig / --context"
            ) from None
        # No silent retries (urllib3 would log a warning for each): a preflight reports at once.
        configuration.retries = 0
        found = cls(client.ApiClient(configuration), configuration.host, name)
        found.probe()
        return found

    def probe(self) -> None:
        """Ask the API server its version: the one request that tells 'unreachable' from 'broken'."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            client.VersionApi(self.api).get_code(_request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status in (401, 403):
                raise ClusterUnreachableError(
                    f"the Kubernetes API server at {self.host} refused the credentials of context "
                    f"{self.context!r} (HTTP {exc.status}); refresh them with 'gcloud container clusters "
                    "get-credentials CLUSTER --location REGION'"
                ) from None
            raise ClusterUnreachableError(
                f"the Kubernetes API server at {self.host} answered HTTP {exc.status} to /version"
            ) from None
        except Exception as exc:  # urllib3 MaxRetryError, SSL errors, timeouts
            raise ClusterUnreachableError(
                f"cannot reach the Kubernetes API server at {self.host} (context {self.context!r}): "
                f"{_connection_reason(exc)}; check 'kubectl cluster-info' and your kubeconfig"
            ) from None

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def get(self, read: Callable[..., Any], *args: Any) -> Any:
        """``read(*args)`` or None when it does not exist (404); other errors raise ``ApiException``."""
        from kubernetes.client.exceptions import ApiException

        try:
            return read(*args, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


# ---- the checks --------------------------------------------------------------------------------


def run_checks(
    k8s: Cluster,
    package: CompiledPackage,
    target: Target,
    kfp_client: Any | None = None,
    kfp_error: str | None = None,
) -> list[Check]:
    """Every check, in the order a user fixes them. Errors of one check fail that check only."""
    checks: list[Check] = []
    launcher_root: list[str] = []
    runner: list[str] = []
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("KFP backend version", lambda: check_backend_version(k8s, package, kfp_client, kfp_error)),
        ("pipeline namespace", lambda: check_namespace(k8s, target)),
        ("runner ServiceAccount", lambda: check_service_account(k8s, target, runner)),
        ("kfp-launcher pipeline root", lambda: check_launcher(k8s, target, launcher_root)),
        ("GPU node pool", lambda: check_gpu_nodes(k8s, target)),
        ("quota for one run", lambda: check_quota(k8s, target)),
        ("buckets", lambda: check_buckets([*launcher_root, *target.uris], runner)),
    ]
    for name, step in steps:
        try:
            checks.append(step())
        except Exception as exc:
            checks.append(_api_failure(name, exc, target))
    return checks


def check_backend_version(
    k8s: Cluster, package: CompiledPackage, kfp_client: Any | None, kfp_error: str | None
) -> Check:
    """The server's KFP version is at least what every feature of the compiled package needs."""
    name = "KFP backend version"
    need = required_backend(package)
    needed = format_version(need.min_version)
    version_text, source = backend_version(k8s, kfp_client)
    version = parse_version(version_text)
    reasons = "; ".join(need.reasons()[:3]) or "the baseline"
    if version is None:
        why = f"{kfp_error}; " if kfp_error else ""
        return Check(
            name,
            FAIL if kfp_error else WARN,
            f"{why}could not read the backend version ({source}); the pipeline needs >= {needed}",
            "pass --host (or set KFP_HOST) to the KFP API, e.g. after 'kubectl -n kubeflow port-forward "
            "svc/ml-pipeline-ui 8080:80': --host http://localhost:8080",
        )
    if version < need.min_version:
        return Check(
            name,
            FAIL,
            f"{version_text} ({source}) is older than the {needed} the pipeline needs: "
            + "; ".join(need.reasons(below=version)),
            f"upgrade Kubeflow Pipelines to >= {needed} (README 'Running on a GKE cluster', step 4)",
        )
    detail = f"{version_text} ({source}) >= {needed} ({reasons})"
    if kfp_error:
        return Check(name, FAIL, f"{detail}, but {kfp_error}", "check --host / KFP_HOST and --token")
    return Check(name, OK, detail)


def backend_version(k8s: Cluster, kfp_client: Any | None) -> tuple[str | None, str]:
    """(version tag, where it was read): KFP's healthz, else its install ConfigMap, else its image tag.

    ``kfp.Client.get_kfp_healthz()`` drops the version fields (its model has only multi_user and
    pipeline_store), so healthz is read raw: the API server answers ``tag_name`` (apiserver
    main.go), the UI proxy ``apiServerTagName`` (frontend server handlers/healthz.ts).
    """
    if kfp_client is not None:
        try:
            raw = kfp_client.healthzs.healthz_service_get_healthz(
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
            body = json.loads(raw.data or b"{}")
            for key in ("tag_name", "apiServerTagName", "frontendTagName"):
                if parse_version(body.get(key)):
                    return body[key], f"healthz {key}"
        except Exception:  # fall back to what the cluster says
            pass
    core = k8s.core()
    install = k8s.get(core.read_namespaced_config_map, KFP_INSTALL_CONFIGMAP, cluster.KFP_SYSTEM_NAMESPACE)
    app_version = ((install.data or {}) if install is not None else {}).get("appVersion")
    if parse_version(app_version):
        return app_version, f"{cluster.KFP_SYSTEM_NAMESPACE}/{KFP_INSTALL_CONFIGMAP} appVersion"
    from kubernetes import client

    deployment = k8s.get(
        client.AppsV1Api(k8s.api).read_namespaced_deployment, KFP_API_DEPLOYMENT, cluster.KFP_SYSTEM_NAMESPACE
    )
    if deployment is not None:
        for container in deployment.spec.template.spec.containers:
            tag = container.image.rpartition(":")[2]
            if parse_version(tag):
                return tag, f"deployment {KFP_API_DEPLOYMENT} image"
    return None, "no healthz, appVersion or image tag"


def check_namespace(k8s: Cluster, target: Target) -> Check:
    name = "pipeline namespace"
    namespace = k8s.get(k8s.core().read_namespace, target.namespace)
    if namespace is None:
        return Check(
            name,
            FAIL,
            f"namespace {target.namespace} does not exist",
            "install Kubeflow Pipelines first (README 'Running on a GKE cluster', step 4), or pass "
            "--namespace with your profile namespace (multi-user Kubeflow)",
        )
    labels = namespace.metadata.labels or {}
    if target.namespace != cluster.KFP_SYSTEM_NAMESPACE and labels.get("app.kubernetes.io/part-of") != (
        "kubeflow-profile"
    ):
        return Check(
            name,
            WARN,
            f"{target.namespace} is not labelled app.kubernetes.io/part-of=kubeflow-profile: Kubeflow's "
            "NetworkPolicies admit pipeline pods from profile namespaces only",
            f"kubectl label namespace {target.namespace} app.kubernetes.io/part-of=kubeflow-profile",
        )
    return Check(name, OK, f"{target.namespace} exists")


def check_service_account(k8s: Cluster, target: Target, runner: list[str]) -> Check:
    """The runner account exists and is bound to a Google service account (Workload Identity)."""
    name = "runner ServiceAccount"
    where = f"{target.namespace}/{target.service_account}"
    account = k8s.get(k8s.core().read_namespaced_service_account, target.service_account, target.namespace)
    annotate = (
        "set runnerServiceAccount in manifests/overlays/<env>/settings/settings.yaml and "
        "'kubectl apply -k manifests/overlays/<env>/kfp-patches' (or: kubectl -n "
        f"{target.namespace} annotate serviceaccount {target.service_account} "
        f"{cluster.WORKLOAD_IDENTITY_ANNOTATION}=GSA@PROJECT.iam.gserviceaccount.com)"
    )
    if account is None:
        return Check(name, FAIL, f"{where} does not exist", "install Kubeflow Pipelines; then " + annotate)
    email = (account.metadata.annotations or {}).get(cluster.WORKLOAD_IDENTITY_ANNOTATION, "")
    if not email:
        return Check(
            name,
            FAIL,
            f"{where} has no {cluster.WORKLOAD_IDENTITY_ANNOTATION} annotation: pods get no Google "
            "credentials, so gs:// reads and writes fail",
            annotate,
        )
    if not _GSA.match(email) or _PLACEHOLDER_PROJECT in email:
        return Check(name, FAIL, f"{where} is annotated with {email!r}, not a real service account", annotate)
    runner.append(email)
    return Check(name, OK, f"{where} acts as {email} (Workload Identity)")


def check_launcher(k8s: Cluster, target: Target, roots: list[str]) -> Check:
    """``kfp-launcher`` has a gs:// ``defaultPipelineRoot`` (else artifacts go to KFP's in-cluster store)."""
    name = "kfp-launcher pipeline root"
    fix = (
        "set pipelineRoot in manifests/overlays/<env>/settings/settings.yaml and "
        "'kubectl apply -k manifests/overlays/<env>/kfp-patches'"
    )
    configmap = k8s.get(
        k8s.core().read_namespaced_config_map, cluster.KFP_LAUNCHER_CONFIGMAP, target.namespace
    )
    where = f"{target.namespace}/{cluster.KFP_LAUNCHER_CONFIGMAP}"
    if configmap is None:
        return Check(name, FAIL, f"ConfigMap {where} does not exist (runs would use minio://)", fix)
    root = (configmap.data or {}).get(cluster.DEFAULT_PIPELINE_ROOT_KEY, "")
    bucket = root[len("gs://") :].split("/", 1)[0] if root.startswith("gs://") else ""
    if not bucket:
        shown = repr(root) if root else "not set"
        return Check(
            name, FAIL, f"{where} {cluster.DEFAULT_PIPELINE_ROOT_KEY} is {shown}, not gs://BUCKET/…", fix
        )
    if _PLACEHOLDER_PROJECT in root:
        return Check(
            name, FAIL, f"{where} {cluster.DEFAULT_PIPELINE_ROOT_KEY} is still the placeholder {root}", fix
        )
    roots.append(root)
    return Check(name, OK, f"{cluster.DEFAULT_PIPELINE_ROOT_KEY} {root}")


def check_gpu_nodes(k8s: Cluster, target: Target) -> Check:
    """A node the train pod can land on: selected by its node selector, tolerated, with free GPUs."""
    name = "GPU node pool"
    selector = ",".join(f"{k}={v}" for k, v in target.gpu_node_selector.items())
    nodes = k8s.core().list_node(label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items
    if not nodes:
        return _gpu_node_pool_without_nodes(k8s, target, selector)
    problems: list[str] = []
    fixes: dict[str, None] = {}  # ordered set
    for node in nodes:
        node_name = node.metadata.name
        gpus = int(_quantity((node.status.allocatable or {}).get(cluster.GPU_RESOURCE, "0")))
        taints = [{"key": t.key, "value": t.value or "", "effect": t.effect} for t in node.spec.taints or []]
        untolerated = [t for t in taints if not tolerates(cluster.GPU_TOLERATION, t)]
        if node.spec.unschedulable:
            problems.append(f"{node_name} is cordoned")
            fixes[f"kubectl uncordon {node_name} (or let the autoscaler add a node)"] = None
        elif untolerated:
            problems.append(
                f"{node_name} has taints the train task does not tolerate: {_taints(untolerated)}"
            )
            fixes[
                f"give the pool only the taint {cluster.GPU_TOLERATION_KEY}={cluster.GPU_TAINT_VALUE}:"
                f"{cluster.GPU_TAINT_EFFECT} (manifests/gke/gpu-nodepool.yaml)"
            ] = None
        elif gpus < target.gpu_count:
            problems.append(
                f"{node_name} has {gpus} allocatable {cluster.GPU_RESOURCE}, "
                f"the run asks for {target.gpu_count}"
            )
            if gpus == 0:
                fixes[
                    "the GPU driver or device plugin is not ready: kubectl -n kube-system get pods -l "
                    "k8s-app=nvidia-gpu-device-plugin, and the pool's gpu-driver-version (R580+ for CUDA 13)"
                ] = None
            else:
                fixes[f"-p gpu_count={gpus}, or a pool with {target.gpu_count} GPUs per node"] = None
        else:
            gpu_taint = any(t["key"] == cluster.GPU_TOLERATION_KEY for t in taints)
            if gpu_taint:
                return Check(name, OK, f"{node_name} ({selector}): {gpus} {cluster.GPU_RESOURCE}")
            return Check(
                name,
                WARN,
                f"{node_name} ({selector}): {gpus} {cluster.GPU_RESOURCE}; no {cluster.GPU_TOLERATION_KEY} "
                "taint, so CPU pods may land on (and keep alive) the GPU node",
                f"taint the pool {cluster.GPU_TOLERATION_KEY}={cluster.GPU_TAINT_VALUE}:"
                f"{cluster.GPU_TAINT_EFFECT}",
            )
    return Check(
        name,
        FAIL,
        f"no node with {selector} can take the train pod: " + "; ".join(problems),
        "; ".join(fixes),
    )


def _gpu_node_pool_without_nodes(k8s: Cluster, target: Target, selector: str) -> Check:
    """No GPU node now (a pool scaled to zero has none): look for a Config Connector node pool."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = "GPU node pool"
    accelerator = target.gpu_node_selector.get(cluster.ACCELERATOR_LABEL, "")
    try:
        pools = client.CustomObjectsApi(k8s.api).list_cluster_custom_object(
            *_CNRM, _request_timeout=REQUEST_TIMEOUT
        )["items"]
    except ApiException as exc:
        if exc.status not in (403, 404):
            raise
        pools = []  # no Config Connector, or not allowed to read it
    for pool in pools:
        spec = pool.get("spec", {})
        node = spec.get("nodeConfig", {})
        types = {a.get("type"): a.get("count", 0) for a in node.get("guestAccelerator", [])}
        if accelerator not in types:
            continue
        pool_name = pool["metadata"]["name"]
        taints = [
            {**t, "effect": _KCC_EFFECTS.get(t.get("effect"), t.get("effect"))} for t in node.get("taint", [])
        ]
        untolerated = [t for t in taints if not tolerates(cluster.GPU_TOLERATION, t)]
        max_nodes = spec.get("autoscaling", {}).get("maxNodeCount", 0)
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in pool.get("status", {}).get("conditions", [])
        )
        if untolerated or types[accelerator] < target.gpu_count or max_nodes < 1 or not ready:
            why = [
                *(
                    [f"taints the train task does not tolerate: {_taints(untolerated)}"]
                    if untolerated
                    else []
                ),
                *(
                    [f"{types[accelerator]} GPU per node, the run asks for {target.gpu_count}"]
                    if types[accelerator] < target.gpu_count
                    else []
                ),
                *(["autoscaling.maxNodeCount is 0"] if max_nodes < 1 else []),
                *(["not Ready (kubectl -n NAMESPACE describe containernodepool)"] if not ready else []),
            ]
            return Check(
                name,
                FAIL,
                f"ContainerNodePool {pool_name}: " + "; ".join(why),
                "fix manifests/gke/gpu-nodepool.yaml and "
                "'kubectl apply -k manifests/overlays/<env>/stage1-pro'",
            )
        return Check(
            name,
            OK,
            f"no {selector} node now; ContainerNodePool {pool_name} (Ready) scales up to {max_nodes}",
        )
    return Check(
        name,
        WARN,
        f"no node carries {selector} now, and no Config Connector node pool declares {accelerator}",
        "if a pool scales from zero, check it: gcloud container node-pools list --cluster CLUSTER "
        "--location REGION; else create it (manifests/README.md §3) or pass -p gpu_type=<its accelerator>",
    )


def check_quota(k8s: Cluster, target: Target) -> Check:
    """The namespace's quotas have room for one run's largest pod, and its LimitRange admits it."""
    name = "quota for one run"
    core = k8s.core()
    need = {
        f"requests.{cluster.GPU_RESOURCE}": float(target.gpu_count),
        "requests.cpu": _quantity(target.train_cpu),
        "cpu": _quantity(target.train_cpu),
        "limits.cpu": _quantity(target.train_cpu),
        "requests.memory": _quantity(target.train_memory),
        "memory": _quantity(target.train_memory),
        "limits.memory": _quantity(target.train_memory),
    }
    short: list[str] = []
    room: list[str] = []
    for quota in core.list_namespaced_resource_quota(
        target.namespace, _request_timeout=REQUEST_TIMEOUT
    ).items:
        hard = (quota.status.hard if quota.status else None) or quota.spec.hard or {}
        used = (quota.status.used if quota.status else None) or {}
        for resource, amount in need.items():
            if resource not in hard:
                continue
            free = _quantity(hard[resource]) - _quantity(used.get(resource, "0"))
            line = f"{quota.metadata.name} {resource}: {_fmt(free)} free of {hard[resource]}"
            (short if free < amount else room).append(
                f"{line}, train needs {_fmt(amount)}" if free < amount else line
            )
    for limit_range in core.list_namespaced_limit_range(
        target.namespace, _request_timeout=REQUEST_TIMEOUT
    ).items:
        for item in limit_range.spec.limits or []:
            maximum = item.max or {}
            if item.type != "Container":
                continue
            for resource, amount in (("cpu", need["cpu"]), ("memory", need["memory"])):
                if resource in maximum and _quantity(maximum[resource]) < amount:
                    short.append(
                        f"LimitRange {limit_range.metadata.name} caps a container at {resource} "
                        f"{maximum[resource]}, train needs {_fmt(amount)}"
                    )
    if short:
        return Check(
            name,
            FAIL,
            "; ".join(short),
            f"wait for running pods to finish (kubectl -n {target.namespace} describe resourcequota), or "
            "raise the quota in manifests/overlays/<env>/stage1-pro/kustomization.yaml and apply it",
        )
    detail = f"train ({target.gpu_count} GPU, {target.train_cpu} CPU, {target.train_memory}) fits"
    return Check(name, OK, detail + (f": {room[0]}" if room else " (no ResourceQuota)"))


def check_buckets(uris: Iterable[str], runners: list[str]) -> Check:
    """Each gs:// bucket a run uses exists and is readable; the runner is granted on the root's bucket."""
    name = "buckets"
    buckets = list(dict.fromkeys(u[len("gs://") :].split("/", 1)[0] for u in uris if u.startswith("gs://")))
    if not buckets:
        return Check(name, WARN, "no gs:// pipeline root or URI to check", "fix the kfp-launcher check first")
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError

    from stage1_pro.storage import gcs_client

    try:
        client = gcs_client()
    except DefaultCredentialsError:
        return Check(
            name,
            FAIL,
            "no Google credentials to check the buckets with",
            "gcloud auth application-default login",
        )
    found, notes = [], []
    for bucket_name in buckets:
        try:
            bucket = client.get_bucket(bucket_name, timeout=REQUEST_TIMEOUT)
        except gexc.NotFound:
            return Check(
                name,
                FAIL,
                f"gs://{bucket_name} does not exist",
                f"gcloud storage buckets create gs://{bucket_name} --location REGION "
                "--uniform-bucket-level-access",
            )
        except gexc.Forbidden:
            return Check(
                name,
                FAIL,
                f"gs://{bucket_name}: your account may not read it (HTTP 403)",
                f"grant yourself roles/storage.objectViewer on gs://{bucket_name}, or run the check "
                "from an account that has it",
            )
        found.append(f"gs://{bucket.name}")
        if runners and bucket_name == buckets[0]:
            notes.append(_runner_access(bucket, runners[0]))
    status = WARN if any(n.startswith("!") for n in notes) else OK
    detail = ", ".join(found) + " reachable" + "".join(f"; {n.lstrip('!')}" for n in notes)
    fix = (
        f"gcloud storage buckets add-iam-policy-binding gs://{buckets[0]} --role roles/storage.objectUser "
        f"--member serviceAccount:{runners[0]} (not needed if granted at project level)"
        if status == WARN
        else ""
    )
    return Check(name, status, detail, fix)


def _runner_access(bucket: Any, runner: str) -> str:
    """How the runner is granted on ``bucket`` (a leading ``!`` marks a warning)."""
    from google.api_core import exceptions as gexc

    try:
        policy = bucket.get_iam_policy(requested_policy_version=3, timeout=REQUEST_TIMEOUT)
    except gexc.GoogleAPICallError:
        return "its IAM policy is not readable with your account (runner access not checked)"
    member = f"serviceAccount:{runner}"
    roles = sorted(b["role"] for b in policy.bindings if member in b.get("members", ()))
    if set(roles) & BUCKET_WRITER_ROLES:
        return f"{runner} has {', '.join(sorted(set(roles) & BUCKET_WRITER_ROLES))}"
    return f"!{runner} has no object read/write role on the bucket"


# ---- helpers -----------------------------------------------------------------------------------


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' toleration-matches-taint rule (core/v1 Toleration.ToleratesTaint)."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint.get("key")
    return toleration.get("key") == taint.get("key") and toleration.get("value", "") == (
        taint.get("value") or ""
    )


def _taints(taints: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['key']}={t.get('value') or ''}:{t['effect']}" for t in taints)


def _quantity(text: str) -> float:
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(text)))


def _fmt(amount: float) -> str:
    if amount >= 2**30 and amount % 2**30 == 0:
        return f"{int(amount // 2**30)}Gi"
    return f"{amount:g}"


def _api_failure(name: str, exc: Exception, target: Target) -> Check:
    """A check the cluster would not answer: what was refused, and the permission that would fix it."""
    status = getattr(exc, "status", None)
    if status == 403:
        return Check(
            name,
            FAIL,
            f"forbidden (HTTP 403): {_first_line(getattr(exc, 'reason', '') or exc)}",
            f"ask for read access (get/list) to namespaces, nodes, and ServiceAccounts, ConfigMaps, "
            f"ResourceQuotas and LimitRanges in {target.namespace}",
        )
    return Check(
        name, FAIL, f"could not check: {_connection_reason(exc)}", "run stage1-pro doctor -v for details"
    )


def _connection_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    for known in (
        "Connection refused",
        "timed out",
        "Name or service not known",
        "certificate verify failed",
    ):
        if known.lower() in text.lower():
            return known.lower()
    return _first_line(text)


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0][:200] if text else type(value).__name__


def report(checks: list[Check]) -> str:
    """The table: one line per check, each failing or warning line followed by its fix."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"  {check.status:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"  {'':<4}  {'':<{width}}  fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    if failed:
        lines.append(
            f"{failed} check(s) failed, {warned} warning(s): fix them and run stage1-pro doctor again"
        )
    else:
        lines.append(f"all checks passed ({warned} warning(s)): ready to run")
    return "\n".join(lines)
