"""Image decoding: reason codes for bad bytes, conversion of odd modes to RGB, the fast path."""

from __future__ import annotations

import numpy as np
import pytest
from corpus_fixtures import (
    corrupt_png,
    encode,
    exif_rotated_jpeg,
    halves_image,
    jpeg_bytes,
    noise_image,
    png_bytes,
    truncated,
)
from PIL import Image

from megapairs.config import IngestConfig
from megapairs.corpus.images import ImageLimits, ImageRejected, decode_image, open_rgb

LIMITS = ImageLimits(min_side=8, max_pixels=1_000_000, max_bytes=1_000_000)
WHITE = (255, 255, 255)


def rejection(data: bytes, limits: ImageLimits = LIMITS) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, limits)
    assert caught.value.detail, "a rejection must explain itself"
    return caught.value


def test_limits_come_from_the_ingest_config():
    limits = ImageLimits.from_config(IngestConfig(min_side=5, max_pixels=600, max_bytes=700))
    assert limits == ImageLimits(min_side=5, max_pixels=600, max_bytes=700)


def test_decodes_a_jpeg_with_its_metadata():
    decoded = decode_image(jpeg_bytes(size=(64, 48)), LIMITS)
    assert (decoded.width, decoded.height) == (64, 48)
    assert decoded.image.size == (64, 48)
    assert decoded.image.mode == "RGB"
    assert (decoded.source_format, decoded.source_mode) == ("JPEG", "RGB")
    assert len(decoded.pixel_sha256) == 64


def test_pixel_digest_depends_on_pixels_not_on_the_file_format():
    image = noise_image(seed=3)
    as_png = decode_image(encode(image, "PNG"), LIMITS)
    as_bmp = decode_image(encode(image, "BMP"), LIMITS)
    other = decode_image(png_bytes(seed=4), LIMITS)
    assert as_png.source_format == "PNG" and as_bmp.source_format == "BMP"
    assert as_png.pixel_sha256 == as_bmp.pixel_sha256
    assert other.pixel_sha256 != as_png.pixel_sha256


def test_pixel_digest_includes_the_size():
    """Same bytes, other shape: a 4x2 and a 2x4 grey image must not collide."""
    flat = Image.new("L", (4, 2), 7)
    tall = Image.new("L", (2, 4), 7)
    limits = ImageLimits(min_side=1, max_pixels=100, max_bytes=10_000)
    assert (
        decode_image(encode(flat), limits).pixel_sha256
        != decode_image(encode(tall), limits).pixel_sha256
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "empty", id="zero-bytes"),
        pytest.param(b"just some text, not a picture\n", "not_an_image", id="text"),
        pytest.param(bytes(range(256)) * 4, "not_an_image", id="random-bytes"),
        pytest.param(truncated(jpeg_bytes()), "truncated", id="truncated-jpeg"),
        pytest.param(truncated(png_bytes()), "truncated", id="truncated-png"),
        pytest.param(corrupt_png(), "corrupt", id="corrupt-png-data"),
        pytest.param(png_bytes(size=(40, 7)), "too_small", id="too-small"),
    ],
)
def test_bad_bytes_are_rejected_with_their_reason(data, reason):
    assert rejection(data).reason == reason


def test_too_large_file_is_rejected_before_decoding():
    data = png_bytes()
    error = rejection(data, ImageLimits(min_side=8, max_pixels=10**6, max_bytes=len(data) - 1))
    assert error.reason == "too_large_file"
    assert str(len(data)) in error.detail


def test_decompression_bomb_is_caught_from_the_header():
    error = rejection(
        png_bytes(size=(64, 48)), ImageLimits(8, max_pixels=64 * 48 - 1, max_bytes=10**6)
    )
    assert error.reason == "decompression_bomb"
    assert "64x48" in error.detail


