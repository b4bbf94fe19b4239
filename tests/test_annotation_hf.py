"""The `hf` backend on tiny random LLaVA-NeXT and Llama checkpoints loaded from disk."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from image_fixtures import jpeg_bytes
from PIL import Image
from tiny_models import Tiny, save
from tiny_vlm import HIDDEN, build_tiny_causal_lm

from megapairs.annotation.backends.base import BACKENDS
from megapairs.annotation.backends.hf import HFBackend, plain_prompt
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    ImagePart,
    PairContext,
    PromptRequest,
    TextPart,
)
from megapairs.config import AnnotateConfig, EndpointConfig

T = TypeVar("T")
CONTEXT = PairContext("pair-1", "a red square", "a green circle", word_num=60)


def hf_config(describer: Path | str, instructor: Path | str, **endpoint: object) -> AnnotateConfig:
    settings = {"max_tokens": 8, "temperature": 0.0, "batch_size": 4, **endpoint}
    return AnnotateConfig(
        backend="hf",
        describer=EndpointConfig(model=str(describer), **settings),
        instructor=EndpointConfig(model=str(instructor), **settings),
    )


@pytest.fixture(scope="module")
def greedy(tiny_llava: Tiny, tiny_llm: Tiny) -> HFBackend:
    return HFBackend(hf_config(tiny_llava.path, tiny_llm.path))


def describe(i: int = 0, seed: int = 7, query: bytes | None = None) -> PromptRequest:
    """A describer request: query image, target image, captions and word budget."""
    query = query or jpeg_bytes((200, 30 * i % 256, 20), (48 + 8 * i, 32))
    target = jpeg_bytes((20, 180, 40 * i % 256), (32, 40 + 6 * i))
    text = "Query caption: a red square. Target caption: a green circle. " * (1 + i % 2)
    parts = (ImagePart(query), ImagePart(target), TextPart(f"{text}Use about 60 words."))
    return PromptRequest("describer", "describe", (ChatMessage("user", parts),), CONTEXT, seed)


def instruct(i: int = 0, seed: int = 7) -> PromptRequest:
    messages = (
        ChatMessage("system", (TextPart('Answer {"instructions": [...]}.'),)),
        ChatMessage("user", (TextPart("Description: the shape " * (1 + i)),)),
    )
    return PromptRequest("instructor", "instruct", messages, CONTEXT, seed)


def run(awaitable: Awaitable[T]) -> T:
    """Run in a fresh event loop (as the stage does per part); a lost request fails, not hangs."""

    async def main() -> T:
        return await asyncio.wait_for(awaitable, timeout=60)

    return asyncio.run(main())


async def each(backend: HFBackend, requests: list[PromptRequest]) -> list[Completion]:
    return [await backend.complete(request) for request in requests]


async def together(backend: HFBackend, requests: list[PromptRequest]) -> list[object]:
    tasks = [backend.complete(request) for request in requests]
    return await asyncio.gather(*tasks, return_exceptions=True)


def texts(results: list[object]) -> list[str]:
    assert all(isinstance(r, Completion) for r in results), results
    return [r.text for r in results]  # type: ignore[union-attr]


def test_tiny_models_generate_after_loading_back(tiny_llava: Tiny, tiny_llm: Tiny) -> None:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    processor = AutoProcessor.from_pretrained(tiny_llava.path)
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_llava.path)
    assert type(vlm).__name__ == "LlavaNextForConditionalGeneration"
    assert vlm.config.text_config.hidden_size == HIDDEN
    image = Image.new("RGB", (40, 24), (90, 10, 200))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}]}]
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_tokens = (inputs["input_ids"] == vlm.config.image_token_id).sum().item()
    assert image_tokens > 16  # the base view (4x4 patches) plus any-resolution tiles
    out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm.path)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm.path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = llm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_answers_are_text_and_greedy_answers_repeat(greedy: HFBackend) -> None:
    first = run(each(greedy, [describe(), instruct()]))
    again = run(each(greedy, [describe(), instruct()]))
    assert all(isinstance(c.text, str) and c.text.strip() for c in first)
    assert [c.text for c in again] == [c.text for c in first]
    other_images = run(greedy.complete(describe(query=jpeg_bytes((0, 0, 255), (32, 72)))))
    assert other_images.text != first[0].text  # the images reach the model
    assert greedy.model_name("describer") == greedy.models["describer"].endpoint.model


@pytest.mark.parametrize("make", [describe, instruct])
def test_concurrent_requests_share_batches_and_match_alone(greedy: HFBackend, make) -> None:
    requests = [make(i) for i in range(5)]
    model = greedy.models[requests[0].role]
    alone = texts(run(each(greedy, requests)))
    before = model.batch_sizes.copy()
    batched = texts(run(together(greedy, requests)))
    assert model.batch_sizes - before == {4: 1, 1: 1}  # two generate calls: batch_size 4
    assert batched == alone  # greedy decoding with left padding changes nothing
    assert len(set(alone)) > 1  # answers depend on the prompt


def test_roles_never_share_a_batch(tiny_llava: Tiny, tiny_llm: Tiny) -> None:
    backend = HFBackend(hf_config(tiny_llava.path, tiny_llm.path))  # both load concurrently
    mixed = [describe(0), instruct(0), describe(1), instruct(1), describe(2)]
    texts(run(together(backend, mixed)))
    sizes = {role: model.batch_sizes for role, model in backend.models.items()}
    assert sizes == {"describer": {3: 1}, "instructor": {2: 1}}


def test_a_bad_request_fails_alone(greedy: HFBackend) -> None:
    broken = describe(query=b"not a jpeg")
    with_images = PromptRequest(
        "instructor", "instruct", describe().messages, CONTEXT, seed=1
    )  # the instructor is text-only
    good = [describe(0), describe(1)]
    results = run(together(greedy, [good[0], broken, good[1]]))
    instructed = run(together(greedy, [instruct(0), with_images]))
    assert texts([results[0], results[2]]) == texts(run(each(greedy, good)))
    assert texts(instructed[:1]) == texts(run(each(greedy, [instruct(0)])))
    for failure in (results[1], instructed[1]):
        assert isinstance(failure, BackendError)
        assert failure.reason == "model_error" and not failure.transient


def test_an_empty_answer_is_an_error(tmp_path: Path, tiny_llava: Tiny) -> None:
    mute = build_tiny_causal_lm(tmp_path / "mute")
    mute.model.model.norm.weight.data.zero_()  # all logits 0: it only emits <pad>, skipped
    save(mute)
    backend = HFBackend(hf_config(tiny_llava.path, mute.path))
    with pytest.raises(BackendError) as caught:
        run(backend.complete(instruct()))
    assert caught.value.reason == "empty_response"


def test_sampling_follows_the_request_seed(tiny_llava: Tiny, tiny_llm: Tiny) -> None:
    backend = HFBackend(hf_config(tiny_llava.path, tiny_llm.path, temperature=1.0))
    same = texts(run(each(backend, [instruct(seed=3), instruct(seed=3)])))
    seeds = texts(run(each(backend, [instruct(seed=s) for s in range(4)])))
    assert same[0] == same[1]
    assert len(set(seeds)) > 1


def test_models_that_do_not_load_raise_a_clear_error(tmp_path: Path, tiny_llm: Tiny) -> None:
    missing = tmp_path / "no-such-model"
    backend = HFBackend(hf_config(missing, missing))
    with pytest.raises(RuntimeError, match="no-such-model"):
        run(backend.complete(instruct()))
    text_only = HFBackend(hf_config(tiny_llm.path, tiny_llm.path))
    with pytest.raises(RuntimeError, match="image-text-to-text"):
        run(text_only.complete(describe()))
    with pytest.raises(ValueError, match=r"annotate\.describer\.model"):
        HFBackend(hf_config("", tiny_llm.path))
    with pytest.raises(ValueError, match=r"annotate\.describer\.device 'gpu:what' is not a torch"):
        HFBackend(hf_config(tiny_llm.path, tiny_llm.path, device="gpu:what"))


def test_checkpoints_without_chat_template_get_plain_prompts(
    tmp_path: Path, tiny_llava: Tiny, tiny_llm: Tiny
) -> None:
    plain = {}
    for name, tiny in {"vlm": tiny_llava, "llm": tiny_llm}.items():
        plain[name] = shutil.copytree(tiny.path, tmp_path / name)
        (plain[name] / "chat_template.jinja").unlink()
    backend = HFBackend(hf_config(plain["vlm"], plain["llm"]))
    answers = texts(run(together(backend, [describe(0), describe(1), instruct(0), instruct(1)])))
    assert all(answer.strip() for answer in answers)
    assert backend.models["describer"].tokenizer.chat_template is None
    assert plain_prompt(describe().messages, "<image>").startswith("user: <image><image>Query")
    assert plain_prompt(instruct().messages).endswith("\nassistant:")


def test_aclose_keeps_models_for_the_next_event_loop(tiny_llava: Tiny, tiny_llm: Tiny) -> None:
    backend = BACKENDS.build("hf", hf_config(tiny_llava.path, tiny_llm.path))
    assert isinstance(backend, HFBackend)

    async def part() -> str:
        try:
            return (await backend.complete(instruct())).text
        finally:
            await backend.aclose()

    first = asyncio.run(part())
    model = backend.models["instructor"].model
    assert asyncio.run(part()) == first
    assert backend.models["instructor"].model is model  # loaded once
    assert backend.models["describer"].loaded is False  # never asked, never loaded


def test_the_packaged_prompts_run_end_to_end(greedy: HFBackend) -> None:
    from megapairs.annotation import prompts

    prompt_set = prompts.load_prompts()
    settings = prompts.sample_pair_settings(
        "pair-1", 0, (60, 100), 5, len(prompt_set.demonstrations)
    )
    context = prompts.pair_context("pair-1", "a red cat", "a blue dog", settings, prompt_set)
    images = jpeg_bytes((200, 0, 0), (96, 64)), jpeg_bytes((0, 0, 200), (64, 96))
    messages = prompts.describe_messages(prompt_set, context, *images)
    described = run(greedy.complete(PromptRequest("describer", "describe", messages, context, 1)))
    context = replace(context, description=described.text)
    instruct_turns = prompts.instruct_messages(prompt_set, context, 3, 6)
    repair = replace(context, previous_output="not json", problem="the answer is not JSON")
    repair_turns = prompts.repair_messages(prompt_set, instruct_turns, repair, 3, 6)
    answers = run(
        together(
            greedy,
            [
                PromptRequest("instructor", "instruct", instruct_turns, context, 1),
                PromptRequest("instructor", "repair", repair_turns, repair, 1),
            ],
        )
    )
    assert all(text.strip() for text in texts(answers))


def test_half_precision_casts_the_pixels(tiny_llava: Tiny, tiny_llm: Tiny) -> None:
    backend = HFBackend(hf_config(tiny_llava.path, tiny_llm.path, dtype="bfloat16"))
    answer = run(backend.complete(describe()))
    assert answer.text.strip()
    assert backend.models["describer"].model.dtype == torch.bfloat16
