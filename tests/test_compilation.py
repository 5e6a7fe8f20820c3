"""compile=true: the repeated block compiled one by one, whole-model compilation otherwise."""

from __future__ import annotations

import pytest
import torch

from stage1_pro.config import Stage1ProConfig
from stage1_pro.models import create_model
from stage1_pro.training.compilation import compile_for_training, eager, repeated_blocks


def _model(name: str) -> torch.nn.Module:
    return create_model(Stage1ProConfig(model_name=name, pretrained=False, img_size=32))


def test_a_vit_compiles_its_blocks_and_a_convnet_or_heads_compile_whole() -> None:
    vit = _model("test_vit")
    assert repeated_blocks(vit) == list(vit.backbone.blocks)
    assert repeated_blocks(_model("test_efficientnet")) == []  # stages of different blocks
    assert repeated_blocks(vit.heads) == []
    compiled = compile_for_training(vit)
    assert compiled is vit  # in place: state_dict keys and checkpoints are unchanged
    assert all(block._compiled_call_impl is not None for block in vit.backbone.blocks)
    assert vit.backbone.patch_embed._compiled_call_impl is None
    heads = compile_for_training(vit.heads)
    assert isinstance(heads, torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_gradients_and_validation_compiles_nothing() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager_model = _model("test_vit").train()
    compiled_model = _model("test_vit").train()
    compiled_model.load_state_dict(eager_model.state_dict())
    compile_for_training(compiled_model)
    x = torch.randn(4, 3, 32, 32)
    eager_model(x)["logits"].sum().backward()
    compiled_model(x)["logits"].sum().backward()
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1  # one block traced, its code reused by the five others
    with torch.no_grad(), eager():  # validation: another batch size, no gradients, not compiled again
        out = compiled_model.eval()(torch.cat([x, x]))["logits"]
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(out, eager_model.eval()(torch.cat([x, x]))["logits"], rtol=1e-4, atol=1e-5)
