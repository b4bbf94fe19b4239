"""The ingest step: read the input, decode and validate every image, drop exact duplicates.

Two stages, so that parts can run in any order and in any process:

- `ingest.decode` (`DecodeStage`), per input part: decodes and checks every record
  (`validate_record`, pure) and writes `decoded/part-N.parquet`, a row per record
  with its id, pixel digest and corpus columns, or its reject reason; plus
  `images/part-N.parquet` (original bytes of records that have no reopenable
  local file, or of all of them with `ingest.store_images=always`).
- `ingest` (`IngestStage`): `prepare` reduces the pixel digests of every decoded part
  to `decoded/duplicates.parquet`, keeping the lowest id of each group of identical
  images (a fixed rule, so the result does not depend on part order); each part then
  writes `corpus/part-N.parquet` (kept records) and `rejects/part-N.parquet` (every
  other record, with a reason code; duplicates name the kept id).

Every input record ends in exactly one of the two tables: records == kept + rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import InputConfig, PipelineConfig
from megapairs.corpus.images import ImageLimits, ImageRejected, decode_image
from megapairs.corpus.readers import (
    InputPart,
    SourceRecord,
    file_version,
    plan_input,
    read_part,
)
from megapairs.corpus.store import (
    INGEST_STAGE,
    read_part_images,
    read_source,
    rejects_path,
    source_size,
)
from megapairs.pipeline.stage import PartProgress, Stage, StageBase
from megapairs.runs import (
    RunDir,
    as_path,
    concat_tables,
    filesystem,
    is_url,
    part_index,
    part_name,
    read_table,
    write_json,
    write_table,
)
from megapairs.schemas import (
    CORPUS_DIR,
    CORPUS_SCHEMA,
    DECODED_DIR,
    DECODED_SCHEMA,
    IMAGES_DIR,
    IMAGES_SCHEMA,
    REJECTS_SCHEMA,
    record_id,
)

PLAN_FILE = "_plan.json"
DECODE_STAGE = f"{INGEST_STAGE}.decode"
DUPLICATES_FILE = "duplicates.parquet"
DUPLICATES_SCHEMA = pa.schema([("id", pa.int64()), ("duplicate_of", pa.int64())])

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
    """The bytes of an image file (local, or a URL on object storage), refusing oversized
    files before reading them."""
    if path is None:
        raise ImageRejected("no_image", "the record has neither image bytes nor a file path")
    try:
        size = source_size(path)
        if size > limits.max_bytes:
            raise ImageRejected(
                "too_large_file", f"file has {size} bytes, more than the {limits.max_bytes} allowed"
            )
        return read_source(path)
    except FileNotFoundError as err:
        raise ImageRejected("missing_file", f"image file {path!r} does not exist") from err
    except OSError as err:
        raise ImageRejected("unreadable", f"cannot read image file {path!r}: {err}") from err


# decoding one part: every record with its id, validity and stored bytes ------------


@dataclass
class DecodedPart:
    """One part after decoding: a row per record, and the bytes to keep in the run."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        invalid = sum(row["reason"] is not None for row in self.rows)
        return {"records": len(self.rows), "valid": len(self.rows) - invalid, "invalid": invalid}


def decode_part(outcomes: Iterable[Outcome], index: int, store_images: str) -> DecodedPart:
    """Give each outcome its id (part index, position) and build its decoded row."""
    store = STORE_POLICIES[store_images]
    decoded = DecodedPart()
    for position, outcome in enumerate(outcomes):
        rid = record_id(index, position)
        if isinstance(outcome, RejectedRecord):
            decoded.rows.append(_rejected_row(rid, outcome))
            continue
        stored = store(outcome.path)
        decoded.rows.append(_corpus_row(rid, outcome, None if stored else outcome.path))
        if stored:
            decoded.images.append({"id": rid, "image": outcome.data})
    return decoded


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
        "reason": None,
        "detail": None,
    }


def _rejected_row(rid: int, record: RejectedRecord) -> dict[str, Any]:
    empty = dict.fromkeys(CORPUS_SCHEMA.names)
    return {
        **empty,
        "id": rid,
        "key": record.key,
        "uri": record.uri,
        "has_caption": False,
        "reason": record.reason,
        "detail": record.detail,
    }


# duplicates over all parts: a reduce with a fixed rule ------------------------------


