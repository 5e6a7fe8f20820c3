"""Datasets: manifests (CSV/JSONL), image-folder trees, the fingerprint and every bad input.

Decoding images (and its errors) is tested in test_preprocessing.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_pro.data import Dataset, load_dataset, manifest_fingerprint
from stage1_pro.errors import DataError

EXAMPLES = Path(__file__).parent / "data" / "manifests"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with a.png, b.png, c.png, d.png (tiny greyscale images); returns the folder."""
    for i, name in enumerate("abcd"):
        Image.fromarray(np.full((4, 4), 60 * i, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    return tmp_path


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def expected_fingerprint(rows: list[list]) -> str:
    """The documented canonical content, computed independently of stage1_pro.data."""
    text = "stage1-pro-manifest-v1\n" + "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# valid inputs


def test_csv_manifest_with_groups() -> None:
    ds = load_dataset(EXAMPLES / "example.csv")
    assert len(ds) == 6 and ds.n_positive == 3
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.groups == ["seq0", "seq0", "seq1", "seq1", "seq2", "seq2"]
    assert ds.uris[0] == str((EXAMPLES / "images" / "00000.png").resolve())
    assert ds.keys[0] == "images/00000.png"
    assert ds.source == str((EXAMPLES / "example.csv").resolve())
    rows = [[k, y, g] for k, y, g in zip(ds.keys, ds.labels.tolist(), ds.groups, strict=True)]
    assert ds.fingerprint == expected_fingerprint(rows)


def test_jsonl_and_csv_of_the_same_rows_share_the_fingerprint() -> None:
    csv_ds = load_dataset(EXAMPLES / "example.csv")
    jsonl_ds = load_dataset(EXAMPLES / "example.jsonl")
    assert jsonl_ds.fingerprint == csv_ds.fingerprint
    assert jsonl_ds.uris == csv_ds.uris and jsonl_ds.groups == csv_ds.groups


def test_fingerprint_survives_a_move_but_not_a_change(tmp_path: Path) -> None:
    moved = shutil.copytree(EXAMPLES, tmp_path / "moved")
    original = load_dataset(EXAMPLES / "example.csv").fingerprint
    assert load_dataset(moved / "example.csv").fingerprint == original
    lines = (moved / "example.csv").read_text().splitlines()
    variants = {
        "label": [lines[0], lines[1].replace(",0,", ",1,"), *lines[2:]],
        "order": [lines[0], lines[2], lines[1], *lines[3:]],
        "group": [lines[0], lines[1].replace("seq0", "seqX"), *lines[2:]],
        "row removed": lines[:-1],
    }
    for what, variant in variants.items():
        write(moved, "v.csv", "\n".join(variant) + "\n")
        assert load_dataset(moved / "v.csv").fingerprint != original, what


def test_extra_columns_ignored_no_group_column(images: Path) -> None:
    path = write(images, "m.csv", "label,uri,digit,notes\n1,a.png,7,x\n0,b.png,4,\n")
    ds = load_dataset(path)
    assert ds.groups is None and ds.labels.tolist() == [1, 0] and ds.keys == ["a.png", "b.png"]
    assert ds.fingerprint == expected_fingerprint([["a.png", 1, None], ["b.png", 0, None]])


def test_csv_details_bom_blank_lines_quotes_and_paths(images: Path) -> None:
    (images / "sub").mkdir()
    shutil.copy(images / "c.png", images / "sub" / "c, copy.png")
    text = f'\ufeffuri, label\n./a.png,1\n\n"sub/c, copy.png", 0 \n{images / "b.png"},0\n'
    ds = load_dataset(write(images, "m.csv", text))
    assert ds.keys == ["a.png", "sub/c, copy.png", str(images / "b.png")]
    assert ds.uris == [str(images / "a.png"), str(images / "sub" / "c, copy.png"), str(images / "b.png")]
    assert ds.labels.tolist() == [1, 0, 0]


def test_jsonl_labels_as_strings_and_integer_groups(images: Path) -> None:
    lines = ['{"uri": "a.png", "label": "1", "group": 7}', "", '{"uri": "b.png", "label": 0, "group": "7"}']
    ds = load_dataset(write(images, "m.jsonl", "\n".join(lines)))
    assert ds.labels.tolist() == [1, 0] and ds.groups == ["7", "7"]


def test_image_folder_tree(images: Path) -> None:
    root = images / "tree"
    for rel, src in {"1/a.png": "a", "0/b.PNG": "b", "0/seq/c.png": "c", "1/.hidden/d.png": "d"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / f"{src}.png", root / rel)
    (root / "README.md").write_text("top-level files are ignored")
    (root / "1" / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(root)
    assert ds.keys == ["0/b.PNG", "0/seq/c.png", "1/a.png"]
    assert ds.labels.tolist() == [0, 0, 1] and ds.groups is None
    assert ds.uris[1] == str(root / "0" / "seq" / "c.png")
    # a manifest listing the same relative paths in the same order has the same fingerprint
    manifest = write(root, "m.csv", "uri,label\n0/b.PNG,0\n0/seq/c.png,0\n1/a.png,1\n")
    assert load_dataset(manifest).fingerprint == ds.fingerprint


def test_subset_has_the_fingerprint_of_its_rows() -> None:
    ds = load_dataset(EXAMPLES / "example.csv")
    sub = ds.subset([4, 1])
    assert sub.keys == [ds.keys[4], ds.keys[1]] and sub.labels.tolist() == [0, 1]
    assert sub.groups == ["seq2", "seq0"] and sub.source == ds.source
    assert sub.fingerprint == manifest_fingerprint([ds.keys[4], ds.keys[1]], [0, 1], ["seq2", "seq0"])
    assert len(ds.subset([])) == 0
    with pytest.raises(IndexError, match=r"subset indices must be in \[0, 6\)"):
        ds.subset([6])


def test_dataset_rejects_ragged_columns() -> None:
    with pytest.raises(ValueError, match=r"one entry per row"):
        Dataset(uris=["a"], labels=np.array([0, 1]), groups=None, source="x", keys=["a"])


def test_check_files_false_skips_the_existence_check(images: Path) -> None:
    path = write(images, "m.csv", "uri,label\nmissing.png,1\n")
    assert load_dataset(path, check_files=False).uris == [str(images / "missing.png")]


def test_demo_layout_loads(tiny_dataset: Path) -> None:
    ds = load_dataset(tiny_dataset)
    assert len(ds) == 200 and ds.n_positive == 100 and ds.groups is None
    assert Image.open(ds.uris[0]).size == (28, 28)


# ------------------------------------------------------------------------------------------
# bad inputs: each a DataError naming the file and line (or image) and the fix


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "m.csv",
            "uri,label\na.png,1\nb.png,2\n",
            r"m.csv: line 3: label '2' is not 0 or 1; .*map your classes to 0/1",
        ),
        ("m.csv", "uri,label\na.png,yes\n", r"m.csv: line 2: label 'yes' is not 0 or 1"),
        ("m.csv", "uri,label\na.png,\n", r"m.csv: line 2: label '' is not 0 or 1"),
        ("m.csv", "uri,label\na.png,-1\n", r"m.csv: line 2: label '-1' is not 0 or 1"),
        ("m.jsonl", '{"uri": "a.png", "label": true}\n', r"m.jsonl: line 1: label True is not 0 or 1"),
        ("m.jsonl", '{"uri": "a.png", "label": 1.0}\n', r"m.jsonl: line 1: label 1.0 is not 0 or 1"),
        ("m.jsonl", '{"uri": "a.png", "label": 3}\n', r"m.jsonl: line 1: label 3 is not 0 or 1"),
        (
            "m.csv",
            "uri,label\na.png,1\nb.png,0\na.png,0\n",
            r"m.csv: line 4: duplicate uri 'a.png' \(same image as line 2\); .*remove the repeated row",
        ),
        (
            "m.csv",
            "uri,label\n./a.png,1\nsub/../a.png,0\n",
            r"m.csv: line 3: duplicate uri 'a.png' \(same image as line 2\)",
        ),
        ("m.csv", "uri,label\n", r"m.csv: the manifest has no rows; add one line per image"),
        ("m.csv", "", r"m.csv: the manifest has no rows"),
        ("m.jsonl", "\n\n", r"m.jsonl: the manifest has no rows"),
        (
            "m.csv",
            "path,label\na.png,1\n",
            r"m.csv: line 1: missing column\(s\) uri; the header must be uri,label\[,group\]",
        ),
        ("m.csv", "uri\na.png\n", r"m.csv: line 1: missing column\(s\) label; .*\(found: uri\)"),
        ("m.csv", "a.png,1\nb.png,0\n", r"m.csv: line 1: missing column\(s\) uri, label"),
        ("m.csv", "uri,label,label\na.png,1,1\n", r"m.csv: line 1: column\(s\) label appear more than once"),
        ("m.csv", "uri,label\na.png,1\nb.png,0,extra\n", r"m.csv: line 3: 3 field\(s\) but the header has 2"),
        (
            "m.csv",
            "uri,label,group\na.png,1,s1\nb.png,0,\n",
            r"m.csv: line 3: group is empty .*drop the group column",
        ),
        ("m.csv", "uri,label\n ,1\n", r"m.csv: line 2: uri is empty or not a string"),
        (
            "m.jsonl",
            '{"uri": "a.png", "label": 1}\nnot json\n',
            r"m.jsonl: line 2: not valid JSON \(Expecting value\)",
        ),
        ("m.jsonl", '["a.png", 1]\n', r"m.jsonl: line 1: expected a JSON object like .*got list"),
        (
            "m.jsonl",
            '{"uri": "a.png"}\n',
            r"m.jsonl: line 1: missing key\(s\) label; each line needs uri and label",
        ),
        ("m.jsonl", '{"uri": 5, "label": 1}\n', r"m.jsonl: line 1: uri is empty or not a string \(5\)"),
        (
            "m.jsonl",
            '{"uri": "a.png", "label": 1, "group": "g"}\n{"uri": "b.png", "label": 0}\n',
            r"m.jsonl: line 2: no 'group' key, but line 1 has one; give every line a group or none",
        ),
        (
            "m.csv",
            "uri,label\na.png,1\nmissing.png,0\nb.png,0\ngone.png,1\n",
            r"m.csv: line 3: image file not found or unreadable: .*missing.png; 2 of 4 image\(s\) missing: "
            r"line 3: .*missing.png; line 5: .*gone.png\. Fix the paths",
        ),
    ],
)
def test_bad_manifest(images: Path, name: str, text: str, message: str) -> None:
    path = write(images, name, text)
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_many_missing_images_are_counted_not_all_listed(images: Path) -> None:
    text = "uri,label\n" + "".join(f"none{i}.png,{i % 2}\n" for i in range(12))
    with pytest.raises(DataError, match=r"12 of 12 image\(s\) missing: .*none4.png \(and 7 more\)"):
        load_dataset(write(images, "m.csv", text))


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.csv: no such file or folder; pass a manifest"):
        load_dataset(tmp_path / "nowhere.csv")
    with pytest.raises(
        DataError, match=r"data.txt: unsupported dataset file; a manifest must end in .csv, .jsonl"
    ):
        load_dataset(write(tmp_path, "data.txt", "uri,label\n"))


def test_bad_image_folder_trees(images: Path) -> None:
    root = images / "tree"
    (root / "0").mkdir(parents=True)
    with pytest.raises(DataError, match=r"tree: no images found; an image-folder dataset needs images in 0/"):
        load_dataset(root)
    shutil.copy(images / "a.png", root / "0" / "a.png")
    (root / "cats").mkdir()
    shutil.copy(images / "b.png", root / "cats" / "b.png")
    with pytest.raises(
        DataError, match=r"tree: unexpected folder 'cats' .*holds only 0/ \(negatives\) and 1/"
    ):
        load_dataset(root)
    shutil.rmtree(root / "cats")
    (root / "0" / "labels.txt").write_text("x")
    with pytest.raises(DataError, match=r"0/labels.txt: not an image file \(accepted extensions: .png, .jpg"):
        load_dataset(root)
    (root / "0" / "labels.txt").unlink()
    assert load_dataset(root).labels.tolist() == [0]
