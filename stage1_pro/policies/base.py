"""Decision constants and the base class of the certified exit policies.

A policy maps class probabilities (and, for the gate, the gate logit) to one decision per image:
:data:`EXIT_POSITIVE`, :data:`EXIT_NEGATIVE` or :data:`DEFER`. Every policy is a one-parameter
family of exit rules ordered from strictest to loosest and certified by
:func:`stage1_pro.certify.certify`:

* the family (the grid) and anything fitted (Platt/isotonic calibrator, SCRC's path, the
  testing order) come from ``val_select`` only;
* each rule is tested on ``val_calib`` with exact binomial p-values for FNR_exit and for the
  guard FPR_exit (their maximum: an intersection-union test), and a family-wise procedure at
  ``delta`` keeps ``P(true FNR_exit > target_fnr_exit or true FPR_exit > max_fpr_exit) <= delta``
  for the deployed rule;
* the certified rule with the largest coverage is deployed; when nothing certifies the policy
  is *infeasible* and defers every image (never an uncertified fallback).

Policies follow scikit-learn conventions: the constructor only stores parameters, :meth:`fit`
sets trailing-underscore attributes and returns ``self``; :meth:`to_dict` / :meth:`from_dict`
round-trip through the validated artifact I/O (:func:`stage1_pro.artifacts.write_artifact`).
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stage1_pro.decisions import DEFER, argmax_class
from stage1_pro.defaults import DEFAULT_DELTA, DEFAULT_MAX_FPR_EXIT, DEFAULT_TARGET_FNR_EXIT
from stage1_pro.provenance import utc_now

if TYPE_CHECKING:
    from stage1_pro.policy_registry import PolicySpec

#: Threshold stored by an infeasible softmax/gate policy: above every probability, so nothing exits.
DEFER_ALL_THRESHOLD = 2.0
#: Lineage fields a policy file may carry (set by :func:`stage1_pro.calibrate.calibrate_policy`).
LINEAGE_FIELDS = ("created_at", "model_version", "splits_version", "data_fingerprint", "scores_sha256")


class InfeasibleCertificateWarning(UserWarning):
    """Nothing on the grid could be certified: the fitted policy defers every image."""


class NotFittedError(ValueError, AttributeError):
    """The policy is used before :meth:`ExitPolicy.fit` (or :meth:`ExitPolicy.from_dict`)."""


def check_probs(
    probs: Any, gate_logit: Any | None = None, *, need_gate: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate inference inputs: ``probs`` (n, 2) finite in [0, 1]; ``gate_logit`` (n,) finite.

    Raises :class:`~stage1_pro.errors.DataError` naming the argument.
    """
    from stage1_pro.errors import DataError

    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise DataError(f"probs: expected shape (n, 2) (binary class probabilities), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise DataError("probs: values must be finite probabilities in [0, 1] (pass softmax outputs)")
    g = None
    if gate_logit is not None:
        g = np.asarray(gate_logit, dtype=np.float64)
        if g.shape != (p.shape[0],):
            raise DataError(f"gate_logit: expected shape ({p.shape[0]},), got {g.shape}")
        if not np.isfinite(g).all():
            raise DataError("gate_logit: holds NaN or inf")
    elif need_gate:
        raise DataError("gate_logit: this policy needs the gate head's logits (phase >= 3 model)")
    return p, g


@dataclasses.dataclass(eq=False, repr=False)
class ExitPolicy(ABC):
    """Base class of the certified exit policies (softmax, gate, SCRC).

    Args:
        target_fnr_exit: certified bound on ``FNR_exit = FN_exit / (TP_exit + FN_exit)``, in
            (0, 0.1] (default 0.02).
        delta: failure probability of the certificate, in (0, 0.5] (default 0.1).
        method: family-wise procedure, one of :data:`stage1_pro.certify.PROCEDURES`
            (``None``: :data:`stage1_pro.certify.DEFAULT_PROCEDURE`).
        grid_size: number of grid points (coverage levels of ``val_select``) before ties are
            removed (default 200).
        max_fpr_exit: the guard certified with the target: ``FPR_exit = FP_exit / (FP_exit +
            TN_exit)`` among exited negatives, in (0, 1] (default 0.25; 1 disables it).
    """

    #: Registry name (``create_policy(name)``), the artifact kind of its policy file and every other
    #: fact about the policy: set by :func:`stage1_pro.policy_registry.register_policy`.
    name: ClassVar[str]
    artifact_kind: ClassVar[str]
    spec: ClassVar[PolicySpec]
    #: Name of the grid value in ``sweep_results`` rows.
    grid_key: ClassVar[str] = "threshold"

    # The constructor parameters, in signature order; the constructor itself is generated
    # (a dataclass) and only stores them, as scikit-learn asks.
    target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT
    delta: float = DEFAULT_DELTA
    method: str | None = None
    grid_size: int = 200
    max_fpr_exit: float = DEFAULT_MAX_FPR_EXIT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Generate each subclass's constructor from its annotated class attributes.

        A policy declares only its own parameters (``calibrator: str = "platt"``) and redeclares
        a base one to change its default; the generated ``__init__`` lists every parameter
        explicitly, so :meth:`get_params` and the registry's option check see them all.
        """
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls, eq=False, repr=False)

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def score_names(self) -> tuple[str, ...]:
        """The ``scores.npz`` arrays this policy's decisions read (by default its registered ones)."""
        return self.spec.score_names

    def _check_params(self) -> None:
        from stage1_pro.certify import resolve_procedure
        from stage1_pro.defaults import check_delta, check_max_fpr_exit, check_target
        from stage1_pro.errors import ConfigError

        self.target_fnr_exit = check_target(self.target_fnr_exit)
        self.delta = check_delta(self.delta)
        self.max_fpr_exit = check_max_fpr_exit(self.max_fpr_exit)
        self.method = resolve_procedure(self.method)
        if not isinstance(self.grid_size, int | np.integer) or self.grid_size < 2:
            raise ConfigError(f"grid_size={self.grid_size!r} must be an integer >= 2 (default 200)")

    def _check_fitted(self) -> None:
        if not hasattr(self, "feasible_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted: call fit(scores) or load_policy(uri)"
            )

    # ------------------------------------------------------------------ fitting
    def fit(self, scores: Any) -> ExitPolicy:
        """Fit on ``val_select``, certify on ``val_calib`` and keep the deployed rule.

        Args:
            scores: a :class:`stage1_pro.scores.Scores` holding ``val_select`` and
                ``val_calib`` rows; ``val_calib`` needs positives.

        Returns:
            self

        Raises:
            DataError: no val_select or val_calib rows, or a val_calib without positives.
        """
        from stage1_pro.certify import certify
        from stage1_pro.errors import DataError

        self._check_params()
        select = scores.subset("val_select")
        calib = scores.subset("val_calib")
        n_pos = int(calib.label.sum())
        if n_pos == 0:
            raise DataError(
                f"{scores.source}: val_calib holds no positives, so FNR_exit cannot be certified; "
                "re-split with more positives in val_calib (see the sample-size table in the README)"
            )
        self._fit_select(select)
        self.select_counts_ = self._grid_counts(select)
        self.calib_counts_ = self._grid_counts(calib)
        cert = certify(
            self.calib_counts_,
            target=self.target_fnr_exit,
            delta=self.delta,
            max_fpr=self.max_fpr_exit,
            method=self.method,
            select=self.select_counts_,
        )
        self.certification_ = cert
        self.feasible_ = cert.feasible
        self.n_calib_ = len(calib)
        self.n_calib_positives_ = n_pos
        self._set_deployed(cert.deployed)
        self.sweep_results_ = self._sweep_rows(cert)
        self.certificate_ = self._certificate(cert)
        self.val_calib_metrics_ = self.evaluate(calib)
        self.val_select_metrics_ = self.evaluate(select)
        if not self.feasible_:
            self.certificate_["notes"] = self.infeasible_message()
            warnings.warn(self.certificate_["notes"], InfeasibleCertificateWarning, stacklevel=2)
        return self

    def infeasible_message(self) -> str:
        """Why nothing certified (the binding cause) and what would help."""
        c = self.certificate_
        msg = (
            f"{self.name}: no grid point certifies FNR_exit <= {self.target_fnr_exit} with FPR_exit <= "
            f"{self.max_fpr_exit} at delta={self.delta} with {c['procedure']}"
        )
        cert = getattr(self, "certification_", None)
        cause = cert.infeasible_cause() if cert is not None else ""
        if cause:
            msg += f": {cause}"
        return (
            msg + ". The policy defers every image (feasible: false). Depending on the cause: add labelled "
            "positives to val_calib, give val_select more data, improve the model, or relax the target."
        )

    def point_rule(self, point: dict[str, Any] | None = None) -> Any:
        """The deployed rule as a function ``(probs, gate_logit) -> decisions`` that decides each image
        alone (``point``: one path point of a policy with a path, SCRC). Every policy but SCRC-T
        decides each image alone, so this is :meth:`decide`."""
        if point is not None:
            raise ValueError(f"the {self.name} policy has no path points")
        return self.decide

    def evaluate(self, scores: Any) -> dict[str, Any]:
        """:func:`stage1_pro.metrics.exit_metrics` of the deployed rule (:meth:`point_rule`) on a split."""
        from stage1_pro.metrics import exit_metrics

        decisions = self.point_rule()(scores.probs, scores.gate_logit)
        return exit_metrics(
            decisions,
            scores.label,
            confidence=self.confidence(scores.probs, scores.gate_logit),
            predictions=argmax_class(scores.probs),
            delta=self.delta,
        )

    def _certificate(self, cert: Any) -> dict[str, Any]:
        from stage1_pro.certify import NEEDS_SELECT, P_VALUE_METHOD

        j = cert.deployed
        counts = cert.counts

        def at_deployed(values: np.ndarray) -> int:
            return int(values[j]) if j is not None else 0

        out: dict[str, Any] = {
            "target_fnr_exit": self.target_fnr_exit,
            "max_fpr_exit": self.max_fpr_exit,
            "delta": self.delta,
            "procedure": cert.method,
            "p_value_method": P_VALUE_METHOD,
            "grid": [float(v) for v in self._grid_values()],
            "grid_rule": self._grid_rule(),
            "n_calib": self.n_calib_,
            "n_calib_positives": self.n_calib_positives_,
            "n": at_deployed(counts.exited_positives),
            "k": at_deployed(counts.misses),
            "n_exited_negatives": at_deployed(counts.exited_negatives),
            "n_false_positives": at_deployed(counts.false_alarms),
            "p_value": float(cert.fnr_p_values[j]) if j is not None else None,
            "fpr_p_value": float(cert.fpr_p_values[j]) if j is not None else None,
            "test_level": float(cert.levels[j]) if j is not None else None,
            "upper_bound": cert.upper_bound(),
            "fpr_upper_bound": cert.fpr_upper_bound(),
            "feasible": cert.feasible,
            "n_certified": cert.n_certified,
            "positives_needed": None if cert.feasible else cert.positives_needed(),
            "order_learned_on": (
                "val_select" if cert.method in NEEDS_SELECT and cert.order.informative else None
            ),
            "order_note": cert.order.reason if cert.order is not None else "label-free procedure",
            "guarantee": (
                f"P(true FNR_exit > {self.target_fnr_exit} or true FPR_exit > {self.max_fpr_exit}) <= "
                f"{self.delta} over the draw of val_calib, for images exchangeable with val_calib"
            ),
        }
        return out

    def _sweep_rows(self, cert: Any) -> list[dict[str, Any]]:
        c = cert.counts
        rows = []
        for j, value in enumerate(self._grid_values()):
            n, k = int(c.exited_positives[j]), int(c.misses[j])
            n_neg, fp = int(c.exited_negatives[j]), int(c.false_alarms[j])
            rows.append(
                {
                    **self._grid_point(j),
                    self.grid_key: float(value),
                    "coverage": float(c.coverage[j]),
                    "n_exited_positives": n,
                    "n_false_negatives": k,
                    "fnr_exit": k / n if n else None,
                    "n_exited_negatives": n_neg,
                    "n_false_positives": fp,
                    "fpr_exit": fp / n_neg if n_neg else None,
                    "p_value": float(cert.fnr_p_values[j]),
                    "fpr_p_value": float(cert.fpr_p_values[j]),
                    "certified": bool(cert.certified[j]),
                }
            )
        return rows

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _fit_select(self, select: Any) -> None:
        """Fit calibrators and build the grid from ``val_select`` only."""

    @abstractmethod
    def _grid_counts(self, scores: Any) -> Any:
        """:class:`~stage1_pro.certify.GridCounts` of every grid point on one split (vectorised)."""

    @abstractmethod
    def _set_deployed(self, j: int | None) -> None:
        """Store the deployed rule (``None``: defer everything)."""

    @abstractmethod
    def _grid_values(self) -> np.ndarray:
        """The grid as numbers (thresholds, or SCRC's xi), strictest first."""

    def _grid_point(self, j: int) -> dict[str, Any]:
        """Extra per-point fields of ``sweep_results``."""
        return {}

    @abstractmethod
    def _grid_rule(self) -> str:
        """How the grid was fixed before the calibration labels were seen."""

    @abstractmethod
    def confidence(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """The score this policy ranks images by (higher exits first; used for AURC and curves)."""

    @abstractmethod
    def decide(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """Decisions (int8): 1 exit-positive, 0 exit-negative, -1 defer."""

    # ------------------------------------------------------------------ serialisation
    def _common_dict(self) -> dict[str, Any]:
        self._check_fitted()
        out = {
            "policy": self.name,
            "feasible": bool(self.feasible_),
            "target_fnr_exit": float(self.target_fnr_exit),
            "max_fpr_exit": float(self.max_fpr_exit),
            "delta": float(self.delta),
            "certificate": self.certificate_,
            "val_calib_metrics": self.val_calib_metrics_,
            "val_select_metrics": self.val_select_metrics_,
            "fnr_on_exits": self.val_calib_metrics_["fnr_exit"],
            "coverage": self.val_calib_metrics_["coverage"],
            "exit_accuracy": self.val_calib_metrics_["exit_accuracy"],
            "sweep_results": self.sweep_results_,
        }
        lineage = getattr(self, "lineage_", {}) or {}
        out.update({k: lineage[k] for k in LINEAGE_FIELDS if lineage.get(k) is not None})
        out.setdefault("created_at", utc_now())
        return out

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The policy file's content (without ``artifact``/``schema_version``)."""

    @classmethod
    def _params_from_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The constructor parameters a policy file records (shared by every ``from_dict``).

        A file written before the guard existed has no ``max_fpr_exit``: it certified FNR_exit
        only, which reads as :data:`~stage1_pro.defaults.NO_GUARD`.
        """
        from stage1_pro.defaults import NO_GUARD

        return {
            "target_fnr_exit": d["target_fnr_exit"],
            "delta": d["delta"],
            "max_fpr_exit": d.get("max_fpr_exit", NO_GUARD),
            "method": d["certificate"]["procedure"],
        }

    def _restore_common(self, d: dict[str, Any]) -> None:
        self.feasible_ = bool(d["feasible"])
        self.certificate_ = d["certificate"]
        self.val_calib_metrics_ = d["val_calib_metrics"]
        self.val_select_metrics_ = d.get("val_select_metrics")
        self.sweep_results_ = d.get("sweep_results", [])
        self.n_calib_ = d["certificate"]["n_calib"]
        self.n_calib_positives_ = d["certificate"].get("n_calib_positives")
        self.lineage_ = {k: d[k] for k in LINEAGE_FIELDS if k in d}

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitPolicy:
        """Rebuild a fitted policy from a (validated) policy file's content."""

    def save(self, uri: str) -> dict[str, Any]:
        """Validate and write the policy file atomically; return what was written."""
        from stage1_pro.artifacts import write_artifact

        return write_artifact(uri, self.artifact_kind, self.to_dict())

    def summary(self) -> str:
        """One line: the rule, coverage, FNR_exit and FPR_exit with their certified bounds, n, k."""
        self._check_fitted()
        c = self.certificate_
        m = self.val_calib_metrics_

        def num(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        state = "certified" if self.feasible_ else "INFEASIBLE (defers everything)"
        return (
            f"{self.name} [{state}] {self._rule_text()}  coverage(val_calib)={m['coverage']:.4f}  "
            f"FNR_exit(val_calib)={num(m['fnr_exit'])}  FPR_exit(val_calib)={num(m.get('fpr_exit'))}  "
            f"certified: FNR_exit <= {num(c['upper_bound'])} (target {self.target_fnr_exit}), FPR_exit <= "
            f"{num(c.get('fpr_upper_bound'))} (guard {self.max_fpr_exit}) at delta {self.delta}, "
            f"{c['procedure']}, n={c['n']} k={c['k']}"
        )

    @abstractmethod
    def _rule_text(self) -> str:
        """The deployed rule in words/numbers for :meth:`summary`."""


class ConfidenceThresholdPolicy(ExitPolicy):
    """A policy that exits, with the argmax class, where ``confidence >= threshold``.

    The grid holds confidence thresholds (``grid_``, strictest first), so the per-point counts
    are the same for every such policy; only :meth:`confidence` differs (softmax response,
    calibrated gate probability).
    """

    #: Name of the deployed threshold: the fitted attribute ``<name>_`` and the policy file's field.
    threshold_field: ClassVar[str] = "exit_threshold"

    def deployed_threshold(self) -> float:
        """The deployed threshold (:data:`DEFER_ALL_THRESHOLD` when infeasible)."""
        self._check_fitted()
        return float(getattr(self, f"{self.threshold_field}_"))

    def _fit_select(self, select: Any) -> None:
        # Imported here: stage1_pro.metrics (imported by certify) imports this module's constants.
        from stage1_pro.certify import quantile_grid

        self.grid_ = quantile_grid(self.confidence(select.probs, select.gate_logit), self.grid_size)

    def _set_deployed(self, j: int | None) -> None:
        setattr(self, f"{self.threshold_field}_", DEFER_ALL_THRESHOLD if j is None else float(self.grid_[j]))

    def _grid_counts(self, scores: Any) -> Any:
        from stage1_pro.certify import threshold_counts

        conf = self.confidence(scores.probs, scores.gate_logit)
        return threshold_counts(conf, scores.label, argmax_class(scores.probs), self.grid_)

    def _grid_values(self) -> np.ndarray:
        return self.grid_

    def decide(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """Decisions (int8): the argmax class where ``confidence >= threshold``, else -1 (defer).

        Args:
            probs: class probabilities, shape (n, 2).
            gate_logit: the gate head's logits, shape (n,); required when the policy reads them.

        Returns:
            One of EXIT_POSITIVE, EXIT_NEGATIVE or DEFER per image.
        """
        threshold = self.deployed_threshold()
        p, g = check_probs(probs, gate_logit, need_gate=self.spec.needs_gate)
        if not self.feasible_:
            return np.full(p.shape[0], DEFER, dtype=np.int8)
        out = argmax_class(p)
        out[self.confidence(p, g) < threshold] = DEFER
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**self._common_dict(), self.threshold_field: self.deployed_threshold()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConfidenceThresholdPolicy:
        policy = cls(**cls._params_from_dict(d))
        policy._restore_common(d)
        policy.grid_ = np.asarray(d["certificate"]["grid"], dtype=np.float64)
        setattr(policy, f"{cls.threshold_field}_", float(d[cls.threshold_field]))
        return policy
