"""Tests of the scores.npz contract (stage1_pro.scores)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from stage1_pro.errors import DataError
from stage1_pro.scores import SCORE_SPLITS, Scores, load_scores, save_scores


def _arrays(n: int = 12, gate: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p1 = rng.uniform(size=n)
    return {
        "index": np.arange(100, 100 + n),
        "split": np.array([SCORE_SPLITS[i % 3] for i in range(n)]),
        "label": rng.integers(0, 2, size=n),
        "probs": np.stack([1 - p1, p1], axis=1).astype(np.float32),
        "gate_logit": rng.normal(size=n) if gate else None,
    }


def _write_raw(path, **arrays) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_round_trip(tmp_path):
    a = _arrays()
    uri = str(tmp_path / "scores.npz")
    save_scores(uri, **a)
    s = load_scores(uri)
    np.testing.assert_array_equal(s.index, a["index"])
    np.testing.assert_array_equal(s.split, a["split"])
    np.testing.assert_array_equal(s.label, a["label"])
    np.testing.assert_allclose(s.probs, a["probs"])
    np.testing.assert_allclose(s.gate_logit, a["gate_logit"])
    assert s.has_gate and len(s) == 12 and s.splits == SCORE_SPLITS
    assert s.probs.dtype == np.float64 and s.label.dtype == np.int64


def test_without_gate_and_scalar_split(tmp_path):
    a = _arrays(gate=False)
    a["split"] = "val_calib"
    uri = str(tmp_path / "s.npz")
    save_scores(uri, **a)
    s = load_scores(uri)
    assert not s.has_gate and s.gate_logit is None
    assert s.splits == ("val_calib",)


def test_subset(tmp_path):
    s = Scores(**_arrays(n=9))
    sub = s.subset("val_calib")
    assert len(sub) == 3 and set(sub.split) == {"val_calib"}
    np.testing.assert_array_equal(sub.index, [101, 104, 107])
    assert sub.gate_logit.shape == (3,)
    with pytest.raises(DataError, match="unknown split 'train'"):
        s.subset("train")
    only_test = Scores(**{**_arrays(n=4), "split": "test"})
    with pytest.raises(DataError, match="no rows of split 'val_calib'"):
        only_test.subset("val_calib")


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"probs": np.array([[np.nan, 1.0]] + [[0.5, 0.5]] * 11)}, "probs", "NaN or inf"),
        ({"gate_logit": np.r_[np.inf, np.zeros(11)]}, "gate_logit", "NaN or inf"),
        ({"probs": np.array([[1.2, -0.2]] + [[0.5, 0.5]] * 11)}, "probs", r"in \[0, 1\]"),
        ({"probs": np.array([[0.3, 0.3]] + [[0.5, 0.5]] * 11)}, "probs", "do not sum to 1"),
        ({"probs": np.full((12, 3), 1 / 3)}, "probs", "expected shape"),
        ({"label": np.r_[2, np.zeros(11, int)]}, "label", "must be 0 or 1"),
        ({"label": np.zeros(12)}, "label", "must hold integers"),
        ({"label": np.zeros(11, int)}, "label", "expected shape"),
        ({"split": np.array(["train"] * 12)}, "split", "unknown split name"),
        ({"index": np.zeros(12, int)}, "index", "duplicate"),
        ({"index": np.arange(12) - 1}, "index", ">= 0"),
        ({"index": np.arange(12.0)}, "index", "integers"),
        ({"gate_logit": np.zeros(5)}, "gate_logit", "expected shape"),
    ],
)
def test_bad_arrays_rejected_on_write_and_read(tmp_path, change, key, message):
    a = {**_arrays(), **change}
    uri = tmp_path / "bad.npz"
    with pytest.raises(DataError, match=message) as err:
        save_scores(str(uri), **a)
    assert f"key '{key}'" in str(err.value) and str(uri) in str(err.value)
    assert not uri.exists()  # nothing half-written
    raw = _write_raw(uri, **{k: v for k, v in a.items() if v is not None})
    with pytest.raises(DataError, match=message) as err:
        load_scores(raw)
    assert f"key '{key}'" in str(err.value) and raw in str(err.value)


def test_missing_and_unknown_keys(tmp_path):
    a = _arrays(gate=False)
    del a["gate_logit"]
    raw = _write_raw(tmp_path / "m.npz", **{k: v for k, v in a.items() if k != "label"})
    with pytest.raises(DataError, match=r"missing key\(s\) \['label'\]"):
        load_scores(raw)
    raw = _write_raw(tmp_path / "u.npz", **a, logits=np.zeros(12))
    with pytest.raises(DataError, match=r"unexpected key\(s\) \['logits'\]"):
        load_scores(raw)


def test_not_npz_and_object_arrays(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_scores(str(p))
    a = _arrays(gate=False)
    del a["gate_logit"]
    buf = io.BytesIO()
    np.savez(buf, **{**a, "split": np.array(list(a["split"]), dtype=object)})
    p.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="object arrays"):
        load_scores(str(p))


def test_empty_rejected(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        save_scores(
            str(tmp_path / "e.npz"), index=np.array([], int), split="test", label=[], probs=np.zeros((0, 2))
        )
