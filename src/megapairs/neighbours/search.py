"""k-nearest-neighbour search over L2-normalised vectors (inner product = cosine).

Two engines return the same (scores, positions) blocks, so self exclusion is shared:

- FAISS: channels of up to `neighbours.exact_max` vectors get exact search
  (`IndexFlatIP`); larger ones an inverted-file index trained on a seeded sample (a
  rebuilt index is the same index) whose lists hold float32 vectors (`IndexIVFFlat`,
  `ivf_storage: flat`) or fp16 codes (`IndexIVFScalarQuantizer`, `sq_fp16`: half the
  memory; the embeddings are stored as float16 anyway).
- torch: always exact, as blocked matrix products and top-k over the channel held as
  one tensor (float32 on CPU; float16 on CUDA, with the top candidates rescored in
  float32).

Indexes are filled chunk by chunk (chunks may be memory-mapped shards) and queries are
searched in blocks, so memory holds the index plus one block, never a second full
float32 copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import faiss
import numpy as np
import pyarrow as pa
from faiss.contrib.inspect_tools import get_invlist

from megapairs.config import NeighboursConfig
from megapairs.embeddings import l2_normalise
from megapairs.registry import Registry

if TYPE_CHECKING:
    import torch

# IVF sizing rules used when the config leaves nlist / train_size at 0, tuned for a
# self-join (every vector is a query), where k-means training is a large share of
# the cost (bench/bench_mining.py; bench/RESULTS.md).
NLIST_PER_SQRT_N = 2.0
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per list
TRAIN_POINTS_PER_LIST = 40
ADD_BLOCK = 65_536  # rows converted to float32 at a time while filling an index

# torch engine: bytes of one block of scores (queries x channel) per device type, and
# the extra candidates taken from float16 scores before rescoring them in float32
SCORE_BYTES = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}
RESCORE_MARGIN = 16
# extra candidates every search returns beyond k + 1, all rescored exactly in a fixed
# order so that near-ties at the k-th place resolve the same way whatever the BLAS
# threads, engine or device; and rows per rescoring step (bounds its memory)
CANDIDATE_MARGIN = 4
RESCORE_ROWS = 1024
FILL_SCORE = -np.finfo(np.float32).max  # FAISS's score beside a -1 (missing) position

INDEX_KINDS: Registry[faiss.Index] = Registry("index kind")
IVF_STORAGES: Registry[faiss.IndexIVF] = Registry("IVF storage")

# progress(done, total): query blocks searched so far
BlockProgress = Callable[[int, int], None]
# index positions (1-D int64) -> their stored vectors as float32 rows
Reconstruct = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class IndexPlan:
    """Which index a channel gets: `exact` or `ivf`, with the IVF sizes and list storage."""

    kind: str
    size: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    train_size: int = 0
    storage: str = "flat"

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
    nprobe = min(cfg.nprobe, nlist)
    return IndexPlan("ivf", size, dim, nlist, nprobe, train_size, cfg.ivf_storage)


@INDEX_KINDS.register("exact")
def _exact_index(plan: IndexPlan) -> faiss.Index:
    return faiss.IndexFlatIP(plan.dim)


@INDEX_KINDS.register("ivf")
def _ivf_index(plan: IndexPlan) -> faiss.Index:
    index = IVF_STORAGES.build(plan.storage, faiss.IndexFlatIP(plan.dim), plan)
    index.nprobe = plan.nprobe
    return index


@IVF_STORAGES.register("flat")
def _ivf_flat(quantizer: faiss.Index, plan: IndexPlan) -> faiss.IndexIVF:
    return faiss.IndexIVFFlat(quantizer, plan.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)


@IVF_STORAGES.register("sq_fp16")
def _ivf_sq_fp16(quantizer: faiss.Index, plan: IndexPlan) -> faiss.IndexIVF:
    fp16 = faiss.ScalarQuantizer.QT_fp16
    return faiss.IndexIVFScalarQuantizer(
        quantizer, plan.dim, plan.nlist, fp16, faiss.METRIC_INNER_PRODUCT
    )


# where the search runs -----------------------------------------------------------


def resolve_gpu(mode: str) -> bool:
    """Whether to use FAISS on GPU for `neighbours.gpu` = auto / never / always."""
    gpus = faiss.get_num_gpus()
    if mode == "always" and gpus == 0:
        raise RuntimeError(
            "neighbours.gpu=always but FAISS sees no GPU (faiss.get_num_gpus() == 0); "
            "install faiss-gpu on a machine with CUDA, or set neighbours.gpu=auto"
        )
    return mode != "never" and gpus > 0


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_torch_gpu(mode: str) -> bool:
    """Whether the torch engine runs on CUDA for `neighbours.gpu` = auto / never / always."""
    cuda = torch_has_cuda()
    if mode == "always" and not cuda:
        raise RuntimeError(
            "neighbours.gpu=always but torch sees no CUDA device; "
            "run on a GPU machine with a CUDA torch, or set neighbours.gpu=auto"
        )
    return mode != "never" and cuda


GPU_RESOLVERS: dict[str, Callable[[str], bool]] = {
    "faiss": resolve_gpu,
    "torch": resolve_torch_gpu,
}


def resolve_engine(engine: str, gpu_mode: str) -> tuple[str, bool]:
    """(engine, on GPU) on this machine for `neighbours.engine` and `neighbours.gpu`:
    `auto` is FAISS, except where torch sees CUDA and FAISS sees no GPU (no faiss-gpu)."""
    if engine == "auto":
        gpu_torch = gpu_mode != "never" and faiss.get_num_gpus() == 0 and torch_has_cuda()
        engine = "torch" if gpu_torch else "faiss"
    if engine not in GPU_RESOLVERS:
        raise ValueError(f"unknown neighbours engine {engine!r}; choose auto, faiss or torch")
    return engine, GPU_RESOLVERS[engine](gpu_mode)


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of a CPU index on all visible GPUs."""
    return faiss.index_cpu_to_all_gpus(index)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the lists probed per query of an IVF index (no-op for exact indexes)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(nprobe, index.nlist)


