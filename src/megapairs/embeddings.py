"""Embedding shards: `embeddings/<channel>/part-N.npy` (float16, L2-normalised rows)
beside `part-N.ids.npy` (int64 ids, same order). Written by the embed stage,
read by the neighbours stage."""

from __future__ import annotations

import numpy as np

from megapairs.runs import AnyPath, RunDir, read_array, write_array
from megapairs.schemas import EMBEDDINGS_DIR

# Embed settings that change the vectors (batch size and workers do not): part of the
# config hash of every stage built on the embeddings.
EMBED_OUTPUT_SETTINGS = ("embed.device", "embed.dtype")


def channel_model_settings(channel: str) -> tuple[str, ...]:
    """The settings of `channel` that change its vectors (encoder, model, options): not its
    window or `enabled`, which only mining reads, so a window may change on a started run."""
    return tuple(f"channels.{channel}.{name}" for name in ("encoder", "model", "options"))


VECTORS_SUFFIX = ".npy"
IDS_SUFFIX = ".ids.npy"


def embed_stage_name(channel: str) -> str:
    return f"embed.{channel}"


def channel_folder(channel: str) -> str:
    return f"{EMBEDDINGS_DIR}/{channel}"


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def write_shard(run: RunDir, channel: str, part: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Write one part's ids and normalised float16 vectors atomically (ids first)."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    folder = run.folder(channel_folder(channel))
    write_array(folder / f"{part}{IDS_SUFFIX}", np.asarray(ids, dtype=np.int64))
    write_array(folder / f"{part}{VECTORS_SUFFIX}", l2_normalise(vectors).astype(np.float16))


def ids_path(vectors_path: AnyPath) -> AnyPath:
    """The ids file beside a shard's vectors file (part-N.npy -> part-N.ids.npy)."""
    return vectors_path.with_name(vectors_path.name[: -len(VECTORS_SUFFIX)] + IDS_SUFFIX)


def read_shard(path: AnyPath, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float16 vectors) of the shard whose vectors file is `path` (the vectors
    memory-mapped with `mmap` when local)."""
    return read_array(ids_path(path)), read_array(path, mmap=mmap)


def shard_paths(run: RunDir, channel: str) -> list[AnyPath]:
    """Vector files of the finished parts of a channel, in part order."""
    # part-N.ids.npy also matches the glob but is no finished part's name, so it drops out.
    return run.files(channel_folder(channel), embed_stage_name(channel), VECTORS_SUFFIX)


def load_channel(run: RunDir, channel: str) -> tuple[np.ndarray, np.ndarray]:
    """All ids and float32 vectors of a channel, concatenated in part order."""
    shards = [read_shard(p) for p in shard_paths(run, channel)]
    if not shards:
        raise FileNotFoundError(f"no finished embeddings for channel {channel!r} in {run.uri}")
    ids = np.concatenate([s[0] for s in shards])
    vectors = np.concatenate([s[1] for s in shards]).astype(np.float32)
    return ids, vectors
