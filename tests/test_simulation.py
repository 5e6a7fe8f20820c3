"""The simulation's exact rates (stage1_pro.simulation), which every validity test and benchmark trusts:
checked against large Monte-Carlo samples for fitted policies of every kind, on every named model
(continuous, heavy ties, an informative gate)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from stage1_pro.decisions import DEFER
from stage1_pro.errors import ConfigError
from stage1_pro.simulation import (
    INFORMATIVE_GATE_MODEL,
    REFERENCE_MODEL,
    TIES_MODEL,
    Experiment,
    GaussianScoreModel,
    fit_quietly,
    make_scores,
    policy_rates,
    validity_run,
)

MODELS = {"reference": REFERENCE_MODEL, "ties": TIES_MODEL, "informative gate": INFORMATIVE_GATE_MODEL}
N_MC = 400_000


def empirical(decisions: np.ndarray, label: np.ndarray) -> tuple[float, float, float, int, int]:
    pos, neg, exited = label == 1, label == 0, decisions != DEFER
    n_pos, n_neg = int((exited & pos).sum()), int((exited & neg).sum())
    return (
        float(((decisions == 0) & pos).sum() / n_pos),
        float(((decisions == 1) & neg).sum() / n_neg),
        float(exited.mean()),
        n_pos,
        n_neg,
    )


def close(exact: float, observed: float, n: int) -> bool:
    """Within 4.5 binomial standard errors (plus float slack)."""
    return abs(exact - observed) <= 4.5 * math.sqrt(max(exact * (1 - exact), 1e-6) / n) + 1e-9


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("softmax", {}),
        ("gate", {}),
        ("gate", {"calibrator": "isotonic"}),
        ("scrc", {}),
        ("scrc", {"variant": "SCRC-I"}),
    ],
)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_exact_rates_of_fitted_policies_match_monte_carlo(model: str, policy: str, params: dict) -> None:
    sim = MODELS[model]
    rng = np.random.default_rng(zlib.crc32(f"{model}/{policy}/{params}".encode()))
    # The check needs a non-trivial rule; a draw may legitimately certify nothing (then the policy
    # defers everything), so take the first of a few draws that certifies.
    for _ in range(5):
        fitted = fit_quietly(policy, make_scores(sim, 4000, 4000, rng), target_fnr_exit=0.05, **params)
        if fitted.feasible_:
            break
    assert fitted.feasible_, fitted.infeasible_message()
    exact = policy_rates(fitted, sim)
    big = sim.sample(N_MC, rng)
    fnr, fpr, cov, n_pos, n_neg = empirical(
        fitted.point_rule()(big["probs"], big["gate_logit"]), big["label"]
    )
    assert close(exact.fnr, fnr, n_pos) and close(exact.fpr, fpr, n_neg), (exact, fnr, fpr)
    assert close(exact.coverage, cov, N_MC), (exact, cov)


def test_threshold_rates_agree_with_rule_rates_and_oracles_are_ordered() -> None:
    for sim in MODELS.values():
        t = 0.93

        def decide(probs: np.ndarray, gate_logit: np.ndarray, t: float = t) -> np.ndarray:
            out = (probs[:, 1] >= probs[:, 0]).astype(np.int8)
            out[probs.max(axis=1) < t] = DEFER
            return out

        a, b = sim.rule_rates(decide), sim.threshold_rates(np.array([t]))
        assert a.fnr == pytest.approx(float(b.fnr[0]), abs=1e-9) and a.coverage == pytest.approx(
            float(b.coverage[0])
        )
        soft, two = sim.oracle(rule="softmax"), sim.oracle(rule="two_dim")
        assert two >= soft - 2e-3  # the two-threshold family contains the softmax rules (grid resolution)
    assert INFORMATIVE_GATE_MODEL.oracle(rule="gate") > INFORMATIVE_GATE_MODEL.oracle(rule="softmax")
    assert REFERENCE_MODEL.oracle(rule="softmax") == pytest.approx(0.801, abs=1e-3)


def test_the_gate_is_correlated_with_but_not_equal_to_the_class_probability() -> None:
    s = REFERENCE_MODEL.sample(50_000, np.random.default_rng(0))
    r = np.corrcoef(s["gate_logit"], s["probs"].max(axis=1))[0, 1]
    assert 0.5 < r < 0.95
    ties = TIES_MODEL.sample(50_000, np.random.default_rng(0))
    assert np.unique(ties["probs"].max(axis=1)).size <= 11 and np.unique(ties["gate_logit"]).size < 200
    # without positives in val_select (a starved split)
    starved = make_scores(GaussianScoreModel(), 300, 300, np.random.default_rng(1), select_positives=False)
    assert starved.subset("val_select").label.sum() == 0 and len(starved.subset("val_select")) == 300


def test_an_experiment_draws_its_plan_reproducibly() -> None:
    """Every harness loops over Experiment.score_draws: the planned sizes, a starved val_select on
    request, and the same draws for the same seed (so paired comparisons across harnesses hold)."""
    plan = Experiment(n_calib=200, n_select=50, draws=3, seed=7, select_positives=False)
    draws = list(plan.score_draws(REFERENCE_MODEL, n_test=20))
    assert len(draws) == 3
    for scores in draws:
        assert [len(scores.subset(s)) for s in ("val_select", "val_calib", "test")] == [50, 200, 20]
        assert scores.subset("val_select").label.sum() == 0
    again = list(plan.score_draws(REFERENCE_MODEL, n_test=20))
    assert all(np.array_equal(a.probs, b.probs) for a, b in zip(draws, again, strict=True))
    other = next(Experiment(n_calib=200, n_select=50, draws=1, seed=8).score_draws(REFERENCE_MODEL))
    assert not np.array_equal(other.subset("val_calib").probs, draws[0].subset("val_calib").probs)
    default_select = next(Experiment(n_calib=120, draws=1).score_draws(REFERENCE_MODEL))
    assert len(default_select.subset("val_select")) == 120


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"target_fnr_exit": 0.5}, ConfigError, "target_fnr_exit=0.5 is outside the valid range"),
        ({"delta": 0.0}, ConfigError, "delta=0.0 is outside the valid range"),
        ({"max_fpr_exit": 2.0}, ConfigError, "max_fpr_exit=2.0 is outside the valid range"),
        ({"draws": 0}, ValueError, "draws=0 and n_calib=100 must both be at least 1"),
        ({"n_select": -1}, ValueError, "n_select=-1 must be at least 0"),
    ],
)
def test_a_bad_experiment_names_the_setting(settings: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Experiment(n_calib=100, **settings)


def test_certificate_settings_belong_to_the_experiment_not_the_policy() -> None:
    """The experiment judges the draws by its own target: a policy parameter setting another is refused."""
    with pytest.raises(
        ValueError, match=r"delta set as policy parameters; .*Experiment\(\.\.\., delta=\.\.\.\)"
    ):
        validity_run("softmax", REFERENCE_MODEL, Experiment(n_calib=100, draws=1), delta=0.05)
