"""Activation checkpointing of both retrievers: the same gradients (dropout included, with and
without gradient caching), really recomputed in backward, less memory, and the trainer's
`activation_checkpointing` setting."""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import test_trainer
import torch
from PIL import Image
from test_trainer import config
from tiny_models import Tiny, tower
from torch import nn
from transformers import CLIPConfig, CLIPModel

from megapairs.models.clip import MMRetCLIP
from megapairs.models.mllm import MMRetMLLM
from megapairs.training import trainer as trainer_module
from megapairs.training.gradcache import chunk_inputs, gradcache_step
from megapairs.training.losses import InfoNCELoss
from megapairs.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# the trainer tests' fixtures: 12 training rows, and the tiny CLIP with attention dropout 0.2
dataset = test_trainer.dataset
dropout_clip = test_trainer.dropout_clip

Retriever = MMRetCLIP | MMRetMLLM
Batch = dict[str, dict[str, torch.Tensor]]
TEXTS = ["the cat", "a red cat", "the cat sat", "cat"]
LOSS = InfoNCELoss(temperature=0.05)


def pictures(count: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, 32, 32, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(array.numpy()) for array in pixels]


def clip_retriever(folder: Path) -> MMRetCLIP:
    return MMRetCLIP.from_pretrained(folder).train()


def llava_retriever(tiny: Tiny) -> MMRetMLLM:
    """The tiny LLaVA-NeXT with LoRA (dropout 0.3) on both towers, B drawn at random (peft
    starts it at zero, which would leave every A without a gradient); the same each call."""
    torch.manual_seed(3)  # peft draws A from the global generator
    model = MMRetMLLM.from_pretrained(tiny.path, lora={"rank": 4, "dropout": 0.3}, image_size=32)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.2)
    return model.train()


@pytest.fixture
def retriever(
    request: pytest.FixtureRequest,
    dropout_clip: Path,
    tiny_llava: Tiny,
) -> Callable[[], Retriever]:
    """A factory of fresh retrievers with dropout on (attention dropout 0.2 in CLIP, LoRA
    dropout 0.3 in LLaVA-NeXT), so every step draws random numbers."""
    if request.param == "clip":
        return lambda: clip_retriever(dropout_clip)
    return lambda: llava_retriever(tiny_llava)


def make_batch(model: Retriever) -> Batch:
    """4 composed queries and their candidates grouped per query: positive, negative."""
    queries, candidates = pictures(4, seed=0), pictures(8, seed=1)
    if isinstance(model, MMRetCLIP):
        return {
            "queries": model.preprocess_queries(queries, TEXTS, "Find"),
            "candidates": model.preprocess(candidates),
        }
    return {
        "queries": model.preprocess_queries(queries, TEXTS, "Find"),
        "candidates": model.preprocess_candidates(candidates, None),
    }


def full_step(model: Retriever, batch: Batch, chunk: int = 0) -> None:
    """One forward and backward over the whole batch; with `chunk`, the forward runs chunk by
    chunk in the order gradient caching embeds them (so dropout draws the same masks)."""
    size = chunk or len(batch["candidates"]["pixel_values"])
    queries = [model(**c) for c in chunk_inputs(batch["queries"], size)]
    candidates = [model(**c) for c in chunk_inputs(batch["candidates"], size)]
    LOSS.grouped(torch.cat(queries), torch.cat(candidates)).backward()


def cached_step(model: Retriever, batch: Batch, chunk: int = 2) -> None:
    gradcache_step(
        chunk_inputs(batch["queries"], chunk),
        chunk_inputs(batch["candidates"], chunk),
        lambda inputs: model(**inputs),
        lambda inputs: model(**inputs),
        LOSS.grouped,
    )


