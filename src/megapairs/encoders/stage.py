"""The `embed.<channel>` stage: one vector per corpus record for one channel.

Parts follow the ingest parts. For each part it writes
`embeddings/<channel>/part-N.npy` + `part-N.ids.npy` (`megapairs.embeddings`),
and `embeddings/<channel>/encoder.json` once, describing the encoder.

- Image channels read each record's bytes (the run's image store, else the
  source file), decode them with `open_rgb` (JPEGs drafted down to the size the
  encoder needs) and preprocess them in DataLoader worker processes, so decoding
  overlaps the model. A record that fails here goes to
  `rejects/embed.<channel>-part-N.parquet` with a reason code; it never stops the run.
- Text channels embed the captions of records with `has_caption`; the others are
  not in the channel and are counted as `skipped_no_caption`.

Counts per part: `embedded`, `failed`, `skipped_no_caption`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from megapairs.config import EmbedConfig, PipelineConfig
from megapairs.corpus.images import ImageRejected, open_rgb
from megapairs.corpus.store import (
    corpus_parts,
    load_image_bytes,
    read_corpus,
    read_part_images,
    rejects_path,
)
from megapairs.embeddings import (
    EMBED_OUTPUT_SETTINGS,
    channel_folder,
    channel_model_settings,
    embed_stage_name,
    write_shard,
)
from megapairs.encoders.base import Encoder, ImageEncoder, Preprocessor, TextEncoder
from megapairs.encoders.factory import build_encoder
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.runs import RunDir, write_json, write_table
from megapairs.schemas import rejects_table, with_sources

ENCODER_INFO = "encoder.json"


@contextmanager
def loading_bars(shown: bool) -> Iterator[None]:
    """Show or hide transformers' weight-loading progress bars while building a model."""
    from transformers.utils import logging as hf_logging

    was_shown = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_shown else hf_logging.disable_progress_bar)()


# image records -------------------------------------------------------------


@dataclass
class ImageItem:
    """One record after loading: its pixels, or why there are none."""

    record_id: int
    pixels: torch.Tensor | None = None
    reason: str = ""
    detail: str = ""


@dataclass
class ImageBatch:
    """The records of one batch that loaded (stacked) and those that failed."""

    ids: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    failures: list[ImageItem] = field(default_factory=list)


class ImageRecords(Dataset[ImageItem]):
    """A corpus part's images: read bytes, decode, preprocess; failures become items too.

    Holds no model, so it is cheap to copy into DataLoader worker processes."""

    def __init__(
        self,
        ids: list[int],
        paths: list[str | None],
        stored: dict[int, bytes],
        preprocess: Preprocessor,
        draft_size: tuple[int, int],
        max_pixels: int,
    ) -> None:
        self.ids, self.paths, self.stored = ids, paths, stored
        self.preprocess = preprocess
        self.draft_size = draft_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> ImageItem:
        record_id = self.ids[index]
        try:
            return ImageItem(record_id, pixels=self.load(index))
        except ImageRejected as err:
            return ImageItem(record_id, reason=err.reason, detail=err.detail)

    def load(self, index: int) -> torch.Tensor:
        """The preprocessed pixels of record `index`, or ImageRejected."""
        record_id, path = self.ids[index], self.paths[index]
        try:
            data = load_image_bytes(record_id, path, self.stored)
        except OSError as err:
            detail = f"cannot read the image of record {record_id}: {err}"
            raise ImageRejected("unreadable", detail) from err
        image = open_rgb(data, draft_size=self.draft_size, max_pixels=self.max_pixels)
        try:
            return self.preprocess(image)
        except Exception as err:  # image processors raise many types on odd inputs
            raise ImageRejected(
                "preprocess_failed",
                f"the encoder's preprocessing failed on a {image.width}x{image.height} image: "
                f"{type(err).__name__}: {err}",
            ) from err


def collate_images(items: list[ImageItem]) -> ImageBatch:
    """Stack the loaded records; keep the failed ones aside."""
    loaded = [item for item in items if item.pixels is not None]
    return ImageBatch(
        ids=[item.record_id for item in loaded],
        pixels=torch.stack([item.pixels for item in loaded]) if loaded else None,
        failures=[item for item in items if item.pixels is None],
    )


# the stage -----------------------------------------------------------------


@dataclass
class PartOutput:
    """What embedding one part produced."""

    ids: list[int]
    vectors: np.ndarray
    failures: list[ImageItem] = field(default_factory=list)
    skipped_no_caption: int = 0


