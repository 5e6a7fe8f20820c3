"""The training engine behind ``stage1-pro train``, ``scripts/20_train.py`` and the KFP train task.

:func:`train` runs one phase recipe (:mod:`stage1_pro.training.phases`) end to end:

1. checks everything that can be checked before work (phase/policy matrix, phase built,
   fine-tune mode, model name, batch split over processes, data arguments);
2. reads prepared shards (``prepared_uri``), or prepares ``data_uri`` once into
   ``RUN_DIR/prepared`` (reused on resume);
3. builds the model (:func:`stage1_pro.models.create_model`), loss, AdamW and the cosine
   schedule; resumes from ``RUN_DIR/checkpoints/last.pth`` when it belongs to this run;
4. trains epoch by epoch (bf16 autocast on GPU, optional ``torch.compile``, gradient
   accumulation, DDP when launched by torchrun), validates on ``val_select`` after each
   epoch, writes ``metrics.csv``, keeps ``model_best.pth`` (plain merged weights) and a
   checkpoint; with a frozen backbone, features are extracted once and only the heads train;
5. reloads ``model_best.pth`` into a plain model and writes ``scores.npz`` for
   ``val_select``, ``val_calib`` and ``test``, and ``model.json``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stage1_pro import storage
from stage1_pro.config import Stage1ProConfig, save_config
from stage1_pro.errors import ConfigError, DataError, NotBuiltError
from stage1_pro.layout import CONFIG_FILE, METRICS_FILE, MODEL_FILE, MODEL_INFO_FILE, SPLITS_FILE, RunDir
from stage1_pro.preprocessing import PixelSpec
from stage1_pro.training import checkpoint as ckpt
from stage1_pro.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    per_rank_batch,
)
from stage1_pro.training.loaders import (
    EpochBatchSampler,
    ShardBatches,
    TensorBatches,
    device_batches,
    make_loader,
)
from stage1_pro.training.phases import PhaseRecipe, check_finetune_mode, get_phase
from stage1_pro.training.progress import Progress
from stage1_pro.training.scoring import autocast, predict, score_splits, softmax

_LOG = logging.getLogger("stage1_pro.training")

PREPARED_DIR = "prepared"


# ------------------------------------------------------------------------------------------
# setup helpers


def resolve_amp(config: Stage1ProConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA with ``amp=auto``; ``bf16`` forces it; ``off`` disables it."""
    if config.amp == "off" or (config.amp == "auto" and device.type != "cuda"):
        return None
    if config.amp in ("auto", "bf16"):
        return torch.bfloat16
    raise ConfigError(f"amp={config.amp!r}; allowed: auto, bf16, off")


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch/numpy; on CPU also ask for deterministic kernels (reproducible, resumable runs)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def preflight(config: Stage1ProConfig, data_uri: str | None, prepared_uri: str | None) -> PhaseRecipe:
    """Every check that needs no data or model; raises before any work is done."""
    from stage1_pro.models import check_model_name
    from stage1_pro.transforms import AUGMENTATIONS

    config.validate()  # phase/policy matrix and ranges
    recipe = get_phase(config.phase)  # NotBuiltError for a designed phase that is not built
    check_finetune_mode(recipe, config.resolved_finetune_mode)
    if recipe.check_config is not None:
        recipe.check_config(config)
    if config.resolved_finetune_mode == "peft" and config.peft_method == "doran":
        from stage1_pro.models.dora import DORAN_NOT_BUILT

        raise NotBuiltError(DORAN_NOT_BUILT)
    if config.augment not in AUGMENTATIONS:
        raise ConfigError(f"augment={config.augment!r}; allowed: {', '.join(AUGMENTATIONS)}")
    if (data_uri is None) == (prepared_uri is None):
        raise ConfigError(
            "pass exactly one of --data (manifest or image folder) or --prepared (a prepare output)"
        )
    check_model_name(config.model_name)
    return recipe


