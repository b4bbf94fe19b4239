"""The encoder interface: images or texts in, L2-normalised float32 vectors out.

An image encoder splits its work in two so the embed stage can overlap them:
`preprocess` (PIL image -> CHW float32 tensor) runs in DataLoader worker
processes, so it is delegated to a small picklable `preprocessor` object that
holds no model; `encode_pixels` runs the model on a stacked batch. A text
encoder takes a list of strings. Every encoder names itself (`name`), knows its
output size (`dim`) and says what it reads (`modality`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from megapairs.config import Section
from megapairs.registry import Registry

Modality = Literal["image", "text"]
Preprocessor = Callable[[Image.Image], torch.Tensor]
Options = TypeVar("Options", bound=Section)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class Encoder(ABC):
    """What every encoder has: a name for the manifest, an output size, a modality."""

    modality: ClassVar[Modality]

    def __init__(self, name: str, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.name = name
        self.dim = dim
        self.device = device
        self.dtype = dtype

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this encoder."""
        return {
            "name": self.name,
            "modality": self.modality,
            "dim": self.dim,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def empty(self) -> np.ndarray:
        """A [0, dim] float32 array: the result of encoding nothing."""
        return np.zeros((0, self.dim), dtype=np.float32)


class ImageEncoder(Encoder):
    """Images -> vectors, in two steps: `preprocess` (per image) and `encode_pixels`."""

    modality: ClassVar[Modality] = "image"

    def __init__(
        self,
        name: str,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
        preprocessor: Preprocessor,
        draft_size: tuple[int, int],
    ) -> None:
        super().__init__(name, dim, device, dtype)
        self.preprocessor = preprocessor
        self.draft_size = draft_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> the CHW float32 tensor the model reads."""
        return self.preprocessor(image)

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """A [B, C, H, W] batch of preprocessed images -> float32 [B, dim], unit rows."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess and encode images in this process (convenience for small sets)."""
        if not images:
            return self.empty()
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))


class TextEncoder(Encoder):
    """Texts -> vectors."""

    modality: ClassVar[Modality] = "text"

    @abstractmethod
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 [len(texts), dim], unit rows."""


ENCODERS: Registry[Encoder] = Registry("encoder")
"""Encoder builders by name; each is called as
`builder(model: str, options: dict, device: torch.device, dtype: torch.dtype)`."""


def resolve_device(device: str, setting: str = "embed.device") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch spells it.

    `setting` names where the value came from, in the ValueError raised for a device
    torch does not know or a cuda device this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{setting} {device!r} is not a torch device: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting} is {device!r} but this torch sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> float16 on cuda, float32 elsewhere; or the named dtype."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        known = ", ".join(["auto", *DTYPES])
        raise ValueError(f"unknown dtype {dtype!r}; known: {known}") from None


def unit_rows(vectors: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, as a float32 numpy array on the CPU."""
    vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return vectors.cpu().numpy()


def parse_options(schema: type[Options], options: dict[str, Any], encoder: str) -> Options:
    """Validate an encoder's `options` against its schema; unknown keys are errors."""
    try:
        return schema.model_validate(options)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in err.errors()
        )
        known = ", ".join(schema.model_fields) or "none"
        raise ValueError(
            f"invalid options for encoder {encoder!r}: {problems} (options: {known})"
        ) from err
