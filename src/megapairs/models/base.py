"""The retriever interface that evaluation, training and serving share, and its factory.

A retriever embeds queries and candidates into one space where the dot product
ranks candidates. Either side may be an image, a text or both (a composed
image + text item); every output row is L2-normalised, so dot product = cosine.

Outputs are `torch.Tensor`s, float32, shape (B, d), on the CPU: torch because
training and evaluation then share one type (and `Tensor.numpy()` hands the same
memory to FAISS at no cost), CPU so that a large gallery encoded batch by batch
never piles up on the accelerator.

Retrievers are built by kind and checkpoint through `build_retriever`:

| kind | class | checkpoint |
|---|---|---|
| `mmret-clip` | `megapairs.models.clip.MMRetCLIP` | an MMRet-CLIP / BGE-VL-CLIP checkpoint |
| `clip` | the same class | any plain CLIP checkpoint: the zero-shot baseline |
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from megapairs.registry import Registry

RETRIEVER_MODULES = ("megapairs.models.clip", "megapairs.models.mllm")
"""Modules whose `RETRIEVERS.register` decorators fill the registry; imported on first build."""


@runtime_checkable
class Retriever(Protocol):
    """Queries and candidates -> float32 (B, d) CPU tensors with unit rows.

    `images` and `texts` are lists of equal length when both are given (one image
    per text: a composed item); either may be None, not both."""

    name: str

    def encode_queries(
        self,
        images: list[Image.Image] | None,
        texts: list[str] | None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        """Embed queries; `instruction` is the task's instruction (how a retriever uses
        it is its own: MMRet-CLIP prepends it to the query text)."""
        ...

    def encode_candidates(
        self, images: list[Image.Image] | None, texts: list[str] | None
    ) -> torch.Tensor:
        """Embed candidates (gallery items)."""
        ...


RETRIEVERS: Registry[Retriever] = Registry("retriever")
"""Retriever factories by kind; each is called as `factory(model: str, **options)`."""


def build_retriever(kind: str, model: str, **options: Any) -> Retriever:
    """The retriever `kind` loaded from `model` (a hub name or a local folder).

    `options` go to the retriever's loader (for MMRet-CLIP: `device`, `dtype`,
    `max_text_length`)."""
    _register_retrievers()
    return RETRIEVERS.build(kind, model, **options)


def retriever_kinds() -> list[str]:
    """The registered retriever kinds."""
    _register_retrievers()
    return RETRIEVERS.names()


def _register_retrievers() -> None:
    for module in RETRIEVER_MODULES:
        importlib.import_module(module)
