"""Inference from a bundle: exit-positive, exit-negative or defer, with probabilities.

The inference contract (also written into every bundle's README.md):

1. :func:`load_bundle` reads ``bundle.json`` first (schema-validated) and verifies the bundle
   (:func:`stage1_pro.bundle.verify_bundle`: bare file names only, exactly one policy file,
   every sha256), then reads the policy file it names through
   :func:`stage1_pro.policies.load_policy` (schema-validated again).
2. The network is rebuilt from ``model.json`` and its weights are loaded with
   ``torch.load(weights_only=True)`` (no code is unpickled).
3. :meth:`Predictor.predict` runs the eval-time preprocessing shared with training
   (:func:`stage1_pro.transforms.preprocess`), the model, a softmax, and the policy's
   ``decide``. Every threshold comes from the policy file; ``config.json`` is never read here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_pro.artifacts import read_artifact
from stage1_pro.bundle import verify_bundle
from stage1_pro.errors import ArtifactError, DataError
from stage1_pro.layout import MODEL_INFO_FILE

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

#: Default number of images per forward pass.
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class Prediction:
    """The stage-1 answer for one image.

    Attributes:
        decision: 1 exit-positive, 0 exit-negative, -1 defer (``policies.base`` constants);
            None when the image could not be read (see ``error``).
        probs: class probabilities ``(p_negative, p_positive)`` from the model.
        confidence: the score the policy thresholds (max probability for softmax, the
            calibrated gate probability for gate, the selection score for SCRC).
        gate_prob: the calibrated gate probability (gate policy, or SCRC selecting on the gate).
        gate_logit: the raw gate-head logit (models with a gate head).
        source: the path/URI of the image, or ``None`` for in-memory inputs.
        error: why the image was skipped (``predict(..., skip_bad=True)``), else None.
    """

    decision: int | None
    probs: tuple[float, float] | None
    confidence: float | None = None
    gate_prob: float | None = None
    gate_logit: float | None = None
    source: str | None = None
    error: str | None = None

    @property
    def decision_name(self) -> str | None:
        """``"exit-positive"``, ``"exit-negative"``, ``"defer"`` (None for a skipped image)."""
        from stage1_pro.decisions import DECISION_NAMES

        return None if self.decision is None else DECISION_NAMES[self.decision]

    @property
    def exited(self) -> bool:
        """True when stage 1 answers for this image (it is not deferred to stage 2)."""
        from stage1_pro.decisions import DEFER

        return self.decision is not None and self.decision != DEFER

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (what ``stage1-pro predict --json`` prints)."""
        return {
            "source": self.source,
            "decision": self.decision_name,
            "p_negative": None if self.probs is None else self.probs[0],
            "p_positive": None if self.probs is None else self.probs[1],
            "confidence": self.confidence,
            "gate_prob": self.gate_prob,
            "gate_logit": self.gate_logit,
            "error": self.error,
        }