def _prepared_matches(uri: str, splits: dict[str, Any], spec: PixelSpec) -> bool:
    from stage1_pro.errors import ArtifactError
    from stage1_pro.prepare import INDEX_FILE, open_prepared, splits_sha256

    if not storage.exists(storage.join(uri, INDEX_FILE)):
        return False
    try:
        data = open_prepared(uri)
        made_with = data.pixel_spec
    except ArtifactError:
        return False
    return (
        made_with == spec
        and data.info["dataset"]["fingerprint"] == splits["dataset"]["fingerprint"]
        and data.info["splits"]["sha256"] == splits_sha256(splits)
    )


def _local_prepared_dir(out_dir: str) -> str:
    if not storage.is_gcs(out_dir):
        return storage.join(out_dir, PREPARED_DIR)
    import hashlib

    key = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "stage1-pro-prepared", key)


@dataclass
class SplitRows:
    """The prepared rows of each split, their dataset indices and labels."""

    rows: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    label: dict[str, np.ndarray]
    n_missing: dict[str, int] = field(default_factory=dict)


def open_data(
    config: Stage1ProConfig,
    splits: dict[str, Any],
    splits_uri: str,
    data_uri: str | None,
    prepared_uri: str | None,
    out_dir: str,
    info: DistInfo,
):
    """Open (preparing first if needed) the shards for this run and map every split to its rows."""
    from stage1_pro.prepare import open_prepared, prepare_dataset, splits_sha256
    from stage1_pro.splits import SPLIT_NAMES

    spec = PixelSpec.from_config(config)
    if prepared_uri is None:
        prepared_uri = _local_prepared_dir(out_dir)
        if info.is_main and not _prepared_matches(prepared_uri, splits, spec):
            prepare_dataset(data_uri, splits_uri, prepared_uri, spec, workers=max(1, config.num_workers))
        barrier(info)
    data = open_prepared(prepared_uri)
    data.check_matches(splits, prepared_uri)
    data.check_spec(spec, prepared_uri)  # the pixels trained and scored are the pixels served
    if data.info["splits"]["sha256"] != splits_sha256(splits):
        raise DataError(
            f"{prepared_uri} was prepared for other splits than {splits_uri}; "
            "re-run `stage1-pro prepare` with them"
        )
    rows, index, label, missing = {}, {}, {}, {}
    for name in SPLIT_NAMES:
        found, lost = data.rows_for(splits["indices"][name])
        rows[name], index[name], label[name] = found, data.index[found], data.label[found].astype(np.int64)
        missing[name] = int(lost.size)
        if lost.size:
            _LOG.warning(
                "%s: %d image(s) of split %s failed to decode at prepare time and are left out",
                prepared_uri,
                lost.size,
                name,
            )
        if not found.size:
            raise DataError(
                f"{prepared_uri}: split {name!r} has no images; check the splits and the prepare log"
            )
    return data, SplitRows(rows, index, label, missing)


# ------------------------------------------------------------------------------------------
# metrics


