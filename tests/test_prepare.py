"""Prepare: decode once into training-resolution shards; corrupt images named and counted; gs://."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_pro.artifacts import read_artifact
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, DataError
from stage1_pro.prepare import open_prepared, prepare_dataset
from stage1_pro.splits import SPLIT_NAMES, split_dataset
from stage1_pro.training.loaders import ShardBatches
from stage1_pro.transforms import load_image, preprocess, resize_image


@pytest.fixture(scope="module")
def tiny_split(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    splits = tmp_path_factory.mktemp("prep-splits") / "splits.json"
    split_dataset(str(tiny_dataset), str(splits), seed=0)
    return str(tiny_dataset), str(splits)


def test_prepare_writes_shards_rows_and_a_valid_index(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    index = prepare_dataset(
        data, splits, str(tmp_path / "p"), img_size=16, workers=1, shard_bytes=16 * 16 * 3 * 64
    )
    assert read_artifact(tmp_path / "p" / "index.json", "prepared") == index
    assert index["n_failed"] == 0 and sum(index["counts"].values()) == 200
    assert len(index["shards"]) == 4  # 64 rows per shard
    prepared = open_prepared(str(tmp_path / "p"))
    assert prepared.img_size == 16 and len(prepared.index) == 200
    # every row holds the pixels load_image gives for its dataset row, with its label
    from stage1_pro.data import load_dataset

    ds = load_dataset(data)
    batch, labels, _ = ShardBatches(prepared.shard_paths, prepared.shard, prepared.offset, prepared.label)[
        [0, 77, 199]
    ]
    for pos, row in enumerate(prepared.index[[0, 77, 199]]):
        assert np.array_equal(batch[pos].numpy(), load_image(ds.uris[row], 16))
        assert labels[pos] == ds.labels[row]
    codes = {name: set(prepared.index[prepared.split == c].tolist()) for c, name in enumerate(SPLIT_NAMES)}
    from stage1_pro.splits import load_splits

    assert codes == {k: set(v) for k, v in load_splits(splits)["indices"].items()}


def test_parallel_workers_give_the_same_shards(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    prepare_dataset(data, splits, str(tmp_path / "one"), img_size=12, workers=1)
    prepare_dataset(data, splits, str(tmp_path / "two"), img_size=12, workers=2)
    for name in ("shard-00000.npy", "rows.npz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_corrupt_image_is_named_counted_and_left_out(tiny_dataset: Path, tmp_path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset.parent, root)
    manifest = root / tiny_dataset.name
    victim = sorted((root / "images").rglob("*.png"))[5]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    splits = tmp_path / "splits.json"
    split_dataset(str(manifest), str(splits))
    code = main(
        [
            "prepare",
            "--data",
            str(manifest),
            "--splits",
            str(splits),
            "--out",
            str(tmp_path / "p"),
            "--img-size",
            "8",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "left out 1 image(s) that failed to decode" in printed and victim.name in printed
    index = read_artifact(tmp_path / "p" / "index.json", "prepared")
    assert index["n_failed"] == 1 and sum(index["counts"].values()) == 199
    assert (
        index["failed"][0]["uri"].endswith(victim.name)
        and "cannot decode image" in index["failed"][0]["error"]
    )


def test_prepare_refuses_splits_of_another_dataset(tiny_split, demo_dataset, tmp_path) -> None:
    _, splits = tiny_split
    with pytest.raises(DataError, match=r"made for dataset .* the data changed"):
        prepare_dataset(str(demo_dataset), splits, str(tmp_path / "p"), img_size=8, workers=1)
    assert not (tmp_path / "p").exists()


def test_truncated_shard_is_reported(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    prepare_dataset(data, splits, str(tmp_path / "p"), img_size=8, workers=1)
    shard = tmp_path / "p" / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"shard-00000.npy: shard missing or truncated"):
        open_prepared(str(tmp_path / "p"))


def test_prepare_to_and_from_gcs(tiny_split, gcs_emulator, tmp_path) -> None:
    data, splits = tiny_split
    bucket = gcs_emulator.make_bucket()
    prepare_dataset(data, splits, f"{bucket}/prepared", img_size=8, workers=2)
    local = prepare_dataset(data, splits, str(tmp_path / "local"), img_size=8, workers=1)
    remote = open_prepared(f"{bucket}/prepared", cache_dir=tmp_path / "cache")
    assert remote.info["counts"] == local["counts"]
    assert np.array_equal(np.load(remote.shard_paths[0]), np.load(tmp_path / "local" / "shard-00000.npy"))
    with pytest.raises(ArtifactError, match=r"prepared/nothing/index.json: no such object"):
        open_prepared(f"{bucket}/prepared/nothing")


def test_jpeg_draft_decoding_matches_the_full_decode_closely(tmp_path) -> None:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), np.ones((40, 40, 1), dtype=np.uint8))
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    drafted = load_image(str(path), 64)  # decoded at 1/8 scale (200 x 150), then resized
    full = resize_image(Image.open(path).convert("RGB"), 64)
    assert drafted.shape == full.shape == (64, 64, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 6


def test_resize_and_preprocess_handle_grey_palette_and_rgba() -> None:
    grey = Image.fromarray(np.full((10, 20), 200, dtype=np.uint8))
    palette = grey.convert("P")
    rgba = Image.new("RGBA", (9, 9), (10, 20, 30, 128))
    for image in (grey, palette, rgba):
        assert resize_image(image, 8).shape == (8, 8, 3)
    x = preprocess([grey, rgba], {"img_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert x.shape == (2, 3, 8, 8)
    assert abs(float(x[0, 0, 0, 0]) - (200 / 255 - 0.5) / 0.5) < 1e-5


def test_unreadable_image_error_names_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"bad.jpg: cannot decode image"):
        load_image(str(bad), 8)
    with pytest.raises(DataError, match=r"missing.png: file not found"):
        load_image(str(tmp_path / "missing.png"), 8)
