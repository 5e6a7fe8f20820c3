"""Splits: byte-identical determinism, disjoint + covering, groups kept whole, class balance, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stage1_pro.artifacts import write_artifact
from stage1_pro.data import Dataset, load_dataset
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.splits import (
    DEFAULT_FRACTIONS,
    SPLIT_NAMES,
    check_splits,
    load_splits,
    make_splits,
    parse_fractions,
    split_dataset,
    splits_version,
)

REPO = Path(__file__).resolve().parents[1]


def synthetic(n: int, positive_rate: float = 0.3, groups: int | None = None, seed: int = 0) -> Dataset:
    """n rows with random labels; with ``groups``, random group sizes (some groups mixed-label)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_rate).astype(np.int64)
    group_names = None
    if groups is not None:
        group_of = np.sort(rng.integers(0, groups, n))  # contiguous runs, like capture sequences
        group_names = [f"seq{g:04d}" for g in group_of]
        labels = np.where(rng.random(n) < 0.8, (group_of % 3 == 0).astype(np.int64), labels)
    keys = [f"img/{i:05d}.png" for i in range(n)]
    return Dataset(
        uris=[f"/data/{k}" for k in keys], labels=labels, groups=group_names, source="synthetic", keys=keys
    )


def assert_partition(splits: dict, n: int) -> None:
    all_rows = [i for name in SPLIT_NAMES for i in splits["indices"][name]]
    assert sorted(all_rows) == list(range(n))  # disjoint and covering
    for name in SPLIT_NAMES:
        assert splits["indices"][name] == sorted(splits["indices"][name])


def test_same_input_and_seed_give_a_byte_identical_file(tiny_dataset: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    split_dataset(tiny_dataset, a, seed=7)
    split_dataset(tiny_dataset, b, seed=7)
    assert a.read_bytes() == b.read_bytes()
    split_dataset(tiny_dataset, c, seed=8)
    assert json.loads(c.read_text())["indices"] != json.loads(a.read_text())["indices"]


def test_split_is_independent_of_the_process(tiny_dataset: Path, tmp_path: Path) -> None:
    """The CLI, the numbered script and the library write the same bytes (fresh interpreters)."""
    lib, cli, script = tmp_path / "lib.json", tmp_path / "cli.json", tmp_path / "script.json"
    split_dataset(tiny_dataset, lib, seed=1)
    args = ["--data", str(tiny_dataset), "--seed", "1"]
    main = "import sys; from stage1_pro.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run(
        [sys.executable, "-c", main, "split", *args, "--out", str(cli)], check=True, capture_output=True
    )
    subprocess.run(
        [
            sys.executable,
            str(REPO / "stage1_pro" / "scripts" / "00_make_splits.py"),
            *args,
            "--out",
            str(script),
        ],
        check=True,
        capture_output=True,
    )
    assert lib.read_bytes() == cli.read_bytes() == script.read_bytes()