# building ------------------------------------------------------------------------


def unit_rows(block: np.ndarray, chunk: int = 0, first_row: int = 0) -> np.ndarray:
    """`block` as contiguous unit-length float32 rows; NonFiniteVectors on NaN/inf."""
    rows = np.ascontiguousarray(l2_normalise(block))
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise NonFiniteVectors(chunk, first_row + int(np.argmin(finite)))
    return rows


def as_chunks(vectors: np.ndarray | Sequence[np.ndarray]) -> tuple[Sequence[np.ndarray], int]:
    """`vectors` as a sequence of chunks, and their common dimension."""
    chunks = [vectors] if isinstance(vectors, np.ndarray) else vectors
    dims = {c.shape[1] for c in chunks}
    if len(dims) != 1:
        raise ValueError(f"vector chunks have different dimensions: {sorted(dims)}")
    return chunks, dims.pop()


def unit_blocks(chunks: Sequence[np.ndarray], block: int = ADD_BLOCK) -> Iterator[np.ndarray]:
    """Every chunk's rows in order, as unit float32 blocks of up to `block` rows."""
    for number, chunk in enumerate(chunks):
        for start in range(0, len(chunk), block):
            yield unit_rows(chunk[start : start + block], number, start)


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
    for rows in unit_blocks(chunks, block):
        index.add(rows)


