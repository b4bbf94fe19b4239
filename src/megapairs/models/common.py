"""What the retrievers (MMRet-CLIP, MMRet-MLLM) share.

- `resolve_placement`: the device and dtype a checkpoint loads to (`auto` as the
  encoders read it: cuda + float16 when present, else cpu + float32);
- `CheckpointKind`: a transformers checkpoint checked by its config's `model_type`,
  loaded with every weight present, and load errors that say what to do;
- `user_items` and `encode_in_batches`: user inputs as checked lists, embedded batch
  by batch without gradients in eval mode (`eval_mode`, `slice_or_none`);
- `read_settings`: the small JSON file a retriever saves beside its weights;
- `preprocessing_key` and `image_transform_parts`: a short string naming everything that
  turns a user's item into model inputs (each retriever's `preprocessing_key`);
- `enable_activation_checkpointing` and `activation_checkpointing_on`: transformers'
  activation (gradient) checkpointing of a model's layers, switched on and read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from megapairs.encoders.base import resolve_device, resolve_dtype
from megapairs.models.inputs import (
    ImageInput,
    ImagesInput,
    TextsInput,
    as_image_list,
    as_text_list,
    check_batch_lengths,
)

Item = TypeVar("Item")
PathLike = str | os.PathLike[str]


def resolve_placement(
    device: str | torch.device, dtype: str | torch.dtype
) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype to load to: `device` `auto` is cuda when available,
    `dtype` `auto` float16 on cuda and float32 elsewhere. A device torch does not know,
    or cuda on a machine without it, is a ValueError."""
    torch_device = (
        device if isinstance(device, torch.device) else resolve_device(device, setting="device")
    )
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)
    return torch_device, torch_dtype


# checkpoints ------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointKind:
    """One kind of transformers checkpoint, and how errors about it name it.

    `label` is the name people use ("CLIP"), `model_type` the one its config.json
    records, `model_class` the transformers class that loads it, `parts` what a
    complete one holds, `folder_contents` what a local checkpoint folder must hold."""

    label: str
    model_type: str
    model_class: str
    parts: str
    folder_contents: str

    def load_model(self, source: str, **options: Any) -> Any:
        """The model in `source` (`options` go to `from_pretrained`). ValueError when the
        config is another kind's or weights are missing; OSError when it cannot be read."""
        import transformers

        self.check_config(source)
        model_class = getattr(transformers, self.model_class)
        model, info = model_class.from_pretrained(source, output_loading_info=True, **options)
        missing = list(info.get("missing_keys") or [])
        if missing:
            shown = ", ".join(sorted(missing)[:5])
            raise ValueError(
                f"{source!r} lacks {len(missing)} {self.label} weight(s) ({shown}, ...): "
                f"a complete {self.label} checkpoint ({self.parts}) is needed"
            )
        return model

    def check_config(self, source: str) -> None:
        """ValueError unless `source`'s config.json names this kind's `model_type`."""
        from transformers import PretrainedConfig

        config, _ = PretrainedConfig.get_config_dict(source)
        model_type = config.get("model_type")
        if model_type != self.model_type:
            found = f"model_type {model_type!r}" if config else "no config.json"
            raise ValueError(
                f"{source!r} is not a {self.label} checkpoint "
                f"({found}; expected {self.model_type!r})"
            )

    @contextlib.contextmanager
    def loading(self, source: str) -> Iterator[None]:
        """Turn an OSError raised inside into one that says why `source` did not load."""
        try:
            yield
        except OSError as err:
            raise OSError(self.load_failure(source, err)) from err

    def load_failure(self, source: str, err: Exception) -> str:
        """Why `source` did not load, and what to do about it."""
        reason = str(err).strip().rstrip(".")
        if Path(source).exists():
            return (
                f"cannot load a {self.label} checkpoint from the local folder {source!r}: "
                f"{reason}. It must hold {self.folder_contents}."
            )
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false")
        hub = "HF_HUB_OFFLINE switches the hub off here" if offline else "is the hub reachable?"
        return (
            f"cannot load a {self.label} checkpoint from {source!r}: no local folder of that "
            f"name exists, and as a hub name it needs network access ({hub}): {reason}. "
            "Offline, pass a local checkpoint folder."
        )


# encoding user inputs ---------------------------------------------------------


