"""Training throughput: the project's training step against a bare timm loop, adapters, and the data path.

Everything is measured in one run and printed as ratios against a baseline from the same run, in
interleaved rounds: images/s is the median over rounds, a ratio the median over rounds of the two
variants' rates in the same round, so that drifting machine load hits both alike.
Beside images/s each variant shows its model FLOPs utilisation (MFU: ``stage1_pro.models.flops``;
analytical for ViTs, counting only the products each variant's backward really needs) against the
peak named in the header (``--peak-tflops`` to give one).

1. **Step** (``project full / bare``): the project's epoch loop, built by the engine's own stages
   (``engine.build_model_and_loss``, ``engine.build_trainer``: model with its head, loss module,
   AdamW from ``create_optimizer``, the warm-up cosine schedule, ``torch.compile`` as the engine
   applies it) and run by ``engine.train_one_epoch`` (uint8 batch -> device -> normalise, progress;
   on CUDA fed by the pipeline's loader workers per GPU, ``--workers``), against a bare timm loop
   (same model and batch, float input already normalised on the device, ``F.cross_entropy``, AdamW
   (foreach on CPU, fused on CUDA), ``backward``/``step``/``zero_grad``).
   Eager, and compiled unless ``--no-compile``. Goal: >= 1.0 (CPU: >= 0.95).
2. **Adapters** (phase 2's path): the project's LoRA and DoRA steps: ``dora / lora`` (goal >= 0.8)
   and ``lora / bare full fine-tune`` (frozen weights need no weight gradients: goal >= 1.0).
3. **Data path** (``prepared shards / in-memory``): the same project loop reading prepared shards
   (memory-mapped ``.npy``, what ``train --prepared`` reads) against in-memory tensors. Goal >= 0.9.
4. **Loader and decode** (sizing): images/s of the shard loader alone with 0, 1 and 2 worker
   processes, and ``prepare``'s decode rate of a 12-MP JPEG per core (draft vs full decoding).

Defaults: on CUDA the issue's setting (``vit_small_patch14_dinov2``, 224 px, batch 256, bf16, wall
time between synchronisations; the host thread's CPU time per step is shown too: a step whose host
time nears its wall time is bound by Python/launch overhead, not by the GPU); on CPU the same model
at 98 px, batch 16, fp32, one intra-op thread, timed by the thread's CPU time
(``time.thread_time``) so that other processes on a shared machine do not distort the ratios.
``python bench/train_throughput.py --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import timm
import torch
import torch.nn.functional as F  # noqa: N812

from stage1_pro.config import Stage1ProConfig
from stage1_pro.models.flops import mfu, model_flops, peak_tflops
from stage1_pro.run_parameters import PIPELINE_LOADER_WORKERS
from stage1_pro.training import engine
from stage1_pro.training.distributed import DistInfo
from stage1_pro.training.loaders import EpochBatchSampler, ShardBatches, TensorBatches, make_loader
from stage1_pro.training.phases import get_phase
from stage1_pro.training.split_rows import SplitRows

#: A compiled H200 ViT-S/14 step at batch 256: the rate the loader workers must feed.
GPU_STEP_IMG_PER_S = 6560


class Clock:
    """Thread CPU time on CPU (robust to other load), wall time between syncs on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.thread_time()


class Loop(Protocol):
    model: torch.nn.Module

    def run(self, steps: int) -> int: ...


# ------------------------------------------------------------------------------------------
# the loops


