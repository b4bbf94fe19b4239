"""The embed stage over a run directory whose corpus is written here directly.

Corpus: part-00000 reads images from files (one truncated, one missing),
part-00001 from the run's image store, part-00002 has no captions at all. The
encoders are a tiny random CLIP saved to disk and loaded through `build_encoder`.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from megapairs.config import ChannelConfig, EmbedConfig, PipelineConfig
from megapairs.corpus.images import open_rgb
from megapairs.corpus.store import load_image_bytes, read_corpus, read_part_images, read_rejects
from megapairs.embeddings import load_channel, read_shard, shard_paths
from megapairs.encoders.base import ImageEncoder, TextEncoder
from megapairs.encoders.factory import build_encoder
from megapairs.encoders.stage import ENCODER_INFO, EmbedStage
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.runs import RunDir, part_name, write_table
from megapairs.schemas import CORPUS_SCHEMA, IMAGES_SCHEMA, record_id

# (kind, caption) per record; kind: file, truncated, missing (a path that does not exist), stored
PARTS: list[list[tuple[str, str | None]]] = [
    [
        ("file", "a red square"),
        ("file", None),
        ("truncated", "a cut-off picture"),
        ("missing", "a lost file"),
        ("file", "the cat sat"),
        ("file", "a dog"),
    ],
    [("stored", "a stored image"), ("stored", None), ("stored", "the mat")],
    [("file", None), ("file", None)],
]


# a tiny CLIP, saved once ---------------------------------------------------


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    layers["num_attention_heads"] = 2
    text = {**layers, "vocab_size": len(tokens), "max_position_embeddings": 64}
    text.update(bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1)
    config = CLIPConfig(
        text_config=text,
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def make_config(model: Path, num_workers: int = 0) -> PipelineConfig:
    return PipelineConfig(
        channels={
            "image": ChannelConfig(encoder="clip-image", model=str(model)),
            "caption": ChannelConfig(encoder="clip-text", model=str(model)),
        },
        embed=EmbedConfig(batch_size=2, num_workers=num_workers, device="cpu"),
    )


# a corpus written straight in CORPUS_SCHEMA ------------------------------------


def image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((64, 48), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """The first half of a detailed JPEG: the header is whole, the scan data is cut."""
    noise = np.random.default_rng(0).integers(0, 256, size=(192, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()[: buffer.tell() // 2]


def corpus_row(rid: int, key: str, path: str | None, data: bytes, caption: str | None) -> dict:
    return {
        "id": rid,
        "key": key,
        "uri": f"test://{key}",
        "path": path,
        "sha256": hashlib.sha256(data).hexdigest(),
        "pixel_sha256": hashlib.sha256(data[::-1]).hexdigest(),
        "width": 64,
        "height": 48,
        "source_format": "JPEG",
        "source_mode": "RGB",
        "caption": caption,
        "has_caption": caption is not None,
    }


def write_corpus(root: Path, sources: Path) -> RunDir:
    """The ingest stage's output for PARTS, marked done."""
    run = RunDir(root)
    sources.mkdir(parents=True, exist_ok=True)
    for index, records in enumerate(PARTS):
        part, rows, stored = part_name(index), [], []
        for position, (kind, caption) in enumerate(records):
            rid = record_id(index, position)
            key = f"{part}/{position:03d}.jpg"
            data = image_bytes(rid, "PNG" if position == 1 else "JPEG")
            path: str | None = str(sources / f"{rid}.img")
            if kind == "truncated":
                data = truncated_jpeg()
            if kind == "stored":
                stored.append({"id": rid, "image": data})
                path = None
            elif kind != "missing":
                Path(path).write_bytes(data)
            rows.append(corpus_row(rid, key, path, data, caption))
        write_table(run.part_path("corpus", part), pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA))
        if stored:
            write_table(run.part_path("images", part), pa.Table.from_pylist(stored, IMAGES_SCHEMA))
        run.mark_done("ingest", part, {"records": len(rows)})
    return run


@pytest.fixture
def corpus(tmp_path: Path) -> RunDir:
    return write_corpus(tmp_path / "run", tmp_path / "sources")


def run_embed(run: RunDir, config: PipelineConfig, channel: str) -> StageResult:
    stage = EmbedStage(config, channel, progress=False)
    return LocalRunner(run, config, progress=False).run_stage(stage)


def records_where(predicate: Any) -> list[int]:
    return [
        record_id(index, position)
        for index, records in enumerate(PARTS)
        for position, (kind, caption) in enumerate(records)
        if predicate(kind, caption)
    ]


def shard_bytes(run: RunDir, channel: str) -> dict[str, bytes]:
    folder = run.folder(f"embeddings/{channel}")
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.npy"))}


# image channels ------------------------------------------------------------


