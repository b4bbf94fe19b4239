"""MMRet-MLLM: a LLaVA-NeXT whose embedding is its final token's last hidden state.

Paper section 3.2, eq. (3), and Appendix B. Every item becomes one token sequence:

    query:     "<instruct>{instruction} <query>{text}{image}" + EOS
    candidate: "{text}{image}" + EOS

`{image}` is the processor's image token (`<image>`, which the processor expands into
the image's feature tokens) or "" for a text-only item; `{text}` is "" for an image-only
item; EOS is the tokenizer's end-of-sequence token (`</s>` for Mistral), appended to the
string; the tokenizer adds its own prefix tokens (BOS for Mistral). So the query
"a red car" with an image and the instruction "Find a similar picture." is the text
`<instruct>Find a similar picture. <query>a red car<image></s>`; the same item as a
candidate is `a red car<image></s>`. Both templates are a `PromptFormat`, stored with each
saved model.

The embedding is L2-normalise(`last_hidden_state` of the final non-pad token), read from
the LLaVA-NeXT backbone (`LlavaNextModel`: vision tower, projector, language model; the
LM head is never run). Batches are left-padded, and both the final token's position and
the position ids are computed from the attention mask, so an item's embedding does not
depend on the batch it is in (nor on how a batch is chunked for gradient caching).

Fixed resolution: every image is resized to `image_size` x `image_size` (bicubic, aspect
ratio not kept; the paper's 512 by default) before the processor. LLaVA-NeXT's number of
image tokens depends only on the image's size (its best grid pinpoint, tiles and
unpadding), so every image then yields the same number of tokens whatever its shape: for
llava-v1.6-mistral-7b at 512 px the best pinpoint is 672x672, i.e. a 336 px base view and
2x2 tiles of 24x24 patches: 576 + 48 * 48 + 48 row ends = 2928 tokens per image.

LoRA (peft; paper: rank 32 "on both the ViT encoder and the LLM backbone"): adapters on the
CLIP vision tower's attention and MLP projections (q/k/v/out_proj, fc1, fc2) and on the
language model's (q/k/v/o_proj, gate/up/down_proj). Only vision layers whose output reaches
the LLM get adapters (LLaVA reads `vision_feature_layer`, the second-to-last layer, so the
last layer is skipped): every trainable parameter then gets a gradient, as DDP requires.
The multimodal projector, the embeddings and every base weight stay frozen: the paper
names only the two LoRA targets.

Checkpoints: `save_pretrained` writes the LoRA adapter (peft's `adapter_config.json`, which
names the base checkpoint, + `adapter_model.safetensors`), the processor and
`mmret_mllm.json` (image size and prompt format); a model without adapters writes a full
LLaVA-NeXT checkpoint instead. `from_pretrained` on an adapter folder loads the base and
then the adapter, kept as trainable adapters (`lora=True`) or merged into the base
weights for inference (`lora=False`, the default).

Preprocessing has one owner, `MLLMPreprocessor` (`MMRetMLLM.preprocessor`): prompt strings,
fixed-size images and the processor call, used both by `encode_*` and by the training
collator; `preprocessing_key` names it (for caches).

Images go through transformers' PIL-backed LLaVA-NeXT image processor
(`LlavaNextImageProcessorPil`), never the torchvision one, which `AutoProcessor` would
pick wherever torchvision is installed.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from megapairs.models.base import RETRIEVERS
from megapairs.models.common import (
    CheckpointKind,
    PathLike,
    activation_checkpointing_on,
    enable_activation_checkpointing,
    encode_in_batches,
    image_transform_parts,
    preprocessing_key,
    read_settings,
    resolve_placement,
    user_items,
)
from megapairs.models.inputs import (
    ImageInput,
    ImagesInput,
    TextsInput,
    as_text_list,
    check_batch_lengths,
    load_images,
)

Instructions = str | Sequence[str]
Tensors = dict[str, torch.Tensor]

DEFAULT_IMAGE_SIZE = 512
"""The paper's fixed image resolution (Appendix B)."""
SETTINGS_FILE = "mmret_mllm.json"
"""What `save_pretrained` writes beside the weights: image size, prompt format and the
task instruction the model was trained with."""
VISION_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LANGUAGE_LORA_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
PROCESSOR_KEY_FIELDS = (
    "patch_size",
    "vision_feature_select_strategy",
    "num_additional_image_tokens",
)
"""Processor settings that decide how many image tokens an image expands to."""
LLAVA_NEXT_CHECKPOINT = CheckpointKind(
    label="LLaVA-NeXT",
    model_type="llava_next",
    model_class="LlavaNextForConditionalGeneration",
    parts="vision tower, projector, language model",
    folder_contents=(
        "a LLaVA-NeXT config, weights and processor (a checkpoint such as "
        "llava-hf/llava-v1.6-mistral-7b-hf saved locally), or a LoRA adapter folder "
        "written by MMRetMLLM.save_pretrained"
    ),
)


