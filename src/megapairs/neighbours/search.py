"""FAISS k-nearest-neighbour search over L2-normalised vectors (inner product = cosine).

Channels of up to `neighbours.exact_max` vectors get exact search (`IndexFlatIP`);
larger ones an inverted-file index (`IndexIVFFlat`, inner product) trained on a
seeded sample, so a rebuilt index is the same index. Indexes are filled chunk by
chunk (chunks may be memory-mapped shards) and queries are searched in blocks,
so memory holds the index plus one block, never a second full float32 copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from faiss.contrib.inspect_tools import get_invlist

from megapairs.config import NeighboursConfig
from megapairs.embeddings import l2_normalise
from megapairs.registry import Registry

# IVF sizing rules used when the config leaves nlist / train_size at 0, tuned for a
# self-join (every vector is a query), where k-means training is a large share of
# the cost (bench/bench_mining.py; bench/RESULTS-mining.md).
NLIST_PER_SQRT_N = 2.0
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per list
TRAIN_POINTS_PER_LIST = 40
ADD_BLOCK = 65_536  # rows converted to float32 at a time while filling an index

INDEX_KINDS: Registry[faiss.Index] = Registry("index kind")


@dataclass(frozen=True)
class IndexPlan:
    """Which index a channel gets: `exact` or `ivf`, with the IVF sizes."""

    kind: str
    size: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    train_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NonFiniteVectors(ValueError):
    """Vectors holding NaN or infinite values; `chunk` and `row` say where."""

    def __init__(self, chunk: int, row: int) -> None:
        super().__init__(f"vector chunk {chunk} row {row} holds NaN or infinite values")
        self.chunk = chunk
        self.row = row


def default_nlist(size: int) -> int:
    """IVF lists for `size` vectors: ~2*sqrt(size), at most size/39 (FAISS's training floor)."""
    upper = max(1, size // MIN_POINTS_PER_LIST)
    return int(min(max(1, round(NLIST_PER_SQRT_N * math.sqrt(size))), upper))


def plan_index(size: int, dim: int, cfg: NeighboursConfig) -> IndexPlan:
    """Exact search up to `cfg.exact_max` vectors, IVF beyond (sizes from cfg or the rules)."""
    if size <= cfg.exact_max:
        return IndexPlan("exact", size, dim)
    nlist = cfg.nlist or default_nlist(size)
    if nlist > size:
        raise ValueError(f"neighbours.nlist={nlist} exceeds the channel's {size} vectors")
    train_size = min(size, cfg.train_size or TRAIN_POINTS_PER_LIST * nlist)
    if train_size < nlist:
        raise ValueError(f"neighbours.train_size={train_size} is below nlist={nlist}")
    return IndexPlan("ivf", size, dim, nlist, min(cfg.nprobe, nlist), train_size)


@INDEX_KINDS.register("exact")
def _exact_index(plan: IndexPlan) -> faiss.Index:
    return faiss.IndexFlatIP(plan.dim)


@INDEX_KINDS.register("ivf")
def _ivf_index(plan: IndexPlan) -> faiss.Index:
    quantizer = faiss.IndexFlatIP(plan.dim)
    index = faiss.IndexIVFFlat(quantizer, plan.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = plan.nprobe
    return index


def resolve_gpu(mode: str) -> bool:
    """Whether to use FAISS on GPU for `neighbours.gpu` = auto / never / always."""
    gpus = faiss.get_num_gpus()
    if mode == "always" and gpus == 0:
        raise RuntimeError(
            "neighbours.gpu=always but FAISS sees no GPU (faiss.get_num_gpus() == 0); "
            "install faiss-gpu on a machine with CUDA, or set neighbours.gpu=auto"
        )
    return mode != "never" and gpus > 0


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of a CPU index on all visible GPUs."""
    return faiss.index_cpu_to_all_gpus(index)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the lists probed per query of an IVF index (no-op for exact indexes)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(nprobe, index.nlist)


def unit_rows(block: np.ndarray, chunk: int = 0, first_row: int = 0) -> np.ndarray:
    """`block` as contiguous unit-length float32 rows; NonFiniteVectors on NaN/inf."""
    rows = np.ascontiguousarray(l2_normalise(block))
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise NonFiniteVectors(chunk, first_row + int(np.argmin(finite)))
    return rows


def training_sample(chunks: Sequence[np.ndarray], size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement (seeded) from the chunks, as unit float32."""
    total = sum(len(c) for c in chunks)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
    rows, start = [], 0
    for number, chunk in enumerate(chunks):
        local = picks[(picks >= start) & (picks < start + len(chunk))] - start
        if len(local):
            rows.append(unit_rows(chunk[local], number, int(local[0])))
        start += len(chunk)
    return np.concatenate(rows)


def fill_index(index: faiss.Index, chunks: Sequence[np.ndarray], block: int = ADD_BLOCK) -> None:
    """Add every chunk's rows (unit float32, `block` rows at a time) in order."""
    for number, chunk in enumerate(chunks):
        for start in range(0, len(chunk), block):
            index.add(unit_rows(chunk[start : start + block], number, start))


def build_index(
    vectors: np.ndarray | Sequence[np.ndarray], cfg: NeighboursConfig, seed: int, gpu: bool = False
) -> faiss.Index:
    """A CPU index over the rows of `vectors` (one array or a sequence of chunks, e.g.
    lazily memory-mapped float16 shards: each chunk is fetched when used and may be
    freed after); position i in the index is row i of the chunks concatenated. With
    `gpu`, IVF training (k-means) runs on the GPUs."""
    chunks = [vectors] if isinstance(vectors, np.ndarray) else vectors
    dims = {c.shape[1] for c in chunks}
    if len(dims) != 1:
        raise ValueError(f"vector chunks have different dimensions: {sorted(dims)}")
    plan = plan_index(sum(len(c) for c in chunks), dims.pop(), cfg)
    index = INDEX_KINDS.build(plan.kind, plan)
    if not index.is_trained:
        index.cp.seed = seed
        if gpu:
            index.clustering_index = to_gpu(faiss.IndexFlatIP(plan.dim))
        index.train(training_sample(chunks, plan.train_size, seed))
        index.clustering_index = None
    fill_index(index, chunks)
    return index


def exclude_self(
    positions: np.ndarray,
    scores: np.ndarray,
    query_ids: np.ndarray,
    index_ids: np.ndarray,
    k: int,
) -> tuple[pa.ListArray, pa.ListArray]:
    """Per query, up to k (neighbour id, score) from a k+1 search: the query's own id is
    dropped, or the last hit when the own id is missing; FAISS's -1 fillers are dropped."""
    found = (positions >= 0) & np.isfinite(scores)
    ids = index_ids[np.where(found, positions, 0)]
    keep = found & (ids != np.asarray(query_ids)[:, None])
    keep &= np.cumsum(keep, axis=1) <= k
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(axis=1))]), pa.int32())
    neighbour_ids = pa.ListArray.from_arrays(offsets, pa.array(ids[keep], pa.int64()))
    neighbour_scores = pa.ListArray.from_arrays(offsets, pa.array(scores[keep], pa.float32()))
    return neighbour_ids, neighbour_scores


