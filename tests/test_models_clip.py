"""MMRet-CLIP on a tiny random CLIP checkpoint, loaded through the real from_pretrained path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from image_fixtures import save_random_images
from PIL import Image
from tiny_models import Tiny

from megapairs.models.base import RETRIEVERS, Retriever, build_retriever, retriever_kinds
from megapairs.models.clip import MMRetCLIP
from megapairs.models.inputs import (
    ImageLoadError,
    as_image_list,
    as_text_list,
    check_batch_lengths,
    load_images,
)

TEXTS = ["the cat on a mat", "a red dog", "the cat"]


@pytest.fixture(scope="module")
def model(tiny_clip: Tiny) -> MMRetCLIP:
    return MMRetCLIP.from_pretrained(tiny_clip.path)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three different pictures of different sizes and modes, saved as files."""
    specs = [((40, 48), "RGB"), ((64, 36), "RGBA"), ((33, 33), "L")]
    return save_random_images(tmp_path_factory.mktemp("images"), specs)


def by_hand(tiny: Tiny, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
    """The tiny CLIPModel's own projected features, through its own processor and tokenizer."""
    pixels = tiny.processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = tiny.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = tiny.model.get_image_features(pixel_values=pixels)
        text = tiny.model.get_text_features(**tokens)
    pooled = [out if isinstance(out, torch.Tensor) else out.pooler_output for out in (image, text)]
    return {"image": pooled[0], "text": pooled[1]}


# loading ---------------------------------------------------------------------


def test_loads_a_saved_clip_checkpoint(model: MMRetCLIP, tiny_clip: Tiny) -> None:
    assert isinstance(model, Retriever)
    assert model.dim == tiny_clip.model.config.projection_dim
    assert model.max_text_length == tiny_clip.model.config.text_config.max_position_embeddings
    assert model.name == f"mmret-clip:{tiny_clip.path}"
    assert "torchvision" not in type(model.image_processor).__module__
    assert type(model.image_processor).__name__ in {"CLIPImageProcessorPil", "CLIPImageProcessor"}


def test_registry_builds_both_kinds(tiny_clip: Tiny) -> None:
    assert {"clip", "mmret-clip"} <= set(retriever_kinds())
    zero_shot = build_retriever("clip", str(tiny_clip.path))
    assert isinstance(zero_shot, MMRetCLIP)
    assert zero_shot.name == f"clip:{tiny_clip.path}"
    with pytest.raises(ValueError, match=r"unknown retriever 'nope'; known: .*mmret-clip"):
        RETRIEVERS.build("nope", str(tiny_clip.path))


def test_unloadable_checkpoints_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"/no/such/checkpoint.*hub"):
        MMRetCLIP.from_pretrained("/no/such/checkpoint")
    with pytest.raises(ValueError, match=r"not a CLIP checkpoint.*no config\.json"):
        MMRetCLIP.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ValueError, match=r"not a CLIP checkpoint.*'dinov2'"):
        MMRetCLIP.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^device 'gpu0' is not a torch device"):
        MMRetCLIP.from_pretrained(tmp_path, device="gpu0")