def gradients(
    model: Retriever, step: Callable[[Retriever, Batch], None], seed: int = 1
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    step(model, make_batch(model))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys() and len(expected) >= 16
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def checkpointed(model: Retriever) -> Retriever:
    model.enable_activation_checkpointing()
    assert model.activation_checkpointing and model.training
    return model


BOTH = pytest.mark.parametrize("retriever", ["clip", "llava"], indirect=True)


@BOTH
def test_checkpointing_keeps_the_gradients(retriever: Callable[[], Retriever]) -> None:
    plain = retriever()
    assert not plain.activation_checkpointing
    expected = gradients(plain, full_step)
    assert_same(gradients(checkpointed(retriever()), full_step), expected)
    other_masks = gradients(plain, full_step, seed=2)
    assert any(not torch.allclose(other_masks[n], g) for n, g in expected.items()), (
        "dropout must be active, or the recomputation's RNG replay is not tested"
    )


@BOTH
def test_checkpointing_with_gradient_caching_equals_the_full_batch(
    retriever: Callable[[], Retriever],
) -> None:
    expected = gradients(retriever(), lambda model, batch: full_step(model, batch, chunk=2))
    assert_same(gradients(checkpointed(retriever()), cached_step), expected)


# really on: layers run again in backward, and less is kept -----------------------------------


@contextmanager
def call_counter(modules: list[nn.Module]) -> Iterator[list[int]]:
    """Counts calls of `modules`, sub-modules of transformer layers (a layer's own hooks sit
    outside its checkpoint), by pre-hooks: a recomputation stops as soon as it has every
    tensor backward needs, before the last module returns."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    handles = [module.register_forward_pre_hook(count) for module in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def layer_mlps(model: Retriever) -> list[nn.Module]:
    """The MLP of the first layer of each tower (vision, text or language model)."""
    return [
        module
        for name, module in model.named_modules()
        if name.endswith("layers.0.mlp") and "lora" not in name
    ]


@BOTH
def test_layers_are_recomputed_in_backward(retriever: Callable[[], Retriever]) -> None:
    counts = {}
    for on in (False, True):
        model = checkpointed(retriever()) if on else retriever()
        batch = make_batch(model)
        mlps = layer_mlps(model)
        assert len(mlps) == 2  # CLIP: vision and text; LLaVA: vision tower and language model
        with call_counter(mlps) as calls:
            loss = LOSS.grouped(model(**batch["queries"]), model(**batch["candidates"]))
            forward = calls[0]
            loss.backward()
        counts[on] = (forward, calls[0] - forward)  # calls in forward, in backward
    forward = counts[False][0]
    assert forward >= 3 and counts == {False: (forward, 0), True: (forward, forward)}


def larger_clip(tiny: Tiny) -> MMRetCLIP:
    """A CLIP with 4 layers per tower and 64 px images (64 patches), where activations
    dwarf the weights: 8 images keep 5.7 MB for backward without checkpointing."""
    text = tower(vocab_size=len(tiny.tokenizer), max_position_embeddings=64, num_hidden_layers=4)
    vision = tower(image_size=64, patch_size=8, num_hidden_layers=4)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return MMRetCLIP(clip, tiny.processor, tiny.tokenizer).train()


def memory_of_a_step(model: MMRetCLIP) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for backward (outside checkpoints: a checkpointed
    layer keeps only its inputs) and the profiler's peak of live CPU tensor memory over the
    forward and backward of 8 images (allocations minus frees, op by op)."""
    pixels = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.image_embeddings(pixels).sum().backward()  # warm-up: gradients allocated
    model.zero_grad(set_to_none=False)
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            embeddings = model.image_embeddings(pixels)
        embeddings.sum().backward()
    live = peak = 0
    for event in sorted(profile.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return saved[0], peak


def test_a_checkpointed_step_keeps_less_memory(tiny_clip: Tiny) -> None:
    saved, peak = memory_of_a_step(larger_clip(tiny_clip))
    checkpointed_model = larger_clip(tiny_clip)
    checkpointed_model.enable_activation_checkpointing()
    saved_checkpointed, peak_checkpointed = memory_of_a_step(checkpointed_model)
    # measured (torch 2.13, transformers 5.24, CPU): saved 5.74 MB -> 0.76 MB,
    # peak 3.98 MB -> 1.31 MB
    assert saved > 4_000_000 and saved_checkpointed < saved / 4
    assert peak > 3_000_000 and peak_checkpointed < peak * 0.6


# the trainer ----------------------------------------------------------------------------------


@contextmanager
def seen_by_the_step() -> Iterator[list[tuple[bool, bool]]]:
    """(activation_checkpointing, training) of the trained model at each trainer step."""
    seen: list[tuple[bool, bool]] = []
    real_step = trainer_module._TrainingRun.step

    def step(self: Any) -> float:
        model = self.adapter.model
        seen.append((model.activation_checkpointing, model.training))
        return real_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module._TrainingRun, "step", step)
        yield seen


def test_the_trainer_checkpoints_when_asked(
    dropout_clip: Path,
    dataset: Path,
    tmp_path: Path,
) -> None:
    settings = ("steps=2", "optim.warmup_steps=0", "save_every=10", "chunk_size=5")
    plain_config = config(dropout_clip, dataset, tmp_path / "plain", *settings)
    plain = train(plain_config, False)
    checkpointing = config(
        dropout_clip, dataset, tmp_path / "ckpt", *settings, "activation_checkpointing=true"
    )
    assert checkpointing.activation_checkpointing and not plain_config.activation_checkpointing
    with seen_by_the_step() as seen:
        result = train(checkpointing, False)
    assert seen == [(True, True)] * 2
    assert result.losses == pytest.approx(plain.losses, rel=1e-5)  # dropout replayed
    saved = json.loads((result.final_model / "megapairs_training.json").read_text())
    assert saved["config"]["activation_checkpointing"] is True
    assert checkpointing.resume_blockers(plain_config.model_dump(mode="json")) == []


def test_the_trainer_checkpoints_the_mllm(tiny_llava: Tiny, dataset: Path, tmp_path: Path) -> None:
    settings = (
        "model.kind=mmret-mllm",
        "model.image_size=32",
        "model.lora.rank=4",
        "data.negative_strategy=query_image",
        "batch_size=2",
        "steps=1",
        "chunk_size=3",
        "activation_checkpointing=true",
    )
    with seen_by_the_step() as seen:
        result = train(config(tiny_llava.path, dataset, tmp_path, *settings), False)
    assert seen == [(True, True)]
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()