class EmbedStage(StageBase):
    """Embeds every corpus part with one channel's encoder (the worker state)."""

    def __init__(self, config: PipelineConfig, channel: str, progress: bool = True) -> None:
        if channel not in config.channels:
            known = ", ".join(config.channels) or "none"
            raise ValueError(f"no channel {channel!r} in the config; channels: {known}")
        self.config = config
        self.channel = channel
        self.channel_config = config.channels[channel]
        self.progress = progress  # shows transformers' weight-loading bars

    @property
    def name(self) -> str:
        return embed_stage_name(self.channel)

    @property
    def config_sections(self) -> tuple[str, ...]:
        return (*channel_model_settings(self.channel), *EMBED_OUTPUT_SETTINGS)

    def needs_actor(self) -> bool:
        """An encoder is costly to load: keep it in long-lived workers."""
        return True

    def wants_gpu(self) -> bool:
        return self.config.embed.device != "cpu"

    def plan(self, run: RunDir) -> list[str]:
        return corpus_parts(run)

    def setup(self, run: RunDir) -> Encoder:
        """Build the channel's encoder and record what it is beside the channel's shards."""
        embed = self.config.embed
        with loading_bars(self.progress):
            encoder = build_encoder(self.channel_config, embed.device, embed.dtype)
        info = {
            "channel": self.channel,
            "encoder": self.channel_config.encoder,
            "model": self.channel_config.model,
            "options": self.channel_config.options,
            **encoder.describe(),
        }
        write_json(run.folder(channel_folder(self.channel)) / ENCODER_INFO, info)
        return encoder

    def run_part(
        self, run: RunDir, part: str, state: Encoder, progress: PartProgress
    ) -> dict[str, int]:
        embed_part = PART_EMBEDDERS[state.modality]
        output = embed_part(self, state, run, part, progress)
        write_shard(run, self.channel, part, np.asarray(output.ids, np.int64), output.vectors)
        self._write_rejects(run, part, output.failures)
        return {
            "embedded": len(output.ids),
            "failed": len(output.failures),
            "skipped_no_caption": output.skipped_no_caption,
        }

    def _write_rejects(self, run: RunDir, part: str, failures: list[ImageItem]) -> None:
        """rejects/embed.<channel>-part-N.parquet, or no file (and no stale one) if none."""
        path = rejects_path(run, self.name, part)
        if not failures:
            path.unlink(missing_ok=True)
            return
        table = read_corpus(run, part, columns=["id", "key", "uri"])
        write_table(path, reject_rows(table, failures, self.name))


def reject_rows(corpus: pa.Table, failures: list[ImageItem], stage: str) -> pa.Table:
    """REJECTS_SCHEMA rows for `failures`, with each record's key and uri from `corpus`."""
    ids = [item.record_id for item in failures]
    reasons = [item.reason for item in failures]
    rejects = rejects_table(ids, stage, reasons, [item.detail for item in failures])
    return with_sources(rejects, corpus)


def embed_image_part(
    stage: EmbedStage, encoder: Encoder, run: RunDir, part: str, progress: PartProgress
) -> PartOutput:
    """Decode and preprocess a part's images in DataLoader workers; encode batch by batch."""
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(f"{stage.name}: {encoder.name} is not an image encoder")
    table = read_corpus(run, part, columns=["id", "path"])
    records = ImageRecords(
        table["id"].to_pylist(),
        table["path"].to_pylist(),
        read_part_images(run, part),
        encoder.preprocessor,
        encoder.draft_size,
        stage.config.ingest.max_pixels,
    )
    loader = image_loader(records, stage.config.embed, pin_memory=encoder.device.type == "cuda")
    ids: list[int] = []
    vectors = [encoder.empty()]
    failures: list[ImageItem] = []
    for done, batch in enumerate(loader, start=1):
        if batch.pixels is not None:
            vectors.append(encoder.encode_pixels(batch.pixels))
        ids.extend(batch.ids)
        failures.extend(batch.failures)
        progress(done, len(loader))
    return PartOutput(ids, np.concatenate(vectors), failures)


def image_loader(records: ImageRecords, embed: EmbedConfig, pin_memory: bool) -> DataLoader:
    """Batches of `records` in order, loaded by `embed.num_workers` worker processes."""
    return DataLoader(
        records,
        batch_size=embed.batch_size,
        shuffle=False,
        num_workers=embed.num_workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
    )


def embed_text_part(
    stage: EmbedStage, encoder: Encoder, run: RunDir, part: str, progress: PartProgress
) -> PartOutput:
    """Embed the captions of a part's captioned records, `embed.batch_size` at a time."""
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"{stage.name}: {encoder.name} is not a text encoder")
    table = read_corpus(run, part, columns=["id", "caption", "has_caption"])
    ids, captions = [], []
    for record_id, caption, has_caption in zip(
        *(table[column].to_pylist() for column in ("id", "caption", "has_caption")), strict=True
    ):
        if has_caption and caption:
            ids.append(record_id)
            captions.append(caption)
    size = stage.config.embed.batch_size
    vectors = [encoder.empty()]
    batches = -(-len(captions) // size)
    for done, start in enumerate(range(0, len(captions), size), start=1):
        vectors.append(encoder.encode_texts(captions[start : start + size]))
        progress(done, batches)
    skipped = table.num_rows - len(ids)
    return PartOutput(ids, np.concatenate(vectors), skipped_no_caption=skipped)


PART_EMBEDDERS: dict[
    str, Callable[[EmbedStage, Encoder, RunDir, str, PartProgress], PartOutput]
] = {
    ImageEncoder.modality: embed_image_part,
    TextEncoder.modality: embed_text_part,
}
