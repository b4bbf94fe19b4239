"""Real-size MMRet-CLIP training steps on a GPU: CLIP-B/16 and CLIP-L/14, batch 2048.

The trainer's own step (`megapairs.training.trainer.contrastive_step`: score-fusion queries,
image candidates, InfoNCE with 1 positive + 4 hard negatives per query, gradient caching)
plus the AdamW update, under accelerate with bf16 autocast (fp32 weights), on random-init
models built from the CLIPConfig sizes of openai/clip-vit-base-patch16 and
openai/clip-vit-large-patch14: nothing is downloaded. Inputs are random 224 px pixels and
32-token instructions in pinned host memory, moved to the GPU by the step as in training
(image decoding is not measured). Each (model, chunk size) is timed over `--steps` steps
after a warm-up step; the table gives queries/s (median step) and peak CUDA memory
(`torch.cuda.max_memory_allocated`, and reserved).

    python bench/bench_train_cuda.py                          # B/16 and L/14, batch 2048
    python bench/bench_train_cuda.py --models b16 --chunks 128 256 512
    python bench/bench_train_cuda.py --dry-run                # tiny sizes on the CPU
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

NEGATIVES = 4
TEXT_LENGTH = 32
VOCAB = 49408

# Sizes of the OpenAI checkpoints (their config.json), per tower:
# hidden, layers, heads, MLP width (+ patch for the vision tower), and the projection size.
MODELS: dict[str, dict[str, Any]] = {
    "b16": {
        "name": "CLIP ViT-B/16",
        "vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "patch_size": 16, "image_size": 224},
        "text": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                 "intermediate_size": 2048},
        "projection_dim": 512,
        "chunks": [256],
    },
    "l14": {
        "name": "CLIP ViT-L/14",
        "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "patch_size": 14, "image_size": 224},
        "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072},
        "projection_dim": 768,
        "chunks": [128],
    },
}  # fmt: skip
DRY_RUN_MODEL: dict[str, Any] = {
    "name": "tiny CLIP (dry run)",
    "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "patch_size": 8, "image_size": 32},
    "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64},
    "projection_dim": 16,
    "chunks": [8],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["b16", "l14"])
    parser.add_argument("--batch", type=int, default=2048, help="queries per step")
    parser.add_argument("--chunks", type=int, nargs="+", help="chunk sizes (default per model)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, batch 16, CPU")
    return parser.parse_args(argv)


@dataclass
class Timing:
    model: str
    chunk: int
    batch: int
    step_s: float
    peak_gib: float
    reserved_gib: float

    @property
    def queries_per_s(self) -> float:
        return self.batch / self.step_s


def build(sizes: dict[str, Any], device: torch.device) -> Any:
    """A random-init MMRet-CLIP of `sizes` behind the trainer's CLIP adapter."""
    from transformers import CLIPConfig, CLIPModel

    from megapairs.models.clip import MMRetCLIP
    from megapairs.training.adapters import CLIPAdapter
    from megapairs.training.config import ModelSettings

    text = {**sizes["text"], "vocab_size": VOCAB, "max_position_embeddings": 77}
    text.update(bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    config = CLIPConfig(
        text_config=text, vision_config=sizes["vision"], projection_dim=sizes["projection_dim"]
    )
    torch.manual_seed(0)
    clip = CLIPModel(config).to(device)
    clip.logit_scale.requires_grad_(False)  # as CLIPAdapter.load does: the loss never uses it
    model = MMRetCLIP(clip, image_processor=None, tokenizer=None, name=sizes["name"])
    return CLIPAdapter(model.train(), ModelSettings(name_or_path=sizes["name"]))


def random_batch(batch: int, image_size: int, pin: bool) -> Any:
    from megapairs.training.adapters import TrainBatch

    generator = torch.Generator().manual_seed(0)
    images = batch * (2 + NEGATIVES)
    pixels = torch.rand(images, 3, image_size, image_size, generator=generator) * 4 - 2
    data = TrainBatch(
        queries={
            "pixel_values": pixels[:batch],
            "input_ids": torch.randint(0, VOCAB - 2, (batch, TEXT_LENGTH), generator=generator),
            "attention_mask": torch.ones(batch, TEXT_LENGTH, dtype=torch.long),
        },
        candidates={"pixel_values": pixels[batch:]},
    )
    return data.pin_memory() if pin else data


def time_steps(sizes: dict[str, Any], chunk: int, args: argparse.Namespace) -> Timing:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from megapairs.training.adapters import ContrastiveModule
    from megapairs.training.losses import InfoNCELoss
    from megapairs.training.trainer import contrastive_step

    AcceleratorState._reset_state()  # a new mixed-precision setting per model is allowed
    accelerator = Accelerator(mixed_precision=args.precision, cpu=args.dry_run)
    device = accelerator.device
    adapter = build(sizes, device)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=5e-6)
    module, optimizer = accelerator.prepare(ContrastiveModule(adapter), optimizer)
    data = random_batch(args.batch, sizes["vision"]["image_size"], device.type == "cuda")
    loss = InfoNCELoss(0.02)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        contrastive_step(module, data, loss, accelerator, chunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    peak = reserved = 0.0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
    del module, optimizer, adapter, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Timing(sizes["name"], chunk, args.batch, statistics.median(times[1:]), peak, reserved)


def device_name(dry_run: bool) -> str:
    if not dry_run and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()})"


def table(rows: list[Timing], args: argparse.Namespace) -> str:
    lines = [
        f"## MMRet-CLIP training steps, batch {args.batch}, gradient caching, {args.precision}",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name(args.dry_run)}; torch {torch.__version__}",
        f"- command: `{shlex.join(['python', 'bench/bench_train_cuda.py', *sys.argv[1:]])}`",
        f"- 1 positive + {NEGATIVES} hard negatives per query, {TEXT_LENGTH}-token instructions,"
        " random-init weights, AdamW; median of the timed steps",
        "",
        "| model | chunk | s / step | queries / s | peak allocated (GiB) | peak reserved (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.chunk} | {r.step_s:.2f} | {r.queries_per_s:.0f} "
        f"| {r.peak_gib:.1f} | {r.reserved_gib:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.batch, args.steps = min(args.batch, 16), 1
        plan = [(DRY_RUN_MODEL, args.chunks or DRY_RUN_MODEL["chunks"])]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
            return 2
        plan = [(MODELS[name], args.chunks or MODELS[name]["chunks"]) for name in args.models]
    rows = []
    for sizes, chunks in plan:
        for chunk in chunks:
            try:
                rows.append(time_steps(sizes, chunk, args))
            except torch.cuda.OutOfMemoryError:
                print(f"{sizes['name']} chunk {chunk}: out of memory", file=sys.stderr)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            row = rows[-1]
            print(
                f"{row.model} chunk {row.chunk}: {row.queries_per_s:.0f} queries/s, "
                f"peak {row.peak_gib:.1f} GiB",
                file=sys.stderr,
            )
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
