"""Page and search latencies of `megapairs explore` on a synthetic 1M-pair run.

Builds (once, cached in `--workdir`) a run directory shaped like a finished real run, written
with the project's own schemas and helpers: a manifest with a valid config (the demo's three
channels: two EfficientNet-Lite0 image channels and the MiniLM `caption` channel) and a
`stages` entry per stage; `corpus/` (100k records over 10 parts, pointing at a few small
real JPEGs, reused); float16 embeddings of every channel with their `encoder.json`;
`pairs/` (1M pairs, 1-3 channels each, 5 hard negatives); `annotations/` (5-6 instructions
of ~12 words per pair); empty `annotation_failures/`; completion markers with the real
stages' counts. No neighbour parts (the overview shows a channel without them).

Then it starts the real server in its own process (`python -m megapairs explore --run RUN
--port 0 --retriever channels`), times its start-up (until `GET /api/pairs?limit=1`
answers) and the search gallery's build (`POST /api/search/build`, polled until ready), and
runs a client in another process (this script with `--client`: one keep-alive httpx
connection, or a new connection per request with `--connection fresh`; requests one after
the other) that times every request from send to the last byte of the body. The thumbnail
cache (`<run>/explore/thumbnails`) is emptied first, so first thumbnail requests are cold.
Prints a Markdown table (p50 / p95 / max per kind of request) and writes every number with
`--json`. The server and client are stopped at the end, also on an error.

    python bench/bench_explore.py --json bench/out/explore-1m.json
    python bench/bench_explore.py --connection fresh --json bench/out/explore-1m-fresh.json
    python bench/bench_explore.py --pairs 100000 --corpus 10000   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN_META = re.compile(r'<meta name="megapairs-token" content="([^"]+)"')
ADDRESS_LINE = re.compile(r"explorer: (http://\S+/)")
CHANNELS = {  # name -> (encoder, model, options, dim, modality)
    "image_semantic": ("efficientnet-lite0", "", {"features": "final"}, 1280, "image"),
    "image_pattern": ("efficientnet-lite0", "", {"features": "early"}, 288, "image"),
    "caption": (
        "sentence-transformers",
        "sentence-transformers/all-MiniLM-L6-v2",
        {},
        384,
        "text",
    ),
}
WINDOWS = {"image_semantic": (0.8, 0.96), "image_pattern": (0.93, 0.985), "caption": (0.8, 0.96)}
NUM_JPEGS = 8
NUM_NEGATIVES = 5
NO_CAPTION = 0.05  # share of records without a caption (no caption embedding either)
BUILD_VERSION = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megapairs-bench-explore"))
    parser.add_argument("--pairs", type=int, default=1_000_000, help="mined pairs in the run")
    parser.add_argument("--corpus", type=int, default=100_000, help="corpus records")
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--vocabulary", type=int, default=2000, help="distinct words")
    parser.add_argument("--requests", type=int, default=200, help="requests per kind")
    parser.add_argument("--text-requests", type=int, default=20, help="q=<word> pages")
    parser.add_argument(
        "--connection",
        choices=("keep-alive", "fresh"),
        default="keep-alive",
        help="the client's HTTP connections: one kept alive (as a browser), or a new one per "
        "request",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="build the run again")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--client", type=Path, help=argparse.SUPPRESS)  # a request plan
    parser.add_argument("--client-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# building the run -----------------------------------------------------------------------


def pipeline_config(images: Path) -> Any:
    from megapairs.config import PipelineConfig

    channels = {
        name: {"encoder": enc, "model": model, "options": options, "window": list(WINDOWS[name])}
        for name, (enc, model, options, _, _) in CHANNELS.items()
    }
    return PipelineConfig.model_validate(
        {
            "seed": 0,
            "input": {"path": str(images), "shard_size": 10_000},
            "channels": channels,
            "embed": {"device": "cpu"},
            "mine": {"max_targets": 10, "num_hard_negatives": NUM_NEGATIVES},
            "annotate": {"backend": "template"},
        }
    )


def write_jpegs(folder: Path, rng: np.random.Generator) -> list[tuple[Path, int, int, str]]:
    """A few photo-sized JPEGs (gradients and blocks): (path, width, height, sha256)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index in range(NUM_JPEGS):
        width, height = 640, 480
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack(
            [x * 255 // width, y * 255 // height, (x + y + 37 * index) % 256], axis=-1
        ).astype(np.uint8)
        for _ in range(6):
            top, left = rng.integers(0, height - 100), rng.integers(0, width - 100)
            pixels[top : top + 100, left : left + 100] = rng.integers(0, 256, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        path = folder / f"photo-{index}.jpg"
        path.write_bytes(buffer.getvalue())
        out.append((path, width, height, hashlib.sha256(buffer.getvalue()).hexdigest()))
    return out


def vocabulary(size: int, rng: np.random.Generator) -> np.ndarray:
    """Pronounceable made-up words of 3-10 letters, distinct."""
    consonants, vowels = list("bcdfghklmnprstvwz"), list("aeiou")
    words: set[str] = set()
    while len(words) < size:
        syllables = int(rng.integers(1, 4))
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if rng.random() < 0.5:
            word += str(rng.choice(consonants))
        if len(word) >= 3:
            words.add(word)
    return np.array(sorted(words))


def sentences(words: Any, counts: np.ndarray, rng: np.random.Generator) -> Any:
    """One string per entry of `counts`: that many random words joined by spaces."""
    import pyarrow as pa
    import pyarrow.compute as pc

    picked = words.take(pa.array(rng.integers(0, len(words), int(counts.sum()))))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), picked), " ")


