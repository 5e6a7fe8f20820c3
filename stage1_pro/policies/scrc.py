"""Selective Conformal Risk Control exit policy (``scrcparams.json``): a two-threshold rule.

SCRC (Xu, Guo, Wei, "Selective Conformal Risk Control", arXiv 2512.12844) has two thresholds:

* ``lambda1`` selects on a label-free selection score ``g`` in [0, 1]: an image is *selected*
  iff ``g >= 1 - lambda1``. The default ``g`` is the gate head's probability calibrated on
  ``val_select`` (phase >= 3 models); ``max_prob`` and ``margin`` are selectable but make the
  rule one-dimensional (a coarser softmax threshold);
* ``lambda2`` builds the class set ``C = {k : p_k >= 1 - lambda2}`` from the class probabilities.

The cascade exits iff the image is selected **and** ``C`` is a singleton; the exit label is that
class (always the argmax). With the gate, the rule is genuinely two-dimensional: the gate and
the class probability each veto an exit.

**How the candidates are built and ordered** (``variant``), on ``val_select`` only:

``pareto`` (default)
    Pareto Testing (Laufer-Goldshtein, Fisch, Barzilay, Jaakkola, "Efficiently controlling
    multiple risks with Pareto Testing", ICLR 2023, arXiv 2210.07913, §4): every pair of a
    ``lambda1`` and a ``lambda2`` at ``grid_size`` quantile levels of ``val_select``'s
    selection scores and max probabilities is a candidate; on ``val_select`` each gets its
    coverage and its normalised risk ``max(FNR_exit / target, FPR_exit / max_fpr_exit)``
    (Jeffreys-smoothed counts); the candidates no other beats on both (the Pareto front) form
    the path, ordered by ``val_select`` coverage, strictest first, thinned to ``grid_size``
    points. Pareto Testing's second stage is the certification below.
``SCRC-I`` (``docs/methods.md`` §4.3): for each ``xi`` of the fixed grid
    ``j / grid_size``, ``lambda1`` is the strictest selection whose empirical rate is
    ``>= xi + eps`` with the one-sided DKW margin ``eps = sqrt(log(1/delta_dkw) / (2n))``
    (Massart 1990), and ``lambda2`` the smallest value of a fixed grid meeting the CRC count rule
    on the augmented loss of the positives with the shrunken target ``alpha * xi_lcb+``:
    ``errors + 1 <= (n+ + 1) * alpha * xi_lcb+`` (the inequality itself, not ``ceil(...) - 1``).
``SCRC-T``: ``lambda1`` selects the top ``ceil(xi (n + 1))`` of the calibration selection scores
    plus the test point; ``lambda2`` by CRC on the selected positives. At inference the selection
    threshold is recomputed **for every test batch** from the stored calibration selection
    scores and the batch's own scores, then snapped to a certified path point. **One image's
    decision therefore depends on the other images of its batch** (the same image can exit in
    one batch and defer in another; a test shows it); every batch still uses a certified rule.

**What is guaranteed.** CRC's guarantee is in expectation and SCRC-I's DKW step covers only the
selection rate, so every variant is certified like the other policies: each path point is a
fixed rule (it depends on ``val_select`` only), tested on ``val_calib`` with the exact binomial
p-values of FNR_exit and of the FPR_exit guard by the family-wise procedure of
:mod:`stage1_pro.certify`; the certified point with the largest coverage is deployed, and all
certified points hold simultaneously with probability ``>= 1 - delta`` (which covers every
SCRC-T batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from stage1_pro.decisions import DEFER, argmax_class
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.policies.base import ExitPolicy, check_probs
from stage1_pro.policies.gate import CALIBRATORS, apply_calibrator, check_calibrator, fit_calibrator
from stage1_pro.policy_registry import PolicyOption, register_policy

SCRC_VARIANTS: tuple[str, ...] = ("pareto", "SCRC-I", "SCRC-T")
SELECTION_SCORES: tuple[str, ...] = ("gate", "max_prob", "margin")
#: ``lambda2`` of SCRC-I/T is searched on this fixed grid (fixed in advance, like every grid).
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


def pareto_front(coverage: Any, risk: Any) -> np.ndarray:
    """Indices of the candidates no other candidate beats on both (coverage up, risk down),
    ordered by coverage, lowest first (ties in both: the first index)."""
    cov = np.asarray(coverage, dtype=np.float64)
    r = np.asarray(risk, dtype=np.float64)
    order = np.lexsort((r, -cov))  # coverage descending, then risk ascending
    best_before = np.minimum.accumulate(np.r_[np.inf, r[order]])[:-1]
    keep = order[r[order] < best_before]
    return keep[::-1].copy()


@register_policy(
    "scrc",
    artifact_kind="scrcparams",
    min_phase=6,
    score_names=("probs",),
    score_label="SCRC selection score",
    rule="lambda1 on the gate, lambda2 on the class probabilities (Pareto testing; SCRC-I, SCRC-T)",
    script="36_calibrate_scrc.py",
    options=(
        PolicyOption(
            "--scrc-variant",
            "variant",
            "how SCRC's candidate path is built on val_select (default pareto: Pareto testing)",
            SCRC_VARIANTS,
        ),
        PolicyOption(
            "--selection-score",
            "selection_score",
            "SCRC selection score (default gate: the calibrated gate head)",
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
    """SCRC exit policy with a PAC certificate on FNR_exit and FPR_exit (see the module docstring).

    Args:
        target_fnr_exit, delta, method, max_fpr_exit: see
            :class:`~stage1_pro.policies.base.ExitPolicy`; ``target_fnr_exit`` is SCRC's risk
            level ``alpha``.
        grid_size: ``pareto``: quantile levels per threshold and the most path points; SCRC-I/T:
            the ``xi`` grid is ``j / grid_size`` for ``j = 1 .. grid_size`` (default 100).
        variant: how the path is built, ``"pareto"`` (default), ``"SCRC-I"`` or ``"SCRC-T"``.
        selection_score: the label-free score ``g``, ``"gate"`` (default; needs gate logits,
            calibrated on ``val_select``), ``"max_prob"`` or ``"margin"``.
        gate_calibrator: ``"platt"`` (default) or ``"isotonic"``; used when
            ``selection_score="gate"``.

    Attributes:
        path_ (list[dict]): the candidate rules ``{xi, lambda1, lambda2, ...}`` fitted on
            ``val_select``, strictest first (``xi``: SCRC's target selection rate; ``pareto``:
            the point's val_select coverage).
        lambda1_, lambda2_, xi_ (float): the deployed rule (``0, 0, None`` when infeasible:
            nothing exits).
        certified_path_ (list[dict]): every certified path point.
        calib_selection_scores_ (ndarray): SCRC-T only: the ``val_select`` selection scores
            that enter every batch's threshold.
    """

    grid_key = "xi"

    grid_size: int = 100
    variant: str = "pareto"
    selection_score: str = "gate"
    gate_calibrator: str = "platt"

    def _check_params(self) -> None:
        super()._check_params()
        if self.variant not in SCRC_VARIANTS:
            raise ConfigError(f"unknown SCRC variant {self.variant!r}; allowed: {', '.join(SCRC_VARIANTS)}")
        if self.selection_score not in SELECTION_SCORES:
            raise ConfigError(
                f"unknown selection score {self.selection_score!r}; allowed: {', '.join(SELECTION_SCORES)}"
            )
        check_calibrator(self.gate_calibrator)

    def fit(self, scores: Any) -> SCRCPolicy:
        if self.selection_score == "gate" and not scores.has_gate:
            raise DataError(
                f"{scores.source}: no 'gate_logit' array: SCRC selects on the gate (selection_score='gate', "
                "the default) and needs scores from a phase >= 3 model; with a one-head model use the "
                "softmax policy (selection_score='max_prob' makes SCRC a coarser softmax threshold)"
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
        n_pos = int((select.label == 1).sum())
        if n_pos == 0 and self.variant != "pareto":
            raise DataError(f"{select.source}: val_select holds no positives; SCRC's path cannot be fitted")
        self.scrc_fit_: dict[str, Any] = {"n_select": g.size, "n_select_positives": n_pos}
        path = self._pareto_path(select, g) if self.variant == "pareto" else self._crc_path(select, g)
        if not path:
            raise DataError(
                f"{select.source}: no xi on the grid gives a feasible SCRC rule on val_select "
                f"({n_pos} positives; the CRC count rule alone needs (n+1)*alpha*xi >= 1); "
                "use more data, variant='pareto' or the softmax policy"
            )
        self.path_ = path
        if self.variant == "SCRC-T":
            self.calib_selection_scores_ = np.sort(g)

    def _pareto_path(self, select: Any, g: np.ndarray) -> list[dict[str, Any]]:
        """Pareto Testing's first stage: the (lambda1, lambda2) front on val_select (module docstring)."""
        from stage1_pro.certify import quantile_grid, threshold_counts

        maxp = select.probs.max(axis=1)
        above_half = maxp[maxp > 0.5]
        lam1 = np.unique(np.clip(np.r_[1.0, 1.0 - quantile_grid(g, self.grid_size)], 0.0, 1.0))
        lam2 = 1.0 - (quantile_grid(above_half, self.grid_size) if above_half.size else np.array([1.0]))
        pred = argmax_class(select.probs)
        blocks = []
        for l1 in lam1:  # select all (lambda1 = 1), then ever stricter selections
            sel = g >= 1.0 - l1
            c = threshold_counts(maxp[sel], select.label[sel], pred[sel], 1.0 - lam2)
            cov = c.coverage * sel.sum() / g.size
            counts = (c.exited_positives, c.misses, c.exited_negatives, c.false_alarms)
            blocks.append(np.column_stack([np.full(lam2.size, l1), lam2, cov, *counts]))
        cand = np.concatenate(blocks)
        risk = (cand[:, 4] + 0.5) / (cand[:, 3] + 1.0) / self.target_fnr_exit
        if self.max_fpr_exit < 1.0:
            risk = np.maximum(risk, (cand[:, 6] + 0.5) / (cand[:, 5] + 1.0) / self.max_fpr_exit)
        front = pareto_front(cand[:, 2], risk)
        front = front[cand[front, 2] > 0]
        if front.size > self.grid_size:
            front = front[np.unique(np.linspace(0, front.size - 1, self.grid_size).round().astype(int))]
        self.scrc_fit_.update(candidates=int(cand.shape[0]), front_size=int(front.size))
        return [
            {
                "xi": float(cand[i, 2]),
                "lambda1": float(cand[i, 0]),
                "lambda2": float(cand[i, 1]),
                "xi_lcb": None,
            }
            for i in front
        ]

    def _crc_path(self, select: Any, g: np.ndarray) -> list[dict[str, Any]]:
        """SCRC-I/T's path: one (lambda1, lambda2) per xi by DKW/transductive selection and CRC."""
        pos = select.label == 1
        n, n_pos = g.size, int(pos.sum())
        alpha = self.target_fnr_exit
        delta_dkw = self.delta / 2.0
        eps, eps_pos = dkw_epsilon(n, delta_dkw), dkw_epsilon(n_pos, delta_dkw)
        g_desc = np.sort(g)[::-1]
        p1_pos, g_pos = select.probs[pos, 1], g[pos]
        self.scrc_fit_.update(delta_dkw=delta_dkw, dkw_epsilon=eps, dkw_epsilon_positives=eps_pos)
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
        return path

    def _grid_counts(self, scores: Any) -> Any:
        from stage1_pro.certify import GridCounts

        g = self.selection(scores.probs, scores.gate_logit)
        decisions = np.stack([exit_rule(scores.probs, g, p["lambda1"], p["lambda2"]) for p in self.path_])
        return GridCounts.from_decisions(decisions, scores.label)

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
        if self.variant == "pareto":
            return (
                f"Pareto front on val_select of {self.grid_size} x {self.grid_size} (lambda1, lambda2) "
                f"quantile candidates (selection score {self.selection_score}; coverage against "
                "max(FNR_exit/target, FPR_exit/max_fpr_exit)), by val_select coverage (xi)"
            )
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

    def point_rule(self, point: dict[str, Any] | None = None) -> Callable[[Any, Any], np.ndarray]:
        """The decisions of one fixed path point (default: the deployed one), batch-independent."""
        self._check_fitted()
        lam1 = self.lambda1_ if point is None else point["lambda1"]
        lam2 = self.lambda2_ if point is None else point["lambda2"]
        exits = point is not None or self.feasible_

        def decide(probs: Any, gate_logit: Any | None = None) -> np.ndarray:
            p, gl = check_probs(probs, gate_logit, need_gate=self.selection_score == "gate")
            if not exits:
                return np.full(p.shape[0], DEFER, dtype=np.int8)
            return exit_rule(p, self.selection(p, gl), lam1, lam2)

        return decide

    def _rule_text(self) -> str:
        xi = "none" if self.xi_ is None else f"{self.xi_:.3g}"
        return (
            f"{self.variant} on {self.selection_score} xi={xi} lambda1={self.lambda1_:.6g} "
            f"lambda2={self.lambda2_:.6g}"
        )

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
        gate = d.get("gate_calibrator") or {}
        policy = cls(
            **cls._params_from_dict(d),
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
