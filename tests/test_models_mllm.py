"""MMRet-MLLM on a tiny random LLaVA-NeXT, loaded through the real from_pretrained path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from image_fixtures import save_random_images
from PIL import Image
from tiny_models import Tiny

from megapairs.models.base import Retriever, build_retriever, retriever_kinds
from megapairs.models.inputs import load_image
from megapairs.models.mllm import LoraSettings, MMRetMLLM, PromptFormat, final_token_states

IMAGE_SIZE = 48  # the tiny tower sees 32 px; 48 px images pick its 64x64 pinpoint
TASK = "Find the picture."
TEXTS = ["a cat", "the image of a red dog in the snow", "a"]
EOS = "</s>"


@pytest.fixture(scope="module")
def tiny(tiny_llava: Tiny) -> Tiny:
    return tiny_llava


@pytest.fixture(scope="module")
def plain(tiny: Tiny) -> MMRetMLLM:
    """The tiny checkpoint without adapters."""
    return MMRetMLLM.from_pretrained(tiny.path, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def adapted(tiny: Tiny) -> MMRetMLLM:
    """Fresh LoRA adapters (rank 4), their B matrices made non-zero so they change outputs."""
    model = MMRetMLLM.from_pretrained(tiny.path, lora={"rank": 4}, image_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three random pictures of different shapes and modes, saved as files."""
    specs = [((40, 48), "RGB"), ((64, 36), "RGBA"), ((90, 30), "L")]
    return save_random_images(tmp_path_factory.mktemp("images"), specs)


def opened(path: Path) -> Image.Image:
    """The picture as every retriever sees it (upright RGB, alpha composited on white)."""
    return load_image(path)


def by_hand(tiny: Tiny, text: str, image: Image.Image | None = None) -> torch.Tensor:
    """One unpadded item through the builder's own model and processor: the normalised
    final hidden state (`output_hidden_states`) of the last token."""
    pictures = None if image is None else [image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)]
    inputs = tiny.processor(text=[text], images=pictures, return_tensors="pt")
    with torch.no_grad():
        output = tiny.model(**inputs, output_hidden_states=True)
    return F.normalize(output.hidden_states[-1][0, -1], dim=-1)


