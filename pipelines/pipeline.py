"""The stage1-pro Kubeflow pipeline: check config -> import and fingerprint the data -> split ->
prepare (fanned out) -> merge -> drift check against the champion -> train (GPU) -> one
exit-policy branch (calibrate -> validate against the champion -> export if blessed -> publish if
asked), all inside a dsl.ExitHandler whose exit task reports the run.

Build it with :func:`build_pipeline` (``stage1-pro compile`` does), or use the module-level
:data:`stage1_pro_pipeline` (``kfp dsl compile --py pipelines/pipeline.py``). Needs a KFP backend
>= 2.17.0 (README "Running on a GKE cluster": which feature needs which version).

Design notes
- Branches: ``dsl.If/Elif/Else`` on ``exit_policy``, one per registered exit policy in registration
  order (:mod:`stage1_pro.policy_registry`), each self-contained (its own calibrate, validate and
  export tasks, the same components; calibrate takes the branch's policy as a parameter). No
  artifact ``dsl.OneOf``: it fails under ``kfp.local``, while self-contained branches run
  everywhere and keep typed artifacts and lineage. The Else branch is the last registered policy
  (``scrc``): check-config has already rejected any other value.
- GPU: only the train task requests one: ``nvidia.com/gpu`` x check-config's ``train_gpu_count``,
  the GKE accelerator node selector (from ``gpu_type``, applied with
  ``kfp.kubernetes.add_node_selector_json``) and the ``nvidia.com/gpu`` toleration. Every run-time
  resource value (GPU count, CPU, memory) is a *string* output of check-config: the KFP driver
  resolves a resource placeholder with the parameter's string value (``resolvePodSpecInputRuntimeParameter``
  in backend/src/v2/driver/resolve.go), so an ``int`` parameter would resolve to "" and the pod
  would get no GPU limit, silently. kfp 2.17's ``set_cpu_*``/``set_memory_*``/``set_accelerator_*``
  do not register their channels with the enclosing sub-DAG (the ExitHandler here), so the train
  task registers them itself (:func:`register_resource_channels`).
- /dev/shm: train mounts a memory-backed emptyDir there, sized in ``stage1_pro.sizing`` and
  counted in its memory request (DataLoader workers pass batches through shared memory).
- Caching: every task is cached on its inputs except check-config (it reads the starting
  weights' version, train's cache key), fingerprint (the dataset's sha256, the cache key of
  everything that reads the data), drift-check (it resolves the champion, ``champion_prefix``'s
  latest, once per run: its output, the champion's ``PREFIX/VERSION``, is validate's input, so a
  moved ``latest`` invalidates a cached validation) and the outcome records (they note this run's
  verdict).
- Retries: train retries (preemptible GPU nodes) and resumes from its last epoch: on a GCS
  pipeline root it writes its run directory and per-epoch checkpoints straight to
  ``<model uri>.run``, which every retry sees (``stage1_pro.components.runtime.durable_run_dir``).
  Which failures Argo retries depends on the cluster (README "What is retried").
"""

import inspect
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from kfp import dsl, kubernetes

from stage1_pro import __version__, cluster, sizing
from stage1_pro.components.calibrate import calibrate
from stage1_pro.components.check_config import check_config, fingerprint
from stage1_pro.components.data import merge_prepared, plan_shards, prepare, split
from stage1_pro.components.drift import drift_check
from stage1_pro.components.export import export, publish
from stage1_pro.components.image import GPU_TAG_SUFFIX, component_image
from stage1_pro.components.report import record_outcome, report_run
from stage1_pro.components.runtime import NODE_NAME_ENV
from stage1_pro.components.train import train
from stage1_pro.components.validate import validate
from stage1_pro.policy_registry import list_policies
from stage1_pro.run_parameters import PARAMETERS, check_gpu_type, pipeline_docstring
from stage1_pro.run_report import EXPORT_STAGE, VALIDATE_STAGE

