"""Certification core (stage1_pro.certify): p-values, grids, counts and family-wise procedures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from stage1_pro import certify as C  # noqa: N812
from stage1_pro.errors import ConfigError
from stage1_pro.metrics import clopper_pearson_upper


def test_binomial_p_values_by_hand_and_scipy() -> None:
    # no miss among n: P(Bin(n, a) <= 0) = (1 - a)^n
    assert C.binomial_p_values(0, 114, 0.02) == pytest.approx(0.98**114)
    k = np.array([0, 1, 3, 5, 0])
    n = np.array([10, 50, 333, 20, 0])
    p = C.binomial_p_values(k, n, 0.02)
    np.testing.assert_allclose(
        p[:4],
        [
            stats.binomtest(int(a), int(b), 0.02, alternative="less").pvalue
            for a, b in zip(k[:4], n[:4], strict=True)
        ],
    )
    assert p[4] == 1.0  # nothing exited: no evidence
    np.testing.assert_allclose(np.exp(C.binomial_log_p_values(k, n, 0.02)), p)
    # no underflow to -inf in the ranking: k = 0 is exactly n log(1 - a)
    assert C.binomial_log_p_values(0, 10**6, 0.02) == pytest.approx(10**6 * math.log1p(-0.02))
    deep = C.binomial_log_p_values(np.array([5, 50]), np.array([10**6, 10**6]), 0.02)
    assert np.isfinite(deep).all() and deep[0] < deep[1]
    exact = special.logsumexp(stats.binom.logpmf(np.arange(6), 10**6, 0.02))
    assert deep[0] == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (0.10, [114, 194, 265, 333, 398, 462]),
        (0.05, [149, 236, 313, 386, 456, 523]),
        (0.01, [228, 330, 418, 499, 577, 652]),
    ],
)
def test_sample_size_table_of_methods_section_9(delta: float, expected: list[int]) -> None:
    got = [C.min_exited_positives(0.02, delta, k) for k in range(6)]
    assert got == expected
    for k, n in enumerate(got):  # minimality
        assert C.binomial_p_values(k, n, 0.02) <= delta < C.binomial_p_values(k, n - 1, 0.02)


def test_p_value_and_clopper_pearson_duality() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 2000))
        k = int(rng.integers(0, n + 1))
        p = float(C.binomial_p_values(k, n, 0.02))
        u = clopper_pearson_upper(k, n, 0.1)
        assert (p <= 0.1) == (u <= 0.02 + 1e-12)


def test_quantile_grid_and_counts() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.55, 0.5, 0.99])
    grid = C.quantile_grid(scores, 4)
    # coverage levels 1/4..1: the 2nd, 4th, 6th, 8th largest, strictest first
    np.testing.assert_allclose(grid, [0.9, 0.8, 0.6, 0.5])
    np.testing.assert_array_equal(C.count_at_least(scores, grid), [2, 4, 6, 8])
    assert C.quantile_grid(np.ones(5), 10).tolist() == [1.0]  # ties collapse
    rng = np.random.default_rng(1)
    v, t = rng.random(1000), rng.random(50)
    np.testing.assert_array_equal(C.count_at_least(v, t), [(v >= x).sum() for x in t])


P = np.array([0.5, 0.04, 0.01, 0.02, 0.08, 0.2, 0.03])


def test_fixed_sequence_stops_at_once_when_the_strictest_point_fails() -> None:
    lv = C.fixed_sequence(P, 0.1)
    assert np.isnan(lv).all()
    lv = C.fixed_sequence(P[1:], 0.1)
    np.testing.assert_array_equal(~np.isnan(lv), [1, 1, 1, 1, 0, 0])


def test_split_fixed_sequence_starts_at_the_best_learned_start() -> None:
    start_scores = np.array([0.1, 0.3, 0.99, 0.9, 0.2, 0.5, 0.6])
    lv = C.split_fixed_sequence(P, 0.1, start_scores=start_scores)
    # starts at index 2, passes 2, 3, 4, stops at 5 (0.2 > 0.1); index 6 is never reached
    np.testing.assert_array_equal(~np.isnan(lv), [0, 0, 1, 1, 1, 0, 0])
    assert np.nanmax(lv) == 0.1
    # ties: the loosest of equal maxima
    lv = C.split_fixed_sequence(P, 0.1, start_scores=np.array([0, 0, 0.9, 0.9, 0, 0, 0]))
    np.testing.assert_array_equal(~np.isnan(lv), [0, 0, 0, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="val_select"):
        C.split_fixed_sequence(P, 0.1)


def test_predicted_pass_probability() -> None:
    # 0 misses among 1,000 positives: the calibration test (k_max(1000) = 13) passes almost surely
    # 20 misses among 1,000: FNR 0.02 is the target itself, the test passes rarely
    # 0 misses among 50: 50 exited positives can never certify (114 needed)
    pp = C.predicted_pass_probability([1000, 1000, 50], [0, 20, 0], target=0.02, level=0.1)
    assert pp[0] > 0.999 and pp[1] < 0.2 and pp[2] == 0.0
    # Monte Carlo check of the posterior predictive for a middle case
    rng = np.random.default_rng(0)
    n, k = 600, 5
    f = rng.beta(k + 0.5, n - k + 0.5, 200_000)
    kmax = 7  # P(Bin(600, .02) <= 7) = 0.087 <= 0.1 < P(... <= 8)
    assert C.binomial_p_values(kmax, n, 0.02) <= 0.1 < C.binomial_p_values(kmax + 1, n, 0.02)
    mc = np.mean(rng.binomial(n, f) <= kmax)
    assert C.predicted_pass_probability([n], [k], target=0.02, level=0.1)[0] == pytest.approx(mc, abs=0.005)
    # scale: twice the calibration data makes a good point more likely to pass
    a, b = (C.predicted_pass_probability([300], [1], target=0.02, level=0.1, scale=s)[0] for s in (1, 2))
    assert b > a


def test_bonferroni_and_holm_by_hand() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # Bonferroni at 0.1/4 = 0.025
    np.testing.assert_array_equal(~np.isnan(C.bonferroni(p, 0.1)), [1, 0, 0, 1])
    # Holm: 0.005 <= 0.1/4, 0.01 <= 0.1/3, 0.03 <= 0.1/2, 0.04 <= 0.1/1: all rejected
    lv = C.holm(p, 0.1)
    np.testing.assert_allclose(lv, [0.1 / 3, 0.1, 0.05, 0.025])
    # a failure stops the step-down
    np.testing.assert_array_equal(~np.isnan(C.holm(np.array([0.01, 0.2, 0.06, 0.005]), 0.1)), [1, 0, 0, 1])


def test_sgr_binary_search() -> None:
    m = 7
    level = 0.1 / math.ceil(math.log2(m + 1))  # 3 tests at most
    p = np.array([0.001, 0.001, 0.001, 0.001, 0.02, 0.5, 0.5])
    lv = C.sgr_binary_search(p, 0.1)
    # visits 3 (pass), 5 (fail), 4 (0.02 < 0.0333: pass)
    np.testing.assert_array_equal(~np.isnan(lv), [0, 0, 0, 1, 1, 0, 0])
    assert np.nanmax(lv) == pytest.approx(level)


def test_multistart_fixed_sequence() -> None:
    p = np.array([0.5, 0.5, 0.001, 0.01, 0.5, 0.001, 0.001, 0.001, 0.9])
    # 2 starts at floor(9/3) = 3 and floor(18/3) = 6, each at 0.05
    lv = C.multistart_fixed_sequence(p, 0.1, starts=2)
    np.testing.assert_array_equal(~np.isnan(lv), [0, 0, 0, 1, 0, 0, 1, 1, 0])
    assert np.nanmax(lv) == 0.05


def test_certify_deploys_max_coverage_and_reports_bound() -> None:
    n = np.array([50, 200, 400, 600, 800])
    k = np.array([0, 0, 2, 6, 16])
    cov = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    cert = C.certify(n, k, target=0.02, delta=0.1, method="holm", coverage=cov)
    p = C.binomial_p_values(k, n, 0.02)
    assert cert.p_values == pytest.approx(p)
    # Holm: 0.0131 <= 0.1/5, 0.0176 <= 0.1/4, then 0.0443 > 0.1/3 stops
    assert cert.certified.tolist() == [False, True, True, False, False]
    assert cert.deployed == 2 and cert.feasible and cert.n_certified == 2
    assert cert.levels[2] == pytest.approx(0.02)
    ub = cert.upper_bound()
    assert ub == pytest.approx(clopper_pearson_upper(2, 400, 0.02)) and ub <= 0.02
    # same grid, default procedure with val_select counts
    cert = C.certify(n, k, target=0.02, delta=0.1, coverage=cov, n_select=n, k_select=k)
    # starts at index 2 (smallest p), passes 3 (0.0443 <= 0.1), stops at 4
    assert cert.method == C.DEFAULT_PROCEDURE == "split_fixed_sequence"
    assert cert.deployed == 3 and cert.upper_bound() <= 0.02


def test_infeasible_certification_and_positives_needed() -> None:
    cert = C.certify([10, 20], [0, 0], target=0.02, delta=0.1, method="fixed_sequence")
    assert not cert.feasible and cert.deployed is None and cert.upper_bound() is None
    assert cert.positives_needed() == 114
    cert = C.certify([10] * 100, [0] * 100, target=0.02, delta=0.1, method="bonferroni")
    assert cert.positives_needed() == C.min_exited_positives(0.02, 0.001)


@pytest.mark.parametrize("delta", [0, -0.1, 0.6, float("nan"), "x"])
def test_bad_delta(delta) -> None:
    with pytest.raises(
        ConfigError, match=r"delta=.* (is outside the valid range \(0, 0.5\]|is not a number)"
    ):
        C.certify([100], [0], target=0.02, delta=delta)


@pytest.mark.parametrize("target", [0, 0.2, -1])
def test_bad_target(target) -> None:
    with pytest.raises(ConfigError, match=r"target_fnr_exit=.* outside the valid range \(0, 0.1\]"):
        C.check_target(target)


def test_unknown_method() -> None:
    with pytest.raises(
        ConfigError, match="unknown certification method 'magic'; allowed: split_fixed_sequence"
    ):
        C.certify([100], [0], target=0.02, delta=0.1, method="magic")


def test_matches_mapie_binary_classification_controller() -> None:
    """Same grid, same data: MAPIE 1.6's Holm-certified point and p-values equal ours."""
    import warnings

    mapie_rc = pytest.importorskip("mapie.risk_control")
    from stage1_pro.simulation import GaussianScoreModel

    data = GaussianScoreModel().sample(5000, np.random.default_rng(4))
    probs, y = data["probs"], data["label"]
    grid = np.linspace(0.95, 0.999, 25)
    risk = mapie_rc.BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: y_pred == 0,
        risk_condition=lambda y_true, y_pred: (y_true == 1) & ~np.isnan(y_pred),
        higher_is_better=False,
    )

    def predict(x: np.ndarray, t: float) -> np.ndarray:
        out = (x[:, 1] >= x[:, 0]).astype(float)
        out[x.max(axis=1) < t] = np.nan
        return out

    bcc = mapie_rc.BinaryClassificationController(
        predict_function=predict, risk=risk, target_level=0.02, confidence_level=0.9,
        best_predict_param_choice="abstention_rate", list_predict_params=grid[:, None],
        fwer_method="bonferroni_holm",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bcc.calibrate(probs, y)
    conf, pos = probs.max(axis=1), y == 1
    n = C.count_at_least(conf[pos], grid)
    k = C.count_at_least(conf[pos & (probs[:, 1] < probs[:, 0])], grid)
    cert = C.certify(
        n, k, target=0.02, delta=0.1, method="holm", coverage=C.count_at_least(conf, grid) / conf.size
    )
    np.testing.assert_allclose(np.ravel(bcc.p_values), cert.p_values, rtol=1e-9)
    assert cert.feasible and float(np.ravel(bcc.best_predict_param)[0]) == grid[cert.deployed]
