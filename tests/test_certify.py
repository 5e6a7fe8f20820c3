"""Certification core (stage1_pro.certify): p-values, grids, counts and family-wise procedures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from stage1_pro import certify as C  # noqa: N812
from stage1_pro.errors import ConfigError
from stage1_pro.metrics import clopper_pearson_upper


def counts(n, k, *, neg=None, fp=None, cov=None, n_images=None, n_positives=None) -> C.GridCounts:
    """GridCounts for hand cases: by default every point also exits 1,000 negatives, none called positive."""
    n = np.asarray(n)
    neg = np.full(n.shape, 1000) if neg is None else np.asarray(neg)
    return C.GridCounts(
        exited_positives=n,
        misses=k,
        exited_negatives=neg,
        false_alarms=np.zeros(n.shape, int) if fp is None else fp,
        coverage=np.arange(n.size) / n.size if cov is None else cov,
        n_images=10_000 if n_images is None else n_images,
        n_positives=int(n.max()) if n_positives is None else n_positives,
    )


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
    # a bound of 1 (the guard disabled) makes the null empty: p = 0
    assert C.binomial_p_values(np.array([3, 0]), np.array([3, 0]), 1.0).tolist() == [0.0, 0.0]


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


def order(start: int, m: int, informative: bool = True) -> C.LearnedOrder:
    return C.LearnedOrder(start, informative, np.zeros(m), "hand-made")


def test_split_fixed_sequence_starts_at_the_learned_start() -> None:
    lv = C.split_fixed_sequence(P, 0.1, order=order(2, P.size))
    # starts at index 2, passes 2, 3, 4, stops at 5 (0.2 > 0.1); index 6 is never reached
    np.testing.assert_array_equal(~np.isnan(lv), [0, 0, 1, 1, 1, 0, 0])
    assert np.nanmax(lv) == 0.1
    with pytest.raises(ValueError, match="val_select"):
        C.split_fixed_sequence(P, 0.1)


def test_fallback_sequence_carries_the_level_of_a_certified_point() -> None:
    """Wiens' fallback procedure by hand: point j at delta*w_j plus the level of a certified j - 1."""
    p = np.array([0.5, 0.015, 0.03, 0.045, 0.2, 0.005, 0.04])
    lv = C.fallback_sequence(p, 0.1)  # even weights: 0.1/7 = 0.0143 each
    # 0: fails; 1: 0.015 > 0.0143 fails; 2: 0.03 > 0.0143 fails; ...; 5: 0.005 passes at 0.0143;
    # 6: 0.04 > 0.0143 + 0.0143 fails
    np.testing.assert_array_equal(~np.isnan(lv), [0, 0, 0, 0, 0, 1, 0])
    w = np.array([0.0, 0.5, 0.0, 0.2, 0.1, 0.1, 0.1])
    lv = C.fallback_sequence(p, 0.1, weights=w)
    # 1 at 0.05 (passes), 2 at 0.05 + 0 (passes), 3 at 0.05 + 0.02 (passes), 4 at 0.07 + 0.01: 0.2 fails,
    # 5 at 0.01 (passes), 6 at 0.01 + 0.01 = 0.02: 0.04 fails
    np.testing.assert_array_equal(~np.isnan(lv), [0, 1, 1, 1, 0, 1, 0])
    np.testing.assert_allclose(lv[[1, 2, 3, 5]], [0.05, 0.05, 0.07, 0.01])


def test_fallback_sequence_certifies_whenever_holm_does() -> None:
    """Every point is tested at >= delta/m, Holm's first level: the starved default cannot do worse."""
    rng = np.random.default_rng(3)
    for _ in range(2000):
        p = rng.beta(0.3, 3.0, size=int(rng.integers(1, 60)))
        if (~np.isnan(C.holm(p, 0.1))).any():
            assert (~np.isnan(C.fallback_sequence(p, 0.1))).any()


@pytest.mark.parametrize("weights", ["even", "start"])
def test_fallback_sequence_controls_the_family_wise_error(weights: str) -> None:
    """Strong FWER control: some true nulls (uniform p-values), some false; P(any true null certified)
    <= delta + 3 Monte-Carlo s.e. over 4,000 draws."""
    rng = np.random.default_rng(5)
    m, delta, draws = 30, 0.1, 4000
    null = np.zeros(m, bool)
    null[[0, 1, 2, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]] = True  # strict and loose ends are null
    w = C.fallback_weights(m, order(20, m, informative=weights == "start"))
    errors = 0
    for _ in range(draws):
        p = np.where(null, rng.random(m), rng.beta(0.05, 5.0, m))
        errors += bool((~np.isnan(C.fallback_sequence(p, delta, weights=w)) & null).any())
    assert errors / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert errors > 0  # not vacuous: the null at the learned start is reached


