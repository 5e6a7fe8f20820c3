"""Statistical validity of every certified policy, fast version (the 1,000-draw versions are in
``tests/long/``, run with ``pytest -m long``).

Scores come from :mod:`stage1_pro.simulation`, whose true FNR_exit and FPR_exit of any deployed rule
are exact: the reference model (prevalence 0.4, logits +-2.2, sd 1.5), and a rare-positive model
with heavy ties (prevalence 0.1, probabilities rounded to 0.05, gate logits to 0.25). The gate is a
noisy copy of the classifier's confidence (correlated with, not equal to, the class probability).
Over independent (val_select, val_calib) draws the fraction whose deployed rule breaks the joint
certificate (true FNR_exit > target or true FPR_exit > max_fpr_exit) must stay <= delta + 3
Monte-Carlo standard errors. With 60 draws the margin is wide (0.216 at delta 0.1), so a negative
control checks that the same test does catch an uncertified rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stage1_pro.certify import GridCounts
from stage1_pro.simulation import (
    REFERENCE_MODEL,
    TIES_MODEL,
    Experiment,
    audit_run,
    fit_quietly,
    make_scores,
    procedure_comparison,
    validity_run,
)

DRAWS = 60
TARGET, DELTA, GUARD = 0.02, 0.1, 0.25


def bound(draws: int, level: float = DELTA) -> float:
    return level + 3 * math.sqrt(level * (1 - level) / draws)


MODELS = {"reference": (REFERENCE_MODEL, 3000), "ties": (TIES_MODEL, 10000)}


@pytest.mark.parametrize("policy", ["softmax", "gate", "scrc"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_violation_rate_within_delta(model: str, policy: str) -> None:
    sim, n_calib = MODELS[model]
    r = validity_run(policy, sim, Experiment(n_calib=n_calib, draws=DRAWS, seed=11))
    assert r["violation_rate"] <= bound(DRAWS), r
    assert r["certified_rate"] > 0.5  # the check is not vacuous: policies do deploy


def test_scrc_t_every_certified_point() -> None:
    """SCRC-T snaps each batch to a certified path point: all of them must hold at once."""
    draws = 30
    r = validity_run(
        "scrc",
        REFERENCE_MODEL,
        Experiment(n_calib=3000, draws=draws, seed=12),
        variant="SCRC-T",
        every_certified_point=True,
    )
    assert r["fwer"] <= bound(draws) and r["violation_rate"] <= r["fwer"], r
    assert r["certified_rate"] > 0.5


def test_negative_control_uncertified_rule_is_caught() -> None:
    """Deploying the loosest grid point whose *empirical* FNR_exit <= target violates far more often."""
    rng = np.random.default_rng(12)
    violations = []
    for _ in range(DRAWS):
        policy = fit_quietly("softmax", make_scores(REFERENCE_MODEL, 3000, 3000, rng))
        c: GridCounts = policy.calib_counts_
        ok = (c.exited_positives > 0) & (c.misses <= TARGET * c.exited_positives)
        t = policy.grid_[np.nonzero(ok)[0][np.argmax(c.coverage[ok])]]
        violations.append(REFERENCE_MODEL.threshold_rates(t).fnr > TARGET)
    assert np.mean(violations) > bound(DRAWS)


@pytest.mark.parametrize("select", ["no positives", "30 images"])
def test_starved_val_select_certifies_at_least_as_often_as_holm(select: str) -> None:
    """On the same draws the default certifies whenever Holm does (its label-free fallback tests every
    point at >= delta/m), and much more often than the learned start alone."""
    kw = {"n_select": 1000, "select_positives": False} if select == "no positives" else {"n_select": 30}
    r = procedure_comparison(
        REFERENCE_MODEL,
        ("split_fallback_sequence", "holm", "split_fixed_sequence"),
        Experiment(n_calib=5000, draws=20, seed=3, **kw),
    )
    default, holm, learned = (r[m] for m in ("split_fallback_sequence", "holm", "split_fixed_sequence"))
    assert default["certified_rate"] >= holm["certified_rate"] > 0.5
    assert default["mean_coverage"] > holm["mean_coverage"]
    assert default["certified_rate"] > learned["certified_rate"]


def test_audit_false_refusals_of_valid_runs() -> None:
    """Calibrate, deploy, audit a fresh test split: among truly valid runs the audit refuses at most
    level + 3 s.e., and less often than the old point-estimate rule."""
    r = audit_run("softmax", REFERENCE_MODEL, Experiment(n_calib=3000, draws=100, seed=5), n_test=3000)
    assert r["valid_draws"] >= 80
    assert r["false_refusal_rate"] <= bound(r["valid_draws"], 0.05), r
    assert r["point_estimate_refusal_rate"] > r["false_refusal_rate"], r
