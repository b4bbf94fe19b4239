"""The ingest stage: read the input, decode and validate every image, drop exact duplicates.

Per part it writes `corpus/part-N.parquet` (kept records), `rejects/part-N.parquet`
(every other record, with a reason code), and `images/part-N.parquet` (original
bytes of kept records that have no reopenable local file, or of all of them with
`ingest.store_images=always`). Every input record ends in exactly one of the first
two tables: records == kept + rejected.

The work is split in two so a parallel runner can spread the costly half:
`validate_record` is pure and per record (decode, limits, hashes, caption), while
`assemble_part` is the ordered step (ids, duplicate detection, rows). Duplicate
detection across parts assumes parts are assembled in part order, as `LocalRunner`
does: the first occurrence in part order is kept, later ones point to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from megapairs.config import InputConfig, PipelineConfig
from megapairs.corpus.images import ImageLimits, ImageRejected, decode_image
from megapairs.corpus.readers import InputPart, SourceRecord, plan_input, read_part
from megapairs.corpus.store import INGEST_STAGE, rejects_path
from megapairs.runs import RunDir, part_index, part_name, read_table, write_json, write_table
from megapairs.schemas import (
    CORPUS_DIR,
    CORPUS_SCHEMA,
    IMAGES_DIR,
    IMAGES_SCHEMA,
    REJECTS_SCHEMA,
    record_id,
)

PLAN_FILE = "_plan.json"

# ingest.store_images -> whether a kept record's bytes go to images/, given its local path.
STORE_POLICIES: dict[str, Callable[[str | None], bool]] = {
    "always": lambda path: True,
    "auto": lambda path: path is None,
    "never": lambda path: False,
}


# the pure, per-record step ----------------------------------------------------


@dataclass(frozen=True)
class ValidRecord:
    """A record whose image decoded and passed the limits."""

    key: str
    uri: str
    path: str | None
    data: bytes
    sha256: str
    pixel_sha256: str
    width: int
    height: int
    source_format: str
    source_mode: str
    caption: str | None


@dataclass(frozen=True)
class RejectedRecord:
    """A record that cannot be used, with a reason code and a sentence."""

    key: str
    uri: str
    reason: str
    detail: str


Outcome = ValidRecord | RejectedRecord


def clean_caption(text: str | None) -> str | None:
    """The caption stripped of surrounding whitespace; None when missing or blank."""
    if text is None:
        return None
    stripped = text.strip()
    return stripped or None


def validate_record(record: SourceRecord, limits: ImageLimits) -> Outcome:
    """Decode and check one record's image; never raises for a bad record."""
    if record.error is not None:
        reason, detail = record.error
        return RejectedRecord(record.key, record.uri, reason, detail)
    try:
        data = record.data if record.data is not None else _read_local(record.path, limits)
        decoded = decode_image(data, limits)
    except ImageRejected as err:
        return RejectedRecord(record.key, record.uri, err.reason, err.detail)
    return ValidRecord(
        key=record.key,
        uri=record.uri,
        path=record.path,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        pixel_sha256=decoded.pixel_sha256,
        width=decoded.width,
        height=decoded.height,
        source_format=decoded.source_format,
        source_mode=decoded.source_mode,
        caption=clean_caption(record.caption),
    )


def _read_local(path: str | None, limits: ImageLimits) -> bytes:
    """The bytes of a local image file, refusing oversized files before reading them."""
    if path is None:
        raise ImageRejected("no_image", "the record has neither image bytes nor a file path")
    try:
        size = os.stat(path).st_size
        if size > limits.max_bytes:
            raise ImageRejected(
                "too_large_file", f"file has {size} bytes, more than the {limits.max_bytes} allowed"
            )
        return Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ImageRejected("missing_file", f"image file {path!r} does not exist") from err
    except OSError as err:
        raise ImageRejected("unreadable", f"cannot read image file {path!r}: {err}") from err


# the ordered step: ids, duplicates, rows -----------------------------------------


class SeenImages:
    """Pixel digest -> id of the first kept record with those pixels."""

    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def kept_before(self, digest: str, before_id: int) -> int | None:
        """The kept id with `digest` that precedes `before_id` in part order, if any."""
        kept = self._first.get(digest)
        return kept if kept is not None and kept < before_id else None

    def add(self, digest: str, kept_id: int) -> None:
        self._first[digest] = min(kept_id, self._first.get(digest, kept_id))

    def add_table(self, table: pa.Table) -> None:
        """Add the (id, pixel_sha256) rows of a finished corpus table."""
        ids, digests = table.column("id").to_pylist(), table.column("pixel_sha256").to_pylist()
        for kept_id, digest in zip(ids, digests, strict=True):
            self.add(digest, kept_id)

    def __len__(self) -> int:
        return len(self._first)


@dataclass
class PartTables:
    """One part's output rows and counts."""

    corpus: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0

    def counts(self) -> dict[str, int]:
        kept, rejected = len(self.corpus), len(self.rejects)
        return {
            "records": kept + rejected,
            "kept": kept,
            "rejected": rejected,
            "duplicates": self.duplicates,
            "no_caption": sum(not row["has_caption"] for row in self.corpus),
        }

    def reject(
        self, rid: int, key: str, uri: str, reason: str, detail: str, of: int | None = None
    ) -> None:
        self.rejects.append(
            {
                "id": rid,
                "key": key,
                "uri": uri,
                "stage": INGEST_STAGE,
                "reason": reason,
                "detail": detail,
                "duplicate_of": of,
            }
        )


