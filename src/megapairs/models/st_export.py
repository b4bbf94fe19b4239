"""MMRet-CLIP as a sentence-transformers input module (`MMRetCLIPModule`).

An exported folder (`megapairs.models.export.export_sentence_transformers`) lists this
class in its `modules.json`, so `SentenceTransformer(folder)` imports it from the installed
`megapairs` package and loads the MMRet-CLIP checkpoint saved in the folder's root. It
needs megapairs installed and sentence-transformers >= 6 (multimodal inputs), which asks
for `trust_remote_code=True` before importing any module class outside its own package:
`SentenceTransformer(folder, trust_remote_code=True)`. The folder holds no code; the class
is imported from the installed megapairs.

Inputs, one form per `encode` call (sentence-transformers refuses batches that mix forms):

- an image: a PIL image, or a string naming a local image file (sentence-transformers'
  rule: a path with an image extension is an image), or `{"image": image}`;
- a text: a string, or `{"text": text}`;
- a composed item: `{"image": image, "text": text}` (score fusion, as MMRet-CLIP does it).

The prompt is the task instruction (`CLIPPreprocessor.queries`): with one, a text becomes
`"{instruction} {text}"` and an image alone becomes the composed (image, instruction) item,
as `MMRetCLIP.encode_queries` does. The exported model's `prompts["query"]` is the
checkpoint's task instruction, so `encode_query` equals `encode_queries(images, texts)` and
`encode` / `encode_document` equal `encode_candidates(images, texts)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers.base.modality import infer_modality
from sentence_transformers.base.modality_types import Modality
from sentence_transformers.base.modules import InputModule

from megapairs.models.clip import MMRetCLIP
from megapairs.models.inputs import ImageInput

MODULE_CONFIG_FILE = "sentence_mmret_clip.json"
"""The module's own settings (the text length), beside the CLIP files of the folder root."""
ITEM_KEYS = frozenset({"image", "text"})


class MMRetCLIPModule(InputModule):
    """An `MMRetCLIP` (attribute `model`) behind sentence-transformers' module interface:
    `preprocess` turns a batch of inputs into model inputs, `forward` adds the unit-row
    `sentence_embedding`; `save` / `load` write and read the checkpoint in the folder root."""

    config_file_name = MODULE_CONFIG_FILE
    save_in_root = True

    def __init__(self, model: MMRetCLIP) -> None:
        super().__init__()
        self.model = model

    @property
    def modalities(self) -> list[Modality]:
        return ["text", "image", ("image", "text")]

    @property
    def max_seq_length(self) -> int:
        """The longest text (in tokens) the model reads; longer ones are cut."""
        return self.model.max_text_length

    @property
    def tokenizer(self) -> Any:  # type: ignore[override]  # read-only: the model's tokenizer
        return self.model.tokenizer

    def get_config_dict(self) -> dict[str, Any]:
        return {"max_text_length": self.model.max_text_length}

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Model inputs of a batch of one input form; `prompt` is the task instruction."""
        images, texts = split_batch(inputs, self.modalities)
        return self.model.preprocessor.queries(images, texts, prompt)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Add `sentence_embedding`: image, text or composed (score fusion) unit rows."""
        features["sentence_embedding"] = self.model(
            pixel_values=features.get("pixel_values"),
            input_ids=features.get("input_ids"),
            attention_mask=features.get("attention_mask"),
        )
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """The MMRet-CLIP checkpoint (`save_pretrained`) and this module's settings."""
        self.model.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(  # type: ignore[override]  # the keywords sentence-transformers passes
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MMRetCLIPModule:
        """The module saved in `model_name_or_path` (a local folder or a hub name); a
        `dtype` (or `torch_dtype`) in `model_kwargs` is the weights' dtype (float32)."""
        hub: dict[str, Any] = {"token": token, "cache_folder": cache_folder, "revision": revision}
        hub |= {"local_files_only": local_files_only, "subfolder": subfolder}
        config = cls.load_config(model_name_or_path, **hub)
        folder = cls.load_dir_path(model_name_or_path, **hub)
        if folder is None:
            raise FileNotFoundError(f"no MMRet-CLIP folder at {model_name_or_path!r}")
        options = model_kwargs or {}
        dtype = options.get("dtype", options.get("torch_dtype")) or "float32"
        return cls(MMRetCLIP.from_pretrained(folder, dtype=dtype, **config))


def split_batch(
    inputs: Sequence[Any], modalities: list[Modality]
) -> tuple[list[ImageInput] | None, list[str] | None]:
    """The images and texts of a batch (None where the batch has none); ValueError when
    the batch mixes input forms."""
    parts = [item_parts(item, modalities) for item in inputs]
    images = [image for image, _ in parts if image is not None]
    texts = [text for _, text in parts if text is not None]
    if {len(images), len(texts)} - {0, len(parts)}:
        raise ValueError(
            "MMRet-CLIP encodes one input form per call: images, texts, or "
            '{"image": ..., "text": ...} composed items; this batch mixes them'
        )
    return images or None, texts or None


def item_parts(item: Any, modalities: list[Modality]) -> tuple[Any, Any]:
    """(image, text) of one input, either None; a string is a text unless
    sentence-transformers reads it as an image path."""
    if isinstance(item, dict):
        unknown = set(item) - ITEM_KEYS
        if unknown or not item:
            raise ValueError(
                f"an MMRet-CLIP input dict has the keys 'image' and/or 'text'; got {sorted(item)}"
            )
        return item.get("image"), item.get("text")
    if isinstance(item, str) and infer_modality(item, supported_modalities=modalities) == "text":
        return None, item
    return item, None
