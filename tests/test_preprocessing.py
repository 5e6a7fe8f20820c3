"""The one preprocessing path: its spec, each step, every image format, and parity between what
``prepare`` stores (so ``scores.npz``, so the certificate) and what a Predictor serves.

Every image is generated here with Pillow from crops of scikit-learn's sample photos (real JPEG
content): JPEG baseline, progressive, EXIF-rotated, CMYK and greyscale; PNG palette, palette with a
transparent entry, RGBA, grey + alpha, 16-bit grey and 16-bit RGB; WebP lossy and with alpha.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_pro import defaults
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.preprocessing import (
    PixelSpec,
    PreprocessSpec,
    center_crop_box,
    decode_image,
    load_pixels,
    preprocess,
    to_input,
)

ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------
# image generators


@functools.cache
def sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg; 640 x 427), shipped in its wheel."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A ``height x width`` RGB crop of a sample photo, resized (real-photo JPEG statistics)."""
    rng = np.random.default_rng(seed)
    source = sample_photos()[seed % 2]
    h, w, _ = source.shape
    ch, cw = int(rng.integers(h // 3, h)), int(rng.integers(w // 3, w))
    y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
    crop = Image.fromarray(source[y : y + ch, x : x + cw])
    return np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC))


def png16(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written by the PNG spec."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _alpha(rgb: np.ndarray) -> np.ndarray:
    h, w, _ = rgb.shape
    return (np.linspace(0, 255, w)[None, :] * np.ones((h, 1))).astype(np.uint8)


def _palette_transparent(rgb: np.ndarray) -> bytes:
    image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return _save(image, "PNG", transparency=int(np.asarray(image)[0, 0]))


def _sixteen_bit_grey(rgb: np.ndarray) -> bytes:
    grey = rgb.astype(np.uint16).sum(axis=2) * 85  # 0 .. 65025: needs the high byte, not a clip
    return _save(Image.fromarray(grey.astype(np.uint16)), "PNG")


def _sixteen_bit_rgb(rgb: np.ndarray) -> bytes:
    return png16(rgb.astype(np.uint16) * 257)


#: name -> (file suffix, encoder of an RGB array to the file's bytes)
FORMATS: dict[str, tuple[str, Callable[[np.ndarray], bytes]]] = {
    "jpeg-baseline": (".jpg", lambda a: _save(Image.fromarray(a), "JPEG", quality=90)),
    "jpeg-progressive": (".jpg", lambda a: _save(Image.fromarray(a), "JPEG", quality=85, progressive=True)),
    "jpeg-exif-rotated": (".jpg", lambda a: _save(Image.fromarray(a), "JPEG", quality=90, exif=_exif(6))),
    "jpeg-cmyk": (".jpg", lambda a: _save(Image.fromarray(a).convert("CMYK"), "JPEG", quality=90)),
    "jpeg-grey": (".jpg", lambda a: _save(Image.fromarray(a).convert("L"), "JPEG", quality=90)),
    "png-palette": (".png", lambda a: _save(Image.fromarray(a).quantize(256), "PNG")),
    "png-palette-transparent": (".png", _palette_transparent),
    "png-rgba": (".png", lambda a: _save(Image.fromarray(np.dstack([a, _alpha(a)]), "RGBA"), "PNG")),
    "png-grey-alpha": (".png", lambda a: _save(Image.fromarray(np.dstack([a[..., 0], _alpha(a)])), "PNG")),
    "png-16bit-grey": (".png", _sixteen_bit_grey),
    "png-16bit-rgb": (".png", _sixteen_bit_rgb),
    "webp": (".webp", lambda a: _save(Image.fromarray(a), "WEBP", quality=80)),
    "webp-alpha": (".webp", lambda a: _save(Image.fromarray(np.dstack([a, _alpha(a)]), "RGBA"), "WEBP")),
}  # fmt: skip
EXPECTED_MODE = {
    "jpeg-cmyk": "CMYK", "jpeg-grey": "L", "png-palette": "P", "png-palette-transparent": "P",
    "png-rgba": "RGBA", "png-grey-alpha": "LA", "png-16bit-grey": "I;16", "webp-alpha": "RGBA",
}  # fmt: skip


def write_format(folder: Path, name: str, rgb: np.ndarray, tag: str = "") -> Path:
    suffix, encode = FORMATS[name]
    path = folder / f"{name}{tag}{suffix}"
    path.write_bytes(encode(rgb))
    return path


@pytest.fixture(scope="module")
def format_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per format, 400 x 300 (JPEG draft decoding scales these by 1/4 at 64 px)."""
    folder = tmp_path_factory.mktemp("formats")
    rgb = photo(400, 300, seed=1)
    return {name: write_format(folder, name, rgb) for name in FORMATS}


SPEC = PixelSpec(64)


# ------------------------------------------------------------------------------------------
# the spec


def test_spec_defaults_are_the_pre_spec_behaviour_and_the_schema_allows_the_constants() -> None:
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.schemas import schemas_dir

    assert (SPEC.resize_mode, SPEC.decode_mode, SPEC.interpolation) == ("squash", "draft", "bilinear")
    assert PixelSpec.from_config(Stage1ProConfig()) == PixelSpec(64)
    common = json.loads((schemas_dir() / "common.schema.json").read_text())["$defs"]["preprocessing"]
    for key, allowed in (
        ("resize_mode", defaults.RESIZE_MODES),
        ("decode_mode", defaults.DECODE_MODES),
        ("interpolation", defaults.INTERPOLATIONS),
    ):
        assert tuple(common["properties"][key]["enum"]) == allowed
    assert set(SPEC.record()) == set(common["required"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, r"img_size=0 must be an integer >= 1"),
        ({"size": 64, "resize_mode": "crop"}, r"resize_mode='crop'; allowed: squash, center_crop"),
        ({"size": 64, "decode_mode": "fast"}, r"decode_mode='fast'; allowed: draft, full"),
        ({"size": 64, "interpolation": "lanczos"}, r"interpolation='lanczos'; allowed: bilinear, bicubic"),
    ],
)
def test_bad_spec_values_name_the_setting_and_the_allowed_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PixelSpec(**kwargs)


def test_config_refuses_an_unknown_resize_mode() -> None:
    from stage1_pro.config import Stage1ProConfig

    with pytest.raises(
        ConfigError, match=r"\$\.resize_mode: 'crop' is not one of \['squash', 'center_crop'\]"
    ):
        Stage1ProConfig.from_dict({"resize_mode": "crop"})
    with pytest.raises(ConfigError, match=r"decode_mode='fast'; allowed: draft, full"):
        Stage1ProConfig(decode_mode="fast")
    assert Stage1ProConfig(resize_mode="center_crop").resize_mode == "center_crop"


def test_record_round_trip_legacy_records_and_bad_records() -> None:
    spec = PixelSpec(32, "center_crop", "full", "bicubic")
    assert PixelSpec.from_record(32, spec.record()) == spec
    assert PixelSpec.from_record(48, None) == PixelSpec(48)  # written before the spec existed
    with pytest.raises(ArtifactError, match=r"m.json: unknown preprocessing setting\(s\) gamma"):
        PixelSpec.from_record(32, {**spec.record(), "gamma": 2.2}, "m.json")
    with pytest.raises(ArtifactError, match=r"m.json: resize_mode='letterbox'; allowed: .*cannot reproduce"):
        PixelSpec.from_record(32, {**spec.record(), "resize_mode": "letterbox"}, "m.json")
    assert spec.differences(PixelSpec(32)) == {
        "resize_mode": ("center_crop", "squash"),
        "decode_mode": ("full", "draft"),
        "interpolation": ("bicubic", "bilinear"),
    }
    assert PixelSpec(64).differences(PixelSpec(32)) == {"img_size": (64, 32)}


def test_model_json_records_the_spec(tmp_path: Path) -> None:
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.models import create_model, save_model_info

    config = Stage1ProConfig(
        model_name="test_efficientnet", pretrained=False, img_size=40, resize_mode="center_crop"
    )
    save_model_info(create_model(config).info, str(tmp_path / "model.json"))
    info = read_artifact(tmp_path / "model.json", "model")
    spec = PreprocessSpec.from_model_info(info)
    assert spec.pixels == PixelSpec(40, "center_crop")
    assert spec.to_dict() == {
        "size": 40, "resize_mode": "center_crop", "decode_mode": "draft", "interpolation": "bilinear",
        "mean": info["mean"], "std": info["std"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------
# decode: one function for every source


def test_every_source_form_gives_the_same_pixels(format_files: dict[str, Path]) -> None:
    for name, path in format_files.items():
        by_path = load_pixels(path, SPEC)
        assert by_path.shape == (64, 64, 3) and by_path.dtype == np.uint8, name
        assert np.array_equal(load_pixels(str(path), SPEC), by_path), name
        assert np.array_equal(load_pixels(path.read_bytes(), SPEC), by_path), name
        assert np.array_equal(load_pixels(bytearray(path.read_bytes()), SPEC), by_path), name
        assert np.array_equal(load_pixels(Image.open(path), SPEC), by_path), name  # not yet decoded


def test_decoded_modes_are_what_the_files_hold(format_files: dict[str, Path]) -> None:
    """The formats really are what they claim (the conversions below are exercised)."""
    for name, path in format_files.items():
        assert Image.open(path).mode == EXPECTED_MODE.get(name, "RGB"), name
    assert "progressive" in Image.open(format_files["jpeg-progressive"]).info


def test_exif_orientation_is_applied(format_files: dict[str, Path]) -> None:
    path = format_files["jpeg-exif-rotated"]
    stored = np.asarray(Image.open(path))  # 300 x 400 as stored, tag 6: display rotated 90 CW
    upright = np.asarray(decode_image(path))
    assert stored.shape[:2] == (300, 400) and upright.shape[:2] == (400, 300)
    assert np.array_equal(upright, np.rot90(stored, k=-1))
    spec = PixelSpec(100, "center_crop", "full")
    assert np.array_equal(load_pixels(path, spec), np.asarray(Image.fromarray(np.rot90(stored, k=-1)).crop(
        (0, 50, 300, 350)).resize((100, 100), Image.Resampling.BILINEAR)))  # fmt: skip


def test_rgb_conversions(tmp_path: Path) -> None:
    rgb = photo(40, 30, seed=3)
    spec = PixelSpec(40, decode_mode="full")  # no resize when the size is kept: squash of 40 x 30 -> 40 x 40
    full = PixelSpec(30, "center_crop", "full")  # 30 x 30 centre: no resampling at all
    box = center_crop_box(40, 30)
    centre = rgb[box[1] : box[3], box[0] : box[2]]

    grey16 = load_pixels(write_format(tmp_path, "png-16bit-grey", rgb), full)
    expected = (rgb.astype(np.uint16).sum(axis=2) * 85 >> 8).astype(np.uint8)[
        box[1] : box[3], box[0] : box[2]
    ]
    assert np.array_equal(grey16, np.repeat(expected[..., None], 3, axis=2))  # high byte, not saturated
    assert grey16.max() > 100 and (grey16 < 255).mean() > 0.9

    rgb16 = load_pixels(write_format(tmp_path, "png-16bit-rgb", rgb), full)
    assert np.array_equal(rgb16, centre)  # (v * 257) >> 8 == v

    rgba = load_pixels(write_format(tmp_path, "png-rgba", rgb), full)
    assert np.array_equal(rgba, centre)  # alpha dropped, the stored colours kept

    grey_alpha = load_pixels(write_format(tmp_path, "png-grey-alpha", rgb), full)
    assert np.array_equal(grey_alpha, np.repeat(centre[..., :1], 3, axis=2))

    grey_jpeg = load_pixels(write_format(tmp_path, "jpeg-grey", rgb), spec)
    assert np.array_equal(grey_jpeg[..., 0], grey_jpeg[..., 1]) and np.array_equal(
        grey_jpeg[..., 0], grey_jpeg[..., 2]
    )

    cmyk = load_pixels(write_format(tmp_path, "jpeg-cmyk", rgb), full).astype(int)
    baseline = load_pixels(write_format(tmp_path, "jpeg-baseline", rgb), full).astype(int)
    assert np.abs(cmyk - centre).mean() < 2 * np.abs(baseline - centre).mean() + 2  # colours, not inverted

    palette_path = write_format(tmp_path, "png-palette-transparent", rgb)
    image = Image.open(palette_path)
    palette_rgb = np.asarray(image.convert("RGBA"))[..., :3]
    assert np.array_equal(load_pixels(palette_path, full), palette_rgb[box[1] : box[3], box[0] : box[2]])


def test_decode_errors_name_the_source(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(FORMATS["png-rgba"][1](photo(8, 8))[:40])
    with pytest.raises(DataError, match=r"broken.png: cannot decode image .*re-export the file or remove it"):
        load_pixels(tmp_path / "broken.png", SPEC)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"text.jpg: cannot decode image \(cannot identify image file"):
        decode_image(tmp_path / "text.jpg")
    with pytest.raises(DataError, match=r"cannot read image: .*nope.png: file not found"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match=r"<12 bytes>: cannot decode image"):
        load_pixels(b"not an image", SPEC)
    with pytest.raises(DataError, match=r"cannot read an image from a int: pass a path, a gs:// URI, bytes"):
        load_pixels(7, SPEC)  # type: ignore[arg-type]


def test_an_already_decoded_big_jpeg_is_served_with_a_warning(format_files: dict[str, Path]) -> None:
    path = format_files["jpeg-baseline"]
    loaded = Image.open(path)
    loaded.load()  # full decode: draft decoding can no longer be applied
    with pytest.warns(UserWarning, match=r"already decoded JPEG .*pass the file, its bytes, or Image.open"):
        served = load_pixels(loaded, SPEC)
    assert not np.array_equal(served, load_pixels(path, SPEC))  # why the warning matters


# ------------------------------------------------------------------------------------------
# decode modes and geometry


def test_draft_and_full_decoding(format_files: dict[str, Path]) -> None:
    path = format_files["jpeg-baseline"]  # 400 x 300 at 64 px: libjpeg decodes at 1/4 (100 x 75)
    with Image.open(path) as image:
        full_reference = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    draft, full = load_pixels(path, SPEC), load_pixels(path, PixelSpec(64, decode_mode="full"))
    assert np.array_equal(full, full_reference)
    assert not np.array_equal(draft, full)
    assert np.abs(draft.astype(int) - full.astype(int)).mean() < 6  # close, not equal
    with Image.open(path) as image:
        image.draft("RGB", (64, 64))
        assert image.size == (100, 75)
        assert np.array_equal(
            draft, np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
        )
    png = format_files["png-rgba"]  # draft concerns JPEGs only
    assert np.array_equal(load_pixels(png, SPEC), load_pixels(png, PixelSpec(64, decode_mode="full")))


@pytest.mark.parametrize(("width", "height"), [(41, 30), (40, 30), (30, 41), (30, 30)])
def test_center_crop_box_is_torchvisions(width: int, height: int) -> None:
    side = min(width, height)
    left, top, right, bottom = center_crop_box(width, height)
    # torchvision.transforms.functional.center_crop: int(round((size - crop) / 2.0))
    assert (left, top) == (int(round((width - side) / 2.0)), int(round((height - side) / 2.0)))  # noqa: RUF046
    assert (right - left, bottom - top) == (side, side)


def test_squash_keeps_the_whole_image_center_crop_its_middle(tmp_path: Path) -> None:
    bands = np.zeros((60, 180, 3), dtype=np.uint8)
    bands[:, :60] = (255, 0, 0)  # red left third, green middle, blue right third
    bands[:, 60:120] = (0, 255, 0)
    bands[:, 120:] = (0, 0, 255)
    path = tmp_path / "bands.png"
    Image.fromarray(bands).save(path)
    squash = load_pixels(path, PixelSpec(30))
    crop = load_pixels(path, PixelSpec(30, "center_crop"))
    assert squash[15, 2].tolist() == [255, 0, 0] and squash[15, 27].tolist() == [0, 0, 255]
    assert (crop == np.array([0, 255, 0], dtype=np.uint8)).all()  # only the middle square
    bicubic = load_pixels(path, PixelSpec(30, interpolation="bicubic"))
    assert bicubic.shape == (30, 30, 3) and not np.array_equal(bicubic, squash)  # filter differs at edges


def test_preprocess_normalises_with_the_spec() -> None:
    spec = PreprocessSpec(PixelSpec(8), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    grey = Image.fromarray(np.full((10, 20), 200, dtype=np.uint8))
    x = preprocess(spec, [grey, grey])
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    np.testing.assert_allclose(
        x[0, :, 0, 0].numpy(), [(200 / 255 - 0.5) / 0.5, (200 / 255 - 0.25) / 0.25, 200 / 255], rtol=1e-6
    )
    with pytest.raises(
        DataError, match=r"pixel arrays must be uint8 \(n, 8, 8, 3\) .*got uint8 \(1, 9, 9, 3\)"
    ):
        to_input(np.zeros((1, 9, 9, 3), dtype=np.uint8), spec)


# ------------------------------------------------------------------------------------------
# parity: prepared pixels, scores.npz and the Predictor, for every format


@pytest.mark.slow
@pytest.mark.parametrize("resize_mode", ["squash", "center_crop"])
def test_scores_rows_equal_predictor_outputs_for_every_format(resize_mode: str, tmp_path: Path) -> None:
    """Train (tiny network, one epoch) on images of every format, then: each prepared row holds
    exactly ``load_pixels`` of its file, and the Predictor's probabilities on the files equal their
    rows in scores.npz (float32 CPU on both sides: equal up to summation order)."""
    import csv

    from bundle_helpers import make_run

    from stage1_pro.artifacts import read_artifact
    from stage1_pro.config import Stage1ProConfig
    from stage1_pro.inference import Predictor
    from stage1_pro.models import load_model
    from stage1_pro.policies import load_policy
    from stage1_pro.prepare import open_prepared
    from stage1_pro.scores import load_scores
    from stage1_pro.splits import split_dataset
    from stage1_pro.training import train
    from stage1_pro.training.loaders import ShardBatches

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for name in FORMATS:
        for copy in range(4):
            width, height = int(rng.integers(70, 500)), int(rng.integers(70, 500))
            path = write_format(data, name, photo(width, height, seed=int(rng.integers(1000))), f"-{copy}")
            rows.append((path.name, copy % 2))
    with (data / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("uri", "label"), *rows])
    split_dataset(str(data / "manifest.csv"), str(tmp_path / "splits.json"), fractions=[0.25] * 4)
    config = Stage1ProConfig(
        model_name="test_efficientnet", pretrained=False, img_size=32, resize_mode=resize_mode,
        epochs=1, batch_size=8, num_workers=0, log_every=1000,
    )  # fmt: skip
    run = tmp_path / "run"
    train(
        config,
        data_uri=str(data / "manifest.csv"),
        splits_uri=str(tmp_path / "splits.json"),
        out_dir=str(run),
    )

    uris = [str(data / name) for name, _ in rows]
    prepared = open_prepared(str(run / "prepared"))
    assert prepared.pixel_spec == PixelSpec(32, resize_mode)
    shards = ShardBatches(prepared.shard_paths, prepared.shard, prepared.offset, prepared.label)
    stored = shards[list(range(len(prepared.index)))][0].numpy()
    for position, row in enumerate(prepared.index):
        assert np.array_equal(stored[position], load_pixels(uris[row], PixelSpec(32, resize_mode))), uris[row]

    scores = load_scores(str(run / "scores.npz"))
    scored = [uris[i] for i in scores.index]
    assert {Path(u).name.rsplit("-", 1)[0] for u in scored} == set(FORMATS)  # every format is scored
    info = read_artifact(run / "model.json", "model")
    assert info["preprocessing"]["resize_mode"] == resize_mode
    assert info["scored_with"] == {"device": "cpu", "precision": "fp32"}
    # a feasible policy from known scores (52 images certify nothing); only probabilities are compared
    policy = load_policy(str(make_run(tmp_path / "policy-run", validate=False) / "thresholds.json"))
    predictor = Predictor(load_model(run), policy, info)
    probs, _ = predictor.model_outputs(scored, batch_size=5)
    np.testing.assert_allclose(probs, scores.probs, atol=1e-6)
    served = predictor.predict(scored, batch_size=7)
    np.testing.assert_allclose([p.probs for p in served], scores.probs, atol=1e-6)
