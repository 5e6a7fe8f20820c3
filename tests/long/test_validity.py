"""Statistical validity of every certified policy: 1,000 independent calibration draws each.

Run with ``pytest -m long tests/long``. For each policy the fraction of draws whose deployed
rule has a true FNR_exit above the target (exact, from
:class:`stage1_pro.simulation.GaussianScoreModel`) must be <= delta + 3 Monte-Carlo standard
errors (0.128 at delta = 0.1). n = 5,000 puts the default procedure close to its boundary (its
violation rate there is about 0.06-0.08, so the test has little slack to hide a bug). The fast
version runs in the default suite (``tests/test_validity_fast.py``).
"""

from __future__ import annotations

import math

import pytest

from stage1_pro.simulation import GaussianScoreModel, validity_run

pytestmark = pytest.mark.long

DRAWS = 1000
TARGET, DELTA = 0.02, 0.1
BOUND = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("softmax", {}),
        ("softmax", {"method": "sgr_binary_search"}),
        ("softmax", {"method": "multistart_fixed_sequence"}),
        ("softmax", {"method": "holm"}),
        ("gate", {"calibrator": "platt"}),
        ("gate", {"calibrator": "isotonic"}),
        ("scrc", {"variant": "SCRC-I"}),
        ("scrc", {"variant": "SCRC-T"}),
    ],
)
def test_violation_rate_within_delta(policy: str, params: dict) -> None:
    r = validity_run(
        policy,
        GaussianScoreModel(),
        n_calib=5000,
        draws=DRAWS,
        seed=2026,
        target_fnr_exit=TARGET,
        delta=DELTA,
        **params,
    )
    print(policy, params, r)
    assert r["violation_rate"] <= BOUND, r
    if r["fwer"] is not None:
        assert r["fwer"] <= BOUND, r
    assert r["mean_coverage"] > 0.3, r  # deploys something useful on most draws


@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_other_deltas(delta: float) -> None:
    bound = delta + 3 * math.sqrt(delta * (1 - delta) / DRAWS)
    r = validity_run("softmax", GaussianScoreModel(), n_calib=5000, draws=DRAWS, seed=7, delta=delta)
    assert r["violation_rate"] <= bound, r
