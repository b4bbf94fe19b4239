"""Image decoding and validation: bytes in, an RGB PIL image out, or a reason code.

Two entry points share one pipeline (open -> header checks -> decode -> EXIF
orientation -> RGB):

- `decode_image` is the ingest stage's full check: limits on bytes, pixels and
  sides, and a digest of the decoded pixels for exact-duplicate detection.
- `open_rgb` is the embed stage's fast path: the same normalisation, but JPEGs
  are decoded at a reduced scale with `Image.draft` and nothing is hashed.

PIL's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, a process-wide
setting) stays on, so a `max_pixels` above it is capped by PIL.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from megapairs.config import IngestConfig
from megapairs.registry import Registry

WHITE = (255, 255, 255)
DEFAULT_MAX_PIXELS = IngestConfig().max_pixels


class ImageRejected(Exception):
    """An image that cannot be used: `reason` is a short code, `detail` a sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """What an acceptable image looks like."""

    min_side: int
    max_pixels: int
    max_bytes: int

    @classmethod
    def from_config(cls, config: IngestConfig) -> ImageLimits:
        return cls(config.min_side, config.max_pixels, config.max_bytes)


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded, upright RGB image and what it was before conversion."""

    image: Image.Image
    width: int
    height: int
    source_format: str
    source_mode: str
    pixel_sha256: str


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode and validate `data`; raise ImageRejected with a reason code when unusable."""
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "too_large_file",
            f"file has {len(data)} bytes, more than the {limits.max_bytes} allowed",
        )
    with _pil_bomb_guard():
        image = _open(data, limits.max_pixels)
        source_format, source_mode = image.format or "unknown", image.mode
        _load(image)
    rgb = normalise(image)
    width, height = rgb.size
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            "too_small", f"image is {width}x{height}, a side is under {limits.min_side} px"
        )
    return DecodedImage(rgb, width, height, source_format, source_mode, pixel_digest(rgb))


def open_rgb(
    data: bytes,
    *,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `data` to an upright RGB image, JPEGs at a reduced scale near `draft_size`."""
    with _pil_bomb_guard():
        image = _open(data, max_pixels)
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", draft_size)
        _load(image)
    return normalise(image)


def pixel_digest(image: Image.Image) -> str:
    """sha256 over the size and the RGB bytes: equal iff the decoded pictures are equal."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def normalise(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB (alpha composited on white)."""
    with contextlib.suppress(Exception):  # a broken EXIF block must not cost the picture
        ImageOps.exif_transpose(image, in_place=True)
    mode = image.mode
    converter = MODE_CONVERTERS.get(mode) if mode in MODE_CONVERTERS else _convert_generic
    return converter(image)


# opening and decoding ------------------------------------------------------


@contextlib.contextmanager
def _pil_bomb_guard() -> Iterator[None]:
    """Turn PIL's decompression-bomb warning into an error, and both into a rejection."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected("decompression_bomb", f"PIL refused the image: {err}") from err


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image and check its header size, before any pixel is decoded."""
    if not data:
        raise ImageRejected("empty", "the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", "PIL cannot identify the bytes as an image") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as err:  # PIL raises many types on malformed headers
        raise ImageRejected("corrupt", f"cannot read the image header: {_describe(err)}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"image header says {width}x{height} = {width * height} pixels, "
            f"more than the {max_pixels} allowed",
        )
    return image


def _load(image: Image.Image) -> None:
    """Decode every pixel; a short file is `truncated`, anything else `corrupt`."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as err:  # PIL raises many types on malformed data
        reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise ImageRejected(
            reason, f"cannot decode the {image.format} image: {_describe(err)}"
        ) from err


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


# conversion to RGB, by source mode ----------------------------------------

MODE_CONVERTERS: Registry[Image.Image] = Registry("image mode converter")


@MODE_CONVERTERS.register("RGBA")
@MODE_CONVERTERS.register("RGBa")
@MODE_CONVERTERS.register("LA")
@MODE_CONVERTERS.register("La")
@MODE_CONVERTERS.register("PA")
def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


@MODE_CONVERTERS.register("RGB")
@MODE_CONVERTERS.register("L")
@MODE_CONVERTERS.register("P")
def _maybe_keyed_transparency(image: Image.Image) -> Image.Image:
    """Modes that may carry a transparent colour (PNG tRNS, GIF): composite when they do."""
    if "transparency" in image.info:
        return _composite_on_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


@MODE_CONVERTERS.register("I;16")
@MODE_CONVERTERS.register("I;16L")
@MODE_CONVERTERS.register("I;16B")
@MODE_CONVERTERS.register("I;16N")
@MODE_CONVERTERS.register("I")
def _sixteen_bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey (0..65535; mode I holds it too) to 8 bits, rather than clip."""
    values = np.asarray(image).astype(np.float64)
    grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _convert_generic(image: Image.Image) -> Image.Image:
    """1, CMYK, YCbCr, F and the rest: PIL's own conversion."""
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageRejected(
            "corrupt", f"cannot convert mode {image.mode} to RGB: {_describe(err)}"
        ) from err
