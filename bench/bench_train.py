"""Gradient caching: memory of a batch-2048 step vs the largest plain step in the same memory.

MMRet-CLIP's training step (`megapairs.training.trainer.contrastive_step`, the code the
trainer runs: score-fusion queries, image candidates, InfoNCE over 1 positive + 4 hard
negatives per query, AdamW update) on a small random CLIP, on the CPU:

1. a gradient-cached step at batch 2048 (`--chunk` items per forward) sets the memory
   budget: its peak resident memory;
2. plain steps (one forward/backward over the batch) at growing batch sizes find the
   largest batch whose peak stays within that budget (doubling, then bisection);
3. both are timed (queries per second, after a warm-up step), then run again alternately
   `--rounds` times; the table gives each one's medians over its runs.

Each configuration runs in its own subprocess, and its peak memory is that process's
`ru_maxrss` (peak resident set: weights, optimizer state, the batch's input tensors and the
step's activations and gradients); `above baseline` leaves out what every configuration
shares, the process's RSS once the model and optimizer are built (Python, torch, weights).
A fresh process per configuration keeps one measurement's peak from hiding another's. The
batch tensors are random (pixels and token ids): the step, not image decoding, is measured.
One torch thread per process by default: on a shared machine, OpenMP threads that spin-wait
for a busy core slow a step down by orders of magnitude.

    python bench/bench_train.py                 # defaults: a few minutes on 2 CPU cores
    python bench/bench_train.py --hidden 128 --layers 4 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from machine import cpu_model

NEGATIVES = 4  # the paper's CLIP run: 1 positive + 4 hard negatives per query
TEXT_LENGTH = 16  # tokens per instruction (random byte tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048, help="gradient-cached batch")
    parser.add_argument("--chunk", type=int, default=64, help="items per cached forward")
    parser.add_argument("--hidden", type=int, default=64, help="width of both towers")
    parser.add_argument("--layers", type=int, default=2, help="layers of both towers")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: no spin-waits)"
    )
    parser.add_argument("--start-batch", type=int, default=32, help="first plain batch tried")
    parser.add_argument(
        "--rounds", type=int, default=2, help="extra alternating runs of the two final configs"
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# the measured process -----------------------------------------------------------------------


@dataclass
class Measurement:
    """One configuration's step: memory in MiB, time in seconds."""

    batch: int
    chunk: int
    baseline_mib: float
    peak_mib: float
    step_s: float

    @property
    def queries_per_s(self) -> float:
        return self.batch / self.step_s


def save_small_clip(path: Path, args: argparse.Namespace) -> None:
    """A random CLIP of the given size (both towers alike), saved as a CLIP checkpoint."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tower = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 32),
        "intermediate_size": 4 * args.hidden,
    }
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text = {"vocab_size": len(tokens), "max_position_embeddings": 77}
    text.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = CLIPConfig(
        text_config={**tower, **text},
        vision_config={**tower, "image_size": args.image_size, "patch_size": args.patch},
        projection_dim=args.hidden,
    )
    side = {"height": args.image_size, "width": args.image_size}
    processor = CLIPImageProcessor(size={"shortest_edge": args.image_size}, crop_size=side)
    torch.manual_seed(0)
    for part in (CLIPModel(config), processor, tokenizer):
        part.save_pretrained(path)


def random_batch(batch: int, image_size: int) -> Any:
    from megapairs.training.adapters import TrainBatch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch * (2 + NEGATIVES), 3, image_size, image_size, generator=generator)
    return TrainBatch(
        queries={
            "pixel_values": pixels[:batch],
            "input_ids": torch.randint(0, 256, (batch, TEXT_LENGTH), generator=generator),
            "attention_mask": torch.ones(batch, TEXT_LENGTH, dtype=torch.long),
        },
        candidates={"pixel_values": pixels[batch:]},
    )


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_dir: str, batch: int, chunk: int, steps: int) -> Measurement:
    """Run `steps` + 1 training steps of one configuration in this process."""
    from accelerate import Accelerator

    from megapairs.training.adapters import CLIPAdapter, ContrastiveModule
    from megapairs.training.config import ModelSettings
    from megapairs.training.losses import InfoNCELoss
    from megapairs.training.trainer import contrastive_step

    accelerator = Accelerator(mixed_precision="no")
    adapter = CLIPAdapter.load(model_dir, ModelSettings(name_or_path=model_dir))
    adapter.model.train()
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=5e-6)
    module, optimizer = accelerator.prepare(ContrastiveModule(adapter), optimizer)
    baseline = current_rss_mib()  # before the batch: its input tensors count as step memory
    data = random_batch(batch, adapter.model.clip.config.vision_config.image_size)
    loss = InfoNCELoss(0.02)
    times = []
    for _ in range(steps + 1):  # the first step warms up (and creates the AdamW state)
        started = time.perf_counter()
        contrastive_step(module, data, loss, accelerator, chunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Measurement(batch, chunk, baseline, peak, statistics.median(times[1:]))


# the driver ---------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace, model_dir: Path, batch: int, chunk: int) -> Measurement:
    """`measure` in a fresh subprocess (its own peak RSS)."""
    spec = json.dumps({"model": str(model_dir), "batch": batch, "chunk": chunk})
    command = [sys.executable, __file__, "--worker", spec, "--steps", str(args.steps)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr[-3000:]}")
    result = Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))
    kind = f"cached (chunk {chunk})" if chunk else "plain"
    print(
        f"  {kind:>18} batch {batch:5d}: peak {result.peak_mib:7.0f} MiB, "
        f"{result.step_s:6.2f} s/step, {result.queries_per_s:7.1f} queries/s",
        file=sys.stderr,
    )
    return result


def largest_plain_batch(
    args: argparse.Namespace, model_dir: Path, budget_mib: float
) -> tuple[Measurement, Measurement | None]:
    """The largest plain batch within `budget_mib` (and the smallest one found above it)."""
    fits: Measurement | None = None
    over: Measurement | None = None
    batch = args.start_batch
    while over is None and batch <= args.batch:  # doubling
        result = run_worker(args, model_dir, batch, 0)
        if result.peak_mib <= budget_mib:
            fits, batch = result, batch * 2
        else:
            over = result
    if fits is None:
        raise RuntimeError(f"even a plain batch of {args.start_batch} exceeds {budget_mib} MiB")
    while over is not None and over.batch - fits.batch > max(8, fits.batch // 16):  # bisection
        result = run_worker(args, model_dir, (fits.batch + over.batch) // 2, 0)
        if result.peak_mib <= budget_mib:
            fits = result
        else:
            over = result
    return fits, over


def median(runs: list[Measurement]) -> Measurement:
    """One configuration's runs summarised by their medians."""
    return Measurement(
        batch=runs[0].batch,
        chunk=runs[0].chunk,
        baseline_mib=statistics.median(r.baseline_mib for r in runs),
        peak_mib=statistics.median(r.peak_mib for r in runs),
        step_s=statistics.median(r.step_s for r in runs),
    )


