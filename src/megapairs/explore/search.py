"""Composed search over a run's corpus: a query image (a corpus record or an upload) and/or
a text, against every corpus image, exact top-k by inner product (FAISS `IndexFlatIP`).

Retrievers (`build_search_engine(run, retriever, model)`):

- `channels` (default, offline, no model): the run's own embeddings, as the score stage's
  `channels` scorer uses them. A gallery image is `[image_emb, caption_emb]` (a zero
  caption half without a caption embedding), a query `[(1 - w) image_emb(query),
  w text_enc(text)]`, image-only `[image_emb, 0]`, text-only `[0, text_enc(text)]`
  (`w = score.text_weight`). A corpus query image uses its stored embedding, an upload
  is embedded by the image channel's own encoder; texts by the caption channel's.
- `clip`, `mmret-clip`, `mmret-mllm` with a model (a local checkpoint): the retrievers
  `megapairs eval` uses. The corpus is embedded once into `<run>/explore/gallery/`
  through the evaluation's `GalleryCache` (keyed by model and gallery content) and read
  back after, also by other processes. Gallery images are read through the run
  (`RunImageRef`: the source file, or the run's `images/part-N.parquet` for archive
  sources) and decoded as the pipeline decodes them (`open_rgb`). Queries are
  `retriever.encode_queries(images, texts)` with the model's own task instruction.

The engine's gallery is built once (`build`, or `start_build` in a background thread);
`search` may then be called from several threads (models are used under a lock).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from megapairs.annotation.images import CorpusLookup, ImageUnavailable
from megapairs.corpus.images import ImageRejected, open_rgb
from megapairs.evaluation.types import ImageRef
from megapairs.models.inputs import ImageLoadError
from megapairs.redaction import redact
from megapairs.runs import RunDir, local_path, part_name
from megapairs.schemas import IMAGES_DIR, PART_STRIDE

if TYPE_CHECKING:
    from megapairs.config import PipelineConfig
    from megapairs.evaluation.cache import GalleryCache
    from megapairs.evaluation.types import Candidate

log = logging.getLogger(__name__)

RETRIEVER_NAMES = ("channels", "clip", "mmret-clip", "mmret-mllm")
GALLERY_DIR = "explore/gallery"  # the gallery cache of the retrievers, in the run
MAX_K = 1000
MAX_UPLOAD_BYTES = 20_000_000
MAX_UPLOAD_PIXELS = 50_000_000
MISSING, BUILDING, READY, ERROR = "missing", "building", "ready", "error"

Progress = Callable[[int, int], None]
"""A progress callback: (gallery images done, gallery images in all)."""


class SearchNotReady(RuntimeError):
    """The gallery is not built yet (or its build failed)."""


class SearchInputError(ValueError):
    """A query that cannot be answered: nothing to search with, an unknown record."""


class UploadError(ValueError):
    """An uploaded image that is refused."""


class UploadTooLarge(UploadError):
    """An upload over the byte or pixel limit (a decompression bomb among them)."""


class NotAnImage(UploadError):
    """An upload that PIL cannot open or decode (not an image, corrupt, truncated)."""


@dataclass(frozen=True)
class SearchHit:
    """One corpus record found, with its inner-product score."""

    id: int
    score: float


# uploads ----------------------------------------------------------------------------


def decode_upload(
    data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS
) -> Image.Image:
    """An uploaded image decoded in memory to an upright RGB image. Over `max_bytes`, or a
    header over `max_pixels` (checked before any pixel is decoded; PIL's own bomb guard
    stays on), is `UploadTooLarge`; anything PIL cannot decode is `NotAnImage`."""
    if len(data) > max_bytes:
        raise UploadTooLarge(f"the image has {len(data)} bytes, more than the {max_bytes} allowed")
    try:
        return open_rgb(bytes(data), max_pixels=max_pixels)
    except ImageRejected as err:
        if err.reason == "decompression_bomb":
            raise UploadTooLarge(f"the image is too large: {err.detail}") from err
        raise NotAnImage(f"not a readable image ({err.reason}): {err.detail}") from err
    except Exception as err:  # PIL raises many types on malformed data
        raise NotAnImage(f"not a readable image: {type(err).__name__}: {err}") from err


# the engine ---------------------------------------------------------------------------


class Backend(Protocol):
    """How one retriever embeds the gallery and the queries."""

    def gallery(self, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        """(int64 record ids, float32 vectors) of the gallery."""
        ...

    def query(self, image_id: int | None, image: Image.Image | None, text: str) -> np.ndarray:
        """One float32 query vector; `SearchInputError` for an unknown record."""
        ...


class SearchEngine:
    """A run's corpus as a searchable gallery; see the module docstring."""

    def __init__(self, backend: Backend, retriever: str, model: str | None = None) -> None:
        self.backend = backend
        self.retriever = retriever
        self.model = model
        self._state_lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._state: str = MISSING
        self._error: str | None = None
        self._done = self._total = 0
        self._thread: threading.Thread | None = None
        self._ids = np.zeros(0, np.int64)
        self._index: Any = None

    @property
    def state(self) -> str:
        """`missing`, `building`, `ready` or `error`."""
        return self._state

    @property
    def error(self) -> str | None:
        """Why the last build failed (state `error`)."""
        return self._error

    @property
    def progress(self) -> tuple[int, int]:
        """(gallery images done, in all) of the build."""
        return self._done, self._total

    @property
    def gallery_size(self) -> int:
        return len(self._ids)

    def describe(self) -> dict[str, Any]:
        done, total = self.progress
        return {
            "enabled": True,
            "retriever": self.retriever,
            "model": self.model or None,
            "state": self.state,
            "done": done,
            "total": total,
            "error": self.error,
        }

    def build(self, progress: Progress | None = None) -> None:
        """Compute (or load) the gallery and its index; nothing to do when ready. A
        failure sets state `error` with its message and is raised."""
        with self._build_lock:
            if self._state == READY:
                return
            self._set_state(BUILDING, None)

            def report(done: int, total: int) -> None:
                self._done, self._total = done, total
                if progress is not None:
                    progress(done, total)

            try:
                ids, vectors = self.backend.gallery(report)
                index = flat_index(vectors)
            except Exception as err:
                self._set_state(ERROR, redact(str(err)) or type(err).__name__)
                raise
            self._ids, self._index = ids, index
            report(len(ids), len(ids))
            self._set_state(READY, None)

    def start_build(self) -> None:
        """`build` in a background thread, unless building or ready (an error retries)."""
        with self._state_lock:
            if self._state in (BUILDING, READY):
                return
            self._state, self._error = BUILDING, None
            self._thread = threading.Thread(
                target=self._build_in_background, name="search-gallery", daemon=True
            )
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background build; True when the gallery is ready."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._state == READY

    def _build_in_background(self) -> None:
        try:
            self.build()
        except Exception:  # state and error are set by build
            log.exception("building the search gallery failed")

    def _set_state(self, state: str, error: str | None) -> None:
        with self._state_lock:
            self._state, self._error = state, error

    def search(
        self,
        *,
        image_id: int | None = None,
        image: Image.Image | None = None,
        text: str = "",
        k: int = 20,
    ) -> list[SearchHit]:
        """The top `k` (clamped to [1, MAX_K]) corpus images for a query image (a record
        id or an uploaded image) and/or a text, best first, the query record left out."""
        text = (text or "").strip()
        if image_id is not None and image is not None:
            raise SearchInputError("give a corpus image id or an uploaded image, not both")
        if image_id is None and image is None and not text:
            raise SearchInputError(
                "give a query image (a corpus record or an upload), a text, or both"
            )
        if self._state != READY:
            failed = f": {self._error}" if self._state == ERROR else ""
            raise SearchNotReady(f"the search gallery is not ready (state {self._state}){failed}")
        record = None if image_id is None else int(image_id)
        with self._model_lock:
            vector = self.backend.query(record, image, text)
        k = min(max(int(k), 1), MAX_K)
        wanted = min(k + (record is not None), len(self._ids))
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        scores, rows = self._index.search(query, wanted)
        hits = [
            SearchHit(int(self._ids[row]), float(score))
            for score, row in zip(scores[0], rows[0], strict=True)
            if row >= 0 and int(self._ids[row]) != record
        ]
        return hits[:k]


