"""Tiny random generative models of real architectures, saved with `save_pretrained` so
tests load them back through `from_pretrained` exactly as real checkpoints load.

- `build_tiny_llava_next`: a LLaVA-NeXT image-text-to-text model (CLIP vision tower,
  Mistral text model, as llava-v1.6-mistral-7b and MMRet-MLLM) with its processor.
- `build_tiny_causal_lm`: a Llama causal LM with its tokenizer.

Both share one offline byte-level BPE tokenizer (any text encodes, nothing is unknown)
and a chat template that renders `{"type": "text"}` / `{"type": "image"}` content parts,
an image as `<image>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_models import Tiny, save

HIDDEN = 32  # hidden size of every tiny tower (vision and text)
IMAGE_SIZE = 32  # vision tower input side; patches of PATCH_SIZE
PATCH_SIZE = 8
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # LLaVA-NeXT any-resolution tiles
MAX_TOKENS = 16384  # room for the real prompts (~5k byte-level tokens with 5 demonstrations)
INIT_RANGE = 0.3  # wider than the usual 0.02, so what is generated depends on the prompt
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]
MERGED_WORDS = ["the", "image", "and", "of", "in"]  # a few BPE merges, as a real vocab has

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _merges() -> tuple[list[str], list[tuple[str, str]]]:
    """BPE merges building each of MERGED_WORDS left to right, and the tokens they make."""
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    for word in MERGED_WORDS:
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            if word[:end] not in tokens:
                merges.append((left, right))
                tokens.append(word[:end])
    return tokens, merges


def byte_bpe_tokenizer() -> Any:
    """A byte-level BPE fast tokenizer with pad/bos/eos and the `<image>` special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged, merges = _merges()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet + merged)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_TOKENS,
    )


def _text_config(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "initializer_range": INIT_RANGE,
    }


def build_tiny_llava_next(path: Path, seed: int = 0) -> Tiny:
    """A tiny random LlavaNextForConditionalGeneration with its processor, saved under `path`.

    Sizes (62k parameters): CLIP vision tower hidden 32, 2 layers, image side 32, patch 8
    (16 patches); Mistral text model hidden 32 (`text_config.hidden_size == HIDDEN`),
    2 layers, 4 heads (2 kv), 16k positions; vocabulary 270 byte-level BPE tokens. Image
    grid pinpoints [[32,32],[32,64],[64,32],[64,64]]: an image becomes the base 32x32 view
    plus 1-4 tiles, 24-88 `<image>` tokens (feature strategy "default": CLS dropped,
    feature layer -2). The image processor is the PIL one (`LlavaNextImageProcessorPil`:
    no torchvision here). Load it back with `AutoProcessor` and `AutoModelForImageTextToText`
    (or `LlavaNextForConditionalGeneration`). Weights are drawn with `INIT_RANGE` under
    `torch.manual_seed(seed)`.
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = byte_bpe_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "projection_dim": HIDDEN,
        },
        text_config={"model_type": "mistral", **_text_config(tokenizer)},
        image_token_index=image_token_id,
        image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _set_generation_ids(model, tokenizer)
    return save(Tiny(path, model, processor))


def build_tiny_causal_lm(path: Path, seed: int = 1) -> Tiny:
    """A tiny random LlamaForCausalLM with its tokenizer (and chat template), saved under `path`.

    Sizes (36k parameters): hidden 32, 2 layers, 4 heads (2 kv), 16k positions,
    vocabulary 270 byte-level BPE tokens.
    Load it back with `AutoTokenizer` and `AutoModelForCausalLM`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_text_config(tokenizer))).eval()
    _set_generation_ids(model, tokenizer)
    return save(Tiny(path, model, tokenizer=tokenizer))


def _set_generation_ids(model: Any, tokenizer: Any) -> None:
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
