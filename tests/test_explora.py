"""ExPLoRA: exactly the intended parameters train, a tiny DINO run, the merged backbone is plain timm."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm")

from stage1_pro.errors import ArtifactError, ConfigError  # noqa: E402
from stage1_pro.models.dora import FusedQKVLoRA  # noqa: E402
from stage1_pro.training.explora import (  # noqa: E402
    DINOLoss,
    ExPLoRA,
    add_explora_adapters,
    check_explora_model,
    load_extended_backbone,
    multi_crop,
    save_extended_backbone,
)
from stage1_pro.training.loaders import TensorBatches  # noqa: E402

IMG, RANK = 32, 4
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _vit(dynamic: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=0, img_size=IMG, dynamic_img_size=dynamic)


def _images(n: int = 24) -> torch.Tensor:
    """Structured uint8 NHWC images (bars at random positions), so views share content."""
    g = np.random.default_rng(0)
    x = np.zeros((n, IMG, IMG, 3), dtype=np.uint8)
    for i in range(n):
        r, c = g.integers(0, IMG - 8, size=2)
        x[i, r : r + 8, :, i % 3] = 255
        x[i, :, c : c + 4, (i + 1) % 3] = 180
    return torch.from_numpy(x)


def test_non_vit_models_are_refused_with_a_clear_error() -> None:
    check_explora_model("test_vit")
    check_explora_model("vit_small_patch14_dinov2")
    with pytest.raises(ConfigError, match=r"phase 4 \(ExPLoRA\) needs a ViT backbone.*tf_efficientnet_lite0"):
        check_explora_model("tf_efficientnet_lite0")
    with pytest.raises(ConfigError, match="not a timm model"):
        check_explora_model("no_such_model")
    with pytest.raises(ConfigError, match=r"explora_unfrozen_blocks=6: must be between 1 and 5"):
        add_explora_adapters(_vit(), unfrozen_blocks=6, rank=RANK)


@pytest.mark.parametrize("unfrozen", [1, 2])
def test_exactly_the_intended_parameters_train(unfrozen: int) -> None:
    vit = _vit()
    depth, dim = len(vit.blocks), vit.embed_dim
    est = ExPLoRA(unfrozen_blocks=unfrozen, lora_rank=RANK, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    student = est.prepare(vit)
    trainable = {n: p.numel() for n, p in student.named_parameters() if p.requires_grad}

    block_params = sum(p.numel() for b in vit.blocks[depth - unfrozen :] for p in b.parameters())
    lora_params = (depth - unfrozen) * (
        2 * RANK * dim + 2 * dim * RANK
    )  # A_q, A_v (r x dim); B_q, B_v (dim x r)
    head_params = sum(p.numel() for p in student.head.parameters())
    assert sum(trainable.values()) == block_params + lora_params + head_params == est.trainable_["total"]
    assert est.trainable_["lora"] == lora_params and est.trainable_["unfrozen_blocks"] == block_params

    first_unfrozen = depth - unfrozen
    for name in trainable:
        parts = name.split(".")
        if parts[0] == "head":
            continue
        assert parts[:2] == ["backbone", "blocks"], name
        block = int(parts[2])
        assert block >= first_unfrozen or name.endswith(("attn.qkv.lora_A", "attn.qkv.lora_B")), name
    for i, block in enumerate(vit.blocks):
        assert isinstance(block.attn.qkv, FusedQKVLoRA) == (i < first_unfrozen)
        if i < first_unfrozen:
            assert block.attn.qkv.slices == ("q", "v")
    assert not any(
        p.requires_grad
        for n, p in vit.named_parameters()
        if n.startswith(("patch_embed", "pos_embed", "norm"))
    )


def test_multi_crop_views_and_dino_loss() -> None:
    g = torch.Generator().manual_seed(0)
    views = multi_crop(_images(4), global_size=IMG, local_size=16, n_local=3, mean=MEAN, std=STD, generator=g)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(torch.isfinite(v).all() for v in views)
    assert not torch.equal(views[0], views[1])
    loss = DINOLoss(8, n_crops=5)
    teacher = torch.randn(8, 8)
    # a student equal to the teacher on the other global view scores lower than a random one
    student = torch.cat([teacher.chunk(2)[1], teacher.chunk(2)[0], *[torch.randn(4, 8)] * 3])
    assert torch.isfinite(loss(student, teacher))
    before = loss.center.clone()
    loss(torch.randn(20, 8), teacher)
    assert not torch.equal(loss.center, before)  # centre EMA moves in training mode


@pytest.mark.slow
def test_tiny_pretraining_runs_trains_only_adapters_and_merges_into_a_plain_timm_vit(tmp_path) -> None:
    vit = _vit()
    frozen_before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    images = _images(24)
    est = ExPLoRA(
        unfrozen_blocks=1, lora_rank=RANK, epochs=3, batch_size=8, lr=2e-3, scale_lr=False, n_local=2,
        out_dim=64, hidden_dim=32, bottleneck_dim=16,
    )  # fmt: skip
    est.fit(vit, TensorBatches(images, np.zeros(24)), np.arange(24), mean=MEAN, std=STD, img_size=IMG)
    assert len(est.history_) == 3 and all(np.isfinite(est.history_))
    assert est.history_[-1] < est.history_[0]  # the DINO loss goes down on this tiny set

    depth = len(vit.blocks)
    after = dict(vit.named_parameters())
    for name, before in frozen_before.items():
        if name.startswith(f"blocks.{depth - 1}."):
            continue
        # a wrapped qkv keeps the original weights in its base layer
        now = after[name] if name in after else after[name.replace("attn.qkv.", "attn.qkv.base_layer.")]
        assert torch.equal(now, before), f"{name} changed"
    assert any(
        not torch.equal(after[n], frozen_before[n])
        for n in frozen_before
        if n.startswith(f"blocks.{depth - 1}.")
    )
    assert all(vit.blocks[i].attn.qkv.lora_B.abs().sum() > 0 for i in range(depth - 1))

    x = torch.randn(2, 3, IMG, IMG)
    vit.eval()
    with torch.no_grad():
        expected = vit(x)
    state = est.merged_state_dict()
    plain = timm.create_model("test_vit", num_classes=0, img_size=IMG).eval()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)

    # the artifact: round trip, wrong model / resolution, damaged weights
    info = {
        "model_name": "test_vit", "img_size": IMG, "data": "test images", "data_fingerprint": None,
        "n_images": 24,
        "settings": {"unfrozen_blocks": 1, "lora_rank": RANK, "epochs": 3, "batch_size": 8, "seed": 0},
        "trainable_parameters": est.trainable_, "objective": "DINO", "dino_loss_per_epoch": est.history_,
        "created_at": "2026-11-26T00:00:00Z",
    }  # fmt: skip
    out = str(tmp_path / "explora")
    save_extended_backbone(out, state, info)
    loaded, meta = load_extended_backbone(out, model_name="test_vit", img_size=IMG)
    assert meta["trainable_parameters"] == est.trainable_ and set(loaded) == set(state)
    with pytest.raises(
        ConfigError, match=r"made for test_vit at 32 px, but this run trains test_vit at 64 px"
    ):
        load_extended_backbone(out, model_name="test_vit", img_size=64)
    (tmp_path / "explora" / "backbone.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_extended_backbone(out + "/explora.json", model_name="test_vit", img_size=IMG)
