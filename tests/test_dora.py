"""The project's LoRA/DoRA layers against HF PEFT (same init -> same outputs, gradients, steps, merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from stage1_pro.errors import ConfigError, NotBuiltError
from stage1_pro.models.dora import (
    DoRALayer,
    FusedQKVLoRA,
    LoRALayer,
    apply_adapters,
    create_adapter,
    merge_adapters,
)

RANK, ALPHA = 4, 8.0


class _Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _pair(layer: nn.Module, dora: bool, dropout: float = 0.0):
    """(PEFT model, our adapter) on identical copies of ``layer``, our A/B/m copied from PEFT's."""
    torch.manual_seed(1)
    ours_cls = DoRALayer if dora else LoRALayer
    ours = ours_cls(copy.deepcopy(layer), RANK, ALPHA, dropout)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["layer"], use_dora=dora)
    peft_model = get_peft_model(_Net(copy.deepcopy(layer)), cfg)
    peft_layer = peft_model.base_model.model.layer
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
        if dora:
            # same init rule: m = ||W0||_row, computed independently on both sides
            peft_m = peft_layer.lora_magnitude_vector["default"].weight.view(-1)
            torch.testing.assert_close(ours.lora_magnitude, peft_m)
            ours.lora_magnitude.copy_(peft_m)  # bitwise, so that float64 steps can be compared tightly
    return peft_model, peft_layer, ours


def _peft_params(peft_layer, dora: bool) -> list[torch.Tensor]:
    params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    if dora:
        params.append(peft_layer.lora_magnitude_vector["default"].weight)
    return params


def _our_params(ours, dora: bool) -> list[torch.Tensor]:
    return [ours.lora_A, ours.lora_B] + ([ours.lora_magnitude] if dora else [])


LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (6, 5, 12)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), (2, 6, 7, 7)),
}


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_matches_peft_at_init_and_after_steps(kind: str, dora: bool) -> None:
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    peft_model, peft_layer, ours = _pair(layer, dora)
    peft_model.double()
    ours.double()
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn_like(peft_model(x))
    torch.testing.assert_close(ours(x), peft_model(x))  # at init both equal the base layer
    torch.testing.assert_close(ours(x), layer(x))

    opt_peft = torch.optim.AdamW(_peft_params(peft_layer, dora), lr=0.05)
    opt_ours = torch.optim.AdamW(_our_params(ours, dora), lr=0.05)
    for step in range(3):  # step 1 moves B (and m) only; steps 2-3 move A and the norm
        xs = x * (1 + 0.1 * step)
        for model, opt in ((peft_model, opt_peft), (ours, opt_ours)):
            opt.zero_grad()
            ((model(xs) - target) ** 2).mean().backward()
        for ref, mine in zip(_peft_params(peft_layer, dora), _our_params(ours, dora), strict=True):
            torch.testing.assert_close(mine.grad.view_as(ref.grad), ref.grad, rtol=1e-9, atol=1e-12)
        opt_peft.step()
        opt_ours.step()
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-9, atol=1e-10)
    assert ours.lora_B.abs().sum() > 0 and not torch.allclose(ours(x), layer(x))

    # Same merge: a plain layer of the base type, equal to the unmerged output and to PEFT's merge.
    merged = ours.merge()
    assert type(merged) is type(layer) and merged.weight.requires_grad
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-9, atol=1e-10)
    peft_merged = peft_model.merge_and_unload().layer
    torch.testing.assert_close(merged.weight, peft_merged.weight, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_dropout_path_matches_peft(dora: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 10).double()
    peft_model, peft_layer, ours = _pair(layer, dora, dropout=0.3)
    peft_model.double().train()
    ours.double().train()
    with torch.no_grad():  # a non-zero B so that the dropped path matters
        b = torch.randn_like(ours.lora_B)
        ours.lora_B.copy_(b)
        peft_layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.manual_seed(7)
    ref = peft_model(x)
    torch.manual_seed(7)
    mine = ours(x)
    torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-10)
    ours.eval()
    peft_model.eval()
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-9, atol=1e-10)


