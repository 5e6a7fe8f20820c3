"""Model FLOPs of a forward pass and of a training step, for model FLOPs utilisation (MFU).

MFU is the share of a device's peak arithmetic rate that the *model's* FLOPs use:
``images/s x FLOPs per image / peak FLOP/s`` (Chowdhery et al., PaLM, arXiv 2204.02311, App. B).
Only matrix products count (linear layers, convolutions, the attention products); norms,
activations and the softmax are a few percent and left out, as in that definition. One
multiply-add is two FLOPs.

* **Vision Transformers** (timm ``VisionTransformer``, the cluster default): counted analytically
  from the architecture (:func:`vit_flops`). A training step's backward pass costs, for each
  product, one product per operand that needs a gradient: the input's when a trainable parameter
  lies upstream of it, the weight's when the weight trains. So full fine-tuning costs about 3x the
  forward pass, adapters on a frozen backbone (phase 2) about 2x (no weight gradients), and the
  frozen base layer in front of the first adapter needs no backward at all.
* **Other networks** (e.g. the local default ``tf_efficientnet_lite0``): counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` on one real forward and backward pass
  (:func:`counted_flops`).

:func:`peak_tflops` gives the peak the benches divide by: a data-sheet value for known GPUs, the
user's ``--peak-tflops``, or a matrix product timed on the device (on CPU: one thread's fp32 GEMM
rate, what a step at 100 % MFU could reach there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

#: Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, by device-name fragment
#: (first match wins, so the PCIe H100 comes before the SXM one).
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L4", 121.0),
)


@dataclass(frozen=True, kw_only=True)
class ModelFlops:
    """FLOPs per image.

    Attributes:
        forward: one forward pass.
        train_step: forward + backward as the model's trainable parameters require.
        method: ``analytic ViT`` or ``counted`` (FlopCounterMode).
    """

    forward: float
    train_step: float
    method: str


def _trains(module: nn.Module) -> bool:
    """True when the module's own weight is trained."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.requires_grad


class _Tally:
    """Forward and backward FLOPs of products in forward order, tracking where gradients flow."""

    def __init__(self, grad_flows: bool = False) -> None:
        self.forward = 0.0
        self.backward = 0.0
        self.grad_flows = grad_flows  # does the current activation require a gradient?

    def weighted(self, flops: float, trains: bool) -> None:
        """A product of the activation with a weight (linear layer, convolution)."""
        self.forward += flops
        self.backward += flops * (int(self.grad_flows) + int(trains))
        self.grad_flows = self.grad_flows or trains

    def activations(self, flops: float) -> None:
        """A product of two activations (attention): both operands get a gradient when it flows."""
        self.forward += flops
        self.backward += 2 * flops if self.grad_flows else 0.0


def _linear(tally: _Tally, module: nn.Module, rows: int) -> None:
    """A linear layer, or a low-rank adapter around one (base product plus the two rank-r products)."""
    from stage1_pro.models.dora import LowRankAdapter

    if isinstance(module, LowRankAdapter):
        base = module.base_layer
        flows_in = tally.grad_flows
        tally.weighted(2.0 * rows * base.in_features * base.out_features, _trains(base))
        low_rank = _Tally(grad_flows=flows_in)
        low_rank.weighted(2.0 * rows * base.in_features * module.lora_A.shape[0], module.lora_A.requires_grad)
        low_rank.weighted(
            2.0 * rows * module.lora_A.shape[0] * base.out_features, module.lora_B.requires_grad
        )
        tally.forward += low_rank.forward
        tally.backward += low_rank.backward
        tally.grad_flows = tally.grad_flows or low_rank.grad_flows
        return
    tally.weighted(2.0 * rows * module.in_features * module.out_features, _trains(module))