def build_index(
    vectors: np.ndarray | Sequence[np.ndarray], cfg: NeighboursConfig, seed: int, gpu: bool = False
) -> faiss.Index:
    """A CPU index over the rows of `vectors` (one array or a sequence of chunks, e.g.
    lazily memory-mapped float16 shards: each chunk is fetched when used and may be
    freed after); position i in the index is row i of the chunks concatenated. With
    `gpu`, IVF training (k-means) runs on the GPUs."""
    chunks, dim = as_chunks(vectors)
    plan = plan_index(sum(len(c) for c in chunks), dim, cfg)
    index = INDEX_KINDS.build(plan.kind, plan)
    if isinstance(index, faiss.IndexIVF) and not index.is_trained:
        index.cp.seed = seed
        if gpu:
            index.clustering_index = to_gpu(faiss.IndexFlatIP(plan.dim))
        index.train(training_sample(chunks, plan.train_size, seed))
        index.clustering_index = None
    fill_index(index, chunks)
    return index


# the torch engine ----------------------------------------------------------------


@dataclass
class TorchIndex:
    """A channel's unit vectors as one tensor, searched exactly by blocked products."""

    vectors: torch.Tensor  # (N, d): float32 on CPU, float16 on CUDA
    score_bytes: int  # memory for one block of scores

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def rescored(self) -> bool:
        """True when candidates come from reduced-precision scores and are rescored."""
        import torch

        return self.vectors.dtype != torch.float32


def build_torch_index(
    vectors: np.ndarray | Sequence[np.ndarray],
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    score_bytes: int | None = None,
) -> TorchIndex:
    """The rows of `vectors` (an array or chunks, as for `build_index`) normalised into
    one tensor on `device`: float16 on CUDA, float32 elsewhere unless `dtype` says."""
    import torch

    chunks, dim = as_chunks(vectors)
    target = torch.device(device)
    dtype = dtype or (torch.float16 if target.type == "cuda" else torch.float32)
    tensor = torch.empty((sum(len(c) for c in chunks), dim), dtype=dtype, device=target)
    row = 0
    for rows in unit_blocks(chunks):
        tensor[row : row + len(rows)] = torch.from_numpy(rows).to(target, dtype)
        row += len(rows)
    return TorchIndex(tensor, score_bytes or SCORE_BYTES.get(target.type, SCORE_BYTES["cpu"]))


def torch_search(index: TorchIndex, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, positions) of the top-k of each row, shaped and padded as FAISS's
    `Index.search`. Order: score descending, then position ascending; among exact ties at
    the k-th score the lowest positions are kept (FAISS's pick among such ties depends on
    its scan order). Rows go in steps whose score block fits `index.score_bytes`."""
    step = _rows_per_step(index, k)
    found = [_torch_top(index, rows[s : s + step], k) for s in range(0, len(rows), step)]
    if not found:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _rows_per_step(index: TorchIndex, k: int) -> int:
    """Query rows whose scores (and rescored candidates) fit in `index.score_bytes`."""
    vectors = index.vectors
    per_row = vectors.shape[0] * vectors.element_size()
    if index.rescored:
        per_row = max(per_row, (k + RESCORE_MARGIN) * vectors.shape[1] * 4)
    return max(1, index.score_bytes // max(1, per_row))


def _torch_top(index: TorchIndex, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    vectors = index.vectors
    queries = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(vectors.device)
    with torch.inference_mode():
        scores = queries.to(vectors.dtype) @ vectors.T
        width = min(k + (RESCORE_MARGIN if index.rescored else 0), index.ntotal)
        values, positions = scores.topk(width, dim=1)
        if index.rescored:
            values = _rescore(vectors, positions, queries)
        else:
            values, positions = _lowest_positions_on_ties(scores, values, positions)
    return _ordered(values.float().cpu().numpy(), positions.cpu().numpy(), k)


def _rescore(vectors: torch.Tensor, positions: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """float32 inner products of each query with its candidate rows."""
    candidates = vectors[positions].float()  # (rows, width, d)
    return (candidates @ queries.unsqueeze(2)).squeeze(2)


def _lowest_positions_on_ties(
    scores: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Redo the rows whose last kept score ties with more rows than topk kept, keeping
    the lowest positions of that tie (topk picks among ties arbitrarily)."""
    width = values.shape[1]
    crowded = ((scores >= values[:, -1:]).sum(dim=1) > width).nonzero().flatten().tolist()
    if not crowded:
        return values, positions
    values, positions = values.clone(), positions.clone()
    for row in crowded:
        at_least = (scores[row] >= values[row, -1]).nonzero().flatten()  # ascending
        order = scores[row, at_least].sort(descending=True, stable=True).indices[:width]
        values[row], positions[row] = scores[row, at_least[order]], at_least[order]
    return values, positions


