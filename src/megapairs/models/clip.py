"""MMRet-CLIP: a CLIP dual encoder whose composed embedding is score fusion.

Paper section 3.2, eq. (2): a composed image + text item is embedded as
`e_it = Phi_I(I) + Phi_T(T)`, the element-wise sum of the two towers' outputs,
"the score-fusion strategy as used by UniIR". UniIR's released `CLIPScoreFusion`
(TIGER-AI-Lab/UniIR, `src/models/uniir_clip/clip_scorefusion/clip_sf.py`) adds the
*unnormalised* `encode_image` and `encode_text` outputs in `fuse_embeddings` and
L2-normalises the sum before the loss; BGE-VL's documentation (bge-model.com,
"BGE-VL-CLIP") says the released MMRet-CLIP models "directly use score-fusion to
sum up the outputs of visual encoder and text encoder", which its hub file
`modeling_MMRet_CLIP.py` (`encode_multimodal`: `get_image_features +
get_text_features`, then normalise) does. So here:

    composed = normalize(W_v * pool(vision(I)) + W_t * pool(text(T)))

on the projected but *unnormalised* features; image-only and text-only items are
the usual normalised CLIP embeddings. The tower with the larger feature norm weighs
more in the sum; that is the published model, and training adapts to it.

A checkpoint is a standard transformers CLIP folder (config + weights + image
processor + tokenizer): `save_pretrained` writes exactly that, so it also loads
with plain `transformers.CLIPModel.from_pretrained`, and a released BGE-VL CLIP
checkpoint (a CLIP config and weights) loads here unchanged. Any plain CLIP
checkpoint loads too: that is the zero-shot `clip` baseline. Beside the CLIP files
`save_pretrained` writes `mmret_clip.json` (which plain CLIP loading ignores): the task
instruction the model was trained with, which `encode_queries` uses when given none.

Preprocessing has one owner, `CLIPPreprocessor` (`MMRetCLIP.preprocessor`): the query text
(`"{instruction} {text}"`), tokenisation and the image transform, used both by
`encode_queries` / `encode_candidates` and by the training collator, so the two cannot drift
apart; `preprocessing_key` names it (for caches).

Images go through transformers' PIL-backed CLIP image processor
(`CLIPImageProcessorPil` in transformers 5, the slow `CLIPImageProcessor` before):
the torchvision backend is never used, so preprocessing is the same on every
machine. Its resize and crop come from the checkpoint (224 px for CLIP-B/16 and
CLIP-L/14, as in the paper).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megapairs.encoders.hf import text_max_length
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
    as_image_list,
    as_text_list,
    load_images,
)

Tensors = dict[str, torch.Tensor]

CLIP_CHECKPOINT = CheckpointKind(
    label="CLIP",
    model_type="clip",
    model_class="CLIPModel",
    parts="both towers and projections",
    folder_contents=(
        "a CLIP config, weights, image processor and tokenizer "
        "(as MMRetCLIP.save_pretrained writes them)"
    ),
)
SETTINGS_FILE = "mmret_clip.json"
"""What `save_pretrained` writes beside the CLIP files: the task instruction."""
QUERY_TEMPLATE = "{instruction} {text}"
"""A query's text: the task instruction, a space, the query text (either alone without
the other)."""
ENCODE_BATCH_SIZE = 64


@dataclass(frozen=True)
class CLIPPreprocessor:
    """Items -> MMRet-CLIP model inputs (CPU tensors): the one path that training
    (`CLIPCollator`) and encoding (`MMRetCLIP.encode_*`) share. Small and picklable: it
    runs in DataLoader workers."""

    image_processor: Any
    tokenizer: Any
    max_text_length: int

    def pixels(self, images: ImagesInput) -> torch.Tensor:
        """(N, 3, H, W) float32 `pixel_values`: images opened upright and RGB, then the
        checkpoint's image processor (resize, centre crop, normalise)."""
        pictures = load_images(images)
        return self.image_processor(images=pictures, return_tensors="pt")["pixel_values"].float()

    def tokens(self, texts: TextsInput) -> Tensors:
        """`input_ids` and `attention_mask`, padded to the longest, cut at `max_text_length`."""
        encoded = self.tokenizer(
            as_text_list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def inputs(self, images: ImagesInput | None, texts: TextsInput | None) -> Tensors:
        """Model inputs of images and/or texts (a candidate, or a query's final text)."""
        batch: Tensors = {}
        if images is not None and as_image_list(images):
            batch["pixel_values"] = self.pixels(images)
        if texts is not None and as_text_list(texts):
            batch.update(self.tokens(texts))
        return batch

    def queries(
        self, images: ImagesInput | None, texts: TextsInput | None, instruction: str | None
    ) -> Tensors:
        """Model inputs of queries: `inputs` of the images and `query_texts`."""
        return self.inputs(images, query_texts(instruction, images, texts))

    @property
    def key(self) -> str:
        """Names this preprocessing: image transform, no square padding, text length,
        query template (+ a digest of the processor and tokenizer settings)."""
        parts = image_transform_parts(self.image_processor)
        parts |= {"pad": "none", "text": str(self.max_text_length), "query": QUERY_TEMPLATE}
        tokenizer = [type(self.tokenizer).__name__, len(self.tokenizer)]
        return preprocessing_key("clip", parts, [self.image_processor.to_dict(), tokenizer])


def query_texts(
    instruction: str | None, images: ImagesInput | None, texts: TextsInput | None
) -> list[str] | None:
    """The texts a query batch is tokenised from: `QUERY_TEMPLATE` of the (stripped)
    instruction and each text; the instruction alone for image-only queries (they become
    composed image + instruction items, as UniIR's instruction-following queries); the
    texts unchanged (None for image-only) without an instruction (None or blank)."""
    task = (instruction or "").strip()
    if not task:
        return None if texts is None else as_text_list(texts)
    if texts is not None:
        return [QUERY_TEMPLATE.format(instruction=task, text=text) for text in as_text_list(texts)]
    if images is None:
        raise ValueError("nothing to encode: give images, texts, or both")
    return [task] * len(as_image_list(images))


class MMRetCLIP(torch.nn.Module):
    """A transformers `CLIPModel` (attribute `clip`) with its image processor and tokenizer.

    Tensor-level methods (`image_embeddings`, `text_embeddings`,
    `composed_embeddings`, `forward`) are differentiable and meant for training;
    `encode`, `encode_queries` and `encode_candidates` take user inputs and run
    without gradients. Every embedding is float32 with unit rows. `task_instruction` is
    the instruction the model was trained with (None: none), the default of
    `encode_queries`."""

    def __init__(
        self,
        clip: Any,
        image_processor: Any,
        tokenizer: Any,
        name: str = "mmret-clip",
        max_text_length: int | None = None,
        task_instruction: str | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.task_instruction = task_instruction
        self.max_text_length = text_max_length(tokenizer, clip.config.text_config, max_text_length)

    # loading and saving ------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_text_length: int | None = None,
        name: str | None = None,
    ) -> MMRetCLIP:
        """Load a CLIP checkpoint (a hub name or a local folder) with its processor.

        `device` may be `auto` (cuda when available); `dtype` `auto` is float16 on
        cuda and float32 elsewhere. `max_text_length` defaults to the longest text
        the model reads. The task instruction comes from the folder's `mmret_clip.json`
        (None without one). Raises OSError naming the checkpoint when it cannot be
        loaded, ValueError when it is not a complete CLIP checkpoint."""
        source = os.fspath(name_or_path)
        torch_device, torch_dtype = resolve_placement(device, dtype)
        with CLIP_CHECKPOINT.loading(source):
            clip = CLIP_CHECKPOINT.load_model(source)
            image_processor = load_clip_image_processor(source)
            tokenizer = _load_tokenizer(source)
        clip = clip.to(device=torch_device, dtype=torch_dtype).eval()
        settings = read_settings(Path(source) / SETTINGS_FILE)
        return cls(
            clip,
            image_processor,
            tokenizer,
            name or f"mmret-clip:{source}",
            max_text_length,
            task_instruction=settings.get("task_instruction"),
        )

    def save_pretrained(self, path: PathLike) -> None:
        """Write a standard CLIP folder (config, weights, image processor, tokenizer) and
        `mmret_clip.json` (the task instruction)."""
        self.clip.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        settings = {"kind": "mmret-clip", "task_instruction": self.task_instruction}
        (Path(path) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def dim(self) -> int:
        """The size of every embedding (CLIP's projection size)."""
        return int(self.clip.config.projection_dim)

    def enable_activation_checkpointing(self) -> None:
        """Recompute the layer activations of both CLIP towers in backward instead of keeping
        them (non-reentrant, RNG state preserved: the same gradients); train mode only."""
        enable_activation_checkpointing(self.clip)

    @property
    def activation_checkpointing(self) -> bool:
        """Whether the CLIP towers' layers are checkpointed."""
        return activation_checkpointing_on(self.clip)

    # tensors: differentiable, for training -----------------------------------

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, d) unit rows."""
        return _unit_rows(self.image_features(pixel_values))

    def text_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) tokens -> (B, d) unit rows."""
        return _unit_rows(self.text_features(input_ids, attention_mask))

    def composed_embeddings(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Score fusion: normalize(image features + text features), one image per text."""
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"composed embeddings need one image per text: got {pixel_values.shape[0]} "
                f"images and {input_ids.shape[0]} texts"
            )
        fused = self.image_features(pixel_values) + self.text_features(input_ids, attention_mask)
        return _unit_rows(fused)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The embeddings of whatever is given: images, texts, or both (composed).

        The same as calling the matching `*_embeddings` method; it exists so that
        wrappers that call the module (DistributedDataParallel, accelerate) work."""
        if input_ids is None:
            if pixel_values is None:
                raise ValueError("nothing to embed: give pixel_values, input_ids, or both")
            return self.image_embeddings(pixel_values)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if pixel_values is None:
            return self.text_embeddings(input_ids, mask)
        return self.composed_embeddings(pixel_values, input_ids, mask)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected, unnormalised image features (what score fusion adds)."""
        dtype = self.clip.visual_projection.weight.dtype
        pixels = pixel_values.to(device=self.device, dtype=dtype)
        return _pooled(self.clip.get_image_features(pixel_values=pixels))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The projected, unnormalised text features (what score fusion adds)."""
        output = self.clip.get_text_features(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return _pooled(output)

    # preprocessing -----------------------------------------------------------

    @property
    def preprocessor(self) -> CLIPPreprocessor:
        """The preprocessing of this model (its image processor, tokenizer, text length)."""
        return CLIPPreprocessor(self.image_processor, self.tokenizer, self.max_text_length)

    @property
    def preprocessing_key(self) -> str:
        """A short string naming this model's preprocessing (`CLIPPreprocessor.key`)."""
        return self.preprocessor.key

    def preprocess(
        self, images: ImagesInput | None = None, text: TextsInput | None = None
    ) -> Tensors:
        """Model inputs on the CPU: `pixel_values` for images; `input_ids` and
        `attention_mask` for texts (padded to the longest, truncated to
        `max_text_length`). Images and texts are processed independently: pairing
        them is the caller's business (see `composed_embeddings`)."""
        return self.preprocessor.inputs(images, text)

    def preprocess_queries(
        self,
        images: ImagesInput | None,
        texts: TextsInput | None,
        instruction: str | None = None,
    ) -> Tensors:
        """Model inputs of queries, as `encode_queries` builds them (`query_texts`);
        `instruction` None is the model's `task_instruction`."""
        task = self.task_instruction if instruction is None else instruction
        return self.preprocessor.queries(images, texts, task)

    # user-facing encoding ----------------------------------------------------

    def encode(
        self,
        images: ImagesInput | None = None,
        text: TextsInput | None = None,
        batch_size: int = ENCODE_BATCH_SIZE,
    ) -> torch.Tensor:
        """Embed images, texts, or composed image + text items (one image per text).

        Images are paths or PIL images (one or a list), texts a string or a list.
        Runs without gradients in eval mode (the previous mode is restored), in
        batches on the model's device, opening image files one batch at a time.
        Returns a float32 (N, d) CPU tensor with unit rows."""
        image_list, text_list, count = user_items(images, text)
        columns = (image_list, text_list)
        return encode_in_batches(self, self._encode_batch, columns, count, batch_size, self.dim)

    def encode_queries(
        self,
        images: ImagesInput | None,
        texts: TextsInput | None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        """Embed queries; a task `instruction` is prepended to each query text
        (`"{instruction} {text}"`), and stands as the text of image-only queries,
        which then become composed (image, instruction) items, as in UniIR's
        instruction-following queries. `instruction` None is the model's
        `task_instruction`; without any ("" or neither) this is `encode`."""
        image_list, text_list, count = user_items(images, texts)
        task = self.task_instruction if instruction is None else instruction
        encode = partial(self._encode_query_batch, task)
        columns = (image_list, text_list)
        return encode_in_batches(self, encode, columns, count, ENCODE_BATCH_SIZE, self.dim)

    def encode_candidates(
        self, images: ImagesInput | None, texts: TextsInput | None
    ) -> torch.Tensor:
        """Embed candidates: `encode` of the given images and/or texts."""
        return self.encode(images, texts)

    def _encode_batch(
        self, images: list[ImageInput] | None, texts: list[str] | None
    ) -> torch.Tensor:
        return self.forward(**self.preprocess(images, texts)).float().cpu()

    def _encode_query_batch(
        self, instruction: str | None, images: list[ImageInput] | None, texts: list[str] | None
    ) -> torch.Tensor:
        inputs = self.preprocessor.queries(images, texts, instruction)
        return self.forward(**inputs).float().cpu()


# registry ---------------------------------------------------------------------


def _retriever_factory(kind: str) -> Callable[..., MMRetCLIP]:
    def build(model: str, **options: Any) -> MMRetCLIP:
        return MMRetCLIP.from_pretrained(model, name=f"{kind}:{model}", **options)

    build.__doc__ = f"The `{kind}` retriever: MMRetCLIP.from_pretrained(model, **options)."
    return build


RETRIEVERS.register("mmret-clip")(_retriever_factory("mmret-clip"))
RETRIEVERS.register("clip")(_retriever_factory("clip"))


# loading helpers --------------------------------------------------------------


def load_clip_image_processor(source: PathLike) -> Any:
    """The checkpoint's CLIP image processor with the PIL backend (never torchvision).

    transformers 5 names it `CLIPImageProcessorPil`; in transformers 4 the plain
    (slow) `CLIPImageProcessor` is the PIL/numpy one."""
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    return (processor_class or transformers.CLIPImageProcessor).from_pretrained(source)


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


# small helpers ----------------------------------------------------------------


def _pooled(output: Any) -> torch.Tensor:
    """`get_*_features` output as a tensor: transformers 5 wraps it in a model output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1)