def flat_index(vectors: np.ndarray) -> Any:
    """An exact inner-product FAISS index over `vectors`."""
    import faiss

    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError("the corpus has no image to search")
    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def build_search_engine(
    run: RunDir,
    retriever: str = "channels",
    model: str | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 64,
) -> SearchEngine:
    """A search engine over `run`'s corpus with `retriever` (module docstring); the
    gallery is not built yet (`build`, `start_build`)."""
    if retriever not in RETRIEVER_NAMES:
        raise ValueError(f"unknown retriever {retriever!r}; known: {', '.join(RETRIEVER_NAMES)}")
    check_run(run)
    if retriever == "channels":
        if model:
            raise ValueError("the channels retriever uses the run's own encoders: give no model")
        return SearchEngine(ChannelsBackend(run, run_config(run), device), retriever)
    if not model:
        raise ValueError(f"retriever {retriever!r} needs a model (a checkpoint folder)")
    backend = RetrieverBackend(run, retriever, model, device, batch_size)
    return SearchEngine(backend, retriever, model)


def check_run(run: RunDir) -> None:
    """Refuse a folder that is no run, or one without a finished corpus."""
    from megapairs.corpus.store import corpus_parts

    if not run.manifest_path.exists():
        raise FileNotFoundError(f"no run at {run.uri} (it holds no manifest.json)")
    if not corpus_parts(run):
        raise FileNotFoundError(f"the run {run.uri} has no corpus yet: run `megapairs ingest`")


