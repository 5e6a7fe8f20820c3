"""The exchangeability monitor's statistics: false-alarm rate, the sample-size statement, shifts.

Scores come from :class:`stage1_pro.simulation.GaussianScoreModel` through a certified softmax
policy (fitted once on an independent sample), so the exit score, p(positive) and exit flags are
what a bundle would produce. Rates over repeated draws are compared with their level allowing
3 Monte-Carlo standard errors; the long versions (``-m long``) use ten times more draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stage1_pro.errors import ConfigError, DataError
from stage1_pro.exchangeability import (
    DEFAULT_POWER,
    ExchangeabilityMonitor,
    detectable_shift,
    n_needed,
)
from stage1_pro.score_reference import score_arrays
from stage1_pro.scores import Scores
from stage1_pro.simulation import GaussianScoreModel

LEVEL = 0.05  # high enough that an anti-conservative test would show within these draws


@pytest.fixture(scope="module")
def policy():
    from stage1_pro.policies import create_policy

    rng = np.random.default_rng(123)
    parts = [GaussianScoreModel().sample(1500, rng) for _ in range(2)]
    scores = Scores(
        index=np.arange(3000),
        split=np.repeat(np.array(["val_select", "val_calib"]), 1500),
        label=np.concatenate([p["label"] for p in parts]),
        probs=np.concatenate([p["probs"] for p in parts]),
        gate_logit=np.concatenate([p["gate_logit"] for p in parts]),
    )
    return create_policy("softmax", target_fnr_exit=0.05, delta=0.1).fit(scores)


def outputs(policy, n: int, rng: np.random.Generator, decimals: int | None = None, **model) -> dict:
    sample = GaussianScoreModel(**model).sample(n, rng)
    probs = sample["probs"] if decimals is None else np.round(sample["probs"], decimals)
    return score_arrays(policy, probs, sample["gate_logit"])


def alarm_rate(policy, draws: int, n_ref: int, n_new: int, seed: int, **kwargs) -> float:
    rng = np.random.default_rng(seed)
    alarms = 0
    for _ in range(draws):
        ref, new = outputs(policy, n_ref, rng, **kwargs), outputs(policy, n_new, rng, **kwargs)
        monitor = ExchangeabilityMonitor(level=LEVEL).fit(ref["exit_score"], ref["p_positive"], ref["exited"])
        alarms += monitor.test(new["exit_score"], new["p_positive"], new["exited"]).drift
    return alarms / draws


def bound(level: float, draws: int) -> float:
    return level + 3 * math.sqrt(level * (1 - level) / draws)


@pytest.mark.parametrize("decimals", [None, 2], ids=["continuous", "tied-scores"])
def test_same_distribution_alarms_at_most_at_the_level(policy, decimals) -> None:
    """Reference and new drawn alike: the alarm rate stays <= level (+ 3 MC s.e.), ties included.

    Rounding to 2 decimals makes most scores tie (as saturated probabilities do): KS is then
    conservative, not anti-conservative.
    """
    draws = 400
    rate = alarm_rate(policy, draws, 600, 300, seed=1, decimals=decimals)
    assert rate <= bound(LEVEL, draws), rate


@pytest.mark.long
@pytest.mark.parametrize("decimals", [None, 2], ids=["continuous", "tied-scores"])
def test_same_distribution_alarms_at_most_at_the_level_long(policy, decimals) -> None:
    draws = 4000
    rate = alarm_rate(policy, draws, 1000, 400, seed=2, decimals=decimals)
    assert rate <= bound(LEVEL, draws), rate


def test_sample_size_statement_holds(policy) -> None:
    """A KS shift of exactly ``shift`` in the exit score, with ``n_needed`` new images: detected >= power.

    Exit scores uniform on [0.5, 1]; the new ones shifted by 0.05 (KS distance 0.1 = the stated
    shift). The statement is a DKW bound (sufficient), so the rate is expected well above it.
    """
    n_ref, shift, draws = 3000, 0.1, 200
    monitor_args = {"level": LEVEL, "shift": shift, "power": DEFAULT_POWER}
    rng = np.random.default_rng(3)
    detected = 0
    for _ in range(draws):
        ref_score = rng.uniform(0.5, 1.0, n_ref)
        monitor = ExchangeabilityMonitor(**monitor_args).fit(ref_score, np.full(n_ref, 0.5), ref_score > 0.9)
        m = monitor.n_needed()
        new_score = rng.uniform(0.5 + shift / 2, 1.0 + shift / 2, m)
        detected += monitor.test(new_score, np.full(m, 0.5), new_score > 0.9).drift
    assert m == n_needed(n_ref, shift, LEVEL / 3, DEFAULT_POWER)
    assert detected / draws >= DEFAULT_POWER - 3 * math.sqrt(DEFAULT_POWER * (1 - DEFAULT_POWER) / draws)


@pytest.mark.parametrize(
    ("shift", "expected_test"),
    [
        ({"prevalence": 0.6}, "p_positive"),  # class balance doubled: label shift
        ({"mu": 0.9}, "exit_score"),  # a blurrier world: less separable scores, fewer exits
    ],
    ids=["class-balance", "less-separable"],
)
def test_shifted_distribution_is_detected(policy, shift: dict, expected_test: str) -> None:
    draws = 50
    rng = np.random.default_rng(4)
    hits = {"any": 0, expected_test: 0}
    for _ in range(draws):
        ref, new = outputs(policy, 600, rng), outputs(policy, 300, rng, **shift)
        result = ExchangeabilityMonitor(level=0.01).fit(**ref).test(**new)
        hits["any"] += result.drift
        hits[expected_test] += next(t.drift for t in result.tests if t.name == expected_test)
    assert hits["any"] / draws >= 0.95 and hits[expected_test] / draws >= 0.9, hits


def test_sample_size_helpers() -> None:
    alpha, power = 0.01 / 3, 0.8
    assert n_needed(600, 0.1, alpha, power) is None  # the reference alone is too small for 0.1
    m = n_needed(3000, 0.1, alpha, power)
    assert detectable_shift(3000, m, alpha, power) <= 0.1 < detectable_shift(3000, m - 1, alpha, power)
    assert detectable_shift(3000, 10_000, alpha, power) < detectable_shift(3000, 1000, alpha, power)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": 0.0}, r"level=0.0 is outside \(0, 0.5\]"),
        ({"level": 0.7}, r"level=0.7 is outside \(0, 0.5\]"),
        ({"shift": 0}, r"shift=0 is outside \(0, 1\]"),
        ({"power": 1.0}, r"power=1.0 is outside \(0, 1\)"),
        ({"level": "0.1"}, r"level='0.1' is outside"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExchangeabilityMonitor(**kwargs).fit([0.9], [0.5], [True])


def test_bad_arrays() -> None:
    with pytest.raises(DataError, match=r"reference: no images to compare"):
        ExchangeabilityMonitor().fit([], [], [])
    with pytest.raises(DataError, match=r"one entry per image \(got 2, 1, 2\)"):
        ExchangeabilityMonitor().fit([0.9, 0.8], [0.5], [True, False])
    monitor = ExchangeabilityMonitor().fit([0.9, 0.8], [0.5, 0.4], [True, False])
    with pytest.raises(DataError, match=r"new images: p_positive must hold probabilities"):
        monitor.test([0.9], [1.5], [True])
    with pytest.raises(DataError, match=r"new images: exit_score and p_positive must be finite"):
        monitor.test([float("nan")], [0.5], [True])
    with pytest.raises(ValueError, match=r"not fitted"):
        ExchangeabilityMonitor().test([0.9], [0.5], [True])
