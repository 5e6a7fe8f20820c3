"""F-SAM: two steps equal a hand computation; BN statistics, bf16, state dict, SelectiveLoss."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from stage1_pro.optim.fsam import FSAM, frozen_bn_stats, fsam_step

RHO, SIGMA, LMBDA, LR = 0.3, 0.7, 0.6, 0.1  # not the defaults, so that each one matters


def _grad(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Gradient of mean((x w + b - y)^2) by hand."""
    r = x @ w + b - y
    return 2 * x.T @ r / len(y), 2 * r.mean()


def _hand_fsam(w, b, batches, *, ema_after: bool = False):
    """F-SAM with SGD, written out; ``ema_after`` uses the *updated* EMA (the wrong order)."""
    m = None
    for x, y in batches:
        gw, gb = _grad(w, b, x, y)
        g = np.concatenate([gw, [gb]])
        if m is None:
            m, d = g.copy(), g.copy()
        else:
            m_new = LMBDA * m + (1 - LMBDA) * g
            d = g - SIGMA * (m_new if ema_after else m)
            m = m_new
        eps = RHO * d / (np.linalg.norm(d) + 1e-12)  # one norm over all parameters
        gw2, gb2 = _grad(w + eps[:-1], b + eps[-1], x, y)
        w, b = w - LR * gw2, b - LR * gb2
    return w, b, m


def test_two_steps_equal_a_hand_computed_fsam_with_sgd() -> None:
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 3)), rng.normal(size=8)) for _ in range(3)]
    model = nn.Linear(3, 1).double()
    w0, b0 = model.weight.detach().numpy().ravel().copy(), float(model.bias.item())
    opt = FSAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, sigma=SIGMA, lmbda=LMBDA)

    for x, y in batches:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        fsam_step(opt, lambda xt=xt, yt=yt: _mse(model, xt, yt), model=model)

    w, b, m = _hand_fsam(w0, b0, batches)
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.bias.item(), b, rtol=1e-12, atol=1e-12)
    ema = np.concatenate(
        [opt.state[model.weight]["momentum"].numpy().ravel(), opt.state[model.bias]["momentum"]]
    )
    np.testing.assert_allclose(ema, m, rtol=1e-12)
    # The test can tell the official order from the tempting one (updated EMA in d).
    w_wrong, _, _ = _hand_fsam(w0, b0, batches, ema_after=True)
    assert not np.allclose(w, w_wrong, rtol=1e-6)


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = ((model(x).squeeze(1) - y) ** 2).mean()
    loss.backward()
    return loss


