"""Stage-1 heads on pooled backbone features.

* ``classifier`` (f): linear, 2 logits (negative, positive). Every phase.
* ``gate`` (g, phase >= 3): the SelectiveNet selection head (Geifman & El-Yaniv 2019,
  arXiv 1901.09192, Sec. 3): dense -> ReLU -> BatchNorm -> dense(1). The official code scales
  the BatchNorm output by 1/10 (here: BN gamma initialised to 0.1) so the gate starts near
  sigmoid(0) = 0.5 for every input. It outputs a *logit*; sigmoid(gate_logit) is the soft
  selection probability used by :class:`~stage1_pro.losses.selective.SelectiveLoss`. The
  deployed gate threshold is never 0: it comes from certified calibration on ``val_calib``.
* ``aux`` (h, phase >= 3): linear, 2 logits, trained with full-coverage cross-entropy so the
  shared representation keeps learning from the samples the gate defers. Unused at inference.
"""

from __future__ import annotations

import torch
from torch import nn

#: Heads per capability: phases 1-2 have a classifier only; phase >= 3 the three SelectiveNet heads.
CLASSIFIER_HEADS: tuple[str, ...] = ("classifier",)
SELECTIVE_HEADS: tuple[str, ...] = ("classifier", "gate", "aux")
NUM_CLASSES = 2


class SelectiveGate(nn.Module):
    """SelectiveNet selection head g: features -> one selection logit per sample."""

    def __init__(self, in_features: int, hidden: int = 256, bn_init_scale: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU(inplace=True)
        self.norm = nn.BatchNorm1d(hidden)
        nn.init.constant_(self.norm.weight, bn_init_scale)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(features)))).squeeze(-1)


class StageHeads(nn.Module):
    """The heads of a stage-1 model; ``forward(features) -> dict`` of outputs.

    Output keys: ``logits`` (n, 2) always; ``gate_logit`` (n,) and ``aux_logits`` (n, 2) when
    the gate and auxiliary heads are present.
    """

    def __init__(
        self, in_features: int, heads: tuple[str, ...] = CLASSIFIER_HEADS, gate_hidden: int = 256
    ) -> None:
        super().__init__()
        unknown = set(heads) - set(SELECTIVE_HEADS)
        if unknown or "classifier" not in heads:
            raise ValueError(f"heads={heads}: must include 'classifier' and only use {SELECTIVE_HEADS}")
        self.heads = tuple(h for h in SELECTIVE_HEADS if h in heads)
        self.classifier = nn.Linear(in_features, NUM_CLASSES)
        self.gate = SelectiveGate(in_features, gate_hidden) if "gate" in heads else None
        self.aux = nn.Linear(in_features, NUM_CLASSES) if "aux" in heads else None

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"logits": self.classifier(features)}
        if self.gate is not None:
            out["gate_logit"] = self.gate(features)
        if self.aux is not None:
            out["aux_logits"] = self.aux(features)
        return out
