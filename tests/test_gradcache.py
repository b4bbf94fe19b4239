"""Gradient caching equals full-batch training, on a tiny random CLIP with score fusion."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import Tiny
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from megapairs.training.gradcache import RngState, chunk_inputs, gradcache_step
from megapairs.training.losses import InfoNCELoss

QUERIES = 8
NEGATIVES = 1
CHUNK = 2
INSTRUCTIONS = ["the cat", "a red cat", "the cat sat", "cat", "the", "a cat", "the the", "red"]

Batch = dict[str, Any]


def load_clip(tiny: Tiny, attention_dropout: float = 0.0) -> CLIPModel:
    """The saved tiny CLIP through from_pretrained, in float64 for tight comparisons."""
    config = CLIPConfig.from_pretrained(tiny.path)
    for tower in (config.text_config, config.vision_config):
        assert isinstance(tower, CLIPTextConfig | CLIPVisionConfig)
        tower.attention_dropout = attention_dropout
    model = CLIPModel.from_pretrained(tiny.path, config=config).double()
    return model.train() if attention_dropout else model.eval()


def make_batch(tiny: Tiny, dtype: torch.dtype = torch.float64) -> Batch:
    """Queries (image + instruction) and candidates grouped per query: positive, negative."""
    generator = torch.Generator().manual_seed(0)
    text = tiny.tokenizer(INSTRUCTIONS, padding=True, return_tensors="pt")
    images = torch.randn(QUERIES * (2 + NEGATIVES), 3, 32, 32, generator=generator, dtype=dtype)
    return {
        "queries": {
            "pixel_values": images[:QUERIES],
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        },
        "candidates": images[QUERIES:],
    }


def encoders(model: CLIPModel) -> tuple[Callable[[Batch], torch.Tensor], Callable[..., Any]]:
    """MMRet-CLIP score fusion: a query is normalise(image + text); a candidate an image."""

    def encode_queries(inputs: Batch) -> torch.Tensor:
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        return F.normalize(image + text, dim=-1)

    def encode_candidates(pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(
            model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1
        )

    return encode_queries, encode_candidates


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def cached_step(model: CLIPModel, batch: Batch, loss: InfoNCELoss) -> torch.Tensor:
    encode_queries, encode_candidates = encoders(model)
    return gradcache_step(
        chunk_inputs(batch["queries"], CHUNK),
        chunk_inputs(batch["candidates"], CHUNK),
        encode_queries,
        encode_candidates,
        loss.grouped,
    )


def full_step(model: CLIPModel, batch: Batch, loss: InfoNCELoss) -> torch.Tensor:
    """One ordinary forward/backward over the whole batch."""
    encode_queries, encode_candidates = encoders(model)
    value = loss.grouped(encode_queries(batch["queries"]), encode_candidates(batch["candidates"]))
    value.backward()
    return value.detach()


def chunked_step(model: CLIPModel, batch: Batch, loss: InfoNCELoss) -> torch.Tensor:
    """The whole batch with autograd, run chunk by chunk in the order gradcache embeds them,
    so dropout draws the same masks as gradcache's first pass."""
    encode_queries, encode_candidates = encoders(model)
    queries = [encode_queries(c) for c in chunk_inputs(batch["queries"], CHUNK)]
    candidates = [encode_candidates(c) for c in chunk_inputs(batch["candidates"], CHUNK)]
    value = loss.grouped(torch.cat(queries), torch.cat(candidates))
    value.backward()
    return value.detach()


def assert_same_grads(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert len(actual) > 40, "every CLIP tower parameter should get a gradient"
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_cached_grads_equal_full_batch_grads(tiny_clip: Tiny) -> None:
    batch, loss = make_batch(tiny_clip), InfoNCELoss(temperature=0.02)
    model = load_clip(tiny_clip)
    expected_loss = full_step(model, batch, loss)
    expected = grads(model)
    model.zero_grad()
    cached_loss = cached_step(model, batch, loss)
    assert not cached_loss.requires_grad
    torch.testing.assert_close(cached_loss, expected_loss, rtol=0, atol=1e-12)
    assert_same_grads(grads(model), expected)


def test_dropout_is_replayed_identically(tiny_clip: Tiny) -> None:
    batch, loss = make_batch(tiny_clip), InfoNCELoss(temperature=0.02)
    model = load_clip(tiny_clip, attention_dropout=0.3)
    torch.manual_seed(1)
    expected_loss = chunked_step(model, batch, loss)
    expected = grads(model)
    model.zero_grad()
    torch.manual_seed(1)
    cached_loss = cached_step(model, batch, loss)
    torch.testing.assert_close(cached_loss, expected_loss, rtol=0, atol=1e-12)
    assert_same_grads(grads(model), expected)
    model.zero_grad()
    torch.manual_seed(2)
    assert cached_step(model, batch, loss) != pytest.approx(expected_loss.item(), abs=1e-6), (
        "dropout must be active, or this test proves nothing"
    )


def test_cached_step_under_bf16_autocast(tiny_clip: Tiny) -> None:
    batch, loss = make_batch(tiny_clip, torch.float32), InfoNCELoss(temperature=0.02)
    model = load_clip(tiny_clip).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss = full_step(model, batch, loss)
        expected = grads(model)
        model.zero_grad()
        cached_loss = cached_step(model, batch, loss)
    torch.testing.assert_close(cached_loss, expected_loss, rtol=1e-3, atol=0)
    actual = grads(model)
    assert actual.keys() == expected.keys()
    cached, full = (torch.cat([g.flatten() for g in d.values()]) for d in (actual, expected))
    assert torch.isfinite(cached).all()
    assert F.cosine_similarity(cached, full, dim=0) > 0.9999


def test_only_the_last_rerun_chunk_synchronises() -> None:
    syncing = {"inside": False}
    rerun_synced: list[bool] = []

    @contextmanager
    def no_sync() -> Iterator[None]:
        syncing["inside"] = True
        yield
        syncing["inside"] = False

    encoder = nn.Linear(4, 4)

    def encode(inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            rerun_synced.append(not syncing["inside"])
        return F.normalize(encoder(inputs), dim=-1)

    queries, candidates = torch.randn(4, 4), torch.randn(8, 4)
    gradcache_step(
        chunk_inputs(queries, 2), chunk_inputs(candidates, 2), encode, encode,
        InfoNCELoss(0.1).grouped, no_sync=no_sync,
    )  # fmt: skip
    assert rerun_synced == [False] * 5 + [True]


def test_rng_state_replay_restores_draws_and_leaves_global_rng() -> None:
    state = RngState.capture()
    first = torch.rand(3)
    after = torch.get_rng_state()
    with state.replay():
        torch.testing.assert_close(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_loss_must_be_a_scalar() -> None:
    encoder = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="scalar"):
        gradcache_step([torch.randn(2, 4)], [torch.randn(2, 4)], encoder, encoder, torch.mul)


def test_chunk_inputs_splits_tensors_and_mappings() -> None:
    assert [c.shape[0] for c in chunk_inputs(torch.zeros(5, 2), 2)] == [2, 2, 1]
    chunks = chunk_inputs({"a": torch.arange(3), "b": torch.arange(3) * 10}, 2)
    assert [c["b"].tolist() for c in chunks] == [[0, 10], [20]]
    with pytest.raises(ValueError, match="share one"):
        chunk_inputs({"a": torch.arange(3), "b": torch.arange(4)}, 2)
