"""Training throughput: the project's training step against a bare timm loop, and the data path.

Everything is measured in one run and printed as ratios against a baseline from the same run, in
interleaved rounds (median per variant) so that drifting machine load hits all variants alike.

1. **Step**: the project's epoch loop (``stage1_pro.training.engine.train_one_epoch``: uint8
   batch -> device -> normalise, ``Stage1Model`` with its head, the loss module, AdamW from
   ``create_optimizer``, the warm-up cosine schedule, progress) against a bare timm loop (same
   model and batch, float input already normalised in memory, ``F.cross_entropy``, AdamW,
   ``backward``/``step``/``zero_grad``). Goal on CPU: ratio >= 0.95.
2. **Data path**: the same project loop reading prepared shards (memory-mapped ``.npy``, what
   ``train --prepared`` reads) against in-memory tensors. Goal: ratio >= 0.9.
3. **Loader**: images/s of the shard loader alone with 0, 1 and 2 worker processes, i.e. what
   one CPU core feeds, to size the train task's CPU request (README "Training"); and the decode
   rate of ``prepare`` on a 12-MP JPEG (draft vs full decoding) per core.
4. **GPU** (when CUDA is present, or ``--suite gpu``): ``vit_small_patch14_dinov2`` at 224 px,
   batch 256, bf16 autocast: bare vs project, eager and ``torch.compile``; the project's
   DoRA/LoRA ratio (phase-2 adapters).

On CPU, time is the calling thread's CPU time (``time.thread_time``) with one intra-op thread,
so other processes on a shared machine do not distort the ratios; on GPU it is wall time between
synchronisations. ``python bench/train_throughput.py --help`` lists the knobs.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import timm
import torch
import torch.nn.functional as F  # noqa: N812

from stage1_pro.config import Stage1ProConfig
from stage1_pro.losses import create_loss
from stage1_pro.models import create_model
from stage1_pro.optim import create_optimizer, create_scheduler
from stage1_pro.training import engine
from stage1_pro.training.distributed import DistInfo
from stage1_pro.training.loaders import EpochBatchSampler, ShardBatches, TensorBatches, make_loader
from stage1_pro.training.phases import get_phase


class Clock:
    """Thread CPU time on CPU (robust to other load), wall time between syncs on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.thread_time()


# ------------------------------------------------------------------------------------------
# the two loops


