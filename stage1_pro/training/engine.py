"""The training engine behind ``stage1-pro train``, ``scripts/20_train.py`` and the KFP train task.

:func:`train` runs one phase recipe (:mod:`stage1_pro.training.phases`) end to end, in named stages:

1. **check** (:func:`preflight`): everything that needs no data or model (phase/policy matrix,
   fine-tune mode, model name, data arguments), before any work;
2. **open the data** (:func:`~stage1_pro.training.split_rows.open_data`): prepared shards
   (``prepared_uri``), or ``data_uri`` prepared once into ``RUN_DIR/prepared``;
3. **build** (:func:`build_model_and_loss`, :func:`build_trainer`): the model
   (:func:`stage1_pro.models.create_model`), the loss, the phase's ``before_training`` hook,
   the batch sampler and loader, AdamW and the cosine schedule, DDP / ``torch.compile``;
4. **cache features** (:func:`cache_features`): with a frozen backbone, the backbone runs once over
   ``train`` and ``val_select`` and only the heads train, on the cached features;
5. **resume** (:func:`resume_history`): from ``RUN_DIR/checkpoints/last.pth`` when it belongs to
   this run;
6. **run epochs** (:func:`run_epochs`): bf16 autocast on GPU, gradient accumulation, validation on
   ``val_select`` after each epoch, ``metrics.csv``, ``model_best.pth`` (plain merged weights) and
   a checkpoint;
7. **score the best** (:func:`score_best`): ``model_best.pth`` reloaded into a plain model writes
   ``scores.npz`` for ``val_select``, ``val_calib`` and ``test``; then ``model.json``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stage1_pro import storage
from stage1_pro.config import Stage1ProConfig, save_config
from stage1_pro.errors import ConfigError, DataError, NotBuiltError
from stage1_pro.layout import RunDir
from stage1_pro.sizing import EVAL_BATCH_FACTOR
from stage1_pro.training import checkpoint as ckpt
from stage1_pro.training.compilation import compile_for_training, eager
from stage1_pro.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    per_rank_batch,
)
from stage1_pro.training.epoch_metrics import epoch_metrics, write_metrics_csv
from stage1_pro.training.loaders import (
    EpochBatchSampler,
    ShardBatches,
    TensorBatches,
    device_batches,
    make_loader,
)
from stage1_pro.training.phases import PhaseRecipe, check_finetune_mode, get_phase
from stage1_pro.training.progress import Progress
from stage1_pro.training.scoring import SCORED_SPLITS, autocast, predict, score_splits
from stage1_pro.training.split_rows import SplitRows, open_data

_LOG = logging.getLogger("stage1_pro.training")

#: Splits the frozen-backbone path runs the backbone over once (the heads train and validate on them).
CACHED_SPLITS: tuple[str, ...] = ("train", "val_select")


# ------------------------------------------------------------------------------------------
# settings derived before any work


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
    """Every check that needs no data or model; raises before any work is done.

    Returns:
        The phase's recipe.

    Raises:
        ConfigError: an invalid setting or combination, naming the setting and the fix.
        NotBuiltError: a phase or adapter method that is designed but not built.
    """
    from stage1_pro.defaults import check_choice
    from stage1_pro.models import check_model_name
    from stage1_pro.transforms import AUGMENTATIONS

    config.validate()  # phase/policy matrix and ranges
    recipe = get_phase(config.phase)
    check_finetune_mode(recipe, config.resolved_finetune_mode)
    if recipe.check_config is not None:
        recipe.check_config(config)
    if config.resolved_finetune_mode == "peft" and config.peft_method == "doran":
        from stage1_pro.models.dora import DORAN_NOT_BUILT

        raise NotBuiltError(DORAN_NOT_BUILT)
    check_choice(config.augment, AUGMENTATIONS, "augment")
    if (data_uri is None) == (prepared_uri is None):
        raise ConfigError(
            "pass exactly one of --data (manifest or image folder) or --prepared (a prepare output)"
        )
    check_model_name(config.model_name)
    return recipe


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """One checked request to :func:`train` and the settings derived from it before any work.

    Attributes:
        config: the resolved settings.
        recipe: the phase's recipe.
        splits: the loaded ``splits.json``; ``splits_uri`` where it came from.
        data_uri, prepared_uri: exactly one is set (see :func:`train`).
        out_dir: the run directory.
        resume: continue from the run's checkpoint when there is one.
        dist: data-parallel position and device.
        amp_dtype: autocast dtype, or None.
    """

    config: Stage1ProConfig
    recipe: PhaseRecipe
    splits: dict[str, Any]
    splits_uri: str
    data_uri: str | None
    prepared_uri: str | None
    out_dir: str
    resume: bool
    dist: DistInfo
    amp_dtype: torch.dtype | None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def frozen_backbone(self) -> bool:
        """The backbone never trains: its features are computed once and the heads train alone."""
        return self.config.resolved_finetune_mode == "frozen"

    @property
    def epochs(self) -> int:
        return self.config.head_epochs if self.frozen_backbone else self.config.epochs

    @property
    def eval_batch(self) -> int:
        """Per-process batch of validation, feature caching and scoring (no gradients: twice the global)."""
        return max(
            per_rank_batch(self.config.batch_size, self.dist), EVAL_BATCH_FACTOR * self.config.batch_size
        )

    @property
    def loader_workers(self) -> int:
        """Loader processes: they feed a GPU; on CPU the cores are busy training, and reading
        memory-mapped shards in the training process costs almost nothing."""
        return self.config.num_workers if self.device.type == "cuda" else 0

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.out_dir)

    def predict(
        self,
        forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        dataset: torch.utils.data.Dataset,
        rows: np.ndarray,
        prepare_input: Callable[[torch.Tensor], torch.Tensor],
        *,
        num_workers: int | None = None,
    ) -> dict[str, np.ndarray]:
        """:func:`~stage1_pro.training.scoring.predict` with this job's evaluation batch, device,
        autocast dtype and ranks (``num_workers``: default :attr:`loader_workers`)."""
        return predict(
            forward,
            dataset,
            rows,
            batch_size=self.eval_batch,
            device=self.device,
            prepare_input=prepare_input,
            amp_dtype=self.amp_dtype,
            dist_info=self.dist,
            num_workers=self.loader_workers if num_workers is None else num_workers,
        )


# ------------------------------------------------------------------------------------------
# network input


@dataclass(frozen=True, kw_only=True)
class InputTransform:
    """Device batch -> network input: ``uint8`` NHWC -> normalised float NCHW (channels-last on CUDA).

    The one input transform of training, validation, feature caching and scoring.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool

    @classmethod
    def for_model(cls, info: dict[str, Any], device: torch.device) -> InputTransform:
        """The transform for a model's ``model.json`` normalisation on ``device``."""
        return cls(mean=tuple(info["mean"]), std=tuple(info["std"]), channels_last=device.type == "cuda")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from stage1_pro.transforms import normalize

        x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def features_as_input(x: torch.Tensor) -> torch.Tensor:
    """Cached backbone features are the heads' input as they are."""
    return x


