"""Images and captions of the records a part's pairs name, prepared for the describer.

Captions and paths of the whole corpus are read once (id, path, caption columns:
Arrow strings, no Python objects per record). Images are reopened from their
source file, or from the run's image store for sources without one (WebDataset,
Parquet bytes), resized to fit `max_side` and re-encoded as JPEG, which every
server accepts.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import pyarrow as pa

from megapairs.corpus.images import open_rgb
from megapairs.corpus.store import load_image_bytes, read_corpus, read_part_images
from megapairs.runs import RunDir, part_name
from megapairs.schemas import PART_STRIDE

JPEG_QUALITY = 90
STORED_PARTS_CACHED = 4


class ImageUnavailable(Exception):
    """A record's image can no longer be read (file gone or changed since ingest)."""


class CorpusLookup:
    """Caption and image of a corpus record by id."""

    def __init__(self, run: RunDir, max_side: int) -> None:
        self.run = run
        self.max_side = max_side
        table = read_corpus(run, columns=["id", "path", "caption"])
        order = np.argsort(table["id"].to_numpy())
        self.ids = table["id"].to_numpy()[order]
        self.table: pa.Table = table.take(pa.array(order))
        self._stored = lru_cache(maxsize=STORED_PARTS_CACHED)(self._stored_part)

    def _row(self, record_id: int) -> int:
        row = int(np.searchsorted(self.ids, record_id))
        if row >= len(self.ids) or self.ids[row] != record_id:
            raise KeyError(f"record {record_id} is not in the run's corpus")
        return row

    def caption(self, record_id: int) -> str | None:
        return self.table["caption"][self._row(record_id)].as_py()

    def _stored_part(self, part: str) -> dict[int, bytes]:
        return read_part_images(self.run, part)

    def image_bytes(self, record_id: int) -> bytes:
        path = self.table["path"][self._row(record_id)].as_py()
        stored = {} if path else self._stored(part_name(record_id // PART_STRIDE))
        try:
            return load_image_bytes(record_id, path, stored)
        except OSError as err:
            raise ImageUnavailable(f"record {record_id}: cannot read {path}: {err}") from err

    def prepared_image(self, record_id: int) -> bytes:
        """The record's image, fitted into max_side x max_side, as JPEG bytes."""
        data = self.image_bytes(record_id)
        try:
            image = open_rgb(data, draft_size=(self.max_side, self.max_side))
        except Exception as err:  # decoding errors of PIL are many kinds
            raise ImageUnavailable(f"record {record_id}: cannot decode: {err}") from err
        image.thumbnail((self.max_side, self.max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()