class RecordingProcessor:
    """Wraps a processor and records the texts it is called with."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.texts: list[list[str]] = []

    def __call__(self, *, text: list[str], **kwargs: Any) -> Any:
        self.texts.append(list(text))
        return self.processor(text=text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


# loading ---------------------------------------------------------------------


def test_loads_a_saved_llava_next_checkpoint(plain: MMRetMLLM, tiny: Tiny) -> None:
    assert isinstance(plain, Retriever)
    assert plain.dim == tiny.model.config.text_config.hidden_size
    assert plain.name == f"mmret-mllm:{tiny.path.resolve()}"
    assert not plain.has_lora
    assert type(plain.processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert plain.processor.tokenizer.padding_side == "left"
    assert (plain.image_size, plain.prompt, plain.image_token) == (48, PromptFormat(), "<image>")


def test_registry_builds_mmret_mllm(tiny: Tiny) -> None:
    assert "mmret-mllm" in retriever_kinds()
    retriever = build_retriever("mmret-mllm", str(tiny.path), image_size=32)
    assert isinstance(retriever, MMRetMLLM)
    assert (retriever.name, retriever.image_size) == (f"mmret-mllm:{tiny.path}", 32)


def test_refuses_what_is_not_a_llava_next_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match=r"not a LLaVA-NeXT checkpoint \(model_type 'clip'"):
        MMRetMLLM.from_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"cannot load a LLaVA-NeXT checkpoint from .*no-such"):
        MMRetMLLM.from_pretrained(tmp_path / "no-such")


# input strings ---------------------------------------------------------------


def test_query_and_candidate_strings_are_the_papers(
    plain: MMRetMLLM, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RecordingProcessor(plain.processor)
    monkeypatch.setattr(plain, "processor", recorder)
    plain.preprocess_queries(images[:2], TEXTS[:2], TASK)
    plain.preprocess_queries(None, TEXTS[:1], ["Say it."])
    plain.preprocess_queries(images[:1], None, None)
    plain.preprocess_candidates(images[:1], TEXTS[:1])
    plain.preprocess_candidates(None, TEXTS[:1])
    batch = plain.preprocess_candidates(images[:1], None)
    assert recorder.texts == [
        [
            f"<instruct>{TASK} <query>a cat<image>{EOS}",
            f"<instruct>{TASK} <query>{TEXTS[1]}<image>{EOS}",
        ],
        [f"<instruct>Say it. <query>a cat{EOS}"],
        [f"<instruct> <query><image>{EOS}"],
        [f"a cat<image>{EOS}"],
        [f"a cat{EOS}"],
        [f"<image>{EOS}"],
    ]
    tokenizer = plain.processor.tokenizer
    assert batch["input_ids"][0, -1] == tokenizer.eos_token_id


def test_prompt_templates_are_checked() -> None:
    with pytest.raises(ValueError, match="candidate template"):
        PromptFormat(candidate="{instruction}{text}{image}")
    with pytest.raises(ValueError, match="query template"):
        PromptFormat(query="{text}{image}")
    custom = PromptFormat(query="[{instruction}] {text} {image}", candidate="{image} {text}")
    assert custom.render_query("do", "x", "<image>") == "[do] x <image>"


def test_texts_holding_the_image_token_are_refused(plain: MMRetMLLM) -> None:
    with pytest.raises(ValueError, match="text 0 contains the image token"):
        plain.preprocess_candidates(None, ["look: <image>"])


# embeddings ------------------------------------------------------------------


def test_embedding_is_the_normalised_last_token_state(
    plain: MMRetMLLM, tiny: Tiny, images: list[Path]
) -> None:
    """Left-padded batches of different lengths give each item's own unpadded result."""
    pictures = [opened(path) for path in images]
    queries = plain.encode(images, TEXTS, instruction=TASK)
    candidates = plain.encode(None, TEXTS)
    batch = plain.preprocess_queries(images, TEXTS, TASK)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # really padded
    assert (batch["attention_mask"][:, -1] == 1).all()  # on the left
    for index, (picture, text) in enumerate(zip(pictures, TEXTS, strict=True)):
        query = by_hand(tiny, f"<instruct>{TASK} <query>{text}<image>{EOS}", picture)
        candidate = by_hand(tiny, f"{text}{EOS}")
        torch.testing.assert_close(queries[index], query, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(candidates[index], candidate, atol=1e-5, rtol=1e-4)
        alone = plain.encode(images[index], text, instruction=TASK)
        torch.testing.assert_close(alone[0], queries[index], atol=1e-5, rtol=1e-4)
    assert queries.dtype == torch.float32
    torch.testing.assert_close(queries.norm(dim=1), torch.ones(3))
    with torch.no_grad():  # a row chunk keeps the batch's extra left padding (gradient caching)
        chunk = plain.embed({key: value[2:] for key, value in batch.items()})
    torch.testing.assert_close(chunk[0], queries[2], atol=1e-5, rtol=1e-4)


def test_candidates_lack_the_instruction(plain: MMRetMLLM, tiny: Tiny, images: list[Path]) -> None:
    candidates = plain.encode_candidates(images[:2], TEXTS[:2])
    queries = plain.encode_queries(images[:2], TEXTS[:2], TASK)
    bare_queries = plain.encode_queries(images[:2], TEXTS[:2])
    assert (candidates - queries).abs().max() > 1e-3
    assert (bare_queries - queries).abs().max() > 1e-3
    expected = by_hand(tiny, f"{TEXTS[0]}<image>{EOS}", opened(images[0]))
    torch.testing.assert_close(candidates[0], expected, atol=1e-5, rtol=1e-4)


def test_final_token_states_follow_the_mask() -> None:
    hidden = torch.arange(2 * 4 * 1.0).reshape(2, 4, 1)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert final_token_states(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert final_token_states(hidden, right).flatten().tolist() == [1.0, 6.0]
    with pytest.raises(ValueError, match="no tokens"):
        final_token_states(hidden, torch.zeros(2, 4, dtype=torch.long))


def test_fixed_image_size_gives_a_fixed_number_of_image_tokens(
    plain: MMRetMLLM, tiny: Tiny, images: list[Path]
) -> None:
    pictures = [opened(path) for path in images]
    token = plain.processor.image_token_id
    raw = tiny.processor(text=["<image>"] * 3, images=pictures, padding=True, return_tensors="pt")
    assert len(set((raw["input_ids"] == token).sum(1).tolist())) > 1  # any-resolution varies
    fixed = plain.preprocess_candidates(pictures, None)
    counts = (fixed["input_ids"] == token).sum(1).tolist()
    expected = plain.processor._get_num_multimodal_tokens(image_sizes=[[48, 48]])
    assert counts == expected["num_image_tokens"] * 3
    assert fixed["image_sizes"].tolist() == [[48, 48]] * 3
    assert fixed["pixel_values"].shape[:2] == (3, 5)  # base view + 2x2 tiles, for every image


# LoRA ------------------------------------------------------------------------


def test_lora_adapts_vision_tower_and_language_model_only(adapted: MMRetMLLM) -> None:
    llava = adapted.llava
    trainable = {n: p.numel() for n, p in llava.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    lora_modules = {name.split(".lora_")[0] for name in trainable}
    vision = {n for n in lora_modules if ".vision_tower." in n}
    language = {n for n in lora_modules if ".language_model." in n}
    assert lora_modules == vision | language  # nothing on the projector, embeddings, LM head
    assert {n.split("layers.")[1].split(".")[0] for n in vision} == {"0"}  # layer 1 feeds nothing
    assert {n.rsplit(".", 1)[1] for n in vision} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }
    assert len(language) == 2 * 7
    modules = dict(llava.named_modules())
    expected = sum(
        4 * (modules[n].in_features + modules[n].out_features) for n in lora_modules
    )  # rank 4: A is (4, in), B is (out, 4)
    assert sum(trainable.values()) == expected


def test_gradients_reach_every_lora_parameter(adapted: MMRetMLLM, images: list[Path]) -> None:
    queries = adapted.preprocess_queries(images[:2], TEXTS[:2], TASK)
    candidates = adapted.preprocess_candidates(images[1:3], None)
    adapted.train()
    try:
        scores = adapted.embed(queries) @ adapted.embed(candidates).T
        F.cross_entropy(scores / 0.02, torch.arange(2)).backward()
        for name, parameter in adapted.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            else:
                assert parameter.grad is None, name
    finally:
        adapted.zero_grad(set_to_none=True)
        adapted.eval()


def test_lora_settings_parse() -> None:
    assert LoraSettings.parse(True) == LoraSettings()
    assert LoraSettings.parse(False) is None
    assert LoraSettings.parse({"rank": 8, "language_modules": ["q_proj"]}).language_modules == (
        "q_proj",
    )
    with pytest.raises(ValueError, match=r"unknown LoRA setting\(s\) \['r'\]"):
        LoraSettings.parse({"r": 8})


# saving ----------------------------------------------------------------------


def test_save_and_load_round_trip(
    adapted: MMRetMLLM, plain: MMRetMLLM, tiny: Tiny, images: list[Path], tmp_path: Path
) -> None:
    adapted.prompt = PromptFormat(query="Q: {instruction} | {text}{image}")
    adapted.task_instruction = TASK
    try:
        adapted.save_pretrained(tmp_path)
        before = adapted.encode(images[:2], TEXTS[:2], instruction=TASK)
    finally:
        adapted.prompt = PromptFormat()
        adapted.task_instruction = None
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny.path.resolve())
    assert not (tmp_path / "model.safetensors").exists()  # the adapter only

    trainable = MMRetMLLM.from_pretrained(tmp_path, lora=True)
    merged = MMRetMLLM.from_pretrained(tmp_path)
    assert trainable.has_lora and not merged.has_lora
    assert any(p.requires_grad for p in trainable.parameters())
    assert (merged.image_size, merged.prompt.query) == (
        IMAGE_SIZE,
        "Q: {instruction} | {text}{image}",
    )
    torch.testing.assert_close(trainable.encode(images[:2], TEXTS[:2], instruction=TASK), before)
    torch.testing.assert_close(
        merged.encode(images[:2], TEXTS[:2], instruction=TASK), before, atol=1e-5, rtol=1e-4
    )
    assert merged.task_instruction == TASK and plain.task_instruction is None
    torch.testing.assert_close(
        merged.encode_queries(images[:2], TEXTS[:2]),
        merged.encode(images[:2], TEXTS[:2], instruction=TASK),
    )  # the saved task instruction is the default
    untasked = merged.encode_queries(images[:2], TEXTS[:2], instruction="")
    torch.testing.assert_close(untasked, merged.encode(images[:2], TEXTS[:2], instruction=""))
    assert (untasked - merged.encode(images[:2], TEXTS[:2], instruction=TASK)).abs().max() > 1e-4
    base = plain.encode(images[:2], TEXTS[:2], instruction=TASK)
    assert (base - before).abs().max() > 1e-3  # the adapter was really loaded
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        MMRetMLLM.from_pretrained(tmp_path, lora={"rank": 2})


def test_a_model_without_adapters_saves_a_full_checkpoint(
    plain: MMRetMLLM, images: list[Path], tmp_path: Path
) -> None:
    plain.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MMRetMLLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.encode(images[:1]), plain.encode(images[:1]))