class Predictor:
    """A loaded bundle: model + policy. Build it with :func:`load_bundle`.

    Args:
        model: the network in eval mode; ``forward(x)`` returns ``{"logits": (n, 2)[, "gate_logit": (n,)]}``.
        policy: a fitted exit policy (``decide(probs, gate_logit) -> int8 decisions``).
        model_info: the bundle's ``model.json`` (preprocessing settings, heads).
        bundle: the verified ``bundle.json`` (for provenance), if loaded from a bundle.
        device: torch device to run on.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: Any,
        model_info: dict[str, Any],
        *,
        bundle: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.policy = policy
        self.model_info = model_info
        self.bundle = bundle or {}
        self.device = device

    @property
    def version(self) -> str | None:
        """The bundle version, if loaded from a bundle."""
        return self.bundle.get("version")

    # -- the three steps, public so benchmarks and tests can time or call each one ------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Eval-time preprocessing shared with training and scoring."""
        from stage1_pro.transforms import preprocess

        return preprocess(list(images), self.model_info)

    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities ``(n, 2)`` and gate logits ``(n,)`` (None without a gate head)."""
        import torch

        with torch.inference_mode():
            out = self.model(x.to(self.device))
            probs = torch.softmax(out["logits"].float(), dim=1).cpu().numpy().astype(np.float64)
            gate = out.get("gate_logit")
            gate_np = None if gate is None else gate.float().reshape(-1).cpu().numpy().astype(np.float64)
        return probs, gate_np

    def decide(self, probs: np.ndarray, gate_logit: np.ndarray | None) -> list[Prediction]:
        """Apply the bundle's policy to model outputs (no model involved)."""
        decisions = np.asarray(self.policy.decide(probs, gate_logit))
        confidence = np.asarray(self.policy.confidence(probs, gate_logit), dtype=np.float64)
        return [
            Prediction(
                decision=int(decisions[i]),
                probs=(float(probs[i, 0]), float(probs[i, 1])),
                confidence=float(confidence[i]),
                gate_prob=float(confidence[i]) if self._confidence_is_gate else None,
                gate_logit=None if gate_logit is None else float(gate_logit[i]),
            )
            for i in range(len(decisions))
        ]

    @property
    def _confidence_is_gate(self) -> bool:
        """The gate policy (and SCRC selecting on the gate) rank images by the calibrated gate."""
        return uses_gate(self.policy)

    def predict(
        self,
        inputs: torch.Tensor
        | Image.Image
        | str
        | os.PathLike[str]
        | Iterable[Image.Image | str | os.PathLike[str]],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        skip_bad: bool = False,
    ) -> list[Prediction]:
        """Decide for each input image; one :class:`Prediction` per input, in order.

        Args:
            inputs: a preprocessed tensor ``(n, C, H, W)`` (or ``(C, H, W)``), a PIL image, a
                path/``gs://`` URI, or a sequence of images and paths.
            batch_size: images per forward pass. (SCRC-T decides per batch: its selection
                threshold is computed from the calibration scores together with the batch.)
            skip_bad: an unreadable image yields a Prediction with ``error`` set instead of
                raising; the others are still decided.

        Raises:
            DataError: an image cannot be read (naming it), unless ``skip_bad``.
        """
        import torch

        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (got {batch_size})")
        if isinstance(inputs, torch.Tensor):
            x = inputs.unsqueeze(0) if inputs.ndim == 3 else inputs
            if x.ndim != 4:
                raise DataError(
                    f"a tensor input must be (n, C, H, W) or (C, H, W); got shape {tuple(inputs.shape)}"
                )
            out: list[Prediction] = []
            for start in range(0, x.shape[0], batch_size):
                out.extend(self.decide(*self.forward(x[start : start + batch_size])))
            return out
        items = [inputs] if _is_single(inputs) else list(inputs)
        results: list[Prediction | None] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images, where = [], []
            for offset, item in enumerate(chunk):
                i = start + offset
                try:
                    images.append(_as_image(item))
                    where.append(i)
                except DataError as exc:
                    if not skip_bad:
                        raise
                    log.warning("skipping %s", exc)
                    results[i] = Prediction(decision=None, probs=None, source=_source(item), error=str(exc))
            if images:
                for i, pred in zip(where, self.decide(*self.forward(self.preprocess(images))), strict=True):
                    results[i] = _with_source(pred, _source(items[i]))
        return [r for r in results if r is not None]


def uses_gate(policy: Any) -> bool:
    """True when ``policy`` decides on the gate head's logit (gate, or SCRC selecting on the gate)."""
    return "gate_logit" in policy.score_names


def _is_single(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, str | os.PathLike | Image.Image)


def _source(item: Any) -> str | None:
    return str(item) if isinstance(item, str | os.PathLike) else None


def _with_source(p: Prediction, source: str | None) -> Prediction:
    from dataclasses import replace

    return replace(p, source=source)


def _as_image(item: Any) -> Image.Image:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str | os.PathLike):
        from stage1_pro.data import open_image

        return open_image(str(item))
    raise DataError(f"cannot predict on a {type(item).__name__}: pass PIL images, paths/URIs or a tensor")


def load_bundle(bundle_dir: str | os.PathLike[str], *, device: str = "cpu") -> Predictor:
    """Load a verified bundle folder as a :class:`Predictor`.

    Reads ``bundle.json`` first, verifies every file's sha256 and schema, loads the policy named
    by ``policy_file`` and the weights with ``weights_only=True``. ``config.json`` is not used.

    Raises:
        ArtifactError: an invalid or tampered bundle (naming the file), or a policy that needs a
            model head the network does not have.
    """
    from stage1_pro.models import load_model
    from stage1_pro.policies import load_policy

    root = Path(bundle_dir)
    meta = verify_bundle(root)
    policy = load_policy(str(root / meta["policy_file"]))
    info_name = meta.get("model_info_file", MODEL_INFO_FILE)
    info_path = root / info_name
    model_info = read_artifact(info_path, "model")
    if uses_gate(policy) and "gate" not in model_info["heads"]:
        raise ArtifactError(
            f"{info_path}: the {policy.name} policy decides on the gate head's logit, but the model's heads "
            f"are {model_info['heads']}"
        )
    model = load_model(str(root), model_file=meta["model_file"], model_json=info_name)
    log.info("loaded bundle %s (%s policy) from %s", meta["version"], meta["active_exit_policy"], root)
    return Predictor(model, policy, model_info, bundle=meta, device=device)