PIPELINE_NAME = "stage1-pro"
PIPELINE_DESCRIPTION = (
    "Train, certify (FNR_exit <= target and FPR_exit <= max_fpr_exit with probability >= 1 - delta) "
    "and ship the stage-1 exit classifier of a cascade."
)
TRAIN_RETRIES = 3
TRAIN_RETRY_BACKOFF_S = 120
TRAIN_RETRY_BACKOFF_FACTOR = 2  # Argo parses the factor as an integer
#: Wall-clock limit of one train pod (Kubernetes activeDeadlineSeconds): a hung run stops paying
#: for its GPU. Ten epochs of ViT-S/14 over a million 224-px images take well under an hour.
TRAIN_TIMEOUT_S = 12 * 3600
#: Argo measures backoff.maxDuration from the first attempt's start and gives every retry pod that
#: deadline; the SDK default (3600 s) would forbid any retry after an hour. Cover every attempt.
TRAIN_RETRY_MAX_DURATION_S = (TRAIN_RETRIES + 1) * TRAIN_TIMEOUT_S + sum(
    TRAIN_RETRY_BACKOFF_S * TRAIN_RETRY_BACKOFF_FACTOR**i for i in range(TRAIN_RETRIES)
)
#: Decoding processes of one prepare pod = its CPU request. With GKE's reservations, the system
#: DaemonSets and Argo's wait sidecar, 6 leaves headroom on an e2-standard-8 (7.91 allocatable).
PREPARE_WORKERS = 6
#: CPU tasks' (request, limit) of CPU and memory. Requests and limits are both set: the namespace's
#: LimitRange would otherwise impose its default limit, and reject a request above it.
CPU_TASK_RESOURCES: dict[str, tuple[str, str, str, str]] = {
    "check-config": ("0.5", "1", "1Gi", "2Gi"),
    "fingerprint": ("0.5", "1", "1Gi", "2Gi"),
    "split": ("1", "2", "2Gi", "4Gi"),
    "prepare": (str(PREPARE_WORKERS), str(PREPARE_WORKERS), "8Gi", "8Gi"),
    "plan-shards": ("0.25", "0.5", "512Mi", "1Gi"),
    "merge-prepared": ("0.5", "1", "2Gi", "4Gi"),
    "drift-check": ("1", "2", "4Gi", "8Gi"),
    "calibrate": ("1", "2", "2Gi", "4Gi"),
    "validate": ("1", "2", "4Gi", "8Gi"),
    "export": ("1", "2", "4Gi", "8Gi"),
    "publish": ("0.5", "1", "2Gi", "4Gi"),
    "record-outcome": ("0.25", "0.5", "1Gi", "2Gi"),
    "report-run": ("0.25", "0.5", "1Gi", "2Gi"),
}
#: Pod labels for cost attribution (GKE cost allocation breaks costs down by pod label).
APP_LABEL = "app"
VERSION_LABEL = "pipeline-version"
TASK_LABEL = "task"
#: Name of the train pod's shared-memory volume.
SHM_VOLUME = "dshm"

_D = {p.name: p.default for p in PARAMETERS}


def resolve_images(image: str | None = None, gpu_image: str | None = None) -> tuple[str, str]:
    """(CPU image, GPU image) for a compile: the overrides, else the images of ``components/image.py``.

    ``image`` alone also moves the GPU image to ``<image>-gpu``, as ``STAGE1_PRO_IMAGE`` does.
    """
    cpu = image or component_image()
    if gpu_image:
        gpu = gpu_image
    elif image:
        gpu = f"{image}{GPU_TAG_SUFFIX}"
    else:
        gpu = component_image(gpu=True)
    return cpu, gpu


def run_parameters_signature(gpu_type_default: str) -> inspect.Signature:
    """The pipeline function's signature: one typed parameter per run parameter, in table order.

    Generated from :data:`stage1_pro.run_parameters.PARAMETERS` (names, types, defaults), so a
    parameter is declared once; KFP reads the pipeline's inputs from this signature.

    Args:
        gpu_type_default: the default of ``gpu_type`` for this compile.
    """
    defaults = {**_D, "gpu_type": gpu_type_default}
    return inspect.Signature(
        [
            inspect.Parameter(
                p.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=p.type,
                default=inspect.Parameter.empty if p.required else defaults[p.name],
            )
            for p in PARAMETERS
        ]
    )


def policy_branches(exit_policy: Any, branch: Callable[[str], None]) -> None:
    """``dsl.If/Elif/.../Else`` on ``exit_policy``, one branch per registered policy, in order.

    The first registered policy is the ``If``, the last the ``Else`` (``exit-policy-<name>``
    groups); ``branch(name)`` adds the branch's tasks.
    """
    names = list_policies()
    for i, name in enumerate(names):
        group = f"exit-policy-{name}"
        if i == 0:
            condition = dsl.If(exit_policy == name, name=group)
        elif i < len(names) - 1:
            condition = dsl.Elif(exit_policy == name, name=group)
        else:
            condition = dsl.Else(name=group)
        with condition:
            branch(name)