class BareLoop:
    """A plain timm training loop (full fine-tuning): the baseline."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        images: torch.Tensor,
        labels: torch.Tensor,
        compile_: bool = False,
    ) -> None:
        torch.manual_seed(0)
        self.model = timm.create_model(args.model, num_classes=2, **_size_kwargs(args.model, args.img_size))
        self.model.to(device).train()
        on_cuda = device.type == "cuda"
        if on_cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if compile_ else self.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, fused=on_cuda or None, foreach=None if on_cuda else True
        )
        cfg = timm.data.resolve_model_data_config(self.model)
        mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
        # Normalised float input prepared once, already on the device: the loop does nothing else.
        self.x = ((images.permute(0, 3, 1, 2).float() - mean) / std).to(device)
        if on_cuda:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = labels.to(device)
        self.batch = args.batch_size
        self.amp = torch.bfloat16 if on_cuda else None
        self.device = device

    def run(self, steps: int) -> int:
        n = len(self.y) // self.batch
        for i in range(steps):
            j = i % n
            x, y = (
                self.x[j * self.batch : (j + 1) * self.batch],
                self.y[j * self.batch : (j + 1) * self.batch],
            )
            with engine.autocast(self.device, self.amp):
                logits = self.step_model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return steps * self.batch


class ProjectLoop:
    """The project's loop, built by the engine's stages and run by ``engine.train_one_epoch``.

    ``run(steps)`` is one epoch of ``steps`` batches; the trainer (optimiser, schedule, loader) for
    that length is built once, on first use.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        dataset: torch.utils.data.Dataset,
        rows: np.ndarray,
        *,
        compile_: bool = False,
        phase: int = 1,
        finetune_mode: str = "full",
        peft_method: str = "dora",
        workers: int = 0,
    ) -> None:
        config = Stage1ProConfig(
            phase=phase,
            model_name=args.model,
            img_size=args.img_size,
            pretrained=False,
            batch_size=args.batch_size,
            lr=1e-4,
            epochs=1000,
            compile=compile_,
            finetune_mode=finetune_mode,
            peft_method=peft_method,
            num_workers=workers,
            log_every=10**9,
            device=str(device),
        )
        dist = DistInfo(device=device)
        self.job = engine.TrainJob(
            config=config,
            recipe=get_phase(phase),
            splits={},
            splits_uri="",
            data_uri=None,
            prepared_uri=None,
            out_dir="",
            resume=False,
            dist=dist,
            amp_dtype=engine.resolve_amp(config, device),
        )
        self.model, self.loss_fn = engine.build_model_and_loss(self.job)
        self.dataset, self.rows = dataset, rows
        self.labels = dataset.label.numpy()
        self.states: dict[int, tuple[engine.TrainState, torch.utils.data.DataLoader]] = {}
        self.to_input = engine.InputTransform.for_model(self.model.info, device)

    def _trainer(self, steps: int) -> tuple[engine.TrainState, torch.utils.data.DataLoader]:
        """The engine's trainer over ``steps`` batches (one per step count; they share the model)."""
        if steps not in self.states:
            rows = self.rows[: steps * self.job.config.batch_size]
            data = engine.TrainingData(
                module=self.model,
                train=self.dataset,
                train_rows=rows,
                val=self.dataset,
                val_rows=rows,
                to_input=self.to_input,
                augment="none",
                loader_workers=self.job.config.num_workers,
                pin_memory=self.job.device.type == "cuda",
            )
            split_rows = SplitRows(rows={}, index={}, label={"train": self.labels[rows]})
            self.states[steps] = engine.build_trainer(self.job, self.model, self.loss_fn, data, split_rows)
        return self.states[steps]

    def run(self, steps: int) -> int:
        state, loader = self._trainer(steps)
        engine.train_one_epoch(state, loader, epoch=0)
        return steps * self.job.config.batch_size


def _size_kwargs(name: str, img_size: int) -> dict:
    try:
        timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
        return {"img_size": img_size}
    except TypeError:
        return {}


def interleaved(
    variants: dict[str, Loop], steps: int, rounds: int, clock: Clock
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Images/s and host CPU seconds per step of each variant in each of ``rounds`` interleaved rounds.

    Each variant first runs one untimed round (compilation, optimiser state, allocator warm-up).
    """
    for loop in variants.values():
        loop.run(steps)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    host: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, loop in variants.items():
            start, host_start = clock.now(), time.thread_time()
            n = loop.run(steps)
            host[name].append((time.thread_time() - host_start) / steps)
            rates[name].append(n / (clock.now() - start))
    return rates, host


def paired_ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s rate over ``b``'s in the same round (drift between rounds cancels)."""
    return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))


# ------------------------------------------------------------------------------------------
# data


