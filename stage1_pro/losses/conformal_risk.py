"""``ConformalRiskLoss``: conformal risk training for the FNR_exit constraint (phase 6).

Conformal risk training (Yeh, Christianson, Wierman, Yue, NeurIPS 2025, arXiv 2510.08748; code
``chrisyeh96/conformal-risk-training``) differentiates through the conformal calibration step
during training, so the model learns what the post-hoc calibrator needs. Its FNR recipe splits
each batch into a pseudo-calibration and a pseudo-prediction half, computes the (n+1)-corrected
CRC threshold on the calibration half, makes it differentiable by averaging the scores in a small
window around the quantile index, and minimises a sigmoid-smoothed task loss on the prediction
half at that threshold. Here the task is the exit rule of a stage-1 policy (method notes:
``docs/methods.md`` §5.2).

**Which score.** Every policy exits an image when a confidence score ``s`` reaches a threshold
``lambda`` and labels it with the classifier's argmax (ties to positive):

* ``softmax`` (and ``scrc`` with its default selection score ``max_prob``): ``s = max(p0, p1)``;
  for SCRC the class set ``{k : p_k >= 1 - lambda2}`` is a singleton exactly when
  ``max(p0, p1) >= 1 - lambda2 > 1/2``, so both of its thresholds act on this same ``s``;
* ``gate``: ``s = sigmoid(gate_logit)`` (Platt calibration at deployment is monotone, so the
  ranking and hence the exit sets are the same).

A positive ``i`` that exits is a false negative iff its argmax is 0 (``p0 > p1``); call that
``e_i``. Sort the pseudo-calibration positives by ``s`` in decreasing order; the threshold
``s_(k)`` exits exactly the top ``k`` of them, with ``E_k = e_(1) + ... + e_(k)`` misses, so the
empirical FNR_exit (definition A, :func:`stage1_pro.metrics.fnr_exit`) is ``E_k / k``. The
(n+1)-corrected CRC inequality on the exited positives (conformal risk control with ``B = 1``,
arXiv 2208.02814; the form ``(m / (m+1)) R_m + B / (m+1) <= alpha`` used for SCRC's selected
points) is

    (E_k + 1) / (k + 1) <= alpha,

and the loosest threshold that meets it exits ``k* = max{k : E_k + 1 <= alpha (k + 1)}``
positives (FNR_exit is a ratio, not monotone in the threshold, so "loosest feasible", as the
certified calibration deploys, rather than "first crossing"). It needs ``k* >= 1/alpha - 1``
positives (49 at alpha = 0.02) before any threshold exists: hence class-balanced batches and a
minimum batch size (:func:`min_batch_size`).

**Differentiable threshold.** ``k*`` is found on detached scores; the threshold is the mean of
the sorted scores at ranks ``k* - w + 1 .. k* + w`` (``w = max(1, ceil(window * n_pos))``): with
``w = 1`` the midpoint between the last exiting and the first deferred positive, which exits
exactly the same ``k*`` positives. Its gradient lowers the scores at the boundary, which is where
the confident misses sit (the ``(k*+1)``-th positive is a miss by construction): training pushes
confident false negatives down and everything else up.

**Objective.** On the pseudo-prediction half (all images: coverage counts negatives too)

    L_crt = 1 - mean_i sigmoid((s_i - lambda_hat) / T) * p_i(y_i),

with ``T = crt_temperature`` (0.1 in the reference code) and ``p_i(y_i)`` the classifier's
probability of the true class: one minus the smoothed share of images that exit *and are right*
(deferrals plus wrong exits). Plain smoothed coverage, ``1 - mean sigmoid(...)``, is gamed under
an FNR-only constraint: a classifier that calls everything positive has no exited misses, so the
CRC threshold drops to the bottom and coverage reaches 1 (measured on the embedded data: coverage
1.0, FNR_exit 0, exit accuracy 0.60 - the failure the validate gate's exit-accuracy check exists
for). Weighting each exit by ``p(y)`` is the analogue of the reference code minimising the
*other* error (FPR) at the FNR-calibrated threshold: false-positive exits now cost as much as
deferrals. When no threshold is feasible the batch exits nothing: ``L_crt = 1`` (a constant), so
losses stay comparable across batches and epochs.

The CRT term is averaged over the exit scores the model has (softmax, and the gate from phase 3
on), so every head is trained and any of the three policies can be calibrated on the scores. A
small cross-entropy on the classifier (``ce_weight``) and SelectiveNet's auxiliary head
(``aux_weight``) keep the argmax accurate and training stable from fresh heads: the paper uses no
such term but starts from a trained, frozen backbone. The training-time ``lambda_hat`` is never
deployed: the deployed threshold is certified on ``val_calib`` after training.

Phase 6 allows all three policies; its recommended production policy is ``scrc`` (the config's
``exit_policy`` default stays ``softmax``, as the contract says).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the PyTorch convention)

from stage1_pro.defaults import DEFAULT_TARGET_FNR_EXIT
from stage1_pro.errors import ConfigError

__all__ = [
    "EXIT_SCORES",
    "ConformalRiskLoss",
    "crc_exit_threshold",
    "exit_score",
    "min_batch_size",
    "split_halves",
]

#: Exit scores a model can provide: the classifier's max probability and the gate's sigmoid.
EXIT_SCORES: tuple[str, ...] = ("softmax", "gate")


def min_positives(target_fnr_exit: float) -> int:
    """Fewest exited positives for which the corrected inequality can hold: ``ceil(1/alpha) - 1``."""
    return math.ceil(1.0 / target_fnr_exit - 1e-9) - 1


def min_batch_size(target_fnr_exit: float, positive_fraction: float = 0.5) -> int:
    """Smallest batch whose pseudo-calibration half holds :func:`min_positives` positives.

    The half takes every other positive of the batch, so it needs ``2 * min_positives``
    positives in the batch, i.e. ``2 * min_positives / positive_fraction`` images.
    """
    return math.ceil(2 * min_positives(target_fnr_exit) / positive_fraction)


def split_halves(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of a batch into (pseudo-calibration, pseudo-prediction) indices.

    Every other positive and every other negative go to the calibration half, so both halves
    keep the batch's class balance; the order within a batch is random (shuffled sampler).
    """
    pos = torch.nonzero(target == 1).flatten()
    neg = torch.nonzero(target != 1).flatten()
    cal = torch.cat([pos[0::2], neg[0::2]])
    pred = torch.cat([pos[1::2], neg[1::2]])
    return cal, pred