@dataclass(frozen=True)
class PromptFormat:
    """The templates of a query and a candidate; EOS is appended after either.

    `query` must use `{instruction}`, `{text}` and `{image}`; `candidate` `{text}` and
    `{image}` and never `{instruction}` (candidates carry no task instruction)."""

    query: str = "<instruct>{instruction} <query>{text}{image}"
    candidate: str = "{text}{image}"

    def __post_init__(self) -> None:
        _check_fields("query", self.query, {"instruction", "text", "image"})
        _check_fields("candidate", self.candidate, {"text", "image"})

    def render_query(self, instruction: str, text: str | None, image: str) -> str:
        """The query string (without EOS); `image` is the image token or ""."""
        return self.query.format(instruction=instruction, text=text or "", image=image)

    def render_candidate(self, text: str | None, image: str) -> str:
        """The candidate string (without EOS); `image` is the image token or ""."""
        return self.candidate.format(text=text or "", image=image)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the vision tower's and the language model's projections (paper: rank 32).

    `alpha` 64 (scale alpha / rank = 2) and `dropout` 0.1 are our choices: the paper gives
    only the rank."""

    rank: int = 32
    alpha: int = 64
    dropout: float = 0.1
    vision_modules: tuple[str, ...] = VISION_LORA_MODULES
    language_modules: tuple[str, ...] = LANGUAGE_LORA_MODULES

    @classmethod
    def parse(cls, lora: bool | LoraSettings | Mapping[str, Any]) -> LoraSettings | None:
        """`True` -> the defaults, `False` -> None, a mapping -> its fields (others refused)."""
        if isinstance(lora, LoraSettings):
            return lora
        if isinstance(lora, bool):
            return cls() if lora else None
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(lora) - known)
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {
            key: tuple(v) if key.endswith("_modules") else v for key, v in lora.items()
        }
        return cls(**values)

    def target_modules(self, config: Any) -> str:
        """A regex (peft full-matches it on module names) for the layers to adapt."""
        vision_layers = "|".join(str(i) for i in range(_vision_layers_used(config)))
        targets = []
        if vision_layers and self.vision_modules:
            names = "|".join(self.vision_modules)
            targets.append(
                rf"(.*\.)?vision_tower\.(.*\.)?layers\.({vision_layers})\.\w+\.({names})"
            )
        if self.language_modules:
            names = "|".join(self.language_modules)
            targets.append(rf"(.*\.)?language_model\.(.*\.)?layers\.\d+\.\w+\.({names})")
        if not targets:
            raise ValueError("LoRA needs at least one vision or language module to adapt")
        return "|".join(f"({target})" for target in targets)

    def peft_config(self, config: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules(config),
            bias="none",
        )


@dataclass(frozen=True)
class MLLMPreprocessor:
    """Items -> MMRet-MLLM model inputs (CPU tensors): the one path that training (the
    collator) and encoding (`MMRetMLLM.encode_*`) share. It holds the processor, not the
    model, so DataLoader workers can run it (and pickle it under `spawn`)."""

    processor: Any
    image_size: int
    prompt: PromptFormat
    eos_token: str
    image_token: str

    def query_texts(
        self, count: int, texts: list[str] | None, has_images: bool, instruction: Instructions
    ) -> list[str]:
        """The strings the tokenizer reads for `count` queries (EOS included)."""
        image = self.image_token if has_images else ""
        return [
            self.prompt.render_query(task, _text_at(texts, i), image) + self.eos_token
            for i, task in enumerate(_instruction_list(instruction, count))
        ]

    def candidate_texts(self, count: int, texts: list[str] | None, has_images: bool) -> list[str]:
        """The strings the tokenizer reads for `count` candidates (EOS included)."""
        image = self.image_token if has_images else ""
        return [
            self.prompt.render_candidate(_text_at(texts, i), image) + self.eos_token
            for i in range(count)
        ]

    def queries(
        self, images: ImagesInput | None, texts: TextsInput | None, instruction: Instructions
    ) -> Tensors:
        """Model inputs of queries; `instruction` is one for all or one per query."""
        pictures, text_list, count = self._inputs(images, texts)
        prompts = self.query_texts(count, text_list, pictures is not None, instruction)
        return self._tokenise(prompts, pictures)

    def candidates(self, images: ImagesInput | None, texts: TextsInput | None) -> Tensors:
        """Model inputs of candidates: no instruction."""
        pictures, text_list, count = self._inputs(images, texts)
        return self._tokenise(
            self.candidate_texts(count, text_list, pictures is not None), pictures
        )

    def fixed_size(self, image: Image.Image) -> Image.Image:
        """`image` resized to `image_size` x `image_size` (bicubic)."""
        size = (self.image_size, self.image_size)
        return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)

    @property
    def key(self) -> str:
        """Names this preprocessing: fixed size, the processor's transform, no square
        padding, no text limit, prompt templates (+ a digest of processor settings)."""
        image_processor = self.processor.image_processor
        parts = {"fixed": f"{self.image_size}x{self.image_size}/bicubic"}
        parts |= image_transform_parts(image_processor)
        parts |= {
            "pad": "none",
            "text": "all",
            "query": self.prompt.query + self.eos_token,
            "candidate": self.prompt.candidate + self.eos_token,
        }
        tokenizer = self.processor.tokenizer
        details = [
            image_processor.to_dict(),
            [type(tokenizer).__name__, len(tokenizer), tokenizer.padding_side],
            {k: getattr(self.processor, k, None) for k in PROCESSOR_KEY_FIELDS},
        ]
        return preprocessing_key("llava-next", parts, details)

    def _inputs(
        self, images: ImagesInput | None, texts: TextsInput | None
    ) -> tuple[list[Image.Image] | None, list[str] | None, int]:
        pictures = None if images is None else [self.fixed_size(i) for i in load_images(images)]
        text_list = None if texts is None else as_text_list(texts)
        check_batch_lengths(pictures, text_list)
        count = len(pictures) if pictures is not None else len(text_list or [])
        if count == 0:
            raise ValueError("nothing to preprocess: give at least one image or text")
        for position, text in enumerate(text_list or []):
            if self.image_token in text:
                raise ValueError(f"text {position} contains the image token {self.image_token!r}")
        return pictures, text_list, count

    def _tokenise(self, prompts: list[str], pictures: list[Image.Image] | None) -> Tensors:
        encoded = self.processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if pictures is not None:
            batch["pixel_values"] = encoded["pixel_values"].float()
            batch["image_sizes"] = encoded["image_sizes"]
        return batch


class MMRetMLLM(torch.nn.Module):
    """A transformers `LlavaNextForConditionalGeneration` (attribute `llava`; `model` is the
    peft wrapper when LoRA is on) with its processor.

    Tensor-level methods (`embed`, `forward`) are differentiable and meant for training;
    `encode`, `encode_queries` and `encode_candidates` take user inputs and run without
    gradients. Every embedding is float32 with unit rows, of size `dim`. `task_instruction`
    is the instruction the model was trained with (None: none), the default of
    `encode_queries`."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        prompt: PromptFormat | None = None,
        name: str = "mmret-mllm",
        task_instruction: str | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.model = model
        self.processor = processor
        self.image_size = image_size
        self.prompt = prompt or PromptFormat()
        self.name = name
        self.task_instruction = task_instruction
        self.eos_token = _eos_token(processor.tokenizer)
        self.image_token = str(processor.image_token)

    # loading and saving ------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: PathLike,
        *,
        lora: bool | LoraSettings | Mapping[str, Any] = False,
        image_size: int | None = None,
        prompt: PromptFormat | None = None,
        base_model: PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        name: str | None = None,
    ) -> MMRetMLLM:
        """Load a LLaVA-NeXT checkpoint, or a LoRA adapter folder saved by `save_pretrained`.

        On a LLaVA-NeXT checkpoint, `lora` True / `LoraSettings` / a mapping of its fields
        adds fresh adapters (base weights frozen); False loads it as it is. On an adapter
        folder the saved adapter is loaded on its base (`base_model` overrides the base
        named in `adapter_config.json`): `lora=True` keeps it trainable, False merges it.
        `image_size` and `prompt` default to the folder's saved ones, else 512 px and the
        paper's format; `task_instruction` is the folder's saved one (else None). `device`
        may be `auto`; `dtype` `auto` is float16 on cuda.
        Raises OSError naming the checkpoint when it cannot be loaded, ValueError when it
        is not a LLaVA-NeXT checkpoint."""
        source = _local_or_hub(name_or_path)
        torch_device, torch_dtype = resolve_placement(device, dtype)
        settings = read_settings(Path(source) / SETTINGS_FILE)
        adapter = _adapter_config(source)
        base = _local_or_hub(base_model) if base_model else _adapter_base(adapter, source)
        with LLAVA_NEXT_CHECKPOINT.loading(base):
            llava = LLAVA_NEXT_CHECKPOINT.load_model(base, dtype=torch_dtype)
            processor = _load_processor(source, fallback=base)
        llava = llava.to(torch_device)
        model = _with_lora(llava, lora, source if adapter else None)
        return cls(
            model.eval(),
            processor,
            image_size=image_size or settings.get("image_size") or DEFAULT_IMAGE_SIZE,
            prompt=prompt or PromptFormat(**settings.get("prompt", {})),
            name=name or f"mmret-mllm:{source}",
            task_instruction=settings.get("task_instruction"),
        )

    def save_pretrained(self, path: PathLike) -> None:
        """Write the LoRA adapter (or, without adapters, the whole model), the processor
        and `mmret_mllm.json` (image size, prompt format, task instruction);
        `from_pretrained(path)` loads it back."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        settings = {
            "kind": "mmret-mllm",
            "image_size": self.image_size,
            "prompt": asdict(self.prompt),
            "task_instruction": self.task_instruction,
        }
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @property
    def llava(self) -> Any:
        """The `LlavaNextForConditionalGeneration` (with LoRA layers injected, if any)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def device(self) -> torch.device:
        return self.llava.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The base weights' dtype (LoRA weights may be float32 beside bfloat16 ones)."""
        return self.llava.get_input_embeddings().weight.dtype

    @property
    def dim(self) -> int:
        """The size of every embedding (the language model's hidden size)."""
        return int(self.llava.config.text_config.hidden_size)

    def enable_activation_checkpointing(self) -> None:
        """Recompute the layer activations of the vision tower and the language model in
        backward instead of keeping them (non-reentrant, RNG state preserved: the same
        gradients, LoRA dropout included); train mode only."""
        enable_activation_checkpointing(self.llava)

    @property
    def activation_checkpointing(self) -> bool:
        """Whether the LLaVA-NeXT layers are checkpointed."""
        return activation_checkpointing_on(self.llava)

    # tensors: differentiable, for training -----------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) tokens (+ their images) -> (B, d) unit rows: the final non-pad token's
        last hidden state, L2-normalised. Works for left or right padding."""
        mask = attention_mask.to(self.device)
        inputs: dict[str, torch.Tensor] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask,
            "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0),
        }
        if pixel_values is not None:
            if image_sizes is None:
                raise ValueError("pixel_values need their image_sizes (the processor gives both)")
            inputs["pixel_values"] = pixel_values.to(device=self.device, dtype=self.dtype)
            inputs["image_sizes"] = image_sizes.to(self.device)
        hidden = self.llava.model(**inputs, use_cache=False).last_hidden_state
        return F.normalize(final_token_states(hidden, mask).float(), dim=-1)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The embeddings of a `preprocess_*` batch (or a chunk of one): `self(**batch)`."""
        return self(**batch)

    # preprocessing -----------------------------------------------------------

    @property
    def preprocessor(self) -> MLLMPreprocessor:
        """The preprocessing of this model (processor, image size, prompt format)."""
        return MLLMPreprocessor(
            self.processor, self.image_size, self.prompt, self.eos_token, self.image_token
        )

    @property
    def preprocessing_key(self) -> str:
        """A short string naming this model's preprocessing (`MLLMPreprocessor.key`)."""
        return self.preprocessor.key

    def query_texts(
        self, count: int, texts: list[str] | None, has_images: bool, instruction: Instructions
    ) -> list[str]:
        """The strings the tokenizer reads for `count` queries (EOS included)."""
        return self.preprocessor.query_texts(count, texts, has_images, instruction)

    def candidate_texts(self, count: int, texts: list[str] | None, has_images: bool) -> list[str]:
        """The strings the tokenizer reads for `count` candidates (EOS included)."""
        return self.preprocessor.candidate_texts(count, texts, has_images)

    def preprocess_queries(
        self,
        images: ImagesInput | None,
        texts: TextsInput | None,
        instruction: Instructions | None = None,
    ) -> Tensors:
        """Model inputs (CPU tensors) for queries; `instruction` is one task instruction for
        all, or one per query (None: the model's `task_instruction`, else empty)."""
        task = (self.task_instruction or "") if instruction is None else instruction
        return self.preprocessor.queries(images, texts, task)

    def preprocess_candidates(
        self, images: ImagesInput | None, texts: TextsInput | None
    ) -> Tensors:
        """Model inputs (CPU tensors) for candidates: no instruction."""
        return self.preprocessor.candidates(images, texts)

    def fixed_size(self, image: Image.Image) -> Image.Image:
        """`image` resized to `image_size` x `image_size` (bicubic)."""
        return self.preprocessor.fixed_size(image)

    # user-facing encoding ----------------------------------------------------

    def encode(
        self,
        images: ImagesInput | None = None,
        text: TextsInput | None = None,
        instruction: Instructions | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Embed images, texts, or composed image + text items (one image per text).

        With an `instruction` (one string, or one per item; "" counts) the items are
        queries in the query format, without one they are candidates. Images are paths
        or PIL images (one or a list), texts a string or a list. Runs without gradients
        in eval mode (the previous mode is restored), in batches on the model's device,
        opening image files one batch at a time. Returns a float32 (N, d) CPU tensor
        with unit rows."""
        image_list, text_list, count = user_items(images, text)
        tasks = None if instruction is None else _instruction_list(instruction, count)
        columns = (image_list, text_list, tasks)
        return encode_in_batches(self, self._encode_batch, columns, count, batch_size, self.dim)

    def encode_queries(
        self,
        images: ImagesInput | None,
        texts: TextsInput | None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        """Embed queries in the query format; `instruction` None is the model's
        `task_instruction` ("" when it has none)."""
        if instruction is None:
            instruction = self.task_instruction or ""
        return self.encode(images, texts, instruction=instruction)

    def encode_candidates(
        self, images: ImagesInput | None, texts: TextsInput | None
    ) -> torch.Tensor:
        """Embed candidates (no instruction)."""
        return self.encode(images, texts)

    def _encode_batch(
        self,
        images: list[ImageInput] | None,
        texts: list[str] | None,
        tasks: list[str] | None,
    ) -> torch.Tensor:
        if tasks is None:
            inputs = self.preprocess_candidates(images, texts)
        else:
            inputs = self.preprocess_queries(images, texts, tasks)
        return self.embed(inputs).cpu()


@RETRIEVERS.register("mmret-mllm")
def build_mmret_mllm(model: str, **options: Any) -> MMRetMLLM:
    """The `mmret-mllm` retriever: MMRetMLLM.from_pretrained(model, **options)."""
    return MMRetMLLM.from_pretrained(model, name=f"mmret-mllm:{model}", **options)


def final_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) hidden states -> (B, d): each row's last position whose mask is 1."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)
    if bool((last < 0).any()):
        raise ValueError("an item has no tokens (its attention mask is all zeros)")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


# loading helpers --------------------------------------------------------------


def _with_lora(
    llava: Any, lora: bool | LoraSettings | Mapping[str, Any], adapter_folder: str | None
) -> Any:
    """`llava` with fresh adapters, with the folder's adapter (trainable or merged), or as is."""
    from peft import PeftModel, get_peft_model

    if adapter_folder is None:
        settings = LoraSettings.parse(lora)
        return (
            llava if settings is None else get_peft_model(llava, settings.peft_config(llava.config))
        )
    if not isinstance(lora, bool):
        raise ValueError(
            f"{adapter_folder!r} already holds a LoRA adapter: pass lora=True to keep it "
            "trainable or lora=False to merge it, not new LoRA settings"
        )
    adapted = PeftModel.from_pretrained(llava, adapter_folder, is_trainable=lora)
    return adapted if lora else adapted.merge_and_unload()


def _vision_layers_used(config: Any) -> int:
    """How many vision layers feed the LLM: those up to the deepest `vision_feature_layer`
    (an index into the hidden states, which start with the embeddings)."""
    layers = config.vision_feature_layer
    count = int(config.vision_config.num_hidden_layers)
    indices = layers if isinstance(layers, list | tuple) else [layers]
    return max(int(i) if int(i) >= 0 else count + 1 + int(i) for i in indices)


def _local_or_hub(name_or_path: PathLike) -> str:
    """An existing local folder as an absolute path (so adapters record where their base
    is), anything else unchanged (a hub name)."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.is_dir() else os.fspath(name_or_path)


def _adapter_config(source: str) -> Any | None:
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(source)
    except ValueError:
        return None


def _adapter_base(adapter: Any | None, source: str) -> str:
    if adapter is None:
        return source
    base = adapter.base_model_name_or_path
    if not base:
        raise ValueError(
            f"the adapter in {source!r} does not name its base model: pass base_model=..."
        )
    return str(base)


def _load_processor(source: str, fallback: str) -> Any:
    """The processor saved in `source`, else `fallback`'s, with the PIL image processor
    and left padding."""
    try:
        processor = _pil_processor(source)
    except OSError:
        if fallback == source:
            raise
        processor = _pil_processor(fallback)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return processor


def _pil_processor(source: str) -> Any:
    """The checkpoint's processor with its image processor swapped for the PIL-backed one
    (`LlavaNextImageProcessorPil` in transformers 5; before, the plain class was)."""
    import transformers

    processor = transformers.LlavaNextProcessor.from_pretrained(source)
    pil_class = getattr(transformers, "LlavaNextImageProcessorPil", None)
    if pil_class is not None and not isinstance(processor.image_processor, pil_class):
        processor.image_processor = pil_class.from_pretrained(source)
    return processor


# small helpers ----------------------------------------------------------------


def _eos_token(tokenizer: Any) -> str:
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no EOS token, which MMRet-MLLM embeddings end with")
    return str(tokenizer.eos_token)


def _check_fields(role: str, template: str, expected: set[str]) -> None:
    found = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if found != expected:
        raise ValueError(
            f"the {role} template {template!r} has fields {sorted(found)}; "
            f"it must have exactly {sorted(expected)}"
        )


def _instruction_list(instruction: Instructions, count: int) -> list[str]:
    if isinstance(instruction, str):
        return [instruction] * count
    tasks = as_text_list(instruction)
    if len(tasks) != count:
        raise ValueError(
            f"got {len(tasks)} instructions for {count} queries: give one, or one each"
        )
    return tasks


def _text_at(texts: list[str] | None, index: int) -> str | None:
    return None if texts is None else texts[index]