class BareLoop:
    """A plain timm training loop: the baseline."""

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
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if compile_ else self.model
        on_cuda = device.type == "cuda"
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
    """The project's loop: ``engine.train_one_epoch`` over a loader of uint8 batches."""

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
        self.config = Stage1ProConfig(
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
        recipe = get_phase(phase)
        torch.manual_seed(0)
        model = create_model(self.config).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        loss_fn = create_loss(recipe.loss, self.config).to(device)
        optimizer = create_optimizer(model, self.config, device=device)
        scheduler = create_scheduler(optimizer, self.config, updates_per_epoch=1000)
        step_module = torch.compile(model) if compile_ else model
        self.state = engine.TrainState(
            config=self.config,
            recipe=recipe,
            dist=DistInfo(device=device),
            amp_dtype=engine.resolve_amp(self.config, device),
            model=model,
            module=model,
            step_module=step_module,
            loss_fn=loss_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            to_input=engine.InputTransform.for_model(model.info, device),
            augment="none",
            out_dir="",
            epochs=1000,
        )
        self.dataset, self.rows, self.workers = dataset, rows, workers
        self.loaders: dict[int, torch.utils.data.DataLoader] = {}

    def run(self, steps: int) -> int:
        rows = self.rows[: steps * self.config.batch_size]
        if steps not in self.loaders:
            sampler = EpochBatchSampler(rows, self.config.batch_size, shuffle=True, seed=0, drop_last=True)
            self.loaders[steps] = make_loader(
                self.dataset, sampler, num_workers=self.workers, pin_memory=self.state.device.type == "cuda"
            )
        engine.train_one_epoch(self.state, self.loaders[steps], epoch=0)
        return steps * self.config.batch_size


def _size_kwargs(name: str, img_size: int) -> dict:
    try:
        timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
        return {"img_size": img_size}
    except TypeError:
        return {}


def interleaved(
    variants: dict[str, object], steps: int, rounds: int, warmup: int, clock: Clock
) -> dict[str, float]:
    """Median images/s per variant over interleaved rounds (one warm-up run each first)."""
    for loop in variants.values():
        loop.run(warmup)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, loop in variants.items():
            start = clock.now()
            n = loop.run(steps)
            rates[name].append(n / (clock.now() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


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


# ------------------------------------------------------------------------------------------


def cpu_suite(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    clock = Clock(device)
    n_images = max(args.batch_size * args.steps * 2, 200)
    shards, rows = prepared_demo(tmp, args.img_size, n_images)
    images, labels, _ = shards[rows.tolist()]
    memory = TensorBatches(images.clone(), labels.numpy())
    variants = {
        "bare timm loop": BareLoop(args, device, images, labels),
        "project (in-memory)": ProjectLoop(args, device, memory, rows),
        "project (prepared shards)": ProjectLoop(args, device, shards, rows),
    }
    rates = interleaved(variants, args.steps, args.rounds, args.warmup, clock)
    report = {
        "device": str(device),
        "model": args.model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "img_per_s": rates,
    }
    report["step_ratio"] = rates["project (in-memory)"] / rates["bare timm loop"]
    report["data_path_ratio"] = rates["project (prepared shards)"] / rates["project (in-memory)"]
    report.update(data_suite(args, tmp))
    return report


def data_suite(args: argparse.Namespace, tmp: Path) -> dict:
    """Decode rate per core (prepare) and shard-loader rate per worker (training) at loader size."""
    big, big_rows = prepared_demo(tmp / "big", args.loader_img_size, 4 * args.loader_batch)
    return {
        "decode_img_per_s_per_core": decode_rates(tmp, args.loader_img_size),
        "loader_img_per_s": loader_rates(big, big_rows, args.loader_batch, (0, 1, 2)),
    }


def gpu_suite(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    clock = Clock(device)
    n = args.batch_size * max(args.steps, 2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, args.img_size, args.img_size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    memory = TensorBatches(images, labels.numpy())
    rows = np.arange(n)
    report = {
        "device": str(device),
        "model": args.model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "amp": "bf16" if device.type == "cuda" else "off",
    }
    modes = [False, True] if args.compile else [False]
    rates: dict[str, float] = {}
    for compile_ in modes:
        tag = "compile" if compile_ else "eager"
        variants = {
            f"bare ({tag})": BareLoop(args, device, images, labels, compile_=compile_),
            f"project full ({tag})": ProjectLoop(args, device, memory, rows, compile_=compile_, workers=0),
        }
        rates.update(interleaved(variants, args.steps, args.rounds, args.warmup, clock))
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report[f"step_ratio_{tag}"] = rates[f"project full ({tag})"] / rates[f"bare ({tag})"]
    peft = {
        f"project {m} (eager)": ProjectLoop(
            args, device, memory, rows, phase=2, finetune_mode="peft", peft_method=m
        )
        for m in ("lora", "dora")
    }
    rates.update(interleaved(peft, args.steps, args.rounds, args.warmup, clock))
    report["dora_over_lora"] = rates["project dora (eager)"] / rates["project lora (eager)"]
    report["img_per_s"] = rates
    report.update(data_suite(args, tmp))
    return report


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--suite", choices=["auto", "cpu", "gpu"], default="auto", help="auto: gpu when CUDA is present"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--model", default=None, help="timm model (cpu: the local default; gpu: vit_small_patch14_dinov2)"
    )
    p.add_argument("--img-size", type=int, default=None, help="cpu: the config default; gpu: 224")
    p.add_argument("--batch-size", type=int, default=None, help="cpu: 32; gpu: 256")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (cpu 4, gpu 20)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (cpu 1, gpu 5)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="gpu suite: skip torch.compile")
    p.add_argument(
        "--loader-img-size", type=int, default=224, help="image size of the loader/decode measurements"
    )
    p.add_argument("--loader-batch", type=int, default=256, help="batch size of the loader measurement")
    p.add_argument(
        "--threads", type=int, default=1, help="cpu intra-op threads (1: thread-CPU timing is exact)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    suite = ("gpu" if cuda else "cpu") if args.suite == "auto" else args.suite
    device = torch.device(
        "cuda"
        if (cuda and args.device in ("auto", "cuda"))
        else (args.device if args.device != "auto" else "cpu")
    )
    defaults = Stage1ProConfig()
    if suite == "gpu":
        args.model = args.model or "vit_small_patch14_dinov2"
        args.img_size, args.batch_size = args.img_size or 224, args.batch_size or 256
        args.steps, args.warmup = args.steps or 20, args.warmup if args.warmup is not None else 5
    else:
        args.model = args.model or defaults.model_name
        args.img_size, args.batch_size = args.img_size or defaults.img_size, args.batch_size or 32
        args.steps, args.warmup = args.steps or 4, args.warmup if args.warmup is not None else 1
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"suite {suite} on {device} ({name}), model {args.model} @ {args.img_size} px, "
        f"batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = (gpu_suite if suite == "gpu" else cpu_suite)(args, device, Path(tmp))
    width = max(len(k) for k in report["img_per_s"])
    print(f"\n{'variant'.ljust(width)}  img/s")
    for name, rate in report["img_per_s"].items():
        print(f"{name.ljust(width)}  {rate:8.1f}")
    print()
    for key, value in report.items():
        if key.endswith("ratio") or key.startswith(("step_ratio", "dora_over")):
            goal = {
                "step_ratio": ">= 0.95",
                "data_path_ratio": ">= 0.9",
                "step_ratio_compile": ">= 0.95",
            }.get(key, "")
            print(f"{key}: {value:.3f} {goal}")
        elif key.startswith(("loader", "decode")):
            print(f"{key}: " + ", ".join(f"{k}: {v:,.0f}" for k, v in value.items()))
    if "loader_img_per_s" in report:
        per_worker = report["loader_img_per_s"][1]
        print(
            f"\nsizing: one loader worker feeds ~{per_worker:,.0f} img/s of "
            f"{args.loader_img_size}-px prepared "
            f"images (batch {args.loader_batch}); a ViT-S/14 step at 6,560 img/s (H200, compiled) needs "
            f"~{math.ceil(6560 / per_worker)} worker(s) + 1 core for the training process"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
