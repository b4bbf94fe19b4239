"""Benchmark of the neighbours and mine stages on clustered synthetic embeddings.

Scenarios (each stage set runs in its own subprocess, so its peak RSS is its own):

  compare  N images x 3 channels: the neighbours stages with exact search and with
           IVF over the same embeddings, then `mine` on both; reports wall times,
           the IVF speed-up, recall@k of IVF against exact per channel and how many
           of the exact run's pairs the IVF run also mined.
  scale    N images x 3 channels end to end (neighbours with the default search
           choice, then mine); reports wall time per stage and peak RSS.

Examples:
  python bench/bench_mining.py compare --n 100000
  python bench/bench_mining.py scale --n 1000000 --out bench/out/scale-1m
  python bench/bench_mining.py compare --n 10000 --set neighbours.nprobe=4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import SyntheticSpec, write_synthetic_run

from megapairs.config import PipelineConfig, apply_override
from megapairs.embeddings import read_shard, shard_paths
from megapairs.mining.stage import MineStage
from megapairs.neighbours.search import unit_rows
from megapairs.neighbours.stage import NeighboursStage, neighbours_folder
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.stage import Stage
from megapairs.runs import RunDir
from megapairs.schemas import PAIRS_DIR

CHANNEL_DIMS = {"image_semantic": 768, "image_pattern": 768, "caption": 512}
CONFIG_FILE = "config.json"


def bench_config(overrides: list[str]) -> PipelineConfig:
    """The benchmark's pipeline config: the three channels, paper-like mining settings."""
    data: dict[str, Any] = {
        "seed": 0,
        "channels": {c: {"encoder": "synthetic", "window": [0.8, 0.96]} for c in CHANNEL_DIMS},
        "neighbours": {"k": 20},
        "mine": {"max_targets": 5, "num_hard_negatives": 5},
    }
    for override in overrides:
        apply_override(data, override)
    return PipelineConfig.model_validate(data)


# subprocess steps ------------------------------------------------------------------


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Write the synthetic embeddings of `args.n` images into run dir `args.run`."""
    spec = SyntheticSpec(
        size=args.n,
        dims=CHANNEL_DIMS,
        clusters=args.clusters,
        sigma=_pair(args.sigma),
        shard_size=args.shard_size,
        seed=args.seed,
    )
    started = time.perf_counter()
    parts = write_synthetic_run(RunDir(args.run), spec)
    return {"parts": len(parts), "seconds": time.perf_counter() - started}


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    return low, high


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Run the neighbours stages (and mine) over `args.run` with its saved config."""
    run = RunDir(args.run)
    config = PipelineConfig.model_validate_json((run.root / CONFIG_FILE).read_text())
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    stages: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.stages.split(","):
        if name not in STAGE_SETS:
            raise ValueError(f"unknown stage set {name!r}; known: {', '.join(STAGE_SETS)}")
        for make_stage in STAGE_SETS[name](config):
            stage = make_stage()  # one at a time: a stage's index is freed with it
            t0 = time.perf_counter()
            result = runner.run_stage(stage)
            stages[stage.name] = {
                "seconds": time.perf_counter() - t0,
                "counts": result.counts,
                "peak_rss_gib_so_far": _peak_rss_gib(),
            }
            del stage
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": _peak_rss_gib(),
        "stages": stages,
    }


def _neighbours_stages(config: PipelineConfig) -> list[Callable[[], Stage]]:
    return [partial(NeighboursStage, config, c) for c in config.enabled_channels()]


def _mine_stages(config: PipelineConfig) -> list[Callable[[], Stage]]:
    return [partial(MineStage, config)]


STAGE_SETS = {"neighbours": _neighbours_stages, "mine": _mine_stages}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _child(step: str, *argv: str) -> dict[str, Any]:
    """Run a step of this script in a fresh Python process; return its JSON result."""
    command = [sys.executable, __file__, step, *argv]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# scenarios -------------------------------------------------------------------------


