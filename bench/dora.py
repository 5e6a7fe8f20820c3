"""Training step time: the project's DoRA vs HF PEFT's DoRA vs LoRA, as ratios measured in one run.

Every variant adapts the same layers of the same timm ViT (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2`` of every block; rank 8, alpha 16; the classifier head trains too) and
runs the same AdamW training step (forward, cross-entropy, backward, step). The variants are
timed in interleaved rounds so that drifting machine load hits all of them alike; the table shows
the median images/s over the rounds, the model FLOPs utilisation (``stage1_pro.models.flops``:
analytical ViT FLOPs of the step, against the peak named in the header; ``--peak-tflops`` to give
one) and ratios against PEFT's LoRA and against our LoRA (the goal: our DoRA >= 0.85x our LoRA).
With ``--compile`` our two layers also run compiled (``torch.compile`` of the whole model) in the
same rounds, and the compiled/eager ratio is printed (the goal: compiled DoRA >= eager).

Defaults: on CUDA the issue's setting (``vit_small_patch14_dinov2``, 224 px, batch 256, bf16),
timed by wall clock between synchronisations; on CPU a small one (98 px = 7x7 patches, batch 16,
fp32) with one intra-op thread, timed by the thread's CPU time (``time.thread_time``), so that
other load on a shared machine does not distort the ratios (about a minute of CPU time).
Run ``python bench/dora.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import torch.nn.functional as F  # noqa: N812
from peft import LoraConfig, inject_adapter_in_model

from stage1_pro.models.dora import apply_adapters
from stage1_pro.models.flops import mfu, vit_flops
from stage1_pro.models.flops import peak_tflops as resolve_peak

TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
VARIANTS = ("lora (peft)", "dora (peft)", "lora (ours)", "dora (ours)")
COMPILED = ("lora (ours, compiled)", "dora (ours, compiled)")


def build(variant: str, base: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)
    method, backend = variant.split(" ", 1)
    if backend == "(peft)":
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _full(TARGETS, n)]
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, use_dora=method == "dora"), model
        )
    else:
        apply_adapters(model, method, TARGETS, rank=rank, alpha=alpha)
    model.get_classifier().requires_grad_(True)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return model


def _full(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=None, help="default: 224 on CUDA, 98 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="autocast dtype (default: bf16 on CUDA)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per round (default: 20 CUDA, 3 CPU)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default: 5 CUDA, 3 CPU)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default: 1)")
    parser.add_argument(
        "--compile", action="store_true", help="also time our LoRA and DoRA compiled (torch.compile)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: see header)")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    img = args.img_size or (224 if cuda else 98)
    batch = args.batch or (256 if cuda else 16)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    steps = args.steps or (20 if cuda else 3)
    rounds = args.rounds or (5 if cuda else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if cuda or args.threads > 1 else time.thread_time

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=2, img_size=img)
    variants = VARIANTS + (COMPILED if args.compile else ())
    models, optimizers, flops = {}, {}, {}
    for variant in variants:
        model = build(variant, base, args.rank, args.alpha).to(device).train()
        optimizers[variant] = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda or None
        )
        models[variant] = torch.compile(model) if "compiled" in variant else model
        if "(ours" in variant:  # PEFT's layers compute the same products as ours
            flops[variant.split(" ")[0]] = vit_flops(model, img).train_step
    product_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    peak, peak_source = resolve_peak(device, product_dtype, args.peak_tflops)
    n_train = sum(p.numel() for p in models["dora (ours)"].parameters() if p.requires_grad)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run(variant: str, n: int) -> float:
        model, opt = models[variant], optimizers[variant]
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        for _ in range(n):
            with autocast:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return n * batch / (clock() - start)

    memory = {}
    for variant in variants:  # warm-up (and compilation), then the peak memory of one step
        run(variant, 2)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            run(variant, 1)
            memory[variant] = torch.cuda.max_memory_allocated() / 2**30
    speeds: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            speeds[variant].append(run(variant, steps))

    med = {v: statistics.median(s) for v, s in speeds.items()}
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} thread(s))"
    timing = "wall clock" if clock is time.perf_counter else "thread CPU time"
    print(
        f"# {time.strftime('%Y-%m-%d')}: {args.model} {img}px batch {batch} {dtype}, rank {args.rank}, "
        f"on {name}; {rounds} rounds x {steps} steps, {timing}; torch {torch.__version__}"
    )
    print(f"# trainable parameters (our DoRA): {n_train:,}; MFU against {peak:.3g} TFLOP/s ({peak_source})")
    header = "| variant | img/s | MFU | vs PEFT LoRA | vs our LoRA |" + (" peak GiB |" if cuda else "")
    print(header)
    print("|---|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for v in variants:
        share = mfu(med[v], flops[v.split(" ")[0]], peak)
        row = (
            f"| {v} | {med[v]:.1f} | {100 * share:.1f}% | {med[v] / med['lora (peft)']:.2f} "
            f"| {med[v] / med['lora (ours)']:.2f} |"
        )
        print(row + (f" {memory[v]:.2f} |" if cuda else ""))
    print(f"\nour DoRA / our LoRA: {med['dora (ours)'] / med['lora (ours)']:.3f} (goal >= 0.85)")
    print(f"our DoRA / PEFT DoRA: {med['dora (ours)'] / med['dora (peft)']:.2f}x")
    print(f"PEFT DoRA / PEFT LoRA: {med['dora (peft)'] / med['lora (peft)']:.3f}")
    if args.compile:
        print(f"compiled DoRA / eager DoRA: {med[COMPILED[1]] / med['dora (ours)']:.3f} (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
