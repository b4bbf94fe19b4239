"""Scorers of the quality gate: composed queries (query image + instruction), text-only
and image-only queries, and candidates, as vectors whose dot product is the score.

- `channels` (`ChannelsScorer`, offline, the default): the run's own embeddings. A
  candidate is `[image_emb[c], caption_emb[c]]`, a composed query
  `[(1 - w) image_emb[q], w text_enc(instruction)]`, so the score is exactly
  `(1 - w) cos(image_emb[q], image_emb[c]) + w cos(text_enc(instruction), caption_emb[c])`
  with `w = score.text_weight`. Text-only queries are `[0, text_enc(instruction)]` (score
  `cos(text, caption_emb[c])`), image-only ones `[image_emb[q], 0]`. A candidate without a
  caption embedding has a zero caption half: its text term is 0. Image embeddings come from
  `score.image_channel` (empty: the first enabled image channel), caption embeddings from
  `score.text_channel` (empty: the first enabled caption channel), and instructions are
  encoded by that caption channel's own encoder (same model), so both halves are unit rows.
- `clip`, `mmret-clip`, `mmret-mllm` (`RetrieverScorer`): the retrievers `megapairs eval`
  uses. Composed = `encode_queries(query images, instructions)`, text-only =
  `encode_queries(None, instructions)`, image-only = `encode_queries(query images, None)`,
  each with the model's own task instruction (as eval passes none); candidates =
  `encode_candidates(images, None)`. Unit rows.

Every method returns float32 rows; an item with no vector (a record the image channel
has no embedding for, an image that cannot be read) gets a zero row and a reason in
`Encoded.missing` (`no_image_embedding`, `image_unavailable`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from megapairs.annotation.images import CorpusLookup
from megapairs.config import PipelineConfig
from megapairs.embeddings import VECTORS_SUFFIX, channel_folder, read_shard, shard_paths
from megapairs.runs import RunDir, part_name, read_bytes
from megapairs.schemas import PART_STRIDE

TEXT_ENCODERS = frozenset({"clip-text", "siglip-text", "sentence-transformers"})
ENCODER_INFO = "encoder.json"  # written beside a channel's shards by the embed stage
NO_EMBEDDING = "no_image_embedding"
IMAGE_UNAVAILABLE = "image_unavailable"


@dataclass
class Encoded:
    """Vectors of some records (or queries), zero rows where `missing` says why none."""

    vectors: np.ndarray
    missing: dict[int, str] = field(default_factory=dict)  # record id -> reason


class Scorer(Protocol):
    """Queries and candidates as vectors; score = dot product."""

    name: str  # recorded in every scores row

    def start_part(self) -> None:
        """Forget what was cached for the previous part (a part's scores depend on it alone)."""
        ...

    def candidates(self, ids: Sequence[int]) -> Encoded:
        """The candidate vectors of records `ids`."""
        ...

    def composed(self, query_ids: Sequence[int], instructions: Sequence[str]) -> Encoded:
        """One composed query per (query image, instruction); `missing` by query id."""
        ...

    def text_only(self, instructions: Sequence[str]) -> np.ndarray:
        """One query per instruction, without the image."""
        ...

    def image_only(self, query_ids: Sequence[int]) -> Encoded:
        """One query per query image, without the instruction."""
        ...


# the channels scorer ----------------------------------------------------------------


class ChannelVectors:
    """A channel's float16 vectors by record id, from its finished shards (memory-mapped
    when the run is local; a remote run keeps each shard it touched in memory)."""

    def __init__(self, run: RunDir, channel: str) -> None:
        paths = shard_paths(run, channel)
        if not paths:
            raise FileNotFoundError(
                f"no finished embeddings for channel {channel!r} in {run.uri}: run "
                f"`megapairs embed` first"
            )
        self.channel = channel
        self.paths = {p.name.removesuffix(VECTORS_SUFFIX): p for p in paths}
        self._shards: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.dim = int(self._shard(next(iter(self.paths)))[2].shape[1])

    def _shard(self, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted ids, their rows, vectors) of one part."""
        if part not in self._shards:
            ids, vectors = read_shard(self.paths[part], mmap=True)
            order = np.argsort(ids, kind="stable")
            self._shards[part] = (ids[order], order, vectors)
        return self._shards[part]

    def lookup(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, found mask) of `ids`; rows of ids not found are zero."""
        wanted = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(wanted), self.dim), dtype=np.float32)
        found = np.zeros(len(wanted), dtype=bool)
        for index in np.unique(wanted // PART_STRIDE):
            part = part_name(int(index))
            if part not in self.paths:
                continue
            rows = np.flatnonzero(wanted // PART_STRIDE == index)
            sorted_ids, order, vectors = self._shard(part)
            at = np.minimum(np.searchsorted(sorted_ids, wanted[rows]), len(sorted_ids) - 1)
            hit = sorted_ids[at] == wanted[rows]
            out[rows[hit]] = vectors[order[at[hit]]]
            found[rows[hit]] = True
        return out, found


class TextVectors:
    """Instruction vectors of one part: each distinct text encoded once, in batches of
    similar length (less padding); at most `limit` kept, forgotten at once when full."""

    def __init__(self, encoder: Any, batch: int = 32, limit: int = 100_000) -> None:
        self.encoder, self.batch, self.limit = encoder, batch, limit
        self.vectors: dict[str, np.ndarray] = {}

    def clear(self) -> None:
        self.vectors = {}

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """float32 vectors of `texts` (unit rows), in order."""
        new = sorted({t for t in texts if t not in self.vectors}, key=lambda t: (len(t), t))
        if len(self.vectors) + len(new) > self.limit:
            self.clear()
            new = sorted(set(texts), key=lambda t: (len(t), t))
        for start in range(0, len(new), self.batch):
            group = new[start : start + self.batch]
            rows = np.asarray(self.encoder.encode_texts(group), np.float32)
            self.vectors.update(zip(group, rows, strict=True))
        if not texts:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([self.vectors[t] for t in texts])


class ChannelsScorer:
    """Image-channel similarity plus instruction-to-caption similarity (module docstring)."""

    def __init__(
        self, images: ChannelVectors, captions: ChannelVectors, encoder: Any, text_weight: float
    ) -> None:
        if encoder.dim != captions.dim:
            raise ValueError(
                f"the encoder of channel {captions.channel!r} gives {encoder.dim}-d vectors but "
                f"its embeddings are {captions.dim}-d: the channel changed since embed ran"
            )
        self.images, self.captions, self.encoder = images, captions, encoder
        self.text_weight = text_weight
        self.name = f"channels:{images.channel}+{captions.channel}"
        self.texts = TextVectors(encoder)

    def start_part(self) -> None:
        self.texts.clear()

    def _texts(self, instructions: Sequence[str]) -> np.ndarray:
        return self.texts.get(instructions)

    def _images(self, ids: Sequence[int]) -> tuple[np.ndarray, dict[int, str]]:
        vectors, found = self.images.lookup(ids)
        return vectors, {int(i): NO_EMBEDDING for i, ok in zip(ids, found, strict=True) if not ok}

    def candidates(self, ids: Sequence[int]) -> Encoded:
        images, missing = self._images(ids)
        captions, _ = self.captions.lookup(ids)  # none: a zero half, the text term is 0
        return Encoded(np.hstack([images, captions]), missing)

    def composed(self, query_ids: Sequence[int], instructions: Sequence[str]) -> Encoded:
        images, missing = self._images(query_ids)
        w = self.text_weight
        return Encoded(np.hstack([(1.0 - w) * images, w * self._texts(instructions)]), missing)

    def text_only(self, instructions: Sequence[str]) -> np.ndarray:
        texts = self._texts(instructions)
        return np.hstack([np.zeros((len(texts), self.images.dim), np.float32), texts])

    def image_only(self, query_ids: Sequence[int]) -> Encoded:
        images, missing = self._images(query_ids)
        blank = np.zeros((len(images), self.captions.dim), np.float32)
        return Encoded(np.hstack([images, blank]), missing)


def channel_modality(run: RunDir, config: PipelineConfig, channel: str) -> str:
    """`image` or `text`: what the embed stage recorded, else told from the encoder name."""
    info = run.folder(channel_folder(channel)) / ENCODER_INFO
    if info.exists():
        modality = json.loads(read_bytes(info)).get("modality")
        if modality in ("image", "text"):
            return str(modality)
    return "text" if config.channels[channel].encoder in TEXT_ENCODERS else "image"


def resolve_channels(run: RunDir, config: PipelineConfig) -> tuple[str, str]:
    """(image channel, caption channel) of the channels scorer."""
    score = config.score
    picked = []
    for setting, modality in (("image_channel", "image"), ("text_channel", "text")):
        name = getattr(score, setting)
        if name:
            if name not in config.channels:
                raise ValueError(f"score.{setting} {name!r} is not a channel of the config")
            if channel_modality(run, config, name) != modality:
                raise ValueError(f"score.{setting} {name!r} is not an {modality} channel")
        else:
            name = first_channel(run, config, modality, setting)
        picked.append(name)
    return picked[0], picked[1]


def first_channel(run: RunDir, config: PipelineConfig, modality: str, setting: str) -> str:
    for name in config.enabled_channels():
        if channel_modality(run, config, name) == modality:
            return name
    raise ValueError(
        f"score.scorer channels needs an enabled {modality} channel (score.{setting}); "
        "none is configured: add one, or score with a retriever (score.scorer=clip)"
    )


def build_channels_scorer(run: RunDir, config: PipelineConfig) -> ChannelsScorer:
    """The channels scorer over the run's embeddings, with the caption channel's encoder."""
    from megapairs.encoders.base import TextEncoder
    from megapairs.encoders.factory import build_encoder

    image_channel, text_channel = resolve_channels(run, config)
    encoder = build_encoder(config.channels[text_channel], config.score.device, config.embed.dtype)
    if not isinstance(encoder, TextEncoder):
        raise ValueError(f"channel {text_channel!r} does not encode texts")
    images, captions = ChannelVectors(run, image_channel), ChannelVectors(run, text_channel)
    return ChannelsScorer(images, captions, encoder, config.score.text_weight)


# the retriever scorer ---------------------------------------------------------------


class RetrieverScorer:
    """A `megapairs eval` retriever over the corpus images (module docstring); images are
    opened and encoded `batch` at a time."""

    def __init__(self, retriever: Any, lookup: CorpusLookup, batch: int = 64) -> None:
        self.retriever = retriever
        self.lookup = lookup
        self.batch = batch
        self.name = str(retriever.name)
        self.dim = int(retriever.dim)

    def start_part(self) -> None:
        """Nothing is cached across calls."""

    def _images(self, ids: Sequence[int]) -> tuple[dict[int, Any], dict[int, str]]:
        """Decoded images of the distinct `ids`, and the ids whose image cannot be read."""
        from megapairs.corpus.images import open_rgb

        images, missing = {}, {}
        for record in dict.fromkeys(int(i) for i in ids):
            try:
                images[record] = open_rgb(self.lookup.image_bytes(record))
            except Exception:  # a file gone, changed or undecodable since ingest
                missing[record] = IMAGE_UNAVAILABLE
        return images, missing

    def _encode(
        self, ids: Sequence[int], texts: Sequence[str] | None, encode: Callable[..., Any]
    ) -> Encoded:
        """`encode(images, texts)` of the items whose image opens, a batch at a time."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        missing: dict[int, str] = {}
        for start in range(0, len(ids), self.batch):
            images, lost = self._images(ids[start : start + self.batch])
            missing.update(lost)
            rows = [r for r in range(start, min(start + self.batch, len(ids))) if ids[r] in images]
            if rows:
                words = None if texts is None else [texts[r] for r in rows]
                out[rows] = np.asarray(encode([images[ids[r]] for r in rows], words), np.float32)
        return Encoded(out, missing)

    def candidates(self, ids: Sequence[int]) -> Encoded:
        return self._encode(ids, None, self.retriever.encode_candidates)

    def composed(self, query_ids: Sequence[int], instructions: Sequence[str]) -> Encoded:
        return self._encode(query_ids, instructions, self.retriever.encode_queries)

    def text_only(self, instructions: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(instructions), self.dim), np.float32)
        for start in range(0, len(instructions), self.batch):
            texts = list(instructions[start : start + self.batch])
            out[start : start + len(texts)] = self.retriever.encode_queries(None, texts)
        return out

    def image_only(self, query_ids: Sequence[int]) -> Encoded:
        return self._encode(query_ids, None, self.retriever.encode_queries)


def build_retriever_scorer(
    run: RunDir, config: PipelineConfig, lookup: CorpusLookup | None = None
) -> RetrieverScorer:
    """The `score.scorer` retriever from `score.model` on `score.device`, reading images
    through `lookup` (a new one when None)."""
    from megapairs.evaluation.command import retriever_placement
    from megapairs.models.base import build_retriever

    score = config.score
    if not score.model:
        raise ValueError(f"score.scorer {score.scorer} needs score.model (a checkpoint)")
    options = retriever_placement(score.scorer, score.device)
    retriever = build_retriever(score.scorer, score.model, **options)
    lookup = lookup or CorpusLookup(run, score.judge.image_max_side)
    return RetrieverScorer(retriever, lookup, score.batch_size)


def build_scorer(run: RunDir, config: PipelineConfig) -> Scorer:
    """The scorer `score.scorer` names, ready to score the run's parts."""
    if config.score.scorer == "channels":
        return build_channels_scorer(run, config)
    return build_retriever_scorer(run, config)
