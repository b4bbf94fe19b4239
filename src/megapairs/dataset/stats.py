"""Counts and distributions of an exported dataset (ours or the released layout), and, with
its run directory, the annotation failures, the instructions the checks dropped (by reason),
the score stage's distributions (ranks, margins, shortcuts, false negatives, judge verdicts),
what export's quality gate removed (per rule, from its counts and rejects), the curation
flags (by reason and user, and how many exported rows are flagged pairs) and the per-part
balance pairs = annotated + failed, annotated = exported + gate-rejected + left out by flags.

Quantiles are nearest-rank (the smallest value with at least that share of the values at or
below it), so they are values that occur. Channel combinations
are named by their sorted channel names ("caption+image").
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs.corpus.store import rejects_path
from megapairs.dataset.flags import FlagStore
from megapairs.dataset.gate import DROP_COUNTS, REJECT_PREFIX
from megapairs.dataset.validate import dataset_files
from megapairs.runs import (
    AnyPath,
    RunDir,
    as_path,
    concat_tables,
    parquet_metadata,
    parquet_rows,
    read_table,
    relative_name,
)
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    DATASET_DIR,
    DATASET_SCHEMA,
    PAIRS_DIR,
    REJECTS_SCHEMA,
    SCORES_DIR,
    SCORES_SCHEMA,
)

ANNOTATE_STAGE = "annotate"
EXPORT_STAGE = "export"
SCORE_STAGE = "score"
SCORE_COLUMNS = [
    "pair_id",
    "rank",
    "margin",
    "text_shortcut",
    "image_shortcut",
    "false_negative_ids",
    "judge_verdict",
]
MARGIN_QUANTILES = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9, "max": 1.0}
PROVENANCE_COLUMNS = ("backend", "describer_model", "instructor_model", "prompt_version")
RELEASED_COLUMNS = ("q_img", "q_text", "t_img", "hns")
STAT_COLUMNS = [*RELEASED_COLUMNS, "channels", "hard_negative_ids", "pair_id"]
HISTOGRAM_BINS = 10
BAR_WIDTH = 30


@dataclass(frozen=True)
class Summary:
    """A distribution of non-negative integers, as value -> how many."""

    counts: dict[int, int]

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def min(self) -> int:
        return min(self.counts, default=0)

    @property
    def max(self) -> int:
        return max(self.counts, default=0)

    @property
    def mean(self) -> float:
        total = sum(value * n for value, n in self.counts.items())
        return total / self.count if self.count else 0.0

    def quantile(self, share: float) -> int:
        """Nearest-rank quantile: the smallest value v with share of the values <= v."""
        if not self.counts:
            return 0
        values = sorted(self.counts)
        cumulative = np.cumsum([self.counts[v] for v in values])
        rank = max(1, math.ceil(share * self.count))
        return values[int(np.searchsorted(cumulative, rank))]

    @property
    def median(self) -> int:
        return self.quantile(0.5)

    def histogram(self, bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
        """(low, high, count) over equal-width integer bins from min to max, inclusive."""
        if not self.counts:
            return []
        width = max(1, math.ceil((self.max - self.min + 1) / bins))
        edges = range(self.min, self.max + 1, width)
        return [
            (low, low + width - 1, sum(n for v, n in self.counts.items() if low <= v < low + width))
            for low in edges
        ]


@dataclass(frozen=True)
class FailureStats:
    """Annotation failures of the finished annotate parts."""

    total: int
    reasons: dict[str, int]
    steps: dict[str, int]
    transient: int

    @property
    def transient_share(self) -> float:
        return self.transient / self.total if self.total else 0.0


@dataclass(frozen=True)
class DroppedStats:
    """Instructions the checks dropped from the annotated pairs of the finished annotate
    parts ("reason: text" entries of `dropped_instructions`), by reason."""

    total: int
    pairs: int  # annotated pairs with at least one dropped instruction
    annotated: int  # annotated pairs in all
    reasons: dict[str, int]


@dataclass(frozen=True)
class ScoreStats:
    """The score stage's rows of its finished parts: one per annotated instruction."""

    instructions: int
    pairs: int
    ranks: Summary  # the target's rank among its negatives (1: first)
    margins: dict[str, float]  # MARGIN_QUANTILES names -> nearest-rank quantile
    text_shortcuts: int
    image_shortcuts: int
    with_false_negatives: int  # instructions flagging at least one hard negative
    false_negatives: int  # flagged ids over all instructions
    pairs_with_false_negatives: int
    judge: dict[str, int]  # verdict -> instructions; "" when not judged

    def share(self, count: int) -> float:
        return count / self.instructions if self.instructions else 0.0