def assemble_part(
    outcomes: Iterable[Outcome], index: int, seen: SeenImages | None, store_images: str
) -> PartTables:
    """Give each outcome its id, reject exact duplicates (when `seen` is given), build rows."""
    store = STORE_POLICIES[store_images]
    tables = PartTables()
    for position, outcome in enumerate(outcomes):
        rid = record_id(index, position)
        if isinstance(outcome, RejectedRecord):
            tables.reject(rid, outcome.key, outcome.uri, outcome.reason, outcome.detail)
            continue
        kept = seen.kept_before(outcome.pixel_sha256, rid) if seen is not None else None
        if kept is not None:
            detail = f"same pixels as record {kept}"
            tables.reject(rid, outcome.key, outcome.uri, "duplicate", detail, of=kept)
            tables.duplicates += 1
            continue
        if seen is not None:
            seen.add(outcome.pixel_sha256, rid)
        stored = store(outcome.path)
        tables.corpus.append(_corpus_row(rid, outcome, None if stored else outcome.path))
        if stored:
            tables.images.append({"id": rid, "image": outcome.data})
    return tables


def _corpus_row(rid: int, record: ValidRecord, path: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "key": record.key,
        "uri": record.uri,
        "path": path,
        "sha256": record.sha256,
        "pixel_sha256": record.pixel_sha256,
        "width": record.width,
        "height": record.height,
        "source_format": record.source_format,
        "source_mode": record.source_mode,
        "caption": record.caption,
        "has_caption": record.caption is not None,
    }


# the stage ------------------------------------------------------------------------


def load_or_create_plan(run: RunDir, config: InputConfig) -> list[InputPart]:
    """The input parts stored in the run, or a fresh plan stored atomically.

    A stored plan is reused as long as the input config is unchanged, so a resume
    reads the same records into the same parts even if files were added since.
    """
    path = run.folder(CORPUS_DIR) / PLAN_FILE
    wanted = config.model_dump(mode="json")
    if path.exists():
        stored = _read_json(path)
        if stored.get("input") == wanted:
            parts = [InputPart.from_json(p) for p in stored["parts"]]
            _check_sources_unchanged(stored.get("sources", {}), parts)
            return parts
    parts = plan_input(config)
    plan = {"input": wanted, "parts": [p.to_json() for p in parts]}
    write_json(path, {**plan, "sources": source_stamps(parts)})
    return parts


def source_stamps(parts: list[InputPart]) -> dict[str, list[int]]:
    """(size, mtime_ns) of every input file the parts read rows or members from."""
    files = sorted({p.source for p in parts if Path(p.source).is_file()})
    return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


def _check_sources_unchanged(stored: dict[str, list[int]], parts: list[InputPart]) -> None:
    """Refuse to resume over a manifest, Parquet file or tar that changed since planning:
    its records would shift under the same ids."""
    current = source_stamps(parts)
    changed = sorted(f for f, stamp in stored.items() if current.get(f) != stamp)
    if changed:
        raise RuntimeError(
            f"input changed since this run planned it: {', '.join(changed)} "
            "(size or modification time differ); use a new --run directory"
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


class IngestStage:
    """Stage `ingest`: input records -> corpus, rejects and image-store tables."""

    name = INGEST_STAGE
    config_sections = ("input", "ingest")

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.limits = ImageLimits.from_config(config.ingest)
        self._plans: dict[Path, list[InputPart]] = {}
        self._seen: dict[Path, SeenImages] = {}

    def plan(self, run: RunDir) -> list[str]:
        return [part_name(i) for i in range(len(self._input_parts(run)))]

    def prepare(self, run: RunDir) -> None:
        """Nothing shared to build: the plan is made by `plan`, the seen-set lazily."""

    def run_part(self, run: RunDir, part: str) -> dict[str, int]:
        index = part_index(part)
        source = self._input_parts(run)[index]
        outcomes = (validate_record(record, self.limits) for record in read_part(source))
        seen = self._seen_images(run) if self.config.ingest.dedupe else None
        tables = assemble_part(outcomes, index, seen, self.config.ingest.store_images)
        self._write(run, part, tables)
        return tables.counts()

    def _input_parts(self, run: RunDir) -> list[InputPart]:
        if run.root not in self._plans:
            self._plans[run.root] = load_or_create_plan(run, self.config.input)
        return self._plans[run.root]

    def _seen_images(self, run: RunDir) -> SeenImages:
        """Digests of the finished parts' kept records, read once, then kept up to date."""
        if run.root not in self._seen:
            seen = SeenImages()
            for path in run.files(CORPUS_DIR, INGEST_STAGE):
                seen.add_table(read_table(path, ["id", "pixel_sha256"]))
            self._seen[run.root] = seen
        return self._seen[run.root]

    def _write(self, run: RunDir, part: str, tables: PartTables) -> None:
        images_path = run.part_path(IMAGES_DIR, part)
        if tables.images:
            write_table(images_path, pa.Table.from_pylist(tables.images, schema=IMAGES_SCHEMA))
        else:
            images_path.unlink(missing_ok=True)  # a stale file from an interrupted run
        write_table(
            rejects_path(run, INGEST_STAGE, part),
            pa.Table.from_pylist(tables.rejects, schema=REJECTS_SCHEMA),
        )
        write_table(
            run.part_path(CORPUS_DIR, part),
            pa.Table.from_pylist(tables.corpus, schema=CORPUS_SCHEMA),
        )