def prepared_demo(root: Path, img_size: int, n_images: int) -> tuple[ShardBatches, np.ndarray]:
    """The embedded MNIST digits prepared at ``img_size`` (the real prepare path), as shard batches."""
    from stage1_pro.demo_data import write_demo_dataset
    from stage1_pro.prepare import open_prepared, prepare_dataset
    from stage1_pro.splits import split_dataset

    manifest = write_demo_dataset(root / "data", per_digit=max(1, n_images // 10))
    split_dataset(str(manifest), str(root / "splits.json"), fractions=[0.7, 0.1, 0.1, 0.1])
    prepare_dataset(str(manifest), str(root / "splits.json"), str(root / "prepared"), img_size, workers=1)
    data = open_prepared(str(root / "prepared"))
    return ShardBatches(data.shard_paths, data.shard, data.offset, data.label), np.arange(len(data.index))


def loader_rates(
    shards: ShardBatches, rows: np.ndarray, batch: int, workers: tuple[int, ...]
) -> dict[int, float]:
    """Images/s of the shard loader alone (wall time, no model) for each worker count."""
    out = {}
    for w in workers:
        sampler = EpochBatchSampler(rows, batch, shuffle=True, seed=0, drop_last=True)
        loader = make_loader(shards, sampler, num_workers=w)
        n, start = 0, None
        for _ in range(3):
            for x, _, _ in loader:
                if start is None:  # exclude worker start-up
                    start = time.perf_counter()
                    continue
                n += x.shape[0]
        out[w] = n / (time.perf_counter() - start)
        del loader
    return out


def decode_rates(tmp: Path, img_size: int, repeats: int = 3) -> dict[str, float]:
    """Per-core decode rate of a 12-MP JPEG: prepare's draft decoding vs a full decode + resize."""
    from PIL import Image

    from stage1_pro.preprocessing import PixelSpec, load_pixels

    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    photo = np.kron(tile, np.ones((10, 10, 1), dtype=np.uint8))  # 4000 x 3000, smooth blocks
    path = tmp / "photo12mp.jpg"
    Image.fromarray(photo).save(path, quality=90)
    rates = {}
    for name, fn in (
        ("draft", lambda: load_pixels(path, PixelSpec(img_size))),
        ("full", lambda: load_pixels(path, PixelSpec(img_size, decode_mode="full"))),
    ):
        fn()
        start = time.thread_time()
        for _ in range(repeats):
            fn()
        rates[name] = repeats / (time.thread_time() - start)
    return rates


def data_suite(args: argparse.Namespace, tmp: Path) -> dict:
    """Decode rate per core (prepare) and shard-loader rate per worker (training) at loader size."""
    big, big_rows = prepared_demo(tmp / "big", args.loader_img_size, 4 * args.loader_batch)
    return {
        "decode_img_per_s_per_core": decode_rates(tmp, args.loader_img_size),
        "loader_img_per_s": loader_rates(big, big_rows, args.loader_batch, (0, 1, 2)),
    }


# ------------------------------------------------------------------------------------------
# the suite

#: ratio name -> (numerator variant, denominator variant, goal).
RATIOS: dict[str, tuple[str, str, str]] = {
    "project / bare, eager": ("project full (eager)", "bare (eager)", ">= 1.0 (CPU >= 0.95)"),
    "project / bare, compiled": ("project full (compiled)", "bare (compiled)", ">= 1.0 (CPU >= 0.95)"),
    "DoRA / LoRA, phase-2 path": ("project dora (eager)", "project lora (eager)", ">= 0.8"),
    "LoRA / bare full fine-tune": ("project lora (eager)", "bare (eager)", ">= 1.0"),
    "prepared shards / in-memory": ("project full (prepared shards)", "project full (eager)", ">= 0.9"),
}


def step_suite(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    """Every training-step variant in interleaved rounds; images/s, host time per step, MFU and ratios."""
    clock = Clock(device)
    n = args.batch_size * max(args.steps, 2)
    if args.data:
        shards, rows = prepared_demo(tmp, args.img_size, max(n, 200))
        rows = rows[:n]
        images, labels, _ = shards[rows.tolist()]
    else:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, args.img_size, args.img_size, 3), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 2, (n,), generator=gen)
        rows = np.arange(n)
    memory = TensorBatches(images.clone(), labels.numpy())
    workers = args.workers
    variants: dict[str, Loop] = {
        "bare (eager)": BareLoop(args, device, images, labels),
        "project full (eager)": ProjectLoop(args, device, memory, rows, workers=workers),
        "project lora (eager)": ProjectLoop(
            args, device, memory, rows, phase=2, finetune_mode="peft", peft_method="lora", workers=workers
        ),
        "project dora (eager)": ProjectLoop(
            args, device, memory, rows, phase=2, finetune_mode="peft", peft_method="dora", workers=workers
        ),
    }
    if args.data:
        variants["project full (prepared shards)"] = ProjectLoop(args, device, shards, rows, workers=workers)
    if args.compile:
        variants["bare (compiled)"] = BareLoop(args, device, images, labels, compile_=True)
        variants["project full (compiled)"] = ProjectLoop(
            args, device, memory, rows, compile_=True, workers=workers
        )
    rates, host = interleaved(variants, args.steps, args.rounds, clock)
    flops = {name: model_flops(loop.model, args.img_size).train_step for name, loop in variants.items()}
    return {
        "img_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "host_ms_per_step": {k: 1000 * statistics.median(v) for k, v in host.items()},
        "train_gflop_per_image": {k: v / 1e9 for k, v in flops.items()},
        "ratios": {
            name: paired_ratio(rates, a, b) for name, (a, b, _) in RATIOS.items() if a in rates and b in rates
        },
    }


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--model", default="vit_small_patch14_dinov2", help="timm model (%(default)s)")
    p.add_argument("--img-size", type=int, default=None, help="cpu 98, cuda 224")
    p.add_argument("--batch-size", type=int, default=None, help="cpu 16, cuda 256")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (cpu 2, cuda 20)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (cpu 9, cuda 5)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variants")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader worker processes of the project loops (cuda: the pipeline's per-GPU default, "
        "cpu: 0, as the engine uses none there)",
    )
    p.add_argument(
        "--no-data",
        dest="data",
        action="store_false",
        help="skip the prepared-shards variant and the loader/decode rates (random uint8 images)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: see the header)")
    p.add_argument(
        "--loader-img-size", type=int, default=224, help="image size of the loader/decode measurements"
    )
    p.add_argument("--loader-batch", type=int, default=256, help="batch size of the loader measurement")
    p.add_argument(
        "--threads", type=int, default=1, help="cpu intra-op threads (1: thread-CPU timing is exact)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda and args.device == "auto" else args.device.replace("auto", "cpu"))
    on_cuda = device.type == "cuda"
    args.img_size = args.img_size or (224 if on_cuda else 98)
    args.batch_size = args.batch_size or (256 if on_cuda else 16)
    args.steps = args.steps or (20 if on_cuda else 2)
    args.rounds = args.rounds or (5 if on_cuda else 9)
    if args.workers is None:
        args.workers = PIPELINE_LOADER_WORKERS if on_cuda else 0
    if not on_cuda:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    peak, peak_source = peak_tflops(device, dtype, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if on_cuda else f"cpu, {torch.get_num_threads()} thread(s)"
    precision = str(dtype).removeprefix("torch.")
    print(
        f"{time.strftime('%Y-%m-%d')} on {device} ({name}); torch {torch.__version__}, "
        f"timm {timm.__version__}\nmodel {args.model} @ {args.img_size} px, batch {args.batch_size}, "
        f"{precision}, "
        f"{args.steps} steps x {args.rounds} rounds, {'wall' if on_cuda else 'thread CPU'} time; "
        f"MFU against {peak:.3g} TFLOP/s ({peak_source})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = step_suite(args, device, Path(tmp))
        if args.data:
            report.update(data_suite(args, Path(tmp)))
    report.update(
        date=time.strftime("%Y-%m-%d"),
        device=name,
        model=args.model,
        img_size=args.img_size,
        batch_size=args.batch_size,
        peak_tflops=peak,
        peak_source=peak_source,
    )
    width = max(len(k) for k in report["img_per_s"])
    print(f"\n{'variant'.ljust(width)}     img/s    MFU  host ms/step  GFLOP/img")
    for variant, rate in report["img_per_s"].items():
        gflop = report["train_gflop_per_image"][variant]
        print(
            f"{variant.ljust(width)}  {rate:8.1f}  {100 * mfu(rate, gflop * 1e9, peak):4.1f}%  "
            f"{report['host_ms_per_step'][variant]:12.1f}  {gflop:9.2f}"
        )
    print()
    for ratio, value in report["ratios"].items():
        print(f"{ratio}: {value:.3f} (goal {RATIOS[ratio][2]})")
    for key in ("decode_img_per_s_per_core", "loader_img_per_s"):
        if key in report:
            print(f"{key}: " + ", ".join(f"{k}: {v:,.0f}" for k, v in report[key].items()))
    if "loader_img_per_s" in report:
        per_worker = report["loader_img_per_s"][1]
        print(
            f"\nsizing: one loader worker feeds ~{per_worker:,.0f} img/s of {args.loader_img_size}-px "
            f"prepared images (batch {args.loader_batch}); a ViT-S/14 step at {GPU_STEP_IMG_PER_S:,} img/s "
            f"(H200, compiled) needs ~{math.ceil(GPU_STEP_IMG_PER_S / per_worker)} worker(s) + 1 core "
            "for the training process"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