def register_resource_channels(task: Any, *channels: Any) -> Any:
    """Declare the run-time resource values a task uses as its inputs (a kfp 2.17.3 compiler bug).

    ``set_cpu_*``, ``set_memory_*`` and ``set_accelerator_*`` do not register their channels. A
    channel from the task's own DAG compiles anyway, but one from outside a sub-DAG (a pipeline
    parameter, or a task above the ExitHandler) does not reach the sub-DAG's inputs: the driver
    fails at run time (``parent DAG does not have input parameter``), or compilation fails for a
    task output. Registering them keeps the train task correct wherever check-config sits.
    """
    task.register_pipeline_channels(list(channels))
    return task


def label_pod(task: Any, name: str) -> Any:
    """Pod labels app / pipeline-version / task, for cost attribution (needs backend >= 2.14)."""
    kubernetes.add_pod_label(task, APP_LABEL, PIPELINE_NAME)
    kubernetes.add_pod_label(task, VERSION_LABEL, __version__)
    kubernetes.add_pod_label(task, TASK_LABEL, name)
    return task


def build_pipeline(
    *, image: str | None = None, gpu_image: str | None = None, gpu_type: str | None = None
) -> Any:
    """Build the pipeline (a KFP ``GraphComponent``).

    Args:
        image: image of the CPU tasks (default: :func:`stage1_pro.components.image.component_image`).
        gpu_image: image of the train task (default: ``<image>-gpu``, or the GPU image of image.py).
        gpu_type: default of the ``gpu_type`` parameter (the GPU node pool's accelerator label).

    Returns:
        The pipeline, ready for ``kfp.compiler.Compiler().compile``.
    """
    cpu_image, train_image = resolve_images(image, gpu_image)
    gpu_type_default = check_gpu_type(gpu_type) if gpu_type else _D["gpu_type"]

    def cpu_task(task: Any, kind: str, name: str | None = None) -> Any:
        cpu_req, cpu_lim, mem_req, mem_lim = CPU_TASK_RESOURCES[kind]
        task.set_container_image(cpu_image)
        task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
        task.set_memory_request(mem_req).set_memory_limit(mem_lim)
        kubernetes.set_security_context(task, **cluster.SECURITY_CONTEXT)
        label_pod(task, name or kind)
        return task.set_display_name(name or kind)

    def uncached(task: Any) -> Any:
        return task.set_caching_options(enable_caching=False)

    signature = run_parameters_signature(gpu_type_default)

    def stage1_pro(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = SimpleNamespace(**bound.arguments)
        run_ids = {
            "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            "run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        }
        reported = cpu_task(
            report_run(publish_prefix=params.publish_prefix, webhook_url=params.webhook_url, **run_ids),
            "report-run",
        )
        uncached(reported)
        with dsl.ExitHandler(reported, name="stage1-pro-run"):
            checked = cpu_task(
                check_config(**vars(params)),
                "check-config",
            )
            uncached(checked)  # reads the starting weights' version: train's cache key
            # The dataset as an artifact: the UI shows its lineage. The URI is a pipeline parameter
            # (the backend resolves an importer URI from a parent-DAG input only, never a task output).
            dataset = dsl.importer(
                artifact_uri=params.data_uri, artifact_class=dsl.Dataset, reimport=False
            ).set_display_name("dataset")
            dataset.after(checked)
            # Never cached: its output is the cache key of everything that reads the data.
            fp = uncached(cpu_task(fingerprint(dataset=dataset.output), "fingerprint"))
            splits = cpu_task(
                split(dataset=dataset.output, data_fingerprint=fp.output, seed=params.seed), "split"
            )
            planned = cpu_task(
                plan_shards(count=params.prepare_shards, preprocessing=checked.outputs["preprocessing"]),
                "plan-shards",
            )
            with dsl.ParallelFor(planned.output) as shard:
                sliced = cpu_task(
                    prepare(
                        dataset=dataset.output,
                        img_size=params.img_size,
                        splits=splits.outputs["splits"],
                        shard=shard,
                        workers=PREPARE_WORKERS,
                    ),
                    "prepare",
                )
            prepared = cpu_task(
                merge_prepared(slices=dsl.Collected(sliced.outputs["Output"]), data_fingerprint=fp.output),
                "merge-prepared",
            )

            # Before training: is the new data still like what the champion was certified on? Never
            # cached (latest may move); its output pins the champion version validate compares with.
            drifted = uncached(
                cpu_task(
                    drift_check(data_uri=params.data_uri, champion_prefix=params.champion_prefix),
                    "drift-check",
                )
            )
            drifted.after(fp)

            trained = train(
                config_json=checked.outputs["config_json"],
                splits=splits.outputs["splits"],
                prepared=prepared.outputs["prepared"],
                data_fingerprint=fp.output,
                weights_version=checked.outputs["weights_version"],
                gpu_count=params.gpu_count,
            ).set_display_name("train")
            trained.set_container_image(train_image)
            gpus = checked.outputs["train_gpu_count"]
            cpu = checked.outputs["train_cpu_request"]
            memory = checked.outputs["train_memory_request"]
            trained.set_accelerator_type(cluster.GPU_RESOURCE).set_accelerator_limit(gpus)
            trained.set_cpu_request(cpu).set_cpu_limit(cpu)
            trained.set_memory_request(memory).set_memory_limit(memory)
            register_resource_channels(trained, gpus, cpu, memory)
            trained.set_retry(
                num_retries=TRAIN_RETRIES,
                backoff_duration=f"{TRAIN_RETRY_BACKOFF_S}s",
                backoff_factor=TRAIN_RETRY_BACKOFF_FACTOR,
                backoff_max_duration=f"{TRAIN_RETRY_MAX_DURATION_S}s",
            )
            kubernetes.add_node_selector_json(trained, checked.outputs["gpu_node_selector"])
            kubernetes.add_toleration(trained, **cluster.GPU_TOLERATION)
            kubernetes.set_security_context(trained, **cluster.SECURITY_CONTEXT)
            kubernetes.empty_dir_mount(
                trained, SHM_VOLUME, "/dev/shm", medium="Memory", size_limit=sizing.shm_size()
            )
            kubernetes.use_field_path_as_env(trained, NODE_NAME_ENV, "spec.nodeName")
            kubernetes.set_timeout(trained, TRAIN_TIMEOUT_S)
            label_pod(trained, "train")
            trained.after(drifted)

            def branch(policy: str) -> None:
                calibrated = cpu_task(
                    calibrate(
                        scores=trained.outputs["scores"],
                        exit_policy=policy,
                        target_fnr_exit=params.target_fnr_exit,
                        delta=params.delta,
                        max_fpr_exit=params.max_fpr_exit,
                    ),
                    "calibrate",
                    f"calibrate-{policy}",
                )
                validated = cpu_task(
                    validate(
                        model=trained.outputs["model"],
                        policy=calibrated.outputs["policy"],
                        data_uri=params.data_uri,
                        champion_uri=drifted.outputs["Output"],
                    ),
                    "validate",
                )
                uncached(
                    cpu_task(
                        record_outcome(
                            stage=VALIDATE_STAGE, result=validated.outputs["validation"], **run_ids
                        ),
                        "record-outcome",
                        "record-verdict",
                    )
                )
                with dsl.If(validated.outputs["Output"] == True, name="blessed"):  # noqa: E712 - a KFP condition
                    exported = cpu_task(
                        export(
                            model=trained.outputs["model"],
                            policy=calibrated.outputs["policy"],
                            validation=validated.outputs["validation"],
                        ),
                        "export",
                    )
                    uncached(
                        cpu_task(
                            record_outcome(stage=EXPORT_STAGE, result=exported.outputs["bundle"], **run_ids),
                            "record-outcome",
                            "record-bundle",
                        )
                    )
                    with dsl.If(params.publish_prefix != "", name="publish-prefix-set"):
                        cpu_task(
                            publish(
                                bundle=exported.outputs["bundle"],
                                prefix=params.publish_prefix,
                                champion_prefix=params.champion_prefix,
                                champion=drifted.outputs["Output"],
                            ),
                            "publish",
                        )

            policy_branches(params.exit_policy, branch)

    stage1_pro.__signature__ = signature  # type: ignore[attr-defined]  # what KFP reads the inputs from
    stage1_pro.__doc__ = pipeline_docstring(PIPELINE_DESCRIPTION)
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(stage1_pro)


#: The pipeline with the default images and GPU type.
stage1_pro_pipeline = build_pipeline()