def find_duplicates(decoded: pa.Table) -> pa.Table:
    """(id, duplicate_of) of every valid record whose pixels an earlier id also has: the
    lowest id of each group is kept, whatever order the parts were decoded in."""
    valid = decoded.filter(pc.is_null(decoded["reason"])).select(["id", "pixel_sha256"])
    keepers = valid.group_by("pixel_sha256").aggregate([("id", "min")])
    joined = valid.join(keepers, "pixel_sha256")
    duplicates = joined.filter(pc.not_equal(joined["id"], joined["id_min"]))
    table = pa.table(
        {"id": duplicates["id"], "duplicate_of": duplicates["id_min"]}, schema=DUPLICATES_SCHEMA
    )
    return table.sort_by("id")


def split_part(
    decoded: pa.Table, duplicates: dict[int, int]
) -> tuple[pa.Table, pa.Table, set[int]]:
    """A part's corpus rows (valid, not duplicates), its rejects and the duplicate ids."""
    kept, rejects = [], []
    for row in decoded.to_pylist():
        reason, detail = row.pop("reason"), row.pop("detail")
        of = duplicates.get(row["id"])
        if reason is None and of is None:
            kept.append(row)
            continue
        if of is not None:
            reason, detail = "duplicate", f"same pixels as record {of}"
        rejects.append(
            {
                "id": row["id"],
                "key": row["key"],
                "uri": row["uri"],
                "stage": INGEST_STAGE,
                "reason": reason,
                "detail": detail,
                "duplicate_of": of,
            }
        )
    corpus = pa.Table.from_pylist(kept, schema=CORPUS_SCHEMA)
    dropped = {r["id"] for r in rejects if r["duplicate_of"] is not None}
    return corpus, pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), dropped


def ingest_counts(corpus: pa.Table, rejects: pa.Table, duplicates: int) -> dict[str, int]:
    return {
        "records": corpus.num_rows + rejects.num_rows,
        "kept": corpus.num_rows,
        "rejected": rejects.num_rows,
        "duplicates": duplicates,
        "no_caption": corpus.num_rows - int(pc.sum(corpus["has_caption"]).as_py() or 0),
    }


# the plan ---------------------------------------------------------------------------


def load_or_create_plan(run: RunDir, config: InputConfig) -> list[InputPart]:
    """The input parts stored in the run, or a fresh plan stored atomically.

    A stored plan is reused as long as the input config is unchanged, so a resume
    reads the same records into the same parts even if files were added since.
    """
    path = run.folder(CORPUS_DIR) / PLAN_FILE
    wanted = config.model_dump(mode="json")
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("input") == wanted:
            parts = [InputPart.from_json(p) for p in stored["parts"]]
            _check_sources_unchanged(stored.get("sources", {}), parts)
            return parts
    parts = plan_input(config)
    plan = {"input": wanted, "parts": [p.to_json() for p in parts]}
    write_json(path, {**plan, "sources": source_stamps(parts)})
    return parts


def stored_plan(run: RunDir, config: InputConfig) -> list[InputPart]:
    """The input parts `load_or_create_plan` stored for `config` (on the driver), read back
    without a second check of every source file (workers, the filter step)."""
    path = run.folder(CORPUS_DIR) / PLAN_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored.get("input") != config.model_dump(mode="json"):
        raise RuntimeError(
            f"{path} holds no plan for this input config: run the {DECODE_STAGE} step first"
        )
    return [InputPart.from_json(p) for p in stored["parts"]]


def source_stamps(parts: list[InputPart]) -> dict[str, list[int | str]]:
    """(size, mtime_ns) of every local input file the parts read rows or members from;
    (size, ETag or modification time) of a remote one."""
    files = sorted({p.source for p in parts if _is_file(p.source)})
    return {f: _stamp(f) for f in files}


def _is_file(source: str) -> bool:
    if is_url(source):
        fs, key = filesystem(as_path(source))
        return bool(fs.isfile(key))
    return Path(source).is_file()


def _stamp(source: str) -> list[int | str]:
    version, size = file_version(source)
    return [size, version if isinstance(version, int) else str(version)]


