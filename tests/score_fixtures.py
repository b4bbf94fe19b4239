"""The score stage's fixture: the annotated run of run_fixtures.py plus the embeddings the
`channels` scorer reads, written in the embed stage's format (float16 L2-normalised shards,
their ids, `encoder.json`, the `embed.<channel>` markers).

The image channel `image` holds hand-made vectors: records 0, 1 and 2 share one vector
(pair 0-1's query, target and first hard negative), the others are seeded random ones. The
caption channel `caption` is the tiny CLIP text tower over the captions (record 3 has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from run_fixtures import RECORDS, FixtureRun, build_run

from megapairs.config import ChannelConfig, PipelineConfig
from megapairs.embeddings import channel_folder, embed_stage_name, write_shard
from megapairs.encoders.factory import build_encoder
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.quality.stage import ScoreStage
from megapairs.runs import RunDir, concat_tables, part_name, write_json
from megapairs.schemas import (
    PART_STRIDE,
    SCORE_FAILURES_DIR,
    SCORE_FAILURES_SCHEMA,
    SCORES_DIR,
    SCORES_SCHEMA,
)

SEED = 7
IMAGE_DIM = 8
SHARED = (0, 1, 2)  # records with one and the same image vector


def score_config(tiny_clip: Path, **score: Any) -> PipelineConfig:
    """Two channels (`image`, `caption` = tiny CLIP text) and the score section `score`."""
    channels = {
        "image": {"encoder": "efficientnet-lite0"},
        "caption": {"encoder": "clip-text", "model": str(tiny_clip)},
    }
    settings = {"random_negatives": 3, "device": "cpu", **score}
    return PipelineConfig.model_validate({"seed": SEED, "channels": channels, "score": settings})


def image_vectors() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = {rid: rng.normal(size=IMAGE_DIM) for rid in RECORDS}
    for rid in SHARED:
        vectors[rid] = vectors[SHARED[0]]
    return vectors


def caption_vectors(tiny_clip: Path) -> dict[int, np.ndarray]:
    encoder = build_encoder(ChannelConfig(encoder="clip-text", model=str(tiny_clip)), "cpu")
    captioned = [rid for rid, (_, caption, _) in RECORDS.items() if caption is not None]
    texts = [str(RECORDS[rid][1]) for rid in captioned]
    return dict(zip(captioned, encoder.encode_texts(texts), strict=True))


def write_channel(
    run: RunDir, channel: str, vectors: dict[int, np.ndarray], modality: str, skip: set[int]
) -> None:
    """One channel's shards (records in `skip` left out), encoder.json and markers."""
    for index in (0, 1):
        part = part_name(index)
        ids = [r for r in sorted(vectors) if r // PART_STRIDE == index and r not in skip]
        rows = np.stack([vectors[r] for r in ids])
        write_shard(run, channel, part, np.asarray(ids, np.int64), rows)
        run.mark_done(embed_stage_name(channel), part, {"embedded": len(ids)})
    info = {"channel": channel, "modality": modality, "dim": len(next(iter(vectors.values())))}
    write_json(run.folder(channel_folder(channel)) / "encoder.json", info)


def build_score_run(root: Path, tiny_clip: Path, no_image: set[int] | None = None) -> FixtureRun:
    """The annotated fixture run with both channels embedded (`no_image`: records left out
    of the image channel, as embed rejects do)."""
    fixture = build_run(root)
    write_channel(fixture.run, "image", image_vectors(), "image", no_image or set())
    write_channel(fixture.run, "caption", caption_vectors(tiny_clip), "text", set())
    return fixture


def run_score(run: RunDir, config: PipelineConfig, **runner: Any) -> StageResult:
    local = LocalRunner(run, config, progress=False, **runner)
    local.start()
    try:
        return local.run_stage(ScoreStage(config, progress=False))
    finally:
        local.close()


def scores(run: RunDir) -> pa.Table:
    return concat_tables(run.files(SCORES_DIR, "score"), SCORES_SCHEMA)


def score_failures(run: RunDir) -> pa.Table:
    return concat_tables(run.files(SCORE_FAILURES_DIR, "score"), SCORE_FAILURES_SCHEMA)
