"""Images for the explorer, by record id only: corpus records (from their source file or the
run's image store) and rejected input records whose source file is still there.

Thumbnails are decoded on demand and cached on disk (JPEG, `THUMB_SIDE` px), written
atomically so a killed server leaves no half file. A full image is served as its original
bytes when browsers show that format, else re-encoded as PNG; the content type always
comes from the decoded format, never from a file name.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import pyarrow.compute as pc
from PIL import Image

from megapairs.corpus.images import ImageRejected, open_rgb
from megapairs.corpus.store import read_source
from megapairs.explore.cache import cache_root
from megapairs.runs import RunDir, atomic_path, is_url, part_name, read_table
from megapairs.schemas import CORPUS_DIR, DECODED_DIR, IMAGES_DIR, PART_STRIDE

THUMB_SIDE = 256
THUMB_QUALITY = 85
BROWSER_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
MAX_RECORD_ID = 2**63 - 1
THUMBNAILS = "thumbnails"


class ImageNotFound(LookupError):
    """No record with this id, or no bytes kept for it (a 404)."""


class ImageUndecodable(ValueError):
    """The record's bytes do not decode as an image (a 422)."""


class RecordImages:
    """Image bytes and thumbnails of a run's records."""

    def __init__(self, run: RunDir, cache_dir: Path | None = None) -> None:
        self.run = run
        self.cache_dir = cache_dir or cache_root(run) / THUMBNAILS
        self._sources: OrderedDict[str, dict[int, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def thumbnail(self, record_id: int) -> bytes:
        """A JPEG of at most THUMB_SIDE px per side, from the disk cache when there."""
        cached = self.cache_dir / part_name(record_id // PART_STRIDE) / f"{record_id}.jpg"
        if cached.exists():
            return cached.read_bytes()
        data = self.source_bytes(record_id)
        try:
            image = open_rgb(data, draft_size=(THUMB_SIDE * 2, THUMB_SIDE * 2))
        except ImageRejected as err:
            raise ImageUndecodable(f"record {record_id}: {err.detail}") from err
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=THUMB_QUALITY)
        with atomic_path(cached) as temp:
            temp.write_bytes(buffer.getvalue())
        return buffer.getvalue()

    def full(self, record_id: int) -> tuple[bytes, str]:
        """The image and its content type: the original bytes for formats browsers show."""
        data = self.source_bytes(record_id)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                kind = probe.format
        except Exception as err:  # PIL raises many types on malformed headers
            raise ImageUndecodable(f"record {record_id} is not a readable image") from err
        if kind in BROWSER_FORMATS:
            return data, BROWSER_FORMATS[kind]
        try:
            image = open_rgb(data)
        except ImageRejected as err:
            raise ImageUndecodable(f"record {record_id}: {err.detail}") from err
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue(), "image/png"

    def source_bytes(self, record_id: int) -> bytes:
        """The record's original bytes: the run's image store, else its source file."""
        if not 0 <= record_id <= MAX_RECORD_ID:
            raise ImageNotFound(f"no record {record_id}")
        part = part_name(record_id // PART_STRIDE)
        stored = self._stored(part, record_id)
        if stored is not None:
            return stored
        sources = self._part_sources(part)
        if record_id not in sources:
            raise ImageNotFound(f"no record {record_id} in this run")
        path = sources[record_id]
        if path is None:
            raise ImageNotFound(f"record {record_id} has no source file and no stored bytes")
        try:
            return read_source(path)
        except OSError as err:
            raise ImageNotFound(f"the source file of record {record_id} cannot be read") from err

    def _stored(self, part: str, record_id: int) -> bytes | None:
        path = self.run.part_path(IMAGES_DIR, part)
        if not path.exists():
            return None
        rows = read_table(path, filters=pc.field("id") == record_id)["image"].to_pylist()
        return rows[0] if rows else None

    def _part_sources(self, part: str) -> dict[int, str | None]:
        """id -> source path of every input record of a part (kept or rejected)."""
        with self._lock:
            if part in self._sources:
                self._sources.move_to_end(part)
                return self._sources[part]
        sources: dict[int, str | None] = {}
        for folder in (DECODED_DIR, CORPUS_DIR):
            path = self.run.part_path(folder, part)
            if path.exists():
                table = read_table(path, columns=["id", "path", "uri"])
                columns = [table[c].to_pylist() for c in ("id", "path", "uri")]
                for record, source, uri in zip(*columns, strict=True):
                    sources[record] = source or _openable(uri)
        with self._lock:
            self._sources[part] = sources
            while len(self._sources) > 8:
                self._sources.popitem(last=False)
        return sources


def _openable(uri: str | None) -> str | None:
    """A rejected record's uri when it names a file that can be read again (a local file or
    an object-store URL; not a member of an archive)."""
    if uri is None:
        return None
    if is_url(uri):
        return uri
    return uri if Path(uri).is_file() else None