def embeddings_run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if root.exists():
        shutil.rmtree(root)
    return _child(
        "generate",
        f"--run={root}",
        f"--n={args.n}",
        f"--clusters={args.clusters}",
        f"--sigma={args.sigma}",
        f"--shard-size={args.shard_size}",
        f"--seed={args.seed}",
    )


def linked_copy(source: Path, target: Path, config: PipelineConfig) -> None:
    """A run dir sharing `source`'s embedding files (hard links) with its own config."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=os.link)
    (target / CONFIG_FILE).write_text(config.model_dump_json())


def compare(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out or f"bench/out/compare-{args.n}")
    generated = embeddings_run(args, out / "embeddings")
    ivf_max = f"neighbours.exact_max={min(args.n - 1, args.exact_max)}"
    configs = {"exact": bench_config([*args.set, f"neighbours.exact_max={args.n}"])}
    for name, overrides in parse_variants(args.variant):
        configs[name] = bench_config([*args.set, ivf_max, *overrides])
    runs = {}
    for name, config in configs.items():
        linked_copy(out / "embeddings", out / name, config)
        runs[name] = _child("pipeline", f"--run={out / name}", "--stages=neighbours,mine")
    variants = {name: _variant_quality(out, name, runs) for name in runs if name != "exact"}
    return {
        "scenario": "compare",
        "n": args.n,
        "k": configs["exact"].neighbours.k,
        "generate_seconds": generated["seconds"],
        "exact_neighbours_seconds": _neighbours_seconds(runs["exact"]),
        "exact_mine_seconds": runs["exact"]["stages"]["mine"]["seconds"],
        "variants": variants,
        "runs": runs,
    }


def parse_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`name:key=value key=value` -> (name, overrides); none given -> one default `ivf`."""
    variants = []
    for spec in specs or ["ivf:"]:
        name, sep, rest = spec.partition(":")
        if not sep or not name or name == "exact":
            raise ValueError(f"--variant {spec!r} must look like 'name:key=value key=value'")
        variants.append((name, rest.split()))
    return variants


def _variant_quality(out: Path, name: str, runs: dict[str, Any]) -> dict[str, Any]:
    seconds = _neighbours_seconds(runs[name])
    return {
        "neighbours_seconds": seconds,
        "speedup": _neighbours_seconds(runs["exact"]) / seconds,
        "mine_seconds": runs[name]["stages"]["mine"]["seconds"],
        "recall_at_k": {c: recall_at_k(out / "exact", out / name, c) for c in CHANNEL_DIMS},
        "pairs": pairs_overlap(out / "exact", out / name),
        "index": _index_info(out / name),
    }


def scale(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out or f"bench/out/scale-{args.n}")
    generated = embeddings_run(args, out / "embeddings")
    run_root = out / "run"
    linked_copy(out / "embeddings", run_root, bench_config(args.set))
    started = time.perf_counter()
    result = _child("pipeline", f"--run={run_root}", "--stages=neighbours,mine")
    wall = time.perf_counter() - started
    k = bench_config(args.set).neighbours.k
    return {
        "scenario": "scale",
        "n": args.n,
        "generate_seconds": generated["seconds"],
        "wall_seconds": wall,
        "pipeline": result,
        "index": _index_info(run_root),
        "recall_sample": args.recall_sample,
        "sampled_recall_at_k": {
            c: sampled_recall(run_root, c, k, args.recall_sample, args.seed) for c in CHANNEL_DIMS
        },
    }


def _neighbours_seconds(result: dict[str, Any]) -> float:
    return sum(s["seconds"] for name, s in result["stages"].items() if name.startswith("neighb"))


def _index_info(run: Path) -> dict[str, Any]:
    infos = {}
    for channel in CHANNEL_DIMS:
        info = json.loads((run / neighbours_folder(channel) / "index.json").read_text())
        infos[channel] = {
            k: info[k] for k in ("kind", "nlist", "nprobe", "train_size", "build_seconds")
        }
    return infos


# quality measures ------------------------------------------------------------------