def read_settings(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when there is no such file; ValueError when unreadable."""
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return settings


def user_items(
    images: ImagesInput | None, text: TextsInput | None
) -> tuple[list[ImageInput] | None, list[str] | None, int]:
    """`images` and `text` as lists (None stays None; images not opened yet), checked to
    hold one image per text when both are given, and the number of items."""
    if images is None and text is None:
        raise ValueError("nothing to encode: give images, text, or both")
    image_list = None if images is None else as_image_list(images)
    text_list = None if text is None else as_text_list(text)
    check_batch_lengths(image_list, text_list)
    count = len(image_list) if image_list is not None else len(text_list or [])
    return image_list, text_list, count


def encode_in_batches(
    module: torch.nn.Module,
    encode_batch: Callable[..., torch.Tensor],
    columns: Sequence[list[Any] | None],
    count: int,
    batch_size: int,
    dim: int,
) -> torch.Tensor:
    """`encode_batch(*slices)` over `count` items, `batch_size` at a time: each call gets
    the batch's slice of every column (None for a None column). Runs without gradients
    in eval mode (`module`'s previous mode is restored). Returns the rows concatenated,
    or a (0, `dim`) tensor when there are no items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    with eval_mode(module), torch.inference_mode():
        rows = [
            encode_batch(*(slice_or_none(column, start, start + batch_size) for column in columns))
            for start in range(0, count, batch_size)
        ]
    return torch.cat(rows) if rows else torch.zeros(0, dim)


def slice_or_none(items: list[Item] | None, start: int, stop: int) -> list[Item] | None:
    """`items[start:stop]`, or None when there are no items."""
    return None if items is None else items[start:stop]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for a block, then the module's previous mode again."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# activation checkpointing -----------------------------------------------------

CHECKPOINT_OPTIONS = {"use_reentrant": False}
"""`torch.utils.checkpoint` keywords: non-reentrant (inputs need not require gradients, so
frozen embeddings under LoRA need no `enable_input_require_grads`, and DDP works);
`preserve_rng_state` stays on (its default), so the recomputed forward draws the dropout
masks of the first one, also inside a gradient-cached chunk replay."""


def enable_activation_checkpointing(model: Any) -> None:
    """Checkpoint every layer of a transformers `PreTrainedModel` and of its sub-models
    (a LLaVA vision tower and language model alike): their activations are recomputed in
    backward instead of kept. It acts in train mode only, with gradients enabled."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name in newer transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_OPTIONS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_OPTIONS)


def activation_checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether any layer of `model` is checkpointed (what transformers'
    `is_gradient_checkpointing` reports, without its deprecation warning)."""
    return any(
        getattr(module, "gradient_checkpointing", False) is True for module in model.modules()
    )


# preprocessing keys -----------------------------------------------------------


def preprocessing_key(kind: str, parts: Mapping[str, object], details: object = None) -> str:
    """`kind;name=value;...` from `parts` (the settings people read), then `#` and a short
    digest of `details` (everything else that preprocessing reads, JSON-serialisable)."""
    fields = ";".join(f"{name}={value}" for name, value in parts.items())
    blob = json.dumps(details, sort_keys=True, default=str).encode()
    return f"{kind};{fields}#{hashlib.sha256(blob).hexdigest()[:10]}"


def image_transform_parts(image_processor: Any) -> dict[str, str]:
    """A transformers image processor's resize, crop and normalisation, as short strings."""
    config = image_processor.to_dict()
    parts = {"resize": _size(config.get("size")) if config.get("do_resize", True) else "no"}
    if config.get("do_center_crop"):
        parts["crop"] = _size(config.get("crop_size"))
    if config.get("do_normalize", True):
        mean, std = (_numbers(config.get(key)) for key in ("image_mean", "image_std"))
        parts["norm"] = f"{mean}/{std}"
    else:
        parts["norm"] = "no"
    return parts


def _size(size: object) -> str:
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return f"{size['height']}x{size['width']}"
        return ",".join(f"{key}:{value}" for key, value in sorted(size.items()))
    return str(size)


def _numbers(values: object) -> str:
    items = values if isinstance(values, list | tuple) else [values]
    return ",".join(f"{float(v):.4g}" for v in items)  # type: ignore[arg-type]
