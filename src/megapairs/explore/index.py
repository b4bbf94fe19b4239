"""The explorer's pair index: one compact Arrow row per mined pair, joined with its
annotation status, filtered, sorted and paged on the server.

The index holds only scalar columns (ids, the channel set as a bitmask-derived combination
name, one float column per channel's score, status, backend, instruction count, first
instruction, failure reason), built once from the finished `pairs/`, `annotations/` and
`annotation_failures/` parts and rebuilt when a stage marks another part done. Instruction
text search scans the annotations' `instructions` column on demand.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs.explore.cache import cache_root
from megapairs.runs import RunDir, concat_tables, list_files, part_name, read_table, write_table
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    PAIRS_DIR,
    PAIRS_SCHEMA,
    PART_STRIDE,
)

MINE_STAGE, ANNOTATE_STAGE = "mine", "annotate"
STATUSES = ("annotated", "failed", "pending")
SORT_KEYS = ("order", "instructions")
MAX_LIMIT = 500
INDEX_VERSION = 1  # of the cached index's columns
MAX_QUERY_CHARS = 200
_SCORE_FILTER = re.compile(r"^([^:]+):([^:]*):([^:]*)$")


class FilterError(ValueError):
    """A filter or sort a request cannot be answered with (shown as a 400)."""


def score_column(channel: str) -> str:
    return f"score:{channel}"


@dataclass(frozen=True)
class ScoreRange:
    channel: str
    low: float | None
    high: float | None


@dataclass
class PairFilter:
    """What `/api/pairs` asks for; `parse` checks every value against the run's channels."""

    offset: int = 0
    limit: int = 50
    sort: str = "order"
    channels: list[str] = field(default_factory=list)
    combo: str | None = None
    scores: list[ScoreRange] = field(default_factory=list)
    backend: str | None = None
    min_instructions: int | None = None
    max_instructions: int | None = None
    text: str | None = None
    status: str | None = None
    failure: str | None = None
    flagged: bool | None = None

    @classmethod
    def parse(cls, params: dict[str, list[str]], known: list[str]) -> PairFilter:
        """From query parameters (name -> values); FilterError names what is wrong."""
        one = {name: values[-1] for name, values in params.items() if values}
        unknown = set(params) - FILTER_PARAMS
        if unknown:
            raise FilterError(
                f"unknown filter(s) {sorted(unknown)}; known: {sorted(FILTER_PARAMS)}"
            )
        chosen = cls(
            offset=_int(one, "offset", 0, 0, None) or 0,
            limit=_int(one, "limit", 50, 1, MAX_LIMIT) or 50,
            sort=_sort(one.get("sort", "order"), known),
            channels=[_channel(c, known) for c in _split(params.get("channel", []))],
            combo=_combo(one.get("combo"), known),
            scores=[_score_range(v, known) for v in params.get("score", []) if v],
            backend=one.get("backend") or None,
            min_instructions=_int(one, "min_instructions", None, 0, None),
            max_instructions=_int(one, "max_instructions", None, 0, None),
            text=_text(one.get("q")),
            status=_choice(one.get("status"), STATUSES, "status"),
            failure=one.get("failure") or None,
            flagged=_yes_no(one.get("flagged")),
        )
        return chosen


FILTER_PARAMS = frozenset(
    {
        "offset", "limit", "sort", "channel", "combo", "score", "backend", "min_instructions",
        "max_instructions", "q", "status", "failure", "flagged", "token",
    }
)  # fmt: skip


