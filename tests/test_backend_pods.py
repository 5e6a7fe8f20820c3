"""The compiled package as the KFP backend (tag 2.17.0) runs it: every pod built, admitted, placed.

A run of the package's DAGs by the drivers' rules (``tests/kfp_backend.py``, each rule citing the
backend source it mirrors), check-config's and plan-shards' compiled commands really executed,
every container task's pod built, validated against the Kubernetes API schema GKE runs, admitted
by the overlays' LimitRange and ResourceQuota and placed on their node pools. Then the project's
own rules: a GPU limit on train and nowhere else, /dev/shm large enough for the configured loader.

The last tests plant today's defects in the compiled spec (an int accelerator count, an 8-CPU
prepare, no shm mount) and show each one caught, while the shipped package passes.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp_backend import (
    K8S_VERSION,
    KFP_WORKFLOW_DEFAULTS,
    BackendError,
    NodePool,
    Package,
    Run,
    admit,
    build_pod,
    compiled_retry_strategy,
    cpu_pool,
    effective_retry_strategy,
    from_value,
    gpu_limit,
    gpu_pool,
    placement_problems,
    pod_requests,
    quota_problems,
    retried,
    shm_size,
    string_value,
)
from kubernetes.utils import parse_quantity

from stage1_pro import cluster, sizing
from stage1_pro.config import Stage1ProConfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENTS = ("dev", "prod")
RUN_PARAMETERS = {"data_uri": "gs://stage1-pro-data/street/manifest.csv"}
#: Tasks whose compiled command runs for real: their outputs drive the train pod and the fan-out.
EXECUTED = ("check-config", "plan-shards")
GPU_TASK = "train"

requires_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl renders the overlays (`kubectl kustomize`, no server)"
)


@functools.cache
def overlay(env: str) -> tuple[dict[str, Any], ...]:
    """What an environment applies: stage1-pro's own objects (quota, LimitRange, GPU pool) and its
    patches to KFP's."""
    objects: list[dict[str, Any]] = []
    for part in ("stage1-pro", "kfp-patches"):
        proc = subprocess.run(
            ["kubectl", "kustomize", str(ROOT / "manifests" / "overlays" / env / part)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        objects += [d for d in yaml.safe_load_all(proc.stdout) if d]
    return tuple(objects)


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pools(env: str) -> list[NodePool]:
    """The cluster's default pool (README) and the overlay's GPU pool."""
    return [cpu_pool(cluster.CPU_MACHINE_TYPE), gpu_pool(one(overlay(env), "ContainerNodePool"))]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    from stage1_pro.pipelines.compile import compile_pipeline

    return Package.load(compile_pipeline(tmp_path_factory.mktemp("backend") / "pipeline.yaml"))


def run_of(package: Package, **parameters: Any) -> Run:
    return Run(package, {**RUN_PARAMETERS, **parameters}, run_commands=EXECUTED)


@pytest.fixture(scope="module")
def run(package: Package) -> Run:
    return run_and_pods(package)[0]


@pytest.fixture(scope="module")
def pods(package: Package) -> dict[str, dict[str, Any]]:
    """Every container task's pod, by task path."""
    return {path: pod for path, (_, pod) in run_and_pods(package)[1].items()}


_RUNS: dict[int, tuple[Run, dict[str, tuple[Any, dict[str, Any]]]]] = {}


def run_and_pods(package: Package) -> tuple[Run, dict[str, tuple[Any, dict[str, Any]]]]:
    """The run of ``package`` with :data:`RUN_PARAMETERS` and its pods by task path (once per package)."""
    if id(package) not in _RUNS:
        run = Run(package, RUN_PARAMETERS, run_commands=EXECUTED)
        _RUNS[id(package)] = (run, {task.path: (task, build_pod(run, task)) for task in run.tasks})
    return _RUNS[id(package)]


def problems(package: Package, env: str) -> list[str]:
    """Everything the backend, the API server or the scheduler would object to, and the project's
    GPU and shared-memory rules: [] for a package that runs as intended."""
    try:
        run, built = run_and_pods(package)
    except BackendError as exc:
        return [str(exc)]
    objects = overlay(env)
    limit_range, quota = one(objects, "LimitRange"), one(objects, "ResourceQuota")
    found: list[str] = []
    for path, (task, pod) in built.items():
        try:
            pod = admit(pod, limit_range)
        except BackendError as exc:
            found.append(str(exc))
            continue
        found += placement_problems(pod, pools(env))
        found += quota_problems([pod], quota)
        gpus = gpu_limit(pod)
        if task.display_name == GPU_TASK:
            wanted = int(string_value(run.task("check-config").outputs["train_gpu_count"]))
            if gpus != wanted:
                found.append(f"{path}: nvidia.com/gpu limit {gpus:g}, check-config asked for {wanted}")
            found += shm_problems(task, pod)
        elif gpus:
            found.append(f"{path}: a CPU task with an nvidia.com/gpu limit of {gpus:g}")
    return found


def shm_problems(task: Any, pod: dict[str, Any]) -> list[str]:
    """/dev/shm holds the loader's in-flight batches, and the pod's memory limit counts it."""
    config = Stage1ProConfig.from_dict(
        json.loads(string_value(task.inputs["config_json"])), source="config_json"
    )
    need = sizing.loader_shm_bytes(config.batch_size, config.img_size, config.num_workers)
    have = shm_size(pod)
    found = []
    if have < need:
        found.append(
            f"{task.path}: /dev/shm is {have / 2**20:g} MiB (0: the runtime's 64 MiB default), the loader "
            f"({config.num_workers} workers, batch {config.batch_size}, {config.img_size} px) needs "
            f"{need / 2**20:.0f} MiB"
        )
    main = next(c for c in pod["spec"]["containers"] if c["name"] == "main")
    memory = main["resources"]["limits"].get("memory", "0")
    if float(parse_quantity(memory)) < have + sizing.TRAIN_MEMORY_GIB_PER_GPU * 2**30:
        found.append(f"{task.path}: memory limit {memory} does not cover /dev/shm ({have / 2**30:g} GiB) too")
    return found


# ---- the shipped package ----------------------------------------------------------------------


def test_the_run_reaches_every_task_with_its_inputs_resolved(run: Run) -> None:
    names = sorted({t.display_name for t in run.tasks})
    assert names == sorted(
        [
            "check-config",
            "fingerprint",
            "split",
            "plan-shards",
            "prepare",
            "merge-prepared",
            "drift-check",
            "train",
            *(f"calibrate-{p}" for p in ("softmax", "gate", "scrc")),
            "validate",
            "record-verdict",
            "export",
            "record-bundle",
            "publish",
            "report-run",
        ]
    )
    # The exit task sees the run's IDs; the importer's URI is the data_uri parameter.
    report = run.task("report-run")
    assert string_value(report.inputs["run_id"]) == Run.run_id
    assert report.inputs["status"].struct_value["state"] == "COMPLETE"
    assert run.task("fingerprint").artifacts["dataset"][0]["uri"] == RUN_PARAMETERS["data_uri"]


def test_publish_gets_the_champion_version_validate_compared_with(package: Package) -> None:
    """Through every nested condition DAG, publish receives drift-check's output (the champion
    version validate took) and the run's champion_prefix, from which it derives expect_latest."""
    registry = "gs://stage1-pro-data/bundles/stage1"
    with_champion = run_of(package, publish_prefix=registry, champion_prefix=registry)
    champion = with_champion.task("drift-check").outputs["Output"]
    validated = with_champion.tasks_named("validate")
    published = with_champion.tasks_named("publish")
    assert len(published) == len(validated) > 0  # every exit_policy branch is taken in this model
    for task in validated:
        assert task.inputs["champion_uri"] == champion
    for task in published:
        assert task.inputs["champion"] == champion, task.path
        assert string_value(task.inputs["champion_prefix"]) == registry, task.path
        assert string_value(task.inputs["prefix"]) == registry, task.path


@pytest.mark.parametrize("shards", [1, 3])
def test_prepare_fans_out_over_the_planned_shards(package: Package, shards: int) -> None:
    run = run_of(package, prepare_shards=shards)
    prepares = run.tasks_named("prepare")
    assert sorted(from_value(p.inputs["shard"])["index"] for p in prepares) == list(range(shards))
    assert {from_value(p.inputs["shard"])["count"] for p in prepares} == {shards}
    merge = run.task("merge-prepared")
    assert len(merge.inputs["slices"].list_value.values) == shards


def test_every_pod_is_a_valid_kubernetes_pod(pods: dict[str, dict[str, Any]]) -> None:
    for path, pod in pods.items():
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path}: {exc}")


def test_every_pod_runs_as_the_image_user_under_the_restricted_pod_security_profile(
    pods: dict[str, dict[str, Any]],
) -> None:
    """The namespace warns on 'restricted': non-root, no privilege escalation, all capabilities
    dropped, RuntimeDefault seccomp, for every container of every pod."""
    for path, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, path
        for container in spec["initContainers"] + spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, (path, container["name"])
            assert sc["allowPrivilegeEscalation"] is False, (path, container["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (path, container["name"])
        main = next(c for c in spec["containers"] if c["name"] == "main")
        assert (main["securityContext"]["runAsUser"], main["securityContext"]["runAsGroup"]) == (
            cluster.IMAGE_UID,
            cluster.IMAGE_GID,
        ), path


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_pod_is_admitted_and_schedulable_and_the_gpu_and_shm_rules_hold(
    package: Package, env: str
) -> None:
    assert problems(package, env) == []


def test_a_gpu_limit_on_train_and_nowhere_else(pods: dict[str, dict[str, Any]]) -> None:
    with_gpu = {path.rsplit("/", 1)[-1] for path, pod in pods.items() if gpu_limit(pod)}
    assert with_gpu == {"train"}
    (train,) = [pod for path, pod in pods.items() if path.endswith("/train")]
    assert gpu_limit(train) == cluster.DEFAULT_GPU_COUNT
    assert train["spec"]["nodeSelector"] == {cluster.ACCELERATOR_LABEL: cluster.DEFAULT_ACCELERATOR}
    assert {"key": cluster.GPU_TOLERATION_KEY, "operator": "Exists", "effect": "NoSchedule"} in train["spec"][
        "tolerations"
    ]
    # the node name reaches the container (train's "no GPU here" error names it)
    main = next(c for c in train["spec"]["containers"] if c["name"] == "main")
    assert {
        "name": "STAGE1_PRO_NODE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    } in main["env"]


def test_train_pod_sizing_follows_the_measured_rates(pods: dict[str, dict[str, Any]]) -> None:
    (train,) = [pod for path, pod in pods.items() if path.endswith("/train")]
    main = next(c for c in train["spec"]["containers"] if c["name"] == "main")
    workers = sizing.loader_workers_per_gpu()
    assert workers == 2  # ceil(6600 x 1.5 / 7000): README "Sizing the train task's CPUs"
    assert main["resources"]["requests"]["cpu"] == str(1 + workers)
    assert shm_size(train) == sizing.TRAIN_SHM_GIB * 2**30
    assert train["spec"]["activeDeadlineSeconds"] > 0
    assert train["metadata"]["labels"] | {"app": "stage1-pro", "task": "train"} == train["metadata"]["labels"]


def test_cost_attribution_labels_on_every_pod(run: Run, pods: dict[str, dict[str, Any]]) -> None:
    from stage1_pro import __version__

    for task in run.tasks:
        labels = pods[task.path]["metadata"]["labels"]
        assert labels["app"] == "stage1-pro" and labels["pipeline-version"] == __version__, task.path
        assert labels["task"] == task.display_name, task.path


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_quota_admits_the_pods_that_run_at_once(
    run: Run, pods: dict[str, dict[str, Any]], env: str
) -> None:
    """Peak of a default run: the prepare pods of the fan-out run together (1 by default); train
    alone. Both must fit the namespace quota, with the LimitRange defaults filled in."""
    objects = overlay(env)
    admitted = {p: admit(pod, one(objects, "LimitRange")) for p, pod in pods.items()}
    prepare = [pod for p, pod in admitted.items() if p.rsplit("/", 1)[-1] == "prepare"]
    train = [pod for p, pod in admitted.items() if p.endswith("/train")]
    assert quota_problems(prepare, one(objects, "ResourceQuota")) == []
    assert quota_problems(train, one(objects, "ResourceQuota")) == []


# ---- rules of the driver, shown on the package -------------------------------------------------


def test_a_string_for_an_int_parameter_fails_the_sub_dag_driver(package: Package) -> None:
    """Why the GPU count is not made a string parameter: the exit handler's DAG declares
    gpu_count NUMBER_INTEGER, and its driver refuses a string (root_dag.go checks nothing)."""
    with pytest.raises(
        BackendError, match=r"pipelinechannel--gpu_count' type mismatch: expect NUMBER_INTEGER"
    ):
        Run(package, {**RUN_PARAMETERS, "gpu_count": "1"}, run_commands=EXECUTED)


def test_an_importer_uri_from_a_task_output_fails_at_run_time(package: Package) -> None:
    def from_task_output(spec: dict[str, Any], _: dict[str, Any]) -> None:
        dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
        dag["importer"]["inputs"]["parameters"]["uri"] = {
            "taskOutputParameter": {"producerTask": "check-config", "outputParameterKey": "config_json"}
        }

    with pytest.raises(BackendError, match=r"error resolving artifact URI.*importer_launcher.go"):
        Run(package.mutated(from_task_output), RUN_PARAMETERS, run_commands=EXECUTED)


def test_check_config_refuses_more_gpus_than_a_node_has_before_any_gpu_is_asked_for(package: Package) -> None:
    """gpu_count=2 on the shipped pool (one GPU per node) would leave train Pending forever."""
    with pytest.raises(BackendError, match=r"gpu_count=2 cannot run on the shipped infrastructure"):
        Run(package, {**RUN_PARAMETERS, "gpu_count": 2}, run_commands=EXECUTED)


# ---- today's defects, planted in the compiled spec ----------------------------------------------


def _train_task(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train"]


def int_accelerator_count(spec: dict[str, Any], _: dict[str, Any]) -> None:
    """What the pipeline compiled to before: set_accelerator_limit(gpu_count) with gpu_count: int."""
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    resources["accelerator"]["resourceCount"] = "{{$.inputs.parameters['pipelinechannel--gpu_count']}}"
    _train_task(spec)["inputs"]["parameters"]["pipelinechannel--gpu_count"] = {
        "componentInputParameter": "pipelinechannel--gpu_count"
    }


def eight_cpu_prepare(spec: dict[str, Any], _: dict[str, Any]) -> None:
    resources = spec["deploymentSpec"]["executors"]["exec-prepare"]["container"]["resources"]
    for key in ("resourceCpuRequest", "resourceCpuLimit"):
        resources[key] = "8"
    resources["cpuRequest"] = resources["cpuLimit"] = 8.0


def no_shm_mount(_: dict[str, Any], k8s: dict[str, Any]) -> None:
    del k8s["exec-train"]["emptyDirMounts"]


def assert_caught(package: Package, env: str, mutation: Callable[..., None], pattern: str) -> None:
    """The package runs as intended in ``env``, and ``mutation`` of it is refused with ``pattern``."""
    assert problems(package, env) == []
    found = problems(package.mutated(mutation), env)
    assert any(re.search(pattern, p) for p in found), found


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_catches_an_int_accelerator_count(package: Package, env: str) -> None:
    assert_caught(
        package, env, int_accelerator_count, r"/train: nvidia.com/gpu limit 0, check-config asked for 1"
    )


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_catches_an_eight_cpu_prepare_on_the_cpu_pool(package: Package, env: str) -> None:
    pattern = r"fits no node: default-pool \(e2-standard-8\): Insufficient cpu \(requests 8\.\d+"
    assert_caught(package, env, eight_cpu_prepare, pattern)


def untyped_shard_items(spec: dict[str, Any], _: dict[str, Any]) -> None:
    """What ``plan_shards(...) -> list`` (an untyped list) compiles to: the loop item declared STRING."""
    loop = spec["components"]["comp-for-loop-2"]["inputDefinitions"]["parameters"]
    loop["pipelinechannel--plan-shards-Output-loop-item"]["parameterType"] = "STRING"


def test_each_prepare_pod_gets_its_shard_item_as_a_struct(package: Package) -> None:
    """A loop item declared STRING is turned into JSON text by the iteration driver, and prepare's
    ``shard: dict`` then refuses it at run time (kfp.local runs it fine): plan_shards returns
    ``list[dict]`` so the item is declared STRUCT and passed as is."""
    (shard,) = [from_value(t.inputs["shard"]) for t in run_and_pods(package)[0].tasks_named("prepare")]
    assert (shard["index"], shard["count"]) == (0, 1)
    assert shard["preprocessing"] == from_value(
        run_and_pods(package)[0].task("check-config").outputs["preprocessing"]
    )
    with pytest.raises(BackendError, match=r"prepare: input parameter 'shard' type mismatch: expect STRUCT"):
        Run(package.mutated(untyped_shard_items), RUN_PARAMETERS, run_commands=EXECUTED)


@requires_kubectl
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_catches_a_missing_shm_mount(package: Package, env: str) -> None:
    pattern = r"/train: /dev/shm is 0 MiB .* the loader \(2 workers, batch 256, 224 px\) needs"
    assert_caught(package, env, no_shm_mount, pattern)


# ---- Argo's retries ------------------------------------------------------------------------------


def test_what_argo_retries_for_train(run: Run) -> None:
    """KFP compiles set_retry without a retryPolicy; KFP 2.17's install merges in OnError, under
    which a failed main container (OOM, CUDA error, a preempted Spot node's SIGTERM) is not
    retried; a cluster that merges retryPolicy Always into workflowDefaults retries both (README
    "What is retried")."""
    strategy = compiled_retry_strategy(run.task("train").spec)
    assert strategy is not None and "retryPolicy" not in strategy
    stock = effective_retry_strategy(strategy, KFP_WORKFLOW_DEFAULTS)
    assert retried(stock, "Error") and not retried(stock, "Failed")
    merged = {"spec": {"templateDefaults": {"retryStrategy": {"limit": "2", "retryPolicy": "Always"}}}}
    always = effective_retry_strategy(strategy, merged)
    assert always["limit"] == "3"  # the task's own limit wins
    assert retried(always, "Error") and retried(always, "Failed")
    assert not retried(effective_retry_strategy(strategy, {}), "Error")  # Argo's own default: OnFailure


def test_train_may_retry_for_as_long_as_its_attempts_can_run(
    run: Run, pods: dict[str, dict[str, Any]]
) -> None:
    """Argo gives every retry the deadline first start + backoff.maxDuration (operator.go): the
    SDK's 3600 s default would stop any retry of a train pod that ran over an hour."""
    from stage1_pro.pipelines.pipeline import TRAIN_RETRIES

    strategy = compiled_retry_strategy(run.task("train").spec)
    (train,) = [pod for path, pod in pods.items() if path.endswith("/train")]
    timeout = train["spec"]["activeDeadlineSeconds"]
    assert int(strategy["backoff"]["maxDuration"]) >= (TRAIN_RETRIES + 1) * timeout
    assert strategy["backoff"]["factor"] == "2"


def test_cpu_tasks_fit_the_cpu_pool_with_room_for_system_pods() -> None:
    pool = cpu_pool(cluster.CPU_MACHINE_TYPE)
    assert 7.3 < pool.allocatable["cpu"] < 7.5  # 7.91 GKE allocatable - 0.5 DaemonSets
    from stage1_pro.pipelines.pipeline import CPU_TASK_RESOURCES

    biggest = max(float(r[0]) for r in CPU_TASK_RESOURCES.values())
    assert biggest + 0.25 <= pool.allocatable["cpu"]  # + Argo's wait sidecar (LimitRange default)


def test_readme_creates_the_cpu_pool_the_tests_place_on() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"--machine-type (\S+)", readme.split("## Running on a GKE cluster", 1)[1])[0] == (
        cluster.CPU_MACHINE_TYPE
    )


@requires_kubectl
def test_limit_range_maximum_is_what_check_config_enforces() -> None:
    (limits,) = one(overlay("prod"), "LimitRange")["spec"]["limits"]
    assert limits["max"] == {
        "cpu": str(cluster.MAX_CONTAINER_CPU),
        "memory": f"{cluster.MAX_CONTAINER_MEMORY_GIB}Gi",
    }


def test_pod_requests_count_init_containers_as_the_scheduler_does() -> None:
    pod = {
        "spec": {
            "initContainers": [{"resources": {"requests": {"cpu": "4"}}}],
            "containers": [
                {"resources": {"requests": {"cpu": "1"}}},
                {"resources": {"requests": {"cpu": "2"}}},
            ],
        }
    }
    assert pod_requests(pod) == {"cpu": 4.0}
    pod["spec"]["initContainers"][0]["resources"]["requests"]["cpu"] = "2"
    assert pod_requests(pod) == {"cpu": 3.0}


def test_readme_states_the_minimum_backend_and_what_is_retried(package: Package, run: Run) -> None:
    """The README's backend version is what the package needs, and its retry table is what Argo
    decides for train, before and after the README's merge command (run through the merge script)."""
    import importlib.util

    from stage1_pro.pipelines.backend_features import CompiledPackage, format_version, required_backend

    readme = (ROOT / "README.md").read_text().split("### Backend version, retries, sizing", 1)[1]
    need = required_backend(CompiledPackage(package.spec, package.k8s))
    assert f"**KFP backend {format_version(need.min_version)} or newer.**" in readme

    spec = importlib.util.spec_from_file_location("merge", ROOT / "manifests" / "merge_workflow_defaults.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    fragment = yaml.safe_load(re.search(r"--merge '([^']+)'", readme).group(1))
    merged = json.loads(json.dumps(KFP_WORKFLOW_DEFAULTS))
    merge.deep_merge(merged, fragment)
    assert merged["spec"]["ttlStrategy"] == KFP_WORKFLOW_DEFAULTS["spec"]["ttlStrategy"]  # kept

    strategy = compiled_retry_strategy(run.task("train").spec)
    stock = effective_retry_strategy(strategy, KFP_WORKFLOW_DEFAULTS)
    always = effective_retry_strategy(strategy, merged)
    phases = {"main container": "Failed", "pod deleted": "Error", "Argo's init": "Error"}
    cell = r"(not retried|retried)"
    rows = re.findall(
        rf"^\| (main container|pod deleted|Argo's init)[^|]*\| {cell} \| {cell} \|$", readme, re.M
    )
    assert [r[0] for r in rows] == list(phases)
    for label, as_installed, after_merge in rows:
        assert as_installed == ("retried" if retried(stock, phases[label]) else "not retried"), label
        assert after_merge == ("retried" if retried(always, phases[label]) else "not retried"), label
