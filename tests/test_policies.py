"""Exit policies (stage1_pro.policies): fit / decide / serialise, and what each may learn from which split."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from stage1_pro.artifacts import read_artifact
from stage1_pro.certify import min_exited_positives
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.policies import (
    DEFER,
    POLICIES,
    GatePolicy,
    InfeasibleCertificateWarning,
    SCRCPolicy,
    SoftmaxThresholdPolicy,
    create_policy,
    get_policy_class,
    load_policy,
)
from stage1_pro.policies.base import DEFER_ALL_THRESHOLD, NotFittedError
from stage1_pro.policies.gate import apply_calibrator, fit_calibrator, platt_fit
from stage1_pro.policies.scrc import LAMBDA2_GRID, crc_lambda2, dkw_epsilon, exit_rule, pareto_front
from stage1_pro.scores import Scores
from stage1_pro.simulation import POLICY_VARIANTS, GaussianScoreModel, make_scores

MODEL = GaussianScoreModel()
CONFIGS = [
    *POLICY_VARIANTS,
    ("scrc", {"selection_score": "max_prob"}),
    ("scrc", {"variant": "SCRC-I", "selection_score": "margin"}),
]


@pytest.fixture(scope="module")
def scores() -> Scores:
    return make_scores(MODEL, 4000, 4000, np.random.default_rng(0), n_test=2000)


def _replace(scores: Scores, split: str, **arrays) -> Scores:
    """The same scores with some arrays of one split replaced."""
    out = {k: getattr(scores, k).copy() for k in ("index", "split", "label", "probs", "gate_logit")}
    mask = scores.split == split
    for key, value in arrays.items():
        out[key][mask] = value
    return Scores(**out)


def test_registry() -> None:
    assert list(POLICIES) == ["softmax", "gate", "scrc"]
    assert get_policy_class("gate") is GatePolicy
    assert isinstance(create_policy("scrc", variant="SCRC-T"), SCRCPolicy)
    with pytest.raises(ConfigError, match="unknown exit policy 'svm'; allowed: softmax, gate, scrc"):
        create_policy("svm")
    with pytest.raises(ConfigError, match=r"allowed parameters: .*calibrator"):
        create_policy("gate", calibration="platt")


def test_constructor_only_stores_parameters() -> None:
    p = SoftmaxThresholdPolicy(delta=7)  # validated in fit, scikit-learn style
    assert p.get_params() == {
        "target_fnr_exit": 0.02,
        "delta": 7,
        "method": None,
        "grid_size": 200,
        "max_fpr_exit": 0.25,
    }
    assert not hasattr(p, "feasible_")
    with pytest.raises(NotFittedError, match="not fitted"):
        p.decide(np.array([[0.1, 0.9]]))


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_fit_decide_round_trip(scores: Scores, tmp_path, name: str, params: dict) -> None:
    policy = create_policy(name, **params).fit(scores)
    assert policy.feasible_
    cert = policy.certificate_
    assert cert["upper_bound"] <= 0.02 and cert["p_value"] <= cert["test_level"] <= 0.1
    assert cert["fpr_upper_bound"] <= 0.25 and cert["fpr_p_value"] <= cert["test_level"]
    assert cert["n"] >= 114 and cert["order_learned_on"] == "val_select"
    assert cert["max_fpr_exit"] == policy.max_fpr_exit == 0.25
    calib = scores.subset("val_calib")
    # SCRC-T decides per batch; the certificate is about the deployed path point's fixed rule
    decide = policy.point_rule() if name == "scrc" else policy.decide
    d = decide(calib.probs, calib.gate_logit)
    assert d.dtype == np.int8 and set(np.unique(d)) <= {-1, 0, 1}
    # the certificate's counts are the deployed rule's exits on val_calib
    pos = calib.label == 1
    assert cert["n"] == int(((d != DEFER) & pos).sum()) and cert["k"] == int(((d == 0) & pos).sum())
    assert cert["n_exited_negatives"] == int(((d != DEFER) & ~pos).sum())
    assert cert["n_false_positives"] == int(((d == 1) & ~pos).sum())
    assert policy.val_calib_metrics_["coverage"] == pytest.approx((d != DEFER).mean())
    # exits always carry the argmax class
    exited = d != DEFER
    np.testing.assert_array_equal(d[exited], (calib.probs[exited, 1] >= calib.probs[exited, 0]).astype(int))
    # through the validated artifact I/O
    path = tmp_path / f"{policy.artifact_kind}.json"
    written = policy.save(str(path))
    assert read_artifact(str(path))["artifact"] == policy.artifact_kind == written["artifact"]
    loaded = load_policy(str(path))
    assert type(loaded) is type(policy)
    test = scores.subset("test")
    np.testing.assert_array_equal(
        loaded.decide(test.probs, test.gate_logit), policy.decide(test.probs, test.gate_logit)
    )
    assert loaded.to_dict()["certificate"] == policy.to_dict()["certificate"]
    assert "certified" in policy.summary() and "n=" in policy.summary()


def test_softmax_decides_by_threshold() -> None:
    p = SoftmaxThresholdPolicy.from_dict(
        {
            "policy": "softmax",
            "exit_threshold": 0.9,
            "feasible": True,
            "target_fnr_exit": 0.02,
            "max_fpr_exit": 0.25,
            "delta": 0.1,
            "certificate": {"procedure": "holm", "grid": [0.9], "n_calib": 10},
            "val_calib_metrics": {},
        }
    )
    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.05, 0.95], [0.1, 0.9], [0.2, 0.8]])
    np.testing.assert_array_equal(p.decide(probs), [0, -1, 1, 1, -1])
    with pytest.raises(DataError, match=r"probs: expected shape \(n, 2\)"):
        p.decide(np.ones((3, 3)) / 3)
    with pytest.raises(DataError, match="finite probabilities"):
        p.decide(np.array([[np.nan, 1.0]]))


@pytest.mark.filterwarnings("ignore::stage1_pro.policies.InfeasibleCertificateWarning")
def test_grid_and_order_depend_on_val_select_only(scores: Scores) -> None:
    base = create_policy("gate").fit(scores)
    # scramble every val_calib label: the calibrator, the grid and the order cannot move
    calib = scores.subset("val_calib")
    flipped = _replace(scores, "val_calib", label=1 - calib.label)
    other = create_policy("gate").fit(flipped)
    assert other.calibrator_params_ == base.calibrator_params_
    np.testing.assert_array_equal(other.grid_, base.grid_)
    np.testing.assert_array_equal(other.select_counts_.exited_positives, base.select_counts_.exited_positives)
    assert other.certification_.order.start == base.certification_.order.start
    np.testing.assert_array_equal(
        other.certification_.order.pass_probability, base.certification_.order.pass_probability
    )
    # ... while changing val_select moves them
    sel = scores.subset("val_select")
    moved = create_policy("gate").fit(_replace(scores, "val_select", gate_logit=sel.gate_logit * 2 + 1))
    assert moved.calibrator_params_ != base.calibrator_params_


def test_infeasible_policy_defers_everything(tmp_path) -> None:
    small = make_scores(MODEL, 300, 300, np.random.default_rng(3))
    n_select_pos = int(small.subset("val_select").label.sum())
    n_calib_pos = int(small.subset("val_calib").label.sum())
    needed = min_exited_positives(0.02, 0.1 / 200)  # the label-free fallback tests at delta/m
    for name in POLICIES:
        with pytest.warns(InfeasibleCertificateWarning) as rec:
            policy = create_policy(name).fit(small)
        message = str(rec[0].message)
        # both binding causes are named: a starved val_select and too few positives in val_calib
        assert f"val_select holds {n_select_pos} positives, fewer than the 114" in message
        assert f"val_calib holds {n_calib_pos} positives, fewer than the" in message
        assert "defers every image (feasible: false)" in message
        assert policy.certificate_["notes"] == message
        assert not policy.feasible_
        cert = policy.certificate_
        assert cert["upper_bound"] is None and cert["fpr_upper_bound"] is None and not cert["feasible"]
        if name != "scrc":  # SCRC's path is shorter than the grid, hence a smaller delta/m
            assert cert["positives_needed"] == needed
        d = policy.decide(small.probs, small.gate_logit)
        assert (d == DEFER).all()
        written = policy.save(str(tmp_path / f"{policy.artifact_kind}.json"))
        assert written["feasible"] is False and written["coverage"] == 0.0
        if name == "softmax":
            assert written["exit_threshold"] == DEFER_ALL_THRESHOLD
        if name == "gate":
            assert written["gate_threshold"] == DEFER_ALL_THRESHOLD
        loaded = load_policy(str(tmp_path / f"{policy.artifact_kind}.json"))
        assert (loaded.decide(small.probs, small.gate_logit) == DEFER).all()


def test_empty_val_select(scores: Scores) -> None:
    no_select = Scores(*(getattr(scores, k)[scores.split != "val_select"] for k in ("index", "split", "label",
                       "probs", "gate_logit")), source="s.npz")  # fmt: skip
    with pytest.raises(DataError, match=r"s.npz: key 'split': no rows of split 'val_select'"):
        create_policy("softmax").fit(no_select)


def test_no_positives_in_val_calib(scores: Scores) -> None:
    calib = scores.subset("val_calib")
    none = _replace(scores, "val_calib", label=np.zeros(len(calib), dtype=int))
    with pytest.raises(DataError, match="val_calib holds no positives"):
        create_policy("softmax").fit(none)


def test_gate_needs_gate_logits(scores: Scores) -> None:
    no_gate = Scores(scores.index, scores.split, scores.label, scores.probs, None, source="s.npz")
    with pytest.raises(DataError, match=r"s.npz: no 'gate_logit' array: the gate policy needs .* phase >= 3"):
        create_policy("gate").fit(no_gate)
    with pytest.raises(DataError, match=r"s\.npz: no 'gate_logit' array: SCRC selects on the gate"):
        create_policy("scrc").fit(no_gate)
    assert create_policy("scrc", selection_score="max_prob").fit(no_gate).feasible_
    fitted = create_policy("gate").fit(scores)
    with pytest.raises(DataError, match="gate_logit: this policy needs the gate head"):
        fitted.decide(scores.probs)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("softmax", {"delta": 0.7}, r"delta=0.7 is outside the valid range \(0, 0.5\]"),
        ("softmax", {"target_fnr_exit": 0.5}, r"target_fnr_exit=0.5 is outside"),
        ("softmax", {"method": "magic"}, "unknown certification method 'magic'"),
        ("softmax", {"grid_size": 1}, "grid_size=1 must be an integer >= 2"),
        ("gate", {"calibrator": "beta"}, "unknown gate calibrator 'beta'; allowed: platt, isotonic"),
        ("scrc", {"variant": "SCRC-X"}, "unknown SCRC variant 'SCRC-X'; allowed: pareto, SCRC-I, SCRC-T"),
        ("scrc", {"selection_score": "entropy"}, "unknown selection score 'entropy'"),
        ("softmax", {"max_fpr_exit": 0.0}, r"max_fpr_exit=0.0 is outside the valid range \(0, 1\]"),
    ],
)
def test_bad_parameters(scores: Scores, name: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_policy(name, **params).fit(scores)


def test_every_method_is_selectable(scores: Scores) -> None:
    for method in (
        "split_fallback_sequence",
        "split_fixed_sequence",
        "fallback_sequence",
        "sgr_binary_search",
        "multistart_fixed_sequence",
        "holm",
        "bonferroni",
    ):
        p = create_policy("softmax", method=method).fit(scores)
        assert p.certificate_["procedure"] == method
        assert p.feasible_ and p.certificate_["upper_bound"] <= 0.02
    with pytest.warns(InfeasibleCertificateWarning):
        textbook = create_policy("softmax", method="fixed_sequence").fit(scores)
    assert not textbook.feasible_  # strictest-first fixed sequence certifies nothing


# ----------------------------------------------------------------------------- calibrators


def test_platt_matches_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=3000)
    y = rng.random(3000) < 1 / (1 + np.exp(-(1.5 * x - 0.3)))
    a, b = platt_fit(x, y, smooth=False)
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y)
    assert a == pytest.approx(lr.coef_[0, 0], rel=1e-4) and b == pytest.approx(lr.intercept_[0], abs=1e-4)
    # separable data stays finite with Platt's targets
    a, b = platt_fit(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))
    assert np.isfinite([a, b]).all() and a > 0


def test_isotonic_calibrator_matches_sklearn() -> None:
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    y = rng.random(500) < 1 / (1 + np.exp(-2 * x))
    params = fit_calibrator("isotonic", x, y)
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(x, y)
    grid = np.linspace(-4, 4, 101)
    np.testing.assert_allclose(apply_calibrator("isotonic", params, grid), iso.predict(grid))
    with pytest.raises(DataError, match="always correct"):
        fit_calibrator("platt", x, np.ones(500, bool))


# ----------------------------------------------------------------------------- SCRC pieces


def test_dkw_epsilon() -> None:
    assert dkw_epsilon(1000, 0.05) == pytest.approx(np.sqrt(np.log(20) / 2000))
    assert dkw_epsilon(0, 0.05) == np.inf


def test_crc_count_rule_no_off_by_one() -> None:
    # budget (n + 1) * alpha * xi = 3 exactly: errors + 1 <= 3 allows 2 errors, not 3
    p1 = np.array([0.05, 0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    lam2 = crc_lambda2(p1, 3.0)
    errors = int((p1 < 1 - lam2).sum())
    assert errors == 2
    # the smallest such lambda2 on the grid: one grid step less would allow 3 errors
    j = int(np.searchsorted(LAMBDA2_GRID, lam2))
    assert int((p1 < 1 - LAMBDA2_GRID[j - 1]).sum()) == 3
    # budget 2.999: only 1 error
    assert int((p1 < 1 - crc_lambda2(p1, 2.999)).sum()) == 1
    # budget < 1: even lambda2 = 1 (no error) fails
    assert crc_lambda2(p1, 0.9) is None


def test_scrc_exit_rule_by_hand() -> None:
    probs = np.array([[0.02, 0.98], [0.97, 0.03], [0.4, 0.6], [0.01, 0.99]])
    g = np.array([0.9, 0.9, 0.9, 0.1])
    # lambda1 0.2: selected iff g >= 0.8; lambda2 0.95: C = {k : p_k >= 0.05} -> singleton iff max p > 0.95
    np.testing.assert_array_equal(exit_rule(probs, g, 0.2, 0.95), [1, 0, -1, -1])
    # lambda2 0.3 < 0.5: C = {k : p_k >= 0.7}: {1}, {0}, empty -> defer
    np.testing.assert_array_equal(exit_rule(probs, g, 1.0, 0.3), [1, 0, -1, 1])


def test_scrc_i_path_uses_dkw_margin(scores: Scores) -> None:
    p = create_policy("scrc", variant="SCRC-I", selection_score="max_prob").fit(scores)
    fit = p.scrc_fit_
    assert fit["delta_dkw"] == pytest.approx(0.05)
    assert fit["dkw_epsilon"] == pytest.approx(dkw_epsilon(4000, 0.05))
    sel = scores.subset("val_select")
    g = sel.probs.max(axis=1)
    for point in p.path_[:: max(1, len(p.path_) // 10)]:
        rate = np.mean(g >= 1 - point["lambda1"])
        assert rate >= point["xi"] + fit["dkw_epsilon"] - 1e-9  # empirical rate >= xi + eps
    xis = [q["xi"] for q in p.path_]
    assert xis == sorted(xis) and p.xi_ in xis


def test_scrc_t_decides_per_batch_within_the_certified_points(scores: Scores) -> None:
    p = create_policy("scrc", variant="SCRC-T", selection_score="max_prob").fit(scores)
    assert p.calib_selection_scores_.size == 4000
    certified = {(q["lambda1"], q["lambda2"]) for q in p.certified_path_}
    test = scores.subset("test")
    rng = np.random.default_rng(0)
    g = test.probs.max(axis=1)
    for size in (1, 10, 500):
        idx = rng.choice(len(test), size, replace=False)
        point = p._batch_point(g[idx])
        assert (point["lambda1"], point["lambda2"]) in certified
        np.testing.assert_array_equal(
            p.decide(test.probs[idx]), exit_rule(test.probs[idx], g[idx], point["lambda1"], point["lambda2"])
        )
    # a batch of very confident images asks for a stricter threshold than one of unsure images
    sure = p._batch_point(np.full(2000, 0.9999))
    unsure = p._batch_point(np.full(2000, 0.55))
    assert sure["lambda1"] <= unsure["lambda1"]


def test_scrc_t_one_image_decision_depends_on_its_batch(scores: Scores) -> None:
    """The stated batch dependence of SCRC-T: the same image exits in one batch and defers in another,
    while SCRC-I and the default (pareto) decide each image alone."""
    p = create_policy("scrc", variant="SCRC-T").fit(scores)  # selects on the gate
    test = scores.subset("test")
    g = p.selection(test.probs, test.gate_logit)
    order = np.argsort(g)
    sure, unsure = order[-500:], order[:500]  # the quarters of the test images the gate likes most / least
    strict, loose = p._batch_point(g[sure]), p._batch_point(g[unsure])
    assert strict["lambda1"] < loose["lambda1"]
    # an image the loose batch's point exits and the strict batch's point defers
    exits_loose = exit_rule(test.probs, g, loose["lambda1"], loose["lambda2"]) != DEFER
    exits_strict = exit_rule(test.probs, g, strict["lambda1"], strict["lambda2"]) != DEFER
    image = int(np.nonzero(exits_loose & ~exits_strict)[0][0])
    in_sure, in_unsure = np.r_[image, sure[:-1]], np.r_[image, unsure[:-1]]
    assert p._batch_point(g[in_sure]) == strict and p._batch_point(g[in_unsure]) == loose
    assert p.decide(test.probs[in_sure], test.gate_logit[in_sure])[0] == DEFER
    assert p.decide(test.probs[in_unsure], test.gate_logit[in_unsure])[0] != DEFER
    for variant in ("pareto", "SCRC-I"):
        q = create_policy("scrc", variant=variant).fit(scores)
        alone = q.decide(test.probs[[image]], test.gate_logit[[image]])[0]
        for batch in (in_sure, in_unsure):
            assert q.decide(test.probs[batch], test.gate_logit[batch])[0] == alone


def test_pareto_front_by_hand() -> None:
    cov = np.array([0.1, 0.2, 0.2, 0.5, 0.4, 0.9, 0.9])
    risk = np.array([0.5, 0.3, 0.6, 0.8, 0.9, 2.0, 1.5])
    # 0 is beaten by 1 (more coverage, less risk); 2 by 1; 4 by 3; 5 by 6
    np.testing.assert_array_equal(pareto_front(cov, risk), [1, 3, 6])


def test_pareto_scrc_is_two_dimensional(scores: Scores) -> None:
    """The default SCRC path holds rules where the gate binds, rules where the class set binds and
    rules where both do; each deferred image was vetoed by one of the two thresholds."""
    p = create_policy("scrc").fit(scores)
    assert p.feasible_ and p.certificate_["grid_rule"].startswith("Pareto front on val_select")
    assert p.scrc_fit_["candidates"] > len(p.path_) == p.scrc_fit_["front_size"]
    lam1 = np.array([q["lambda1"] for q in p.path_])
    lam2 = np.array([q["lambda2"] for q in p.path_])
    gate_binds, set_binds = lam1 < 1.0, lam2 < 0.5
    assert (gate_binds & set_binds).any()
    assert np.unique(lam1).size > 1 and np.unique(lam2).size > 1
    xi = [q["xi"] for q in p.path_]
    assert xi == sorted(xi)  # strictest (least val_select coverage) first
    test = scores.subset("test")
    d = p.decide(test.probs, test.gate_logit)
    g = p.selection(test.probs, test.gate_logit)
    selected, singleton = g >= 1 - p.lambda1_, test.probs.max(axis=1) >= 1 - p.lambda2_
    np.testing.assert_array_equal(d != DEFER, selected & singleton)
    # every path point was built from val_select: scrambling val_calib's labels leaves the path alone
    flipped = _replace(scores, "val_calib", label=1 - scores.subset("val_calib").label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InfeasibleCertificateWarning)
        assert create_policy("scrc").fit(flipped).path_ == p.path_
    # a fixed path point's rule does not depend on the batch
    np.testing.assert_array_equal(p.point_rule()(test.probs, test.gate_logit), d)


def test_no_silent_warnings(scores: Scores) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, params in CONFIGS:
            create_policy(name, **params).fit(scores)


def test_from_dict_rejects_incomplete_scrc_t(scores: Scores) -> None:
    d = create_policy("scrc", variant="SCRC-T").fit(scores).to_dict()
    del d["calib_selection_scores"]
    with pytest.raises(ArtifactError, match="SCRC-T needs 'calib_selection_scores'"):
        SCRCPolicy.from_dict(d)


def test_a_policy_file_from_before_the_guard_reads_as_no_guard(scores: Scores, tmp_path) -> None:
    """Files published before the guard existed (a champion's) stay readable: they certified FNR_exit
    only, so they read as max_fpr_exit 1; re-certifying them (stage1_pro.champion) applies the guard."""
    import json

    from stage1_pro.champion import recertify

    policy = create_policy("softmax").fit(scores)
    old = policy.to_dict()
    del old["max_fpr_exit"]
    for key in ("max_fpr_exit", "n_exited_negatives", "n_false_positives", "fpr_p_value", "fpr_upper_bound"):
        del old["certificate"][key]
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"artifact": "thresholds", "schema_version": "1.0", **old}))
    loaded = load_policy(str(path))  # schema-valid without the guard's fields
    assert loaded.max_fpr_exit == 1.0
    test = scores.subset("test")
    np.testing.assert_array_equal(loaded.decide(test.probs), policy.decide(test.probs))
    again = recertify(read_artifact(str(path)), scores, target_fnr_exit=0.02, delta=0.1, max_fpr_exit=0.25)
    assert again.max_fpr_exit == 0.25 and again.certificate_["fpr_upper_bound"] <= 0.25
