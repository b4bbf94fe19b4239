"""What the trainer needs from each MMRet model kind, one small adapter per kind.

An adapter loads the model (`from_pretrained`, a hub name or a local folder, also a
checkpoint the trainer saved), turns loaded samples into tensors, and embeds them with
gradients:

- `collator` is a picklable callable, run in DataLoader workers, that turns a list of
  `TrainSample`s (decoded images, one instruction each) into a `TrainBatch`: `queries` and
  `candidates`, mappings of tensors with one leading row per query resp. per candidate,
  the candidates grouped per query as [positive, m negatives] (`InfoNCELoss.grouped`), so
  both can be split into chunks with `gradcache.chunk_inputs`;
- `embed_queries(inputs)` / `embed_candidates(inputs)` are differentiable (B, d) unit rows.

Both collators hold the model's own preprocessor (`model.preprocessor`: `CLIPPreprocessor`,
`MLLMPreprocessor`), the very code its `encode_queries` / `encode_candidates` run at search
time, so a training query and the same query at evaluation get identical model inputs; the
sampled instruction stands as the query text and `settings.task_instruction` as the task
instruction. MMRet-CLIP (score fusion): a query is composed(image, "{task} {instruction}")
and a candidate is an image. MMRet-MLLM: a query is
`<instruct>{task} <query>{instruction}<image>` + EOS and a candidate `<image>` + EOS.
Either model keeps the task instruction as its `task_instruction` (saved with it, and the
default of its `encode_queries`).

`ContrastiveModule` wraps an adapter as the one `nn.Module` that accelerate prepares (DDP,
autocast): its forward embeds queries and/or candidates, so a plain step is one forward
call and gradient caching calls it once per chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from megapairs.registry import Registry
from megapairs.training.config import ModelSettings
from megapairs.training.data import TrainSample

if TYPE_CHECKING:
    from megapairs.models.clip import CLIPPreprocessor
    from megapairs.models.mllm import MLLMPreprocessor

Tensors = dict[str, torch.Tensor]


@dataclass
class TrainBatch:
    """Model inputs of one step: B queries and B * (1 + m) candidates grouped per query."""

    queries: Tensors
    candidates: Tensors

    @property
    def num_queries(self) -> int:
        return len(next(iter(self.queries.values())))

    @property
    def num_candidates(self) -> int:
        return len(next(iter(self.candidates.values())))

    def to(self, device: str | torch.device) -> TrainBatch:
        """The batch on `device` (non-blocking from pinned memory)."""
        return TrainBatch(_moved(self.queries, device), _moved(self.candidates, device))

    def pin_memory(self) -> TrainBatch:
        """The batch in page-locked memory (DataLoader's `pin_memory` calls this)."""
        pinned = {key: value.pin_memory() for key, value in self.queries.items()}
        return TrainBatch(pinned, {k: v.pin_memory() for k, v in self.candidates.items()})


def _moved(tensors: Tensors, device: str | torch.device) -> Tensors:
    return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}


class TrainingAdapter(ABC):
    """One model kind as the trainer sees it (see the module docstring)."""

    kind: ClassVar[str]

    def __init__(self, model: nn.Module, settings: ModelSettings) -> None:
        self.model = model
        self.settings = settings

    @classmethod
    @abstractmethod
    def load(
        cls, source: str, settings: ModelSettings, device: str | torch.device = "cpu"
    ) -> TrainingAdapter:
        """The model from `source` (hub name, folder, or a checkpoint's `model/` folder)."""

    @property
    @abstractmethod
    def collator(self) -> Callable[[list[TrainSample]], TrainBatch]:
        """Samples -> one batch; picklable, it runs in DataLoader workers."""

    @abstractmethod
    def embed_queries(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable (n, d) unit rows of (a chunk of) `TrainBatch.queries`."""

    @abstractmethod
    def embed_candidates(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable (n, d) unit rows of (a chunk of) `TrainBatch.candidates`."""

    @property
    def reserved_tokens(self) -> tuple[str, ...]:
        """Tokens an instruction must not hold (a row with one is skipped)."""
        return ()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (those that require gradients)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, path: Path) -> None:
        """Write a checkpoint that the model class's `from_pretrained` loads."""
        self.model.save_pretrained(path)  # type: ignore[operator]


ADAPTERS: Registry[TrainingAdapter] = Registry("training adapter")


def build_adapter(
    settings: ModelSettings, source: str | None = None, device: str | torch.device = "cpu"
) -> TrainingAdapter:
    """The adapter of `settings.kind`, its model loaded from `source` (default
    `settings.name_or_path`) onto `device`, in training mode, its `task_instruction` the
    one it is trained with (so that saving stores it)."""
    if not (source or settings.name_or_path):
        raise ValueError("model.name_or_path is empty: name a checkpoint to train from")
    adapter_class: Any = ADAPTERS.get(settings.kind)
    adapter: TrainingAdapter = adapter_class.load(source or settings.name_or_path, settings, device)
    model: Any = adapter.model
    model.task_instruction = settings.task_instruction or None
    model.train()
    return adapter


