"""The three decisions a stage-1 exit policy takes per image, shared by policies, metrics and the certificate.

* :data:`EXIT_POSITIVE` (1): stage 1 answers "positive";
* :data:`EXIT_NEGATIVE` (0): stage 1 answers "negative";
* :data:`DEFER` (-1): stage 1 does not answer, the image goes to stage 2.

An image *exits* when its decision is not :data:`DEFER`.
"""

from __future__ import annotations

import numpy as np

EXIT_POSITIVE = 1
EXIT_NEGATIVE = 0
DEFER = -1
DECISION_NAMES: dict[int, str] = {
    EXIT_POSITIVE: "exit-positive",
    EXIT_NEGATIVE: "exit-negative",
    DEFER: "defer",
}


def argmax_class(probs: np.ndarray) -> np.ndarray:
    """Predicted class of (n, 2) probabilities; a tie (p1 == p0) goes to the positive class (safe for FNR)."""
    return (probs[:, 1] >= probs[:, 0]).astype(np.int8)