def list_array(values: Any, counts: np.ndarray) -> Any:
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def build_run(args: argparse.Namespace, run_root: Path) -> dict[str, Any]:
    """Write the synthetic run (see the module docstring); returns what was built."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from megapairs.annotation.stage import AnnotateStage
    from megapairs.corpus.ingest import IngestStage
    from megapairs.embeddings import channel_folder, write_shard
    from megapairs.encoders.stage import ENCODER_INFO, EmbedStage
    from megapairs.mining.stage import MineStage, windows_path
    from megapairs.pipeline.runner import section_digests
    from megapairs.runs import (
        RunDir,
        environment_versions,
        now_iso,
        part_name,
        write_json,
        write_table,
    )
    from megapairs.schemas import (
        ANNOTATION_FAILURES_DIR,
        ANNOTATION_FAILURES_SCHEMA,
        ANNOTATIONS_DIR,
        ANNOTATIONS_SCHEMA,
        CORPUS_DIR,
        CORPUS_SCHEMA,
        PAIRS_DIR,
        PAIRS_SCHEMA,
        PART_STRIDE,
    )

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    if run_root.exists():
        shutil.rmtree(run_root)
    run = RunDir(run_root)
    jpegs = write_jpegs(run_root.parent / "images", rng)
    config = pipeline_config(run_root.parent / "images")
    names = list(CHANNELS)
    words = pa.array(vocabulary(args.vocabulary, rng))
    demo_ids = pa.array([f"d{i:02d}" for i in range(50)])
    per_part, pairs_per_part = args.corpus // args.parts, args.pairs // args.parts
    targets = -(-pairs_per_part // per_part)  # per query
    total = per_part * args.parts
    gap = max(1, total // (targets + NUM_NEGATIVES + 2))
    counts: dict[str, dict[str, dict[str, int]]] = {}

    def mark(stage: str, part: str, part_counts: dict[str, int]) -> None:
        run.mark_done(stage, part, part_counts)
        counts.setdefault(stage, {})[part] = part_counts

    for p in range(args.parts):
        part = part_name(p)
        ids = p * PART_STRIDE + np.arange(per_part, dtype=np.int64)
        photo = rng.integers(0, NUM_JPEGS, per_part)
        has_caption = rng.random(per_part) >= NO_CAPTION
        captions = sentences(words, rng.integers(6, 15, per_part), rng)
        captions = pc.if_else(pa.array(has_caption), captions, pa.nulls(per_part, pa.string()))
        paths = pa.array([str(jpegs[i][0]) for i in photo])
        corpus = pa.table(
            {
                "id": pa.array(ids),
                "key": pc.binary_join_element_wise("photo-", pa.array(ids).cast(pa.string()), ""),
                "uri": paths,
                "path": paths,
                "sha256": pa.array([jpegs[i][3] for i in photo]),
                "pixel_sha256": pa.array([os.urandom(32).hex() for _ in range(per_part)]),
                "width": pa.array([jpegs[i][1] for i in photo], pa.int32()),
                "height": pa.array([jpegs[i][2] for i in photo], pa.int32()),
                "source_format": pa.array(["JPEG"] * per_part),
                "source_mode": pa.array(["RGB"] * per_part),
                "caption": captions,
                "has_caption": pa.array(has_caption),
            },
            schema=CORPUS_SCHEMA,
        )
        write_table(run.part_path(CORPUS_DIR, part), corpus)
        no_caption = int((~has_caption).sum())
        mark(
            "ingest",
            part,
            {
                "records": per_part,
                "kept": per_part,
                "rejected": 0,
                "duplicates": 0,
                "no_caption": no_caption,
            },
        )

        for name, (_, _, _, dim, modality) in CHANNELS.items():
            kept = ids if modality == "image" else ids[has_caption]
            vectors = rng.standard_normal((len(kept), dim), dtype=np.float32)
            write_shard(run, name, part, kept, vectors)
            skipped = 0 if modality == "image" else no_caption
            embedded = {"embedded": len(kept), "failed": 0, "skipped_no_caption": skipped}
            mark(f"embed.{name}", part, embedded)

        # pairs: every query of the part with `targets` distinct targets (not itself)
        query_rows = np.repeat(np.arange(per_part), targets)[:pairs_per_part]
        rank = np.tile(np.arange(targets), per_part)[:pairs_per_part].astype(np.int32)
        steps = rng.integers(1, gap, (per_part, targets)).cumsum(axis=1).ravel()[:pairs_per_part]
        global_rows = p * per_part + query_rows
        target_rows = (global_rows + steps) % total
        query_ids = ids[query_rows]
        target_ids = (target_rows // per_part) * PART_STRIDE + target_rows % per_part
        count = len(query_ids)
        negative_steps = rng.integers(1, gap, (count, NUM_NEGATIVES)).cumsum(axis=1)
        negative_rows = (global_rows[:, None] - negative_steps) % total
        negatives = (negative_rows // per_part) * PART_STRIDE + negative_rows % per_part
        bits = np.zeros((count, len(names)), bool)
        masks = rng.choice(  # channel bitmasks 1..7: single channels most often
            np.arange(1, 1 << len(names)), count, p=[0.35, 0.3, 0.1, 0.15, 0.03, 0.05, 0.02]
        )
        for b in range(len(names)):
            bits[:, b] = (masks >> b) & 1
        _, columns = np.nonzero(bits)
        low = np.array([WINDOWS[n][0] for n in names], np.float32)[columns]
        high = np.array([WINDOWS[n][1] for n in names], np.float32)[columns]
        scores = (low + (high - low) * rng.random(len(columns), np.float32)).astype(np.float32)
        per_pair = bits.sum(axis=1)
        topped = (rng.random(count) < 0.05) * rng.integers(1, NUM_NEGATIVES + 1, count)
        pair_ids = pc.binary_join_element_wise(
            pa.array(query_ids).cast(pa.string()), pa.array(target_ids).cast(pa.string()), "-"
        )
        pairs = pa.table(
            {
                "pair_id": pair_ids,
                "query_id": pa.array(query_ids),
                "target_id": pa.array(target_ids),
                "rank": pa.array(rank),
                "channels": list_array(pa.array(np.array(names)[columns]), per_pair),
                "channel_scores": list_array(pa.array(scores), per_pair),
                "hard_negative_ids": list_array(
                    pa.array(negatives.ravel()), np.full(count, NUM_NEGATIVES)
                ),
                "hard_negative_topped_up": pa.array(topped.astype(np.int32)),
            },
            schema=PAIRS_SCHEMA,
        )
        write_table(run.part_path(PAIRS_DIR, part), pairs)
        mined = {
            "queries": per_part,
            "not_in_any_channel": 0,
            "queries_with_pairs": len(np.unique(query_rows)),
            "pairs": count,
            "hard_negatives": count * NUM_NEGATIVES,
            "topped_up": int(topped.sum()),
            **{f"pairs_{n}": int(bits[:, b].sum()) for b, n in enumerate(names)},
        }
        mark("mine", part, mined)

        # annotations: 5-6 instructions of 10-14 words, a ~50-word description, 0-3 dropped
        n_instructions = rng.integers(5, 7, count)
        instructions = sentences(words, rng.integers(10, 15, int(n_instructions.sum())), rng)
        n_dropped = rng.integers(0, 4, count)
        dropped = pc.binary_join_element_wise(
            "beyond_max: ", sentences(words, rng.integers(10, 15, int(n_dropped.sum())), rng), ""
        )
        annotations = pa.table(
            {
                "pair_id": pair_ids,
                "query_id": pa.array(query_ids),
                "target_id": pa.array(target_ids),
                "description": sentences(words, rng.integers(40, 61, count), rng),
                "instructions": list_array(instructions, n_instructions),
                "dropped_instructions": list_array(dropped, n_dropped),
                "word_num": pa.array(rng.integers(60, 101, count).astype(np.int32)),
                "demonstration_ids": list_array(
                    demo_ids.take(pa.array(rng.integers(0, 50, count * 5))), np.full(count, 5)
                ),
                "repaired": pa.array(np.zeros(count, bool)),
                "backend": pa.array(["template"] * count),
                "describer_model": pa.array(["template"] * count),
                "instructor_model": pa.array(["template"] * count),
                "prompt_version": pa.array(["v1-bench"] * count),
                "seed": pa.array(np.zeros(count, np.int64)),
            },
            schema=ANNOTATIONS_SCHEMA,
        )
        write_table(run.part_path(ANNOTATIONS_DIR, part), annotations)
        write_table(
            run.part_path(ANNOTATION_FAILURES_DIR, part), ANNOTATION_FAILURES_SCHEMA.empty_table()
        )
        annotated = {
            "pairs": count,
            "annotated": count,
            "failed": 0,
            "failed_transient": 0,
            "repaired": 0,
            "instructions": int(n_instructions.sum()),
            "answers": 2 * count,
            "http_attempts": 2 * count,
        }
        mark("annotate", part, annotated)
        print(f"  built {part}: {per_part:,} records, {count:,} pairs", flush=True)

    for name, (encoder, model, options, dim, modality) in CHANNELS.items():
        info = {
            "channel": name,
            "encoder": encoder,
            "model": model,
            "options": options,
            "name": f"{encoder}:{model or 'imagenet'}[{options.get('features', '')}]",
            "modality": modality,
            "dim": dim,
            "device": "cpu",
            "dtype": "float32",
        }
        write_json(run.folder(channel_folder(name)) / ENCODER_INFO, info)
    windows = {name: {"window": list(WINDOWS[name]), "rule": "fixed"} for name in names}
    write_json(windows_path(run), windows)

    stages: list[Any] = [IngestStage(config)]
    stages += [EmbedStage(config, name, progress=False) for name in names]
    stages += [MineStage(config), AnnotateStage(config, progress=False)]
    entries = {}
    for stage in stages:
        summed: dict[str, int] = {}
        for part_counts in counts[stage.name].values():
            for key, value in part_counts.items():
                summed[key] = summed.get(key, 0) + value
        entries[stage.name] = {
            "config_hash": config.section_hash(*stage.config_sections),
            "settings": section_digests(config, stage),
            "parts": args.parts,
            "counts": summed,
            "complete": True,
            "finished_at": now_iso(),
        }
    run.update_manifest(
        config=config.public_dump(),
        versions=environment_versions(),
        seed=config.seed,
        created_at=now_iso(),
        updated_at=now_iso(),
        stages=entries,
        windows=windows,
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 1),
        "records": total,
        "pairs": sum(c["pairs"] for c in counts["mine"].values()),
        "instructions": sum(c["instructions"] for c in counts["annotate"].values()),
        "bytes": sum(f.stat().st_size for f in run_root.rglob("*") if f.is_file()),
    }


def ensure_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The run in the workdir, built when missing or built with other sizes."""
    run_root = args.workdir / "run"
    wanted = {
        "version": BUILD_VERSION,
        "pairs": args.pairs,
        "corpus": args.corpus,
        "parts": args.parts,
        "vocabulary": args.vocabulary,
        "seed": args.seed,
    }
    stamp = args.workdir / "build.json"
    if not args.rebuild and stamp.exists():
        built = json.loads(stamp.read_text())
        if built.get("wanted") == wanted and (run_root / "manifest.json").exists():
            print(f"reusing the run built in {built['build']['seconds']} s: {run_root}")
            return run_root, {**built["build"], "reused": True}
    print(f"building the synthetic run in {run_root} ...", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    build = build_run(args, run_root)
    stamp.write_text(json.dumps({"wanted": wanted, "build": build}, indent=2))
    print(f"built in {build['seconds']} s ({build['bytes'] / 2**30:.2f} GiB on disk)")
    return run_root, {**build, "reused": False}


# the server ---------------------------------------------------------------------------


class Server:
    """`python -m megapairs explore` in its own process; stdout drained by a thread."""

    def __init__(self, run_root: Path, log_path: Path) -> None:
        self.log = log_path.open("w")
        command = [sys.executable, "-m", "megapairs", "explore", "--run", str(run_root)]
        command += ["--port", "0", "--retriever", "channels"]
        self.command = command
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.address: str | None = None
        self.address_seconds: float | None = None
        self._found = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            match = ADDRESS_LINE.search(line)
            if match and self.address is None:
                self.address = match.group(1).rstrip("/")
                self.address_seconds = time.perf_counter() - self.started
                self._found.set()
        self._found.set()

    def wait_address(self, timeout: float) -> str:
        self._found.wait(timeout)
        if self.address is None:
            self.stop()
            raise RuntimeError(f"the server printed no address: {self.lines[-5:]}")
        return self.address

    def memory_mib(self) -> dict[str, float]:
        """Resident set now and its peak (VmRSS, VmHWM) of the server process."""
        out = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def wait_until_answers(client: Any, path: str, timeout: float) -> None:
    import httpx

    deadline = time.perf_counter() + timeout
    while True:
        try:
            response = client.get(path)
            if response.status_code == 200:
                return
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
        except httpx.TransportError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.05)


