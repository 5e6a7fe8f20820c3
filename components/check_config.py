"""Cheap first steps: validate the run's settings, and fingerprint the dataset."""

from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def check_config(
    data_uri: str,
    phase: int,
    exit_policy: str,
    target_fnr_exit: float,
    delta: float,
    max_fpr_exit: float,
    model_name: str,
    weights_uri: str,
    img_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    gpu_type: str,
    gpu_count: int,
    prepare_shards: int,
    publish_prefix: str,
    champion_prefix: str,
    webhook_url: str,
    config_overrides: dict,
    config: Output[Artifact],
) -> NamedTuple(
    "CheckConfigOutputs",
    [
        ("config_json", str),
        ("preprocessing", dict),
        ("gpu_node_selector", dict),
        ("train_gpu_count", str),
        ("train_cpu_request", str),
        ("train_memory_request", str),
        ("weights_version", str),
    ],
):
    """Validate the run's parameters and write the resolved training config (config.json).

    Runs first and on a small CPU pod, so a bad combination (a policy the phase cannot train, a
    target outside (0, 0.1], an unknown setting in config_overrides, a malformed GPU type, more
    GPUs than a node has, missing starting weights) fails before any GPU node is requested. Also
    derives the train task's node selector from gpu_type and its GPU, CPU and memory requests from
    gpu_count, as strings: the KFP driver resolves a resource placeholder with the parameter's
    string value only. Never cached: it reads the starting weights' current version.

    Args:
        data_uri: Dataset manifest or image-folder prefix (local or gs://).
        phase: Capability level 1..6.
        exit_policy: softmax, gate or scrc (allowed set depends on phase).
        target_fnr_exit: Certified FNR_exit bound, in (0, 0.1].
        delta: Certificate failure probability, in (0, 0.5].
        max_fpr_exit: Guard certified with the target (FPR_exit bound), in (0, 1].
        model_name: timm backbone name.
        weights_uri: Starting weights file; empty for the timm hub's.
        img_size: Resolution in pixels.
        epochs: Training epochs.
        batch_size: Global batch size.
        lr: Peak learning rate.
        seed: Seed of splits and training.
        gpu_type: cloud.google.com/gke-accelerator label value of the GPU node pool.
        gpu_count: GPUs of the train task (data-parallel workers).
        prepare_shards: Pods that decode the images in parallel.
        publish_prefix: Registry prefix to publish to; empty for none.
        champion_prefix: Registry prefix of the model in production; empty for none.
        webhook_url: Where the end-of-run report is POSTed; empty for none.
        config_overrides: Further Stage1ProConfig settings.
        config: The resolved, schema-validated config.json (for lineage and the UI).

    Returns:
        config_json: The same config as canonical JSON, the train task's input. A string, compared
            by value in the cache key: a new publish_prefix does not invalidate a trained model whose
            config is unchanged.
        preprocessing: The config's preprocessing modes (resize, decode, interpolation), the
            prepare task's input: the shards are made as the config will train and serve, and a
            change of another setting does not invalidate them.
        gpu_node_selector: Node selector of the train task.
        train_gpu_count: nvidia.com/gpu limit of the train task.
        train_cpu_request: CPU request of the train task.
        train_memory_request: Memory request of the train task (host memory plus /dev/shm).
        weights_version: The starting weights' object generation (GCS) or sha256 (local file), empty
            for the timm hub's: train's cache key, so new weights at the same URI retrain.
    """
    from stage1_pro.config import config_json, save_config
    from stage1_pro.preprocessing import PixelSpec
    from stage1_pro.provenance import content_version
    from stage1_pro.run_parameters import check_parameters

    checked = check_parameters(
        {
            "data_uri": data_uri,
            "phase": phase,
            "exit_policy": exit_policy,
            "target_fnr_exit": target_fnr_exit,
            "delta": delta,
            "max_fpr_exit": max_fpr_exit,
            "model_name": model_name,
            "weights_uri": weights_uri,
            "img_size": img_size,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "gpu_type": gpu_type,
            "gpu_count": gpu_count,
            "prepare_shards": prepare_shards,
            "publish_prefix": publish_prefix,
            "champion_prefix": champion_prefix,
            "webhook_url": webhook_url,
            "config_overrides": config_overrides,
        }
    )
    weights_version = content_version(weights_uri) if weights_uri else ""
    save_config(checked.config, config.path)
    config.metadata.update({"phase": phase, "exit_policy": exit_policy, "model_name": model_name})
    print(
        f"[stage1-pro] check-config: phase {phase}, exit_policy {exit_policy}, target_fnr_exit "
        f"{target_fnr_exit}, max_fpr_exit {max_fpr_exit}, delta {delta}, {model_name} @ {img_size}px; "
        f"train on {gpu_count} x {gpu_type} "
        f"(cpu {checked.train_cpu_request}, memory {checked.train_memory_request}, "
        f"{checked.config.num_workers} loader workers per GPU); prepare in {prepare_shards} pod(s)"
        + (f"; weights {weights_version}" if weights_version else "")
    )
    return (
        config_json(checked.config),
        PixelSpec.from_config(checked.config).record(),
        checked.gpu_node_selector,
        checked.train_gpu_count,
        checked.train_cpu_request,
        checked.train_memory_request,
        weights_version,
    )


@stage1_component
def fingerprint(dataset: Input[Dataset]) -> str:
    """Fingerprint the dataset: the sha256 of its canonical manifest (image URIs and labels).

    Never cached. split, prepare and train take the fingerprint as an input, so their cached
    results are reused only while the dataset is unchanged; a dataset with new or relabelled images
    gets a new fingerprint and everything downstream recomputes.

    Args:
        dataset: The run's dataset (dsl.importer of data_uri): a manifest or image-folder prefix.

    Returns:
        The dataset fingerprint (64 hex digits).
    """
    from stage1_pro.data import load_dataset

    data = load_dataset(dataset.uri, check_files=False)
    positives = int(data.labels.sum())
    print(
        f"[stage1-pro] fingerprint: {len(data)} images ({positives} positive) in {dataset.uri}: "
        f"{data.fingerprint[:16]}..."
    )
    return data.fingerprint
