"""Pictures for tests: random image files of chosen sizes and modes, and JPEG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

Color = tuple[int, int, int]
Size = tuple[int, int]  # (width, height), as PIL gives it


def save_random_images(folder: Path, specs: Sequence[tuple[Size, str]]) -> list[Path]:
    """One picture of random pixels (seeded: the same every run) per `(size, mode)`,
    saved as `image-{index}.png` under `folder`; modes "RGB", "RGBA" or "L"."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index, ((width, height), mode) in enumerate(specs):
        channels = len(mode)
        shape = (height, width, channels) if channels > 1 else (height, width)
        pixels = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        path = folder / f"image-{index}.png"
        Image.fromarray(pixels.numpy(), mode).save(path)
        paths.append(path)
    return paths


def jpeg_bytes(color: Color, size: Size = (12, 10)) -> bytes:
    """A JPEG file's bytes: one colour all over."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()