# ------------------------------------------------------------------------------------------
# what one epoch of training touches


@dataclass(frozen=True, kw_only=True)
class PhaseContext:
    """What a phase's ``before_training`` hook gets: the model before supervised training and the data."""

    config: Stage1ProConfig
    model: nn.Module
    shards: ShardBatches
    split_rows: SplitRows
    device: torch.device
    dist: DistInfo
    out_dir: str


@dataclass(kw_only=True)
class TrainState:
    """Everything one epoch of training touches (also what a recipe's ``train_step`` receives).

    Attributes:
        config, recipe, dist, amp_dtype, out_dir: as in :class:`TrainJob`.
        model: the :class:`~stage1_pro.models.Stage1Model` (never wrapped).
        module: what trains: the model, or its heads on cached features.
        step_module: ``module`` as the step calls it (wrapped by DDP / ``torch.compile``).
        loss_fn, optimizer, scheduler: the loss module, the optimiser, the per-update schedule.
        to_input: device batch -> network input (:class:`InputTransform`, or
            :func:`features_as_input` on cached features).
        augment: training augmentation of the input (``none`` on cached features).
        epochs: epochs of this run; ``epoch``: the one running (0-based).
        recipe_state: scratch space of the recipe's hooks (e.g. F-SAM's pending micro-batches).
    """

    config: Stage1ProConfig
    recipe: PhaseRecipe
    dist: DistInfo
    amp_dtype: torch.dtype | None
    model: nn.Module
    module: nn.Module
    step_module: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    to_input: Callable[[torch.Tensor], torch.Tensor]
    augment: str
    out_dir: str
    epochs: int
    epoch: int = 0
    recipe_state: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """What trains on what: the trained module, its train/validation rows and their input transform.

    Attributes:
        module: the model (images), or its heads (cached features).
        train, train_rows: the training batches' dataset and its rows.
        val, val_rows: the same for ``val_select``.
        to_input: device batch -> the module's input.
        augment: training augmentation (``none`` on cached features).
        loader_workers: loader processes of the training and validation loaders.
        pin_memory: pin host batches (images headed for a GPU).
    """

    module: nn.Module
    train: torch.utils.data.Dataset
    train_rows: np.ndarray
    val: torch.utils.data.Dataset
    val_rows: np.ndarray
    to_input: Callable[[torch.Tensor], torch.Tensor]
    augment: str
    loader_workers: int
    pin_memory: bool


