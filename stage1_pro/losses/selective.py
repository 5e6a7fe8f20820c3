"""``SelectiveLoss``: SelectiveNet training for a false-negative constraint on exited samples.

SelectiveNet (Geifman & El-Yaniv 2019, arXiv 1901.09192, Eq. 4) trains a prediction head f,
a selection head g and an auxiliary head h jointly with
``alpha * (r_hat + lambda * max(0, c - phi_hat)^2) + (1 - alpha) * CE(h)``, where ``c`` is a
target *coverage*. Stage 1 has no coverage target: it must keep FNR_exit (the miss rate among
*exited positives*, definition A of ``docs/methods.md`` §1.1) under
``target_fnr_exit`` and exit as much as possible. The loss therefore maximises soft coverage
subject to a soft FNR_exit constraint (``docs/methods.md`` §5.1):

    g_i    = sigmoid(gate_logit_i)                          soft selection
    phi    = mean_i g_i                                     soft coverage
    r_sel  = sum_i g_i CE(f(x_i), y_i) / sum_i g_i          selective risk (paper's r_hat)
    fnr    = sum_i g_i y_i (1 - p1_i) / sum_i g_i y_i       soft FNR_exit, p1 = softmax(f)[1]
    L_sel  = r_sel - phi + penalty * max(0, fnr - target)^2 + mu * (fnr - target)
    L      = (1 - aux_weight) * L_sel + aux_weight * CE(h(x), y)

Every term is soft (sigmoid gate, probability-valued errors), so gradients reach both f and g;
a hard ``g >= 0.5`` mask with argmax errors has zero gradient with respect to both heads and
trains nothing. ``mu >= 0`` is an optional Lagrange multiplier updated by dual ascent
(``mu <- max(0, mu + dual_lr * (fnr - target))`` after each training batch);
``dual_lr = 0`` leaves the quadratic penalty alone. The deployed gate threshold never comes
from this loss: it is certified on ``val_calib`` by the calibration step.

With data-parallel training the ratios are computed per device batch (like BatchNorm
statistics), so multi-GPU phase-3 runs are close to, not bit-identical with, one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the PyTorch convention)

from stage1_pro.defaults import DEFAULT_TARGET_FNR_EXIT


class SelectiveLoss(nn.Module):
    """Soft coverage maximisation under a soft FNR_exit constraint, plus auxiliary cross-entropy.

    Args:
        target_fnr_exit: the constraint level (the config's ``target_fnr_exit``).
        penalty: weight of ``max(0, fnr - target)^2`` (SelectiveNet's lambda, default 32).
        aux_weight: weight of the auxiliary head's cross-entropy (SelectiveNet's 1 - alpha).
        coverage_weight: weight of the coverage reward ``-phi``.
        dual_lr: step size of the Lagrange multiplier's dual ascent (0 = penalty only).
        class_weights: per-class weights of both cross-entropies, or ``None``.
        label_smoothing: label smoothing of both cross-entropies.

    ``forward(outputs, target)`` needs ``logits``, ``gate_logit`` and ``aux_logits`` and returns
    ``{"loss", "coverage", "fnr_soft", "sel_risk", "aux_ce", "mu"}`` (all but ``loss`` detached).
    """

    def __init__(
        self,
        target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT,
        penalty: float = 32.0,
        aux_weight: float = 0.5,
        coverage_weight: float = 1.0,
        dual_lr: float = 0.0,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= aux_weight < 1.0:
            raise ValueError(f"aux_weight={aux_weight} must be in [0, 1)")
        self.target = float(target_fnr_exit)
        self.penalty = float(penalty)
        self.aux_weight = float(aux_weight)
        self.coverage_weight = float(coverage_weight)
        self.dual_lr = float(dual_lr)
        self.label_smoothing = float(label_smoothing)
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)
        self.register_buffer("mu", torch.zeros(()))  # Lagrange multiplier; saved with the loss state

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        for key in ("logits", "gate_logit", "aux_logits"):
            if key not in outputs:
                raise KeyError(
                    f"SelectiveLoss needs outputs[{key!r}] (a phase >= 3 model with gate and aux heads)"
                )
        logits = outputs["logits"].float()
        gate = torch.sigmoid(outputs["gate_logit"].float())
        ce = F.cross_entropy(
            logits, target, weight=self.class_weights, label_smoothing=self.label_smoothing, reduction="none"
        )
        coverage = gate.mean()
        sel_risk = (gate * ce).sum() / gate.sum()
        positive = (target == 1).to(gate.dtype)
        p_miss = 1.0 - torch.softmax(logits, dim=1)[:, 1]  # soft error on a positive
        exited_pos = (gate * positive).sum()
        fnr = (gate * positive * p_miss).sum() / exited_pos.clamp_min(1e-8)
        excess = F.relu(fnr - self.target)
        selective = sel_risk - self.coverage_weight * coverage + self.penalty * excess.square()
        if self.dual_lr > 0:
            selective = selective + self.mu.clone() * (
                fnr - self.target
            )  # clone: mu is updated in place below
        aux_ce = F.cross_entropy(
            outputs["aux_logits"].float(),
            target,
            weight=self.class_weights,
            label_smoothing=self.label_smoothing,
        )
        loss = (1.0 - self.aux_weight) * selective + self.aux_weight * aux_ce
        if self.training and self.dual_lr > 0 and torch.is_grad_enabled():
            with torch.no_grad():  # dual ascent on the constraint
                self.mu.add_(self.dual_lr * (fnr.detach() - self.target)).clamp_(min=0.0)
        return {
            "loss": loss,
            "coverage": coverage.detach(),
            "fnr_soft": fnr.detach(),
            "sel_risk": sel_risk.detach(),
            "aux_ce": aux_ce.detach(),
            "mu": self.mu.detach().clone(),
        }
