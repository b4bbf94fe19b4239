"""The neighbours stage: top-k neighbours of every vector of one channel.

`prepare` (driver, once) builds one FAISS index over all finished embedding parts of
the channel and saves it as `neighbours/<channel>/index.faiss`, beside the ids of its
positions (`index.ids.npy`) and a record of how it was built (`index.json`, written
last: the index counts only once it exists). A resumed run keeps a saved index that
matches, so its parts match the first run's. With `neighbours.engine: torch` there is
no FAISS index: only the ids and the record are saved.

`setup` (once per worker process) opens the saved index, on the GPUs when
`neighbours.gpu` resolves to them, or, where the engine resolves to torch, loads the
channel's vectors as one tensor. `run_part` searches one part's queries against the
whole channel, block by block. The stage itself holds only its config, so it pickles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, overload

import faiss
import numpy as np
import pyarrow as pa

from megapairs.config import PipelineConfig
from megapairs.embeddings import (
    EMBED_OUTPUT_SETTINGS,
    VECTORS_SUFFIX,
    channel_folder,
    channel_model_settings,
    embed_stage_name,
    ids_path,
    read_shard,
    shard_paths,
)
from megapairs.neighbours.search import (
    IndexPlan,
    NonFiniteVectors,
    Reconstruct,
    TorchIndex,
    build_index,
    build_torch_index,
    plan_index,
    reconstructor,
    resolve_engine,
    search_neighbours,
    set_nprobe,
    to_gpu,
)
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.runs import (
    AnyPath,
    RunDir,
    atomic_path,
    local_file,
    read_array,
    write_array,
    write_json,
    write_table,
)
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


def _part_of(vectors_path: AnyPath) -> str:
    return vectors_path.name[: -len(VECTORS_SUFFIX)]


class ShardVectors(Sequence[np.ndarray]):
    """Embedding shards as a sequence of arrays, each read only while it is used (memory-
    mapped when `mmap`), so a full pass over a channel never keeps the channel resident."""

    def __init__(self, paths: list[AnyPath], mmap: bool = True) -> None:
        self.paths = paths
        self.mmap = mmap

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, number: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, number: slice) -> Sequence[np.ndarray]: ...
    def __getitem__(self, number: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(number, slice):
            return ShardVectors(self.paths[number], self.mmap)
        return read_array(self.paths[number], mmap=self.mmap)


@dataclass
class SearchState:
    """A worker's opened index: what `run_part` searches against."""

    index: faiss.Index | TorchIndex
    ids: np.ndarray  # ids[i]: the record id of index position i
    on_gpu: bool
    engine: str  # "faiss" or "torch"
    reconstruct: Reconstruct  # positions -> stored vectors, for exact rescoring


