"""kNN benchmark: IVF list storage (float32 vs fp16) on CPU, and the search engines.

Both scenarios use clustered synthetic embeddings (`bench/synthetic.py`, written as
finished embed parts and read back memory-mapped, as the neighbours stage reads them):
on isotropic random data IVF recall means nothing.

  storage  N images x 3 channels (768 / 768 / 512-d). Per channel, IVF with float32
           lists (`IndexIVFFlat`) and with fp16 lists (`IndexIVFScalarQuantizer`), same
           nlist, nprobe and seeded training sample (`build_index`, as the stage builds
           it): index bytes (`faiss.serialize_index`), growth of the process's anonymous
           RSS while building, build seconds, search seconds of `--search-queries`
           queries (list-batched, as the stage searches), and recall@k of
           `--recall-sample` sampled queries against exact search (self excluded).
  engines  N x 768, k=20, on `--device` (cuda: a GPU machine; cpu: a smoke test of the
           same code): the exact torch engine (fp16 on CUDA) over every query, and,
           where FAISS has GPU support (`StandardGpuResources`) or on cpu, FAISS exact
           and IVF over the same vectors; seconds, queries/s and agreement (recall@k of
           each result against the torch engine's lists).

Examples:
  python bench/bench_knn.py storage --n 1000000
  python bench/bench_knn.py storage --n 100000 --search-queries 20000
  python bench/bench_knn.py engines --device cuda --n 1000000
  python bench/bench_knn.py engines --device cpu --n 20000 --queries 2000
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import torch
from machine import cpu_model
from synthetic import SyntheticSpec, write_synthetic_run

from megapairs.config import NeighboursConfig
from megapairs.embeddings import ids_path, shard_paths
from megapairs.neighbours.search import (
    build_index,
    build_torch_index,
    exclude_self,
    plan_index,
    search_neighbours,
    to_gpu,
    unit_rows,
)
from megapairs.neighbours.stage import ShardVectors
from megapairs.runs import RunDir

CHANNEL_DIMS = {"image_semantic": 768, "image_pattern": 768, "caption": 512}
ENGINE_CHANNEL = {"image_semantic": 768}
AGREEMENT_SAMPLE = 20_000  # first queries whose lists are compared between engines
STORAGES = ("flat", "sq_fp16")
MIB = 2**20


# data ------------------------------------------------------------------------------


@dataclass
class Channel:
    """One channel's embeddings as the stage reads them: shards and the ids of their rows."""

    name: str
    vectors: ShardVectors
    ids: np.ndarray


def embeddings(args: argparse.Namespace, dims: dict[str, int]) -> tuple[list[Channel], float]:
    """Write (or reuse) the synthetic run under `args.out`; its channels and the seconds
    spent generating."""
    run = RunDir(Path(args.out) / f"embeddings-{args.n}")
    started = time.perf_counter()
    if not all(shard_paths(run, c) for c in dims):
        spec = SyntheticSpec(size=args.n, dims=dims, shard_size=args.shard_size, seed=args.seed)
        write_synthetic_run(run, spec)
    seconds = time.perf_counter() - started
    channels = []
    for name in dims:
        paths = shard_paths(run, name)
        ids = np.concatenate([np.load(ids_path(p)) for p in paths])
        channels.append(Channel(name, ShardVectors(paths), ids))
    return channels, seconds