def _ordered(values: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k by (score descending, position ascending), padded to k like FAISS."""
    order = np.lexsort((positions, -values), axis=1)[:, :k]
    values = np.take_along_axis(values, order, axis=1).astype(np.float32)
    positions = np.take_along_axis(positions, order, axis=1).astype(np.int64)
    missing = k - values.shape[1]
    if missing > 0:
        values = np.pad(values, ((0, 0), (0, missing)), constant_values=FILL_SCORE)
        positions = np.pad(positions, ((0, 0), (0, missing)), constant_values=-1)
    return values, positions


# searching -----------------------------------------------------------------------


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


def list_batched(index: faiss.Index) -> TypeGuard[faiss.IndexIVF]:
    """True for CPU IVF indexes whose lists `search_by_list` can decode (flat, fp16)."""
    if isinstance(index, faiss.IndexIVFFlat):
        return True
    return (
        isinstance(index, faiss.IndexIVFScalarQuantizer)
        and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    )


def list_decoder(index: faiss.IndexIVF) -> Callable[[int, np.ndarray], np.ndarray]:
    """A function (list number, codes) -> the list's vectors as float32 rows."""
    if isinstance(index, faiss.IndexIVFFlat):
        return lambda number, codes: codes.view(np.float32)
    centroids = index.quantizer.reconstruct_n(0, index.nlist) if index.by_residual else None

    def decode_fp16(number: int, codes: np.ndarray) -> np.ndarray:
        rows = codes.view(np.float16).astype(np.float32)
        return rows if centroids is None else rows + centroids[number]

    return decode_fp16


def search_by_list(
    index: faiss.IndexIVF, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """IVF search computed list by list: the queries probing a list are matched against
    its decoded vectors in one BLAS product (`faiss.knn`) and merged in a
    `faiss.ResultHeap`. Same probes and scores as `index.search` (up to float rounding,
    so near-ties may swap), and 3-5x faster on an idle CPU for large query blocks, since
    the work is matrix products instead of one scan per query. (Its many short parallel
    regions slow down more than `index.search` when the cores are oversubscribed.)

    This is the sequential path of `faiss.contrib.big_batch_search`, which prints to
    stdout at every verbosity level.
    """
    _, probes = index.quantizer.search(rows, index.nprobe)
    flat_probes = probes.ravel()
    order = np.argsort(flat_probes, kind="stable")
    lists, queries = flat_probes[order], order // index.nprobe
    bounds = np.searchsorted(lists, np.arange(index.nlist + 1))
    heap = faiss.ResultHeap(len(rows), k, keep_max=True)
    decode = list_decoder(index)
    for number in np.flatnonzero(np.diff(bounds)):
        subset = queries[bounds[number] : bounds[number + 1]]
        list_ids, codes = get_invlist(index.invlists, int(number))
        if len(list_ids) == 0:
            continue
        members = decode(int(number), codes)
        scores, hits = faiss.knn(
            rows[subset], members, min(k, len(members)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result_subset(subset, scores, list_ids[hits])
    heap.finalize()
    return heap.D, heap.I


def search_block(
    index: faiss.Index | TorchIndex, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the top-k of each row: torch, list-batched CPU IVF, or FAISS."""
    if isinstance(index, TorchIndex):
        return torch_search(index, rows, k)
    if list_batched(index):
        return search_by_list(index, rows, k)
    return index.search(rows, k)


def search_neighbours(
    index: faiss.Index | TorchIndex,
    queries: np.ndarray,
    query_ids: np.ndarray,
    index_ids: np.ndarray,
    k: int,
    block: int,
    progress: BlockProgress | None = None,
    reconstruct: Reconstruct | None = None,
) -> tuple[pa.ListArray, pa.ListArray]:
    """Top-k neighbours of each query (self excluded), by descending inner product.

    `index_ids[i]` is the id of index position i. Queries are normalised and searched
    `block` rows at a time (`progress(done, total)` after each block); each block's
    candidates are rescored exactly (`rescore`, vectors from `reconstruct`, by default
    read back from `index`), so scores and near-tie order do not depend on BLAS threads,
    engine or device. Returns (neighbour_ids, scores) as aligned list arrays; a list is
    shorter than k only when the index holds fewer candidates.
    """
    if len(queries) != len(query_ids):
        raise ValueError(f"{len(queries)} queries for {len(query_ids)} query ids")
    reconstruct = reconstruct or reconstructor(index)
    id_lists: list[pa.Array] = [pa.array([], pa.list_(pa.int64()))]
    score_lists: list[pa.Array] = [pa.array([], pa.list_(pa.float32()))]
    starts = range(0, len(queries), block)
    for done, start in enumerate(starts, 1):
        rows = unit_rows(queries[start : start + block], 0, start)
        _, positions = search_block(index, rows, k + 1 + CANDIDATE_MARGIN)
        scores, positions = rescore(rows, positions, reconstruct)
        block_ids = query_ids[start : start + block]
        ids, sims = exclude_self(positions[:, : k + 1], scores[:, : k + 1], block_ids, index_ids, k)
        id_lists.append(ids)
        score_lists.append(sims)
        if progress is not None:
            progress(done, len(starts))
    return pa.concat_arrays(id_lists), pa.concat_arrays(score_lists)


# exact, thread-independent rescoring ----------------------------------------------


def reconstructor(index: faiss.Index | TorchIndex) -> Reconstruct:
    """A function reading stored vectors back by position: the torch engine's tensor, or
    a CPU FAISS index (IVF indexes get a direct map, N int64s, on first use)."""
    if isinstance(index, TorchIndex):
        return lambda positions: torch_rows(index, positions)
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.make_direct_map()
    return lambda positions: index.reconstruct_batch(positions).astype(np.float32, copy=False)


def torch_rows(index: TorchIndex, positions: np.ndarray) -> np.ndarray:
    """Rows of the torch engine's tensor as float32 numpy rows."""
    import torch

    picked = torch.from_numpy(positions).to(index.vectors.device)
    return index.vectors[picked].float().cpu().numpy()


def rescore(
    rows: np.ndarray, positions: np.ndarray, reconstruct: Reconstruct
) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of each row with its candidate positions, summed in float64 without
    BLAS and rounded to float32 (the same bits whatever the threads or device), then
    each row ordered by score descending, position ascending; -1 (missing) positions
    stay last with FILL_SCORE."""
    scores = np.full(positions.shape, FILL_SCORE, np.float32)
    for start in range(0, len(rows), RESCORE_ROWS):
        stop = start + RESCORE_ROWS
        scores[start:stop] = _exact_scores(rows[start:stop], positions[start:stop], reconstruct)
    missing_last = np.where(positions >= 0, positions, np.iinfo(np.int64).max)
    order = np.lexsort((missing_last, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)


def _exact_scores(rows: np.ndarray, positions: np.ndarray, reconstruct: Reconstruct) -> np.ndarray:
    scores = np.full(positions.shape, FILL_SCORE, np.float32)
    found = positions >= 0
    if found.any():
        which_row = np.nonzero(found)[0]
        vectors = reconstruct(positions[found].astype(np.int64)).astype(np.float64)
        exact = np.einsum("ij,ij->i", rows[which_row].astype(np.float64), vectors)
        scores[found] = exact.astype(np.float32)  # float64 sums round alike in any order
    return scores
