"""One factory from the annotate config to a ready backend."""

from __future__ import annotations

from megapairs.annotation.backends import hf, openai_chat, template  # noqa: F401  (fill BACKENDS)
from megapairs.annotation.backends.base import BACKENDS, AnnotatorBackend
from megapairs.config import AnnotateConfig


def build_backend(config: AnnotateConfig) -> AnnotatorBackend:
    """The backend `config.backend`, built from the describer and instructor settings."""
    return BACKENDS.build(config.backend, config)


def backend_names() -> list[str]:
    return BACKENDS.names()
