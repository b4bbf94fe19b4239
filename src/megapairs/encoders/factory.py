"""One factory from a channel's config to a ready encoder.

Encoders are looked up by name in `ENCODERS`, filled by the `register` decorators
of the modules imported here:

| name | module | reads |
|---|---|---|
| `clip-image`, `clip-text` | `hf` | images / captions (CLIP, EVA-CLIP-style checkpoints) |
| `siglip-image`, `siglip-text` | `hf` | images / captions (SigLIP) |
| `dinov2` | `hf` | images |
| `sentence-transformers` | `sentence` | captions |
| `efficientnet-lite0` | `efficientnet` | images |
"""

from __future__ import annotations

from megapairs.config import ChannelConfig
from megapairs.encoders import efficientnet, hf, sentence  # noqa: F401  (fill ENCODERS)
from megapairs.encoders.base import ENCODERS, Encoder, resolve_device, resolve_dtype


def build_encoder(channel: ChannelConfig, device: str = "auto", dtype: str = "auto") -> Encoder:
    """The encoder `channel.encoder` over `channel.model`, in eval mode on `device`.

    `device` auto is cuda when available, else cpu; `dtype` auto is float16 on
    cuda and float32 elsewhere."""
    builder = ENCODERS.get(channel.encoder)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        return builder(channel.model, dict(channel.options), torch_device, torch_dtype)
    except (OSError, ImportError) as err:
        raise RuntimeError(
            f"cannot load encoder {channel.encoder!r} from {channel.model!r} (a hub name, "
            f"or a local folder saved with save_pretrained): {err}"
        ) from err


def encoder_names() -> list[str]:
    """The registered encoder names."""
    return ENCODERS.names()
