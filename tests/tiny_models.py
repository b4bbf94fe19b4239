"""Tiny random models of the real architectures (CLIP, SigLIP, DINOv2), saved with
`save_pretrained` so tests load them back through the same path real checkpoints use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROJECTION_DIM = 16
HIDDEN = 32


def clip_tokenizer() -> Any:
    """A real CLIP BPE tokenizer over the byte alphabet, with a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["th", "the</w>", "ca", "cat</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def wordlevel_tokenizer(max_length: int) -> Any:
    """A word-level fast tokenizer ending each text with </s>, as SigLIP's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "a", "cat", "dog", "the", "sat", "on", "mat", "red"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=max_length,
    )


def tower(**extra: Any) -> dict[str, Any]:
    layers = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    return {"hidden_size": HIDDEN, **layers, **extra}


@dataclass
class Tiny:
    """A saved tiny model and the in-memory objects it was saved from."""

    path: Path
    model: Any
    processor: Any = None
    tokenizer: Any = None


def save(tiny: Tiny) -> Tiny:
    for part in (tiny.model, tiny.processor, tiny.tokenizer):
        if part is not None:
            part.save_pretrained(tiny.path)
    return tiny


def build_tiny_clip(path: Path) -> Tiny:
    """A tiny random CLIPModel with processor and tokenizer, saved under `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text = tower(vocab_size=len(tokenizer), max_position_embeddings=64)
    text.update(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[1])
    config = CLIPConfig(
        text_config=text,
        vision_config=tower(image_size=32, patch_size=8),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(0)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return save(Tiny(path, CLIPModel(config).eval(), processor, tokenizer))


def build_tiny_siglip(path: Path) -> Tiny:
    """A tiny random SiglipModel with processor and tokenizer, saved under `path`."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = wordlevel_tokenizer(max_length=16)
    config = SiglipConfig(
        text_config=tower(
            vocab_size=len(tokenizer), max_position_embeddings=16, pad_token_id=0, eos_token_id=2
        ),
        vision_config=tower(image_size=32, patch_size=8),
    )
    torch.manual_seed(1)
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    return save(Tiny(path, SiglipModel(config).eval(), processor, tokenizer))


def build_tiny_dinov2(path: Path) -> Tiny:
    """A tiny random Dinov2Model with its image processor, saved under `path`."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    model = Dinov2Model(Dinov2Config(**tower(image_size=32, patch_size=8))).eval()
    processor = BitImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return save(Tiny(path, model, processor))
