"""What a run holds, for a person: counts, rejects, pairs per channel, each channel's
neighbour-score histogram with its window marked (and whether `window: auto` chose it),
and example pairs with their captions."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from megapairs.config import PipelineConfig
from megapairs.corpus.store import read_corpus, read_rejects
from megapairs.mining.mine import Window
from megapairs.mining.stage import read_windows
from megapairs.neighbours.calibrate import (
    AUTO,
    FIXED,
    ChannelScores,
    ScoreHistogram,
    WindowUnresolvable,
    auto_window,
    finished_parts,
    format_window,
    scan_channel,
)
from megapairs.runs import AnyPath, RunDir, concat_tables
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    PAIRS_DIR,
    PAIRS_SCHEMA,
)

MINE_STAGE = "mine"
ANNOTATE_STAGE = "annotate"
HISTOGRAM_BINS = 10
BAR_WIDTH = 40


@dataclass
class ExamplePair:
    query: str
    query_caption: str | None
    target: str
    target_caption: str | None
    channels: dict[str, float]
    hard_negatives: int
    instructions: list[str] = field(default_factory=list)
    annotation: str = ""  # backend of the instructions, or why annotating failed


@dataclass
class ChannelWindow:
    """A channel's window as the run mined it (or would), with its neighbour scores."""

    channel: str
    window: Window | None
    rule: str  # fixed | auto (chosen by the mine stage) | auto, not mined yet
    quantiles: tuple[float, float] | None = None
    neighbours: ChannelScores | None = None  # None: no finished neighbour parts

    @property
    def label(self) -> str:
        text = f"window {format_window(self.window)} {self.rule}"
        if self.quantiles and self.neighbours:
            q_low, q_high = self.quantiles
            text += (
                f": quantiles ({q_low}, {q_high}) of {self.neighbours.scores:,} neighbour scores"
            )
        return text


@dataclass
class RunSummary:
    root: AnyPath
    stages: dict[str, dict[str, Any]]
    images: int
    images_with_caption: int
    rejects: Counter[tuple[str, str]]  # (stage, reason) -> count
    reject_examples: list[tuple[str, str, str]]
    pairs: int
    queries_with_pairs: int
    pairs_per_channel: Counter[str]
    channel_combinations: Counter[str]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    examples: list[ExamplePair] = field(default_factory=list)
    windows: dict[str, ChannelWindow] = field(default_factory=dict)


def read_pairs(run: RunDir) -> pa.Table:
    """All finished pairs of a run."""
    return concat_tables(run.files(PAIRS_DIR, MINE_STAGE), PAIRS_SCHEMA)


def annotation_notes(run: RunDir) -> dict[str, tuple[list[str], str]]:
    """pair id -> (instructions, backend) of annotated pairs, ([], "failed: reason") of
    failed ones; empty when the run has no finished annotate part."""
    annotated = concat_tables(run.files(ANNOTATIONS_DIR, ANNOTATE_STAGE), ANNOTATIONS_SCHEMA)
    failed = concat_tables(
        run.files(ANNOTATION_FAILURES_DIR, ANNOTATE_STAGE), ANNOTATION_FAILURES_SCHEMA
    )
    notes = {
        row["pair_id"]: (row["instructions"], f"by {row['backend']}")
        for row in annotated.select(["pair_id", "instructions", "backend"]).to_pylist()
    }
    for row in failed.select(["pair_id", "step", "reason"]).to_pylist():
        notes[row["pair_id"]] = ([], f"failed at {row['step']}: {row['reason']}")
    return notes