def exit_score(outputs: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The policy confidence ``s`` (fp32): ``softmax`` = max class probability, ``gate`` = sigmoid."""
    if name == "softmax":
        return torch.softmax(outputs["logits"].float(), dim=1).amax(dim=1)
    if name == "gate":
        return torch.sigmoid(outputs["gate_logit"].float())
    raise ConfigError(f"exit score {name!r} is unknown; allowed: {', '.join(EXIT_SCORES)}")


def crc_exit_threshold(
    scores: torch.Tensor, misses: torch.Tensor, alpha: float, window: float
) -> tuple[torch.Tensor | None, int]:
    """Differentiable CRC exit threshold on positives (see the module docstring).

    Args:
        scores: exit scores of the pseudo-calibration positives (with gradient).
        misses: 1 where that positive's argmax is negative (a false negative if it exits).
        alpha: target FNR_exit.
        window: half-width of the averaging window as a fraction of the positives.

    Returns:
        ``(lambda_hat, k_star)``: the windowed mean of the sorted scores around rank ``k_star``
        (the number of positives the CRC threshold exits), or ``(None, 0)`` when no threshold
        meets ``(E_k + 1) / (k + 1) <= alpha``.
    """
    n = scores.numel()
    if n == 0:
        return None, 0
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    cum_misses = torch.cumsum(misses[order].to(torch.float64), dim=0)
    k = torch.arange(1, n + 1, device=scores.device, dtype=torch.float64)
    feasible = cum_misses + 1.0 <= alpha * (k + 1.0) + 1e-12
    if not bool(feasible.any()):
        return None, 0
    k_star = int(torch.nonzero(feasible).max()) + 1
    w = max(1, math.ceil(window * n))
    lo, hi = max(0, k_star - w), min(n, k_star + w)  # 0-based ranks k*-w .. k*+w-1
    return scores[order[lo:hi]].mean(), k_star


class ConformalRiskLoss(nn.Module):
    """Conformal risk training for FNR_exit: maximise the smoothed correct exits at the batch's CRC threshold.

    Args:
        target_fnr_exit: alpha, the FNR_exit level of the training-time CRC threshold.
        temperature: T of the sigmoid that smooths the exit indicator (``crt_temperature``).
        window: half-width of the averaging window around the quantile rank, as a fraction of
            the pseudo-calibration positives (``crt_window``; at least one rank each side).
        scores: exit scores to train (those the outputs lack are skipped): ``softmax``, ``gate``.
        ce_weight: weight of the classifier's cross-entropy (``crt_ce_weight``).
        aux_weight: weight of the auxiliary head's cross-entropy when present
            (``selective_aux_weight``).
        class_weights, label_smoothing: of both cross-entropies.

    ``forward(outputs, target)`` returns ``{"loss", "crt", "coverage", "fnr_soft", "feasible",
    "k_star", "ce"[, "aux_ce"], "lambda_<score>"}``; all but ``loss`` are detached; ``crt`` is
    ``1 - `` the smoothed correct-exit share, ``coverage`` and ``fnr_soft`` the smoothed coverage
    and FNR_exit of the pseudo-prediction half at ``lambda_hat`` (averaged over the scores; 0
    coverage for an infeasible score).
    """

    def __init__(
        self,
        target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT,
        temperature: float = 0.1,
        window: float = 0.005,
        scores: Sequence[str] = EXIT_SCORES,
        ce_weight: float = 0.5,
        aux_weight: float = 0.5,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 < target_fnr_exit < 1.0:
            raise ConfigError(f"target_fnr_exit={target_fnr_exit} must be in (0, 1)")
        if temperature <= 0:
            raise ConfigError(f"crt_temperature={temperature} must be > 0")
        if not 0.0 <= window <= 1.0:
            raise ConfigError(f"crt_window={window} must be in [0, 1]")
        unknown = [s for s in scores if s not in EXIT_SCORES]
        if unknown or not scores:
            raise ConfigError(f"scores={list(scores)!r}: choose from {', '.join(EXIT_SCORES)}")
        if ce_weight < 0 or aux_weight < 0:
            raise ConfigError("ce_weight and aux_weight must be >= 0")
        self.alpha = float(target_fnr_exit)
        self.temperature = float(temperature)
        self.window = float(window)
        self.scores = tuple(scores)
        self.ce_weight = float(ce_weight)
        self.aux_weight = float(aux_weight)
        self.label_smoothing = float(label_smoothing)
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), target, weight=self.class_weights, label_smoothing=self.label_smoothing
        )

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        if "logits" not in outputs:
            raise KeyError("ConformalRiskLoss needs outputs['logits']")
        logits = outputs["logits"]
        target = target.long()
        cal, pred = split_halves(target)
        cal_pos = cal[target[cal] == 1]
        miss = logits[:, 1].detach() < logits[:, 0].detach()  # argmax negative (ties go positive)
        pred_pos = (target[pred] == 1).float()
        probs_pred = torch.softmax(logits.float(), dim=1)[pred]
        p_miss = probs_pred[:, 0]  # soft error on a positive
        p_right = probs_pred.gather(1, target[pred, None]).squeeze(1)  # p(y): soft correctness
        zero = logits.new_zeros((), dtype=torch.float32)
        terms, covs, fnrs, logs = [], [], [], {}
        feasible = k_star_sum = 0
        used = [name for name in self.scores if name == "softmax" or f"{name}_logit" in outputs]
        for name in used:
            s = exit_score(outputs, name)
            lam, k_star = crc_exit_threshold(s[cal_pos], miss[cal_pos], self.alpha, self.window)
            if lam is None:  # nothing can exit at this batch's level: coverage 0, no gradient
                terms.append(torch.ones_like(zero))
                covs.append(zero)
                fnrs.append(zero)
                logs[f"lambda_{name}"] = torch.ones_like(zero)
                continue
            soft_exit = torch.sigmoid((s[pred] - lam) / self.temperature)
            terms.append(1.0 - (soft_exit * p_right).mean())
            covs.append(soft_exit.mean().detach())
            exited_pos = (soft_exit * pred_pos).sum()
            fnrs.append(((soft_exit * pred_pos * p_miss).sum() / exited_pos.clamp_min(1e-8)).detach())
            logs[f"lambda_{name}"] = lam.detach()
            feasible += 1
            k_star_sum += k_star
        crt = torch.stack(terms).mean()
        ce = self._ce(logits, target)
        loss = crt + self.ce_weight * ce
        out = {
            "crt": crt.detach(),
            "coverage": torch.stack(covs).mean(),
            "fnr_soft": torch.stack(fnrs).mean(),
            "feasible": torch.full_like(zero, feasible / len(used)),
            "k_star": torch.full_like(zero, k_star_sum / max(1, feasible)),
            "ce": ce.detach(),
            **logs,
        }
        if "aux_logits" in outputs and self.aux_weight > 0:
            aux = self._ce(outputs["aux_logits"], target)
            loss = loss + self.aux_weight * aux
            out["aux_ce"] = aux.detach()
        return {"loss": loss, **out}