@pytest.mark.parametrize("pil_limit", [2000, 1000], ids=["pil-warning", "pil-error"])
def test_pil_decompression_bomb_guard_is_a_rejection(monkeypatch, pil_limit):
    """PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both reject."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    error = rejection(png_bytes(size=(64, 48)))  # 3072 pixels, within our own limit
    assert error.reason == "decompression_bomb"
    assert "PIL" in error.detail


def pixel(decoded_or_image, xy):
    image = getattr(decoded_or_image, "image", decoded_or_image)
    return image.getpixel(xy)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([200, 10, 10] + [10, 200, 10] * 255)
    image.paste(1, (8, 0, 16, 16))
    decoded = decode_image(encode(image, "PNG", transparency=1), ImageLimits(1, 10**6, 10**6))
    assert decoded.source_mode == "P"
    assert pixel(decoded, (2, 2)) == (200, 10, 10)
    assert pixel(decoded, (12, 2)) == WHITE


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (8, 0, 16, 16))
    half = Image.new("RGBA", (16, 16), (0, 0, 0, 128))
    source = rgba.convert(mode)
    decoded = decode_image(encode(source, "PNG"), ImageLimits(1, 10**6, 10**6))
    assert decoded.source_mode == mode
    assert pixel(decoded, (2, 2)) == (0, 0, 0)
    assert pixel(decoded, (12, 2)) == WHITE
    blended = decode_image(encode(half.convert(mode), "PNG"), ImageLimits(1, 10**6, 10**6))
    assert all(120 <= channel <= 135 for channel in pixel(blended, (0, 0)))


def test_cmyk_jpeg_becomes_rgb():
    cmyk = halves_image((32, 32), (255, 0, 0), (0, 0, 255)).convert("CMYK")
    decoded = decode_image(encode(cmyk, "JPEG", quality=95), LIMITS)
    assert (decoded.source_format, decoded.source_mode) == ("JPEG", "CMYK")
    red, blue = pixel(decoded, (4, 16)), pixel(decoded, (28, 16))
    assert red[0] > 200 and red[2] < 60
    assert blue[2] > 200 and blue[0] < 60


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32896, 65535] * 4] * 16, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"), LIMITS)
    assert decoded.source_mode == "I;16"
    row = [pixel(decoded, (x, 0)) for x in range(4)]
    assert row == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, 77), ("1", 1, 255)])
def test_grey_and_bilevel_become_rgb(mode, value, expected):
    decoded = decode_image(encode(Image.new(mode, (16, 16), value), "PNG"), LIMITS)
    assert decoded.source_mode == mode
    assert decoded.image.mode == "RGB"
    assert pixel(decoded, (3, 3)) == (expected,) * 3


def test_exif_orientation_is_applied():
    """Orientation 6: the stored 80x40 picture is shown rotated 90 degrees clockwise."""
    decoded = decode_image(exif_rotated_jpeg((80, 40), orientation=6), LIMITS)
    assert (decoded.width, decoded.height) == (40, 80)
    top, bottom = pixel(decoded, (20, 10)), pixel(decoded, (20, 70))
    assert top[0] > 200 and top[2] < 60, "the stored left (red) half must end on top"
    assert bottom[2] > 200 and bottom[0] < 60


def test_open_rgb_drafts_jpegs_to_a_smaller_scale():
    data = jpeg_bytes(size=(512, 512))
    assert open_rgb(data).size == (512, 512)
    drafted = open_rgb(data, draft_size=(224, 224))
    assert drafted.mode == "RGB"
    assert drafted.size == (256, 256)


def test_open_rgb_shares_the_normalisation():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert open_rgb(encode(rgba, "PNG")).getpixel((0, 0)) == WHITE
    rotated = open_rgb(exif_rotated_jpeg((80, 40)), draft_size=(40, 40))
    assert rotated.height > rotated.width


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"not an image", "not_an_image"), (truncated(jpeg_bytes()), "truncated")],
)
def test_open_rgb_rejects_bad_bytes(data, reason):
    with pytest.raises(ImageRejected) as caught:
        open_rgb(data)
    assert caught.value.reason == reason


def test_open_rgb_checks_the_pixel_limit():
    with pytest.raises(ImageRejected) as caught:
        open_rgb(png_bytes(size=(64, 48)), max_pixels=100)
    assert caught.value.reason == "decompression_bomb"