def test_step_without_closure_finishes_a_perturbed_update_like_second_step() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    opt_a = FSAM(torch.optim.SGD(a.parameters(), lr=LR))
    opt_b = FSAM(torch.optim.SGD(b.parameters(), lr=LR))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda step: 1.0)  # counts optimizer.step() calls
    for _ in range(2):
        fsam_step(opt_a, lambda: _mse(a, x, y), model=a)
        opt_b.zero_grad()
        _mse(b, x, y)
        opt_b.first_step(zero_grad=True)
        _mse(b, x, y)
        opt_b.step()  # the way a loop that always calls optimizer.step() finishes the update
        opt_b.zero_grad()
        sched.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_sigma_zero_is_plain_sam() -> None:
    """sigma = 0 removes the EMA from the direction: the step must equal SAM's."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    opt = FSAM(torch.optim.SGD(a.parameters(), lr=LR), rho=RHO, sigma=0.0)
    for _ in range(2):
        fsam_step(opt, lambda: _mse(a, x, y), model=a)
        # SAM by hand in torch
        b.zero_grad()
        _mse(b, x, y)
        grads = [p.grad.clone() for p in b.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        with torch.no_grad():
            for p, g in zip(b.parameters(), grads, strict=True):
                p.add_(RHO * g / (norm + 1e-12))
        b.zero_grad()
        _mse(b, x, y)
        with torch.no_grad():
            for p, g in zip(b.parameters(), grads, strict=True):
                p.sub_(RHO * g / (norm + 1e-12))
                p.sub_(LR * p.grad)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_second_pass_leaves_batchnorm_statistics_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)).train()
    reference = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)).train()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 4), torch.randn(32)
    opt = FSAM(torch.optim.SGD(model.parameters(), lr=LR))
    fsam_step(opt, lambda: _mse(model, x, y), model=model)
    reference(x)  # exactly one forward's worth of running-statistics update
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats
    with frozen_bn_stats(model):
        model(x)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)


def test_bf16_parameters_are_restored_exactly_and_perturbation_is_fp32() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1).to(torch.bfloat16)
    x, y = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    opt = FSAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.05)  # lr 0: only perturb + restore
    before = [p.detach().clone() for p in model.parameters()]
    _mse(model, x, y)
    opt.first_step(zero_grad=True)
    assert all(s["momentum"].dtype == torch.float32 for s in opt.state.values())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    _mse(model, x, y)
    opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_and_shared_groups() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8)
    opt = FSAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    fsam_step(opt, lambda: _mse(model, x, y), model=model)
    sd = opt.state_dict()
    assert set(sd) == {"fsam", "base"} and all(set(v) == {"momentum"} for v in sd["fsam"]["state"].values())
    clone = nn.Linear(3, 1)
    clone.load_state_dict(model.state_dict())
    opt2 = FSAM(torch.optim.AdamW(clone.parameters(), lr=5.0))
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.param_groups[0]["lr"] == 1e-2
    sched = torch.optim.lr_scheduler.LambdaLR(opt2.base_optimizer, lambda step: 0.5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3) and sched.get_last_lr() == [5e-3]
    for o, m in ((opt, model), (opt2, clone)):
        fsam_step(o, lambda m=m: _mse(m, x, y), model=m)
    # same state in, same lr schedule out except the 0.5 factor: only check the EMA continued
    torch.testing.assert_close(
        opt2.state[clone.weight]["momentum"], opt.state[model.weight]["momentum"], rtol=1e-5, atol=1e-6
    )


def test_works_with_selective_loss_and_runs_its_second_pass_in_eval_mode() -> None:
    from stage1_pro.losses.selective import SelectiveLoss

    class ThreeHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.cls, self.gate, self.aux = nn.Linear(8, 2), nn.Linear(8, 1), nn.Linear(8, 2)

        def forward(self, x):
            h = self.body(x)
            return {"logits": self.cls(h), "gate_logit": self.gate(h).squeeze(1), "aux_logits": self.aux(h)}

    class Spy(SelectiveLoss):
        """Records the mode of each call: training-time state (the dual ascent) must move once."""

        modes: ClassVar[list[bool]] = []

        def forward(self, outputs, target):
            self.modes.append(self.training)
            return super().forward(outputs, target)

    torch.manual_seed(0)
    model, loss_fn = ThreeHeads(), Spy()
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    opt = FSAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> torch.Tensor:
        out = loss_fn(model(x), y)
        out["loss"].backward()
        return out["loss"]

    loss = fsam_step(opt, closure, model=model, loss_fn=loss_fn)
    assert torch.isfinite(loss) and loss_fn.training
    assert loss_fn.modes == [True, False]
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_misuse_errors() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        FSAM(model.parameters())  # type: ignore[arg-type]
    opt = FSAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match=r"without a closure finishes an update begun by first_step"):
        opt.step()
    with pytest.raises(ValueError, match="lmbda"):
        FSAM(torch.optim.SGD(model.parameters(), lr=0.1), lmbda=1.0)
    x, y = torch.randn(4, 2), torch.randn(4)
    _mse(model, x, y)
    w = model.weight.detach().clone()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()

    def failing() -> torch.Tensor:
        raise ValueError("boom")

    opt.restore()
    assert torch.equal(model.weight, w)
    calls = iter([lambda: _mse(model, x, y), failing])
    with pytest.raises(ValueError, match="boom"):
        fsam_step(opt, lambda: next(calls)(), model=model)
    assert torch.equal(model.weight, w)  # restored after the failed second pass