def search_by_list(
    index: faiss.IndexIVFFlat, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """IVF search computed list by list: the queries probing a list are matched against
    it in one BLAS product (`faiss.knn`) and merged in a `faiss.ResultHeap`. Same probes
    and exact scores as `index.search` (near-ties may swap), and 3-5x faster on an idle
    CPU for large query blocks, since the work is matrix products instead of one scan
    per query. (Its many short parallel regions slow down more than `index.search`
    when the cores are oversubscribed by other processes.)

    This is the sequential path of `faiss.contrib.big_batch_search`, which prints to
    stdout at every verbosity level.
    """
    _, probes = index.quantizer.search(rows, index.nprobe)
    flat_probes = probes.ravel()
    order = np.argsort(flat_probes, kind="stable")
    lists, queries = flat_probes[order], order // index.nprobe
    bounds = np.searchsorted(lists, np.arange(index.nlist + 1))
    heap = faiss.ResultHeap(len(rows), k, keep_max=True)
    for number in np.flatnonzero(np.diff(bounds)):
        subset = queries[bounds[number] : bounds[number + 1]]
        list_ids, codes = get_invlist(index.invlists, int(number))
        if len(list_ids) == 0:
            continue
        members = codes.view(np.float32)
        scores, hits = faiss.knn(
            rows[subset], members, min(k, len(members)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result_subset(subset, scores, list_ids[hits])
    heap.finalize()
    return heap.D, heap.I


def search_block(index: faiss.Index, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS (scores, positions) of the top-k of each row; list-batched for CPU IVF."""
    if isinstance(index, faiss.IndexIVFFlat):
        return search_by_list(index, rows, k)
    return index.search(rows, k)


def search_neighbours(
    index: faiss.Index,
    queries: np.ndarray,
    query_ids: np.ndarray,
    index_ids: np.ndarray,
    k: int,
    block: int,
) -> tuple[pa.ListArray, pa.ListArray]:
    """Top-k neighbours of each query (self excluded), by descending inner product.

    `index_ids[i]` is the id of index position i. Queries are normalised and searched
    `block` rows at a time. Returns (neighbour_ids, scores) as aligned list arrays;
    a list is shorter than k only when the index holds fewer candidates.
    """
    if len(queries) != len(query_ids):
        raise ValueError(f"{len(queries)} queries for {len(query_ids)} query ids")
    id_lists: list[pa.Array] = [pa.array([], pa.list_(pa.int64()))]
    score_lists: list[pa.Array] = [pa.array([], pa.list_(pa.float32()))]
    for start in range(0, len(queries), block):
        rows = unit_rows(queries[start : start + block], 0, start)
        scores, positions = search_block(index, rows, k + 1)
        ids, sims = exclude_self(positions, scores, query_ids[start : start + block], index_ids, k)
        id_lists.append(ids)
        score_lists.append(sims)
    return pa.concat_arrays(id_lists), pa.concat_arrays(score_lists)