# the client (another process) ---------------------------------------------------------


def run_client(plan_path: Path, out_path: Path) -> int:
    """Send the plan's requests, one after the other, on one keep-alive connection (or a new
    connection per request); write each group's times (ms, send to last byte) and what the
    server said it spent."""
    import httpx

    plan = json.loads(plan_path.read_text())
    results = []
    keep = 1 if plan["connection"] == "keep-alive" else 0
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=keep)
    with httpx.Client(base_url=plan["base"], timeout=600, limits=limits) as client:
        for group in plan["groups"]:
            times, server_ms, errors, sizes, totals = [], [], [], [], []
            for request in group["requests"]:
                headers = (
                    {"X-Megapairs-Token": plan["token"]} if request["method"] == "POST" else {}
                )
                started = time.perf_counter()
                response = client.request(
                    request["method"], request["path"], json=request.get("json"), headers=headers
                )
                body = response.content
                times.append((time.perf_counter() - started) * 1000)
                sizes.append(len(body))
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {request['path']}: {body[:200]!r}")
                elif response.headers.get("content-type", "").startswith("application/json"):
                    answer = json.loads(body)
                    if "elapsed_ms" in answer:
                        server_ms.append(answer["elapsed_ms"])
                    if "total" in answer:
                        totals.append(answer["total"])
            results.append(
                {
                    "name": group["name"],
                    "times_ms": times,
                    "server_ms": server_ms,
                    "totals": totals,
                    "errors": errors,
                    "bytes": sizes,
                }
            )
    out_path.write_text(json.dumps(results))
    return 0


