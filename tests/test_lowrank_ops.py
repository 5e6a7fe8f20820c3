"""The fused LoRA/DoRA autograd functions against the same formulas built from autograd operations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stage1_pro.models.dora import DoRALayer, LoRALayer


def _pair(cls: type, bias: bool, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    """The fused layer and a copy that takes the composed (autograd-built) path."""
    torch.manual_seed(0)
    fused = cls(nn.Linear(12, 10, bias=bias), 4, 8.0).to(dtype)
    with torch.no_grad():
        fused.lora_B.normal_()
        if cls is DoRALayer:
            fused.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 10, dtype=dtype))
            fused.lora_magnitude[3] = 0.0  # a row with k = 0: only the low-rank part of its gradient
    composed = cls(nn.Linear(12, 10, bias=bias), 4, 8.0).to(dtype)
    composed.load_state_dict(fused.state_dict())
    composed._fused_path = lambda: False
    return fused, composed


def _grads(layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    ((out.float() - target) ** 2).sum().backward()
    params = [p.grad for n, p in sorted(layer.named_parameters()) if p.requires_grad]
    return (out, x.grad, *params)


@pytest.mark.parametrize("cls", [LoRALayer, DoRALayer], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_equals_composed_in_float64(cls: type, bias: bool) -> None:
    fused, composed = _pair(cls, bias)
    assert fused._fused_path() and not composed._fused_path()
    x = torch.randn(3, 5, 12, dtype=torch.float64)  # (batch, tokens, features), as in a ViT
    target = torch.randn(3, 5, 10, dtype=torch.float64)
    for mine, ref in zip(_grads(fused, x, target), _grads(composed, x, target), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [LoRALayer, DoRALayer], ids=["lora", "dora"])
def test_fused_under_bf16_autocast_keeps_dtypes_and_matches(cls: type) -> None:
    fused, composed = _pair(cls, bias=True, dtype=torch.float32)
    x = torch.randn(64, 12)
    target = torch.randn(64, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = _grads(fused, x, target)
        ref = _grads(composed, x, target)
    assert mine[0].dtype == torch.bfloat16 and mine[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in mine[2:])
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_dropout_in_training_takes_the_composed_path() -> None:
    layer = DoRALayer(nn.Linear(12, 10), 4, 8.0, dropout=0.1)
    assert not layer._fused_path()
    layer.eval()
    assert layer._fused_path()
