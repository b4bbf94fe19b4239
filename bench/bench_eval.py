"""Evaluation at scale: a 100k-image gallery evaluated cold and cached, and its search
exact vs IVF (vs GPU when FAISS sees one).

Writes a CIRCO-layout data root (COCO-style image-info file, `{id:012d}.jpg` images,
`annotations/val.json` with `--queries` queries) of `--images` small JPEGs drawn around
a few hundred colour-field prototypes (so the embeddings are clustered, as real ones
are), and a random CLIP at 32 px (2 layers, `--dim`-d projection) saved as a checkpoint.
Then, through the real path (`build_retriever("clip", path)`, `evaluate("circo", ...)`):

1. cold: a fresh cache folder, so every gallery image is decoded, preprocessed and
   encoded (and written to the cache in chunks);
2. cached: the same evaluation again; only the queries are encoded;
3. search alone on the cached gallery embeddings and the queries' embeddings: exact
   `IndexFlatIP` (the evaluator's `search`), IVF (`IndexIVFFlat`, inner product, trained
   on a seeded sample; build and search timed apart, recall@k against exact), and the
   GPU flat index when available.

The data root and model are kept in `--workdir` and reused by later runs with the same
sizes. Prints a Markdown table with the machine, the command and the date, and writes it
to `--results`.

    python bench/bench_eval.py                              # 100k images, 2000 queries
    python bench/bench_eval.py --images 10000 --queries 500 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from machine import cpu_model
from PIL import Image

from megapairs.evaluation.cache import DECODE_WORKERS, GalleryCache, checkpoint_key, encode_items
from megapairs.evaluation.evaluator import BENCHMARKS, SEARCH_MARGIN, evaluate, search
from megapairs.evaluation.loaders import load_benchmark
from megapairs.models.base import build_retriever
from megapairs.neighbours.search import default_nlist

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "out" / "eval-data"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "out" / "eval.md"
HIDDEN_FIELDS = ("target_img_id", "gt_img_ids", "semantic_aspects")  # absent from test.json
IMAGE_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
IMAGE_FOLDER = "COCO2017_unlabeled/unlabeled2017"
PROTOTYPES = 400
WORDS = [
    "red",
    "blue",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "beach",
    "snow",
    "night",
    "two",
    "small",
    "large",
    "old",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="gallery size (100000)")
    parser.add_argument("--queries", type=int, default=2000, help="queries (2000)")
    parser.add_argument("--size", type=int, default=32, help="JPEG side in pixels (32)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (512)")
    parser.add_argument("--batch-size", type=int, default=256, help="encoding batch (256)")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists probed (16)")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: ~2 sqrt(N))")
    parser.add_argument("--repeats", type=int, default=3, help="search timings (median of 3)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared CPU, spinning OpenMP threads cost ~7x)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# inputs -------------------------------------------------------------------------


def write_data_root(root: Path, args: argparse.Namespace, test: bool = False) -> Path:
    """A CIRCO-layout data root (val, and with `test` a test split without ground truth
    over the same gallery); reused when `data.json` says it has these sizes."""
    spec = {"images": args.images, "queries": args.queries, "size": args.size, "seed": args.seed}
    spec["test"] = test
    marker = root / "data.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    clusters = write_images(root / IMAGE_FOLDER, args.images, args.size, rng)
    info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(args.images)]}
    write_json(root / IMAGE_INFO, info)
    write_json(root / "annotations" / "val.json", circo_queries(clusters, args.queries, rng))
    if test:
        queries = circo_queries(clusters, args.queries, rng)
        hidden = [{k: v for k, v in q.items() if k not in HIDDEN_FIELDS} for q in queries]
        write_json(root / "annotations" / "test.json", hidden)
    write_json(marker, spec)
    return root


def write_images(folder: Path, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` JPEGs: a prototype's 4x4 colour field, upscaled, plus noise. Returns each
    image's prototype."""
    folder.mkdir(parents=True, exist_ok=True)
    prototypes = rng.integers(0, 256, (PROTOTYPES, 4, 4, 3)).astype(np.float32)
    clusters = rng.integers(0, PROTOTYPES, count)
    for index, cluster in enumerate(clusters):
        field = prototypes[cluster] + rng.normal(0, 24, (4, 4, 3))
        small = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        image = small.resize((size, size), Image.BILINEAR)
        image.save(folder / f"{index:012d}.jpg", quality=90)
    return clusters