def test_fallback_weights() -> None:
    even = C.fallback_weights(10, None)
    np.testing.assert_allclose(even, 0.1)
    np.testing.assert_allclose(C.fallback_weights(10, order(4, 10, informative=False)), even)
    w = C.fallback_weights(10, order(4, 10))
    assert w.sum() == pytest.approx(1.0)
    assert w[4] == pytest.approx(C.LEARNED_START_SHARE + (1 - C.LEARNED_START_SHARE) / 10)
    np.testing.assert_allclose(np.delete(w, 4), (1 - C.LEARNED_START_SHARE) / 10)


def test_learn_order_informative_only_with_enough_positives() -> None:
    n = np.array([100, 600, 1200, 1800])
    k = np.array([0, 2, 10, 60])
    needed = C.min_exited_positives(0.02, 0.1)
    rich = C.learn_order(
        counts(n, k, n_positives=2000), target=0.02, delta=0.1, max_fpr=0.25, calib_size=10_000
    )
    assert rich.informative and rich.start == int(np.argmax(rich.pass_probability)) == 1
    starved = C.learn_order(
        counts(n // 20, k // 20, n_positives=needed - 1),
        target=0.02,
        delta=0.1,
        max_fpr=0.25,
        calib_size=10_000,
    )
    assert not starved.informative
    assert f"val_select holds {needed - 1} positives, fewer than the {needed}" in starved.reason
    # no positive at all: nothing predicted to pass, and too few positives
    empty = C.learn_order(counts([0, 0], [0, 0], n_positives=0), target=0.02, delta=0.1, max_fpr=0.25,
                          calib_size=10_000)  # fmt: skip
    assert not empty.informative and (empty.pass_probability == 0).all()
    # the guard enters the prediction: a point whose val_select negatives are all false alarms cannot pass
    guarded = C.learn_order(
        counts(n, k, fp=np.array([0, 1000, 0, 0]), n_positives=2000),
        target=0.02, delta=0.1, max_fpr=0.25, calib_size=10_000,
    )  # fmt: skip
    assert guarded.pass_probability[1] == 0.0 and guarded.start == 2


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
    cert = C.certify(counts(n, k, cov=cov), target=0.02, delta=0.1, method="holm")
    p = C.binomial_p_values(k, n, 0.02)
    assert cert.p_values == pytest.approx(p) and cert.fnr_p_values == pytest.approx(p)
    # Holm: 0.0131 <= 0.1/5, 0.0176 <= 0.1/4, then 0.0443 > 0.1/3 stops
    assert cert.certified.tolist() == [False, True, True, False, False]
    assert cert.deployed == 2 and cert.feasible and cert.n_certified == 2
    assert cert.levels[2] == pytest.approx(0.02)
    ub = cert.upper_bound()
    assert ub == pytest.approx(clopper_pearson_upper(2, 400, 0.02)) and ub <= 0.02
    assert cert.fpr_upper_bound() == pytest.approx(clopper_pearson_upper(0, 1000, 0.02))
    # same grid, the default procedure with val_select counts: learned start at 1 (most likely to
    # pass: 200 positives, no miss), LEARNED_START_SHARE of delta there
    cert = C.certify(counts(n, k, cov=cov), target=0.02, delta=0.1, select=counts(n, k, cov=cov))
    assert cert.method == C.DEFAULT_PROCEDURE == "split_fallback_sequence"
    assert cert.order.informative and cert.order.start == 1
    # 0 fails at 0.0004; 1 at 0.0984 passes (0.0176), 2 and 3 carry it (0.0131, 0.0443), 4 fails (0.55)
    assert cert.certified.tolist() == [False, True, True, True, False]
    assert cert.deployed == 3 and cert.upper_bound() <= 0.02


def test_joint_certificate_is_an_intersection_union_test() -> None:
    """A point is certified only when both its FNR_exit and its FPR_exit p-values pass."""
    n = np.array([300, 600, 900])
    k = np.zeros(3, int)
    neg = np.array([500, 1000, 1500])
    fp = np.array([50, 200, 600])  # FPR_exit 0.1, 0.2, 0.4
    cert = C.certify(counts(n, k, neg=neg, fp=fp), target=0.02, delta=0.1, method="bonferroni")
    q = C.binomial_p_values(fp, neg, 0.25)
    np.testing.assert_allclose(cert.fpr_p_values, q)
    np.testing.assert_allclose(cert.p_values, np.maximum(cert.fnr_p_values, q))
    # FNR passes everywhere; the guard fails at the loosest point (0.4 > 0.25), which is not deployed
    assert (cert.fnr_p_values <= 0.1 / 3).all() and cert.certified.tolist() == [True, True, False]
    assert cert.deployed == 1 and cert.fpr_upper_bound() <= 0.25
    # max_fpr 1 disables the guard: the loosest point certifies
    assert C.certify(counts(n, k, neg=neg, fp=fp), target=0.02, delta=0.1, max_fpr=1.0,
                     method="bonferroni").deployed == 2  # fmt: skip
    with pytest.raises(ConfigError, match=r"max_fpr_exit=1.5 is outside the valid range \(0, 1\]"):
        C.certify(counts(n, k), target=0.02, delta=0.1, max_fpr=1.5)


def test_infeasible_certification_and_positives_needed() -> None:
    cert = C.certify(counts([10, 20], [0, 0]), target=0.02, delta=0.1, method="fixed_sequence")
    assert not cert.feasible and cert.deployed is None and cert.upper_bound() is None
    assert cert.fpr_upper_bound() is None
    assert cert.positives_needed() == 114
    cert = C.certify(counts([10] * 100, [0] * 100), target=0.02, delta=0.1, method="bonferroni")
    assert cert.positives_needed() == C.min_exited_positives(0.02, 0.001)


def test_infeasible_cause_names_the_binding_cause() -> None:
    # too few positives in val_calib
    cert = C.certify(counts([10, 20], [0, 0], n_positives=20), target=0.02, delta=0.1, method="holm")
    assert "val_calib holds 20 positives, fewer than the" in cert.infeasible_cause()
    # the guard: FNR would pass everywhere, every such point calls too many negatives positive
    cert = C.certify(counts([500, 900], [0, 0], neg=[100, 200], fp=[90, 190]), target=0.02, delta=0.1,
                     method="holm")  # fmt: skip
    assert "the FPR_exit guard failed" in cert.infeasible_cause() and "90 of 100" in cert.infeasible_cause()
    # a starved val_select: the label-free fallback, and why
    n, k = np.array([300, 400]), np.array([3, 4])
    cert = C.certify(counts(n, k), target=0.02, delta=0.1, select=counts([3, 4], [0, 0], n_positives=5))
    assert not cert.order.informative and not cert.feasible
    cause = cert.infeasible_cause()
    assert "val_select holds 5 positives, fewer than the 114" in cause and "label-free fallback" in cause
    # an informative val_select whose start fails on val_calib
    cert = C.certify(counts(n, np.array([30, 40])), target=0.02, delta=0.1, select=counts(n, [0, 0]))
    assert (
        cert.order.informative and "the start learned on val_select (grid point 1" in cert.infeasible_cause()
    )
    assert "the model misses too many positives" in cert.infeasible_cause()


@pytest.mark.parametrize("delta", [0, -0.1, 0.6, float("nan"), "x"])
def test_bad_delta(delta) -> None:
    with pytest.raises(
        ConfigError, match=r"delta=.* (is outside the valid range \(0, 0.5\]|is not a number)"
    ):
        C.certify(counts([100], [0]), target=0.02, delta=delta)


@pytest.mark.parametrize("target", [0, 0.2, -1])
def test_bad_target(target) -> None:
    with pytest.raises(ConfigError, match=r"target_fnr_exit=.* outside the valid range \(0, 0.1\]"):
        C.check_target(target)


def test_unknown_method() -> None:
    with pytest.raises(
        ConfigError, match="unknown certification method 'magic'; allowed: split_fallback_sequence"
    ):
        C.certify(counts([100], [0]), target=0.02, delta=0.1, method="magic")


def test_matches_mapie_binary_classification_controller() -> None:
    """Same grid, same data: MAPIE 1.6's Holm-certified point and p-values equal ours."""
    import warnings

    pytest.importorskip("mapie.risk_control")
    from stage1_pro.simulation import GaussianScoreModel, mapie_fnr_controller

    data = GaussianScoreModel().sample(5000, np.random.default_rng(4))
    probs, y = data["probs"], data["label"]
    grid = np.linspace(0.95, 0.999, 25)
    bcc = mapie_fnr_controller(grid, target=0.02, delta=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bcc.calibrate(probs, y)
    grid_counts = C.threshold_counts(probs.max(axis=1), y, (probs[:, 1] >= probs[:, 0]).astype(int), grid)
    # MAPIE controls FNR_exit only: the guard is off (max_fpr 1)
    cert = C.certify(grid_counts, target=0.02, delta=0.1, max_fpr=1.0, method="holm")
    np.testing.assert_allclose(np.ravel(bcc.p_values), cert.p_values, rtol=1e-9)
    assert cert.feasible and float(np.ravel(bcc.best_predict_param)[0]) == grid[cert.deployed]