def test_demo_splits_written_and_certifiable(demo_dataset: Path, tmp_path: Path) -> None:
    splits = split_dataset(demo_dataset, tmp_path / "splits.json")
    assert_partition(splits, 5000)
    assert splits["fractions"] == DEFAULT_FRACTIONS
    assert splits["dataset"]["n"] == 5000 and splits["dataset"]["n_positive"] == 2500
    # The default val_calib share holds enough positives to certify FNR_exit <= 0.02 at delta 0.1.
    assert splits["class_balance"]["val_calib"]["n_positive"] >= 400
    assert load_splits(tmp_path / "splits.json", dataset=load_dataset(demo_dataset)) == splits


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(
    ("n", "rate", "fractions"),
    [
        (1000, 0.5, None),
        (997, 0.07, None),
        (503, 0.31, [0.6, 0.1, 0.2, 0.1]),
        (61, 0.5, [0.25, 0.25, 0.25, 0.25]),
        (2000, 0.02, [0.4, 0.2, 0.3, 0.1]),
    ],
)
def test_class_balance_proportional_within_one_sample(n: int, rate: float, fractions, seed: int) -> None:
    ds = synthetic(n, rate, seed=seed)
    splits = make_splits(ds, seed=seed, fractions=fractions)
    assert_partition(splits, n)
    fr = parse_fractions(fractions)
    for cls in (0, 1):
        total = int((ds.labels == cls).sum())
        for name in SPLIT_NAMES:
            got = int((ds.labels[splits["indices"][name]] == cls).sum())
            assert abs(got - fr[name] * total) < 1, (name, cls, got, fr[name] * total)
    for name in SPLIT_NAMES:
        rows = splits["indices"][name]
        balance = splits["class_balance"][name]
        assert balance["n"] == len(rows) and balance["n_positive"] == int(ds.labels[rows].sum())
        assert balance["positive_rate"] == pytest.approx(balance["n_positive"] / balance["n"])
        assert balance["n_groups"] == len(rows)
    assert splits["group_aware"] is False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_are_never_split(seed: int) -> None:
    ds = synthetic(3000, groups=300, seed=seed)
    splits = make_splits(ds, seed=seed)
    assert_partition(splits, len(ds))
    owner: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for i in splits["indices"][name]:
            assert owner.setdefault(ds.groups[i], name) == name, f"group {ds.groups[i]} in two splits"
    assert splits["group_aware"] is True
    # whole groups cannot hit fractions exactly, but the greedy assignment stays close
    n_pos = ds.n_positive
    for name in SPLIT_NAMES:
        balance = splits["class_balance"][name]
        assert abs(balance["n"] / len(ds) - DEFAULT_FRACTIONS[name]) < 0.03
        assert abs(balance["n_positive"] / n_pos - DEFAULT_FRACTIONS[name]) < 0.05
        assert balance["n_groups"] == len({ds.groups[i] for i in splits["indices"][name]})
    assert sum(splits["class_balance"][s]["n_groups"] for s in SPLIT_NAMES) == 300


def test_group_of_one_image_each_equals_no_groups() -> None:
    ds = synthetic(400)
    grouped = Dataset(uris=ds.uris, labels=ds.labels, groups=ds.keys, source=ds.source, keys=ds.keys)
    assert make_splits(grouped, seed=5)["indices"] == make_splits(ds, seed=5)["indices"]