@dataclass(frozen=True)
class GateStats:
    """What export.filter removed in the finished export parts that had scores."""

    parts: int
    annotated: int  # pairs in
    rows: int  # pairs exported
    rejected_pairs: int
    reject_reasons: dict[str, int]  # gate:<rule> rows of rejects/export-part-N.parquet
    instructions_in: int
    instructions_kept: int
    dropped: dict[str, int]  # gate rule -> instructions
    false_negatives_removed: int
    negatives_topped_up: int
    flag_rejected: int = 0  # pairs curation flags left out before the gate

    @property
    def balanced(self) -> bool:
        instructions = self.instructions_in == self.instructions_kept + sum(self.dropped.values())
        pairs = self.annotated == self.rows + self.rejected_pairs + self.flag_rejected
        return instructions and pairs and sum(self.reject_reasons.values()) == self.rejected_pairs


@dataclass(frozen=True)
class FlagStats:
    """The run's curation flags in force, and what they mean for its dataset."""

    summary: dict[str, Any]  # ActiveFlags.summary()
    flagged_rows: int  # exported rows whose pair is flagged (0 after --exclude-flagged)
    left_out_pairs: int  # pairs the finished export parts left out for flags
    dropped_instructions: int  # flagged instructions they took out

    @property
    def active(self) -> int:
        return self.summary["flagged_pairs"] + self.summary["flagged_instructions"]


@dataclass(frozen=True)
class PartBalance:
    """Pairs in, annotated and failed of one finished annotate part (and rows exported,
    pairs the export gate rejected)."""

    part: str
    pairs: int
    annotated: int
    failed: int
    exported: int | None  # None: the export stage has not finished this part
    gate_rejected: int = 0
    flag_rejected: int = 0  # left out for curation flags (export.exclude_flagged)

    @property
    def balanced(self) -> bool:
        return self.pairs == self.annotated + self.failed and self.exported in (
            None,
            self.annotated - self.gate_rejected - self.flag_rejected,
        )


@dataclass
class DatasetStats:
    """What `dataset_stats` counted."""

    path: AnyPath
    files: list[str] = field(default_factory=list)
    rows: int = 0
    distinct_queries: int = 0
    distinct_targets: int = 0
    pairs_per_channel: dict[str, int] = field(default_factory=dict)
    pairs_per_channel_combination: dict[str, int] = field(default_factory=dict)
    instructions_per_pair: Summary = Summary({})
    instruction_words: Summary = Summary({})
    negatives_per_pair: Summary = Summary({})
    provenance: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> value -> rows
    run: AnyPath | None = None
    failures: FailureStats | None = None
    dropped: DroppedStats | None = None
    parts: list[PartBalance] = field(default_factory=list)
    scores: ScoreStats | None = None  # None: no finished score part
    gate: GateStats | None = None  # None: no finished export part had scores
    flags: FlagStats | None = None  # None: not a run's dataset