def legacy_decisions(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Softmax exit at a fixed confidence (monitoring only): argmax class where max prob >= t."""
    from stage1_pro.decisions import DEFER

    return np.where(probs.max(axis=1) >= threshold, probs.argmax(axis=1), DEFER).astype(np.int8)


def epoch_metrics(
    outputs: dict[str, np.ndarray], labels: np.ndarray, loss_fn: nn.Module, config: Stage1ProConfig
) -> dict[str, float | None]:
    """Validation metrics of one epoch: loss on the whole split, accuracy, monitoring exits."""
    from stage1_pro.decisions import DEFER
    from stage1_pro.metrics import exit_metrics

    tensors = {k: torch.from_numpy(v) for k, v in outputs.items() if k != "row"}
    was_training = loss_fn.training
    loss_fn.eval()
    with torch.no_grad():
        val = loss_fn(tensors, torch.from_numpy(labels))
    loss_fn.train(was_training)
    probs = softmax(outputs["logits"])
    pred = probs.argmax(axis=1)
    legacy = exit_metrics(
        legacy_decisions(probs, config.legacy_exit_threshold_for_logging),
        labels,
        confidence=probs.max(axis=1),
        predictions=pred,
    )
    row: dict[str, float | None] = {
        "val_loss": float(val["loss"]),
        "val_accuracy": float((pred == labels).mean()),
        "val_aurc": legacy.get("aurc"),
        "val_coverage_legacy": legacy["coverage"],
        "val_fnr_exit_legacy": legacy["fnr_exit"],
    }
    if "gate_logit" in outputs:  # phase >= 3: the gate at its untrained-for threshold 0, monitoring only
        gate = exit_metrics(np.where(outputs["gate_logit"] >= 0, pred, DEFER).astype(np.int8), labels)
        row.update(
            {
                "val_gate_coverage": gate["coverage"],
                "val_gate_fnr_exit": gate["fnr_exit"],
                "val_soft_coverage": float(val["coverage"]),
                "val_soft_fnr": float(val["fnr_soft"]),
            }
        )
    return row


def write_metrics_csv(uri: str, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv (one row per finished epoch) atomically."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()}
        )
    storage.write_text(uri, buf.getvalue(), content_type="text/csv")


def _save_state_dict(uri: str, state: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())


# ------------------------------------------------------------------------------------------
# the loop


@dataclass
class PhaseContext:
    """What a phase's ``before_training`` hook gets: the model before supervised training and the data."""

    config: Stage1ProConfig
    model: nn.Module
    shards: ShardBatches
    split_rows: SplitRows
    device: torch.device
    dist: DistInfo
    out_dir: str


@dataclass
class TrainState:
    """Everything one epoch of training touches (also what hooks of later phases receive)."""

    config: Stage1ProConfig
    recipe: PhaseRecipe
    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    model: nn.Module  # the Stage1Model (never wrapped)
    module: nn.Module  # what trains: the model, or its heads on cached features
    step_module: nn.Module  # ``module`` wrapped by DDP / torch.compile
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    normalize_input: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_dir: str
    epochs: int
    epoch: int = 0


def prepare_batch(
    state: TrainState, x: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Device batch -> network input: uint8 NHWC -> normalised NCHW (+ augmentation when training)."""
    from stage1_pro.transforms import augment, normalize

    if not state.normalize_input:
        return x
    x = normalize(x, state.mean, state.std)
    if state.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    if generator is not None and state.config.augment != "none":
        x = augment(x, state.config.augment, generator)
    return x


def default_train_step(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, accum: int, *, last_micro: bool = True
) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch (loss scaled by 1/accum); returns the loss dict.

    ``last_micro`` tells a custom step (a recipe's ``train_step``) that the optimiser steps next.
    """
    with autocast(state.device, state.amp_dtype):
        outputs = state.step_module(x)
    losses = state.loss_fn(outputs, y)
    (losses["loss"] / accum).backward()
    return losses


def train_one_epoch(state: TrainState, loader: torch.utils.data.DataLoader, epoch: int) -> dict[str, float]:
    """One pass over the training batches; returns mean losses, seconds and images/s."""
    config, dist_info = state.config, state.dist
    accum = config.grad_accum_steps
    state.module.train()
    state.loss_fn.train()
    step_fn = state.recipe.train_step or default_train_step
    # Per-(seed, epoch, rank) streams: a resumed epoch replays exactly.
    torch.manual_seed(config.seed * 7919 + epoch * 104729 + dist_info.rank)
    aug_gen = torch.Generator(state.device).manual_seed(config.seed * 31337 + epoch * 1009 + dist_info.rank)
    sums: dict[str, torch.Tensor] = {}
    n_steps = len(loader)
    progress = Progress(
        n_steps, f"epoch {epoch + 1}/{state.epochs}", enabled=dist_info.is_main, log_every=config.log_every
    )
    start, n_images = time.perf_counter(), 0
    for step, (x, y, _) in enumerate(device_batches(loader, state.device)):
        x = prepare_batch(state, x, aug_gen)
        last_micro = (step + 1) % accum == 0 or step + 1 == n_steps
        sync = getattr(state.step_module, "no_sync", None)
        ctx = sync() if (sync is not None and not last_micro) else contextlib.nullcontext()
        with ctx:
            losses = step_fn(state, x, y, accum, last_micro=last_micro)
        if last_micro:
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.scheduler.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
        n_images += int(y.shape[0])
        progress.update(loss=losses["loss"].detach())
    progress.close()
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)  # the last steps may still be queued
    seconds = time.perf_counter() - start
    means = {f"train_{k}": float(all_reduce_mean(dist_info, v / max(1, n_steps))) for k, v in sums.items()}
    means["train_seconds"] = seconds
    means["train_img_per_s"] = n_images * dist_info.world_size / max(seconds, 1e-9)
    return means


# ------------------------------------------------------------------------------------------
# public entry point


def train(
    config: Stage1ProConfig,
    *,
    data_uri: str | None = None,
    prepared_uri: str | None = None,
    splits_uri: str,
    out_dir: str,
    resume: bool = True,
) -> dict[str, Any]:
    """Train one phase and write the run directory; return a summary dict.

    Args:
        config: resolved settings (phase, exit_policy, model, optimisation...).
        data_uri: manifest or image folder (prepared once into ``out_dir/prepared``), or
        prepared_uri: the output of ``stage1-pro prepare`` (exactly one of the two).
        splits_uri: ``splits.json`` for that dataset.
        out_dir: run directory (local or ``gs://``): config.json, splits.json, metrics.csv,
            model_best.pth, model.json, scores.npz, checkpoints/last.pth.
        resume: continue from ``checkpoints/last.pth`` when present (it must belong to this
            config and data); ``False`` starts over.

    Returns:
        ``{"out_dir", "phase", "epochs", "best_epoch", "best", "monitor", "val_select",
        "test", "seconds", ...}``.

    Raises:
        ConfigError, NotBuiltError, DataError, ArtifactError, StorageError: bad input, before
        any work where it can be detected early.
    """
    from stage1_pro.splits import load_splits

    recipe = preflight(config, data_uri, prepared_uri)
    splits = load_splits(splits_uri)
    dist_info = init_distributed(config.device)
    try:
        return _train(
            config, recipe, splits, splits_uri, data_uri, prepared_uri, str(out_dir), resume, dist_info
        )
    finally:
        cleanup(dist_info)


def _train(
    config: Stage1ProConfig,
    recipe: PhaseRecipe,
    splits: dict[str, Any],
    splits_uri: str,
    data_uri: str | None,
    prepared_uri: str | None,
    out_dir: str,
    resume: bool,
    dist_info: DistInfo,
) -> dict[str, Any]:
    from stage1_pro.losses import create_loss
    from stage1_pro.models import create_model, export_state_dict, save_model_info
    from stage1_pro.optim import create_optimizer, create_scheduler

    t0 = time.perf_counter()
    device = dist_info.device
    local_batch = per_rank_batch(config.batch_size, dist_info)
    amp_dtype = resolve_amp(config, device)
    seed_everything(config.seed, deterministic=device.type == "cpu")

    data, split_rows = open_data(config, splits, splits_uri, data_uri, prepared_uri, out_dir, dist_info)
    if dist_info.is_main:
        save_config(config, storage.join(out_dir, CONFIG_FILE))
        storage.copy_file(splits_uri, storage.join(out_dir, SPLITS_FILE))

    torch.manual_seed(config.seed)  # identical head initialisation on every rank and every resume
    model = create_model(config).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    mean, std = tuple(model.info["mean"]), tuple(model.info["std"])
    loss_fn = create_loss(recipe.loss, config).to(device)
    cached = config.resolved_finetune_mode == "frozen"
    epochs = config.head_epochs if cached else config.epochs
    shards = ShardBatches(data.shard_paths, data.shard, data.offset, data.label)
    # Loader worker processes feed a GPU; on CPU the cores are busy training and reading
    # memory-mapped shards in the training process costs almost nothing.
    workers = config.num_workers if device.type == "cuda" else 0
    eval_batch = max(local_batch, 2 * config.batch_size)

    if recipe.before_training is not None:  # e.g. phase 4's self-supervised extended pre-training
        recipe.before_training(PhaseContext(config, model, shards, split_rows, device, dist_info, out_dir))

    def to_input(x: torch.Tensor) -> torch.Tensor:
        from stage1_pro.transforms import normalize

        x = normalize(x, mean, std)
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    if cached:
        # Frozen backbone: run it once over train and val_select, then train the heads alone.
        model.eval()
        feats = {}
        for name in ("train", "val_select"):
            out = predict(
                lambda x: {"f": model.forward_features(x)},
                shards,
                split_rows.rows[name],
                batch_size=eval_batch,
                device=device,
                prepare_input=to_input,
                amp_dtype=amp_dtype,
                dist_info=dist_info,
                num_workers=workers,
            )
            feats[name] = torch.from_numpy(out["f"])
        _LOG.info(
            "cached %d-dim features of %d train / %d val_select images",
            feats["train"].shape[1],
            len(feats["train"]),
            len(feats["val_select"]),
        )
        module: nn.Module = model.heads
        train_ds = TensorBatches(feats["train"].to(device), split_rows.label["train"])
        train_rows = np.arange(len(train_ds))
        val_ds = TensorBatches(feats["val_select"], split_rows.label["val_select"])
        val_rows = np.arange(len(val_ds))
        loader_workers = 0
    else:
        module = model
        train_ds, train_rows = shards, split_rows.rows["train"]
        val_ds, val_rows = shards, split_rows.rows["val_select"]
        loader_workers = workers

    if recipe.create_sampler is not None:  # e.g. class-balanced batches (phase 6)
        sampler = recipe.create_sampler(train_rows, split_rows.label["train"], config, dist_info)
    else:
        sampler = EpochBatchSampler(
            train_rows,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
    if len(sampler) == 0:
        raise DataError(
            f"the train split has {len(train_rows)} images, fewer than one batch of {config.batch_size}; "
            "lower --batch-size"
        )
    loader = make_loader(
        train_ds, sampler, num_workers=loader_workers, pin_memory=device.type == "cuda" and not cached
    )
    updates_per_epoch = math.ceil(len(sampler) / config.grad_accum_steps)
    optimizer = (recipe.create_optimizer or create_optimizer)(module, config, device=device)
    scheduler = create_scheduler(optimizer, config, updates_per_epoch=updates_per_epoch, epochs=epochs)

    step_module: nn.Module = module
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
        step_module = DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None
        )
    if config.compile:  # after DDP, so that dynamo's DDPOptimizer splits graphs at bucket boundaries
        step_module = torch.compile(step_module)

    state = TrainState(
        config,
        recipe,
        dist_info,
        device,
        amp_dtype,
        model,
        module,
        step_module,
        loss_fn,
        optimizer,
        scheduler,
        normalize_input=not cached,
        mean=mean,
        std=std,
        out_dir=out_dir,
        epochs=epochs,
    )

    # ---- resume -----------------------------------------------------------------------
    from stage1_pro.splits import splits_version as _splits_version

    identity = ckpt.run_identity(
        config.to_dict(),
        splits["dataset"]["fingerprint"],
        splits.get("splits_version") or _splits_version(splits["dataset"]["fingerprint"], splits["indices"]),
    )
    ckpt_uri = ckpt.checkpoint_uri(out_dir)
    rows: list[dict[str, Any]] = []
    start_epoch, best, best_epoch = 0, None, None
    saved = ckpt.load_checkpoint(ckpt_uri, identity) if resume else None
    if saved is not None:
        module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        loss_fn.load_state_dict(saved["loss"])
        start_epoch, best, best_epoch, rows = (
            saved["epoch"],
            saved["best"],
            saved["best_epoch"],
            saved["rows"],
        )
        _LOG.info("resumed from %s after epoch %d of %d", ckpt_uri, start_epoch, epochs)

    best_uri = storage.join(out_dir, MODEL_FILE)
    sign = 1.0 if recipe.monitor_mode == "max" else -1.0
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        state.epoch = epoch
        lr = optimizer.param_groups[0]["lr"]
        train_row = train_one_epoch(state, loader, epoch)
        module.eval()
        forward = module if cached else model
        val_out = predict(
            forward,
            val_ds,
            val_rows,
            batch_size=eval_batch,
            device=device,
            prepare_input=(lambda x: x) if cached else to_input,
            amp_dtype=amp_dtype,
            dist_info=dist_info,
            num_workers=0 if cached else workers,
        )
        val_row = epoch_metrics(val_out, split_rows.label["val_select"], loss_fn, config)
        row = {"epoch": epoch + 1, "lr": lr, **train_row, **val_row}
        rows.append(row)
        value = row[recipe.monitor]
        improved = value is not None and math.isfinite(value) and (best is None or sign * value > sign * best)
        if improved:
            best, best_epoch = value, epoch + 1
        if dist_info.is_main:
            if improved:
                _save_state_dict(best_uri, export_state_dict(model))
            write_metrics_csv(storage.join(out_dir, METRICS_FILE), rows)
            ckpt.save_checkpoint(
                ckpt_uri,
                {
                    "identity": identity,
                    "epoch": epoch + 1,
                    "best": best,
                    "best_epoch": best_epoch,
                    "rows": rows,
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "loss": loss_fn.state_dict(),
                },
            )
            _LOG.info(
                "epoch %d/%d: train_loss %.4f, val_loss %.4f, val_accuracy %.4f, legacy coverage %.3f%s "
                "(%.1f s)",
                epoch + 1,
                epochs,
                row["train_loss"],
                row["val_loss"],
                row["val_accuracy"],
                row["val_coverage_legacy"],
                "  *best*" if improved else "",
                row["train_seconds"],
            )
        barrier(dist_info)

    # ---- final scoring with the exported (plain, merged) best weights ------------------
    if best_epoch is None:
        raise DataError(
            f"no epoch produced a finite {recipe.monitor} on val_select (training diverged?); "
            "lower --lr or check the data"
        )
    summary = _score_best(
        config, model.info, shards, split_rows, out_dir, dist_info, eval_batch, amp_dtype, workers
    )
    if dist_info.is_main:
        # Inference warns when it serves on another device type or precision than these scores'.
        scored_with = {"device": device.type, "precision": "bf16" if amp_dtype == torch.bfloat16 else "fp32"}
        save_model_info({**model.info, "scored_with": scored_with}, storage.join(out_dir, MODEL_INFO_FILE))
    barrier(dist_info)
    return {
        "out_dir": out_dir,
        "phase": config.phase,
        "exit_policy": config.exit_policy,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "monitor": recipe.monitor,
        "best": best,
        **summary,
        "n_missing": split_rows.n_missing,
        "seconds": time.perf_counter() - t0,
    }


def _score_best(
    config: Stage1ProConfig,
    info: dict[str, Any],
    shards: ShardBatches,
    split_rows: SplitRows,
    out_dir: str,
    dist_info: DistInfo,
    eval_batch: int,
    amp_dtype: torch.dtype | None,
    workers: int,
) -> dict[str, Any]:
    from stage1_pro.models import build_model, load_into, load_state_file
    from stage1_pro.transforms import normalize

    device = dist_info.device
    best_uri = storage.join(out_dir, MODEL_FILE)
    plain = build_model(info, pretrained=False)
    load_into(plain, load_state_file(best_uri), best_uri)  # proves the exported file is a plain model
    plain = plain.to(device).eval()

    def to_input(x: torch.Tensor) -> torch.Tensor:
        return normalize(x, info["mean"], info["std"])

    outputs = {}
    for name in ("val_select", "val_calib", "test"):
        outputs[name] = predict(
            plain,
            shards,
            split_rows.rows[name],
            batch_size=eval_batch,
            device=device,
            prepare_input=to_input,
            amp_dtype=amp_dtype,
            dist_info=dist_info,
            num_workers=workers,
        )
    summary = {}
    if dist_info.is_main:
        summary = score_splits(RunDir(out_dir).scores, outputs, split_rows.index, split_rows.label)
        _LOG.info(
            "scores.npz: %s",
            ", ".join(f"{k} accuracy {v['accuracy']:.4f} (n={v['n']})" for k, v in summary.items()),
        )
    return broadcast_object(dist_info, summary)  # every rank returns the same summary