def request_plan(args: argparse.Namespace, run_root: Path, base: str, token: str) -> dict[str, Any]:
    """The client's requests, drawn here from the run's own ids and words."""
    import pyarrow.compute as pc

    from megapairs.runs import RunDir, concat_tables
    from megapairs.schemas import CORPUS_SCHEMA, PAIRS_SCHEMA

    rng = np.random.default_rng(args.seed + 1)
    run = RunDir(run_root)
    pair_ids = concat_tables(run.files("pairs", "mine"), PAIRS_SCHEMA, ["pair_id"])["pair_id"]
    corpus = concat_tables(run.files("corpus", "ingest"), CORPUS_SCHEMA, ["id", "caption"])
    record_ids = corpus["id"].to_numpy()
    words = pc.unique(
        pc.utf8_split_whitespace(corpus["caption"].drop_null()).combine_chunks().flatten()
    )
    words = np.array(words.to_pylist())
    n, total = args.requests, len(pair_ids)

    def get(path: str) -> dict[str, Any]:
        return {"method": "GET", "path": path}

    def query_text() -> str:
        return " ".join(rng.choice(words, int(rng.integers(3, 9))))

    thumbs = rng.choice(record_ids, n, replace=False)
    text_words = rng.choice(words, args.text_requests, replace=False)
    repeated = str(text_words[0])
    groups = [
        ("first page", [get("/api/pairs?limit=50")] * n),
        (
            "page at a random offset",
            [get(f"/api/pairs?offset={o}&limit=50") for o in rng.integers(0, total - 50, n)],
        ),
        (
            "filtered + sorted page (channel=caption, sort=-score:caption)",
            [get("/api/pairs?channel=caption&sort=-score:caption&limit=50")] * n,
        ),
        (
            "one pair (GET /api/pairs/ID)",
            [get(f"/api/pairs/{pair_ids[int(i)]}") for i in rng.integers(0, total, n)],
        ),
        ("overview", [get("/api/overview")] * n),
        (
            "search (image_id + text, k=20)",
            [
                {
                    "method": "POST",
                    "path": "/api/search",
                    "json": {"image_id": int(i), "text": query_text(), "k": 20},
                }
                for i in rng.choice(record_ids, n)
            ],
        ),
        ("thumbnail, first request", [get(f"/api/image/{i}?size=thumb") for i in thumbs]),
        ("thumbnail, cached", [get(f"/api/image/{i}?size=thumb") for i in thumbs]),
        (
            "text filter q=WORD (a new word each time)",
            [get(f"/api/pairs?q={w}&limit=50") for w in text_words],
        ),
        (
            "text filter q=WORD (the same word again)",
            [get(f"/api/pairs?q={repeated}&limit=50")] * args.text_requests,
        ),
    ]
    return {
        "base": base,
        "token": token,
        "connection": args.connection,
        "groups": [{"name": name, "requests": requests} for name, requests in groups],
    }


