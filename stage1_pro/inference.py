"""Inference from a bundle: exit-positive, exit-negative or defer, with probabilities.

The inference contract (also written into every bundle's README.md):

1. :func:`load_bundle` reads ``bundle.json`` first (schema-validated) and verifies the bundle
   (:func:`stage1_pro.bundle.verify_bundle`: bare file names only, exactly one policy file,
   every sha256), then reads the policy file it names through
   :func:`stage1_pro.policies.load_policy` (schema-validated again).
2. The network is rebuilt from ``model.json`` and its weights are loaded with
   ``torch.load(weights_only=True)`` (no code is unpickled).
3. :meth:`Predictor.predict` runs the preprocessing recorded in ``model.json``
   (:class:`stage1_pro.preprocessing.PreprocessSpec`, through the same function ``prepare`` used
   for the training and calibration images), the model, a softmax, and the policy's ``decide``.
   Every threshold comes from the policy file; ``config.json`` is never read here.

So the probabilities served for an image file are the ones in that image's row of the run's
``scores.npz`` (float32 on the same device type); a tensor of another size than the spec's is
refused, and serving on another device type or precision than the scores were computed with
(``model.json``'s ``scored_with``) is logged as a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_pro.artifacts import read_artifact
from stage1_pro.bundle import verify_bundle
from stage1_pro.errors import ArtifactError, DataError
from stage1_pro.layout import MODEL_INFO_FILE
from stage1_pro.preprocessing import ImageSource, PreprocessSpec, load_pixels, preprocess, to_input

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Default number of images per forward pass.
DEFAULT_BATCH_SIZE = 64
#: Forward precisions. ``auto``: the precision ``model.json``'s ``scored_with`` records when serving
#: on the device type the scores were computed on, else bf16 autocast on CUDA and fp32 elsewhere
#: (what training's ``amp=auto`` scores with).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


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
        model_info: the bundle's ``model.json`` (preprocessing spec, heads, ``scored_with``).
        bundle: the verified ``bundle.json`` (for provenance), if loaded from a bundle.
        device: torch device to run on.
        precision: ``auto`` (see :data:`PRECISIONS`), ``fp32`` or ``bf16`` (autocast).
        compile: ``torch.compile`` the network (the first batch of each shape pays the compilation).

    Attributes:
        spec: the :class:`~stage1_pro.preprocessing.PreprocessSpec` every input goes through.

    Raises:
        ArtifactError: ``model_info`` records a preprocessing this version cannot reproduce.
        ConfigError: an unknown ``precision``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: Any,
        model_info: dict[str, Any],
        *,
        bundle: dict[str, Any] | None = None,
        device: str = "cpu",
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        import torch

        from stage1_pro.defaults import check_choice

        check_choice(precision, PRECISIONS, "precision")
        self.device = device
        device_type = torch.device(device).type
        self.model = model.to(device).eval()
        if device_type == "cuda":  # channels-last input and weights, as in training
            self.model = self.model.to(memory_format=torch.channels_last)
        if precision == "auto":
            precision = _auto_precision(model_info.get("scored_with"), device_type)
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self._network = torch.compile(self.model) if compile else self.model
        self.policy = policy
        self.model_info = model_info
        self.bundle = bundle or {}
        self.spec = PreprocessSpec.from_model_info(model_info)
        mismatch = scoring_mismatch(model_info.get("scored_with"), self.serving)
        if mismatch:
            log.warning("%s", mismatch)

    @property
    def version(self) -> str | None:
        """The bundle version, if loaded from a bundle."""
        return self.bundle.get("version")

    @property
    def serving(self) -> dict[str, str]:
        """Device type and precision this predictor computes with (compared with ``scored_with``)."""
        import torch

        precision = "fp32" if self.autocast_dtype is None else "bf16"
        return {"device": torch.device(self.device).type, "precision": precision}

    # -- the three steps, public so benchmarks and tests can time or call each one ------------
    def preprocess(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Images (paths, ``gs://`` URIs, bytes, PIL images) -> the network's input, by the bundle's spec.

        Raises:
            DataError: naming the first image that cannot be read or decoded.
        """
        return preprocess(self.spec, list(images))

    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities ``(n, 2)`` and gate logits ``(n,)`` (None without a gate head)."""
        import torch

        device = torch.device(self.device)
        with torch.inference_mode():
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                out = self._network(x)
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
        inputs: torch.Tensor | ImageSource | Iterable[ImageSource],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        skip_bad: bool = False,
    ) -> list[Prediction]:
        """Decide for each input image; one :class:`Prediction` per input, in order.

        Args:
            inputs: a path/``gs://`` URI, encoded bytes, a PIL image, or a sequence of them
                (preprocessed by the bundle's spec); or a tensor ``(n, 3, size, size)`` (or
                ``(3, size, size)``) already preprocessed by that spec (:meth:`preprocess`).
            batch_size: images per forward pass. (SCRC-T decides per batch: its selection
                threshold is computed from the calibration scores together with the batch.)
            skip_bad: an unreadable image yields a Prediction with ``error`` set instead of
                raising; the others are still decided.

        Raises:
            DataError: an image cannot be read (naming it), unless ``skip_bad``; a tensor of
                another shape than the spec's (always).
        """
        import torch

        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (got {batch_size})")
        if isinstance(inputs, torch.Tensor):
            x = self._checked_tensor(inputs)
            out: list[Prediction] = []
            for start in range(0, x.shape[0], batch_size):
                out.extend(self.decide(*self.forward(x[start : start + batch_size])))
            return out
        items = [inputs] if _is_single(inputs) else list(inputs)
        results: list[Prediction | None] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            pixels, where = [], []
            for i in range(start, min(start + batch_size, len(items))):
                try:
                    pixels.append(load_pixels(items[i], self.spec.pixels))
                    where.append(i)
                except DataError as exc:
                    if not skip_bad:
                        raise
                    log.warning("skipping %s", exc)
                    results[i] = Prediction(
                        decision=None, probs=None, source=_source(items[i]), error=str(exc)
                    )
            if pixels:
                decided = self.decide(*self.forward(to_input(pixels, self.spec)))
                for i, pred in zip(where, decided, strict=True):
                    results[i] = replace(pred, source=_source(items[i]))
        return [r for r in results if r is not None]

    def model_outputs(
        self, inputs: Sequence[ImageSource], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's class probabilities ``(n, 2)`` and gate logits ``(n,)`` (None without a gate
        head) for images, by the bundle's spec: the columns of ``scores.npz`` (no policy applied).

        For re-scoring a bundle's model on other labelled images (e.g. re-certifying a champion
        on a new val_calib): every image must decode.

        Raises:
            DataError: naming the first image that cannot be read or decoded.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (got {batch_size})")
        items = list(inputs)
        probs, gates = [], []
        for start in range(0, len(items), batch_size):
            p, g = self.forward(self.preprocess(items[start : start + batch_size]))
            probs.append(p)
            gates.append(g)
        if not items:
            return np.empty((0, 2)), None
        return np.concatenate(probs), None if gates[0] is None else np.concatenate(gates)

    def _checked_tensor(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.unsqueeze(0) if inputs.ndim == 3 else inputs
        expected = (3, self.spec.size, self.spec.size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
            raise DataError(
                f"this bundle was calibrated on {self.spec.size} x {self.spec.size} RGB inputs "
                f"({self.spec.pixels.describe()}, normalised): a tensor input must be float (n, "
                f"{', '.join(map(str, expected))}) or ({', '.join(map(str, expected))}); got "
                f"{str(inputs.dtype).replace('torch.', '')} {tuple(inputs.shape)}. Pass the image files "
                "(or bytes, PIL images) instead, or preprocess them with Predictor.preprocess"
            )
        return x


def scoring_mismatch(scored_with: dict[str, str] | None, serving: dict[str, str]) -> str | None:
    """Why served probabilities may differ from the calibrated ones (None when the setups agree).

    Scores computed on a GPU in bf16 differ from float32 CPU inference by about 1e-4, enough to
    flip decisions of images within that distance of a threshold.
    """
    if not scored_with or all(scored_with[k] == serving[k] for k in ("device", "precision")):
        return None
    return (
        f"the certificate's scores were computed on {scored_with['device']} in {scored_with['precision']}, "
        f"but this predictor serves on {serving['device']} in {serving['precision']}: probabilities "
        "differ slightly (about 1e-4 between bf16 GPU and fp32 CPU), so decisions of images that "
        "close to a threshold may differ from what was certified; serve on the same device type and "
        "precision for exact parity"
    )


def uses_gate(policy: Any) -> bool:
    """True when ``policy`` decides on the gate head's logit (gate, or SCRC selecting on the gate)."""
    return "gate_logit" in policy.score_names


def _is_single(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, str | os.PathLike | bytes | bytearray | memoryview | Image.Image)


def _source(item: Any) -> str | None:
    return str(item) if isinstance(item, str | os.PathLike) else None


def _auto_precision(scored_with: dict[str, str] | None, device_type: str) -> str:
    """``precision="auto"``: the scores' precision on their device type, else bf16 on CUDA, fp32 elsewhere."""
    if (
        scored_with
        and scored_with.get("device") == device_type
        and scored_with.get("precision") in PRECISIONS
    ):
        return scored_with["precision"]
    return "bf16" if device_type == "cuda" else "fp32"


def load_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    precision: str = "auto",
    compile: bool = False,
) -> Predictor:
    """Load a verified bundle folder as a :class:`Predictor` (``device``, ``precision``, ``compile``: there).

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
    return Predictor(
        model, policy, model_info, bundle=meta, device=device, precision=precision, compile=compile
    )
