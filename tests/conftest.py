"""Shared test settings (never reach for a model hub) and tiny models built once."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import Tiny, build_tiny_clip, build_tiny_dinov2, build_tiny_siglip
from tiny_vlm import build_tiny_causal_lm, build_tiny_llava_next

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A tiny random LLaVA-NeXT (image-text-to-text) with its processor and chat template."""
    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A tiny random Llama causal LM with its tokenizer and chat template."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread (training on a shared CPU: spinning OpenMP threads
    cost several times more), then restore the previous number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def explore_demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished demo run (240 images, two parts, template annotations, exported), built once."""
    from explore_fixtures import build_explore_demo_run

    return build_explore_demo_run(tmp_path_factory.mktemp("explore-demo") / "run")
