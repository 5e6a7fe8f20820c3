"""``stage1-pro doctor`` against loopback servers, and the backend-version table it applies.

Three servers on 127.0.0.1 stand in for what doctor talks to on a real GKE cluster:

- the **Kubernetes API server** (read through the official ``kubernetes`` client and a kubeconfig
  pointing at it): ``/version``, namespaces, service accounts, config maps, nodes, resource quotas,
  limit ranges, deployments, and Config Connector's ``containernodepools`` (core/v1, apps/v1 and
  CRD list shapes, 404 as a ``Status`` object);
- the **KFP API server** (``kfp.Client``): ``/apis/v2beta1/healthz`` with the fields the 2.17 API
  server writes (backend/src/apiserver/main.go: ``tag_name``, ``commit_sha``, ``multi_user``,
  ``pipeline_store``);
- **Cloud Storage** (google-cloud-storage via ``STORAGE_EMULATOR_HOST``): bucket metadata and IAM
  policy (``/storage/v1/b/{bucket}`` and ``/iam``).

A healthy cluster passes every check; a broken one fails each with its fix; with nothing listening,
doctor prints one line and exits 2.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from http_helpers import send_json

from stage1_pro import cluster
from stage1_pro.cli import main
from stage1_pro.pipelines import backend_features as bf

RUNNER = "stage1-pro-runner@my-project.iam.gserviceaccount.com"
BUCKET = "my-project-stage1-pro"
Handler = Callable[[str, str, dict[str, str]], tuple[int, Any]]


class Loopback:
    """An HTTP server on 127.0.0.1 answering JSON from ``handle(method, path, query)``."""

    def __init__(self, handle: Handler) -> None:
        self.requests: list[str] = []

        class Serve(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                outer.requests.append(url.path)
                status, payload = handle(
                    self.command, unquote(url.path), {k: v[0] for k, v in parse_qs(url.query).items()}
                )
                send_json(self, status, payload)

            def log_message(self, *args: Any) -> None:
                pass

        outer = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def not_found(what: str) -> tuple[int, dict[str, Any]]:
    return 404, {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": f"{what} not found",
        "reason": "NotFound",
        "code": 404,
    }


def item_list(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}


class FakeKubernetes:
    """The objects of one cluster, served in the Kubernetes REST shapes."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects

    def handle(self, method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        assert method == "GET", "doctor only reads"
        o = self.objects
        if path.rstrip("/") == "/version":
            return 200, {
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.2-gke.1",
                "gitCommit": "abc",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api/v1/nodes":
            wanted = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
            nodes = [n for n in o["nodes"] if wanted.items() <= n["metadata"].get("labels", {}).items()]
            return 200, item_list("NodeList", nodes)
        if path == "/apis/container.cnrm.cloud.google.com/v1beta1/containernodepools":
            if o.get("nodepools") is None:
                return not_found("the server could not find the requested resource")
            return 200, {
                "apiVersion": "container.cnrm.cloud.google.com/v1beta1",
                "kind": "ContainerNodePoolList",
                "metadata": {},
                "items": o["nodepools"],
            }
        match = re.fullmatch(r"/api/v1/namespaces/([^/]+)(?:/(\w+)(?:/([^/]+))?)?", path)
        if match:
            namespace, kind, name = match.groups()
            if kind is None:
                found = o["namespaces"].get(namespace)
                return (200, found) if found else not_found(f'namespaces "{namespace}"')
            if name is None:  # a list
                return 200, item_list(
                    kind,
                    o["lists"].get((namespace, kind), []),
                )
            found = o[kind].get((namespace, name))
            return (200, found) if found else not_found(f'{kind} "{name}"')
        match = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)", path)
        if match:
            return not_found(f'deployments.apps "{match.group(2)}"')
        return not_found(path)


def meta(name: str, namespace: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, **({"namespace": namespace} if namespace else {}), **extra}


def healthy_cluster() -> dict[str, Any]:
    ns = cluster.PIPELINE_NAMESPACE
    return {
        "namespaces": {
            ns: {"kind": "Namespace", "metadata": meta(ns, labels={"kubernetes.io/metadata.name": ns})}
        },
        "serviceaccounts": {
            (ns, cluster.PIPELINE_SERVICE_ACCOUNT): {
                "metadata": meta(
                    cluster.PIPELINE_SERVICE_ACCOUNT,
                    ns,
                    annotations={cluster.WORKLOAD_IDENTITY_ANNOTATION: RUNNER},
                ),
            }
        },
        "configmaps": {
            (ns, cluster.KFP_LAUNCHER_CONFIGMAP): {
                "metadata": meta(cluster.KFP_LAUNCHER_CONFIGMAP, ns),
                "data": {cluster.DEFAULT_PIPELINE_ROOT_KEY: f"gs://{BUCKET}/pipeline-root"},
            },
            (cluster.KFP_SYSTEM_NAMESPACE, "pipeline-install-config"): {
                "metadata": meta("pipeline-install-config", cluster.KFP_SYSTEM_NAMESPACE),
                "data": {"appVersion": "2.17.0"},
            },
        },
        "nodes": [
            {
                "metadata": meta(
                    "gke-stage1-pro-gpu-1", labels={cluster.ACCELERATOR_LABEL: cluster.DEFAULT_ACCELERATOR}
                ),
                "spec": {
                    "taints": [
                        {
                            "key": cluster.GPU_TOLERATION_KEY,
                            "value": cluster.GPU_TAINT_VALUE,
                            "effect": cluster.GPU_TAINT_EFFECT,
                        }
                    ]
                },
                "status": {"allocatable": {cluster.GPU_RESOURCE: "1", "cpu": "11", "memory": "160Gi"}},
            },
            {
                "metadata": meta("gke-default-1", labels={}),
                "spec": {},
                "status": {"allocatable": {"cpu": "7910m"}},
            },
        ],
        "nodepools": None,  # no Config Connector
        "lists": {
            (ns, "resourcequotas"): [
                {
                    "metadata": meta("stage1-pro-compute", ns),
                    "spec": {"hard": {f"requests.{cluster.GPU_RESOURCE}": "4", "requests.cpu": "64"}},
                    "status": {
                        "hard": {
                            f"requests.{cluster.GPU_RESOURCE}": "4",
                            "requests.cpu": "64",
                            "requests.memory": "512Gi",
                            "limits.memory": "1Ti",
                        },
                        "used": {
                            f"requests.{cluster.GPU_RESOURCE}": "1",
                            "requests.cpu": "8500m",
                            "requests.memory": "30Gi",
                            "limits.memory": "60Gi",
                        },
                    },
                }
            ],
            (ns, "limitranges"): [
                {
                    "metadata": meta("stage1-pro-defaults", ns),
                    "spec": {"limits": [{"type": "Container", "max": {"cpu": "11", "memory": "140Gi"}}]},
                }
            ],
        },
    }


def broken_cluster() -> dict[str, Any]:
    """One defect per check: each must fail with its fix."""
    objects = healthy_cluster()
    ns = cluster.PIPELINE_NAMESPACE
    objects["serviceaccounts"][(ns, cluster.PIPELINE_SERVICE_ACCOUNT)]["metadata"]["annotations"] = {}
    objects["configmaps"][(ns, cluster.KFP_LAUNCHER_CONFIGMAP)]["data"] = {
        cluster.DEFAULT_PIPELINE_ROOT_KEY: "minio://mlpipeline/v2/artifacts"
    }
    objects["configmaps"][(cluster.KFP_SYSTEM_NAMESPACE, "pipeline-install-config")]["data"]["appVersion"] = (
        "2.4.0"
    )
    gpu = objects["nodes"][0]
    gpu["status"]["allocatable"][cluster.GPU_RESOURCE] = "0"  # device plugin not running
    quota = objects["lists"][(ns, "resourcequotas")][0]["status"]
    quota["used"][f"requests.{cluster.GPU_RESOURCE}"] = "4"  # every GPU of the quota in use
    objects["lists"][(ns, "limitranges")][0]["spec"]["limits"][0]["max"]["cpu"] = (
        "2"  # below the train pod's 3 CPUs
    )
    return objects


class FakeGCS:
    """Cloud Storage's JSON API for bucket metadata and IAM policy."""

    def __init__(self, buckets: dict[str, list[dict[str, Any]]]) -> None:
        self.buckets = buckets  # name -> IAM bindings

    def handle(self, method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        match = re.fullmatch(r"/storage/v1/b/([^/]+)(/iam)?", path)
        if not match or match.group(1) not in self.buckets:
            return 404, {"error": {"code": 404, "message": "The specified bucket does not exist."}}
        name, iam = match.groups()
        if iam:
            return 200, {
                "kind": "storage#policy",
                "version": 3,
                "etag": "CAE=",
                "bindings": self.buckets[name],
            }
        return 200, {"kind": "storage#bucket", "id": name, "name": name, "location": "US-CENTRAL1"}


def fake_kfp(tag: str) -> Handler:
    def handle(method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/apis/v2beta1/healthz":
            return 200, {
                "commit_sha": "4a3592cb2dd0",
                "tag_name": tag,
                "multi_user": False,
                "pipeline_store": "database",
            }
        return 404, {"code": 5, "message": "not found"}

    return handle


@pytest.fixture
def servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., dict[str, Any]]]:
    """Start the three loopback servers for a cluster's objects; stop them afterwards."""
    import kfp.client.client as kfp_client_module

    from stage1_pro.storage import gcs_client

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "home/.config/kfp/context.json")
    )
    started: list[Loopback] = []

    def start(
        objects: dict[str, Any], kfp_tag: str, buckets: dict[str, list[dict[str, Any]]]
    ) -> dict[str, Any]:
        k8s = Loopback(FakeKubernetes(objects).handle)
        kfp = Loopback(fake_kfp(kfp_tag))
        gcs = Loopback(FakeGCS(buckets).handle)
        started.extend([k8s, kfp, gcs])
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        gcs_client.cache_clear()
        return {"kubeconfig": write_kubeconfig(tmp_path / "kubeconfig", k8s.url), "kfp": kfp.url, "k8s": k8s}

    yield start
    for server in started:
        server.close()
    gcs_client.cache_clear()