def sample_rows(vectors: Sequence[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """Rows `picks` (sorted positions over the concatenated shards) as unit float32."""
    rows, start = [], 0
    for chunk in vectors:
        local = picks[(picks >= start) & (picks < start + len(chunk))] - start
        rows.append(unit_rows(chunk[local]))
        start += len(chunk)
    return np.concatenate(rows)


def exact_lists(channel: Channel, queries: np.ndarray, query_ids: np.ndarray, k: int) -> list:
    """Exact top-k neighbour ids (self excluded) of `queries`, shard by shard."""
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True)
    start = 0
    for chunk in channel.vectors:
        scores, hits = faiss.knn(
            queries, unit_rows(chunk), k + 1, metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(scores, np.where(hits >= 0, hits + start, -1))
        start += len(chunk)
    heap.finalize()
    found, _ = exclude_self(heap.I, heap.D, query_ids, channel.ids, k)
    return found.to_pylist()


def recall(want: list[list[int]], got: list[list[int]]) -> float:
    """Mean share of each query's reference neighbours that `got` holds."""
    return float(np.mean([len(set(w) & set(g)) / len(w) for w, g in zip(want, got, strict=True)]))


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (heap, not memory-mapped files), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# storage scenario ------------------------------------------------------------------


def storage(args: argparse.Namespace) -> dict[str, Any]:
    channels, generate_s = embeddings(args, CHANNEL_DIMS)
    rows = [row for channel in channels for row in storage_rows(channel, args)]
    return {"scenario": "storage", "n": args.n, "k": args.k, "generate_s": generate_s, "rows": rows}


def storage_rows(channel: Channel, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both list storages of one channel, against exact search of sampled queries."""
    picks = np.sort(
        np.random.default_rng(args.seed).choice(len(channel.ids), args.recall_sample, replace=False)
    )
    queries, query_ids = sample_rows(channel.vectors, picks), channel.ids[picks]
    started = time.perf_counter()
    want = exact_lists(channel, queries, query_ids, args.k)
    exact_s = time.perf_counter() - started
    timed = channel.vectors[0][: args.search_queries]
    out = []
    for name in STORAGES:
        cfg = ivf_config(args, name)
        row = measure_build(channel, cfg, args.seed)
        index = row.pop("index")
        got = neighbour_ids(index, queries, query_ids, channel.ids, cfg)
        started = time.perf_counter()
        neighbour_ids(index, timed, channel.ids[: len(timed)], channel.ids, cfg)
        search_s = time.perf_counter() - started
        row.update(
            channel=channel.name,
            dim=index.d,
            recall=recall(want, got),
            search_s=search_s,
            search_queries=len(timed),
            exact_sample_s=exact_s,
        )
        out.append(row)
        del index
        gc.collect()
    return out


def ivf_config(args: argparse.Namespace, name: str) -> NeighboursConfig:
    return NeighboursConfig(
        k=args.k,
        exact_max=1,
        nprobe=args.nprobe,
        query_block=args.query_block,
        ivf_storage=name,
    )


def measure_build(channel: Channel, cfg: NeighboursConfig, seed: int) -> dict[str, Any]:
    """Build time, serialized bytes and anonymous-RSS growth of one index."""
    gc.collect()
    before = rss_anon_mib()
    started = time.perf_counter()
    index = build_index(channel.vectors, cfg, seed)
    build_s = time.perf_counter() - started
    grown = rss_anon_mib() - before
    nbytes = len(faiss.serialize_index(index))
    gc.collect()
    plan = plan_index(len(channel.ids), index.d, cfg)
    return {
        "storage": cfg.ivf_storage,
        "nlist": plan.nlist,
        "nprobe": plan.nprobe,
        "train_size": plan.train_size,
        "build_s": build_s,
        "index_bytes": nbytes,
        "rss_growth_mib": grown,
        "index": index,
    }


def neighbour_ids(
    index: Any, queries: np.ndarray, query_ids: np.ndarray, ids: np.ndarray, cfg: NeighboursConfig
) -> list[list[int]]:
    found, _ = search_neighbours(index, queries, query_ids, ids, cfg.k, cfg.query_block)
    return found.to_pylist()


# engines scenario ------------------------------------------------------------------


def engines(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("engines --device cuda needs a CUDA torch and a GPU; none is visible here")
    (channel,), generate_s = embeddings(args, ENGINE_CHANNEL)
    queries = channel.vectors[0][: args.queries] if args.queries else None
    rows: list[dict[str, Any]] = []
    reference: list[list[int]] = []
    for name, build in engine_builders(args).items():
        row, found = time_engine(name, build, channel, queries, args)
        lists = found.slice(0, AGREEMENT_SAMPLE).to_pylist()
        reference = reference or lists  # the torch engine's exact lists come first
        row["agreement"] = recall(reference, lists)
        rows.append(row)
        del found
        release()
    return {
        "scenario": "engines",
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "",
        "n": args.n,
        "k": args.k,
        "generate_s": generate_s,
        "rows": rows,
    }


def engine_builders(args: argparse.Namespace) -> dict[str, Callable[[ShardVectors], Any]]:
    """Index builders by row name: torch always; FAISS where it can run on `args.device`."""
    device = args.device
    builders: dict[str, Callable[[ShardVectors], Any]] = {
        f"torch exact ({'fp16' if device == 'cuda' else 'fp32'}, {device})": lambda v: (
            build_torch_index(v, device)
        )
    }
    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "cpu" or faiss_gpu:
        move = to_gpu if device == "cuda" else (lambda index: index)
        exact = NeighboursConfig(k=args.k, exact_max=args.n)
        ivf = NeighboursConfig(k=args.k, exact_max=1, nprobe=args.nprobe)
        builders[f"faiss exact ({device})"] = lambda v: move(build_index(v, exact, args.seed))
        builders[f"faiss IVF nprobe {args.nprobe} ({device})"] = lambda v: move(
            build_index(v, ivf, args.seed, gpu=device == "cuda")
        )
    return builders


def time_engine(
    name: str,
    build: Callable[[ShardVectors], Any],
    channel: Channel,
    queries: np.ndarray | None,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], pa.ListArray]:
    """Build one engine's index, then search `queries` (default: every vector); the
    neighbour ids found."""
    started = time.perf_counter()
    index = build(channel.vectors)
    synchronise(args.device)
    build_s = time.perf_counter() - started
    chunks = [queries] if queries is not None else list(channel.vectors)
    found: list[pa.Array] = []
    start = 0
    started = time.perf_counter()
    for chunk in chunks:
        chunk_ids = channel.ids[start : start + len(chunk)]
        ids, _ = search_neighbours(index, chunk, chunk_ids, channel.ids, args.k, args.query_block)
        found.append(ids)
        start += len(chunk)
    synchronise(args.device)
    search_s = time.perf_counter() - started
    row = {"engine": name, "build_s": build_s, "search_s": search_s, "queries": start}
    row["queries_per_s"] = start / search_s
    return row, pa.concat_arrays(found)


def synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# report ----------------------------------------------------------------------------


def markdown(result: dict[str, Any], command: str) -> str:
    head = [
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}; machine: {cpu_model()}"
        + (f", {result['gpu']}" if result.get("gpu") else "")
        + f"; faiss {faiss.__version__}, torch {torch.__version__}",
        f"- command: `{command}`",
        f"- N={result['n']}, k={result['k']}; embeddings generated in {result['generate_s']:.0f} s",
        "",
    ]
    table = storage_table if result["scenario"] == "storage" else engines_table
    return "\n".join(head + table(result["rows"], result["n"]))


def storage_table(rows: list[dict[str, Any]], n: int) -> list[str]:
    lines = [
        "| channel | d | lists | nlist | nprobe | build s | index MiB | per 1M vectors MiB "
        "| RSS growth MiB | search s (queries) | recall@k |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['channel']} | {r['dim']} | {r['storage']} | {r['nlist']} | {r['nprobe']} "
            f"| {r['build_s']:.1f} | {r['index_bytes'] / MIB:.0f} "
            f"| {r['index_bytes'] / MIB * 1e6 / n:.0f} | {r['rss_growth_mib']:.0f} "
            f"| {r['search_s']:.1f} ({r['search_queries']}) | {r['recall']:.4f} |"
        )
    return lines


def engines_table(rows: list[dict[str, Any]], n: int) -> list[str]:
    lines = [
        "| engine | build s | search s | queries | queries/s | recall@k vs torch exact "
        f"(first {AGREEMENT_SAMPLE:,} queries) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['build_s']:.1f} | {r['search_s']:.1f} | {r['queries']} "
            f"| {r['queries_per_s']:,.0f} | {r['agreement']:.4f} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    steps = parser.add_subparsers(dest="scenario", required=True)
    store = steps.add_parser("storage", help="IVF float32 vs fp16 lists on CPU")
    store.add_argument("--n", type=int, default=1_000_000, help="images (default 1000000)")
    store.add_argument("--recall-sample", type=int, default=2000, help="queries checked exactly")
    store.add_argument("--search-queries", type=int, default=20_000, help="queries timed per index")
    eng = steps.add_parser("engines", help="torch exact vs FAISS (GPU with --device cuda)")
    eng.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    eng.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1000000)")
    eng.add_argument("--queries", type=int, default=0, help="queries (default 0: all N)")
    for sub in (store, eng):
        sub.add_argument("--k", type=int, default=20)
        sub.add_argument("--nprobe", type=int, default=16)
        sub.add_argument("--query-block", type=int, default=65_536)
        sub.add_argument("--shard-size", type=int, default=100_000)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", default="bench/out/knn", help="embeddings folder (reused)")
        sub.add_argument("--json", help="also write the result as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = {"storage": storage, "engines": engines}[args.scenario](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(markdown(result, shlex.join(["python", *sys.argv])))


if __name__ == "__main__":
    main()
