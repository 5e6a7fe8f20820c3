"""Statistical validity of every certified policy, fast version (the 1,000-draw version is
``tests/long/test_validity.py``, run with ``pytest -m long``).

Scores come from :class:`stage1_pro.simulation.GaussianScoreModel`, whose true FNR_exit of any
deployed rule is exact. Over independent (val_select, val_calib) draws, the fraction of draws
whose deployed rule has true FNR_exit > target must stay <= delta + 3 Monte-Carlo standard
errors. With 60 draws the margin is wide (0.216 at delta 0.1), so a negative control checks that
the same test does catch an uncertified rule.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from stage1_pro.policies import InfeasibleCertificateWarning, create_policy
from stage1_pro.simulation import GaussianScoreModel, make_scores, validity_run

DRAWS = 60
N_CALIB = 3000
TARGET, DELTA = 0.02, 0.1
BOUND = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)
MODEL = GaussianScoreModel()

POLICIES = [
    ("softmax", {}),
    ("gate", {"calibrator": "platt"}),
    ("gate", {"calibrator": "isotonic"}),
    ("scrc", {"variant": "SCRC-I"}),
    ("scrc", {"variant": "SCRC-T"}),
]


@pytest.mark.parametrize(("policy", "params"), POLICIES)
def test_violation_rate_within_delta(policy: str, params: dict) -> None:
    r = validity_run(
        policy, MODEL, n_calib=N_CALIB, draws=DRAWS, seed=11, target_fnr_exit=TARGET, delta=DELTA, **params
    )
    assert r["violation_rate"] <= BOUND, r
    if r["fwer"] is not None:  # SCRC: every certified path point at once (covers SCRC-T's batches)
        assert r["fwer"] <= BOUND, r
    assert r["infeasible_rate"] < 1.0  # the check is not vacuous: policies do deploy


def test_negative_control_uncertified_rule_is_caught() -> None:
    """Deploying the loosest grid point whose *empirical* FNR_exit <= target violates far more often."""
    rng = np.random.default_rng(12)
    violations = []
    for _ in range(DRAWS):
        policy = create_policy("softmax", target_fnr_exit=TARGET, delta=DELTA)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InfeasibleCertificateWarning)
            policy.fit(make_scores(MODEL, N_CALIB, N_CALIB, rng))
        n, k, cov = policy.calib_counts_
        ok = (n > 0) & (k <= TARGET * n)
        t = policy.grid_[np.nonzero(ok)[0][np.argmax(cov[ok])]]
        violations.append(MODEL.softmax_curve(t)[0] > TARGET)
    assert np.mean(violations) > BOUND
