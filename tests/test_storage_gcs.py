"""gs:// through a real GCS emulator (fake-gcs-server): bytes, artifacts, a manifest with its images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stage1_pro import storage
from stage1_pro.artifacts import read_artifact, write_artifact
from stage1_pro.data import load_dataset
from stage1_pro.errors import ArtifactError, DataError, StorageError
from stage1_pro.preprocessing import PixelSpec, decode_image, load_pixels
from stage1_pro.splits import load_splits, split_dataset

pytestmark = pytest.mark.gcs
EXAMPLES = Path(__file__).parent / "data" / "artifacts"


@pytest.fixture
def bucket(gcs_emulator) -> str:
    """A fresh, empty bucket on the emulator (``gs://NAME``)."""
    return gcs_emulator.make_bucket()


def _upload_tree(local_root: Path, prefix: str) -> None:
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            storage.copy_file(path, storage.join(prefix, path.relative_to(local_root).as_posix()))


def test_bytes_round_trip_and_listing(bucket: str, tmp_path: Path) -> None:
    uri = f"{bucket}/a/b/blob.bin"
    payload = bytes(range(256)) * 100
    storage.write_bytes(uri, payload)
    storage.write_text(f"{bucket}/a/top.txt", "héllo")
    storage.write_text(f"{bucket}/a/b/c/deep.txt", "deep")
    assert storage.read_bytes(uri) == payload
    assert storage.read_text(f"{bucket}/a/top.txt") == "héllo"
    assert storage.exists(uri) and not storage.exists(f"{bucket}/a/missing")
    assert list(storage.list_files(f"{bucket}/a")) == [
        f"{bucket}/a/b/blob.bin",
        f"{bucket}/a/b/c/deep.txt",
        f"{bucket}/a/top.txt",
    ]
    assert list(storage.list_files(f"{bucket}/a/b/", recursive=False)) == [f"{bucket}/a/b/blob.bin"]
    # gs -> local -> gs copies keep the bytes
    storage.copy_file(uri, tmp_path / "blob.bin")
    storage.copy_file(tmp_path / "blob.bin", f"{bucket}/copy.bin")
    storage.copy_file(f"{bucket}/copy.bin", f"{bucket}/copy2.bin")
    assert storage.read_bytes(f"{bucket}/copy2.bin") == payload
    storage.delete(f"{bucket}/copy2.bin")
    storage.delete(f"{bucket}/copy2.bin")  # deleting twice is fine
    assert not storage.exists(f"{bucket}/copy2.bin")


def test_missing_object_and_bucket_errors(bucket: str) -> None:
    with pytest.raises(StorageError, match=rf"{bucket}/nope.json: no such object or bucket"):
        storage.read_bytes(f"{bucket}/nope.json")
    with pytest.raises(StorageError, match=r"gs://no-such-bucket-x1/a: no such object or bucket"):
        storage.read_text("gs://no-such-bucket-x1/a")
    with pytest.raises(StorageError, match=r"names a bucket, not an object"):
        storage.read_bytes(bucket)


@pytest.mark.parametrize("kind", ["thresholds", "gateparams", "scrcparams", "bundle", "splits", "config"])
def test_artifact_round_trip(bucket: str, kind: str) -> None:
    doc = json.loads((EXAMPLES / f"{kind}.json").read_text())
    uri = f"{bucket}/run/{kind}.json"
    written = write_artifact(uri, kind, doc)
    assert read_artifact(uri, kind) == written == doc
    assert read_artifact(uri) == doc


def test_artifact_errors_on_gcs(bucket: str) -> None:
    write_artifact(
        f"{bucket}/gateparams.json", "gateparams", json.loads((EXAMPLES / "gateparams.json").read_text())
    )
    with pytest.raises(ArtifactError, match=r"this is a 'gateparams' artifact, not 'thresholds'"):
        read_artifact(f"{bucket}/gateparams.json", "thresholds")
    storage.write_text(f"{bucket}/cut.json", '{"artifact": "splits", "seed": ')
    with pytest.raises(ArtifactError, match=rf"{bucket}/cut.json: not valid JSON .*truncated"):
        read_artifact(f"{bucket}/cut.json")
    bad = json.loads((EXAMPLES / "thresholds.json").read_text())
    bad["delta"] = 0.9
    with pytest.raises(ArtifactError, match=r"\$\.delta: 0.9 is greater than the maximum of 0.5"):
        write_artifact(f"{bucket}/bad/thresholds.json", "thresholds", bad)
    assert list(storage.list_files(f"{bucket}/bad")) == []  # nothing written
    with pytest.raises(ArtifactError, match=r"no such object or bucket"):
        read_artifact(f"{bucket}/missing.json", "thresholds")


def test_manifest_and_images_round_trip(bucket: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """The tiny demo dataset copied to gs:// loads to the same rows, fingerprint, pixels and splits."""
    prefix = f"{bucket}/datasets/tiny"
    _upload_tree(tiny_dataset.parent, prefix)
    local = load_dataset(tiny_dataset)
    remote = load_dataset(f"{prefix}/manifest.csv")
    assert remote.fingerprint == local.fingerprint
    assert np.array_equal(remote.labels, local.labels)
    assert remote.uris[0] == f"{prefix}/images/00000.png"
    assert all(u.startswith(f"{prefix}/images/") for u in remote.uris)
    for i in (0, 57, 199):
        assert np.array_equal(
            np.asarray(decode_image(remote.uris[i])), np.asarray(decode_image(local.uris[i]))
        )
        spec = PixelSpec(20, "center_crop")
        assert np.array_equal(load_pixels(remote.uris[i], spec), load_pixels(local.uris[i], spec))

    # splits of the gs:// copy, written to gs://, equal the local ones (same fingerprint -> same indices)
    remote_splits = split_dataset(f"{prefix}/manifest.csv", f"{bucket}/runs/splits.json", seed=3)
    local_splits = split_dataset(tiny_dataset, tmp_path / "splits.json", seed=3)
    assert remote_splits["indices"] == local_splits["indices"]
    assert remote_splits["splits_version"] == local_splits["splits_version"]
    assert load_splits(f"{bucket}/runs/splits.json", dataset=remote) == remote_splits

    # the manifest can be written back and re-read from gs:// as JSONL, same fingerprint
    lines = [json.dumps({"uri": k, "label": int(y)}) for k, y in zip(local.keys, local.labels, strict=True)]
    storage.write_text(f"{prefix}/manifest.jsonl", "\n".join(lines) + "\n")
    assert load_dataset(f"{prefix}/manifest.jsonl").fingerprint == local.fingerprint


def test_missing_image_on_gcs_named_with_line(bucket: str, tiny_dataset: Path) -> None:
    prefix = f"{bucket}/d"
    _upload_tree(tiny_dataset.parent, prefix)
    storage.delete(f"{prefix}/images/00001.png")
    with pytest.raises(DataError) as info:
        load_dataset(f"{prefix}/manifest.csv")
    assert (
        f"{prefix}/manifest.csv: line 3: image file not found or unreadable: {prefix}/images/00001.png"
        in str(info.value)
    )
    assert "1 of 200 image(s) missing" in str(info.value)
    assert len(load_dataset(f"{prefix}/manifest.csv", check_files=False)) == 200


def test_image_folder_tree_on_gcs(bucket: str, tiny_dataset: Path) -> None:
    local = load_dataset(tiny_dataset)
    prefix = f"{bucket}/tree"
    for uri, label in zip(local.uris[:12], local.labels[:12], strict=True):
        storage.copy_file(uri, f"{prefix}/{label}/{Path(uri).name}")
    storage.write_text(f"{prefix}/README.txt", "ignored")
    ds = load_dataset(prefix)
    assert len(ds) == 12 and ds.source == prefix
    assert ds.keys == sorted(ds.keys) and all(k.split("/")[0] in ("0", "1") for k in ds.keys)
    assert [int(k[0]) for k in ds.keys] == ds.labels.tolist()
    assert decode_image(ds.uris[0]).size == (28, 28)
    storage.write_text(f"{prefix}/2/x.png", "x")
    with pytest.raises(DataError, match=r"unexpected folder '2'"):
        load_dataset(prefix)


def test_corrupt_image_on_gcs(bucket: str) -> None:
    storage.write_bytes(f"{bucket}/bad.png", b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=rf"{bucket}/bad.png: cannot decode image"):
        decode_image(f"{bucket}/bad.png")
    with pytest.raises(DataError, match=r"cannot read image: .*no such object"):
        decode_image(f"{bucket}/none.png")
