"""Model FLOPs for MFU: the analytical ViT count against PyTorch's FLOP counter on a real step."""

from __future__ import annotations

import pytest
import torch

from stage1_pro.config import Stage1ProConfig
from stage1_pro.models import create_model
from stage1_pro.models.flops import counted_flops, mfu, peak_tflops, vit_flops


def _vit(finetune_mode: str, phase: int = 3, peft_method: str = "lora") -> torch.nn.Module:
    config = Stage1ProConfig(
        model_name="test_vit",
        pretrained=False,
        img_size=64,
        phase=phase,
        finetune_mode=finetune_mode,
        peft_method=peft_method,
    )
    torch.manual_seed(0)
    model = create_model(config).train()
    for block in model.backbone.blocks:  # explicit attention products, which FlopCounterMode sees
        block.attn.fused_attn = False
    return model


@pytest.mark.parametrize(
    ("finetune_mode", "phase"),
    [("full", 3), ("peft", 2), ("frozen", 3)],
)
def test_analytic_vit_flops_equal_the_counted_forward_and_backward(finetune_mode: str, phase: int) -> None:
    model = _vit(finetune_mode, phase)
    analytic, counted = vit_flops(model, 64), counted_flops(model, 64, batch_size=4)
    assert analytic.method == "analytic ViT" and counted.method == "counted"
    assert analytic.forward == pytest.approx(counted.forward, rel=1e-9)
    assert analytic.train_step == pytest.approx(counted.train_step, rel=1e-9)


def test_a_step_costs_three_forwards_in_full_fine_tuning_and_two_with_adapters() -> None:
    full, lora, frozen = (vit_flops(_vit(m, p), 64) for m, p in (("full", 3), ("peft", 2), ("frozen", 3)))
    assert 2.8 < full.train_step / full.forward < 3.0  # the patch embedding needs no input gradient
    assert 1.9 < lora.train_step / lora.forward < 2.0  # no weight gradients of the frozen layers
    assert 1.0 < frozen.train_step / frozen.forward < 1.01  # only the heads train


def test_vit_flops_refuses_a_convnet() -> None:
    model = create_model(Stage1ProConfig(model_name="test_efficientnet", pretrained=False, img_size=32))
    with pytest.raises(ValueError, match="not a timm VisionTransformer; use counted_flops"):
        vit_flops(model, 32)


def test_peak_is_the_override_or_a_measured_product_on_cpu() -> None:
    assert peak_tflops(torch.device("cpu"), torch.float32, override=1.5) == (1.5, "given (--peak-tflops)")
    measured, source = peak_tflops(torch.device("cpu"), torch.float32)
    assert measured > 0 and source.startswith("measured")
    assert mfu(1000.0, 2e9, 4.0) == pytest.approx(0.5)