def _neighbour_lists(run: Path, channel: str) -> tuple[np.ndarray, list[list[int]]]:
    files = sorted((run / neighbours_folder(channel)).glob("part-*.parquet"))
    tables = [pq.read_table(f) for f in files]
    ids = np.concatenate([t["id"].to_numpy() for t in tables])
    return ids, [row for t in tables for row in t["neighbour_ids"].to_pylist()]


def sampled_recall(run: Path, channel: str, k: int, sample: int, seed: int) -> float:
    """recall@k of a run's neighbour lists for `sample` random queries, against exact
    top-k computed shard by shard (brute force, so it works at any N)."""
    paths = shard_paths(RunDir(run), channel)
    all_ids = np.concatenate([read_shard(p)[0] for p in paths])
    picked = np.sort(np.random.default_rng(seed).choice(len(all_ids), sample, replace=False))
    queries, query_ids, start = [], [], 0
    for path in paths:
        ids, vectors = read_shard(path)
        local = picked[(picked >= start) & (picked < start + len(ids))] - start
        queries.append(vectors[local])
        query_ids.append(ids[local])
        start += len(ids)
    query_ids_all = np.concatenate(query_ids)
    rows = unit_rows(np.concatenate(queries))
    heap = faiss.ResultHeap(len(rows), k + 1, keep_max=True)
    for path in paths:
        ids, vectors = read_shard(path)
        scores, hits = faiss.knn(rows, unit_rows(vectors), k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(hits >= 0, ids[hits], -1))
    heap.finalize()
    exact = {
        q: [i for i in row if i != q][:k] for q, row in zip(query_ids_all, heap.I, strict=True)
    }
    found = _lists_of(run, channel, query_ids_all)
    return float(np.mean([len(set(exact[q]) & set(found[q])) / len(exact[q]) for q in exact]))


def _lists_of(run: Path, channel: str, query_ids: np.ndarray) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    wanted = pa.array(query_ids)
    for path in sorted((run / neighbours_folder(channel)).glob("part-*.parquet")):
        table = pq.read_table(path)
        table = table.filter(pc.is_in(table["id"], value_set=wanted))
        found.update(zip(table["id"].to_pylist(), table["neighbour_ids"].to_pylist(), strict=True))
    return found


def recall_at_k(exact_run: Path, approx_run: Path, channel: str) -> float:
    """Mean share of each query's exact neighbours that the approximate search found."""
    exact_ids, exact = _neighbour_lists(exact_run, channel)
    approx_ids, approx = _neighbour_lists(approx_run, channel)
    if not np.array_equal(exact_ids, approx_ids):
        raise ValueError(f"{channel}: the two runs hold different queries")
    shares = [len(set(e) & set(a)) / len(e) for e, a in zip(exact, approx, strict=True) if e]
    return float(np.mean(shares))


def pairs_overlap(exact_run: Path, approx_run: Path) -> dict[str, int]:
    """Pairs (query, target) of each run and how many of the IVF run's are in the exact run's."""

    def pairs(run: Path) -> set[tuple[int, int]]:
        found: set[tuple[int, int]] = set()
        for path in sorted((run / PAIRS_DIR).glob("part-*.parquet")):
            table = pq.read_table(path, columns=["query_id", "target_id"])
            found.update(
                zip(table["query_id"].to_pylist(), table["target_id"].to_pylist(), strict=True)
            )
        return found

    exact, approx = pairs(exact_run), pairs(approx_run)
    return {"exact_pairs": len(exact), "ivf_pairs": len(approx), "shared": len(exact & approx)}


