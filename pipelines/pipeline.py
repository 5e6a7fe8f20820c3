"""The stage1-pro Kubeflow pipeline: check config -> fingerprint -> split -> prepare -> drift check
against the champion -> train (GPU) -> one exit-policy branch (calibrate -> validate against the
champion -> export if blessed -> publish if asked).

Build it with :func:`build_pipeline` (``stage1-pro compile`` does), or use the module-level
:data:`stage1_pro_pipeline` (``kfp dsl compile --py pipelines/pipeline.py``).

Design notes
- Branches: ``dsl.If/Elif/Else`` on ``exit_policy``, one per registered exit policy in registration
  order (:mod:`stage1_pro.policy_registry`), each self-contained (its own calibrate, validate and
  export tasks, the same components; calibrate takes the branch's policy as a parameter). No
  artifact ``dsl.OneOf``: it fails under ``kfp.local`` and needs KFP backend >= 2.17, while
  self-contained branches run everywhere and keep typed artifacts and lineage. The Else branch is
  the last registered policy (``scrc``): check-config has already rejected any other value.
- GPU: only the train task requests one (``nvidia.com/gpu`` x ``gpu_count``), with the GKE
  accelerator node selector and the ``nvidia.com/gpu`` toleration. The GPU model comes from the
  ``gpu_type`` parameter at run time: check-config turns it into a node selector, applied with
  ``kfp.kubernetes.add_node_selector_json`` (``set_accelerator_type`` cannot take a run-time value
  in kfp 2.17 and only names the resource anyway). The count is a run-time value too.
- Caching: every task is cached on its inputs except ``fingerprint``, whose output (the dataset's
  sha256) is an input of split, prepare and train: an unchanged dataset reuses their results, a
  changed one recomputes everything downstream; and ``drift-check``, which resolves the champion
  (``champion_prefix``'s latest) once per run: its output, the champion's ``PREFIX/VERSION``, is
  validate's input, so a moved ``latest`` invalidates a cached validation.
- Retries: train retries on failure (preemptible GPU nodes); on a GCS pipeline root it writes its
  run directory and per-epoch checkpoints straight to ``<model uri>.run``, which every retry of
  the task sees, and resumes from there (see ``stage1_pro.components.runtime.durable_run_dir``).
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl, kubernetes

from stage1_pro import cluster
from stage1_pro.components.calibrate import calibrate
from stage1_pro.components.check_config import check_config, fingerprint
from stage1_pro.components.data import prepare, split
from stage1_pro.components.drift import drift_check
from stage1_pro.components.export import export, publish
from stage1_pro.components.image import GPU_TAG_SUFFIX, component_image
from stage1_pro.components.train import train
from stage1_pro.components.validate import validate
from stage1_pro.policy_registry import list_policies
from stage1_pro.run_parameters import PARAMETERS, check_gpu_type, pipeline_docstring

PIPELINE_NAME = "stage1-pro"
PIPELINE_DESCRIPTION = (
    "Train, certify (FNR_exit <= target and FPR_exit <= max_fpr_exit with probability >= 1 - delta) "
    "and ship the stage-1 exit classifier of a cascade."
)
TRAIN_RETRIES = 3
TRAIN_RETRY_BACKOFF = "120s"
#: CPU tasks' (request, limit) of CPU and memory. Requests and limits are both set: the namespace's
#: LimitRange would otherwise impose its default limit, and reject a request above it.
CPU_TASK_RESOURCES: dict[str, tuple[str, str, str, str]] = {
    "check-config": ("0.5", "1", "1Gi", "2Gi"),
    "fingerprint": ("0.5", "1", "1Gi", "2Gi"),
    "split": ("1", "2", "2Gi", "4Gi"),
    "prepare": ("8", "8", "16Gi", "16Gi"),
    "calibrate": ("1", "2", "2Gi", "4Gi"),
    "drift-check": ("1", "2", "4Gi", "8Gi"),
    "validate": ("1", "2", "4Gi", "8Gi"),
    "export": ("1", "2", "4Gi", "8Gi"),
    "publish": ("0.5", "1", "2Gi", "4Gi"),
}

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


def build_pipeline(
    *, image: str | None = None, gpu_image: str | None = None, gpu_type: str | None = None
) -> Any:
    """Build the pipeline (a KFP ``GraphComponent``).

    Args:
        image: image of the CPU tasks (default: :func:`stage1_pro.components.image.component_image`).
        gpu_image: image of the train task (default: ``<image>-gpu``, or the GPU image of image.py).
        gpu_type: default of the ``gpu_type`` parameter (the GPU node pool's accelerator label).
    """
    cpu_image, train_image = resolve_images(image, gpu_image)
    gpu_type_default = check_gpu_type(gpu_type) if gpu_type else _D["gpu_type"]

    def cpu_task(task: Any, kind: str, name: str | None = None) -> Any:
        cpu_req, cpu_lim, mem_req, mem_lim = CPU_TASK_RESOURCES[kind]
        task.set_container_image(cpu_image)
        task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
        task.set_memory_request(mem_req).set_memory_limit(mem_lim)
        kubernetes.set_security_context(task, **cluster.SECURITY_CONTEXT)
        return task.set_display_name(name or kind)

    def stage1_pro(
        data_uri: str,
        phase: int = _D["phase"],
        exit_policy: str = _D["exit_policy"],
        target_fnr_exit: float = _D["target_fnr_exit"],
        delta: float = _D["delta"],
        max_fpr_exit: float = _D["max_fpr_exit"],
        model_name: str = _D["model_name"],
        weights_uri: str = _D["weights_uri"],
        img_size: int = _D["img_size"],
        epochs: int = _D["epochs"],
        batch_size: int = _D["batch_size"],
        lr: float = _D["lr"],
        seed: int = _D["seed"],
        gpu_type: str = gpu_type_default,
        gpu_count: int = _D["gpu_count"],
        publish_prefix: str = _D["publish_prefix"],
        champion_prefix: str = _D["champion_prefix"],
        config_overrides: dict = _D["config_overrides"],
    ):
        checked = cpu_task(
            check_config(
                data_uri=data_uri,
                phase=phase,
                exit_policy=exit_policy,
                target_fnr_exit=target_fnr_exit,
                delta=delta,
                max_fpr_exit=max_fpr_exit,
                model_name=model_name,
                weights_uri=weights_uri,
                img_size=img_size,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                gpu_type=gpu_type,
                gpu_count=gpu_count,
                publish_prefix=publish_prefix,
                champion_prefix=champion_prefix,
                config_overrides=config_overrides,
            ),
            "check-config",
        )
        # Never cached: its output is the cache key of everything that reads the data.
        fp = cpu_task(fingerprint(data_uri=data_uri), "fingerprint").after(checked)
        fp.set_caching_options(enable_caching=False)
        splits = cpu_task(split(data_uri=data_uri, data_fingerprint=fp.output, seed=seed), "split")
        prepared = cpu_task(
            prepare(
                data_uri=data_uri,
                data_fingerprint=fp.output,
                img_size=img_size,
                preprocessing=checked.outputs["preprocessing"],
                splits=splits.outputs["splits"],
            ),
            "prepare",
        )

        # Before training: is the new data still like what the champion was certified on? Never cached
        # (latest may move); its output pins the champion version validate compares with.
        drifted = cpu_task(drift_check(data_uri=data_uri, champion_prefix=champion_prefix), "drift-check")
        drifted.after(fp)
        drifted.set_caching_options(enable_caching=False)

        trained = train(
            config_json=checked.outputs["config_json"],
            splits=splits.outputs["splits"],
            prepared=prepared.outputs["prepared"],
            data_fingerprint=fp.output,
            gpu_count=gpu_count,
        ).set_display_name("train")
        trained.set_container_image(train_image)
        trained.set_accelerator_type(cluster.GPU_RESOURCE).set_accelerator_limit(gpu_count)
        trained.set_cpu_request(checked.outputs["train_cpu_request"])
        trained.set_cpu_limit(checked.outputs["train_cpu_request"])
        trained.set_memory_request(checked.outputs["train_memory_request"])
        trained.set_memory_limit(checked.outputs["train_memory_request"])
        trained.set_retry(num_retries=TRAIN_RETRIES, backoff_duration=TRAIN_RETRY_BACKOFF, backoff_factor=2.0)
        kubernetes.add_node_selector_json(trained, checked.outputs["gpu_node_selector"])
        kubernetes.add_toleration(trained, **cluster.GPU_TOLERATION)
        kubernetes.set_security_context(trained, **cluster.SECURITY_CONTEXT)
        trained.after(drifted)

        def branch(policy: str) -> None:
            calibrated = cpu_task(
                calibrate(
                    scores=trained.outputs["scores"],
                    exit_policy=policy,
                    target_fnr_exit=target_fnr_exit,
                    delta=delta,
                    max_fpr_exit=max_fpr_exit,
                ),
                "calibrate",
                f"calibrate-{policy}",
            )
            validated = cpu_task(
                validate(
                    model=trained.outputs["model"],
                    policy=calibrated.outputs["policy"],
                    data_uri=data_uri,
                    champion_uri=drifted.outputs["Output"],
                ),
                "validate",
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
                with dsl.If(publish_prefix != "", name="publish-prefix-set"):
                    cpu_task(publish(bundle=exported.outputs["bundle"], prefix=publish_prefix), "publish")

        policy_branches(exit_policy, branch)

    stage1_pro.__doc__ = pipeline_docstring(PIPELINE_DESCRIPTION)
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(stage1_pro)


#: The pipeline with the default images and GPU type.
stage1_pro_pipeline = build_pipeline()