# measuring ------------------------------------------------------------------------------


def summary(times: list[float]) -> dict[str, float]:
    values = np.asarray(times)
    return {
        "n": len(values),
        "first_ms": round(float(values[0]), 1),
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p95_ms": round(float(np.percentile(values, 95)), 1),
        "max_ms": round(float(values.max()), 1),
    }


def measure(args: argparse.Namespace, run_root: Path) -> dict[str, Any]:
    import httpx

    shutil.rmtree(run_root / "explore" / "thumbnails", ignore_errors=True)  # cold thumbnails
    shutil.rmtree(run_root / "explore" / "index", ignore_errors=True)  # the index built cold
    server = Server(run_root, args.workdir / "server.log")
    try:
        base = server.wait_address(300)
        with httpx.Client(base_url=base, timeout=600) as client:
            wait_until_answers(client, "/api/pairs?limit=1", 600)
            ready = time.perf_counter() - server.started
            memory_ready = server.memory_mib()
            token_match = TOKEN_META.search(client.get("/").text)
            if token_match is None:
                raise RuntimeError("no megapairs-token meta tag in the page")
            token = token_match.group(1)
            started = time.perf_counter()
            built = client.post("/api/search/build", headers={"X-Megapairs-Token": token})
            if built.status_code != 202:
                raise RuntimeError(f"search build: {built.status_code} {built.text[:300]}")
            while (state := client.get("/api/search/status").json())["state"] == "building":
                time.sleep(0.1)
            gallery_seconds = time.perf_counter() - started
            if state["state"] != "ready":
                raise RuntimeError(f"search gallery: {state}")
            memory_gallery = server.memory_mib()
        plan = request_plan(args, run_root, base, token)
        plan_path, out_path = args.workdir / "plan.json", args.workdir / "client.json"
        plan_path.write_text(json.dumps(plan))
        command = [
            sys.executable,
            __file__,
            "--client",
            str(plan_path),
            "--client-out",
            str(out_path),
        ]
        print(f"client: {len(plan['groups'])} kinds of request in another process ...", flush=True)
        client_started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        client_seconds = time.perf_counter() - client_started
        groups = json.loads(out_path.read_text())
        memory_end = server.memory_mib()
    finally:
        server.stop()
    restart = restart_seconds(run_root, args.workdir / "server-restart.log")
    kinds = []
    for group in groups:
        entry = {"name": group["name"], **summary(group["times_ms"]), "errors": group["errors"]}
        if group["server_ms"]:
            entry["server_p50_ms"] = round(float(np.median(group["server_ms"])), 1)
        entry["mean_bytes"] = round(float(np.mean(group["bytes"])))
        if group["totals"]:
            entry["median_total"] = int(np.median(group["totals"]))
        entry["times_ms"] = [round(t, 2) for t in group["times_ms"]]
        kinds.append(entry)
    return {
        "server_command": " ".join(shlex.quote(c) for c in server.command),
        "address_printed_s": round(server.address_seconds or 0, 2),
        "first_page_ready_s": round(ready, 2),
        "restart_first_page_s": round(restart, 2),
        "gallery_build_s": round(gallery_seconds, 2),
        "client_seconds": round(client_seconds, 1),
        "memory_mib": {"ready": memory_ready, "gallery": memory_gallery, "end": memory_end},
        "kinds": kinds,
    }