@dataclass
class _Tally:
    """Counters filled file by file."""

    flagged: frozenset[str] = frozenset()  # flagged pair ids, to count their rows
    flagged_rows: int = 0
    rows: int = 0
    queries: list[pa.Array] = field(default_factory=list)
    targets: list[pa.Array] = field(default_factory=list)
    channels: Counter[str] = field(default_factory=Counter)
    combinations: Counter[str] = field(default_factory=Counter)
    instructions: Counter[int] = field(default_factory=Counter)
    words: Counter[int] = field(default_factory=Counter)
    negatives: Counter[int] = field(default_factory=Counter)
    provenance: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        names = set(table.column_names)
        self.queries.append(pc.unique(table["q_img"]))
        self.targets.append(pc.unique(table["t_img"]))
        self.instructions.update(_value_counts(pc.list_value_length(table["q_text"])))
        self.words.update(_value_counts(word_counts(table["q_text"])))
        self.negatives.update(_value_counts(mined_negatives(table)))
        if self.flagged and "pair_id" in names:
            flagged = pa.array(sorted(self.flagged), pa.string())
            self.flagged_rows += _true(pc.is_in(table["pair_id"], value_set=flagged))
        if "channels" in names:
            self.channels.update(_value_counts(pc.list_flatten(table["channels"])))
            self.combinations.update(channel_combinations(table["channels"]))
        for column in PROVENANCE_COLUMNS:
            if column in names:
                self.provenance.setdefault(column, Counter()).update(_value_counts(table[column]))


def dataset_stats(path: AnyPath | str, run: RunDir | None = None) -> DatasetStats:
    """Count a dataset folder or file (local or a URL); with `run` (or when `path` is
    <run>/dataset) add the run's annotation failures and per-part balance."""
    path = as_path(path)
    files, _twins = dataset_files(path)
    base = path if path.is_dir() else path.parent
    run = run if run is not None else run_of(path)
    active = FlagStore(run).active() if run else None
    tally = _Tally(flagged=frozenset(active.pairs) if active is not None else frozenset())
    for file in files:
        tally.add(read_stat_columns(file))
    return DatasetStats(
        path=path,
        files=[relative_name(f, base) for f in files],
        rows=tally.rows,
        distinct_queries=_distinct(tally.queries),
        distinct_targets=_distinct(tally.targets),
        pairs_per_channel=dict(tally.channels.most_common()),
        pairs_per_channel_combination=dict(tally.combinations.most_common()),
        instructions_per_pair=Summary(dict(sorted(tally.instructions.items()))),
        instruction_words=Summary(dict(sorted(tally.words.items()))),
        negatives_per_pair=Summary(dict(sorted(tally.negatives.items()))),
        provenance={c: dict(n.most_common()) for c, n in tally.provenance.items()},
        run=run.root if run else None,
        failures=failure_stats(run) if run else None,
        dropped=dropped_stats(run) if run else None,
        parts=part_balance(run) if run else [],
        scores=score_stats(run) if run else None,
        gate=gate_stats(run) if run else None,
        flags=flag_stats(run, active.summary(), tally.flagged_rows) if active is not None else None,
    )


def run_of(path: AnyPath) -> RunDir | None:
    """The run a dataset folder (or a file in it) belongs to: <run>/dataset with markers."""
    folder = path if path.is_dir() else path.parent
    if folder.name == DATASET_DIR and (folder.parent / "_progress").is_dir():
        return RunDir(folder.parent)
    return None


def read_stat_columns(file: AnyPath) -> pa.Table:
    """The columns stats need (those present) from a Parquet or JSONL file; the released
    columns must be there (`validate_dataset` says more about a broken file)."""
    records: list[dict[str, Any]] = []
    if file.suffix == ".parquet":
        present = set(parquet_metadata(file).schema.to_arrow_schema().names)
    else:
        with file.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        present = set().union(*records) if records else set(RELEASED_COLUMNS)
    lacking = [c for c in RELEASED_COLUMNS if c not in present]
    if lacking:
        raise ValueError(f"{file} is not a dataset file: it lacks {', '.join(lacking)}")
    wanted = [c for c in [*STAT_COLUMNS, *PROVENANCE_COLUMNS] if c in present]
    if file.suffix == ".parquet":
        return read_table(file, wanted)
    return pa.table(
        {c: pa.array([r.get(c) for r in records], DATASET_SCHEMA.field(c).type) for c in wanted}
    )