# encode ----------------------------------------------------------------------


def test_encode_handles_every_input_form(plain: MMRetMLLM, images: list[Path]) -> None:
    pictures = [opened(path) for path in images]
    composed = plain.encode(images, TEXTS)
    torch.testing.assert_close(plain.encode(pictures, TEXTS, batch_size=2), composed)
    torch.testing.assert_close(plain.encode(str(images[0]), TEXTS[0]), composed[:1])
    torch.testing.assert_close(plain.encode(pictures[1], TEXTS[1]), composed[1:2])
    image_only = plain.encode(images)
    assert image_only.shape == (3, plain.dim)
    torch.testing.assert_close(plain.encode(images[2]), image_only[2:])
    text_only = plain.encode(text=TEXTS)
    torch.testing.assert_close(plain.encode(text=TEXTS[1]), text_only[1:2])
    per_item = plain.encode(images[:2], TEXTS[:2], instruction=[TASK, "other"])
    torch.testing.assert_close(per_item[0], plain.encode(images[0], TEXTS[0], instruction=TASK)[0])
    assert plain.encode(images=[]).shape == (0, plain.dim)
    with pytest.raises(ValueError, match="nothing to encode"):
        plain.encode()
    with pytest.raises(ValueError, match="2 image\\(s\\) and 1 text\\(s\\)"):
        plain.encode(images[:2], TEXTS[:1])
    with pytest.raises(ValueError, match="2 instructions for 3 queries"):
        plain.encode(images, TEXTS, instruction=[TASK, TASK])