def report(
    args: argparse.Namespace,
    cached: Measurement,
    plain: Measurement,
    over: Measurement | None,
    parameters: int,
) -> str:
    rows = [("gradient cached", cached), ("plain, largest batch in budget", plain)]
    if over is not None:
        rows.append(("plain, smallest batch over budget", over))
    lines = [
        "## Gradient caching: batch-2048 step vs the largest plain step in the same memory",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} torch threads",
        f"- command: `{shlex.join(['python', 'bench/bench_train.py', *sys.argv[1:]])}`",
        f"- model: random CLIP, both towers {args.layers} layers x {args.hidden} wide, "
        f"{args.image_size} px images, patch {args.patch}, {parameters / 1e6:.2f} M parameters; "
        f"1 positive + {NEGATIVES} negatives per query; AdamW; fp32; medians of "
        f"{args.rounds + 1} runs each",
        "",
        "| step | batch (queries) | chunk | peak RSS (MiB) | above baseline (MiB) "
        "| s / step | queries / s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        chunk = str(m.chunk) if m.chunk else "-"
        above = m.peak_mib - m.baseline_mib
        lines.append(
            f"| {name} | {m.batch} | {chunk} | {m.peak_mib:.0f} | {above:.0f} "
            f"| {m.step_s:.2f} | {m.queries_per_s:.1f} |"
        )
    ratio = cached.batch / plain.batch
    lines += [
        "",
        f"Within the {cached.peak_mib:.0f} MiB the cached batch-{cached.batch} step peaks at, a "
        f"plain step fits at most {plain.batch} queries: gradient caching trains a "
        f"{ratio:.0f}x larger contrastive batch in the same memory, at "
        f"{cached.queries_per_s / plain.queries_per_s:.2f}x the plain step's queries/s "
        "(it runs every forward twice).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        result = measure(spec["model"], spec["batch"], spec["chunk"], args.steps)
        print(json.dumps(asdict(result)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        model_dir = Path(folder) / "clip"
        save_small_clip(model_dir, args)
        from transformers import CLIPModel

        parameters = sum(p.numel() for p in CLIPModel.from_pretrained(model_dir).parameters())
        print(f"gradient-cached step at batch {args.batch}:", file=sys.stderr)
        cached = [run_worker(args, model_dir, args.batch, args.chunk)]
        print(f"plain steps up to {cached[0].peak_mib:.0f} MiB:", file=sys.stderr)
        fits, over = largest_plain_batch(args, model_dir, cached[0].peak_mib)
        plain = [fits]
        print(f"{args.rounds} more alternating rounds of both:", file=sys.stderr)
        for _ in range(args.rounds):  # load from other processes then hits both alike
            cached.append(run_worker(args, model_dir, args.batch, args.chunk))
            plain.append(run_worker(args, model_dir, fits.batch, 0))
    print(report(args, median(cached), median(plain), over, parameters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