def test_image_channel_embeds_readable_images_and_rejects_the_rest(corpus, tiny_clip_dir):
    config = make_config(tiny_clip_dir)
    result = run_embed(corpus, config, "image")
    assert result.counts == {"embedded": 9, "failed": 2, "skipped_no_caption": 0}
    assert (result.parts, result.computed) == (3, 3)

    ids, vectors = load_channel(corpus, "image")
    assert ids.tolist() == records_where(lambda kind, _: kind in ("file", "stored"))
    assert vectors.shape == (9, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert read_shard(shard_paths(corpus, "image")[0])[1].dtype == np.float16

    # the same vectors as the encoder gives on the same decoded images, outside the stage
    encoder = build_encoder(config.channels["image"], device="cpu")
    assert isinstance(encoder, ImageEncoder)
    corpus_rows = {}
    for part in ("part-00000", "part-00001", "part-00002"):
        table, stored = read_corpus(corpus, part), read_part_images(corpus, part)
        for rid, path in zip(table["id"].to_pylist(), table["path"].to_pylist(), strict=True):
            corpus_rows[rid] = (path, stored)
    data = {rid: load_image_bytes(rid, *corpus_rows[rid]) for rid in ids.tolist()}
    images = [open_rgb(data[rid], draft_size=encoder.draft_size) for rid in ids.tolist()]
    np.testing.assert_allclose(vectors, encoder.encode_images(images), atol=2e-3)


def test_failed_images_land_in_the_embed_rejects_table(corpus, tiny_clip_dir):
    run_embed(corpus, make_config(tiny_clip_dir), "image")
    rejects = read_rejects(corpus).to_pylist()
    assert [r["id"] for r in rejects] == [record_id(0, 2), record_id(0, 3)]
    assert {r["stage"] for r in rejects} == {"embed.image"}
    truncated, missing = rejects
    assert truncated["reason"] == "truncated"
    assert missing["reason"] == "unreadable"
    assert str(record_id(0, 3)) in missing["detail"]
    assert (truncated["key"], truncated["uri"]) == (
        "part-00000/002.jpg",
        "test://part-00000/002.jpg",
    )
    assert all(r["detail"] for r in rejects)
    names = sorted(p.name for p in corpus.folder("rejects").glob("*.parquet"))
    assert names == ["embed.image-part-00000.parquet"]


def test_encoder_is_recorded_beside_the_shards(corpus, tiny_clip_dir):
    run_embed(corpus, make_config(tiny_clip_dir), "image")
    info = (corpus.folder("embeddings/image") / ENCODER_INFO).read_text()
    assert '"dim": 16' in info
    assert f'"name": "clip-image:{tiny_clip_dir}"' in info
    assert '"modality": "image"' in info


def test_worker_processes_give_the_same_shards(tmp_path, tiny_clip_dir):
    in_process = write_corpus(tmp_path / "a", tmp_path / "sources-a")
    with_workers = write_corpus(tmp_path / "b", tmp_path / "sources-b")
    run_embed(in_process, make_config(tiny_clip_dir, num_workers=0), "image")
    result = run_embed(with_workers, make_config(tiny_clip_dir, num_workers=2), "image")
    assert result.counts == {"embedded": 9, "failed": 2, "skipped_no_caption": 0}
    assert shard_bytes(with_workers, "image") == shard_bytes(in_process, "image")


# text channels -------------------------------------------------------------


def test_text_channel_embeds_captioned_records_only(corpus, tiny_clip_dir):
    config = make_config(tiny_clip_dir)
    result = run_embed(corpus, config, "caption")
    assert result.counts == {"embedded": 7, "failed": 0, "skipped_no_caption": 4}

    ids, vectors = load_channel(corpus, "caption")
    assert ids.tolist() == records_where(lambda _, caption: caption is not None)
    encoder = build_encoder(config.channels["caption"], device="cpu")
    assert isinstance(encoder, TextEncoder)
    captions = [caption for records in PARTS for _, caption in records if caption is not None]
    np.testing.assert_allclose(vectors, encoder.encode_texts(captions), atol=2e-3)

    empty_ids, empty_vectors = read_shard(shard_paths(corpus, "caption")[2])
    assert empty_ids.shape == (0,)
    assert empty_vectors.shape == (0, 16)
    assert not corpus.folder("rejects").exists()


# resuming ------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["image", "caption"])
def test_resume_after_deleting_a_marker_gives_identical_shards(corpus, tiny_clip_dir, channel):
    config = make_config(tiny_clip_dir)
    first = run_embed(corpus, config, channel)
    before = shard_bytes(corpus, channel)
    rejects_before = read_rejects(corpus)

    (corpus.root / "_progress" / f"embed.{channel}" / "part-00000.json").unlink()
    for path in corpus.folder(f"embeddings/{channel}").glob("part-00000*"):
        path.unlink()
    shutil.rmtree(corpus.folder("rejects"), ignore_errors=True)

    again = run_embed(corpus, config, channel)
    assert again.computed == 1
    assert again.counts == first.counts
    assert shard_bytes(corpus, channel) == before
    assert read_rejects(corpus).equals(rejects_before)


def test_unknown_channel_is_refused(tiny_clip_dir):
    with pytest.raises(ValueError, match=r"no channel 'colour' in the config; channels: image"):
        EmbedStage(make_config(tiny_clip_dir), "colour")


def test_stage_contract(tiny_clip_dir, corpus):
    stage = EmbedStage(make_config(tiny_clip_dir), "caption")
    assert stage.name == "embed.caption"
    model = ("channels.caption.encoder", "channels.caption.model", "channels.caption.options")
    assert stage.config_sections == (*model, "embed.device", "embed.dtype")
    config = make_config(tiny_clip_dir)
    data = config.model_dump()
    data["channels"]["caption"]["window"] = "auto"  # mining's business: no new vectors
    other = type(config).model_validate(data)
    sections = stage.config_sections
    assert other.section_hash(*sections) == config.section_hash(*sections)
    assert stage.plan(corpus) == ["part-00000", "part-00001", "part-00002"]
