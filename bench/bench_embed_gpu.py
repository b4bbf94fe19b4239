"""Embed stage on a GPU vs the model alone: CLIP ViT-L/14 and DINOv2-B/14 image towers.

Random-init encoders of the real architectures (the CLIPConfig sizes of
openai/clip-vit-large-patch14 and the Dinov2Config sizes of facebook/dinov2-base; nothing
is downloaded) are saved with `save_pretrained`, with their image processors, and loaded
back through the project's path (`channels.<ch>.model` = that folder, encoders
`clip-image` and `dinov2`). Over photo-like 512x512 JPEGs in a one-part corpus, per
encoder and with the same batch size, it times:

- forward only: `encode_pixels` over tensors decoded, preprocessed and moved to the GPU
  beforehand (the ceiling);
- embed stage: `LocalRunner.run_stage(EmbedStage)` (read files, decode and preprocess in
  `embed.num_workers` DataLoader workers, encode, write the shard), encoder built outside
  the timing.

Both alternate over `--repeats` rounds (bench/bench_embed.py's helpers); the table gives
img/s and the stage's share of the forward-only rate.

    python bench/bench_embed_gpu.py                       # both encoders, batch 256, 8192 images
    python bench/bench_embed_gpu.py --encoders dinov2-b14 --images 4096
    python bench/bench_embed_gpu.py --dry-run             # tiny models, 64 images, CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from bench_embed import (
    Row,
    image_encoder,
    make_images,
    paired_ratio,
    paired_rounds,
    table,
    time_forward,
    time_pipeline,
    write_corpus,
)
from bench_train_cuda import DRY_RUN_MODEL, MODELS, VOCAB
from machine import cpu_model
from PIL import Image

from megapairs.config import ChannelConfig, EmbedConfig, PipelineConfig
from megapairs.encoders.base import ImageEncoder
from megapairs.encoders.stage import EmbedStage, ImageRecords, image_loader, loading_bars
from megapairs.pipeline.stage import release_worker_state

CHANNEL = "image"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "out" / "embed_gpu.md"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# facebook/dinov2-base's config.json (the rest are Dinov2Config's defaults).
DINOV2_BASE: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
    "patch_size": 14, "image_size": 518,
}  # fmt: skip
DINOV2_TINY: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
    "patch_size": 8, "image_size": 32,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192, help="JPEGs to embed (default 8192)")
    parser.add_argument("--size", type=int, default=512, help="JPEG side in pixels (default 512)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 1,
        help=f"DataLoader workers (default: the CPU count, {os.cpu_count()})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds (default 3)")
    parser.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), default=list(ENCODERS))
    parser.add_argument("--device", default="cuda", help="embed.device (default cuda)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float16", "bfloat16", "float32"],
        default="auto",
        help="embed.dtype (default auto: float16 on cuda)",
    )
    parser.add_argument("--workdir", type=Path, help="images, models, runs (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny models, 64 images, CPU")
    return parser.parse_args(argv)


# models --------------------------------------------------------------------


def save_clip(folder: Path, tiny: bool, device: torch.device) -> None:
    """A random-init CLIPModel of ViT-L/14's sizes (or tiny) and its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    sizes = DRY_RUN_MODEL if tiny else MODELS["l14"]
    text = {**sizes["text"], "vocab_size": VOCAB, "max_position_embeddings": 77}
    text.update(bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    config = CLIPConfig(
        text_config=text, vision_config=sizes["vision"], projection_dim=sizes["projection_dim"]
    )
    side = sizes["vision"]["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        resample=Image.Resampling.BICUBIC,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    save_model(folder, lambda: CLIPModel(config), processor, device)


def save_dinov2(folder: Path, tiny: bool, device: torch.device) -> None:
    """A random-init Dinov2Model of DINOv2-B/14's sizes (or tiny) and its image processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(**(DINOV2_TINY if tiny else DINOV2_BASE))
    crop = 32 if tiny else 224
    processor = BitImageProcessor(
        size={"shortest_edge": crop * 8 // 7},  # 256 for 224, as dinov2-base resizes
        crop_size={"height": crop, "width": crop},
        resample=Image.Resampling.BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    save_model(folder, lambda: Dinov2Model(config), processor, device)


def save_model(
    folder: Path, build: Callable[[], Any], processor: Any, device: torch.device
) -> None:
    """Initialise on `device` (fast on a GPU), save weights and processor into `folder`."""
    torch.manual_seed(0)
    with device:
        model = build()
    with loading_bars(False):
        model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model


@dataclass(frozen=True)
class EncoderSpec:
    name: str  # shown in the table
    encoder: str  # the project's encoder name
    save: Callable[[Path, bool, torch.device], None]


ENCODERS = {
    "clip-l14": EncoderSpec("CLIP ViT-L/14", "clip-image", save_clip),
    "dinov2-b14": EncoderSpec("DINOv2-B/14", "dinov2", save_dinov2),
}


# inputs --------------------------------------------------------------------


def make_images_parallel(folder: Path, count: int, size: int, processes: int) -> list[Path]:
    """bench_embed's photo-like JPEGs, one seeded chunk folder per process (files kept)."""
    chunks = max(1, min(processes, count // 64))
    counts = [count // chunks + (index < count % chunks) for index in range(chunks)]
    with ProcessPoolExecutor(chunks) as pool:
        jobs = [
            pool.submit(make_images, folder / f"chunk-{index:02d}", n, size, index)
            for index, n in enumerate(counts)
        ]
        return [path for job in jobs for path in job.result()]


def predecode(stage: EmbedStage, encoder: ImageEncoder, paths: list[Path]) -> torch.Tensor:
    """Every image decoded and preprocessed by the stage's own loader, on the encoder's
    device in its dtype."""
    records = ImageRecords(
        list(range(len(paths))),
        [str(path) for path in paths],
        {},
        encoder.preprocessor,
        encoder.draft_size,
        stage.config.ingest.max_pixels,
    )
    loader = image_loader(records, stage.config.embed, pin_memory=encoder.device.type == "cuda")
    batches = [b.pixels.to(encoder.device, encoder.dtype) for b in loader if b.pixels is not None]
    pixels = torch.cat(batches)
    if len(pixels) != len(paths):
        raise RuntimeError(f"{len(paths) - len(pixels)} images failed to load")
    return pixels


# measurements --------------------------------------------------------------


def make_stage(args: argparse.Namespace, spec: EncoderSpec, model: Path) -> EmbedStage:
    channel = ChannelConfig(encoder=spec.encoder, model=str(model))
    embed = EmbedConfig(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        dtype=args.dtype,
    )
    return EmbedStage(PipelineConfig(channels={CHANNEL: channel}, embed=embed), CHANNEL, False)


def measure(
    args: argparse.Namespace, key: str, paths: list[Path], corpus: Path, workdir: Path
) -> tuple[list[Row], str]:
    """Forward-only and embed-stage rows of one encoder, and its description."""
    spec = ENCODERS[key]
    model = workdir / "models" / key
    spec.save(model, args.dry_run, torch.device(args.device))
    stage = make_stage(args, spec, model)
    encoder = image_encoder(stage)
    pixels = predecode(stage, encoder, paths)
    times = paired_rounds(
        {
            "forward": lambda: time_forward(encoder, pixels, args.batch_size),
            "stage": lambda: time_pipeline(stage, corpus, workdir),
        },
        args.repeats,
    )
    name = f"tiny {spec.name} (dry run)" if args.dry_run else spec.name
    processor = type(encoder.preprocessor.processor).__name__  # type: ignore[attr-defined]
    dtype = str(encoder.dtype).removeprefix("torch.")
    about = f"{name}: `{spec.encoder}`, {encoder.dim}-d, {processor}, {dtype}"
    count, batch = len(paths), args.batch_size
    forward_s, stage_s = (statistics.median(times[k]) for k in ("forward", "stage"))
    ratio = paired_ratio(times["forward"], times["stage"])
    rows = [
        Row(f"{name}: forward only (tensors on {encoder.device})", batch, "-", count,
            forward_s, 1.0),
        Row(f"{name}: embed stage (JPEG files)", batch, args.num_workers, count,
            stage_s, ratio),
    ]  # fmt: skip
    return rows, about


def release() -> None:
    """Free cached encoders and GPU memory before the next encoder."""
    release_worker_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# report --------------------------------------------------------------------


def device_line(device: str) -> str:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
        return f"{name}, CUDA {torch.version.cuda}"
    return f"CPU only ({cpu_model()})"


def report(args: argparse.Namespace, rows: list[Row], about: list[str]) -> str:
    import transformers

    command = shlex.join(["python", "bench/bench_embed_gpu.py", *sys.argv[1:]])
    lines = [
        "## Embed stage vs forward only on the GPU (bench/bench_embed_gpu.py)",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_line(args.device)}; host: {cpu_model()}, {os.cpu_count()} CPUs",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Pillow {Image.__version__}",
        *(f"- encoder: {line} (random init, saved and loaded back)" for line in about),
        f"- input: {args.images} JPEGs of {args.size}x{args.size} (quality 90), one corpus part;"
        f" batch {args.batch_size}, {args.num_workers} DataLoader workers",
        f"- method: {args.repeats} paired rounds; seconds are medians, the ratio is the median"
        " of per-round ratios; encoders are built outside the timing",
        f"- command: `{command}`",
        "",
        table(rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.images, args.batch_size = min(args.images, 64), min(args.batch_size, 16)
        args.repeats, args.device = min(args.repeats, 2), "cpu"
    elif torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-embed-gpu-"))
    paths = make_images_parallel(workdir / "images", args.images, args.size, os.cpu_count() or 1)
    corpus = write_corpus(workdir / "corpus-run", paths).root
    rows: list[Row] = []
    about: list[str] = []
    for key in args.encoders:
        encoder_rows, description = measure(args, key, paths, corpus, workdir)
        release()
        rows += encoder_rows
        about.append(description)
        forward, stage = encoder_rows
        print(
            f"{key}: forward {forward.rate:.0f} img/s, stage {stage.rate:.0f} img/s "
            f"({stage.ratio:.0%})",
            file=sys.stderr,
        )
    text = report(args, rows, about)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text + "\n")
    print(f"wrote {args.results}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