def test_checkpoint_missing_weights_is_refused(tiny_clip: Tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_clip.path, tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_projection.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 CLIP weight.*text_projection\.weight"):
        MMRetCLIP.from_pretrained(tmp_path)


def test_bge_vl_style_checkpoint_loads_without_remote_code(
    model: MMRetCLIP, tiny_clip: Tiny, tmp_path: Path, image_paths: list[Path]
) -> None:
    """BGE-VL's config points AutoModel at its own modeling file; the weights are CLIP's."""
    shutil.copytree(tiny_clip.path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_MMRet_CLIP.CLIPModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = MMRetCLIP.from_pretrained(tmp_path)
    expected = model.encode(image_paths, TEXTS)
    assert torch.equal(loaded.encode(image_paths, TEXTS), expected)


# encoding --------------------------------------------------------------------


def test_every_image_form_gives_the_same_vectors(model: MMRetCLIP, image_paths: list[Path]) -> None:
    first = image_paths[0]
    pictures = [Image.open(path) for path in image_paths]
    reference = model.encode(images=image_paths)
    assert reference.shape == (3, model.dim)
    for many in ([str(path) for path in image_paths], pictures, tuple(image_paths)):
        assert torch.equal(model.encode(images=many), reference)
    one = model.encode(images=pictures[0])
    for single in (str(first), first, [first]):
        assert torch.equal(model.encode(images=single), one)
    # a batch of one and a batch of three differ only by float rounding
    assert torch.allclose(one, reference[:1], atol=1e-6)
    assert not torch.allclose(reference[0], reference[1], atol=1e-2)


def test_text_forms_and_batching_agree(model: MMRetCLIP) -> None:
    reference = model.encode(text=TEXTS)
    assert torch.equal(model.encode(text=tuple(TEXTS)), reference)
    assert torch.equal(model.encode(text=TEXTS[0]), model.encode(text=TEXTS[:1]))
    assert torch.allclose(model.encode(text=TEXTS[0]), reference[:1], atol=1e-6)
    assert torch.allclose(model.encode(text=TEXTS, batch_size=2), reference, atol=1e-6)
    assert not torch.allclose(reference[0], reference[2], atol=1e-2)


def test_composed_embedding_is_normalised_sum_of_raw_features(
    model: MMRetCLIP, tiny_clip: Tiny, image_paths: list[Path]
) -> None:
    pictures = load_images(image_paths)
    features = by_hand(tiny_clip, pictures, TEXTS)
    expected = F.normalize(features["image"] + features["text"], dim=-1)
    composed = model.encode(images=image_paths, text=TEXTS, batch_size=2)
    assert torch.allclose(composed, expected, atol=1e-5)
    assert torch.allclose(model.encode(images=pictures), F.normalize(features["image"]), atol=1e-5)
    assert torch.allclose(model.encode(text=TEXTS), F.normalize(features["text"]), atol=1e-5)
    # the test tells the formulas apart: summing normalised vectors gives something else
    normalised_sum = F.normalize(F.normalize(features["image"]) + F.normalize(features["text"]))
    assert not torch.allclose(composed, normalised_sum, atol=1e-3)


def test_outputs_are_unit_float32_cpu_rows(model: MMRetCLIP, image_paths: list[Path]) -> None:
    for output in (
        model.encode(images=image_paths),
        model.encode(text=TEXTS),
        model.encode(images=image_paths, text=TEXTS),
    ):
        assert output.dtype == torch.float32 and output.device.type == "cpu"
        assert torch.allclose(output.norm(dim=-1), torch.ones(len(output)), atol=1e-5)
    assert model.encode(images=[]).shape == (0, model.dim)


def test_queries_carry_the_instruction(model: MMRetCLIP, image_paths: list[Path]) -> None:
    pictures = load_images(image_paths)
    instruction = "find the same scene"
    with_text = model.encode_queries(pictures, TEXTS, instruction=instruction)
    expected = model.encode(pictures, [f"{instruction} {text}" for text in TEXTS])
    assert torch.equal(with_text, expected)
    image_only = model.encode_queries(pictures, None, instruction=instruction)
    assert torch.equal(image_only, model.encode(pictures, [instruction] * 3))
    assert torch.equal(model.encode_queries(pictures, TEXTS), model.encode(pictures, TEXTS))
    assert torch.equal(model.encode_candidates(pictures, None), model.encode(pictures))


def test_encode_restores_training_mode(tiny_clip: Tiny) -> None:
    fresh = MMRetCLIP.from_pretrained(tiny_clip.path)
    fresh.train()
    fresh.encode(text="the cat")
    assert fresh.training and fresh.clip.training


# saving ----------------------------------------------------------------------


def test_save_and_load_round_trip(
    model: MMRetCLIP, tmp_path: Path, image_paths: list[Path]
) -> None:
    model.save_pretrained(tmp_path)
    again = MMRetCLIP.from_pretrained(tmp_path)
    for images, texts in ((image_paths, None), (None, TEXTS), (image_paths, TEXTS)):
        assert torch.equal(again.encode(images, texts), model.encode(images, texts))


def test_the_task_instruction_is_saved_and_is_the_query_default(
    tiny_clip: Tiny, tmp_path: Path, image_paths: list[Path]
) -> None:
    task = "find the same scene"
    tasked = MMRetCLIP.from_pretrained(tiny_clip.path)
    assert tasked.task_instruction is None  # a plain CLIP folder has no mmret_clip.json
    tasked.task_instruction = task
    tasked.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "mmret_clip.json").read_text())["task_instruction"] == task
    loaded = MMRetCLIP.from_pretrained(tmp_path)
    assert loaded.task_instruction == task
    pictures = load_images(image_paths)
    for texts in (TEXTS, None):
        default = loaded.encode_queries(pictures, texts)
        assert torch.equal(default, loaded.encode_queries(pictures, texts, instruction=task))
        assert torch.equal(default, tasked.encode_queries(pictures, texts))
    untasked = loaded.encode_queries(pictures, TEXTS, instruction="")  # "": no instruction
    assert torch.equal(untasked, loaded.encode(pictures, TEXTS))
    (tmp_path / "mmret_clip.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"mmret_clip\.json"):
        MMRetCLIP.from_pretrained(tmp_path)


def test_saved_checkpoint_loads_as_plain_clip(
    model: MMRetCLIP, tmp_path: Path, image_paths: list[Path]
) -> None:
    from transformers import CLIPModel

    model.save_pretrained(tmp_path)
    plain = CLIPModel.from_pretrained(tmp_path).eval()
    batch = model.preprocess(images=image_paths)
    with torch.no_grad():
        output = plain.get_image_features(pixel_values=batch["pixel_values"])
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    assert torch.allclose(F.normalize(features), model.encode(images=image_paths), atol=1e-6)


# training --------------------------------------------------------------------


def test_gradients_reach_both_towers(tiny_clip: Tiny, image_paths: list[Path]) -> None:
    trainee = MMRetCLIP.from_pretrained(tiny_clip.path).train()
    batch = trainee.preprocess(images=image_paths, text=TEXTS)
    composed = trainee.composed_embeddings(**batch)
    targets = trainee.image_embeddings(batch["pixel_values"]).roll(1, dims=0)
    loss = F.cross_entropy(composed @ targets.T / 0.02, torch.arange(3))
    loss.backward()
    for parameter in (
        trainee.clip.visual_projection.weight,
        trainee.clip.text_projection.weight,
        trainee.clip.vision_model.embeddings.patch_embedding.weight,
        trainee.clip.text_model.embeddings.token_embedding.weight,
    ):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert torch.allclose(trainee(**batch), composed)


def test_composed_embeddings_need_one_image_per_text(model: MMRetCLIP) -> None:
    batch = model.preprocess(images=[Image.new("RGB", (32, 32))], text=TEXTS)
    with pytest.raises(ValueError, match=r"one image per text: got 1 images and 3 texts"):
        model.composed_embeddings(**batch)


# bad inputs ------------------------------------------------------------------


def test_bad_inputs_fail_clearly(model: MMRetCLIP, image_paths: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match=r"missing\.png"):
        model.encode(images=[image_paths[0], missing])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(ImageLoadError, match=r"notes\.png.*not_an_image"):
        model.encode(images=not_an_image)
    with pytest.raises(ValueError, match=r"2 image.*1 text.*one image per text"):
        model.encode(images=image_paths[:2], text=TEXTS[0])
    with pytest.raises(ValueError, match=r"3 image.*2 text"):
        model.encode(images=image_paths, text=TEXTS[:2])
    with pytest.raises(ValueError, match=r"nothing to encode"):
        model.encode()
    with pytest.raises(TypeError, match=r"image 1 is a int"):
        model.encode(images=[image_paths[0], 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"text 0 is a bytes"):
        model.encode(text=[b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"batch_size"):
        model.encode(text=TEXTS, batch_size=0)


# inputs ----------------------------------------------------------------------


def test_inputs_normalise_to_lists(image_paths: list[Path]) -> None:
    assert as_text_list("a cat") == ["a cat"]
    assert as_text_list(("a", "b")) == ["a", "b"]
    assert as_image_list(image_paths[0]) == [image_paths[0]]
    images = load_images([str(path) for path in image_paths])
    assert [image.mode for image in images] == ["RGB"] * 3
    assert [image.size for image in images] == [(40, 48), (64, 36), (33, 33)]
    check_batch_lengths(None, ["a", "b"])
    check_batch_lengths(["x"], ["a"])
    with pytest.raises(ValueError, match=r"1 image.*2 text"):
        check_batch_lengths(["x"], ["a", "b"])


def test_pil_input_is_not_changed(image_paths: list[Path]) -> None:
    rgba = Image.open(image_paths[1])
    rgba.load()
    before = rgba.tobytes()
    (converted,) = load_images(rgba)
    assert converted.mode == "RGB" and rgba.mode == "RGBA" and rgba.tobytes() == before
