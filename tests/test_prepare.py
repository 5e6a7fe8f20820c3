"""Prepare: decode once into training-resolution shards; corrupt images named and counted; gs://."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from stage1_pro.artifacts import read_artifact
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, DataError
from stage1_pro.prepare import open_prepared, prepare_dataset
from stage1_pro.preprocessing import PixelSpec, load_pixels
from stage1_pro.splits import SPLIT_NAMES, split_dataset
from stage1_pro.training.loaders import ShardBatches


@pytest.fixture(scope="module")
def tiny_split(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    splits = tmp_path_factory.mktemp("prep-splits") / "splits.json"
    split_dataset(str(tiny_dataset), str(splits), seed=0)
    return str(tiny_dataset), str(splits)


def test_prepare_writes_shards_rows_and_a_valid_index(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    index = prepare_dataset(
        data, splits, str(tmp_path / "p"), PixelSpec(16), workers=1, shard_bytes=16 * 16 * 3 * 64
    )
    assert read_artifact(tmp_path / "p" / "index.json", "prepared") == index
    assert index["n_failed"] == 0 and sum(index["counts"].values()) == 200
    assert len(index["shards"]) == 4  # 64 rows per shard
    prepared = open_prepared(str(tmp_path / "p"))
    assert prepared.img_size == 16 and len(prepared.index) == 200
    assert index["preprocessing"] == {
        "resize_mode": "squash",
        "decode_mode": "draft",
        "interpolation": "bilinear",
    }
    assert prepared.pixel_spec == PixelSpec(16)
    # every row holds the pixels load_pixels gives for its dataset row, with its label
    from stage1_pro.data import load_dataset

    ds = load_dataset(data)
    batch, labels, _ = ShardBatches(prepared.shard_paths, prepared.shard, prepared.offset, prepared.label)[
        [0, 77, 199]
    ]
    for pos, row in enumerate(prepared.index[[0, 77, 199]]):
        assert np.array_equal(batch[pos].numpy(), load_pixels(ds.uris[row], PixelSpec(16)))
        assert labels[pos] == ds.labels[row]
    codes = {name: set(prepared.index[prepared.split == c].tolist()) for c, name in enumerate(SPLIT_NAMES)}
    from stage1_pro.splits import load_splits

    assert codes == {k: set(v) for k, v in load_splits(splits)["indices"].items()}


def test_parallel_workers_give_the_same_shards(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    prepare_dataset(data, splits, str(tmp_path / "one"), PixelSpec(12), workers=1)
    prepare_dataset(data, splits, str(tmp_path / "two"), PixelSpec(12), workers=2)
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
        prepare_dataset(str(demo_dataset), splits, str(tmp_path / "p"), PixelSpec(8), workers=1)
    assert not (tmp_path / "p").exists()


def test_truncated_shard_is_reported(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    prepare_dataset(data, splits, str(tmp_path / "p"), PixelSpec(8), workers=1)
    shard = tmp_path / "p" / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"shard-00000.npy: shard missing or truncated"):
        open_prepared(str(tmp_path / "p"))


def test_prepare_to_and_from_gcs(tiny_split, gcs_emulator, tmp_path) -> None:
    data, splits = tiny_split
    bucket = gcs_emulator.make_bucket()
    prepare_dataset(data, splits, f"{bucket}/prepared", PixelSpec(8), workers=2)
    local = prepare_dataset(data, splits, str(tmp_path / "local"), PixelSpec(8), workers=1)
    remote = open_prepared(f"{bucket}/prepared", cache_dir=tmp_path / "cache")
    assert remote.info["counts"] == local["counts"]
    assert np.array_equal(np.load(remote.shard_paths[0]), np.load(tmp_path / "local" / "shard-00000.npy"))
    with pytest.raises(ArtifactError, match=r"prepared/nothing/index.json: no such object"):
        open_prepared(f"{bucket}/prepared/nothing")


def test_prepare_cli_records_the_preprocessing_and_train_refuses_other_settings(
    tiny_split, tmp_path, capsys
) -> None:
    data, splits = tiny_split
    out = tmp_path / "p"
    args = ["--data", data, "--splits", splits, "--out", str(out), "--img-size", "12", "--workers", "1"]
    assert main(["prepare", *args, "--resize-mode", "center_crop", "--interpolation", "bicubic"]) == 0
    assert "12 px, center_crop, bicubic, JPEG draft decoding" in capsys.readouterr().out
    prepared = open_prepared(str(out))
    assert prepared.pixel_spec == PixelSpec(12, "center_crop", interpolation="bicubic")
    with pytest.raises(SystemExit):
        main(["prepare", *args, "--resize-mode", "letterbox"])
    assert re.search(
        r"invalid choice: 'letterbox' \(choose from '?squash'?, '?center_crop'?\)", capsys.readouterr().err
    )

    run = str(tmp_path / "run")
    train = ["train", "--prepared", str(out), "--splits", splits, "--out", run, "--img-size", "12",
             "--model-name", "test_efficientnet", "--pretrained", "false", "--epochs", "1"]  # fmt: skip
    assert main(train) == 2  # refused before any training: the config says squash / bilinear
    err = capsys.readouterr().err
    assert (
        f"{out} was prepared with resize_mode=center_crop, interpolation=bicubic but the config has "
        "resize_mode=squash, interpolation=bilinear; train with --resize-mode center_crop --interpolation "
        "bicubic, or re-run `stage1-pro prepare` with --resize-mode squash --interpolation bilinear"
    ) in err
    assert not (tmp_path / "run" / "model_best.pth").exists()


def test_an_index_written_before_the_spec_reads_as_the_default_spec(tiny_split, tmp_path) -> None:
    import json

    data, splits = tiny_split
    prepare_dataset(data, splits, str(tmp_path / "p"), PixelSpec(8), workers=1)
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    del index["preprocessing"]
    index["resize"] = "draft+RGB+bilinear-antialias-square"  # what earlier versions wrote
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    assert open_prepared(str(tmp_path / "p")).pixel_spec == PixelSpec(8)


# ------------------------------------------------------------------------------------------
# fan-out: slices of the shards decoded apart, merged into one folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "index.json"}


def _comparable(index: dict) -> dict:
    """An index without timing and worker count, failures without PIL's message (it names an address)."""
    out = {k: v for k, v in index.items() if k not in ("seconds", "workers")}
    out["failed"] = [(f["index"], f["uri"], f["split"]) for f in index["failed"]]
    return out


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_slices_merged_equal_one_prepare_byte_for_byte(tiny_split, tmp_path, parts: int) -> None:
    """With a corrupt image in the data: shards hold fixed row ranges, so a slice's shards do not
    depend on failures in other slices, and the merged folder is the one-pod folder."""
    data, splits = tiny_split
    copy = tmp_path / "data"
    shutil.copytree(Path(data).parent, copy)
    manifest = str(copy / Path(data).name)
    from stage1_pro.data import load_dataset

    Path(load_dataset(manifest).uris[3]).write_bytes(b"not an image")
    shard_bytes = 12 * 12 * 3 * 40  # 40 rows per shard: 5 shards for 200 images
    whole = prepare_dataset(manifest, splits, str(tmp_path / "one"), 12, workers=1, shard_bytes=shard_bytes)
    assert whole["n_failed"] == 1 and len(whole["shards"]) == 5
    slices = []
    for part in range(parts):
        out = tmp_path / f"slice-{part}"
        index = prepare_dataset(
            manifest,
            splits,
            str(out),
            spec=12,
            workers=1,
            shard_bytes=shard_bytes,
            part=part,
            parts=parts,
        )
        assert index["part"] == {"index": part, "count": parts}
        slices.append(str(out))
    assert sum(len(read_artifact(Path(s) / "index.json", "prepared")["shards"]) for s in slices) == 5
    merged = prepare_merge(list(reversed(slices)), tmp_path / "merged")  # any order
    assert _files(tmp_path / "merged") == _files(tmp_path / "one")
    assert _comparable(merged) == _comparable(whole)
    assert len(open_prepared(str(tmp_path / "merged")).index) == 199