def word_counts(instructions: pa.ChunkedArray) -> pa.Array:
    """Words (whitespace-separated) of every instruction; an empty one has 0."""
    texts = pc.utf8_trim_whitespace(pc.drop_null(pc.list_flatten(instructions)))
    lengths = pc.list_value_length(pc.utf8_split_whitespace(texts))
    return pc.if_else(pc.equal(texts, ""), 0, lengths)


def mined_negatives(table: pa.Table) -> pa.Array | pa.ChunkedArray:
    """Mined negatives per row: hard_negative_ids when present, else hns without a leading
    query image."""
    if "hard_negative_ids" in table.column_names:
        return pc.list_value_length(table["hard_negative_ids"])
    queries, negatives = table["q_img"].to_pylist(), table["hns"].to_pylist()
    return pa.array(
        [
            len(n or []) - int(bool(n) and n[0] == q)
            for q, n in zip(queries, negatives, strict=True)
        ],
        pa.int64(),
    )


def channel_combinations(channels: pa.ChunkedArray) -> Counter[str]:
    """Rows per set of channels, named by the sorted channel names joined with '+'."""
    combinations: Counter[str] = Counter()
    for joined, count in _value_counts(pc.binary_join(channels, "+")).items():
        combinations["+".join(sorted(joined.split("+"))) if joined else ""] += count
    return combinations


def _value_counts(values: pa.Array | pa.ChunkedArray) -> dict[Any, int]:
    counted = pc.value_counts(pc.drop_null(values)).to_pylist()
    return {row["values"]: row["counts"] for row in counted}


def _distinct(chunks: list[pa.Array]) -> int:
    if not chunks:
        return 0
    values = pa.chunked_array([c.cast(pa.string()) for c in chunks], pa.string())
    return int(pc.count_distinct(values).as_py())


def failure_stats(run: RunDir) -> FailureStats:
    """Failure reasons, steps and the transient share of the finished annotate parts."""
    paths = run.files(ANNOTATION_FAILURES_DIR, ANNOTATE_STAGE)
    table = concat_tables(paths, ANNOTATION_FAILURES_SCHEMA, ["reason", "step", "transient"])
    return FailureStats(
        total=table.num_rows,
        reasons=dict(Counter(table["reason"].to_pylist()).most_common()),
        steps=dict(Counter(table["step"].to_pylist()).most_common()),
        transient=int(pc.sum(table["transient"]).as_py() or 0),
    )


def dropped_stats(run: RunDir) -> DroppedStats:
    """Dropped instructions by reason (the text before the first ": ") in the finished
    annotate parts."""
    paths = run.files(ANNOTATIONS_DIR, ANNOTATE_STAGE)
    column = concat_tables(paths, ANNOTATIONS_SCHEMA, ["dropped_instructions"])[
        "dropped_instructions"
    ]
    entries = pc.drop_null(pc.list_flatten(column))
    reasons = pc.list_element(pc.split_pattern(entries, ": ", max_splits=1), 0)
    counts = Counter(_value_counts(pc.utf8_trim_whitespace(reasons)))
    return DroppedStats(
        total=len(entries),
        pairs=int(pc.sum(pc.greater(pc.list_value_length(column), 0)).as_py() or 0),
        annotated=len(column),
        reasons=dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
    )


