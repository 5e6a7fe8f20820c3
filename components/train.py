"""The train component: the pipeline's only GPU task."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from stage1_pro.components.base import stage1_component


@stage1_component(gpu=True)
def train(
    config_json: str,
    splits: Input[Dataset],
    prepared: Input[Dataset],
    data_fingerprint: str,
    weights_version: str,
    gpu_count: int,
    model: Output[Model],
    scores: Output[Dataset],
    metrics: Output[Metrics],
):
    """Train the stage-1 network for the config's phase and score every held-out split.

    Reads the prepared shards (no image decoding per epoch). Picks the checkpoint on val_select and
    writes the scores contract (class probabilities and, from phase 3, gate logits) for val_select,
    val_calib and test, which calibration and validation use without the model. With gpu_count > 1
    it trains data-parallel in this pod (DDP, one process per GPU, launched by torchrun) with the
    same global batch. On a GCS pipeline root the run directory (with a checkpoint every epoch)
    lives at <model uri>.run, so a retry after a preempted node resumes where the killed pod
    stopped. In a pod that sees fewer GPUs than gpu_count it stops at once with an error naming
    the node; it never trains on the CPU in their place.

    Args:
        config_json: The resolved config (canonical JSON) from check-config.
        splits: splits.json from the split step.
        prepared: Prepared shards from the prepare step.
        data_fingerprint: Dataset fingerprint (cache key: a changed dataset is never served from cache).
        weights_version: The starting weights' content version from check-config (cache key: new
            weights at the same URI retrain).
        gpu_count: GPUs of this task = data-parallel processes.
        model: Run directory: model_best.pth, model.json, config.json, splits.json, metrics.csv, scores.npz.
        scores: scores.npz (val_select, val_calib, test).
        metrics: Training summary (best val_select metrics, epochs, wall time).
    """
    import json
    import os

    from stage1_pro.components.runtime import (
        copy_file,
        copy_run_files,
        durable_run_dir,
        log_metrics,
        require_gpus,
    )
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.layout import RunDir
    from stage1_pro.training.launcher import train_processes

    require_gpus(gpu_count)
    cfg = Stage1ProConfig.from_dict(json.loads(config_json), source="check-config's config_json")
    remote_run_dir = durable_run_dir(model.uri)
    print(
        f"[stage1-pro] train: phase {cfg.phase}, {cfg.model_name} @ {cfg.img_size}px, {gpu_count} process(es)"
    )
    summary = train_processes(
        cfg,
        gpu_count,
        prepared_uri=prepared.path,
        splits_uri=splits.path,
        out_dir=remote_run_dir or model.path,
        resume=True,
    )
    if remote_run_dir:
        os.makedirs(model.path, exist_ok=True)
        copy_run_files(remote_run_dir, model.path)
    copy_file(RunDir(model.path).scores, scores.path)
    log_metrics(metrics, {k: v for k, v in summary.items() if k != "out_dir"})
    model.metadata.update(
        {
            "framework": "pytorch",
            "model_name": cfg.model_name,
            "phase": cfg.phase,
            "img_size": cfg.img_size,
            "data_fingerprint": data_fingerprint,
            "weights_version": weights_version,
        }
    )
    best, test = summary["best"], summary["test"]["accuracy"]
    print(
        f"[stage1-pro] train: best {summary['monitor']} {best:.4f} at epoch {summary['best_epoch']} of "
        f"{summary['epochs']} ({summary['seconds']:.0f} s); test accuracy {test:.4f}"
    )
