"""ConformalRiskLoss: the differentiable CRC threshold against an independent computation, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stage1_pro.decisions import DEFER
from stage1_pro.errors import ConfigError
from stage1_pro.losses.conformal_risk import (
    ConformalRiskLoss,
    crc_exit_threshold,
    min_batch_size,
    min_positives,
    split_halves,
)
from stage1_pro.metrics import exit_counts


def _independent_crc_threshold(scores: np.ndarray, miss: np.ndarray, alpha: float) -> float | None:
    """Loosest threshold t whose exits satisfy (FN_exit + 1) / (exited positives + 1) <= alpha.

    Brute force over every candidate threshold, with the project's FNR_exit counts.
    """
    labels = np.ones(scores.size, dtype=np.int64)
    best = None
    for t in np.unique(scores):
        decisions = np.where(scores >= t, np.where(miss, 0, 1), DEFER).astype(np.int8)
        c = exit_counts(decisions, labels)
        if (c["fn"] + 1) / (c["fn"] + c["tp"] + 1) <= alpha and (best is None or t < best):
            best = float(t)
    return best


def _positives(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of positives with misses concentrated at low confidence (as a trained model has)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 1.0, n)
    miss = rng.uniform(size=n) < 0.25 * (1.0 - s) / 0.5
    return torch.tensor(s, requires_grad=True), torch.tensor(miss)


@pytest.mark.parametrize("alpha", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("seed", range(3))
def test_threshold_matches_independent_crc_within_the_window(alpha: float, seed: int) -> None:
    n, window = 400, 0.005
    s, miss = _positives(n, seed)
    lam, k_star = crc_exit_threshold(s, miss, alpha, window)
    reference = _independent_crc_threshold(s.detach().numpy(), miss.numpy(), alpha)
    assert (lam is None) == (reference is None)
    if reference is None:
        return
    ranked = np.sort(s.detach().numpy())[::-1]
    w = max(1, int(np.ceil(window * n)))
    lo, hi = max(0, k_star - w), min(n, k_star + w)
    window_scores = ranked[lo:hi]
    assert ranked[k_star - 1] == reference  # the CRC threshold exits exactly the top k* positives
    assert window_scores.min() <= reference <= window_scores.max()
    assert window_scores.min() <= float(lam.detach()) <= window_scores.max()
    n_exit = int((s.detach().numpy() >= float(lam.detach())).sum())
    assert abs(n_exit - k_star) <= w


def test_window_one_gives_the_midpoint_and_the_same_exits() -> None:
    s, miss = _positives(300, 7)
    lam, k_star = crc_exit_threshold(s, miss, 0.05, window=0.0)
    ranked = np.sort(s.detach().numpy())[::-1]
    assert float(lam.detach()) == pytest.approx((ranked[k_star - 1] + ranked[k_star]) / 2)
    assert int((s.detach().numpy() >= float(lam.detach())).sum()) == k_star
    lam.backward()
    grad = s.grad.numpy()
    assert np.count_nonzero(grad) == 2 and grad.sum() == pytest.approx(1.0)  # the two boundary scores


def test_no_threshold_with_too_few_positives_or_too_many_confident_misses() -> None:
    alpha = 0.02
    assert min_positives(alpha) == 49 and min_batch_size(alpha) == 196 and min_positives(0.1) == 9
    s = torch.linspace(0.99, 0.6, 48)
    assert crc_exit_threshold(s, torch.zeros(48, dtype=torch.bool), alpha, 0.005) == (None, 0)
    s49 = torch.linspace(0.99, 0.6, 49)
    lam, k = crc_exit_threshold(s49, torch.zeros(49, dtype=torch.bool), alpha, 0.005)
    assert k == 49 and lam is not None
    confident_miss = torch.zeros(200, dtype=torch.bool)
    confident_miss[0] = True  # the most confident positive is a miss: 2/(k+1) <= 0.02 needs k >= 99
    s200 = torch.linspace(0.99, 0.6, 200)
    lam, k = crc_exit_threshold(s200, confident_miss, alpha, 0.005)
    assert k == 200 and _independent_crc_threshold(s200.numpy(), confident_miss.numpy(), alpha) is not None


def test_split_halves_is_stratified_and_disjoint() -> None:
    y = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0])
    cal, pred = split_halves(y)
    assert sorted(torch.cat([cal, pred]).tolist()) == list(range(len(y)))
    assert int(y[cal].sum()) == 3 and int(y[pred].sum()) == 2


class _ThreeHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 16)
        self.cls, self.gate, self.aux = nn.Linear(16, 2), nn.Linear(16, 1), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"logits": self.cls(h), "gate_logit": self.gate(h).squeeze(1), "aux_logits": self.aux(h)}


def _batch(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).long()
    x = torch.randn(n, 4, generator=g) + 2.5 * y[:, None].float()
    return x, y


def _pretrained(seed: int = 0) -> _ThreeHeads:
    """A model trained with cross-entropy so that the CRC threshold exists."""
    torch.manual_seed(seed)
    model = _ThreeHeads()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _batch(seed=seed)
    for _ in range(60):
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out["logits"], y) + nn.functional.cross_entropy(
            out["aux_logits"], y
        )
        correct = (out["logits"].argmax(1) == y).float()
        loss = loss + nn.functional.binary_cross_entropy_with_logits(out["gate_logit"], correct)
        loss.backward()
        opt.step()
    return model


def test_gradients_reach_every_head_and_the_backbone() -> None:
    model = _pretrained()
    x, y = _batch(seed=1)
    loss_fn = ConformalRiskLoss(target_fnr_exit=0.05)
    out = loss_fn(model(x), y)
    assert float(out["feasible"]) == 1.0 and 0 < float(out["coverage"]) < 1
    assert {"lambda_softmax", "lambda_gate", "aux_ce", "fnr_soft", "k_star"} <= set(out)
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the CRT term alone (no cross-entropy) also reaches the classifier, the gate and the body
    model.zero_grad()
    ConformalRiskLoss(target_fnr_exit=0.05, ce_weight=0.0, aux_weight=0.0)(model(x), y)["loss"].backward()
    for name in ("body.weight", "cls.weight", "gate.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_descent_on_the_crt_term_raises_the_correct_exits() -> None:
    model = _pretrained()
    x, y = _batch(seed=2)
    loss_fn = ConformalRiskLoss(target_fnr_exit=0.05, ce_weight=0.0, aux_weight=0.0, scores=("softmax",))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = float(loss_fn(model(x), y)["crt"])
    for _ in range(20):
        opt.zero_grad()
        loss_fn(model(x), y)["loss"].backward()
        opt.step()
    assert float(loss_fn(model(x), y)["crt"]) < first  # more images exit, and exit right


def test_calling_everything_positive_is_not_rewarded() -> None:
    """No exited misses, so the CRC threshold exits every positive; only the right exits count."""
    y = (torch.arange(400) % 2).long()
    margin = torch.linspace(2.0, 6.0, 400)[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    all_positive = torch.stack([-margin / 2, margin / 2], 1)
    loss_fn = ConformalRiskLoss(target_fnr_exit=0.02, scores=("softmax",))
    out = loss_fn({"logits": all_positive}, y)
    assert float(out["feasible"]) == 1.0 and float(out["fnr_soft"]) < 0.05
    # half of what exits is a negative called positive: it earns nothing
    assert float(out["crt"]) == pytest.approx(1 - float(out["coverage"]) / 2, abs=0.02)
    always_right = torch.where(y[:, None] == 1, all_positive, all_positive.flip(1))  # same confidences
    right = loss_fn({"logits": always_right}, y)
    assert float(right["crt"]) == pytest.approx(1 - float(right["coverage"]), abs=0.02)
    assert float(right["crt"]) < float(out["crt"]) - 0.2


def test_infeasible_batch_counts_as_zero_coverage_and_trains_the_cross_entropy() -> None:
    torch.manual_seed(0)
    model = _ThreeHeads()
    x, y = _batch(n=64)  # 16 positives in the pseudo-calibration half < 49
    loss_fn = ConformalRiskLoss(target_fnr_exit=0.02)
    out = loss_fn(model(x), y)
    assert float(out["feasible"]) == 0.0 and float(out["crt"]) == 1.0 and float(out["coverage"]) == 0.0
    expected = 1.0 + 0.5 * float(out["ce"]) + 0.5 * float(out["aux_ce"])
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-6)
    out["loss"].backward()
    assert model.cls.weight.grad.abs().sum() > 0 and model.gate.weight.grad is None


def test_classifier_only_outputs_use_the_softmax_score() -> None:
    model = _pretrained()
    x, y = _batch(seed=3)
    outputs = {"logits": model(x)["logits"]}
    out = ConformalRiskLoss(target_fnr_exit=0.05)(outputs, y)
    assert "lambda_gate" not in out and "aux_ce" not in out and float(out["feasible"]) == 1.0


def test_bad_settings_have_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"crt_temperature=0 must be > 0"):
        ConformalRiskLoss(temperature=0)
    with pytest.raises(ConfigError, match=r"crt_window=2 must be in \[0, 1\]"):
        ConformalRiskLoss(window=2)
    with pytest.raises(ConfigError, match=r"scores=\['margin'\]: choose from softmax, gate"):
        ConformalRiskLoss(scores=("margin",))
    with pytest.raises(ConfigError, match="target_fnr_exit"):
        ConformalRiskLoss(target_fnr_exit=0.0)
    with pytest.raises(KeyError, match="logits"):
        ConformalRiskLoss()({"gate_logit": torch.zeros(4)}, torch.zeros(4, dtype=torch.long))