def score_stats(run: RunDir) -> ScoreStats | None:
    """Distributions of the finished score parts' rows; None when there are none."""
    paths = run.files(SCORES_DIR, SCORE_STAGE)
    if not paths:
        return None
    table = concat_tables(paths, SCORES_SCHEMA, SCORE_COLUMNS)
    flagged = pc.fill_null(pc.list_value_length(table["false_negative_ids"]), 0)
    with_flags = table.filter(pc.greater(flagged, 0))
    verdicts = Counter(v or "" for v in table["judge_verdict"].to_pylist())
    return ScoreStats(
        instructions=table.num_rows,
        pairs=_count_distinct(table["pair_id"]),
        ranks=Summary(dict(sorted(_value_counts(table["rank"]).items()))),
        margins=margin_quantiles(table["margin"]),
        text_shortcuts=_true(table["text_shortcut"]),
        image_shortcuts=_true(table["image_shortcut"]),
        with_false_negatives=with_flags.num_rows,
        false_negatives=int(pc.sum(flagged).as_py() or 0),
        pairs_with_false_negatives=_count_distinct(with_flags["pair_id"]),
        judge=dict(sorted(verdicts.items(), key=lambda item: (-item[1], item[0]))),
    )


def _count_distinct(column: pa.ChunkedArray) -> int:
    return int(pc.count_distinct(column).as_py() or 0)


def _true(column: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.fill_null(column, False).cast(pa.int64())).as_py() or 0)


def margin_quantiles(margins: pa.ChunkedArray) -> dict[str, float]:
    """Nearest-rank quantiles (MARGIN_QUANTILES) of the finite margins; {} without any."""
    values = np.sort(pc.drop_null(margins).to_numpy(zero_copy_only=False).astype(np.float64))
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    ranks = {k: max(1, math.ceil(share * len(values))) for k, share in MARGIN_QUANTILES.items()}
    return {k: float(values[rank - 1]) for k, rank in ranks.items()}


def gate_stats(run: RunDir) -> GateStats | None:
    """export.filter's removals in the finished export parts that had scores (their counts
    and rejects/export-part-N.parquet); None when no such part."""
    parts = {p: c for p, c in run.part_counts(EXPORT_STAGE).items() if "scores_sha256" in c}
    if not parts:
        return None
    totals: Counter[str] = Counter()
    for counts in parts.values():
        totals.update({k: v for k, v in counts.items() if isinstance(v, int)})
    paths = [path for p in parts if (path := rejects_path(run, EXPORT_STAGE, p)).exists()]
    listed = concat_tables(paths, REJECTS_SCHEMA, ["reason"])["reason"].to_pylist()
    reasons = Counter(r for r in listed if r.startswith(REJECT_PREFIX))  # not flags' rejects
    return GateStats(
        parts=len(parts),
        annotated=totals["annotated"],
        rows=totals["rows"],
        rejected_pairs=totals["gate_rejected_pairs"],
        reject_reasons=dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        instructions_in=totals["instructions_in"],
        instructions_kept=totals["instructions_kept"],
        dropped={rule: totals[key] for rule, key in DROP_COUNTS.items()},
        false_negatives_removed=totals["dropped_false_negatives"],
        negatives_topped_up=totals["topped_up_negatives"],
        flag_rejected=totals["flag_rejected_pairs"],
    )


def flag_stats(run: RunDir, summary: dict[str, Any], flagged_rows: int) -> FlagStats:
    """The flags in force (`summary`), the exported rows of flagged pairs and what the
    finished export parts left out for flags."""
    totals: Counter[str] = Counter()
    for counts in run.part_counts(EXPORT_STAGE).values():
        totals.update({k: v for k, v in counts.items() if isinstance(v, int)})
    return FlagStats(
        summary=summary,
        flagged_rows=flagged_rows,
        left_out_pairs=totals["flag_rejected_pairs"],
        dropped_instructions=totals["flagged_instructions"],
    )