def _check_sources_unchanged(stored: dict[str, list[int | str]], parts: list[InputPart]) -> None:
    """Refuse to resume over a manifest, Parquet file or tar that changed since planning:
    its records would shift under the same ids."""
    current = source_stamps(parts)
    changed = sorted(f for f, stamp in stored.items() if current.get(f) != stamp)
    if changed:
        raise RuntimeError(
            f"input changed since this run planned it: {', '.join(changed)} "
            "(size or modification time differ); use a new --run directory"
        )


# the stages ---------------------------------------------------------------------------


class DecodeStage(StageBase):
    """Stage `ingest.decode`: input records -> decoded/part-N (+ images/part-N), per part
    and independent of every other part."""

    name = DECODE_STAGE
    config_sections = ("input", "ingest")

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def plan(self, run: RunDir) -> list[str]:
        return [part_name(i) for i in range(len(load_or_create_plan(run, self.config.input)))]

    def setup(self, run: RunDir) -> list[InputPart]:
        """The stored input plan (made and checked by `plan` on the driver)."""
        return stored_plan(run, self.config.input)

    def run_part(
        self, run: RunDir, part: str, state: list[InputPart], progress: PartProgress
    ) -> dict[str, int]:
        index = part_index(part)
        limits = ImageLimits.from_config(self.config.ingest)
        outcomes = (validate_record(record, limits) for record in read_part(state[index]))
        decoded = decode_part(outcomes, index, self.config.ingest.store_images)
        write_images(run, part, decoded.images)
        write_table(
            run.part_path(DECODED_DIR, part), pa.Table.from_pylist(decoded.rows, DECODED_SCHEMA)
        )
        return decoded.counts()


def write_images(run: RunDir, part: str, images: list[dict[str, Any]]) -> None:
    """images/part-N.parquet with `images`, or no file (and no stale one) if none."""
    path = run.part_path(IMAGES_DIR, part)
    if images:
        write_table(path, pa.Table.from_pylist(images, schema=IMAGES_SCHEMA))
    else:
        path.unlink(missing_ok=True)


class IngestStage(StageBase):
    """Stage `ingest`: decoded parts -> corpus and rejects tables, exact duplicates
    across all parts rejected in favour of the lowest id (a reduce in `prepare`)."""

    name = INGEST_STAGE
    config_sections = ("input", "ingest")

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def plan(self, run: RunDir) -> list[str]:
        """The parts `ingest.decode` planned (its plan checked the input files)."""
        return [part_name(i) for i in range(len(stored_plan(run, self.config.input)))]

    def prepare(self, run: RunDir) -> None:
        """Find the duplicates over every decoded part; write them to decoded/."""
        parts = self.plan(run)
        missing = [p for p in parts if not run.is_done(DECODE_STAGE, p)]
        if missing:
            raise RuntimeError(
                f"{DECODE_STAGE} has not finished {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; run the ingest step again"
            )
        if not self.config.ingest.dedupe:
            duplicates = DUPLICATES_SCHEMA.empty_table()
        else:
            paths = [run.part_path(DECODED_DIR, p) for p in parts]
            decoded = concat_tables(paths, DECODED_SCHEMA, ["id", "pixel_sha256", "reason"])
            duplicates = find_duplicates(decoded)
        write_table(run.folder(DECODED_DIR) / DUPLICATES_FILE, duplicates)

    def setup(self, run: RunDir) -> dict[int, int]:
        """Duplicate id -> kept id, as `prepare` found them."""
        table = read_table(run.folder(DECODED_DIR) / DUPLICATES_FILE)
        return dict(zip(table["id"].to_pylist(), table["duplicate_of"].to_pylist(), strict=True))

    def run_part(
        self, run: RunDir, part: str, state: dict[int, int], progress: PartProgress
    ) -> dict[str, int]:
        decoded = read_table(run.part_path(DECODED_DIR, part))
        corpus, rejects, dropped = split_part(decoded, state)
        if dropped:
            images = read_part_images(run, part)
            kept = [{"id": i, "image": data} for i, data in images.items() if i not in dropped]
            write_images(run, part, kept)
        write_table(rejects_path(run, INGEST_STAGE, part), rejects)
        write_table(run.part_path(CORPUS_DIR, part), corpus)
        return ingest_counts(corpus, rejects, len(dropped))


def ingest_stages(config: PipelineConfig) -> list[Stage]:
    """The ingest step: decode every part, then keep or reject each record."""
    return [DecodeStage(config), IngestStage(config)]