def circo_queries(clusters: np.ndarray, count: int, rng: np.random.Generator) -> list[dict]:
    """Queries with 1-4 ground truths from the reference's prototype cluster."""
    members: dict[int, list[int]] = {}
    for image_id, cluster in enumerate(clusters.tolist()):
        members.setdefault(cluster, []).append(image_id)
    queries = []
    for query_id in range(count):
        reference = int(rng.integers(0, len(clusters)))
        pool = [i for i in members[int(clusters[reference])] if i != reference] or [reference]
        gts = rng.choice(pool, size=min(len(pool), int(rng.integers(1, 5))), replace=False)
        queries.append(
            {
                "id": query_id,
                "reference_img_id": reference,
                "target_img_id": int(gts[0]),
                "gt_img_ids": [int(g) for g in gts],
                "relative_caption": " ".join(rng.choice(WORDS, 4)),
                "shared_concept": " ".join(rng.choice(WORDS, 2)),
                "semantic_aspects": [],
            }
        )
    return queries


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def save_tiny_clip(path: Path, dim: int, size: int) -> Path:
    """A random CLIP (2 layers of 32 per tower, 8 px patches) with a `dim`-d projection."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if (path / "config.json").exists():
        return path
    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    tower["intermediate_size"] = 64
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text = {"vocab_size": len(tokens), "max_position_embeddings": 77}
    text.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = CLIPConfig(
        text_config={**tower, **text},
        vision_config={**tower, "image_size": size, "patch_size": 8},
        projection_dim=dim,
    )
    side = {"height": size, "width": size}
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=side)
    torch.manual_seed(0)
    for part in (CLIPModel(config), processor, tokenizer):
        part.save_pretrained(path)
    return path


# measurements -------------------------------------------------------------------


def timed_evaluations(root: Path, model: Path, cache: Path, batch_size: int) -> dict[str, Any]:
    """Cold then cached `evaluate("circo", ...)` with a fresh cache folder."""
    shutil.rmtree(cache, ignore_errors=True)
    retriever = build_retriever("clip", str(model))
    key = checkpoint_key(model)
    runs = {}
    for name in ("cold", "cached"):
        start = time.perf_counter()
        result = evaluate(
            "circo", retriever, key, root, "val", cache_dir=cache, batch_size=batch_size
        )
        runs[name] = {
            "seconds": time.perf_counter() - start,
            "parts": result.record["tasks"][0]["seconds"],
            "cache": {k: result.record["cache"][k] for k in ("hits", "misses", "encoded_rows")},
            "mAP@5": result.metrics["mAP@5"],
        }
    if runs["cold"]["mAP@5"] != runs["cached"]["mAP@5"]:
        raise RuntimeError("the cached evaluation gave other metrics than the cold one")
    return runs


def embeddings(
    root: Path, model: Path, cache: Path, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The cached gallery embeddings and the queries' embeddings."""
    (task,) = load_benchmark("circo", root, "val")
    retriever = build_retriever("clip", str(model))
    _, gallery = GalleryCache(cache).embeddings(task, retriever, checkpoint_key(model), batch_size)
    queries = encode_items(task.queries, retriever.encode_queries, batch_size)
    return gallery, queries