def test_splits_version_tracks_data_and_indices() -> None:
    ds = synthetic(200)
    s0, s1 = make_splits(ds, seed=0), make_splits(ds, seed=1)
    assert s0["splits_version"] == splits_version(ds.fingerprint, s0["indices"])
    assert s0["splits_version"] != s1["splits_version"]
    flipped = Dataset(uris=ds.uris, labels=1 - ds.labels, groups=None, source=ds.source, keys=ds.keys)
    assert make_splits(flipped, seed=0)["splits_version"] != s0["splits_version"]
    assert len(s0["splits_version"]) == 16


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [
        (None, DEFAULT_FRACTIONS),
        ([0.7, 0.1, 0.1, 0.1], {"train": 0.7, "val_select": 0.1, "val_calib": 0.1, "test": 0.1}),
        (["0.7", "0.1", "0.1", "0.1"], {"train": 0.7, "val_select": 0.1, "val_calib": 0.1, "test": 0.1}),
        (
            ["test=0.1", "val_calib=0.3", "val_select=0.1", "train=0.5"],
            {"train": 0.5, "val_select": 0.1, "val_calib": 0.3, "test": 0.1},
        ),
        ({"train": 0.5, "val_select": 0.2, "val_calib": 0.2, "test": 0.1 + 5e-7}, None),
    ],
)
def test_parse_fractions(fractions, expected) -> None:
    parsed = parse_fractions(fractions)
    assert list(parsed) == list(SPLIT_NAMES)
    if expected is not None:
        assert parsed == pytest.approx(expected)
    assert sum(DEFAULT_FRACTIONS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ([0.6, 0.1, 0.2, 0.2], r"train=0.6, val_select=0.1, val_calib=0.2, test=0.2 sum to 1.1, not 1"),
        ([0.5, 0.15, 0.2, 0.1], r".* sum to 0.95, not 1; adjust them so they add up to 1"),
        (
            {"train": 0.5, "val_select": 0.2, "val_calib": 0.2, "test": 0.1 + 2e-6},
            r".*test=0.100002 sum to 1.000002, not 1",
        ),
        ([1.2, -0.2, 0.0, 0.0], r"val_select=-0.2 is negative"),
        (
            {"train": 0.5, "val": 0.5},
            r"unknown split name\(s\) 'val'; splits are train, val_select, val_calib, test",
        ),
        ({"train": 1.0}, r"missing split\(s\) val_select, val_calib, test"),
        ([0.5, 0.5], r"expected 4 numbers \(train val_select val_calib test\) or name=value pairs"),
        (["train=0.5", "val_select=x", "val_calib=0.2", "test=0.3"], r"val_select='x' is not a number"),
        ([float("nan"), 0.5, 0.25, 0.25], r"train=nan is not a finite number"),
    ],
)
def test_bad_fractions(fractions, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^fractions: " + message):
        parse_fractions(fractions)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed(seed) -> None:
    with pytest.raises(ConfigError, match=r"the split seed must be an integer >= 0"):
        make_splits(synthetic(100), seed=seed)


def test_empty_split_named_with_counts_and_nothing_written(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(10)))
    out = tmp_path / "splits.json"
    with pytest.raises(DataError) as info:
        split_dataset(manifest, out, fractions=[0.5, 0.2, 0.3, 0.0], check_files=False)
    assert str(info.value) == (
        f"split 'test' would be empty: fraction 0 of {manifest} (10 samples: 5 positive, 5 negative) "
        "gives it no sample; raise its fraction or add data"
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_split_without_a_class_named() -> None:
    ds = synthetic(40, positive_rate=0.0)
    ds.labels[:3] = 1  # three positives for four splits
    with pytest.raises(
        DataError,
        match=r"split 'test' would have no positive sample \(label 1\): "
        r"it gets 6 of the samples of synthetic \(40 samples: 3 positive",
    ):
        make_splits(ds, fractions=[0.4, 0.2, 0.25, 0.15])


def test_empty_split_with_groups_counts_groups() -> None:
    ds = synthetic(300, groups=3)
    with pytest.raises(DataError, match=r"would be empty: .*\(300 samples: .*, 3 groups\)"):
        make_splits(ds)


def test_bad_dataset_writes_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\na.png,1\nb.png,2\n")
    with pytest.raises(DataError, match=r"m.csv: line 3: label '2' is not 0 or 1"):
        split_dataset(manifest, tmp_path / "out" / "splits.json", check_files=False)
    assert not (tmp_path / "out").exists()


def test_load_splits_checks(tmp_path: Path) -> None:
    ds = synthetic(100)
    path = tmp_path / "splits.json"
    splits = write_artifact(path, "splits", make_splits(ds))
    assert load_splits(path) == splits
    other = synthetic(100, seed=1)
    with pytest.raises(
        DataError, match=r"splits.json: made for dataset .* but synthetic is .*re-run `stage1-pro split`"
    ):
        load_splits(path, dataset=other)
    with pytest.raises(DataError, match=r"made for dataset"):
        check_splits(splits, ds.subset(range(99)))

    def rewrite(**indices) -> None:
        doc = json.loads(path.read_text())
        doc["indices"].update(indices)
        path.write_text(json.dumps(doc))

    test_rows = splits["indices"]["test"]
    rewrite(test=[*test_rows, splits["indices"]["train"][0]])
    with pytest.raises(DataError, match=r"dataset row \d+ is in more than one split"):
        load_splits(path)
    rewrite(test=test_rows[1:])
    with pytest.raises(DataError, match=rf"dataset row {test_rows[0]} is in no split"):
        load_splits(path)
    rewrite(test=[*test_rows, 100])
    with pytest.raises(DataError, match=r"indices.test holds row 100 but the dataset has 100 rows"):
        load_splits(path)
    path.write_text('{"artifact": "thresholds"}')
    with pytest.raises(ArtifactError, match=r"this is a 'thresholds' artifact, not 'splits'"):
        load_splits(path)
