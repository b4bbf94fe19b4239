"""The neighbours stage: top-k neighbours of every vector of one channel.

`prepare` builds one FAISS index over all finished embedding parts of the
channel and saves it as `neighbours/<channel>/index.faiss`, beside the ids of
its positions (`index.ids.npy`) and a record of how it was built
(`index.json`, written last: the index counts only once it exists). A resumed
run loads that index instead of rebuilding it, so its parts match the first
run's. Each part searches its own queries against the whole channel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import faiss
import numpy as np
import pyarrow as pa

from megapairs.config import PipelineConfig
from megapairs.embeddings import (
    EMBED_OUTPUT_SETTINGS,
    VECTORS_SUFFIX,
    channel_folder,
    embed_stage_name,
    ids_path,
    read_shard,
    shard_paths,
)
from megapairs.neighbours.search import (
    NonFiniteVectors,
    build_index,
    plan_index,
    resolve_gpu,
    search_neighbours,
    set_nprobe,
    to_gpu,
)
from megapairs.runs import RunDir, atomic_path, write_array, write_json, write_table
from megapairs.schemas import NEIGHBOURS_DIR, NEIGHBOURS_SCHEMA

INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index.ids.npy"
INDEX_INFO_FILE = "index.json"


def neighbours_stage_name(channel: str) -> str:
    return f"neighbours.{channel}"


def neighbours_folder(channel: str) -> str:
    return f"{NEIGHBOURS_DIR}/{channel}"


class IndexOutOfDate(RuntimeError):
    """A saved index no longer matches the channel's embeddings or config."""


def _part_of(vectors_path: Path) -> str:
    return vectors_path.name[: -len(VECTORS_SUFFIX)]


class ShardVectors(Sequence[np.ndarray]):
    """Embedding shards as a sequence of memory-mapped arrays, each mapped only while
    it is used, so a full pass over a channel never keeps the channel resident."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, number: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, number: slice) -> Sequence[np.ndarray]: ...
    def __getitem__(self, number: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(number, slice):
            return ShardVectors(self.paths[number])
        return np.load(self.paths[number], mmap_mode="r")


class NeighboursStage:
    """FAISS top-k search of one channel's vectors against themselves."""

    def __init__(self, config: PipelineConfig, channel: str) -> None:
        if channel not in config.channels:
            known = ", ".join(config.channels) or "none"
            raise ValueError(f"channel {channel!r} is not in the config (channels: {known})")
        self.config = config
        self.channel = channel
        self._index: faiss.Index | None = None
        self._index_ids: np.ndarray | None = None
        self._on_gpu = False

    @property
    def name(self) -> str:
        return neighbours_stage_name(self.channel)

    @property
    def config_sections(self) -> tuple[str, ...]:
        return (f"channels.{self.channel}", *EMBED_OUTPUT_SETTINGS, "neighbours", "seed")

    def plan(self, run: RunDir) -> list[str]:
        """The channel's finished embedding parts."""
        return [_part_of(p) for p in shard_paths(run, self.channel)]

    def prepare(self, run: RunDir) -> None:
        """Load the saved index when it matches the embeddings and config, else build it."""
        gpu = resolve_gpu(self.config.neighbours.gpu)
        self.release()
        if self._saved_index_matches(run):
            index = faiss.read_index(str(self._path(run, INDEX_FILE)))
            self._index_ids = np.load(self._path(run, INDEX_IDS_FILE))
        else:
            index, self._index_ids = self._build(run, gpu)
        set_nprobe(index, self.config.neighbours.nprobe)
        self._index = to_gpu(index) if gpu else index
        self._on_gpu = gpu

    def release(self) -> None:
        """Free the index held in memory (it stays on disk)."""
        self._index = None
        self._index_ids = None

    def run_part(self, run: RunDir, part: str) -> dict[str, int]:
        """Search one part's queries against the channel; write `neighbours/<ch>/<part>`."""
        if self._index is None or self._index_ids is None:
            self.prepare(run)
        assert self._index is not None and self._index_ids is not None
        cfg = self.config.neighbours
        path = run.part_path(channel_folder(self.channel), part, VECTORS_SUFFIX)
        ids, vectors = read_shard(path)
        try:
            found, scores = search_neighbours(
                self._index, vectors, ids, self._index_ids, cfg.k, cfg.query_block
            )
        except NonFiniteVectors as err:
            raise ValueError(f"{path} row {err.row} holds NaN or infinite values") from err
        table = pa.Table.from_arrays(
            [pa.array(ids, pa.int64()), found, scores], schema=NEIGHBOURS_SCHEMA
        )
        write_table(run.part_path(neighbours_folder(self.channel), part), table)
        lengths = found.value_lengths().to_numpy()
        return {
            "queries": len(ids),
            "neighbours": int(lengths.sum()),
            "short_lists": int((lengths < cfg.k).sum()),
            "gpu_parts": int(self._on_gpu),
        }

    # the saved index ------------------------------------------------------
    def _path(self, run: RunDir, name: str) -> Path:
        return run.folder(neighbours_folder(self.channel)) / name

    def _config_hash(self) -> str:
        return self.config.section_hash(*self.config_sections)

    def _saved_index_matches(self, run: RunDir) -> bool:
        """True when the saved index was built from these parts with this config; an
        outdated index is an error once parts were searched with it."""
        info_path = self._path(run, INDEX_INFO_FILE)
        if not info_path.exists():
            return False
        info = json.loads(info_path.read_text())
        if info.get("parts") == self.plan(run) and info.get("config_hash") == self._config_hash():
            return True
        if run.done_parts(self.name):
            raise IndexOutOfDate(
                f"{info_path} was built from other embedding parts or another config than "
                f"{embed_stage_name(self.channel)} now has, and parts were already searched "
                f"with it; delete {self._path(run, '')} and {run.root}/_progress/{self.name} "
                "to rebuild"
            )
        return False

    def _build(self, run: RunDir, gpu: bool) -> tuple[faiss.Index, np.ndarray]:
        """Build the index from memory-mapped shards, save it, and return it with its ids."""
        paths = shard_paths(run, self.channel)
        if not paths:
            raise FileNotFoundError(
                f"no finished embeddings for channel {self.channel!r} in {run.root}"
            )
        ids = np.concatenate([np.load(ids_path(p)) for p in paths])
        started = time.perf_counter()
        try:
            index = build_index(ShardVectors(paths), self.config.neighbours, self.config.seed, gpu)
        except NonFiniteVectors as err:
            raise ValueError(
                f"{paths[err.chunk]} row {err.row} holds NaN or infinite values"
            ) from err
        seconds = time.perf_counter() - started
        plan = plan_index(len(ids), index.d, self.config.neighbours)
        info = {**plan.as_dict(), "build_seconds": round(seconds, 3), "gpu_build": gpu}
        self._save(run, index, ids, info)
        return index, ids

    def _save(self, run: RunDir, index: faiss.Index, ids: np.ndarray, info: dict[str, Any]) -> None:
        self._path(run, INDEX_INFO_FILE).unlink(missing_ok=True)
        with atomic_path(self._path(run, INDEX_FILE)) as tmp:
            faiss.write_index(index, str(tmp))
        write_array(self._path(run, INDEX_IDS_FILE), ids)
        info.update(
            parts=self.plan(run),
            config_hash=self._config_hash(),
            faiss=faiss.__version__,
        )
        write_json(self._path(run, INDEX_INFO_FILE), info)