def test_dora_norm_is_detached_and_magnitude_gets_gradient() -> None:
    torch.manual_seed(0)
    layer = DoRALayer(nn.Linear(8, 5), RANK, ALPHA)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_magnitude.grad.abs().sum() > 0
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    # k = m / ||W0 + sBA|| exactly: the merged weight has row norms equal to m
    torch.testing.assert_close(
        torch.linalg.vector_norm(layer.merged_weight(), dim=1), layer.lora_magnitude.detach()
    )


def test_dora_bf16_autocast_keeps_activation_dtype() -> None:
    torch.manual_seed(0)
    layer = DoRALayer(nn.Linear(16, 8), RANK, ALPHA)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # no silent promotion of the activations to fp32
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)


def test_fused_qkv_lora_adapts_only_q_and_v() -> None:
    torch.manual_seed(0)
    dim = 6
    base = nn.Linear(dim, 3 * dim)
    qv = FusedQKVLoRA(copy.deepcopy(base), RANK, ALPHA)
    assert qv.lora_A.shape == (2 * RANK, dim) and qv.lora_B.shape == (2, dim, RANK)
    x = torch.randn(5, dim)
    torch.testing.assert_close(qv(x), base(x))
    with torch.no_grad():
        qv.lora_B.normal_()
    out, ref = qv(x), base(x)
    torch.testing.assert_close(out[:, dim : 2 * dim], ref[:, dim : 2 * dim])  # K untouched
    a_q, a_v = qv.lora_A[:RANK], qv.lora_A[RANK:]
    torch.testing.assert_close(out[:, :dim], ref[:, :dim] + qv.scaling * (x @ a_q.T) @ qv.lora_B[0].T)
    torch.testing.assert_close(
        out[:, 2 * dim :], ref[:, 2 * dim :] + qv.scaling * (x @ a_v.T) @ qv.lora_B[1].T
    )
    merged = qv.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), out)


def test_apply_and_merge_on_a_timm_vit_gives_a_plain_timm_model() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=8).requires_grad_(False)
    names = apply_adapters(
        model, "dora", r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", rank=RANK, alpha=ALPHA
    )
    assert len(names) == 4 * len(model.blocks)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude") for n in trainable
    )
    for module in model.modules():
        if isinstance(module, DoRALayer):
            with torch.no_grad():
                module.lora_B.normal_(std=0.05)
                module.lora_magnitude.mul_(1.1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    merge_adapters(model)
    assert not any(isinstance(m, (DoRALayer, LoRALayer)) for m in model.modules())
    plain = timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=8).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_have_clear_errors() -> None:
    with pytest.raises(NotBuiltError, match=r"DoRAN .*arXiv 2510\.04331.*abstract.*peft_method=dora"):
        create_adapter("doran", nn.Linear(4, 4), RANK, ALPHA)
    with pytest.raises(ConfigError, match=r"peft_method='ia3' is unknown; allowed: lora, dora"):
        create_adapter("ia3", nn.Linear(4, 4), RANK, ALPHA)
    with pytest.raises(ConfigError, match=r"groups=1.*exclude this module"):
        create_adapter("dora", nn.Conv2d(4, 4, 3, groups=4), RANK, ALPHA)
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        create_adapter("lora", nn.Linear(4, 4), 0, ALPHA)
    with pytest.raises(ConfigError, match=r"no nn.Linear .* matches the adapter target pattern 'nothing'"):
        apply_adapters(_Net(nn.Linear(4, 4)), "dora", "nothing", rank=RANK, alpha=ALPHA)
    with pytest.raises(ConfigError, match="divisible by 3"):
        FusedQKVLoRA(nn.Linear(4, 4), RANK, ALPHA)
    with pytest.raises(ConfigError, match="distinct entries of 'q', 'k', 'v'"):
        FusedQKVLoRA(nn.Linear(4, 12), RANK, ALPHA, slices=("q", "x"))