def run_config(run: RunDir) -> PipelineConfig:
    """The config stored in the run's manifest."""
    from megapairs.config import ConfigError, PipelineConfig

    stored = run.read_manifest().get("config")
    if not stored:
        raise ConfigError(f"the run {run.uri} holds no config in its manifest")
    return PipelineConfig.model_validate(stored)


# the channels retriever -------------------------------------------------------------


class ChannelsBackend:
    """The run's own embeddings (module docstring); encoders are loaded on first use."""

    def __init__(self, run: RunDir, config: PipelineConfig, device: str) -> None:
        from megapairs.quality.scorers import resolve_channels

        self.run, self.config, self.device = run, config, device
        self.image_channel, self.text_channel = resolve_channels(run, config)
        self.text_weight = config.score.text_weight
        self.rows: dict[int, int] = {}
        self.images = np.zeros((0, 0), np.float32)
        self.caption_dim = 0
        self._encoders: dict[str, Any] = {}

    def gallery(self, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        from megapairs.embeddings import load_channel
        from megapairs.quality.scorers import ChannelVectors

        ids, images = load_channel(self.run, self.image_channel)
        captions, _ = ChannelVectors(self.run, self.text_channel).lookup(ids.tolist())
        self.rows = {int(record): row for row, record in enumerate(ids)}
        self.images, self.caption_dim = images, captions.shape[1]
        self._encoder(self.text_channel)  # loaded with the gallery: the first query is fast
        progress(len(ids), len(ids))
        return ids, np.hstack([images, captions])

    def query(self, image_id: int | None, image: Image.Image | None, text: str) -> np.ndarray:
        picture = None
        if image_id is not None:
            if image_id not in self.rows:
                raise SearchInputError(
                    f"record {image_id} is not in the corpus, or has no embedding in the "
                    f"image channel {self.image_channel!r}"
                )
            picture = self.images[self.rows[image_id]]
        elif image is not None:
            picture = self._encoder(self.image_channel).encode_images([image])[0]
        words = self._encoder(self.text_channel).encode_texts([text])[0] if text else None
        if picture is not None and words is not None:
            w = self.text_weight
            return np.concatenate([(1.0 - w) * picture, w * words]).astype(np.float32)
        if picture is not None:
            return np.concatenate([picture, np.zeros(self.caption_dim, np.float32)])
        return np.concatenate([np.zeros(self.images.shape[1], np.float32), words])

    def _encoder(self, channel: str) -> Any:
        """The channel's encoder, built on first use (same model as the run's embed)."""
        if channel not in self._encoders:
            from megapairs.encoders.factory import build_encoder
            from megapairs.encoders.stage import loading_bars

            settings = self.config.channels[channel]
            with loading_bars(False):
                encoder = build_encoder(settings, self.device, self.config.embed.dtype)
            wanted = self.images.shape[1] if channel == self.image_channel else self.caption_dim
            if encoder.dim != wanted:
                raise ValueError(
                    f"the encoder of channel {channel!r} gives {encoder.dim}-d vectors but "
                    f"its embeddings are {wanted}-d: the channel changed since embed ran"
                )
            self._encoders[channel] = encoder
        return self._encoders[channel]


# the model retrievers -----------------------------------------------------------------


class RunImages:
    """Corpus images by record id, read through the run (`CorpusLookup`: the source
    file, or the run's image store) and decoded as the pipeline decodes them
    (`open_rgb`). Thread-safe; `on_load` sees each gallery image read."""

    def __init__(self, root: Path, lookup: CorpusLookup) -> None:
        self.root, self.lookup = root, lookup
        self.on_load: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def ids(self) -> np.ndarray:
        return np.asarray(self.lookup.ids, dtype=np.int64)

    def refs(self) -> list[RunImageRef]:
        """One ref per corpus record, in id order: `path` is the file the cache key
        stats (the source file, else the run's image store part)."""
        paths = self.lookup.table["path"].to_pylist()
        return [
            RunImageRef(self._key_path(int(record), path), record=int(record), images=self)
            for record, path in zip(self.ids(), paths, strict=True)
        ]

    def _key_path(self, record: int, path: str | None) -> Path:
        if path:
            return Path(path)
        return self.root / IMAGES_DIR / f"{part_name(record // PART_STRIDE)}.parquet"

    def has(self, record: int) -> bool:
        row = int(np.searchsorted(self.lookup.ids, record))
        return row < len(self.lookup.ids) and int(self.lookup.ids[row]) == record

    def open(self, record: int, gallery: bool = False) -> Image.Image:
        """The record's upright RGB image; `ImageLoadError` when it cannot be read."""
        try:
            with self._lock:  # the lookup keeps the last parts of the image store read
                data = self.lookup.image_bytes(record)
            image = open_rgb(data)
        except (OSError, KeyError, ImageUnavailable, ImageRejected) as err:
            raise ImageLoadError(f"cannot read the image of record {record}: {err}") from err
        image.info = {}
        if gallery and self.on_load is not None:
            with self._lock:
                self.on_load()
        return image


@dataclass(frozen=True)
class RunImageRef(ImageRef):
    """A gallery image of the gallery cache that is read through the run, not from
    `path` (the file whose size and mtime the cache key holds)."""

    record: int = -1
    images: RunImages | None = field(default=None, compare=False, repr=False)

    def open_image(self) -> Image.Image:
        """Called by the cache's image loader (`load_ref_image`)."""
        if self.images is None:
            raise ImageLoadError(f"record {self.record}: no run to read the image from")
        return self.images.open(self.record, gallery=True)


class RetrieverBackend:
    """A `megapairs eval` retriever over the corpus images (module docstring)."""

    def __init__(self, run: RunDir, kind: str, model: str, device: str, batch_size: int) -> None:
        from megapairs.encoders.stage import loading_bars
        from megapairs.evaluation.cache import GalleryCache, checkpoint_key
        from megapairs.evaluation.command import retriever_placement
        from megapairs.models.base import build_retriever

        root = local_path(run.root)
        if root is None:
            raise ValueError(f"search with retriever {kind!r} needs a local run, not {run.uri}")
        if not Path(model).exists():
            raise FileNotFoundError(f"no model at {model} (give a checkpoint folder)")
        options = retriever_placement(kind, device)
        with loading_bars(False):
            self.retriever = build_retriever(kind, model, **options)
        self.model_key = checkpoint_key(model) + f"?{json.dumps(options, sort_keys=True)}"
        self.cache: GalleryCache = GalleryCache(root / GALLERY_DIR)
        self.images = RunImages(root, CorpusLookup(run, max_side=512))
        self.batch_size = batch_size

    def items(self) -> list[Candidate]:
        from megapairs.evaluation.types import Candidate

        return [Candidate(str(ref.record), ref) for ref in self.images.refs()]

    def gallery(self, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        items = self.items()
        loaded = 0

        def on_load() -> None:
            nonlocal loaded
            loaded += 1
            progress(loaded, len(items))

        progress(0, len(items))
        self.images.on_load = on_load
        try:
            ids, vectors = self.cache.embed_items(
                items,
                name="explore",
                retriever=self.retriever,
                model_key=self.model_key,
                batch_size=self.batch_size,
            )
        finally:
            self.images.on_load = None
        return np.asarray([int(i) for i in ids], dtype=np.int64), vectors

    def query(self, image_id: int | None, image: Image.Image | None, text: str) -> np.ndarray:
        if image_id is not None:
            if not self.images.has(image_id):
                raise SearchInputError(f"record {image_id} is not in the corpus")
            try:
                image = self.images.open(image_id)
            except ImageLoadError as err:
                raise SearchInputError(str(err)) from err
        images = None if image is None else [image]
        texts = [text] if text else None
        rows = self.retriever.encode_queries(images, texts)
        return np.asarray(rows.detach().float().cpu().numpy()[0], dtype=np.float32)