class ContrastiveModule(nn.Module):
    """The module accelerate prepares: forward embeds queries and/or candidates."""

    def __init__(self, adapter: TrainingAdapter) -> None:
        super().__init__()
        self.encoder = adapter.model
        self.adapter = adapter

    def forward(
        self, queries: Tensors | None = None, candidates: Tensors | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(query embeddings or None, candidate embeddings or None)."""
        return (
            None if queries is None else self.adapter.embed_queries(queries),
            None if candidates is None else self.adapter.embed_candidates(candidates),
        )


# MMRet-CLIP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPCollator:
    """Samples -> MMRet-CLIP inputs through the model's `CLIPPreprocessor`: queries as
    `encode_queries` builds them (`task_instruction` before each instruction), candidates as
    `encode_candidates` does."""

    preprocessor: CLIPPreprocessor
    task_instruction: str = ""

    def __call__(self, samples: list[TrainSample]) -> TrainBatch:
        images = [s.query_image for s in samples]
        instructions = [s.instruction for s in samples]
        return TrainBatch(
            queries=self.preprocessor.queries(images, instructions, self.task_instruction),
            candidates=self.preprocessor.inputs([c for s in samples for c in s.candidates], None),
        )


@ADAPTERS.register("mmret-clip")
class CLIPAdapter(TrainingAdapter):
    """MMRet-CLIP: query = normalize(image features + text features), candidate = image.

    All CLIP parameters train except `logit_scale`, which the InfoNCE loss does not use
    (it has its own fixed temperature); freezing it keeps DDP from waiting for its
    gradient."""

    kind = "mmret-clip"

    @classmethod
    def load(
        cls, source: str, settings: ModelSettings, device: str | torch.device = "cpu"
    ) -> CLIPAdapter:
        from megapairs.models.clip import MMRetCLIP

        options = {"max_text_length": settings.max_text_length, **settings.options}
        model = MMRetCLIP.from_pretrained(source, device=device, **options)
        _check_clip_image_size(model, settings.image_size)
        model.clip.logit_scale.requires_grad_(False)
        return cls(model, settings)

    @property
    def collator(self) -> CLIPCollator:
        model: Any = self.model
        return CLIPCollator(model.preprocessor, self.settings.task_instruction)

    def embed_queries(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.composed_embeddings(  # type: ignore[operator]
            inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        )

    def embed_candidates(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.image_embeddings(inputs["pixel_values"])  # type: ignore[operator]


def _check_clip_image_size(model: Any, image_size: int | None) -> None:
    """Refuse an `image_size` other than the checkpoint's: CLIP's position embeddings fix it."""
    crop = model.image_processor.crop_size
    side = crop.get("height") if isinstance(crop, Mapping) else getattr(crop, "height", None)
    if image_size is not None and side is not None and int(side) != image_size:
        raise ValueError(
            f"model.image_size {image_size} differs from the CLIP checkpoint's {side} px "
            "input; leave it unset (null) or use a checkpoint of that size"
        )


# MMRet-MLLM ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLLMCollator:
    """Samples -> MMRet-MLLM inputs through the model's `MLLMPreprocessor` (fixed-size
    images, left-padded tokens): the instruction is the query text."""

    preprocessor: MLLMPreprocessor
    task_instruction: str = ""

    def __call__(self, samples: list[TrainSample]) -> TrainBatch:
        queries = self.preprocessor.queries(
            [s.query_image for s in samples],
            [s.instruction for s in samples],
            self.task_instruction,
        )
        candidates = self.preprocessor.candidates([c for s in samples for c in s.candidates], None)
        return TrainBatch(queries, candidates)


@ADAPTERS.register("mmret-mllm")
class MLLMAdapter(TrainingAdapter):
    """MMRet-MLLM: LLaVA-NeXT with LoRA; the final token's normalised last hidden state.

    Only the LoRA weights train. The model's embedding does not depend on padding, so
    chunking a left-padded batch for gradient caching changes nothing."""

    kind = "mmret-mllm"

    @classmethod
    def load(
        cls, source: str, settings: ModelSettings, device: str | torch.device = "cpu"
    ) -> MLLMAdapter:
        from megapairs.models.mllm import MMRetMLLM

        lora: bool | dict[str, Any] = (
            True if _is_adapter_folder(source) else (settings.lora.as_options())
        )
        model = MMRetMLLM.from_pretrained(
            source, lora=lora, image_size=settings.image_size, device=device, **settings.options
        )
        return cls(model, settings)

    @property
    def collator(self) -> MLLMCollator:
        model: Any = self.model
        return MLLMCollator(model.preprocessor, self.settings.task_instruction)

    @property
    def reserved_tokens(self) -> tuple[str, ...]:
        """The processor's image token: in an instruction it would misplace image features."""
        model: Any = self.model
        return (model.image_token,)

    def embed_queries(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.embed(inputs)  # type: ignore[operator]

    def embed_candidates(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.embed(inputs)  # type: ignore[operator]


def _is_adapter_folder(source: str) -> bool:
    """A LoRA adapter folder (as MMRetMLLM.save_pretrained writes), not a base checkpoint."""
    return (Path(source) / "adapter_config.json").is_file()
