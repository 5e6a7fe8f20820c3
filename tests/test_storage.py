"""Local storage: atomic writes, listings, URI helpers and error messages (gs://: test_storage_gcs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stage1_pro import storage
from stage1_pro.errors import StorageError


def test_write_is_atomic_and_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f.bin"
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]  # no temporary file left


def test_failed_replace_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()  # a folder where the file should go: os.replace fails
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(StorageError, match=r"taken: cannot write \(Is a directory\)"):
        storage.write_bytes(tmp_path / "taken", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"file/sub/out.json: cannot write"):
        storage.write_text(tmp_path / "file" / "sub" / "out.json", "{}")


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"missing.txt: file not found"):
        storage.read_bytes(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(StorageError, match=r"latin1.txt: not UTF-8 text"):
        storage.read_text(tmp_path / "latin1.txt")
    with pytest.raises(StorageError, match=r"cannot read"):
        storage.read_bytes(tmp_path)


def test_listing_exists_copy_delete(tmp_path: Path) -> None:
    for rel in ("b.txt", "a/x.txt", "a/deep/y.txt"):
        storage.write_text(tmp_path / rel, rel)
    assert list(storage.list_files(tmp_path)) == [
        str(tmp_path / r) for r in ("a/deep/y.txt", "a/x.txt", "b.txt")
    ]
    assert list(storage.list_files(tmp_path / "a", recursive=False)) == [str(tmp_path / "a" / "x.txt")]
    assert list(storage.list_files(tmp_path / "nothing-here")) == []
    assert list(storage.list_files(tmp_path / "nothing-here", recursive=False)) == []
    storage.copy_file(tmp_path / "b.txt", tmp_path / "c" / "b2.txt")
    assert storage.read_text(tmp_path / "c" / "b2.txt") == "b.txt"
    assert storage.exists(tmp_path / "c" / "b2.txt")
    storage.delete(tmp_path / "c" / "b2.txt")
    storage.delete(tmp_path / "c" / "b2.txt")
    assert not storage.exists(tmp_path / "c" / "b2.txt")


def test_uri_helpers() -> None:
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/gs://b") and not storage.is_gcs(Path("gs:/b"))
    assert storage.split_gcs("gs://bucket/a/b.json") == ("bucket", "a/b.json")
    assert storage.split_gcs("gs://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match=r"gs:///x: not a valid gs:// URI"):
        storage.split_gcs("gs:///x")
    assert storage.join("gs://b/run/", "/splits.json") == "gs://b/run/splits.json"
    assert storage.join("gs://b", "a", "c.json") == "gs://b/a/c.json"
    assert storage.join("/tmp/run", "a", "c.json") == "/tmp/run/a/c.json"


def test_staged_folder_swaps_in_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "bundle"
    with storage.staged_folder(dest) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not dest.exists()  # nothing visible until the block succeeds
    assert [p.name for p in dest.iterdir()] == ["a.txt"]

    replacing = storage.staged_folder(dest, replace_contents=True)
    with pytest.raises(RuntimeError, match="half way"), replacing as tmp:
        (tmp / "b.txt").write_text("partial")
        raise RuntimeError("half way")
    assert [p.name for p in dest.iterdir()] == ["a.txt"]  # the old folder, untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle"]  # no staging folder left

    with storage.staged_folder(dest, replace_contents=True) as tmp:
        (tmp / "c.txt").write_text("newer")
    assert [p.name for p in dest.iterdir()] == ["c.txt"]

    with pytest.raises(OSError), storage.staged_folder(dest) as tmp:  # a non-empty dest is not replaced
        (tmp / "d.txt").write_text("refused")
    assert [p.name for p in dest.iterdir()] == ["c.txt"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle"]
