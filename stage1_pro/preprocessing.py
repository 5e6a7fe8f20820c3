"""The one preprocessing path from an image (file, ``gs://`` URI, bytes or PIL image) to the network's input.

``prepare`` (whose pixels training, ``scores.npz`` and so the certificate see), ExPLoRA, the
:class:`~stage1_pro.inference.Predictor` and any serving code call these functions, so the pixels
certified are the pixels served. The steps, with the :class:`PixelSpec` /
:class:`PreprocessSpec` field that governs each:

1. **decode** (``decode_mode``): ``draft`` lets libjpeg decode a JPEG at the smallest scale of
   1/1, 1/2, 1/4 or 1/8 that keeps both sides >= ``size`` (Pillow's ``Image.draft``; a 12-MP photo
   decodes about twice as fast); other formats, and every image with ``full``, decode at full size.
2. **orientation**: the EXIF orientation tag is applied (``ImageOps.exif_transpose``).
3. **RGB**: 16-bit greyscale keeps its high byte (as Pillow does for 16-bit RGB); palette images go
   through RGBA; every other mode (L, LA, RGBA, CMYK, 1, ...) is converted with Pillow's
   ``convert("RGB")``. Alpha is dropped, not composited: the colour stored under a transparent
   pixel is what the model sees.
4. **geometry** (``resize_mode``, ``size``, ``interpolation``): ``squash`` resizes the whole image
   to ``size x size``; ``center_crop`` first cuts the central square of side ``s = min(w, h)`` at
   ``left = round((w - s) / 2)``, ``top = round((h - s) / 2)`` (torchvision's ``center_crop``
   offsets), then resizes it. Pillow's resampling (antialiased when shrinking).
5. **normalise** (``mean``, ``std``, from the model's timm data config): ``(x / 255 - mean) / std``,
   float32 NCHW.

Steps 1-4 give the ``uint8`` HWC array :func:`load_pixels` returns and ``prepare`` stores; step 5
runs where the batch is (on the GPU during training). The pixel part of the spec is recorded in the
prepared index and in ``model.json`` (``preprocessing``: the three modes, beside ``img_size``,
``mean`` and ``std``), so it travels in the bundle; :meth:`PreprocessSpec.from_model_info` reads
it back and training refuses shards prepared with another one. Records written before the spec
existed mean the defaults (draft, squash, bilinear): what every earlier version did.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from stage1_pro import storage
from stage1_pro.defaults import (
    DECODE_MODES,
    DEFAULT_DECODE_MODE,
    DEFAULT_INTERPOLATION,
    DEFAULT_RESIZE_MODE,
    INTERPOLATIONS,
    RESIZE_MODES,
    check_choice,
)
from stage1_pro.errors import ArtifactError, ConfigError, DataError, StorageError

if TYPE_CHECKING:
    import torch

    from stage1_pro.config import Stage1ProConfig

#: What :func:`load_pixels` accepts: a local path or ``gs://`` URI, encoded bytes, or a PIL image.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

#: Name of the spec's record in ``model.json`` and the prepared ``index.json``.
RECORD_KEY = "preprocessing"

_RESAMPLING: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_SETTING_NAMES = {"size": "img_size"}  # PixelSpec field -> config field / CLI flag
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class PixelSpec:
    """How an image becomes the ``uint8`` array ``(size, size, 3)`` that is stored and normalised.

    Attributes:
        size: square side in pixels (the config's ``img_size``).
        resize_mode: ``squash`` | ``center_crop`` (see the module docstring).
        decode_mode: ``draft`` | ``full``.
        interpolation: ``bilinear`` | ``bicubic``.

    Raises:
        ConfigError: a size below 1 or a mode outside the allowed values (listed).
    """

    size: int
    resize_mode: str = DEFAULT_RESIZE_MODE
    decode_mode: str = DEFAULT_DECODE_MODE
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int | np.integer) or self.size < 1:
            raise ConfigError(f"img_size={self.size!r} must be an integer >= 1")
        object.__setattr__(self, "size", int(self.size))
        check_choice(self.resize_mode, RESIZE_MODES, "resize_mode")
        check_choice(self.decode_mode, DECODE_MODES, "decode_mode")
        check_choice(self.interpolation, INTERPOLATIONS, "interpolation")

    @classmethod
    def from_config(cls, config: Stage1ProConfig) -> PixelSpec:
        """The spec a training config asks for (``img_size``, ``resize_mode``, ...)."""
        return cls(config.img_size, config.resize_mode, config.decode_mode, config.interpolation)

    @classmethod
    def from_record(cls, size: int, record: dict[str, Any] | None, source: str = "<record>") -> PixelSpec:
        """Rebuild from ``img_size`` and a ``preprocessing`` record (None: the pre-spec defaults).

        Raises:
            ArtifactError: naming ``source``, for a record with unknown keys or values.
        """
        record = record or {}
        unknown = sorted(set(record) - {f.name for f in fields(cls) if f.name != "size"})
        if unknown:
            raise ArtifactError(f"{source}: unknown preprocessing setting(s) {', '.join(unknown)}")
        try:
            return cls(int(size), **record)
        except ConfigError as exc:
            raise ArtifactError(
                f"{source}: {exc}; this stage1-pro cannot reproduce that preprocessing"
            ) from exc

    def record(self) -> dict[str, str]:
        """The modes as written under ``preprocessing`` (``img_size`` is recorded beside it)."""
        return {
            "resize_mode": self.resize_mode,
            "decode_mode": self.decode_mode,
            "interpolation": self.interpolation,
        }

    def differences(self, other: PixelSpec) -> dict[str, tuple[Any, Any]]:
        """``{setting: (mine, other's)}`` for every setting that differs, named as config fields."""
        return {
            _SETTING_NAMES.get(f.name, f.name): (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``64 px, squash, bilinear, JPEG draft decoding``."""
        decode = "JPEG draft decoding" if self.decode_mode == "draft" else "full decoding"
        return f"{self.size} px, {self.resize_mode}, {self.interpolation}, {decode}"


@dataclass(frozen=True)
class PreprocessSpec:
    """The whole path from an image to the network's input: the pixel steps plus the normalisation.

    Attributes:
        pixels: decode, RGB conversion and geometry (:class:`PixelSpec`).
        mean: per-channel mean of ``(x / 255 - mean) / std`` (the model's timm data config).
        std: per-channel standard deviation.
    """

    pixels: PixelSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> int:
        """Square side in pixels of the network's input."""
        return self.pixels.size

    @classmethod
    def from_model_info(cls, info: dict[str, Any], source: str = "model.json") -> PreprocessSpec:
        """Read the spec of a ``model.json`` dict (``img_size``, ``mean``, ``std``, ``preprocessing``).

        Raises:
            ArtifactError: naming ``source``, for a recorded mode this version cannot reproduce.
        """
        pixels = PixelSpec.from_record(info["img_size"], info.get(RECORD_KEY), source)
        return cls(pixels, tuple(float(m) for m in info["mean"]), tuple(float(s) for s in info["std"]))

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON view: ``size``, the three modes, ``mean``, ``std``."""
        return {**asdict(self.pixels), "mean": list(self.mean), "std": list(self.std)}


# ------------------------------------------------------------------------------------------
# the steps


def describe_source(source: Any) -> str:
    """How errors name an input: its path/URI, or its type for in-memory inputs."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def decode_image(source: ImageSource, spec: PixelSpec | None = None) -> Image.Image:
    """Read and decode one image, upright (EXIF orientation applied); its mode is left as stored.

    Args:
        source: local path, ``gs://`` URI, encoded bytes, or a PIL image (an image not yet loaded,
            as ``Image.open`` returns it, can still be draft-decoded; it is loaded in place).
        spec: with ``decode_mode="draft"``, a JPEG is decoded at the scale the spec allows;
            None decodes at full size.

    Raises:
        DataError: naming the source, when it cannot be read or decoded.
    """
    where = describe_source(source)
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, bytes | bytearray | memoryview):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str | os.PathLike):
            try:
                data = storage.read_bytes(str(source))
            except StorageError as exc:
                raise DataError(f"cannot read image: {exc}") from exc
            image = Image.open(io.BytesIO(data))
        else:
            raise DataError(
                f"cannot read an image from a {type(source).__name__}: pass a path, a gs:// URI, bytes "
                "or a PIL image"
            )
        if spec is not None and spec.decode_mode == "draft" and image.format == "JPEG":
            if image.tile:  # not decoded yet: libjpeg can still scale while decoding
                image.draft("RGB", (spec.size, spec.size))
            elif min(image.size) >= 2 * spec.size:
                warnings.warn(
                    f"{where}: an already decoded JPEG was given, so JPEG draft decoding (in the "
                    "preprocessing this model was calibrated with) cannot be applied and the pixels "
                    "differ slightly; pass the file, its bytes, or Image.open(...) before .load()",
                    stacklevel=2,
                )
        image.load()
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"{where}: cannot decode image ({exc}); re-export the file or remove it from the dataset"
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB (see the module docstring, step 3)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_GREY:
        high_byte = np.right_shift(np.clip(np.asarray(image, dtype=np.int64), 0, 65535), 8)
        return Image.fromarray(high_byte.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")  # applies a transparency entry of the palette
    return image.convert("RGB")


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square ``(left, top, right, bottom)`` of a ``width x height`` image."""
    side = min(width, height)
    left = round((width - side) / 2.0)  # Python rounds half to even, as torchvision
    top = round((height - side) / 2.0)
    return left, top, left + side, top + side


def fit(image: Image.Image, spec: PixelSpec) -> Image.Image:
    """Bring an RGB image to ``spec.size`` squared by the spec's resize mode and interpolation."""
    if spec.resize_mode == "center_crop" and image.width != image.height:
        image = image.crop(center_crop_box(image.width, image.height))
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), _RESAMPLING[spec.interpolation])
    return image


def load_pixels(source: ImageSource, spec: PixelSpec) -> np.ndarray:
    """Steps 1-4: one image -> ``uint8`` array ``(size, size, 3)``, RGB. What ``prepare`` stores.

    Raises:
        DataError: naming the source, when it cannot be read or decoded.
    """
    image = fit(to_rgb(decode_image(source, spec)), spec)
    return np.asarray(image, dtype=np.uint8)


def to_input(pixels: np.ndarray | Sequence[np.ndarray], spec: PreprocessSpec) -> torch.Tensor:
    """Step 5: ``uint8`` arrays ``(n, size, size, 3)`` -> normalised float32 ``(n, 3, size, size)``.

    Raises:
        DataError: arrays of another shape than the spec's.
    """
    import torch

    from stage1_pro.transforms import normalize

    batch = np.stack(list(pixels)) if not isinstance(pixels, np.ndarray) else pixels
    expected = (spec.size, spec.size, 3)
    if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.uint8:
        raise DataError(
            f"pixel arrays must be uint8 (n, {', '.join(map(str, expected))}) as load_pixels makes them "
            f"for this spec ({spec.pixels.describe()}); got {batch.dtype} {batch.shape}"
        )
    return normalize(torch.from_numpy(np.ascontiguousarray(batch)), spec.mean, spec.std)


def preprocess(spec: PreprocessSpec, sources: Sequence[ImageSource]) -> torch.Tensor:
    """Steps 1-5 for a list of images -> the network's input ``(n, 3, size, size)``.

    Raises:
        DataError: naming the first image that cannot be read or decoded.
    """
    return to_input([load_pixels(source, spec.pixels) for source in sources], spec)