def prepare_merge(slices: list[str], out: Path) -> dict:
    from stage1_pro.prepare import merge_prepared

    return merge_prepared(slices, str(out))


def test_a_slice_is_not_a_prepared_folder_and_slices_must_match(tiny_split, tmp_path) -> None:
    data, splits = tiny_split
    for part in (0, 1):
        prepare_dataset(data, splits, str(tmp_path / f"s{part}"), spec=8, workers=1, part=part, parts=2)
    with pytest.raises(
        ArtifactError, match=r"s0: slice 0 of 2 of a fanned-out prepare.*merge the slices first"
    ):
        open_prepared(str(tmp_path / "s0"))
    with pytest.raises(ArtifactError, match=r"expected slices 0\.\.1 of one fan-out, got \[0\]"):
        prepare_merge([str(tmp_path / "s0")], tmp_path / "m")
    prepare_dataset(data, splits, str(tmp_path / "other"), spec=9, workers=1, part=1, parts=2)
    with pytest.raises(ArtifactError, match=r"other: a slice of another preparation \(img_size differ"):
        prepare_merge([str(tmp_path / "s0"), str(tmp_path / "other")], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(DataError, match=r"part=2 of parts=2: need 0 <= part < parts"):
        prepare_dataset(data, splits, str(tmp_path / "bad"), spec=8, workers=1, part=2, parts=2)


def test_merge_on_gcs_copies_server_side(tiny_split, gcs_emulator, tmp_path) -> None:
    data, splits = tiny_split
    bucket = gcs_emulator.make_bucket()
    for part in (0, 1):
        prepare_dataset(
            data,
            splits,
            f"{bucket}/s{part}",
            spec=8,
            workers=1,
            shard_bytes=8 * 8 * 3 * 64,
            part=part,
            parts=2,
        )
    prepare_merge([f"{bucket}/s0", f"{bucket}/s1"], f"{bucket}/merged")  # type: ignore[arg-type]
    local = prepare_dataset(
        data, splits, str(tmp_path / "local"), spec=8, workers=1, shard_bytes=8 * 8 * 3 * 64
    )
    remote = open_prepared(f"{bucket}/merged", cache_dir=tmp_path / "cache")
    assert [s["file"] for s in remote.info["shards"]] == [s["file"] for s in local["shards"]]
    for path in remote.shard_paths:
        assert Path(path).read_bytes() == (tmp_path / "local" / Path(path).name).read_bytes()