def median_seconds(function: Any, repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def search_timings(
    gallery: np.ndarray, queries: np.ndarray, args: argparse.Namespace, k: int
) -> list[dict[str, Any]]:
    rows = []
    exact_s, (_, exact) = median_seconds(
        lambda: search(gallery, queries, k, gpu=False), args.repeats
    )
    rows.append(
        {"method": "exact IndexFlatIP (CPU)", "build_s": 0.0, "search_s": exact_s, "recall": 1.0}
    )
    nlist = args.nlist or default_nlist(len(gallery))
    build_start = time.perf_counter()
    index = ivf_index(gallery, nlist, args.seed)
    build_s = time.perf_counter() - build_start
    for nprobe in sorted({args.nprobe, 2 * args.nprobe}):
        index.nprobe = nprobe
        ivf_s, (_, found) = median_seconds(lambda: index.search(queries, k), args.repeats)
        rows.append(
            {
                "method": f"IVF nlist {nlist}, nprobe {nprobe} (CPU)",
                "build_s": build_s,
                "search_s": ivf_s,
                "recall": recall_at_k(exact, found),
            }
        )
    if faiss.get_num_gpus() > 0:
        gpu_s, (_, found) = median_seconds(
            lambda: search(gallery, queries, k, gpu=True), args.repeats
        )
        rows.append(
            {
                "method": "exact IndexFlatIP (GPU)",
                "build_s": 0.0,
                "search_s": gpu_s,
                "recall": recall_at_k(exact, found),
            }
        )
    return rows


def ivf_index(gallery: np.ndarray, nlist: int, seed: int) -> faiss.IndexIVFFlat:
    """IVF over `gallery`, trained on a seeded sample of 40 points per list."""
    dim = gallery.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(
        len(gallery), min(len(gallery), 40 * nlist), replace=False
    )
    index.cp.seed = seed
    index.train(np.ascontiguousarray(gallery[np.sort(sample)]))
    index.add(np.ascontiguousarray(gallery))
    return index


def recall_at_k(exact: np.ndarray, found: np.ndarray) -> float:
    """Mean over queries of |exact top-k ∩ found top-k| / k."""
    hits = [
        len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(exact, found, strict=True)
    ]
    return float(np.mean(hits))


# report -------------------------------------------------------------------------


def machine() -> str:
    cpu = cpu_model()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = faiss.get_num_gpus()
    return (
        f"{os.cpu_count()} CPU ({cpu}), {memory:.0f} GiB RAM, FAISS GPUs: {gpus}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}"
    )


def report(
    args: argparse.Namespace,
    runs: dict[str, Any],
    searches: list[dict[str, Any]],
    k: int,
    setup_s: float,
) -> str:
    cold, cached = runs["cold"], runs["cached"]
    lines = [
        f"## Evaluation: {args.images:,}-image gallery, {args.queries:,} queries",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {machine()}; load average at the end {os.getloadavg()[0]:.1f}",
        f"- command: `{shlex.join(['python', 'bench/bench_eval.py', *sys.argv[1:]])}`",
        f"- model: random CLIP, 32 px, 2+2 layers, {args.dim}-d; batch {args.batch_size}; "
        f"torch threads {args.threads}; image decoding in {DECODE_WORKERS} threads; "
        f"data root and model setup {setup_s:.0f} s (reused when present)",
        "",
        "| run | total s | gallery s | queries s | search s | gallery rows encoded | cache hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in (("cold", cold), ("cached", cached)):
        parts = run["parts"]
        lines.append(
            f"| {name} | {run['seconds']:.1f} | {parts.get('gallery', 0):.1f} | "
            f"{parts.get('queries', 0):.1f} | {parts.get('search', 0):.2f} | "
            f"{run['cache']['encoded_rows']:,} | {run['cache']['hits']} |"
        )
    ratio = cold["seconds"] / cached["seconds"]
    lines += ["", f"Cold / cached: **{ratio:.1f}x** (same metrics: mAP@5 {cold['mAP@5']:.4f}).", ""]
    lines += [
        f"Search of {args.queries:,} queries, top {k}, over {args.images:,} x {args.dim} "
        f"float32 (median of {args.repeats}):",
        "",
        "| method | build s | search s | speed-up vs exact | recall@k vs exact |",
        "|---|---|---|---|---|",
    ]
    exact_s = searches[0]["search_s"]
    for row in searches:
        lines.append(
            f"| {row['method']} | {row['build_s']:.2f} | {row['search_s']:.3f} | "
            f"{exact_s / row['search_s']:.1f}x | {row['recall']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = write_data_root(args.workdir / "circo", args)
    model = save_tiny_clip(args.workdir / f"clip-{args.size}px-{args.dim}d", args.dim, args.size)
    setup_s = time.perf_counter() - start
    cache = args.workdir / "cache"
    runs = timed_evaluations(root, model, cache, args.batch_size)
    gallery, queries = embeddings(root, model, cache, args.batch_size)
    k = BENCHMARKS["circo"].depth + SEARCH_MARGIN  # what the evaluator asks FAISS for
    searches = search_timings(gallery, queries, args, k)
    text = report(args, runs, searches, k, setup_s)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