def restart_seconds(run_root: Path, log: Path) -> float:
    """Seconds from starting the server again to its first page (the index from its cache)."""
    import httpx

    server = Server(run_root, log)
    try:
        base = server.wait_address(300)
        with httpx.Client(base_url=base, timeout=600) as client:
            wait_until_answers(client, "/api/pairs?limit=1", 600)
            return time.perf_counter() - server.started
    finally:
        server.stop()


def machine() -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_model

    memory = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(int(memory) / 2**20, 1),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def report(result: dict[str, Any]) -> str:
    build, measured, info = result["build"], result["measured"], result["machine"]
    lines = [
        f"date {result['date']}, {info['cpu']}, {info['cores']} CPUs, {info['ram_gib']} GiB RAM, "
        f"python {info['python']}, load average (1, 5, 15 min) {info['load_average']} at "
        f"start, {result['load_average_end']} at the end",
        f"command: {result['command']}",
        f"run: {build['records']:,} corpus records, {build['pairs']:,} pairs, "
        f"{build['instructions']:,} instructions, {build['bytes'] / 2**30:.2f} GiB on disk; "
        f"built in {build['seconds']} s" + (" (reused)" if build.get("reused") else ""),
        f"server: address printed after {measured['address_printed_s']} s, first page "
        f"answered {measured['first_page_ready_s']} s after the process started (index "
        f"built), {measured['restart_first_page_s']} s after a restart (index cached); search "
        f"gallery built in {measured['gallery_build_s']} s; server RSS (MiB): "
        f"{measured['memory_mib']}",
        f"client: another process, httpx, {result['connection']} connection, one request at "
        "a time; ms from sending the request to the last byte of the body",
        "",
        "| request | n | first ms | p50 ms | p95 ms | max ms | server p50 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in measured["kinds"]:
        server = kind.get("server_p50_ms")
        lines.append(
            f"| {kind['name']} | {kind['n']} | {kind['first_ms']} | {kind['p50_ms']} | "
            f"{kind['p95_ms']} | {kind['max_ms']} | {'' if server is None else server} | "
            f"{len(kind['errors'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return run_client(args.client, args.client_out)
    info = machine()
    run_root, build = ensure_run(args)
    measured = measure(args, run_root)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": info,
        "connection": args.connection,
        "build": build,
        "measured": measured,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    errors = [e for kind in measured["kinds"] for e in kind["errors"]]
    for error in errors[:10]:
        print("error:", error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