class NeighboursStage(StageBase):
    """Top-k search of one channel's vectors against themselves (FAISS or torch)."""

    def __init__(self, config: PipelineConfig, channel: str) -> None:
        if channel not in config.channels:
            known = ", ".join(config.channels) or "none"
            raise ValueError(f"channel {channel!r} is not in the config (channels: {known})")
        self.config = config
        self.channel = channel

    @property
    def name(self) -> str:
        return neighbours_stage_name(self.channel)

    @property
    def config_sections(self) -> tuple[str, ...]:
        return (*channel_model_settings(self.channel), *EMBED_OUTPUT_SETTINGS, "neighbours", "seed")

    def needs_actor(self) -> bool:
        """An opened index (GBs at scale) is costly to load: keep it per worker."""
        return True

    def wants_gpu(self) -> bool:
        """True unless `neighbours.gpu=never`: the search runs on a GPU where it can."""
        return self.config.neighbours.gpu != "never"

    def plan(self, run: RunDir) -> list[str]:
        """The channel's finished embedding parts."""
        return [_part_of(p) for p in shard_paths(run, self.channel)]

    def prepare(self, run: RunDir) -> None:
        """Build and save the channel's index, unless the saved one matches (driver)."""
        if not self._saved_index_matches(run):
            self._build(run)

    def setup(self, run: RunDir) -> SearchState:
        """Open the saved index where this runs: FAISS (moved to the GPUs when
        `neighbours.gpu` resolves to them) or the torch engine's tensor."""
        cfg = self.config.neighbours
        info = self._read_info(run)
        if info is None:
            raise FileNotFoundError(f"{self._path(run, INDEX_INFO_FILE)} is missing; run prepare")
        engine, gpu = resolve_engine(cfg.engine, cfg.gpu)
        index: faiss.Index | TorchIndex
        if engine == "torch":
            index = self._open_torch(run, info, gpu)
            reconstruct = reconstructor(index)
        else:
            index, reconstruct = self._open_faiss(run, gpu)
        ids = read_array(self._path(run, INDEX_IDS_FILE))
        return SearchState(index, ids, gpu, engine, reconstruct)

    def run_part(
        self, run: RunDir, part: str, state: SearchState, progress: PartProgress
    ) -> dict[str, Any]:
        """Search one part's queries against the channel; write `neighbours/<ch>/<part>`.
        `progress` counts query blocks."""
        cfg = self.config.neighbours
        path = run.part_path(channel_folder(self.channel), part, VECTORS_SUFFIX)
        ids, vectors = read_shard(path, mmap=run.is_local)
        try:
            found, scores = search_neighbours(
                state.index,
                vectors,
                ids,
                state.ids,
                cfg.k,
                cfg.query_block,
                progress,
                state.reconstruct,
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
            "gpu_parts": int(state.on_gpu),
            "engine": state.engine,
        }

    # opening the saved index on a worker ------------------------------------
    def _open_faiss(self, run: RunDir, gpu: bool) -> tuple[faiss.Index, Reconstruct]:
        """The saved index (on the GPUs when `gpu`), and a reader of its vectors from the
        CPU copy (GPU indexes cannot give vectors back; the CPU copy stays in host RAM)."""
        with local_file(self._path(run, INDEX_FILE)) as path:
            index = faiss.read_index(str(path))
        set_nprobe(index, self.config.neighbours.nprobe)
        reconstruct = reconstructor(index)
        return (to_gpu(index) if gpu else index), reconstruct

    def _open_torch(self, run: RunDir, info: dict[str, Any], gpu: bool) -> TorchIndex:
        """The vectors of the parts the saved ids came from, as one tensor."""
        folder = channel_folder(self.channel)
        paths = [run.part_path(folder, part, VECTORS_SUFFIX) for part in info["parts"]]
        with _shard_errors(paths):
            return build_torch_index(ShardVectors(paths, run.is_local), "cuda" if gpu else "cpu")

    # the saved index ------------------------------------------------------
    def _path(self, run: RunDir, name: str) -> AnyPath:
        return run.folder(neighbours_folder(self.channel)) / name

    def _config_hash(self) -> str:
        return self.config.section_hash(*self.config_sections)

    def _read_info(self, run: RunDir) -> dict[str, Any] | None:
        path = self._path(run, INDEX_INFO_FILE)
        return json.loads(path.read_text()) if path.exists() else None

    def _saved_index_matches(self, run: RunDir) -> bool:
        """True when the saved index was built from these parts with this config; an
        outdated index is an error once parts were searched with it."""
        info = self._read_info(run)
        if info is None:
            return False
        if info.get("parts") == self.plan(run) and info.get("config_hash") == self._config_hash():
            return True
        if run.done_parts(self.name):
            raise IndexOutOfDate(
                f"{self._path(run, INDEX_INFO_FILE)} was built from other embedding parts or "
                f"another config than {embed_stage_name(self.channel)} now has, and parts were "
                f"already searched with it; delete {self._path(run, '')} and "
                f"{run.uri}/_progress/{self.name} to rebuild"
            )
        return False

    def _build(self, run: RunDir) -> None:
        """Build the index from the shards (memory-mapped when local) and save it."""
        paths = shard_paths(run, self.channel)
        if not paths:
            raise FileNotFoundError(
                f"no finished embeddings for channel {self.channel!r} in {run.uri}"
            )
        ids = np.concatenate([read_array(ids_path(p)) for p in paths])
        vectors = ShardVectors(paths, run.is_local)
        if self.config.neighbours.engine == "torch":  # exact, on the vectors: nothing to build
            plan = IndexPlan("exact", len(ids), vectors[0].shape[1])
            info = {**plan.as_dict(), "engine": "torch", "build_seconds": 0.0, "gpu_build": False}
            self._save(run, None, ids, info)
            return
        cfg = self.config.neighbours
        gpu = cfg.gpu != "never" and faiss.get_num_gpus() > 0  # k-means on the GPUs
        started = time.perf_counter()
        with _shard_errors(paths):
            index = build_index(vectors, cfg, self.config.seed, gpu)
        info = {
            **plan_index(len(ids), index.d, cfg).as_dict(),
            "engine": "faiss",
            "build_seconds": round(time.perf_counter() - started, 3),
            "gpu_build": gpu,
        }
        self._save(run, index, ids, info)

    def _save(
        self, run: RunDir, index: faiss.Index | None, ids: np.ndarray, info: dict[str, Any]
    ) -> None:
        """Write index (streamed to a temp file), ids, then the record that makes them count."""
        self._path(run, INDEX_INFO_FILE).unlink(missing_ok=True)
        if index is None:
            self._path(run, INDEX_FILE).unlink(missing_ok=True)  # an older build's
        else:
            with atomic_path(self._path(run, INDEX_FILE)) as tmp:
                faiss.write_index(index, str(tmp))
        write_array(self._path(run, INDEX_IDS_FILE), ids)
        info.update(
            parts=self.plan(run),
            config_hash=self._config_hash(),
            faiss=faiss.__version__,
        )
        write_json(self._path(run, INDEX_INFO_FILE), info)


@contextmanager
def _shard_errors(paths: Sequence[AnyPath]) -> Iterator[None]:
    """Turn NonFiniteVectors while reading `paths` into a ValueError naming the file."""
    try:
        yield
    except NonFiniteVectors as err:
        raise ValueError(f"{paths[err.chunk]} row {err.row} holds NaN or infinite values") from err
