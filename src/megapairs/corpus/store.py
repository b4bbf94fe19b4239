"""Reading the ingest stage's tables back: corpus rows, rejects, image bytes; and reading
source image files, local or on object storage (a URL such as `s3://bucket/a.jpg`)."""

from __future__ import annotations

import os

import pyarrow as pa

from megapairs.runs import (
    AnyPath,
    RunDir,
    as_path,
    concat_tables,
    filesystem,
    is_url,
    list_files,
    read_bytes,
    read_table,
)
from megapairs.schemas import CORPUS_DIR, CORPUS_SCHEMA, IMAGES_DIR, REJECTS_DIR, REJECTS_SCHEMA

INGEST_STAGE = "ingest"


def corpus_parts(run: RunDir) -> list[str]:
    """Names of the finished ingest parts, in order."""
    return run.done_parts(INGEST_STAGE)


def read_corpus(run: RunDir, part: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The corpus table of one finished part, or of all of them."""
    if part is not None:
        return read_table(run.part_path(CORPUS_DIR, part), columns)
    return concat_tables(run.files(CORPUS_DIR, INGEST_STAGE), CORPUS_SCHEMA, columns)


def rejects_path(run: RunDir, stage: str, part: str) -> AnyPath:
    """Where `stage` writes the rejects of `part`: rejects/part-N (ingest) or
    rejects/<stage>-part-N (later stages)."""
    name = part if stage == INGEST_STAGE else f"{stage}-{part}"
    return run.part_path(REJECTS_DIR, name)


def read_rejects(run: RunDir) -> pa.Table:
    """The rejects of every finished part of every stage, in file order."""
    paths = []
    for path in list_files(run.folder(REJECTS_DIR), "*part-*.parquet"):
        stage, sep, index = path.stem.rpartition("-part-")
        stage, part = (stage, f"part-{index}") if sep else (INGEST_STAGE, path.stem)
        if run.is_done(stage, part):
            paths.append(path)
    return concat_tables(paths, REJECTS_SCHEMA)


def read_part_images(run: RunDir, part: str) -> dict[int, bytes]:
    """Image bytes stored by ingest for one part (empty when images are read from paths)."""
    path = run.part_path(IMAGES_DIR, part)
    if not path.exists():
        return {}
    table = read_table(path)
    return dict(zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True))


def load_image_bytes(record_id: int, path: str | None, stored: dict[int, bytes]) -> bytes:
    """The image bytes of a corpus record: from the run's image store or its source file."""
    if record_id in stored:
        return stored[record_id]
    if path is None:
        raise FileNotFoundError(f"record {record_id} has neither stored bytes nor a source path")
    return read_source(path)


def source_size(path: str) -> int:
    """The size in bytes of a source file (a local path or a URL), without reading it."""
    if not is_url(path):
        return os.stat(path).st_size
    fs, key = filesystem(as_path(path))
    return int(fs.size(key))


def read_source(path: str) -> bytes:
    """The bytes of a source file: a local path or a URL."""
    return read_bytes(as_path(path))