@dataclass(kw_only=True)
class EpochHistory:
    """Finished epochs: their metrics rows and the best monitored value so far (what a checkpoint resumes)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None

    @property
    def epochs_done(self) -> int:
        return len(self.rows)

    def record(self, row: dict[str, Any], recipe: PhaseRecipe) -> bool:
        """Append an epoch's row; return True when its ``recipe.monitor`` value is the best so far."""
        self.rows.append(row)
        value = row[recipe.monitor]
        sign = 1.0 if recipe.monitor_mode == "max" else -1.0
        finite = value is not None and math.isfinite(value)
        improved = finite and (self.best is None or sign * value > sign * self.best)
        if improved:
            self.best, self.best_epoch = value, row["epoch"]
        return improved


# ------------------------------------------------------------------------------------------
# one epoch


def prepare_batch(
    state: TrainState, x: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Device batch -> network input (+ augmentation when a training ``generator`` is given)."""
    from stage1_pro.transforms import augment

    x = state.to_input(x)
    if generator is not None and state.augment != "none":
        x = augment(x, state.augment, generator)
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
        per_rank_batch(config.batch_size, dist_info)  # ConfigError unless the batch splits evenly
        job = TrainJob(
            config=config,
            recipe=recipe,
            splits=splits,
            splits_uri=splits_uri,
            data_uri=data_uri,
            prepared_uri=prepared_uri,
            out_dir=str(out_dir),
            resume=resume,
            dist=dist_info,
            amp_dtype=resolve_amp(config, dist_info.device),
        )
        return run_job(job)
    finally:
        cleanup(dist_info)


def run_job(job: TrainJob) -> dict[str, Any]:
    """The stages of :func:`train` for a checked job (see the module docstring)."""
    started = time.perf_counter()
    seed_everything(job.config.seed, deterministic=job.device.type == "cpu")
    prepared, split_rows = open_data(
        job.config,
        splits=job.splits,
        splits_uri=job.splits_uri,
        data_uri=job.data_uri,
        prepared_uri=job.prepared_uri,
        out_dir=job.out_dir,
        dist=job.dist,
    )
    if job.dist.is_main:
        save_config(job.config, job.run_dir.config)
        storage.copy_file(job.splits_uri, job.run_dir.splits)
    shards = ShardBatches(prepared.shard_paths, prepared.shard, prepared.offset, prepared.label)

    model, loss_fn = build_model_and_loss(job)
    if job.recipe.before_training is not None:  # e.g. phase 4's self-supervised extended pre-training
        job.recipe.before_training(
            PhaseContext(
                config=job.config,
                model=model,
                shards=shards,
                split_rows=split_rows,
                device=job.device,
                dist=job.dist,
                out_dir=job.out_dir,
            )
        )
    to_input = InputTransform.for_model(model.info, job.device)
    if job.frozen_backbone:
        data = cache_features(job, model, shards, split_rows, to_input)
    else:
        data = image_data(job, model, shards, split_rows, to_input)
    state, loader = build_trainer(job, model, loss_fn, data, split_rows)

    history = resume_history(job, state)
    run_epochs(job, state, loader, data, split_rows.label["val_select"], history)
    if history.best_epoch is None:
        raise DataError(
            f"no epoch produced a finite {job.recipe.monitor} on val_select (training diverged?); "
            "lower --lr or check the data"
        )

    summary = score_best(job, model.info, shards, split_rows)
    if job.dist.is_main:
        from stage1_pro.models import save_model_info

        # Inference warns when it serves on another device type or precision than these scores'.
        precision = "bf16" if job.amp_dtype == torch.bfloat16 else "fp32"
        scored_with = {"device": job.device.type, "precision": precision}
        save_model_info({**model.info, "scored_with": scored_with}, job.run_dir.model_info)
    barrier(job.dist)
    return {
        "out_dir": job.out_dir,
        "phase": job.config.phase,
        "exit_policy": job.config.exit_policy,
        "epochs": job.epochs,
        "best_epoch": history.best_epoch,
        "monitor": job.recipe.monitor,
        "best": history.best,
        **summary,
        "n_missing": split_rows.n_missing,
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------
# build


def build_model_and_loss(job: TrainJob) -> tuple[nn.Module, nn.Module]:
    """The phase's model on the device (channels-last on CUDA) and its loss module."""
    from stage1_pro.losses import create_loss
    from stage1_pro.models import create_model

    torch.manual_seed(job.config.seed)  # identical head initialisation on every rank and every resume
    model = create_model(job.config).to(job.device)
    if job.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, create_loss(job.recipe.loss, job.config).to(job.device)


def image_data(
    job: TrainJob, model: nn.Module, shards: ShardBatches, split_rows: SplitRows, to_input: InputTransform
) -> TrainingData:
    """The whole model trains on images read from the prepared shards."""
    return TrainingData(
        module=model,
        train=shards,
        train_rows=split_rows.rows["train"],
        val=shards,
        val_rows=split_rows.rows["val_select"],
        to_input=to_input,
        augment=job.config.augment,
        loader_workers=job.loader_workers,
        pin_memory=job.device.type == "cuda",
    )


def cache_features(
    job: TrainJob, model: nn.Module, shards: ShardBatches, split_rows: SplitRows, to_input: InputTransform
) -> TrainingData:
    """Frozen backbone: run it once over ``train`` and ``val_select``; the heads train on the features."""
    model.eval()
    features = {}
    for name in CACHED_SPLITS:
        out = job.predict(
            lambda x: {"features": model.forward_features(x)}, shards, split_rows.rows[name], to_input
        )
        features[name] = torch.from_numpy(out["features"])
    _LOG.info(
        "cached %d-dim features of %d train / %d val_select images",
        features["train"].shape[1],
        len(features["train"]),
        len(features["val_select"]),
    )
    train_set = TensorBatches(features["train"].to(job.device), split_rows.label["train"])
    val_set = TensorBatches(features["val_select"], split_rows.label["val_select"])
    return TrainingData(
        module=model.heads,
        train=train_set,
        train_rows=np.arange(len(train_set)),
        val=val_set,
        val_rows=np.arange(len(val_set)),
        to_input=features_as_input,
        augment="none",
        loader_workers=0,
        pin_memory=False,
    )


def build_sampler(job: TrainJob, data: TrainingData, train_labels: np.ndarray) -> torch.utils.data.Sampler:
    """The recipe's batch sampler (e.g. class-balanced batches), else shuffled full batches."""
    config, dist = job.config, job.dist
    if job.recipe.create_sampler is not None:
        sampler = job.recipe.create_sampler(data.train_rows, train_labels, config, dist)
    else:
        sampler = EpochBatchSampler(
            data.train_rows,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    if len(sampler) == 0:
        raise DataError(
            f"the train split has {len(data.train_rows)} images, fewer than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    return sampler


def wrap_for_step(module: nn.Module, job: TrainJob) -> nn.Module:
    """``module`` as the training step calls it: DDP when data-parallel, then compiled if asked."""
    step_module = module
    if job.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if job.device.type == "cuda":
            step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
        step_module = DistributedDataParallel(
            step_module, device_ids=[job.device] if job.device.type == "cuda" else None
        )
    if job.config.compile:  # block by block where the model repeats one (training/compilation.py)
        step_module = compile_for_training(step_module)
    return step_module


def build_trainer(
    job: TrainJob, model: nn.Module, loss_fn: nn.Module, data: TrainingData, split_rows: SplitRows
) -> tuple[TrainState, torch.utils.data.DataLoader]:
    """Sampler and loader, the recipe's optimiser (AdamW by default) and the schedule, the step module."""
    from stage1_pro.optim import create_optimizer, create_scheduler

    config = job.config
    sampler = build_sampler(job, data, split_rows.label["train"])
    loader = make_loader(data.train, sampler, num_workers=data.loader_workers, pin_memory=data.pin_memory)
    optimizer = (job.recipe.create_optimizer or create_optimizer)(data.module, config, device=job.device)
    scheduler = create_scheduler(
        optimizer,
        config,
        updates_per_epoch=math.ceil(len(sampler) / config.grad_accum_steps),
        epochs=job.epochs,
    )
    state = TrainState(
        config=config,
        recipe=job.recipe,
        dist=job.dist,
        amp_dtype=job.amp_dtype,
        model=model,
        module=data.module,
        step_module=wrap_for_step(data.module, job),
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        to_input=data.to_input,
        augment=data.augment,
        out_dir=job.out_dir,
        epochs=job.epochs,
    )
    return state, loader


# ------------------------------------------------------------------------------------------
# resume


def run_identity(job: TrainJob) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this job (config and data)."""
    from stage1_pro.splits import splits_version

    fingerprint = job.splits["dataset"]["fingerprint"]
    version = job.splits.get("splits_version") or splits_version(fingerprint, job.splits["indices"])
    return ckpt.run_identity(job.config.to_dict(), fingerprint, version)


def resume_history(job: TrainJob, state: TrainState) -> EpochHistory:
    """Load the run's checkpoint into ``state`` when resuming and there is one; return the epochs done."""
    uri = job.run_dir.last_checkpoint
    saved = ckpt.load_checkpoint(uri, run_identity(job)) if job.resume else None
    if saved is None:
        return EpochHistory()
    state.module.load_state_dict(saved["module"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.loss_fn.load_state_dict(saved["loss"])
    _LOG.info("resumed from %s after epoch %d of %d", uri, saved["epoch"], job.epochs)
    return EpochHistory(rows=saved["rows"], best=saved["best"], best_epoch=saved["best_epoch"])


def save_checkpoint(job: TrainJob, state: TrainState, history: EpochHistory) -> None:
    """Write ``checkpoints/last.pth``: the trainable state after the last finished epoch."""
    ckpt.save_checkpoint(
        job.run_dir.last_checkpoint,
        {
            "identity": run_identity(job),
            "epoch": history.epochs_done,
            "best": history.best,
            "best_epoch": history.best_epoch,
            "rows": history.rows,
            "module": state.module.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "loss": state.loss_fn.state_dict(),
        },
    )


# ------------------------------------------------------------------------------------------
# run epochs


def validate(job: TrainJob, state: TrainState, data: TrainingData, labels: np.ndarray) -> dict[str, Any]:
    """Metrics of the trained module on ``val_select`` (see :func:`~.epoch_metrics.epoch_metrics`)."""
    state.module.eval()
    with eager():  # blocks compiled for the training step are not compiled again for validation
        outputs = job.predict(
            state.module, data.val, data.val_rows, data.to_input, num_workers=data.loader_workers
        )
    return epoch_metrics(outputs, labels, state.loss_fn, job.config)


def _save_state_dict(uri: str, state: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())


def log_epoch(row: dict[str, Any], epochs: int, improved: bool) -> None:
    _LOG.info(
        "epoch %d/%d: train_loss %.4f, val_loss %.4f, val_accuracy %.4f, legacy coverage %.3f%s (%.1f s)",
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_accuracy"],
        row["val_coverage_legacy"],
        "  *best*" if improved else "",
        row["train_seconds"],
    )


def run_epochs(
    job: TrainJob,
    state: TrainState,
    loader: torch.utils.data.DataLoader,
    data: TrainingData,
    val_labels: np.ndarray,
    history: EpochHistory,
) -> None:
    """Train the remaining epochs; after each, validate and (rank 0) write the best weights,
    ``metrics.csv`` and the checkpoint."""
    from stage1_pro.models import export_state_dict

    for epoch in range(history.epochs_done, job.epochs):
        loader.sampler.set_epoch(epoch)
        state.epoch = epoch
        lr = state.optimizer.param_groups[0]["lr"]
        train_row = train_one_epoch(state, loader, epoch)
        row = {"epoch": epoch + 1, "lr": lr, **train_row, **validate(job, state, data, val_labels)}
        improved = history.record(row, job.recipe)
        if job.dist.is_main:
            if improved:
                _save_state_dict(job.run_dir.model, export_state_dict(state.model))
            write_metrics_csv(job.run_dir.metrics, history.rows)
            save_checkpoint(job, state, history)
            log_epoch(row, job.epochs, improved)
        barrier(job.dist)


# ------------------------------------------------------------------------------------------
# score the best


def score_best(
    job: TrainJob, info: dict[str, Any], shards: ShardBatches, split_rows: SplitRows
) -> dict[str, Any]:
    """Reload ``model_best.pth`` into a plain model and write ``scores.npz``.

    Returns:
        Per scored split, its size and accuracy (the same on every rank).
    """
    from stage1_pro.models import build_model, load_into, load_state_file

    best_uri = job.run_dir.model
    plain = build_model(info, pretrained=False)
    load_into(plain, load_state_file(best_uri), best_uri)  # proves the exported file is a plain model
    plain = plain.to(job.device).eval()
    if job.device.type == "cuda":
        plain = plain.to(memory_format=torch.channels_last)
    to_input = InputTransform.for_model(info, job.device)
    outputs = {name: job.predict(plain, shards, split_rows.rows[name], to_input) for name in SCORED_SPLITS}
    summary = {}
    if job.dist.is_main:
        summary = score_splits(job.run_dir.scores, outputs, split_rows.index, split_rows.label)
        _LOG.info(
            "scores.npz: %s",
            ", ".join(f"{k} accuracy {v['accuracy']:.4f} (n={v['n']})" for k, v in summary.items()),
        )
    return broadcast_object(job.dist, summary)