def _split(values: list[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def _int(one: dict[str, str], name: str, default: int | None, low: int, high: int | None):
    raw = one.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FilterError(f"{name} must be a whole number, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FilterError(f"{name} must be {bound}, got {value}")
    return value


def _channel(name: str, known: list[str]) -> str:
    if name not in known:
        raise FilterError(f"unknown channel {name!r}; this run's channels: {known}")
    return name


def _combo(raw: str | None, known: list[str]) -> str | None:
    if not raw:
        return None
    names = [_channel(n, known) for n in raw.split("+")]
    return combo_name(names, known)


def _score_range(raw: str, known: list[str]) -> ScoreRange:
    match = _SCORE_FILTER.match(raw)
    if not match:
        raise FilterError(f"score filter {raw!r} is not CHANNEL:LOW:HIGH (a bound may be empty)")
    channel, low, high = match.groups()
    bounds = []
    for text in (low, high):
        try:
            bounds.append(float(text) if text else None)
        except ValueError:
            raise FilterError(f"score filter {raw!r}: {text!r} is not a number") from None
    return ScoreRange(_channel(channel, known), bounds[0], bounds[1])


def _sort(raw: str, known: list[str]) -> str:
    key = raw.removeprefix("-")
    if key in SORT_KEYS:
        return raw
    if key.startswith("score:") and key.removeprefix("score:") in known:
        return raw
    choices = [*SORT_KEYS, *(score_column(c) for c in known)]
    raise FilterError(f"cannot sort by {raw!r}; choose one of {choices} (prefix - to reverse)")


def _text(raw: str | None) -> str | None:
    if not raw or not raw.strip():
        return None
    if len(raw) > MAX_QUERY_CHARS:
        raise FilterError(f"q is longer than {MAX_QUERY_CHARS} characters")
    return raw.strip()


def _choice(raw: str | None, choices: tuple[str, ...], name: str) -> str | None:
    if not raw:
        return None
    if raw not in choices:
        raise FilterError(f"{name} must be one of {list(choices)}, got {raw!r}")
    return raw


def _yes_no(raw: str | None) -> bool | None:
    if not raw:
        return None
    if raw not in ("yes", "no"):
        raise FilterError(f"flagged must be yes or no, got {raw!r}")
    return raw == "yes"


def combo_name(channels: list[str], known: list[str]) -> str:
    """A channel set's name: its channels in config order, joined with +."""
    present = set(channels)
    return "+".join(c for c in known if c in present)


# building ---------------------------------------------------------------------------


def run_signature(run: RunDir) -> tuple[str, ...]:
    """What the index depends on: the finished mine and annotate parts (their markers'
    names and sizes), so a part finished or redone since shows up."""
    names = []
    for stage in (MINE_STAGE, ANNOTATE_STAGE):
        for marker in list_files(run.root / "_progress" / stage, "part-*.json"):
            names.append(f"{stage}/{marker.name}:{marker.stat().st_size}")
    return tuple(names)


def cached_index(run: RunDir, channels: list[str], signature: tuple[str, ...]) -> pa.Table:
    """The pair index from `<run>/explore/index/` when one was built for this signature and
    these channels, else built now and kept there (older ones removed)."""
    key = json.dumps([INDEX_VERSION, channels, list(signature)])
    folder = cache_root(run) / "index"
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"
    if path.exists():
        try:
            return read_table(path)
        except (OSError, pa.ArrowException):
            path.unlink(missing_ok=True)
    index = build_index(run, channels)
    write_table(path, index)
    for old in folder.glob("*.parquet"):
        if old != path:
            old.unlink(missing_ok=True)
    return index


def build_index(run: RunDir, channels: list[str]) -> pa.Table:
    """One row per finished pair, in run order (part, then position)."""
    pairs = concat_tables(
        run.files(PAIRS_DIR, MINE_STAGE),
        PAIRS_SCHEMA,
        ["pair_id", "query_id", "target_id", "channels", "channel_scores"],
    )
    count = pairs.num_rows
    base = pa.table(
        {"order": pa.array(np.arange(count, dtype=np.int64)), "pair_id": pairs["pair_id"]}
    )
    joined = _with_annotations(run, base).sort_by("order")
    extra = {
        "query_id": pairs["query_id"],
        "target_id": pairs["target_id"],
        "part": _part_names(pairs["query_id"]),
        **_channel_columns(pairs, channels),
        "channels": pairs["channels"],
        "channel_scores": pairs["channel_scores"],
    }
    for name, column in extra.items():
        joined = joined.append_column(name, column)
    return joined


def _part_names(query_ids: pa.ChunkedArray) -> pa.Array:
    parts = query_ids.to_numpy() // PART_STRIDE
    names = pa.array([part_name(p) for p in range(int(parts.max()) + 1 if len(parts) else 0)])
    return pa.DictionaryArray.from_arrays(pa.array(parts, pa.int32()), names)


def _with_annotations(run: RunDir, base: pa.Table) -> pa.Table:
    annotated = concat_tables(
        run.files(ANNOTATIONS_DIR, ANNOTATE_STAGE),
        ANNOTATIONS_SCHEMA,
        ["pair_id", "instructions", "backend"],
    )
    failed = concat_tables(
        run.files(ANNOTATION_FAILURES_DIR, ANNOTATE_STAGE),
        ANNOTATION_FAILURES_SCHEMA,
        ["pair_id", "reason", "backend"],
    )
    lengths, first = _first_instructions(annotated["instructions"])
    small = pa.table(
        {
            "pair_id": annotated["pair_id"],
            "backend": annotated["backend"],
            "num_instructions": lengths,
            "first_instruction": first,
        }
    )
    failures = pa.table(
        {
            "pair_id": failed["pair_id"],
            "failure_reason": failed["reason"],
            "failure_backend": failed["backend"],
        }
    )
    joined = base.join(small, "pair_id", join_type="left outer")
    joined = joined.join(failures, "pair_id", join_type="left outer")
    status = pc.if_else(
        pc.is_valid(joined["num_instructions"]),
        "annotated",
        pc.if_else(pc.is_valid(joined["failure_reason"]), "failed", "pending"),
    )
    backend = pc.coalesce(joined["backend"], joined["failure_backend"])
    joined = joined.drop_columns(["backend", "failure_backend"])
    return joined.append_column("status", status).append_column("backend", backend)


def _first_instructions(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Each list's length and first element (null for an empty list), by position in the
    flattened values rather than a per-row list operation."""
    listed = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    lengths = pc.list_value_length(listed).fill_null(0).to_numpy().astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    first = pc.take(listed.flatten(), pa.array(starts, mask=lengths == 0))
    return pa.array(lengths, pa.int32()), first


def _channel_columns(pairs: pa.Table, channels: list[str]) -> dict[str, pa.Array]:
    """One float32 score column per channel (null where it did not find the pair), and the
    pair's channel combination as a name."""
    count = pairs.num_rows
    listed = pairs["channels"].combine_chunks()
    names = listed.flatten().to_numpy(zero_copy_only=False).astype(str)
    scores = pairs["channel_scores"].combine_chunks().flatten().to_numpy()
    parents = pc.list_parent_indices(listed).to_numpy()
    columns: dict[str, pa.Array] = {}
    mask = np.zeros(count, np.int64)
    for bit, channel in enumerate(channels):
        hit = names == channel
        values = np.full(count, np.nan, np.float32)
        values[parents[hit]] = scores[hit]
        found = np.zeros(count, bool)
        found[parents[hit]] = True
        columns[score_column(channel)] = pa.array(values, mask=~found)
        mask[found] |= 1 << bit
    combos = [
        combo_name([c for b, c in enumerate(channels) if m >> b & 1], channels)
        for m in range(1 << len(channels))
    ]
    columns["combo"] = pa.DictionaryArray.from_arrays(pa.array(mask, pa.int32()), combos)
    return columns


# querying ---------------------------------------------------------------------------


@dataclass
class Page:
    total: int
    rows: pa.Table
    elapsed_ms: float


def select(
    index: pa.Table,
    chosen: PairFilter,
    flagged_pairs: set[str],
    matching_text: pa.Array | None,
) -> Page:
    """Filter, sort and page the index."""
    started = time.perf_counter()
    expression = _expression(chosen, flagged_pairs, matching_text)
    table = index if expression is None else index.filter(expression)
    table = _sorted(table, chosen.sort)
    rows = table.slice(chosen.offset, chosen.limit)
    return Page(table.num_rows, rows, (time.perf_counter() - started) * 1000)


def _expression(
    chosen: PairFilter, flagged_pairs: set[str], matching_text: pa.Array | None
) -> pc.Expression | None:
    parts: list[pc.Expression] = []
    for channel in chosen.channels:
        parts.append(pc.field(score_column(channel)).is_valid())
    if chosen.combo is not None:
        parts.append(pc.field("combo").cast(pa.string()) == chosen.combo)
    for bound in chosen.scores:
        column = pc.field(score_column(bound.channel))
        if bound.low is not None:
            parts.append(column >= bound.low)
        if bound.high is not None:
            parts.append(column <= bound.high)
    if chosen.backend is not None:
        parts.append(pc.field("backend") == chosen.backend)
    if chosen.min_instructions is not None:
        parts.append(pc.field("num_instructions") >= chosen.min_instructions)
    if chosen.max_instructions is not None:
        parts.append(pc.field("num_instructions") <= chosen.max_instructions)
    if chosen.status is not None:
        parts.append(pc.field("status") == chosen.status)
    if chosen.failure is not None:
        parts.append(pc.field("failure_reason") == chosen.failure)
    if chosen.flagged is not None:
        inside = pc.field("pair_id").isin(pa.array(sorted(flagged_pairs), pa.string()))
        parts.append(inside if chosen.flagged else ~inside)
    if matching_text is not None:
        parts.append(pc.field("pair_id").isin(matching_text))
    if not parts:
        return None
    expression = parts[0]
    for part in parts[1:]:
        expression = expression & part
    return expression


def _sorted(table: pa.Table, sort: str) -> pa.Table:
    descending = sort.startswith("-")
    key = sort.removeprefix("-")
    if key == "order":
        return table if not descending else table.take(pa.array(np.arange(table.num_rows)[::-1]))
    column = "num_instructions" if key == "instructions" else key
    direction = "descending" if descending else "ascending"
    return table.sort_by([(column, direction), ("order", "ascending")])


class InstructionText:
    """Every instruction lower-cased with its pair id, read on the first text search and
    kept (about 100 bytes per instruction), so later searches only scan memory."""

    def __init__(self, run: RunDir) -> None:
        annotated = concat_tables(
            run.files(ANNOTATIONS_DIR, ANNOTATE_STAGE),
            ANNOTATIONS_SCHEMA,
            ["pair_id", "instructions"],
        )
        listed = annotated["instructions"].combine_chunks() if annotated.num_rows else None
        if listed is None:
            self.texts, self.pair_ids = pa.array([], pa.string()), pa.array([], pa.string())
            return
        self.texts = pc.utf8_lower(listed.flatten())
        self.pair_ids = annotated["pair_id"].take(pc.list_parent_indices(listed))

    def matches(self, text: str) -> pa.Array:
        """Pair ids with an instruction containing `text` (any case), each once."""
        hit = pc.match_substring(self.texts, text.lower())
        found = pc.unique(self.pair_ids.filter(hit))
        return found.combine_chunks() if isinstance(found, pa.ChunkedArray) else found


def row_dicts(rows: pa.Table, channels: list[str]) -> list[dict[str, Any]]:
    """Rows of a page as the API's JSON objects."""
    wanted = [
        "pair_id", "query_id", "target_id", "part", "channels", "channel_scores", "status",
        "backend", "num_instructions", "first_instruction", "failure_reason",
    ]  # fmt: skip
    out = rows.select(wanted).to_pylist()
    for row in out:
        row["channel_scores"] = [round(float(s), 6) for s in row["channel_scores"]]
    return out