def write_kubeconfig(path: Path, server: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "loopback", "cluster": {"server": server}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [
                    {
                        "name": "gke_my-project_us-central1_stage1-pro",
                        "context": {"cluster": "loopback", "user": "me"},
                    }
                ],
                "current-context": "gke_my-project_us-central1_stage1-pro",
            }
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    return out


def doctor(setup: dict[str, Any], package: Path, *args: str) -> int:
    return main(["doctor", "--kubeconfig", setup["kubeconfig"], "--package", str(package), *args])


def lines_of(out: str) -> dict[str, str]:
    """Check name -> its report line (and its fix line, if any)."""
    found: dict[str, str] = {}
    rows = out.splitlines()
    for i, row in enumerate(rows):
        match = re.match(r"  (ok|warn|FAIL)\s+(.+?)\s{2,}", row)
        if match:
            fix = rows[i + 1] if i + 1 < len(rows) and rows[i + 1].lstrip().startswith("fix:") else ""
            found[match.group(2)] = f"{row}\n{fix}".rstrip()
    return found


CHECKS = (
    "KFP backend version",
    "pipeline namespace",
    "runner ServiceAccount",
    "kfp-launcher pipeline root",
    "GPU node pool",
    "quota for one run",
    "buckets",
)


# ---- the verb against the loopback servers ------------------------------------------------------