def part_balance(run: RunDir) -> list[PartBalance]:
    """Pairs, annotated, failed (and exported, gate-rejected) rows of each finished annotate
    part."""
    exported = run.part_counts(EXPORT_STAGE)
    balance = []
    for part in run.done_parts(ANNOTATE_STAGE):
        dataset = run.part_path(DATASET_DIR, part)
        balance.append(
            PartBalance(
                part=part,
                pairs=parquet_rows(run.part_path(PAIRS_DIR, part)),
                annotated=parquet_rows(run.part_path(ANNOTATIONS_DIR, part)),
                failed=parquet_rows(run.part_path(ANNOTATION_FAILURES_DIR, part)),
                exported=parquet_rows(dataset) if part in exported and dataset.exists() else None,
                gate_rejected=exported.get(part, {}).get("gate_rejected_pairs", 0),
                flag_rejected=exported.get(part, {}).get("flag_rejected_pairs", 0),
            )
        )
    return balance


def format_stats(stats: DatasetStats) -> str:
    """A person-readable summary of `stats`."""
    lines = [
        f"{stats.path}: {stats.rows} pairs in {len(stats.files)} file(s), "
        f"{stats.distinct_queries} distinct query images, {stats.distinct_targets} distinct targets"
    ]
    if stats.pairs_per_channel:
        lines.append(f"pairs per channel: {_counts(stats.pairs_per_channel)}")
        lines.append(
            f"pairs per channel combination: {_counts(stats.pairs_per_channel_combination)}"
        )
    lines.append(f"instructions per pair: {_counts(stats.instructions_per_pair.counts)}")
    lines += _summary_lines("instruction length (words)", stats.instruction_words)
    lines.append(f"negatives per pair: {_counts(stats.negatives_per_pair.counts)}")
    lines += [f"{column}: {_counts(values)}" for column, values in stats.provenance.items()]
    if stats.failures is not None:
        lines += _failure_lines(stats.failures)
    if stats.dropped is not None:
        lines += _dropped_lines(stats.dropped)
    if stats.scores is not None:
        lines += _score_lines(stats.scores)
    if stats.gate is not None:
        lines += _gate_lines(stats.gate)
    if stats.flags is not None:
        lines.append(flags_line(stats.flags))
    if stats.parts:
        lines += _balance_lines(stats.parts)
    return "\n".join(lines)


def _counts(counts: dict[Any, int]) -> str:
    return ", ".join(f"{key or '(none)'}: {n}" for key, n in counts.items()) or "-"


def _summary_lines(title: str, summary: Summary) -> list[str]:
    lines = [
        f"{title}: min {summary.min}, median {summary.median}, mean {summary.mean:.1f}, "
        f"p90 {summary.quantile(0.9)}, max {summary.max} ({summary.count} values)"
    ]
    histogram = summary.histogram()
    peak = max((n for *_, n in histogram), default=0)
    for low, high, n in histogram:
        bar = "#" * math.ceil(BAR_WIDTH * n / peak) if n else ""
        label = f"{low}" if low == high else f"{low}-{high}"
        lines.append(f"  {label:>9} | {bar} {n}")
    return lines


def _failure_lines(failures: FailureStats) -> list[str]:
    lines = [
        f"annotation failures (finished parts): {failures.total}, transient {failures.transient} "
        f"({failures.transient_share:.0%}; a re-run retries them)"
    ]
    lines += [f"  {reason}: {n}" for reason, n in failures.reasons.items()]
    return lines


def _dropped_lines(dropped: DroppedStats) -> list[str]:
    lines = [
        f"dropped instructions (finished parts): {dropped.total} in {dropped.pairs} of "
        f"{dropped.annotated} annotated pairs"
    ]
    lines += [f"  {reason}: {n}" for reason, n in dropped.reasons.items()]
    return lines


