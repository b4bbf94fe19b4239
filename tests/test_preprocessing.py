"""One preprocessing path per retriever: the training collator and the retriever's encode
path give the same query (image + text + task instruction) identical model inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from image_fixtures import save_random_images
from tiny_models import Tiny

from megapairs.models.clip import MMRetCLIP
from megapairs.models.inputs import load_image
from megapairs.models.mllm import MMRetMLLM, PromptFormat
from megapairs.training.adapters import TrainBatch, TrainingAdapter, build_adapter
from megapairs.training.config import load_train_config
from megapairs.training.data import TrainSample

TASK = "Find an image that fits the change."
TEXTS = ["make it red", "the same dog in the snow"]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    specs = [((40, 48), "RGB"), ((64, 36), "RGBA"), ((33, 33), "L"), ((50, 20), "RGB")]
    return save_random_images(tmp_path_factory.mktemp("images"), specs)


def adapter_for(model: Path, *settings: str) -> TrainingAdapter:
    options = [f"model.name_or_path={model}", f"model.task_instruction={TASK}", *settings]
    return build_adapter(load_train_config(None, options).model)


def training_batch(adapter: TrainingAdapter, paths: list[Path]) -> TrainBatch:
    """The collator's batch of two samples, images opened as the training data opens them."""
    pictures = [load_image(path) for path in paths]
    samples = [
        TrainSample(0, pictures[0], TEXTS[0], [pictures[2]]),
        TrainSample(1, pictures[1], TEXTS[1], [pictures[3]]),
    ]
    return adapter.collator(samples)


def encoder_inputs(model: Any, encode: Callable[[], Any]) -> list[dict[str, torch.Tensor]]:
    """The keyword inputs `model.forward` received while `encode()` ran."""
    seen: list[dict[str, torch.Tensor]] = []
    forward = model.forward

    def spy(**inputs: torch.Tensor) -> torch.Tensor:
        seen.append(dict(inputs))
        return forward(**inputs)

    model.forward = spy
    try:
        encode()
    finally:
        del model.forward
    return seen


def assert_same(trained: dict[str, torch.Tensor], encoded: dict[str, torch.Tensor]) -> None:
    assert set(trained) == set(encoded)
    for key, value in trained.items():
        assert torch.equal(value, encoded[key]), key


@pytest.mark.parametrize("instruction", [None, TASK])
def test_clip_training_and_encoding_give_identical_inputs(
    tiny_clip: Tiny, image_paths: list[Path], instruction: str | None
) -> None:
    adapter = adapter_for(tiny_clip.path)
    model: Any = adapter.model
    batch = training_batch(adapter, image_paths)
    queries = encoder_inputs(
        model, lambda: model.encode_queries(image_paths[:2], TEXTS, instruction=instruction)
    )
    candidates = encoder_inputs(model, lambda: model.encode_candidates(image_paths[2:], None))
    assert_same(batch.queries, queries[0])
    assert_same(batch.candidates, candidates[0])
    assert_same(batch.queries, model.preprocess_queries(image_paths[:2], TEXTS, instruction))
    text = model.tokenizer.decode(batch.queries["input_ids"][0], skip_special_tokens=True)
    assert text.replace(" ", "") == (TASK + TEXTS[0]).replace(" ", "").lower()


def test_mllm_training_and_encoding_give_identical_inputs(
    tiny_llava: Tiny, image_paths: list[Path]
) -> None:
    settings = ("model.kind=mmret-mllm", "model.image_size=48", "model.lora.rank=4")
    adapter = adapter_for(tiny_llava.path, *settings)
    model: Any = adapter.model
    batch = training_batch(adapter, image_paths)
    queries = encoder_inputs(model, lambda: model.encode_queries(image_paths[:2], TEXTS))
    candidates = encoder_inputs(model, lambda: model.encode_candidates(image_paths[2:], None))
    assert_same(batch.queries, queries[0])
    assert_same(batch.candidates, candidates[0])
    assert set(batch.queries) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    prompt = model.processor.tokenizer.decode(batch.queries["input_ids"][0])
    assert f"<instruct>{TASK} <query>{TEXTS[0]}<image>" in prompt


def test_clip_preprocessing_key_names_what_changes_inputs(tiny_clip: Tiny) -> None:
    model = MMRetCLIP.from_pretrained(tiny_clip.path)
    key = model.preprocessing_key
    assert key.startswith("clip;resize=shortest_edge:32;crop=32x32;norm=0.4815,")
    assert ";pad=none;text=64;query={instruction} {text}#" in key and len(key) < 200
    assert MMRetCLIP.from_pretrained(tiny_clip.path).preprocessing_key == key
    assert MMRetCLIP.from_pretrained(tiny_clip.path, max_text_length=8).preprocessing_key != key
    model.task_instruction = "Find it."  # an instruction is a query setting, not preprocessing
    assert model.preprocessing_key == key
    model.image_processor.image_mean = [0.5, 0.5, 0.5]
    assert model.preprocessing_key != key


def test_mllm_preprocessing_key_names_what_changes_inputs(tiny_llava: Tiny) -> None:
    model = MMRetMLLM.from_pretrained(tiny_llava.path, image_size=48)
    key = model.preprocessing_key
    assert key.startswith("llava-next;fixed=48x48/bicubic;resize=shortest_edge:32;crop=32x32;")
    assert ";query=<instruct>{instruction} <query>{text}{image}</s>;" in key
    assert MMRetMLLM.from_pretrained(tiny_llava.path, image_size=48).preprocessing_key == key
    assert MMRetMLLM.from_pretrained(tiny_llava.path, image_size=64).preprocessing_key != key
    other = PromptFormat(query="{instruction}: {text}{image}")
    changed = MMRetMLLM.from_pretrained(tiny_llava.path, image_size=48, prompt=other)
    assert changed.preprocessing_key != key