def test_healthy_cluster_passes_every_check(
    servers: Any, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = servers(
        healthy_cluster(),
        "2.17.0",
        {BUCKET: [{"role": "roles/storage.objectUser", "members": [f"serviceAccount:{RUNNER}"]}]},
    )
    assert doctor(setup, package, "--host", setup["kfp"]) == 0
    out = capsys.readouterr().out
    rows = lines_of(out)
    assert set(rows) == set(CHECKS), out
    assert all(row.startswith("  ok") for row in rows.values()), out
    assert "2.17.0 (healthz tag_name) >= 2.17.0" in rows["KFP backend version"]
    assert "securityContext >= 2.16.0" in rows["KFP backend version"]
    assert f"acts as {RUNNER}" in rows["runner ServiceAccount"]
    assert "gke-stage1-pro-gpu-1" in rows["GPU node pool"] and "gke-default-1" not in out
    assert f"gs://{BUCKET} reachable; {RUNNER} has roles/storage.objectUser" in rows["buckets"]
    assert "all checks passed" in out
    # Only reads: every request was a GET (the handler asserts it), to the paths of the checks.
    assert "/api/v1/nodes" in setup["k8s"].requests


def test_without_host_the_version_comes_from_the_install_configmap(
    servers: Any, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = servers(healthy_cluster(), "2.17.0", {BUCKET: []})
    assert doctor(setup, package) == 0
    rows = lines_of(capsys.readouterr().out)
    assert "2.17.0 (kubeflow/pipeline-install-config appVersion)" in rows["KFP backend version"]
    # The runner is not granted on the bucket itself: a warning with the grant command, not a failure.
    assert rows["buckets"].startswith("  warn") and "add-iam-policy-binding" in rows["buckets"]


def test_broken_cluster_fails_each_check_with_its_fix(
    servers: Any, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = servers(broken_cluster(), "2.4.0", {})
    assert doctor(setup, package, "--host", setup["kfp"], "-p", "data_uri=gs://no-such-bucket/data.csv") == 2
    out = capsys.readouterr().out
    rows = lines_of(out)
    for name in (
        "KFP backend version",
        "runner ServiceAccount",
        "kfp-launcher pipeline root",
        "GPU node pool",
        "quota for one run",
        "buckets",
    ):
        assert rows[name].startswith("  FAIL"), rows[name]
        assert "\n" in rows[name] and "fix: " in rows[name], f"{name} has no fix line:\n{rows[name]}"
    assert rows["pipeline namespace"].startswith("  ok")
    version = rows["KFP backend version"]
    assert "2.4.0 (healthz tag_name) is older than the 2.17.0 the pipeline needs" in version
    assert "nodeSelectorJson >= 2.5.0 (exec-train)" in version and "upgrade Kubeflow Pipelines" in version
    assert f"no {cluster.WORKLOAD_IDENTITY_ANNOTATION} annotation" in rows["runner ServiceAccount"]
    assert "kubectl apply -k manifests/overlays/<env>/kfp-patches" in rows["runner ServiceAccount"]
    assert "'minio://mlpipeline/v2/artifacts', not gs://BUCKET" in rows["kfp-launcher pipeline root"]
    assert f"gke-stage1-pro-gpu-1 has 0 allocatable {cluster.GPU_RESOURCE}" in rows["GPU node pool"]
    assert "nvidia-gpu-device-plugin" in rows["GPU node pool"] and "R580" in rows["GPU node pool"]
    quota = rows["quota for one run"]
    assert f"stage1-pro-compute requests.{cluster.GPU_RESOURCE}: 0 free of 4, train needs 1" in quota
    assert "LimitRange stage1-pro-defaults caps a container at cpu 2, train needs 3" in quota
    assert "gs://no-such-bucket does not exist" in rows["buckets"]
    assert "gcloud storage buckets create gs://no-such-bucket" in rows["buckets"]
    assert re.search(r"^6 check\(s\) failed", out, re.M)


def test_untolerated_taint_and_a_missing_namespace(
    servers: Any, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = healthy_cluster()
    objects["nodes"][0]["spec"]["taints"].append({"key": "dedicated", "value": "ml", "effect": "NoSchedule"})
    setup = servers(objects, "2.17.0", {BUCKET: []})
    assert doctor(setup, package, "--namespace", "team-a", "--service-account", "default-editor") == 2
    rows = lines_of(capsys.readouterr().out)
    assert "taints the train task does not tolerate: dedicated=ml:NoSchedule" in rows["GPU node pool"]
    assert "namespace team-a does not exist" in rows["pipeline namespace"]
    assert "team-a/default-editor does not exist" in rows["runner ServiceAccount"]


def test_a_pool_scaled_to_zero_is_found_through_config_connector(
    servers: Any, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = healthy_cluster()
    objects["nodes"] = objects["nodes"][1:]  # no GPU node now
    rendered = yaml.safe_load(
        (Path(__file__).parent.parent / "manifests" / "gke" / "gpu-nodepool.yaml").read_text()
    )
    pool = {
        **rendered,
        "metadata": {**rendered["metadata"], "namespace": "stage1-pro-infra"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    objects["nodepools"] = [pool]
    setup = servers(objects, "2.17.0", {BUCKET: []})
    assert doctor(setup, package) == 0
    rows = lines_of(capsys.readouterr().out)
    assert "ContainerNodePool stage1-pro-gpu (Ready) scales up to 1" in rows["GPU node pool"]

    not_ready = copy.deepcopy(objects)
    not_ready["nodepools"][0]["status"]["conditions"][0]["status"] = "False"
    setup = servers(not_ready, "2.17.0", {BUCKET: []})
    assert doctor(setup, package) == 2
    assert "not Ready" in lines_of(capsys.readouterr().out)["GPU node pool"]

    objects["nodepools"] = None  # a gcloud-made pool at zero nodes: not visible from Kubernetes
    setup = servers(objects, "2.17.0", {BUCKET: []})
    assert doctor(setup, package) == 0
    row = lines_of(capsys.readouterr().out)["GPU node pool"]
    assert row.startswith("  warn") and "gcloud container node-pools list" in row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_is_one_line_and_exit_2(tmp_path: Path, package: Path) -> None:
    port = free_port()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KFP_HOST")}
    proc = subprocess.run(  # the console script, as a user runs it: what reaches the terminal
        [
            str(Path(sys.executable).parent / "stage1-pro"),
            "doctor",
            "--kubeconfig",
            kubeconfig,
            "--package",
            str(package),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**env, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"stage1-pro doctor: error: cannot reach the Kubernetes API server at http://127.0.0.1:{port} "
        "(context 'gke_my-project_us-central1_stage1-pro'): connection refused"
    ), proc.stderr


def test_no_credentials_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--kubeconfig", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Kubernetes credentials" in err and "get-credentials" in err


def test_bad_parameters_are_refused_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--kubeconfig", str(tmp_path / "missing"), "-p", "gpu_count=two"]) == 2
    assert "gpu_count='two' is not int" in capsys.readouterr().err


# ---- the backend-version table -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(package: Path) -> bf.CompiledPackage:
    return bf.CompiledPackage.load(package)


def test_the_compiled_pipeline_needs_what_its_features_need(compiled: bf.CompiledPackage) -> None:
    need = bf.required_backend(compiled)
    used = {feature.name: where for feature, where in need.uses}
    assert used["nodeSelectorJson"] == ["exec-train"]
    assert "exec-train" in used["securityContext"]
    assert "exec-train" in used["run-time resource values"]
    assert "train" in used["retries of tasks inside If/ExitHandler/ParallelFor/sub-pipelines"]
    assert need.min_version == max(bf.BACKEND_FEATURES[name].min_version for name in used)
    # the prepare fan-out inside the ExitHandler whose exit task reads the final state (#13322)
    assert need.min_version == (2, 17, 0)


def without(package: bf.CompiledPackage, *keys: str) -> bf.CompiledPackage:
    executors = copy.deepcopy(package.executors)
    for executor in executors.values():
        for key in keys:
            executor.pop(key, None)
    return bf.CompiledPackage(package.spec, executors)


def test_dropping_a_feature_lowers_the_requirement(compiled: bf.CompiledPackage) -> None:
    def used(package: bf.CompiledPackage) -> set[str]:
        return {feature.name for feature, _ in bf.required_backend(package).uses}

    # The pipeline spec alone needs 2.17 (a ParallelFor inside the ExitHandler); the platform
    # spec's features drop out one by one.
    assert bf.required_backend(without(compiled, "securityContext")).min_version == (2, 17, 0)
    assert "securityContext" in used(compiled) and "securityContext" not in used(
        without(compiled, "securityContext")
    )
    assert "nodeSelectorJson" not in used(without(compiled, "securityContext", "nodeSelector"))
    # With no platform spec at all, only root retries (2.5) and resource placeholders (2.4) remain.
    bare = bf.CompiledPackage(compiled.spec, {})
    assert {f.name for f, _ in bf.required_backend(bare).uses} >= {"run-time resource values"}


def synthetic(**components: dict[str, Any]) -> bf.CompiledPackage:
    root = {
        "dag": {
            "tasks": {
                "exit-handler-1": {"componentRef": {"name": "comp-exit-handler-1"}},
                "report": {
                    "triggerPolicy": {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"},
                    "inputs": {
                        "parameters": {"status": {"taskFinalStatus": {"producerTask": "exit-handler-1"}}}
                    },
                },
            }
        }
    }
    return bf.CompiledPackage({"root": root, "components": components}, {})


def test_detectors_of_the_dag_features() -> None:
    loop = {
        "dag": {
            "tasks": {
                "merge": {
                    "inputs": {"artifacts": {"shard": {"taskOutputArtifact": {"producerTask": "decode"}}}}
                }
            }
        }
    }
    body = {
        "dag": {
            "tasks": {
                "for-loop-2": {"componentRef": {"name": "comp-for-loop-2"}},
                "train": {"retryPolicy": {"maxRetryCount": 3}},
            }
        }
    }
    need = bf.required_backend(synthetic(**{"comp-exit-handler-1": body, "comp-for-loop-2": loop}))
    used = {feature.name: where for feature, where in need.uses}
    assert used["dsl.ExitHandler (exit lifecycle hook)"] == ["report"]
    assert used["dsl.PipelineTaskFinalStatus"] == ["report"]
    assert used["artifacts passed between tasks inside dsl.ParallelFor"] == ["merge"]
    assert used["retries of tasks inside If/ExitHandler/ParallelFor/sub-pipelines"] == ["train"]
    assert used["dsl.ParallelFor inside an exit-handled DAG that reports its final status"] == ["for-loop-2"]
    assert need.min_version == (2, 17, 0)
    assert need.reasons(below=(2, 14, 0)) == [
        "dsl.ParallelFor inside an exit-handled DAG that reports its final status >= 2.17.0 (for-loop-2)"
    ]


def test_pod_metadata_only_matters_when_it_differs() -> None:
    same = bf.CompiledPackage(
        {"root": {}},
        {
            "exec-a": {"podMetadata": {"labels": {"app": "s"}}},
            "exec-b": {"podMetadata": {"labels": {"app": "s"}}},
        },
    )
    differs = bf.CompiledPackage(
        {"root": {}},
        {
            "exec-a": {"podMetadata": {"labels": {"task": "a"}}},
            "exec-b": {"podMetadata": {"labels": {"task": "b"}}},
        },
    )
    assert "per-task pod labels and annotations" not in {f.name for f, _ in bf.required_backend(same).uses}
    assert bf.required_backend(differs).min_version == (2, 14, 0)


def test_registry_refuses_bad_entries() -> None:
    with pytest.raises(ValueError, match=r"'2\.x' is not a version"):
        bf.backend_feature("x", "2.x", "nowhere")
    with pytest.raises(ValueError, match="registered twice"):
        bf.backend_feature("nodeSelectorJson", "2.5.0", "again")(lambda package: [])


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("2.17.0", (2, 17, 0)),
        ("v2.5.0-rc.1", (2, 5, 0)),
        ("2.14", (2, 14, 0)),
        ("unknown", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_version(text: str | None, version: tuple[int, int, int] | None) -> None:
    assert bf.parse_version(text) == version


def test_a_file_that_is_not_a_package_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("kind: ConfigMap\n")
    from stage1_pro.errors import ConfigError

    with pytest.raises(ConfigError, match="not a KFP v2 pipeline package"):
        bf.CompiledPackage.load(bad)