def _score_lines(scores: ScoreStats) -> list[str]:
    lines = [
        f"scores (finished score parts): {scores.instructions} instructions, {scores.pairs} pairs"
    ]
    lines += _summary_lines("  rank of the target", scores.ranks)
    margins = ", ".join(f"{k} {v:.3f}" for k, v in scores.margins.items()) or "-"
    lines.append(f"  margin: {margins}")
    lines.append(
        f"  shortcuts: text {scores.text_shortcuts} ({scores.share(scores.text_shortcuts):.0%}),"
        f" image {scores.image_shortcuts} ({scores.share(scores.image_shortcuts):.0%})"
    )
    lines.append(
        f"  false negatives: {scores.false_negatives} flagged by {scores.with_false_negatives} "
        f"instructions ({scores.share(scores.with_false_negatives):.0%}) of "
        f"{scores.pairs_with_false_negatives} pairs"
    )
    lines.append(f"  judge: {_counts(scores.judge)}")
    return lines


def _gate_lines(gate: GateStats) -> list[str]:
    dropped = ", ".join(f"{rule} {n}" for rule, n in gate.dropped.items() if n) or "none"
    lines = [
        f"gate (export.filter, {gate.parts} scored parts): {gate.instructions_in} instructions "
        f"in, {gate.instructions_kept} kept; dropped: {dropped}",
        f"  pairs: {gate.annotated} annotated, {gate.rows} exported, {gate.rejected_pairs} "
        f"rejected ({_counts(gate.reject_reasons)})"
        + (f", {gate.flag_rejected} left out for flags" if gate.flag_rejected else ""),
        f"  hard negatives: {gate.false_negatives_removed} false negatives removed, "
        f"{gate.negatives_topped_up} topped up",
    ]
    if not gate.balanced:
        lines.append("  MISMATCH: the gate's counts or rejects do not add up: re-run export")
    return lines


def flags_line(flags: FlagStats) -> str:
    """`flags: 10 pairs, 1 instruction (by reason: ...; by user: ...); 0 of the exported rows
    are flagged`, or `flags: none`."""
    summary = flags.summary
    if not flags.active:
        line = "flags: none"
        if summary["events"]:
            line += f" ({_plural(summary['events'], 'event')}, every flag undone)"
    else:
        reasons = ", ".join(f"{k} {n}" for k, n in summary["by_reason"].items())
        users = ", ".join(f"{k} {n}" for k, n in summary["by_user"].items())
        line = (
            f"flags: {_plural(summary['flagged_pairs'], 'pair')}, "
            f"{_plural(summary['flagged_instructions'], 'instruction')} (by reason: {reasons}; "
            f"by user: {users}); {flags.flagged_rows} of the exported rows are flagged"
        )
    if flags.left_out_pairs or flags.dropped_instructions:
        line += (
            f"; export left out {_plural(flags.left_out_pairs, 'pair')} and "
            f"{_plural(flags.dropped_instructions, 'instruction')} (--exclude-flagged)"
        )
    if summary["unreadable"]:
        line += f"; {_plural(summary['unreadable'], 'unreadable flag file')} skipped"
    return line


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _balance_lines(parts: list[PartBalance]) -> list[str]:
    lines = ["parts (pairs = annotated + failed):"]
    for p in parts:
        exported = "" if p.exported is None else f", {p.exported} exported"
        if p.gate_rejected:
            exported += f", {p.gate_rejected} gate-rejected"
        if p.flag_rejected:
            exported += f", {p.flag_rejected} left out for flags"
        line = f"  {p.part}: {p.pairs} pairs, {p.annotated} annotated, {p.failed} failed{exported}"
        lines.append(line if p.balanced else f"{line}  <- MISMATCH")
    unbalanced = [p.part for p in parts if not p.balanced]
    if unbalanced:
        lines.append(
            f"MISMATCH in {len(unbalanced)} parts ({', '.join(unbalanced)}): pairs != annotated + "
            "failed (or exported != annotated - gate-rejected - left out for flags); pairs were "
            "lost: re-run annotate/export there"
        )
    else:
        total = sum(p.pairs for p in parts)
        lines.append(f"  all {len(parts)} parts balance: {total} pairs in, none lost")
    return lines
