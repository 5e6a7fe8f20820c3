"""Losses: cross-entropy options, SelectiveLoss formulas, gradient flow and non-collapse."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch.nn import functional as F  # noqa: N812 (the PyTorch convention)

from stage1_pro.config import Stage1ProConfig
from stage1_pro.errors import ConfigError
from stage1_pro.losses import LOSSES, CrossEntropyLoss, SelectiveLoss, create_loss
from stage1_pro.models.heads import SELECTIVE_HEADS, StageHeads


def _outputs(
    n: int = 16, seed: int = 0, requires_grad: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {
        "logits": torch.randn(n, 2, generator=gen),
        "gate_logit": torch.randn(n, generator=gen),
        "aux_logits": torch.randn(n, 2, generator=gen),
    }
    for v in out.values():
        v.requires_grad_(requires_grad)
    target = torch.arange(n) % 2
    return out, target


def test_cross_entropy_class_weights_and_smoothing_match_torch() -> None:
    out, y = _outputs()
    loss = CrossEntropyLoss(class_weights=[1.0, 4.0], label_smoothing=0.1)(out, y)["loss"]
    expected = F.cross_entropy(out["logits"], y, weight=torch.tensor([1.0, 4.0]), label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    # the weight really changes the value: a missed positive costs more
    assert not torch.allclose(loss, CrossEntropyLoss()(out, y)["loss"])


def test_create_loss_reads_config_and_rejects_unknown_names() -> None:
    config = Stage1ProConfig(
        phase=3,
        exit_policy="gate",
        target_fnr_exit=0.05,
        selective_penalty=7.0,
        selective_aux_weight=0.25,
        class_weights=[1.0, 2.0],
    )
    loss = create_loss("selective", config)
    assert isinstance(loss, SelectiveLoss)
    assert (loss.target, loss.penalty, loss.aux_weight) == (0.05, 7.0, 0.25)
    assert loss.class_weights.tolist() == [1.0, 2.0]
    assert create_loss("selective", config, penalty=3.0).penalty == 3.0
    with pytest.raises(ConfigError, match=r"loss 'focal' is unknown; registered losses: ce, selective"):
        create_loss("focal", config)


def test_no_coverage_target_in_the_selective_loss() -> None:
    params = inspect.signature(SelectiveLoss).parameters
    assert not [p for p in params if "target_coverage" in p or p in ("c", "coverage")]
    assert set(LOSSES) >= {"ce", "selective"}


def test_selective_loss_terms_follow_their_definitions() -> None:
    out, y = _outputs(n=12, seed=3)
    loss_fn = SelectiveLoss(target_fnr_exit=0.02, penalty=32.0, aux_weight=0.5)
    got = loss_fn(out, y)
    g = torch.sigmoid(out["gate_logit"])
    p1 = torch.softmax(out["logits"], 1)[:, 1]
    pos = (y == 1).float()
    fnr = (g * pos * (1 - p1)).sum() / (g * pos).sum()  # soft FNR_exit among exited positives
    ce = F.cross_entropy(out["logits"], y, reduction="none")
    sel_risk = (g * ce).sum() / g.sum()
    expected = 0.5 * (sel_risk - g.mean() + 32.0 * torch.relu(fnr - 0.02) ** 2) + 0.5 * F.cross_entropy(
        out["aux_logits"], y
    )
    assert torch.allclose(got["fnr_soft"], fnr)
    assert torch.allclose(got["coverage"], g.mean())
    assert torch.allclose(got["sel_risk"], sel_risk)
    assert torch.allclose(got["loss"], expected)


def test_selective_loss_gradients_reach_classifier_gate_and_aux_heads() -> None:
    torch.manual_seed(0)
    heads = StageHeads(8, SELECTIVE_HEADS, gate_hidden=16)
    x = torch.randn(32, 8)
    y = torch.arange(32) % 2
    loss = SelectiveLoss(target_fnr_exit=0.02)(heads(x), y)["loss"]
    loss.backward()
    for name in ("classifier", "gate", "aux"):
        grads = [p.grad for p in getattr(heads, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"no gradient into the {name} head"


def test_fnr_penalty_defers_missed_positives_and_keeps_confident_ones() -> None:
    # Two positives: one the classifier misses (p1 = 0.05), one it gets (p1 = 0.99); soft FNR >> target.
    logits = torch.tensor([[3.0, -3.0 + 0.055], [-2.3, 2.3]], requires_grad=True)
    gate = torch.zeros(2, requires_grad=True)
    out = {"logits": logits, "gate_logit": gate, "aux_logits": torch.zeros(2, 2)}
    SelectiveLoss(target_fnr_exit=0.02, penalty=32.0)(out, torch.tensor([1, 1]))["loss"].backward()
    assert gate.grad[0] > 0  # gradient descent lowers the gate of the missed positive (defer it)
    assert gate.grad[1] < 0  # and raises it for the confident correct one (exit it)
    assert logits.grad[0, 1] < 0  # the classifier is pushed towards the positive class for the miss


def test_selective_loss_without_positives_and_missing_heads() -> None:
    out, _ = _outputs(n=6)
    got = SelectiveLoss()(out, torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(got["loss"]) and float(got["fnr_soft"]) == 0.0
    got["loss"].backward()
    assert out["gate_logit"].grad.abs().sum() > 0  # coverage term still trains the gate
    with pytest.raises(KeyError, match="gate_logit"):
        SelectiveLoss()({"logits": out["logits"]}, torch.zeros(6, dtype=torch.long))


def test_lagrange_multiplier_rises_only_while_training_above_target() -> None:
    logits = torch.tensor([[2.0, -2.0]] * 4)  # every positive missed: soft FNR ~ 0.98
    out = {"logits": logits, "gate_logit": torch.zeros(4), "aux_logits": logits}
    y = torch.ones(4, dtype=torch.long)
    loss_fn = SelectiveLoss(target_fnr_exit=0.1, dual_lr=0.5)
    loss_fn.eval()
    loss_fn(out, y)
    assert float(loss_fn.mu) == 0.0
    loss_fn.train()
    loss_fn(out, y)
    first = float(loss_fn.mu)
    loss_fn(out, y)
    assert 0 < first < float(loss_fn.mu)
    good = {"logits": -5 * logits, "gate_logit": torch.zeros(4), "aux_logits": -logits}  # now all correct
    for _ in range(40):  # mu falls by dual_lr * (target - ~0) = 0.05 per step
        loss_fn(good, y)
    assert float(loss_fn.mu) == 0.0  # projected back to >= 0 once the constraint holds


def _digit_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from stage1_pro.demo_data import demo_labels, load_mnist_5k

    images, digits = load_mnist_5k()
    # 14 x 14 (2 x 2 average pooling) keeps it quick; still the real digits
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0)
    x = torch.nn.functional.avg_pool2d(x[:, None], 2).flatten(1)
    y = torch.as_tensor(demo_labels(np.asarray(digits)))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:3000], y[:3000], x[3000:], y[3000:]


def test_selective_training_on_the_embedded_digits_does_not_collapse() -> None:
    """SelectiveNet heads on raw MNIST pixels: the gate neither exits everything nor nothing."""
    x_train, y_train, x_test, y_test = _digit_features()
    torch.manual_seed(0)
    heads = StageHeads(x_train.shape[1], SELECTIVE_HEADS, gate_hidden=64)
    loss_fn = SelectiveLoss(target_fnr_exit=0.02)
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    for _epoch in range(4):
        for idx in torch.randperm(len(x_train), generator=torch.Generator().manual_seed(_epoch)).split(100):
            loss = loss_fn(heads(x_train[idx]), y_train[idx])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    heads.eval()
    with torch.no_grad():
        out = heads(x_test)
    exits = out["gate_logit"] >= 0
    coverage = float(exits.float().mean())
    assert 0.05 < coverage < 0.98, f"gate collapsed: coverage {coverage:.3f}"
    wrong = out["logits"].argmax(1) != y_test
    # the gate ranks: deferred images are wrong far more often than exited ones
    assert wrong[~exits].float().mean() > 2 * wrong[exits].float().mean()
