"""Selective Conformal Risk Control exit policy (``scrcparams.json``).

SCRC (Xu, Guo, Wei, "Selective Conformal Risk Control", arXiv 2512.12844) has two thresholds:

* ``lambda1`` selects on a label-free confidence score ``g`` in [0, 1]: an image is *selected*
  iff ``g >= 1 - lambda1`` (``g`` = max probability, margin ``|p1 - p0|`` or the calibrated gate);
* ``lambda2`` builds the class set ``C = {k : p_k >= 1 - lambda2}``.

The cascade exits iff the image is selected **and** ``C`` is a singleton (``research/methods.md``
§2.6); the exit label is that class (always the argmax). The loss is the miss on positives,
``l = 1{y = 1 and 1 not in C}``: non-increasing in ``lambda2`` and bounded by ``B = 1``.

**How the thresholds are chosen** (a path over a target-selection-rate grid ``xi``, fixed in
advance at ``j / grid_size``), on ``val_select``:

* ``SCRC-I`` (default; methods §2.3): ``lambda1`` is the strictest selection whose empirical
  rate is ``>= xi + eps`` with the one-sided DKW margin ``eps = sqrt(log(1/delta_dkw) / (2n))``
  (Massart 1990), so the true selection rate is ``>= xi`` with probability ``>= 1 - delta_dkw``
  simultaneously for every ``xi`` (DKW is uniform over thresholds: no split across the grid).
  ``lambda2`` is the smallest grid value meeting the CRC count rule on the augmented loss
  ``U_i l_i`` over the ``n+`` positives with the shrunken target ``alpha * xi_lcb+``:
  ``errors + 1 <= (n+ + 1) * alpha * xi_lcb+`` (the inequality itself, not ``ceil(...) - 1``:
  the off-by-one of two third-party implementations, methods §2.7), where ``xi_lcb+`` is the DKW
  lower bound of the positives' selection rate. ``delta_dkw = delta / 2`` for each of the two
  DKW events (all images; positives).
* ``SCRC-T`` (methods §2.2): ``lambda1`` selects the top ``ceil(xi (n + 1))`` of the calibration
  selection scores plus the test point; ``lambda2`` by CRC on the selected positives
  (``errors + 1 <= (m + 1) alpha``). At inference the selection threshold is recomputed **for
  every test batch** from the stored calibration selection scores and the batch's scores.

**What is guaranteed.** CRC's guarantee is in expectation and SCRC-I's DKW step covers only the
selection rate, so the product adds the same PAC certificate as the other policies: every point
of the ``xi`` path is a fixed exit rule (it depends on ``val_select`` only); each is tested on
``val_calib`` with the exact binomial p-value of its exited positives and the family-wise
procedure of :mod:`stage1_pro.certify`; the certified point with the largest coverage is
deployed. Hence ``P(true FNR_exit > target_fnr_exit) <= delta`` over the draw of ``val_calib``
for SCRC-I. For SCRC-T every batch's threshold is snapped to a *certified* path point (the
loosest one at least as strict as the batch's, the strictest certified one if the batch asks
for more), so the same certificate covers every batch (all certified points hold
simultaneously).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1_pro.decisions import DEFER, argmax_class
from stage1_pro.defaults import DEFAULT_DELTA, DEFAULT_TARGET_FNR_EXIT
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.policies.base import ExitPolicy, check_probs
from stage1_pro.policies.gate import CALIBRATORS, apply_calibrator, fit_calibrator
from stage1_pro.policy_registry import PolicyOption, register_policy

SCRC_VARIANTS: tuple[str, ...] = ("SCRC-I", "SCRC-T")
SELECTION_SCORES: tuple[str, ...] = ("max_prob", "margin", "gate")
#: ``lambda2`` is searched on this fixed grid (fixed in advance, like every grid).
LAMBDA2_GRID = np.linspace(0.0, 1.0, 1001)


def dkw_epsilon(n: int, delta: float) -> float:
    """One-sided DKW/Massart margin: ``P(sup_t (F_n(t) - F(t)) > eps) <= exp(-2 n eps^2) = delta``."""
    return math.sqrt(math.log(1.0 / delta) / (2.0 * n)) if n > 0 else math.inf


def crc_lambda2(p1_selected_pos: np.ndarray, budget: float) -> float | None:
    """Smallest ``lambda2`` on :data:`LAMBDA2_GRID` with ``errors(lambda2) + 1 <= budget``.

    ``errors(lambda2) = #{selected positives with p1 < 1 - lambda2}`` (the class set misses
    class 1), non-increasing in ``lambda2``. ``budget`` is ``(n + 1) * alpha * xi`` for the
    count rule of CRC with ``B = 1``. ``None`` when even ``lambda2 = 1`` (no miss) fails.
    """
    s = np.sort(np.asarray(p1_selected_pos, dtype=np.float64))
    errors = np.searchsorted(s, 1.0 - LAMBDA2_GRID, side="left")
    ok = errors + 1 <= budget + 1e-12
    return float(LAMBDA2_GRID[np.argmax(ok)]) if ok.any() else None


def exit_rule(probs: np.ndarray, g: np.ndarray, lambda1: float, lambda2: float) -> np.ndarray:
    """Decisions of one SCRC rule: selected (``g >= 1 - lambda1``) and a singleton class set."""
    in1 = probs[:, 1] >= 1.0 - lambda2
    in0 = probs[:, 0] >= 1.0 - lambda2
    out = np.where(in1, 1, 0).astype(np.int8)
    out[~((g >= 1.0 - lambda1) & (in0 ^ in1))] = DEFER
    return out


@register_policy(
    "scrc",
    artifact_kind="scrcparams",
    min_phase=6,
    score_names=("probs",),
    score_label="SCRC selection score",
    rule="SCRC-I (default) or SCRC-T (lambda1, lambda2)",
    script="36_calibrate_scrc.py",
    options=(
        PolicyOption("--scrc-variant", "variant", "SCRC variant (default SCRC-I)", SCRC_VARIANTS),
        PolicyOption(
            "--selection-score",
            "selection_score",
            "SCRC selection score (default max_prob)",
            SELECTION_SCORES,
        ),
        PolicyOption(
            "--calibrator",
            "gate_calibrator",
            "calibrator of --selection-score gate, fitted on val_select (default platt)",
            CALIBRATORS,
        ),
    ),
)
class SCRCPolicy(ExitPolicy):
    """SCRC exit policy with a PAC FNR_exit certificate (see the module docstring).

    Parameters
    ----------
    target_fnr_exit, delta, method
        See :class:`~stage1_pro.policies.base.ExitPolicy`; ``target_fnr_exit`` is SCRC's
        risk level ``alpha``.
    grid_size : int, default 100
        The ``xi`` grid is ``j / grid_size`` for ``j = 1 .. grid_size``.
    variant : {"SCRC-I", "SCRC-T"}, default "SCRC-I"
    selection_score : {"max_prob", "margin", "gate"}, default "max_prob"
        The label-free score ``g``; ``gate`` needs gate logits (calibrated on ``val_select``).
    gate_calibrator : {"platt", "isotonic"}, default "platt"
        Used when ``selection_score="gate"``.

    Attributes
    ----------
    path_ : list of dict
        The candidate rules ``{xi, lambda1, lambda2, ...}`` fitted on ``val_select``, by ``xi``.
    lambda1_, lambda2_, xi_ : float
        The deployed rule (``0, 0, None`` when infeasible: nothing exits).
    calib_selection_scores_ : ndarray
        SCRC-T only: the ``val_select`` selection scores that enter every batch's threshold.
    """

    grid_key = "xi"

    def __init__(
        self,
        target_fnr_exit: float = DEFAULT_TARGET_FNR_EXIT,
        delta: float = DEFAULT_DELTA,
        method: str | None = None,
        grid_size: int = 100,
        variant: str = "SCRC-I",
        selection_score: str = "max_prob",
        gate_calibrator: str = "platt",
    ) -> None:
        super().__init__(target_fnr_exit=target_fnr_exit, delta=delta, method=method, grid_size=grid_size)
        self.variant = variant
        self.selection_score = selection_score
        self.gate_calibrator = gate_calibrator

    def _check_params(self) -> None:
        super()._check_params()
        if self.variant not in SCRC_VARIANTS:
            raise ConfigError(f"unknown SCRC variant {self.variant!r}; allowed: {', '.join(SCRC_VARIANTS)}")
        if self.selection_score not in SELECTION_SCORES:
            raise ConfigError(
                f"unknown selection score {self.selection_score!r}; allowed: {', '.join(SELECTION_SCORES)}"
            )
        if self.gate_calibrator not in CALIBRATORS:
            raise ConfigError(
                f"unknown gate calibrator {self.gate_calibrator!r}; allowed: {', '.join(CALIBRATORS)}"
            )

    def fit(self, scores: Any) -> SCRCPolicy:
        if self.selection_score == "gate" and not scores.has_gate:
            raise DataError(
                f"{scores.source}: no 'gate_logit' array: selection_score='gate' needs scores from a "
                "phase >= 3 model; use selection_score='max_prob'"
            )
        return super().fit(scores)  # type: ignore[return-value]

    @property
    def score_names(self) -> tuple[str, ...]:
        """``probs``, and ``gate_logit`` when the selection score is the calibrated gate."""
        return ("probs", "gate_logit") if self.selection_score == "gate" else ("probs",)

    # ------------------------------------------------------------------ selection score
    def selection(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """The label-free selection score ``g`` in [0, 1]."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.selection_score == "max_prob":
            return probs.max(axis=1)
        if self.selection_score == "margin":
            return np.abs(probs[:, 1] - probs[:, 0])
        if gate_logit is None:
            raise DataError("gate_logit: selection_score='gate' needs the gate head's logits")
        return apply_calibrator(self.gate_calibrator, self.gate_calibrator_params_, gate_logit)

    def confidence(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """The selection score ``g`` (see :meth:`selection`)."""
        return self.selection(probs, gate_logit)

    # ------------------------------------------------------------------ the path on val_select
    def _fit_select(self, select: Any) -> None:
        if self.selection_score == "gate":
            correct = argmax_class(select.probs) == select.label
            self.gate_calibrator_params_ = fit_calibrator(
                self.gate_calibrator, select.gate_logit, correct, select.source
            )
        g = self.selection(select.probs, select.gate_logit)
        pos = select.label == 1
        n, n_pos = g.size, int(pos.sum())
        if n_pos == 0:
            raise DataError(f"{select.source}: val_select holds no positives; SCRC's path cannot be fitted")
        alpha = self.target_fnr_exit
        delta_dkw = self.delta / 2.0
        eps, eps_pos = dkw_epsilon(n, delta_dkw), dkw_epsilon(n_pos, delta_dkw)
        g_desc = np.sort(g)[::-1]
        p1_pos, g_pos = select.probs[pos, 1], g[pos]
        self.scrc_fit_ = {
            "n_select": n,
            "n_select_positives": n_pos,
            "delta_dkw": delta_dkw,
            "dkw_epsilon": eps,
            "dkw_epsilon_positives": eps_pos,
        }
        path: list[dict[str, Any]] = []
        for xi in np.arange(1, self.grid_size + 1) / self.grid_size:
            if self.variant == "SCRC-I":
                m = math.ceil((xi + eps) * n - 1e-9)
                if m > n:  # xi + eps > 1: no selection threshold reaches it
                    continue
                t1 = float(g_desc[m - 1])
                xi_lcb = float(np.mean(g_pos >= t1)) - eps_pos
                budget = (n_pos + 1) * alpha * xi_lcb
                sel_pos = g_pos >= t1
            else:
                m = math.ceil(xi * (n + 1) - 1e-9)
                t1 = float(g_desc[m - 1]) if m <= n else 0.0
                sel_pos = g_pos >= t1
                xi_lcb = None
                budget = (int(sel_pos.sum()) + 1) * alpha
            lam2 = crc_lambda2(p1_pos[sel_pos], budget)
            if lam2 is None:
                continue
            lam1 = float(min(1.0, max(0.0, 1.0 - t1)))
            if path and path[-1]["lambda1"] == lam1 and path[-1]["lambda2"] == lam2:
                continue  # the same rule as the previous xi
            path.append({"xi": float(xi), "lambda1": lam1, "lambda2": lam2, "xi_lcb": xi_lcb})
        if not path:
            raise DataError(
                f"{select.source}: no xi on the grid gives a feasible SCRC rule on val_select "
                f"({n_pos} positives; the CRC count rule alone needs (n+1)*alpha*xi >= 1); "
                "use more data or the softmax policy"
            )
        self.path_ = path
        if self.variant == "SCRC-T":
            self.calib_selection_scores_ = np.sort(g)

    def _grid_counts(self, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = self.selection(scores.probs, scores.gate_logit)
        pos = scores.label == 1
        n = np.empty(len(self.path_), dtype=np.int64)
        k = np.empty_like(n)
        cov = np.empty(len(self.path_))
        for j, point in enumerate(self.path_):
            d = exit_rule(scores.probs, g, point["lambda1"], point["lambda2"])
            exited = d != DEFER
            n[j] = int((exited & pos).sum())
            k[j] = int(((d == 0) & pos).sum())
            cov[j] = exited.mean()
        return n, k, cov

    def _set_deployed(self, j: int | None) -> None:
        self.deployed_index_ = j
        if j is None:
            self.lambda1_, self.lambda2_, self.xi_ = 0.0, 0.0, None
        else:
            point = self.path_[j]
            self.lambda1_, self.lambda2_, self.xi_ = point["lambda1"], point["lambda2"], point["xi"]
        cert = self.certification_
        self.certified_path_ = [
            {"xi": p["xi"], "lambda1": p["lambda1"], "lambda2": p["lambda2"]}
            for p, ok in zip(self.path_, cert.certified, strict=True)
            if ok
        ]

    def _grid_values(self) -> np.ndarray:
        return np.array([p["xi"] for p in self.path_])

    def _grid_point(self, j: int) -> dict[str, Any]:
        p = self.path_[j]
        return {"lambda1": p["lambda1"], "lambda2": p["lambda2"], "xi_lcb": p["xi_lcb"]}

    def _grid_rule(self) -> str:
        return (
            f"xi = j/{self.grid_size}; (lambda1, lambda2) per xi by {self.variant} on val_select "
            f"(selection score {self.selection_score}); lambda2 on a fixed {LAMBDA2_GRID.size}-point grid"
        )

    # ------------------------------------------------------------------ decisions
    def _batch_point(self, g: np.ndarray) -> dict[str, Any]:
        """SCRC-T: the certified path point for this batch (see the module docstring)."""
        cal = self.calib_selection_scores_
        bag = np.sort(np.concatenate([cal, g]))[::-1]
        m = math.ceil(self.xi_ * bag.size - 1e-9)
        t_batch = float(bag[m - 1]) if m <= bag.size else 0.0
        pts = self.certified_path_
        t1 = np.array([1.0 - p["lambda1"] for p in pts])
        stricter = np.nonzero(t1 >= t_batch)[0]
        j = stricter[np.argmin(t1[stricter])] if stricter.size else int(np.argmax(t1))
        return pts[int(j)]

    def decide(self, probs: Any, gate_logit: Any | None = None) -> np.ndarray:
        """Decisions (int8). SCRC-T recomputes the selection threshold from this whole batch."""
        self._check_fitted()
        p, gl = check_probs(probs, gate_logit, need_gate=self.selection_score == "gate")
        if not self.feasible_:
            return np.full(p.shape[0], DEFER, dtype=np.int8)
        g = self.selection(p, gl)
        if self.variant == "SCRC-T" and p.shape[0] > 0:
            point = self._batch_point(g)
            return exit_rule(p, g, point["lambda1"], point["lambda2"])
        return exit_rule(p, g, self.lambda1_, self.lambda2_)

    def _rule_text(self) -> str:
        xi = "none" if self.xi_ is None else f"{self.xi_:.3g}"
        return f"{self.variant} xi={xi} lambda1={self.lambda1_:.6g} lambda2={self.lambda2_:.6g}"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {
            **self._common_dict(),
            "lambda1": float(self.lambda1_),
            "lambda2": float(self.lambda2_),
            "scrc_variant": self.variant,
            "selection_score": self.selection_score,
            "fnr_bound": self.certificate_["upper_bound"],
            "xi": self.xi_,
            "xi_grid": [p["xi"] for p in self.path_] if hasattr(self, "path_") else self.certificate_["grid"],
            "certified_path": self.certified_path_,
            "scrc_fit": self.scrc_fit_,
        }
        if self.selection_score == "gate":
            out["gate_calibrator"] = {"type": self.gate_calibrator, "params": self.gate_calibrator_params_}
        if self.variant == "SCRC-T":
            out["calib_selection_scores"] = [float(v) for v in self.calib_selection_scores_]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SCRCPolicy:
        c = d["certificate"]
        gate = d.get("gate_calibrator") or {}
        policy = cls(
            target_fnr_exit=d["target_fnr_exit"],
            delta=d["delta"],
            method=c["procedure"],
            variant=d["scrc_variant"],
            selection_score=d["selection_score"],
            gate_calibrator=gate.get("type", "platt"),
        )
        policy._restore_common(d)
        policy.lambda1_, policy.lambda2_, policy.xi_ = float(d["lambda1"]), float(d["lambda2"]), d.get("xi")
        policy.certified_path_ = d.get("certified_path", [])
        policy.scrc_fit_ = d.get("scrc_fit", {})
        if gate:
            policy.gate_calibrator_params_ = gate["params"]
        if policy.variant == "SCRC-T":
            if policy.feasible_ and ("calib_selection_scores" not in d or not policy.certified_path_):
                raise ArtifactError("scrcparams: SCRC-T needs 'calib_selection_scores' and 'certified_path'")
            policy.calib_selection_scores_ = np.asarray(d.get("calib_selection_scores", []), dtype=np.float64)
        return policy
