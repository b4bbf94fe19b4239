"""Gallery embeddings: encoded in batches once per (retriever, checkpoint, gallery), kept on disk.

An entry is keyed by what decides its numbers, and by nothing else (`gallery_key`):

- `format`: `CACHE_FORMAT` (bumped when the layout or the image decoding changes; older
  entries are then simply not found);
- `retriever`: the retriever's class path;
- `model`: the model key (`checkpoint_key`: a local folder's path plus a digest of its
  files, or a hub name as given; callers append loading options that change the
  numbers, such as the dtype);
- `preprocessing`: how the retriever turns images and texts into model inputs
  (`preprocessing_key`: its image processor's settings, image size, text length);
- `gallery`: a digest of the items' ids, absolute image paths, crop boxes and texts, in
  order, and `rows`, their count;
- `files`: the file digest, each distinct image file's size and mtime (`file_digest`).

The benchmark, split and task are not in the key: they are labels of the lookup
(`CacheEvent`, and `computed_for` in `meta.json`). Splits and benchmarks that use the same
images share one entry: CIRCO val and test, whose 123k-image gallery is one, encode it once.

Layout under the cache root (every file written atomically, `meta.json` last, so an
entry is complete exactly when its `meta.json` exists):

    <root>/v<format>/<retriever class>-<rows>-<key digest>/
        meta.json                       the key, rows, dim, date, what computed it
        embeddings.npy                  float32 (N, d), unit rows, gallery order
        ids.json                        the gallery ids, same order
        partial-<rows>/chunk-00003.npy  rows [3 * rows, 4 * rows) of an unfinished entry

Chunks are written as they finish, so an encoding killed halfway resumes from the
chunks it completed; they are deleted once the entry is assembled.

Benchmark images are decoded as the benchmarks' reference loaders do,
`Image.open(path).convert("RGB")` on the stored pixels (`open_stored_rgb`): no EXIF
orientation is applied (the training pipeline's `models.inputs.load_image` applies it;
crop boxes and targets were annotated on the stored pixels), and the image's metadata is
dropped so the retriever's own input normalisation cannot rotate it later. Crop boxes
are then applied and crops padded to a square as GeneCIS does. Decoding runs in a thread
pool, one batch ahead of the encoder. `find_undecodable` checks beforehand, cheaply
(JPEGs decoded at 1/8 scale), which image files cannot be decoded, so a broken file is
reported before hours of encoding; a failure while encoding is one error naming every
undecodable file of its batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalTask, ImageRef
from megapairs.models.base import Retriever
from megapairs.models.inputs import ImageLoadError
from megapairs.runs import write_array, write_json

CACHE_FORMAT = 2  # 2: keyed by gallery content, not split; no EXIF rotation
CHUNK_ROWS = 4096
SMALL_FILE_BYTES = 1 << 20  # checkpoint files up to this size are hashed by content
DECODE_WORKERS = min(4, os.cpu_count() or 1)
META_FILE = "meta.json"
VECTORS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
FAILURE_EXAMPLES = 10  # undecodable files named in an error
PROBE_SIZE = (1, 1)  # JPEGs are probed at their smallest decoding scale (1/8)
PREPROCESSING_ATTRIBUTES = ("image_size", "max_text_length", "prompt")
"""Retriever attributes that change its model inputs, in `preprocessing_key` when present."""

Encode = Callable[[list[Image.Image] | None, list[str] | None], torch.Tensor]
"""An encoder of one batch: (images or None, texts or None) -> (B, d) tensor."""


class Item(Protocol):
    """Anything with an optional image and an optional text (a Candidate or an EvalQuery)."""

    @property
    def image(self) -> ImageRef | None: ...

    @property
    def text(self) -> str | None: ...


# checkpoint identity ----------------------------------------------------------


def checkpoint_key(model: str | os.PathLike[str]) -> str:
    """The identity of a checkpoint: a hub name as given; for a local file or folder its
    absolute path plus a digest of its (top-level, non-hidden) files: the bytes of files up
    to 1 MiB (configs, tokenizers), size and mtime of larger ones (weights)."""
    path = Path(model)
    if not path.exists():
        return os.fspath(model)
    files = [path] if path.is_file() else sorted(_checkpoint_files(path))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{_file_fingerprint(file)}\n".encode())
    return f"{path.resolve()}@{digest.hexdigest()[:16]}"


def _checkpoint_files(folder: Path) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            yield entry


def _file_fingerprint(file: Path) -> str:
    stat = file.stat()
    if stat.st_size <= SMALL_FILE_BYTES:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def retriever_class(retriever: Retriever) -> str:
    """The retriever's class path: with the checkpoint it decides the embeddings (kinds
    `clip` and `mmret-clip` share a class, so they share cache entries), while its `name`
    also spells the model path as typed, which the checkpoint key already covers."""
    kind = type(retriever)
    return f"{kind.__module__}.{kind.__qualname__}"


def preprocessing_key(retriever: Retriever) -> dict[str, Any]:
    """How `retriever` turns images and texts into model inputs: its own
    `preprocessing_key` (a string or a method giving one) when it has one; else its image
    processor's class and settings (`image_processor`, or `processor.image_processor`,
    `to_dict()`: resize, crop, mean and std) and its `PREPROCESSING_ATTRIBUTES` (MLLM
    image size and prompt, text length). Empty when it exposes none of them: the class
    and the model key then stand for it."""
    exposed = getattr(retriever, "preprocessing_key", None)
    if exposed is not None:
        return {"preprocessing_key": str(exposed() if callable(exposed) else exposed)}
    parts: dict[str, Any] = {}
    processor = getattr(retriever, "image_processor", None) or getattr(
        getattr(retriever, "processor", None), "image_processor", None
    )
    settings = getattr(processor, "to_dict", None)
    if callable(settings):
        kind = type(processor)
        parts["image_processor"] = {"class": f"{kind.__module__}.{kind.__qualname__}"}
        parts["image_processor"].update(settings())
    for name in PREPROCESSING_ATTRIBUTES:
        value = getattr(retriever, name, None)
        if value is not None:
            is_instance = is_dataclass(value) and not isinstance(value, type)
            parts[name] = asdict(value) if is_instance else value
    return dict(json.loads(json.dumps(parts, sort_keys=True, default=str)))


# encoding ---------------------------------------------------------------------


def open_stored_rgb(
    path: str | os.PathLike[str], draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """The stored pixels of an image file in RGB, as the benchmarks' reference loaders
    read them (`Image.open(path).convert("RGB")`): no EXIF orientation is applied, and the
    metadata (EXIF, XMP) is dropped so no later step applies it either. `draft_size`:
    JPEGs are decoded at a reduced scale near it (for probing)."""
    try:
        with Image.open(path) as image:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            rgb = image.convert("RGB")
    except Exception as err:  # PIL raises many types on missing or malformed files
        raise ImageLoadError(f"cannot open image {os.fspath(path)!r}: {err}") from err
    rgb.info = {}
    return rgb


def load_ref_image(ref: ImageRef, square: bool = True) -> Image.Image:
    """The stored RGB pixels of `ref` (`open_stored_rgb`, or the ref's own `open_image()`
    when it has one: an image that is no file of its own, such as a run's stored corpus
    image), cropped to its box (clipped to the image).

    With `square` a crop is then padded to a square with black, centred, as GeneCIS'
    reference code does (`PAD_CROP`, `expand2square`; boxes come only from GeneCIS)."""
    opener = getattr(ref, "open_image", None)
    image = opener() if callable(opener) else open_stored_rgb(ref.path)
    if ref.box is None:
        return image
    x, y, width, height = ref.box
    left, top = max(0, round(x)), max(0, round(y))
    right, bottom = min(image.width, round(x + width)), min(image.height, round(y + height))
    if right <= left or bottom <= top:
        raise ImageLoadError(
            f"crop box {ref.box} lies outside image {str(ref.path)!r} "
            f"({image.width}x{image.height})"
        )
    crop = image.crop((left, top, right, bottom))
    return expand_to_square(crop) if square else crop


def probe_image(ref: ImageRef) -> None:
    """Raise `ImageLoadError` when `load_ref_image(ref)` would; JPEGs without a crop box
    are decoded at their smallest scale (every byte is still read, so truncation shows)."""
    if ref.box is not None:
        load_ref_image(ref)
    else:
        open_stored_rgb(ref.path, draft_size=PROBE_SIZE)


def find_undecodable(
    refs: Iterable[ImageRef], workers: int = DECODE_WORKERS, progress: bool = False
) -> dict[ImageRef, str]:
    """The distinct images of `refs` that cannot be decoded, each with the reason."""
    distinct = list(dict.fromkeys(refs))
    failures: dict[ImageRef, str] = {}

    def probe(ref: ImageRef) -> None:
        try:
            probe_image(ref)
        except ImageLoadError as err:
            failures[ref] = str(err)

    with (
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="probe") as pool,
        tqdm(total=len(distinct), desc="checking images", disable=not progress) as bar,
    ):
        for _ in pool.map(probe, distinct):
            bar.update()
    return {ref: failures[ref] for ref in distinct if ref in failures}


def undecodable_report(failures: Mapping[ImageRef, str], source: str) -> str:
    """One message for `failures`: the count and up to `FAILURE_EXAMPLES` files."""
    shown = list(failures.items())[:FAILURE_EXAMPLES]
    examples = "; ".join(_failure_line(ref, reason) for ref, reason in shown)
    more = f" (and {len(failures) - len(shown)} more)" if len(failures) > len(shown) else ""
    return (
        f"{source}: {len(failures)} image file(s) cannot be decoded: {examples}{more}. "
        "Replace them, or pass allow_missing=True to evaluate without them (the count is "
        "recorded in the results)"
    )


def _failure_line(ref: ImageRef, reason: str) -> str:
    box = "" if ref.box is None else f" box {ref.box}"
    return f"{ref.path}{box}: {reason}"


class ImageDecodeError(BenchmarkDataError):
    """Image files that cannot be decoded; the message gives the count and examples."""


def expand_to_square(image: Image.Image) -> Image.Image:
    """`image` centred on a black square whose side is its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), (0, 0, 0))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def encode_items(
    items: Sequence[Item],
    encode: Encode,
    batch_size: int,
    *,
    workers: int = DECODE_WORKERS,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed `items` (float32, one row per item, input order) with `encode`.

    Items are grouped by what they hold (image + text, image, text) and each group is
    encoded in batches of `batch_size`; images are decoded in a thread pool one batch
    ahead. `on_batch(rows)` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups = _modality_groups(items)
    output: np.ndarray | None = None
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
        for positions in groups:
            batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
            for batch, images in zip(batches, _prefetch(items, batches, pool), strict=True):
                texts = [items[p].text or "" for p in batch] if items[batch[0]].text else None
                rows = encode(images, texts).detach().float().cpu().numpy()
                if rows.ndim != 2 or len(rows) != len(batch):
                    raise ValueError(f"the encoder gave shape {rows.shape} for {len(batch)} items")
                if output is None:
                    output = np.empty((len(items), rows.shape[1]), np.float32)
                output[batch] = rows
                if on_batch is not None:
                    on_batch(len(batch))
    return output if output is not None else np.zeros((0, 0), np.float32)


def _modality_groups(items: Sequence[Item]) -> list[list[int]]:
    """Positions of items by kind (image + text, image only, text only), input order kept."""
    groups: dict[tuple[bool, bool], list[int]] = {}
    for position, item in enumerate(items):
        kind = (item.image is not None, bool(item.text))
        if kind == (False, False):
            raise ValueError(f"item {position} ({_describe(item)}) has neither image nor text")
        groups.setdefault(kind, []).append(position)
    return list(groups.values())


def _prefetch(
    items: Sequence[Item], batches: list[list[int]], pool: ThreadPoolExecutor
) -> Iterator[list[Image.Image] | None]:
    """Decoded images of each batch (None for text-only batches), the next one in flight."""
    Pending = list[tuple[ImageRef, Future[Image.Image]]]

    def submit(batch: list[int]) -> Pending | None:
        refs = [ref for p in batch if (ref := items[p].image) is not None]
        if not refs:
            return None
        return [(ref, pool.submit(load_ref_image, ref)) for ref in refs]

    pending = submit(batches[0]) if batches else None
    for number in range(len(batches)):
        current = pending
        pending = submit(batches[number + 1]) if number + 1 < len(batches) else None
        try:
            yield None if current is None else _batch_images(current)
        except BaseException:
            for _, future in (current or []) + (pending or []):
                future.cancel()
            raise


def _batch_images(decoding: list[tuple[ImageRef, Future[Image.Image]]]) -> list[Image.Image]:
    """The decoded images of one batch; every failure of the batch in one error."""
    images, failures = [], {}
    for ref, future in decoding:
        try:
            images.append(future.result())
        except ImageLoadError as err:
            failures[ref] = str(err)
    if failures:
        raise ImageDecodeError(undecodable_report(failures, "while encoding"))
    return images


def _describe(item: Item) -> str:
    name = getattr(item, "id", None)
    return f"id {name!r}" if name is not None else type(item).__name__


# the cache --------------------------------------------------------------------


def gallery_digest(items: Sequence[Candidate]) -> str:
    """A digest of the items' ids, absolute image paths, crop boxes and texts, in order."""
    digest = hashlib.sha256()
    for item in items:
        image = item.image
        path = "" if image is None else os.path.abspath(image.path)
        box = "" if image is None or image.box is None else ",".join(map(repr, image.box))
        digest.update(f"{item.id}\t{path}\t{box}\t{item.text or ''}\n".encode())
    return digest.hexdigest()


def file_digest(items: Sequence[Candidate]) -> str:
    """The file digest: each distinct image file's size and mtime (`os.stat`, "missing"
    when absent), in order of first use. A changed, replaced or retouched file changes it.

    Not a content hash on purpose: for CIRCO's 123k images that would read every byte
    (about 20 GB) before the cache could answer, where a stat costs microseconds. What it
    misses: a file rewritten with the same size and restored mtime. A copied data root
    (new mtimes) is encoded afresh."""
    digest = hashlib.sha256()
    paths = dict.fromkeys(os.path.abspath(i.image.path) for i in items if i.image is not None)
    for path in paths:
        digest.update(f"{path}\t{_stat_fingerprint(path)}\n".encode())
    return digest.hexdigest()


def _stat_fingerprint(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def gallery_key(items: Sequence[Candidate], retriever: Retriever, model_key: str) -> dict[str, Any]:
    """What identifies the embeddings of `items` (see the module docstring)."""
    return {
        "format": CACHE_FORMAT,
        "retriever": retriever_class(retriever),
        "model": model_key,
        "preprocessing": preprocessing_key(retriever),
        "gallery": gallery_digest(items),
        "rows": len(items),
        "files": file_digest(items),
    }


@dataclass(frozen=True)
class CacheEvent:
    """What one lookup did: `hit` (all rows read), `computed` or `resumed` (some chunks
    reused), with the rows encoded now and the seconds it took; `name`, `benchmark` and
    `split` label the lookup (the entry may be shared)."""

    name: str
    status: str
    rows: int
    encoded_rows: int
    seconds: float
    path: str
    benchmark: str = ""
    split: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "rows": self.rows,
            "encoded_rows": self.encoded_rows,
            "seconds": round(self.seconds, 3),
            "path": self.path,
            "benchmark": self.benchmark,
            "split": self.split,
        }


@dataclass
class GalleryCache:
    """Gallery embeddings on disk under `root`; `events` records every lookup."""

    root: Path
    chunk_rows: int = CHUNK_ROWS
    workers: int = DECODE_WORKERS
    events: list[CacheEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {self.chunk_rows}")

    def embeddings(
        self,
        task: EvalTask,
        retriever: Retriever,
        model_key: str,
        batch_size: int = 64,
        progress: bool = False,
    ) -> tuple[list[str], np.ndarray]:
        """The ids and float32 embeddings (unit rows) of `task.gallery`."""
        if not task.gallery:
            raise ValueError(f"task {task.name!r} has no gallery to embed")
        return self.embed_items(
            task.gallery,
            name=task.name,
            benchmark=task.benchmark,
            split=task.split,
            retriever=retriever,
            model_key=model_key,
            batch_size=batch_size,
            progress=progress,
        )

    def embed_items(
        self,
        items: Sequence[Candidate],
        *,
        name: str,
        benchmark: str = "",
        split: str = "",
        retriever: Retriever,
        model_key: str,
        batch_size: int = 64,
        progress: bool = False,
    ) -> tuple[list[str], np.ndarray]:
        """The ids and embeddings of any candidate list (a gallery, or the distinct
        candidates of per-query tasks), from the cache or encoded and stored. `name`,
        `benchmark` and `split` only label the lookup: the entry is `gallery_key`'s."""
        started = time.perf_counter()
        labels = {"name": name, "benchmark": benchmark, "split": split}
        key = gallery_key(items, retriever, model_key)
        folder = self.entry_folder(key)
        ids = [item.id for item in items]
        cached = _read_entry(folder, ids)
        if cached is not None:
            self._record(labels, "hit", (len(ids), 0), started, folder)
            return ids, cached
        vectors, encoded = self._encode_by_chunks(items, folder, retriever, batch_size, progress)
        _write_entry(folder, key, ids, vectors, labels)
        status = "computed" if encoded == len(ids) else "resumed"
        self._record(labels, status, (len(ids), encoded), started, folder)
        return ids, vectors

    def has_entry(self, key: dict[str, Any], ids: list[str]) -> bool:
        """Whether the complete entry of `key` (`gallery_key`) is stored, with these ids."""
        folder = self.entry_folder(key)
        if not (folder / META_FILE).exists():
            return False
        try:
            return bool(json.loads((folder / IDS_FILE).read_text()) == ids)
        except (OSError, ValueError):
            return False

    def entry_folder(self, key: dict[str, Any]) -> Path:
        """Where the entry of `key` lives: named by the retriever class, the row count
        and a digest of the whole key."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        kind = _safe(str(key["retriever"]).rsplit(".", 1)[-1])
        return self.root / f"v{key['format']}" / f"{kind}-{key['rows']}-{digest}"

    def _encode_by_chunks(
        self,
        items: Sequence[Candidate],
        folder: Path,
        retriever: Retriever,
        batch_size: int,
        progress: bool,
    ) -> tuple[np.ndarray, int]:
        """All rows, reusing finished chunk files; returns (vectors, rows encoded now)."""
        partial = folder / f"partial-{self.chunk_rows}"
        starts = range(0, len(items), self.chunk_rows)
        chunks = self._finished_chunks(partial, len(items))
        encoded = 0
        reused = sum(len(c) for c in chunks.values())
        with tqdm(
            total=len(items), initial=reused, unit="img", desc="gallery", disable=not progress
        ) as bar:
            for number, start in enumerate(starts):
                if number in chunks:
                    continue
                rows = items[start : start + self.chunk_rows]
                vectors = encode_items(
                    rows,
                    retriever.encode_candidates,
                    batch_size,
                    workers=self.workers,
                    on_batch=bar.update,
                )
                write_array(partial / _chunk_name(number), vectors)
                chunks[number] = vectors
                encoded += len(rows)
        return np.concatenate([chunks[n] for n in range(len(starts))]), encoded

    def _finished_chunks(self, partial: Path, total: int) -> dict[int, np.ndarray]:
        """The chunks a previous, interrupted encoding finished, by chunk number."""
        chunks = {}
        for number, start in enumerate(range(0, total, self.chunk_rows)):
            rows = min(self.chunk_rows, total - start)
            found = _read_chunk(partial / _chunk_name(number), rows)
            if found is not None:
                chunks[number] = found
        return chunks

    def _record(
        self,
        labels: dict[str, str],
        status: str,
        counts: tuple[int, int],
        started: float,
        folder: Path,
    ) -> None:
        rows, encoded = counts
        seconds = time.perf_counter() - started
        name, benchmark, split = labels["name"], labels["benchmark"], labels["split"]
        event = CacheEvent(name, status, rows, encoded, seconds, str(folder), benchmark, split)
        self.events.append(event)


def _chunk_name(number: int) -> str:
    return f"chunk-{number:05d}.npy"


def _safe(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "_"


def _read_chunk(path: Path, rows: int) -> np.ndarray | None:
    """A finished chunk of `rows` float32 rows, or None (absent or unreadable)."""
    if not path.exists():
        return None
    try:
        chunk = np.load(path)
    except (OSError, ValueError):
        return None
    return chunk if chunk.dtype == np.float32 and chunk.ndim == 2 and len(chunk) == rows else None


def _read_entry(folder: Path, ids: list[str]) -> np.ndarray | None:
    """The stored vectors of a complete entry whose ids are `ids`, else None."""
    if not (folder / META_FILE).exists():
        return None
    try:
        stored_ids = json.loads((folder / IDS_FILE).read_text())
        vectors = np.load(folder / VECTORS_FILE)
    except (OSError, ValueError):
        return None
    if stored_ids != ids or vectors.dtype != np.float32 or len(vectors) != len(ids):
        return None
    return vectors


def _write_entry(
    folder: Path,
    key: dict[str, Any],
    ids: list[str],
    vectors: np.ndarray,
    labels: dict[str, str],
) -> None:
    """Vectors and ids, then meta.json (the completion marker, with the labels of the
    lookup that computed it); then drop the chunks."""
    write_array(folder / VECTORS_FILE, vectors)
    write_json(folder / IDS_FILE, ids)
    meta = {
        **key,
        "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "computed_for": labels,
    }
    write_json(folder / META_FILE, meta)
    for partial in folder.glob("partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