def is_vit(backbone: nn.Module) -> bool:
    """A timm ``VisionTransformer`` (patch embedding, blocks of attention + MLP)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(backbone, VisionTransformer)


def vit_flops(model: nn.Module, img_size: int) -> ModelFlops:
    """Analytical FLOPs per image of a timm ViT (alone, or as the backbone of a ``Stage1Model``).

    Counts the patch embedding, per block the ``qkv``, ``proj``, ``fc1`` and ``fc2`` products (and
    the rank-r products of adapters around them) over all tokens and the two attention products
    ``Q Kᵀ`` and ``A V`` (``2·N²·D`` each), then every other linear layer (heads) on the pooled
    feature.

    Args:
        model: the ViT, or a model with the ViT as ``model.backbone``.
        img_size: input side in pixels.

    Returns:
        Forward and training-step FLOPs per image (``method="analytic ViT"``).

    Raises:
        ValueError: the model is not a timm VisionTransformer.
    """
    backbone = getattr(model, "backbone", model)
    if not is_vit(backbone):
        raise ValueError(f"{type(backbone).__name__} is not a timm VisionTransformer; use counted_flops")
    embed = backbone.patch_embed
    patch_h, patch_w = embed.patch_size
    grid = (img_size // patch_h) * (img_size // patch_w)
    tokens = grid + backbone.num_prefix_tokens
    prefix_trains = any(
        isinstance(p, torch.Tensor) and p.requires_grad
        for p in (getattr(backbone, "cls_token", None), getattr(backbone, "pos_embed", None))
    )
    tally = _Tally()
    tally.weighted(
        2.0 * grid * embed.proj.in_channels * patch_h * patch_w * backbone.embed_dim, _trains(embed.proj)
    )
    tally.grad_flows = tally.grad_flows or prefix_trains
    counted: set[int] = {id(m) for m in embed.modules()}
    for block in backbone.blocks:
        attn, mlp = block.attn, block.mlp
        _linear(tally, attn.qkv, tokens)
        width = attn.num_heads * attn.head_dim
        tally.activations(2.0 * tokens * tokens * width)  # Q Kᵀ
        tally.activations(2.0 * tokens * tokens * width)  # softmax(Q Kᵀ) V
        _linear(tally, attn.proj, tokens)
        _linear(tally, mlp.fc1, tokens)
        _linear(tally, mlp.fc2, tokens)
        counted.update(id(m) for m in block.modules())
    heads: dict[str, _Tally] = {}  # each head is its own branch on the pooled feature: one row per image
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in counted:
            branch = ".".join(name.split(".")[:2])  # "head", "heads.gate", ...
            _linear(heads.setdefault(branch, _Tally(grad_flows=tally.grad_flows)), module, 1)
    forward = tally.forward + sum(h.forward for h in heads.values())
    backward = tally.backward + sum(h.backward for h in heads.values())
    return ModelFlops(forward=forward, train_step=forward + backward, method="analytic ViT")


def counted_flops(
    model: nn.Module, img_size: int, loss: nn.Module | None = None, batch_size: int = 2
) -> ModelFlops:
    """FLOPs per image counted by ``FlopCounterMode`` on one forward and one backward pass.

    Args:
        model: any network taking ``(n, 3, img_size, img_size)`` input, in train mode; its
            outputs (a tensor or a dict of tensors) are summed for the backward pass unless
            ``loss`` maps them to a scalar.
        img_size: input side in pixels.
        loss: optional ``loss(outputs) -> scalar``.
        batch_size: images of the counted batch (2: BatchNorm needs more than one).

    Returns:
        Forward and training-step FLOPs per image (``method="counted"``); the gradients the pass
        leaves in ``model`` are cleared.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # The fused adapter functions accumulate with the in-place addmm_, which the counter lacks.
    in_place = {torch.ops.aten.addmm_: _addmm_flop}
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    with FlopCounterMode(display=False, custom_mapping=in_place) as forward_counter:
        out = model(x)
    forward = forward_counter.get_total_flops()
    scalar = loss(out) if loss is not None else sum(v.float().sum() for v in _tensors(out))
    with FlopCounterMode(display=False, custom_mapping=in_place) as backward_counter:
        scalar.backward()
    model.zero_grad(set_to_none=True)
    total = forward + backward_counter.get_total_flops()
    return ModelFlops(forward=forward / batch_size, train_step=total / batch_size, method="counted")


def _addmm_flop(
    self_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args, **kwargs
) -> int:
    """FLOPs of ``self.addmm_(a, b)`` (``FlopCounterMode`` passes the tensors' shapes)."""
    (m, k), n = a_shape, b_shape[1]
    return 2 * m * k * n


def _tensors(out: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else [out]


def model_flops(model: nn.Module, img_size: int) -> ModelFlops:
    """:func:`vit_flops` for a ViT, else :func:`counted_flops`."""
    if is_vit(getattr(model, "backbone", model)):
        return vit_flops(model, img_size)
    return counted_flops(model, img_size)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """The rate (TFLOP/s) of a square matrix product on ``device``: an achievable peak.

    On CPU it is timed by the calling thread's CPU time (``size`` 1024 by default), on CUDA by
    wall time between synchronisations (``size`` 8192).
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.thread_time
    repeats = 20 if cuda else 5
    torch.mm(a, b)  # warm-up (kernel selection)
    if cuda:
        torch.cuda.synchronize(device)
    start = clock()
    for _ in range(repeats):
        torch.mm(a, b)
    if cuda:
        torch.cuda.synchronize(device)
    return 2.0 * size**3 * repeats / (clock() - start) / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float, str]:
    """The peak FLOP rate MFU is measured against, and where it comes from.

    Args:
        device: the device the bench runs on.
        dtype: the dtype of the products (bf16 under autocast on GPU, fp32 on CPU).
        override: a peak (TFLOP/s) the user passed; used as is.

    Returns:
        ``(TFLOP/s, source)``: the override; for a GPU in :data:`GPU_PEAK_BF16_TFLOPS` running bf16,
        its data-sheet dense peak; otherwise a measured square matrix product
        (:func:`measure_matmul_tflops`).
    """
    if override is not None:
        return override, "given (--peak-tflops)"
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in GPU_PEAK_BF16_TFLOPS:
            if fragment in name:
                return tflops, f"{name} dense bf16 data sheet"
    measured = measure_matmul_tflops(device, dtype)
    where = "one thread's" if device.type == "cpu" and torch.get_num_threads() == 1 else "the device's"
    return measured, f"measured: {where} {str(dtype).removeprefix('torch.')} matrix product"


def mfu(images_per_s: float, flops_per_image: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (TFLOP/s)."""
    return images_per_s * flops_per_image / (peak * 1e12)