# report ----------------------------------------------------------------------------


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}; machine: "
        f"{os.cpu_count()} CPU ({platform.machine()}), {platform.python_version()}",
        f"- command: `{command}`",
    ]
    if result["scenario"] == "compare":
        lines += [
            f"- neighbours of 3 channels, N={result['n']}, k={result['k']}: exact "
            f"{result['exact_neighbours_seconds']:.1f} s (mine after it "
            f"{result['exact_mine_seconds']:.1f} s)",
            "",
            "| variant | nlist | nprobe | train | neighbours s | speed-up | recall@k (per channel) "
            "| mine s | pairs (exact / ivf / shared) |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_variant_row(name, v) for name, v in result["variants"].items()),
        ]
    else:
        pipe = result["pipeline"]
        lines += [
            f"- N={result['n']}: pipeline wall {pipe['seconds']:.0f} s, peak RSS "
            f"{pipe['peak_rss_gib']:.2f} GiB (generation {result['generate_seconds']:.0f} s, "
            "separate process)",
            *(
                f"  - {name}: {s['seconds']:.0f} s, peak RSS so far "
                f"{s['peak_rss_gib_so_far']:.2f} GiB, counts {s['counts']}"
                for name, s in pipe["stages"].items()
            ),
            f"- index: {result['index']}",
            f"- recall@k of {result['recall_sample']} sampled queries vs brute force: "
            + ", ".join(f"{c} {r:.4f}" for c, r in result["sampled_recall_at_k"].items()),
        ]
    return "\n".join(lines)


def _variant_row(name: str, variant: dict[str, Any]) -> str:
    index = next(iter(variant["index"].values()))
    recall = " / ".join(f"{r:.4f}" for r in variant["recall_at_k"].values())
    pairs = variant["pairs"]
    return (
        f"| {name} | {index['nlist']} | {index['nprobe']} | {index['train_size']} "
        f"| {variant['neighbours_seconds']:.1f} | {variant['speedup']:.1f}x | {recall} "
        f"| {variant['mine_seconds']:.1f} "
        f"| {pairs['exact_pairs']} / {pairs['ivf_pairs']} / {pairs['shared']} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    for name, text in (
        ("compare", "exact vs IVF, same embeddings"),
        ("scale", "end to end, peak RSS"),
    ):
        sub = steps.add_parser(name, help=text)
        sub.add_argument(
            "--n",
            type=int,
            default=100_000 if name == "compare" else 1_000_000,
            help="images (default 100000 for compare, 1000000 for scale)",
        )
        sub.add_argument("--out", help="output folder (default bench/out/<scenario>-<n>)")
        sub.add_argument(
            "--exact-max", type=int, default=1, help="neighbours.exact_max of the IVF run"
        )
        _data_options(sub)
        sub.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
        )
        sub.add_argument("--json", help="also write the result as JSON here")
        if name == "scale":
            sub.add_argument(
                "--recall-sample",
                type=int,
                default=2000,
                help="queries whose recall@k is checked against brute force (after the run)",
            )
        if name == "compare":
            sub.add_argument(
                "--variant",
                action="append",
                default=[],
                metavar="NAME:KEY=VALUE ...",
                help="an IVF run with these overrides (repeatable; default one run 'ivf:')",
            )
    gen = steps.add_parser("generate", help="(internal) write synthetic embeddings")
    gen.add_argument("--run", required=True)
    gen.add_argument("--n", type=int, required=True)
    _data_options(gen)
    pipe = steps.add_parser("pipeline", help="(internal) run stages over a prepared run dir")
    pipe.add_argument("--run", required=True)
    pipe.add_argument(
        "--stages", default="neighbours,mine", help="comma-separated: neighbours, mine"
    )
    return parser.parse_args(argv)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clusters", type=int, default=3000, help="synthetic clusters per channel")
    parser.add_argument(
        "--sigma",
        default="0.3,0.6",
        help="range of per-cluster noise scales (larger: looser clusters, harder for IVF)",
    )
    parser.add_argument("--shard-size", type=int, default=100_000, help="images per part")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steps = {"generate": generate, "pipeline": pipeline, "compare": compare, "scale": scale}
    result = steps[args.step](args)
    if args.step in ("generate", "pipeline"):
        print(json.dumps(result))
        return
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(markdown(result, shlex.join(["python", *sys.argv])))


if __name__ == "__main__":
    main()