def channel_scores(pairs: pa.Table) -> dict[str, np.ndarray]:
    """Every recorded in-window score, per channel."""
    channels = pairs["channels"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scores = pairs["channel_scores"].combine_chunks().flatten().to_numpy()
    return {str(name): scores[channels == name] for name in np.unique(channels)}


def stored_config(run: RunDir) -> PipelineConfig | None:
    """The config in the run's manifest, if it holds a valid one."""
    stored = run.read_manifest().get("config")
    try:
        return PipelineConfig.model_validate(stored) if stored else None
    except ValueError:
        return None


def channel_windows(run: RunDir) -> dict[str, ChannelWindow]:
    """Each enabled channel's window: as `pairs/windows.json` recorded it when mined, else
    as configured (an auto window not mined yet: what the rule would choose now)."""
    config = stored_config(run)
    if config is None:
        return {}
    recorded = read_windows(run) or {}
    windows = {}
    for name, channel in config.enabled_channels().items():
        parts = finished_parts(run, name)
        entry = recorded.get(name)
        quantiles = channel.auto_window if channel.window == AUTO else None
        if entry is not None:
            window, rule = (float(entry["window"][0]), float(entry["window"][1])), entry["rule"]
            quantiles = tuple(entry["quantiles"]) if rule == AUTO else None
        elif channel.window != AUTO:
            window, rule = channel.window, FIXED
        else:
            window, rule = None, f"{AUTO}, not mined yet"
        scanned = scan_channel(run, name, parts, window=window) if parts else None
        if window is None and scanned is not None:
            window = _would_choose(scanned.histogram, channel.auto_window)
            scanned = scan_channel(run, name, parts, window=window) if window else scanned
        windows[name] = ChannelWindow(name, window, rule, quantiles, scanned)
    return windows


def _would_choose(histogram: ScoreHistogram, quantiles: tuple[float, float]) -> Window | None:
    try:
        return auto_window(histogram, quantiles)
    except WindowUnresolvable:
        return None


def example_pairs(
    pairs: pa.Table,
    corpus: pa.Table,
    count: int,
    seed: int,
    notes: dict[str, tuple[list[str], str]] | None = None,
) -> list[ExamplePair]:
    """A seeded sample of pairs with their captions (and instructions, from `notes`)."""
    if pairs.num_rows == 0 or count <= 0:
        return []
    rows = np.random.default_rng(seed).choice(pairs.num_rows, min(count, pairs.num_rows), False)
    by_id = {row["id"]: row for row in corpus.select(["id", "key", "caption"]).to_pylist()}
    examples = []
    for pair in pairs.take(sorted(rows.tolist())).to_pylist():
        query, target = by_id[pair["query_id"]], by_id[pair["target_id"]]
        instructions, annotation = (notes or {}).get(pair["pair_id"], ([], ""))
        examples.append(
            ExamplePair(
                query=query["key"],
                query_caption=query["caption"],
                target=target["key"],
                target_caption=target["caption"],
                channels=dict(zip(pair["channels"], pair["channel_scores"], strict=True)),
                hard_negatives=len(pair["hard_negative_ids"]),
                instructions=instructions,
                annotation=annotation,
            )
        )
    return examples


def reject_examples(rejects: pa.Table, count: int = 8) -> list[tuple[str, str, str]]:
    """(where, reason, detail) of the first rejects, ingest's first; where is the uri,
    or the record id for later stages' rejects."""
    rows = sorted(rejects.to_pylist(), key=lambda row: row["stage"] != "ingest")[:count]
    return [(row["uri"] or f"record {row['id']}", row["reason"], row["detail"]) for row in rows]


def summarize_run(run: RunDir, examples: int = 5, seed: int = 0) -> RunSummary:
    """Read a run directory into a summary."""
    if not run.manifest_path.exists():
        raise FileNotFoundError(f"{run.uri} is not a megapairs run (no manifest.json)")
    corpus = read_corpus(run, columns=["id", "key", "caption", "has_caption"])
    rejects = read_rejects(run)
    pairs = read_pairs(run)
    channel_lists = pairs["channels"].to_pylist()
    return RunSummary(
        root=run.root,
        stages=run.read_manifest().get("stages", {}),
        images=corpus.num_rows,
        images_with_caption=int(np.sum(corpus["has_caption"].to_numpy(zero_copy_only=False))),
        rejects=Counter(
            zip(rejects["stage"].to_pylist(), rejects["reason"].to_pylist(), strict=True)
        ),
        reject_examples=reject_examples(rejects),
        pairs=pairs.num_rows,
        queries_with_pairs=len(set(pairs["query_id"].to_pylist())),
        pairs_per_channel=Counter(name for names in channel_lists for name in names),
        channel_combinations=Counter("+".join(names) for names in channel_lists),
        scores=channel_scores(pairs) if pairs.num_rows else {},
        examples=example_pairs(pairs, corpus, examples, seed, annotation_notes(run)),
        windows=channel_windows(run),
    )


def format_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[str]:
    """A text histogram, one line per bin."""
    if values.size == 0:
        return ["    (no scores)"]
    counts, edges = np.histogram(values, bins=bins)
    peak = max(int(counts.max()), 1)
    return [
        f"    {lo:.3f}-{hi:.3f} {'#' * round(BAR_WIDTH * c / peak):<{BAR_WIDTH}} {c}"
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def display_edges(histogram: ScoreHistogram, window: Window | None) -> list[float]:
    """About HISTOGRAM_BINS grid edges over the scores' range, the window bounds among them
    (uniform edges too close to a bound give way to it)."""
    low_end = round(max(histogram.quantile(1e-12) - 1e-4, -1.0), 4)  # below the lowest score
    high_end = histogram.quantile(1.0)
    bounds = [b for b in (window or ()) if low_end < b < high_end]
    width = (high_end - low_end) / HISTOGRAM_BINS
    uniform = [round(float(e), 4) for e in np.linspace(low_end, high_end, HISTOGRAM_BINS + 1)]
    kept = [e for e in uniform[1:-1] if all(abs(e - b) > 0.4 * width for b in bounds)]
    return sorted({low_end, high_end, *bounds, *kept})


def window_histogram(channel: ChannelWindow) -> list[str]:
    """The channel's neighbour-score histogram: `#` inside its window, `.` outside, a
    line at each bound; then how the entries fall around the window."""
    scanned = channel.neighbours
    if scanned is None or scanned.scores == 0:
        return ["    (no neighbour scores)"]
    window = channel.window
    edges = display_edges(scanned.histogram, window)
    cum = scanned.histogram.at_or_below()
    at = [int(cum[round((e + 1.0) * 10_000)]) for e in edges]
    counts = [b - a for a, b in itertools.pairwise(at)]
    counts[-1] = scanned.scores - at[-2]  # (and any score above 1)
    peak = max(max(counts), 1)
    lines = []
    for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if window and lo in window:
            lines.append(f"    ---- window {'low' if lo == window[0] else 'high'} {lo:.4f} ----")
        inside = window is not None and window[0] <= lo and hi <= window[1]
        bar = ("#" if inside else ".") * round(BAR_WIDTH * count / peak)
        lines.append(f"    {lo:.4f}-{hi:.4f} {bar:<{BAR_WIDTH}} {count}")
    if window:
        below, inside_share, above = scanned.in_window.shares()
        lines.append(
            f"    neighbour entries: {below:.1%} below (<= low), {inside_share:.1%} inside, "
            f"{above:.1%} above (>= high)"
        )
    return lines


def format_windows(summary: RunSummary) -> list[str]:
    lines = []
    for name, channel in summary.windows.items():
        lines.append(f"score histogram, {name}: {channel.label}")
        lines.extend(window_histogram(channel))
        in_window = summary.scores.get(name, np.empty(0))
        lines.append(f"    mined pairs found by {name} in its window: {in_window.size:,}")
    for name, values in summary.scores.items():
        if name not in summary.windows:  # (a channel disabled since it was mined)
            lines.append(f"score histogram, {name} (in-window pairs):")
            lines.extend(format_histogram(values))
    return lines


def format_example(example: ExamplePair) -> list[str]:
    scores = ", ".join(f"{name} {score:.3f}" for name, score in example.channels.items())
    return [
        f"  query  {example.query}: {example.query_caption or '(no caption)'}",
        f"  target {example.target}: {example.target_caption or '(no caption)'}",
        f"         found by {scores}; {example.hard_negatives} hard negatives",
        *([f"         instructions ({example.annotation}):"] if example.instructions else []),
        *(f"           - {text}" for text in example.instructions),
        *([f"         {example.annotation}"] if example.annotation.startswith("failed") else []),
    ]


def format_stages(stages: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["stages:"]
    for name, entry in stages.items():
        counts = ", ".join(f"{k} {v:,}" for k, v in entry.get("counts", {}).items())
        state = "" if entry.get("complete") else " (incomplete)"
        lines.append(f"  {name:<26} {counts}{state}")
    return lines


def format_summary(summary: RunSummary) -> str:
    """The summary as text for a terminal."""
    lines = [f"run {summary.root}", *format_stages(summary.stages)]
    ingest_rejects = sum(n for (stage, _), n in summary.rejects.items() if stage == "ingest")
    lines.append(
        f"images: {summary.images:,} kept ({summary.images_with_caption:,} with a caption), "
        f"{ingest_rejects:,} rejected at ingest"
    )
    for (stage, reason), count in sorted(summary.rejects.items()):
        lines.append(f"  {stage} rejected {reason}: {count}")
    for uri, reason, detail in summary.reject_examples:
        lines.append(f"    {reason:<18} {uri}: {detail}")
    lines.append(
        f"pairs: {summary.pairs:,} from {summary.queries_with_pairs:,} queries "
        f"({summary.pairs / max(summary.queries_with_pairs, 1):.2f} targets per query)"
    )
    for channel, count in summary.pairs_per_channel.most_common():
        lines.append(f"  found by {channel}: {count:,}")
    for combination, count in summary.channel_combinations.most_common():
        lines.append(f"  exactly {combination}: {count:,}")
    lines.extend(format_windows(summary))
    if summary.examples:
        lines.append("example pairs:")
        for example in summary.examples:
            lines.extend(format_example(example))
    return "\n".join(lines)
