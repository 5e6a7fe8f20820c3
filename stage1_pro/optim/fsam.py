"""F-SAM: Friendly Sharpness-Aware Minimization (Li, Zhou, He, Cheng, Huang; CVPR 2024, arXiv 2403.12350).

SAM perturbs the weights along the whole mini-batch gradient ``g``. F-SAM splits ``g`` into an
estimate of the full gradient, an exponential moving average ``m`` of past batch gradients, and
the batch-specific remainder, and perturbs along the remainder only (``docs/methods.md`` §7). The
update order follows the official code (``nblt/F-SAM``, ``FriendlySAM``; re-implemented here, the
repository states no licence):

1. ``g`` = gradient at ``w`` (all micro-batches of the step accumulated first);
2. first step ever: ``m <- g`` and ``d = g`` (a plain SAM step); afterwards
   ``d = g - sigma * m_prev`` with the *previous* EMA, then ``m <- lambda * m_prev + (1 - lambda) * g``;
3. ``eps = rho * d / (||d|| + 1e-12)``, the norm taken over all trainable parameters jointly
   (ASAM-style ``adaptive=True`` uses ``|w| * d`` in the norm and ``w**2 * d`` in ``eps``);
4. ``w + eps``: a second forward/backward gives the update gradient; ``w`` is restored exactly
   (copied back, not subtracted) and the base optimiser steps with that gradient.

Defaults are the class defaults of the reference code: rho = 0.05, sigma = 1, lambda = 0.9
(its ``train.py`` uses 0.1/1/0.95 and the CIFAR-100 script 0.2/1/0.6).

Mixed precision: the EMA and the perturbation are computed in fp32 (fp64 for fp64 parameters)
whatever the parameter and gradient dtypes, and the restore is a copy, so bf16 parameters come
back bit-exact. Under bf16 autocast no GradScaler is used (bf16 has fp32's range), so there is
nothing to unscale; with an fp16 GradScaler the gradients would have to be unscaled before
:meth:`FSAM.first_step`.

Use :func:`fsam_step` for one whole update: it runs the closure twice, freezes BatchNorm running
statistics during the second pass and switches the loss to eval mode there, so a loss with
training-time state (SelectiveLoss's dual ascent) updates it once per step. Learning-rate
schedulers go on ``optimizer.base_optimizer`` (the parameter groups are shared, so either works
for the learning rate, but only the base optimiser's ``step`` is called).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["FSAM", "frozen_bn_stats", "fsam_step"]


class FSAM(torch.optim.Optimizer):
    """F-SAM around an existing base optimiser (AdamW, SGD...), sharing its parameter groups.

    Args:
        base_optimizer: the optimiser that applies the update (built over the trainable parameters).
        rho: perturbation radius.
        sigma: weight of the EMA subtracted from the batch gradient (0 gives plain SAM).
        lmbda: EMA decay of the gradient average.
        adaptive: ASAM-style element-wise scaling of the perturbation by ``|w|``.

    ``first_step`` perturbs the weights along the friendly direction, ``second_step`` restores them
    and lets the base optimiser step with the gradient computed at the perturbed point. The
    gradient EMA is saved in :meth:`state_dict` together with the base optimiser's state.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if rho < 0:
            raise ValueError(f"rho={rho} must be >= 0")
        if not 0.0 <= lmbda < 1.0:
            raise ValueError(f"lmbda={lmbda} must be in [0, 1)")
        defaults = {"rho": rho, "sigma": sigma, "lmbda": lmbda, "adaptive": adaptive}
        # Optimizer.__init__ keeps the group dicts it is given, so both optimisers share them.
        super().__init__(base_optimizer.param_groups, defaults)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self._perturbed = False

    def _params(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Update the gradient EMA and move every parameter to ``w + eps`` (see the module doc)."""
        if self._perturbed:
            raise RuntimeError("FSAM.first_step called twice without second_step: the weights are perturbed")
        directions: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = []
        for group, p in self._params():
            grad = p.grad.detach().to(torch.promote_types(p.grad.dtype, torch.float32))  # >= fp32
            state = self.state[p]
            if "momentum" not in state:  # first step ever: plain SAM
                state["momentum"] = grad.clone()
                d = grad.clone()
            else:
                m = state["momentum"]
                d = grad - group["sigma"] * m  # the previous EMA, as in the reference code
                m.mul_(group["lmbda"]).add_(grad, alpha=1.0 - group["lmbda"])
            directions.append((group, p, d))
        if not directions:
            raise RuntimeError("FSAM.first_step: no parameter has a gradient; run backward() first")
        norms = [
            ((p.detach().to(d.dtype).abs() * d) if g["adaptive"] else d).norm(2) for g, p, d in directions
        ]
        total = torch.linalg.vector_norm(torch.stack(norms))
        for group, p, d in directions:
            scale = group["rho"] / (total + 1e-12)
            eps = d * scale
            if group["adaptive"]:
                eps = eps * p.detach().to(d.dtype).square()
            state = self.state[p]
            if "old_p" in state:
                state["old_p"].copy_(p)
            else:
                state["old_p"] = p.detach().clone()
            p.add_(eps.to(p.dtype))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly and step the base optimiser with the gradient taken at ``w + eps``."""
        if not self._perturbed:
            raise RuntimeError("FSAM.second_step called before first_step")
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back to ``w`` (a no-op unless :meth:`first_step` perturbed them)."""
        if not self._perturbed:
            return
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "old_p" in state:
                    p.copy_(state["old_p"])
        self._perturbed = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Two ways to finish an update.

        * ``step(closure)`` (SAM style): the gradient at ``w`` must already be there; ``closure``
          recomputes it (forward + backward) at the perturbed point. Prefer :func:`fsam_step`.
        * ``step()`` after :meth:`first_step` and the second backward pass: the same as
          :meth:`second_step`; this lets a training loop that always calls ``optimizer.step()``
          (and LR schedulers that count those calls) drive F-SAM.
        """
        if closure is not None:
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                result = closure()
            self.second_step()
            return result
        if not self._perturbed:
            raise RuntimeError(
                "FSAM.step() without a closure finishes an update begun by first_step(); call first_step() "
                "and the second forward/backward first, or pass a closure"
            )
        self.second_step()
        return None

    def state_dict(self) -> dict[str, Any]:
        """The gradient EMA (not the transient weight copies) plus the base optimiser's state."""
        own = super().state_dict()
        own["state"] = {k: {"momentum": v["momentum"]} for k, v in own["state"].items() if "momentum" in v}
        return {"fsam": own, "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["fsam"])
        # Both loads rebuild the group dicts; share the base optimiser's again.
        for own, base in zip(self.param_groups, self.base_optimizer.param_groups, strict=True):
            for key in self.defaults:
                base.setdefault(key, own[key])
        self.param_groups = self.base_optimizer.param_groups
        self._perturbed = False


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Batch norms use batch statistics but leave their running statistics (and counters) alone."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append(m)
            m.track_running_stats = False
    try:
        yield
    finally:
        for m in saved:
            m.track_running_stats = True


def fsam_step(
    optimizer: FSAM,
    closure: Callable[[], torch.Tensor],
    *,
    model: nn.Module,
    loss_fn: nn.Module | None = None,
) -> torch.Tensor:
    """One F-SAM update; returns the first (unperturbed) loss, detached.

    ``closure`` runs forward + backward over *all* micro-batches of the step (so gradient
    accumulation is finished before the perturbation) and returns the loss; it must not zero the
    gradients itself. It is called twice: at ``w``, then at ``w + eps`` with ``model``'s BatchNorm
    statistics frozen and ``loss_fn`` (if given) in eval mode, so training-time state updates happen
    once per step. If the second call raises, the weights are restored before the error propagates.
    """
    optimizer.zero_grad()
    loss = closure()
    optimizer.first_step(zero_grad=True)
    was_training = loss_fn.training if loss_fn is not None else False
    try:
        if loss_fn is not None:
            loss_fn.eval()
        with frozen_bn_stats(model):
            closure()
    except BaseException:
        optimizer.restore()
        raise
    finally:
        if loss_fn is not None:
            loss_fn.train(was_training)
    optimizer.second_step(zero_grad=True)
    return loss.detach()
