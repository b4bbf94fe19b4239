"""Evaluation cache across splits: CIRCO val and test share one gallery, encoded once.

Writes a CIRCO-layout data root (`--images` small JPEGs, COCO-style image-info file,
`annotations/val.json` and `annotations/test.json` with `--queries` queries each, the test
file without ground truth as released) and a random CLIP (`bench_eval.save_tiny_clip`:
32 px, 2+2 layers, `--dim`-d) saved as a checkpoint. Then, through the real path
(`build_retriever("clip", path)`, `evaluate("circo", ...)`) with one fresh cache folder:

1. val, cold: every gallery image decoded, preprocessed and encoded;
2. test: the same gallery images, so their embeddings come from the cache (the cache
   keyed by split encoded them a second time here);
3. val again, cached.

It also times the cache key alone (`gallery_key`: the digests of the gallery and of its
files' size and mtime), which every lookup pays. Prints a Markdown report with the
machine, the command and the date, and writes it to `--results`.

    python bench/bench_eval_cache.py                 # 2,000 images, 100 queries per split
    python bench/bench_eval_cache.py --images 20000
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from bench_eval import machine, save_tiny_clip, write_data_root

from megapairs.evaluation.cache import DECODE_WORKERS, checkpoint_key, gallery_key
from megapairs.evaluation.evaluator import evaluate
from megapairs.evaluation.loaders import load_benchmark
from megapairs.models.base import build_retriever

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "out" / "eval-cache-data"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "out" / "eval_cache.md"
RUNS = (("val, cold", "val"), ("test, gallery cached", "test"), ("val, cached", "val"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="gallery size (2000)")
    parser.add_argument("--queries", type=int, default=100, help="queries per split (100)")
    parser.add_argument("--size", type=int, default=64, help="JPEG side in pixels (64)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (512)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch (64)")
    parser.add_argument("--repeats", type=int, default=3, help="key timings (median of 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed_runs(root: Path, model: Path, workdir: Path, batch_size: int) -> list[dict[str, Any]]:
    """`RUNS` in order with one fresh cache folder; test results go to `workdir/out`."""
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    retriever = build_retriever("clip", str(model))
    key = checkpoint_key(model)
    runs = []
    for name, split in RUNS:
        start = time.perf_counter()
        output = workdir / "out"
        result = evaluate("circo", retriever, key, root, split, None, cache, output, batch_size)
        record = result.record
        runs.append(
            {
                "name": name,
                "seconds": time.perf_counter() - start,
                "parts": record["tasks"][0]["seconds"],
                "cache": {k: record["cache"][k] for k in ("hits", "misses", "encoded_rows")},
                "entry": Path(record["cache"]["lookups"][0]["path"]).name,
                "metrics": result.metrics,
            }
        )
    if runs[0]["metrics"] != runs[2]["metrics"]:
        raise RuntimeError("the cached val evaluation gave other metrics than the cold one")
    return runs


def key_seconds(root: Path, model: Path, repeats: int) -> float:
    """Median seconds of the cache key of the val gallery (what each lookup computes)."""
    (task,) = load_benchmark("circo", root, "val")
    retriever = build_retriever("clip", str(model))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gallery_key(task.gallery, retriever, checkpoint_key(model))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(args: argparse.Namespace, runs: list[dict[str, Any]], key_s: float) -> str:
    lines = [
        f"## Evaluation cache across splits: {args.images:,}-image CIRCO gallery, val + test",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {machine()}; load average at the end {os.getloadavg()[0]:.1f}",
        f"- command: `{shlex.join(['python', 'bench/bench_eval_cache.py', *sys.argv[1:]])}`",
        f"- model: random CLIP, 32 px, 2+2 layers, {args.dim}-d; {args.size} px JPEGs; "
        f"{args.queries} queries per split; batch {args.batch_size}; torch threads "
        f"{args.threads}; image decoding in {DECODE_WORKERS} threads",
        "",
        "| run | total s | gallery s | queries s | gallery rows encoded | cache hits | entry |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        parts = run["parts"]
        lines.append(
            f"| {run['name']} | {run['seconds']:.2f} | {parts.get('gallery', 0):.2f} | "
            f"{parts.get('queries', 0):.2f} | {run['cache']['encoded_rows']:,} | "
            f"{run['cache']['hits']} | `{run['entry']}` |"
        )
    cold, test, cached = (run["seconds"] for run in runs)
    per_image = key_s / args.images * 1e6
    lines += [
        "",
        f"Cold val / test with the gallery cached: **{cold / test:.1f}x**; "
        f"cold val / cached val: **{cold / cached:.1f}x** (same metrics).",
        f"Cache key (gallery + file digests) of {args.images:,} images: {key_s * 1000:.1f} ms "
        f"({per_image:.1f} us per image; median of {args.repeats}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    root = write_data_root(args.workdir / "circo", args, test=True)
    model = save_tiny_clip(args.workdir / f"clip-32px-{args.dim}d", args.dim, 32)
    runs = timed_runs(root, model, args.workdir, args.batch_size)
    text = report(args, runs, key_seconds(root, model, args.repeats))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
