"""Encoders on transformers models: CLIP and SigLIP towers, DINOv2.

Every builder loads with `from_pretrained(model)`, so `model` is a hub name or
a local directory holding the weights, the image processor and the tokenizer.
Only the tower a channel needs is loaded (`CLIPVisionModelWithProjection` from a
full CLIP checkpoint, and so on). EVA-CLIP-style checkpoints that load with the
transformers CLIP classes go through `clip-image` / `clip-text` unchanged.

- `clip-image` / `clip-text`: the projected image / text embeddings
  (`image_embeds`, `text_embeds`), the space CLIP compares images and captions in.
- `siglip-image` / `siglip-text`: the towers' pooled outputs; SigLIP's text tower
  was trained on captions padded to `max_length` without an attention mask, so it
  is fed the same way.
- `dinov2`: the final-layernormed CLS token (`pooler_output`), the mean of the
  patch tokens, or both concatenated (option `pooling: cls | mean | cls+mean`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from megapairs.config import Section
from megapairs.encoders.base import (
    ENCODERS,
    ImageEncoder,
    TextEncoder,
    parse_options,
    unit_rows,
)
from megapairs.registry import Registry

Pooling = Callable[[Any], torch.Tensor]


class NoOptions(Section):
    """Encoders that take no options."""


class TextOptions(Section):
    """Options of the transformers text towers."""

    max_length: int | None = Field(None, ge=1)  # default: the model's position limit


class Dinov2Options(Section):
    """How DINOv2's tokens become one vector."""

    pooling: Literal["cls", "mean", "cls+mean"] = "cls"


# preprocessing --------------------------------------------------------------


class HFImagePreprocessor:
    """A transformers image processor as a picklable PIL image -> CHW tensor callable."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels.float()


def processor_draft_size(processor: Any) -> tuple[int, int]:
    """The (width, height) an image may be decoded down to before the processor
    resizes it without losing detail: the processor's resize target."""
    size = dict(getattr(processor, "size", None) or {})
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        return edge, edge
    if "height" in size and "width" in size:
        return int(size["width"]), int(size["height"])
    crop = dict(getattr(processor, "crop_size", None) or {})
    if "height" in crop and "width" in crop:
        return int(crop["width"]), int(crop["height"])
    raise ValueError(f"cannot tell the input size of image processor {type(processor).__name__}")


def load_image_processor(model: str) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model)


# encoders ------------------------------------------------------------------


