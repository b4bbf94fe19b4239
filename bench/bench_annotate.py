"""Annotation throughput: the `openai` backend at concurrency 64 vs sequential.

Starts the loopback chat-completions server of the tests (`tests/chat_server.py`)
in its own process with injected latency (~200 ms per request, jitter) and errors
(5% of requests answer 500 or 429 with Retry-After), writes a run directory of
small JPEGs and mined pairs, and runs the real `AnnotateStage` through
`LocalRunner` twice against the same server: once with `annotate.concurrency=1`
on a small slice of the pairs (sequential), once with `--concurrency` on all of
them. Reports pairs per second of both, their ratio, and checks that no pair was
lost (pairs = annotated + failed, and failures are listed by reason).

    python bench/bench_annotate.py                       # 1500 pairs at 64, 30 sequential
    python bench/bench_annotate.py --pairs 3000 --sequential-pairs 50
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from megapairs.annotation.stage import AnnotateStage
from megapairs.config import PipelineConfig
from megapairs.pipeline.runner import LocalRunner
from megapairs.runs import RunDir, part_name, write_table
from megapairs.schemas import CORPUS_DIR, CORPUS_SCHEMA, PAIRS_DIR, PAIRS_SCHEMA, record_id

SERVER = Path(__file__).resolve().parents[1] / "tests" / "chat_server.py"
WORDS = ["red", "blue", "green", "small", "large", "dog", "cat", "car", "tree", "house"]
WORDS += ["beach", "street", "cup", "chair", "lamp"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1500, help="pairs for the concurrent run")
    parser.add_argument("--sequential-pairs", type=int, default=30)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--error-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=6, replace=False))


def build_run(root: Path, images: int, pairs: int, seed: int) -> RunDir:
    """One corpus part of JPEG files and one part of random pairs, marked as finished."""
    rng = np.random.default_rng(seed)
    run, source = RunDir(root / "run"), root / "images"
    source.mkdir(parents=True)
    rows = []
    for index in range(images):
        path = source / f"{index}.jpg"
        path.write_bytes(jpeg(seed * 100_000 + index))
        rows.append(
            {"id": record_id(0, index), "key": path.name, "uri": str(path), "path": str(path)}
            | {"width": 128, "height": 96, "source_format": "JPEG", "source_mode": "RGB"}
            | {"caption": caption(rng), "has_caption": True, "sha256": "", "pixel_sha256": ""}
        )
    part = part_name(0)
    write_table(run.part_path(CORPUS_DIR, part), pa.Table.from_pylist(rows, CORPUS_SCHEMA))
    run.mark_done("ingest", part, {"kept": images})
    write_table(run.part_path(PAIRS_DIR, part), random_pairs(rng, images, pairs))
    run.mark_done("mine", part, {"pairs": pairs})
    return run


def random_pairs(rng: np.random.Generator, images: int, count: int) -> pa.Table:
    queries = rng.integers(images, size=count)
    targets = (queries + rng.integers(1, images, size=count)) % images
    rows = [
        {
            "pair_id": f"{q}-{t}-{i}",
            "query_id": int(q),
            "target_id": int(t),
            "rank": 0,
            "channels": ["image_semantic"],
            "channel_scores": [0.9],
            "hard_negative_ids": [],
            "hard_negative_topped_up": 0,
        }
        for i, (q, t) in enumerate(zip(queries, targets, strict=True))
    ]
    return pa.Table.from_pylist(rows, PAIRS_SCHEMA)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, str(SERVER), "--port", "0", "--latency", str(args.latency)]
    command += ["--jitter", str(args.jitter), "--error-rate", str(args.error_rate)]
    command += ["--seed", str(args.seed)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def annotate_config(base_url: str, concurrency: int, seed: int) -> PipelineConfig:
    endpoint = {"base_url": base_url, "timeout": 10.0}
    return PipelineConfig.model_validate(
        {
            "seed": seed,
            "annotate": {
                "backend": "openai",
                "concurrency": concurrency,
                "max_retries": 5,
                "backoff_initial": 0.2,
                "backoff_max": 2.0,
                "describer": {"model": "bench-vlm", **endpoint},
                "instructor": {"model": "bench-llm", **endpoint},
            },
        }
    )


@dataclass
class Measured:
    pairs: int
    seconds: float
    counts: dict[str, int]

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds


def measure(
    root: Path, args: argparse.Namespace, base_url: str, pairs: int, concurrency: int
) -> Measured:
    run = build_run(root, args.images, pairs, args.seed)
    config = annotate_config(base_url, concurrency, args.seed)
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    started = time.perf_counter()
    result = runner.run_stage(AnnotateStage(config, progress=False))
    return Measured(pairs, time.perf_counter() - started, result.counts)


def lost(measured: Measured) -> int:
    counts = measured.counts
    return counts["pairs"] - counts["annotated"] - counts["failed"]


def report(args: argparse.Namespace, sequential: Measured, concurrent: Measured) -> str:
    ratio = concurrent.rate / sequential.rate
    failures = {
        key: value
        for key, value in concurrent.counts.items()
        if key.startswith("failed_") and key != "failed_transient" and value
    }
    lines = [
        f"date {datetime.now(UTC):%Y-%m-%d}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}",
        "command: python " + " ".join(shlex.quote(a) for a in sys.argv),
        f"server: latency {args.latency} s +- {args.jitter}, "
        f"error rate {args.error_rate} "
        "(500 / 429 with Retry-After), separate process",
        "| run | concurrency | pairs | seconds | pairs/s | HTTP attempts | annotated | failed "
        "| lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m, c in (("sequential", sequential, 1), ("concurrent", concurrent, args.concurrency)):
        counts = m.counts
        lines.append(
            f"| {name} | {c} | {m.pairs} | {m.seconds:.1f} | {m.rate:.2f} | "
            f"{counts['http_attempts']} | {counts['annotated']} | {counts['failed']} | {lost(m)} |"
        )
    lines.append(f"speed-up: {ratio:.1f}x (pairs/s at {args.concurrency} vs 1)")
    lines.append(f"failures after retries: {failures or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server, base_url = start_server(args)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sequential = measure(Path(tmp) / "seq", args, base_url, args.sequential_pairs, 1)
            concurrent = measure(Path(tmp) / "conc", args, base_url, args.pairs, args.concurrency)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(report(args, sequential, concurrent))
    if args.json:
        results = {"sequential": sequential.__dict__, "concurrent": concurrent.__dict__}
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if lost(sequential) or lost(concurrent) else 0


if __name__ == "__main__":
    sys.exit(main())