class HFImageEncoder(ImageEncoder):
    """A transformers vision model whose output `pool` turns into one vector per image."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        processor: Any,
        pool: Pooling,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(
            name,
            dim,
            device,
            dtype,
            preprocessor=HFImagePreprocessor(processor),
            draft_size=processor_draft_size(processor),
        )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.pool = pool

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        if len(pixels) == 0:
            return self.empty()
        pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return unit_rows(self.pool(self.model(pixel_values=pixels)))


class HFTextEncoder(TextEncoder):
    """A transformers text model with its tokenizer; `pool` picks the vector."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any,
        pool: Pooling,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int,
        padding: Literal["longest", "max_length"] = "longest",
        input_names: tuple[str, ...] = ("input_ids", "attention_mask"),
    ) -> None:
        super().__init__(name, dim, device, dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_length = max_length
        self.padding = padding
        self.input_names = input_names

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return self.empty()
        tokens = self.tokenizer(
            list(texts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {key: tokens[key].to(self.device) for key in self.input_names}
        return unit_rows(self.pool(self.model(**inputs)))


def text_max_length(tokenizer: Any, model_config: Any, requested: int | None) -> int:
    """The longest token sequence to feed: the option, else what the model can read."""
    limit = int(model_config.max_position_embeddings)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    return min(requested, limit) if requested else limit


def tower_config(model: str, tower: Literal["vision", "text"]) -> Any:
    """The config of one tower of a two-tower checkpoint (or of a lone tower checkpoint),
    carrying the checkpoint's `projection_dim` into it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    sub = getattr(config, f"{tower}_config", None)
    if sub is None:
        return config
    sub = copy.deepcopy(sub)
    if hasattr(config, "projection_dim"):
        sub.projection_dim = config.projection_dim
    return sub


def _name(encoder: str, model: str) -> str:
    return f"{encoder}:{model}"


def load_tower(model_class: Any, model: str, config: Any) -> Any:
    """One tower of a two-tower checkpoint; the other tower's weights are expected to be
    left over, so transformers' report of them is silenced (real errors still raise)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(model, config=config)
    finally:
        hf_logging.set_verbosity(verbosity)


# CLIP ----------------------------------------------------------------------


@ENCODERS.register("clip-image")
def build_clip_image(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> HFImageEncoder:
    from transformers import CLIPVisionModelWithProjection

    parse_options(NoOptions, options, "clip-image")
    config = tower_config(model, "vision")
    network = load_tower(CLIPVisionModelWithProjection, model, config)
    return HFImageEncoder(
        _name("clip-image", model),
        network,
        load_image_processor(model),
        pool=lambda output: output.image_embeds,
        dim=int(config.projection_dim),
        device=device,
        dtype=dtype,
    )


@ENCODERS.register("clip-text")
def build_clip_text(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> HFTextEncoder:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    parsed = parse_options(TextOptions, options, "clip-text")
    config = tower_config(model, "text")
    tokenizer = AutoTokenizer.from_pretrained(model)
    return HFTextEncoder(
        _name("clip-text", model),
        load_tower(CLIPTextModelWithProjection, model, config),
        tokenizer,
        pool=lambda output: output.text_embeds,
        dim=int(config.projection_dim),
        device=device,
        dtype=dtype,
        max_length=text_max_length(tokenizer, config, parsed.max_length),
    )


# SigLIP --------------------------------------------------------------------


@ENCODERS.register("siglip-image")
def build_siglip_image(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> HFImageEncoder:
    from transformers import SiglipVisionModel

    parse_options(NoOptions, options, "siglip-image")
    network = load_tower(SiglipVisionModel, model, None)
    return HFImageEncoder(
        _name("siglip-image", model),
        network,
        load_image_processor(model),
        pool=lambda output: output.pooler_output,
        dim=int(network.config.hidden_size),
        device=device,
        dtype=dtype,
    )


@ENCODERS.register("siglip-text")
def build_siglip_text(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> HFTextEncoder:
    from transformers import AutoTokenizer, SiglipTextModel

    parsed = parse_options(TextOptions, options, "siglip-text")
    network = load_tower(SiglipTextModel, model, None)
    tokenizer = AutoTokenizer.from_pretrained(model)
    return HFTextEncoder(
        _name("siglip-text", model),
        network,
        tokenizer,
        pool=lambda output: output.pooler_output,
        dim=int(network.config.hidden_size),
        device=device,
        dtype=dtype,
        max_length=text_max_length(tokenizer, network.config, parsed.max_length),
        padding="max_length",
        input_names=("input_ids",),
    )


# DINOv2 --------------------------------------------------------------------

DINOV2_POOLINGS: Registry[torch.Tensor] = Registry("dinov2 pooling")


@DINOV2_POOLINGS.register("cls")
def _cls_token(output: Any) -> torch.Tensor:
    return output.pooler_output


@DINOV2_POOLINGS.register("mean")
def _mean_patch_tokens(output: Any) -> torch.Tensor:
    return output.last_hidden_state[:, 1:].mean(dim=1)


@DINOV2_POOLINGS.register("cls+mean")
def _cls_and_mean(output: Any) -> torch.Tensor:
    return torch.cat([_cls_token(output), _mean_patch_tokens(output)], dim=-1)


DINOV2_WIDTH = {"cls": 1, "mean": 1, "cls+mean": 2}


@ENCODERS.register("dinov2")
def build_dinov2(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> HFImageEncoder:
    from transformers import Dinov2Model

    parsed = parse_options(Dinov2Options, options, "dinov2")
    network = Dinov2Model.from_pretrained(model)
    return HFImageEncoder(
        f"{_name('dinov2', model)}[{parsed.pooling}]",
        network,
        load_image_processor(model),
        pool=DINOV2_POOLINGS.get(parsed.pooling),
        dim=int(network.config.hidden_size) * DINOV2_WIDTH[parsed.pooling],
        device=device,
        dtype=dtype,
    )
