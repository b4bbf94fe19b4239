"""Where each channel's neighbour scores lie, and the similarity window they suggest.

Each encoder spreads its cosines differently (the paper's window (0.8, 0.96) was set for
its CLIP encoders), so a window fixed in numbers can leave one channel with almost no
pairs and another with nearly all of them. `megapairs calibrate` shows, per channel, the
distribution of its neighbour scores (overall and at list ranks 1, 5 and k), how many
entries fall below, inside and above the configured window, and the window the rule
below suggests; `window: auto` uses that rule when mining.

**The auto rule** (`auto_window`): with `auto_window = (q_low, q_high)`,

    window = (Q(q_low), Q(q_high))

where Q(q) is the q-quantile of all the channel's neighbour scores (every usable entry
of every finished part's top-k list: self-matches, FAISS padding (id -1) and non-finite
scores excluded), taken on a grid of 1e-4: Q(q) is the smallest multiple of 1e-4 with
at least a share q of the scores at or below it. Mining then keeps the entries strictly
between the bounds: about a share 1 - q_low of the entries lies above `low`, i.e.
(1 - q_low) * k per query on average, and the top 1 - q_high of all scores (the
near-duplicates of each channel) lies at or above `high`. The defaults (0.75, 0.995) with
k = 20 leave about 5 in-window candidates per query and channel (= `mine.max_targets`),
so every channel offers as many targets per query whatever its encoder's score range;
on the demo corpus they put the fixed window (0.8, 0.96) of its CLIP stand-in near
quantiles (0.7-0.8, 0.995-0.999). The quantiles are counted on a fixed grid, so the same
scores give the same window whatever the part order, runner or machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megapairs.config import ChannelConfig, PipelineConfig
from megapairs.mining.mine import ChannelLists, Window
from megapairs.neighbours.stage import neighbours_folder, neighbours_stage_name
from megapairs.runs import RunDir, read_table, write_json
from megapairs.schemas import NEIGHBOURS_SCHEMA

AUTO = "auto"
FIXED = "fixed"
GRID = np.arange(-10_000, 10_001) / 10_000  # window bounds: multiples of 1e-4 in [-1, 1]
_GRID32 = GRID.astype(np.float32)  # the same, as scores are compared (float32)
CALIBRATION_FILE = "calibration.json"
SCORE_QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
RANK_QUANTILES = (0.1, 0.5, 0.9)
RULE = (
    "window auto = (Q(q_low), Q(q_high)): quantiles of the channel's own neighbour scores "
    "(self, padding and non-finite scores excluded) on a 1e-4 grid"
)


class WindowUnresolvable(ValueError):
    """A channel's scores cannot give an auto window (none, or all alike)."""


# histograms -----------------------------------------------------------------------


@dataclass
class ScoreHistogram:
    """Scores counted on the 1e-4 grid: bin i holds GRID[i-1] < s <= GRID[i] (bin 0: s <=
    -1, the last: s > 1), compared in float32; `ties[i]` counts scores equal to GRID[i], so
    counts at or below and strictly below every grid value are exact."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(GRID.size + 1, np.int64))
    ties: np.ndarray = field(default_factory=lambda: np.zeros(GRID.size, np.int64))

    def add(self, scores: np.ndarray) -> None:
        """Count finite scores (any order: the result does not depend on it)."""
        values = np.asarray(scores, dtype=np.float32)
        left = np.searchsorted(_GRID32, values, side="left")  # GRID[left - 1] < s <= GRID[left]
        self.counts += np.bincount(left, minlength=self.counts.size)
        on_grid = left[_GRID32[np.minimum(left, _GRID32.size - 1)] == values]
        self.ties += np.bincount(on_grid, minlength=self.ties.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def at_or_below(self) -> np.ndarray:
        """How many scores are <= GRID[j], for every j."""
        return np.cumsum(self.counts)[:-1]

    def quantile(self, q: float) -> float:
        """The smallest grid value with at least a share `q` of the scores at or below it."""
        if self.total == 0:
            raise WindowUnresolvable("no scores to take a quantile of")
        need = math.ceil(q * self.total)
        j = int(np.searchsorted(self.at_or_below(), need, side="left"))
        return float(GRID[min(j, GRID.size - 1)])

    def split(self, window: Window) -> WindowSplit:
        """Scores below (<= low), inside and above (>= high) a window on the grid."""
        low, high = (grid_index(bound) for bound in window)
        if low is None or high is None:
            raise ValueError(f"window {window} is not on the 1e-4 grid")
        cum = self.at_or_below()
        below = int(cum[low])
        above = self.total - int(cum[high]) + int(self.ties[high])
        return WindowSplit(below, self.total - below - above, above)

    def between(self, low: float, high: float) -> int:
        """Scores in (low, high] for grid values low < high."""
        lo, hi = grid_index(low), grid_index(high)
        if lo is None or hi is None:
            raise ValueError(f"({low}, {high}] is not on the 1e-4 grid")
        cum = self.at_or_below()
        return int(cum[hi] - cum[lo])

    def digest(self) -> str:
        """Identifies these counts: the same scores always give the same digest."""
        data = self.counts.astype("<i8").tobytes() + self.ties.astype("<i8").tobytes()
        return hashlib.sha256(data).hexdigest()[:16]


def grid_index(value: float) -> int | None:
    """The index of `value` in GRID, or None when it is not a grid value."""
    j = round((value + 1.0) * 10_000)
    return j if 0 <= j < GRID.size and GRID[j] == value else None


@dataclass(frozen=True)
class WindowSplit:
    """Neighbour entries below (<= low), inside and above (>= high) a window."""

    below: int
    inside: int
    above: int

    @property
    def total(self) -> int:
        return self.below + self.inside + self.above

    def shares(self) -> tuple[float, float, float]:
        n = max(self.total, 1)
        return self.below / n, self.inside / n, self.above / n

    @classmethod
    def of(cls, scores: np.ndarray, window: Window) -> WindowSplit:
        """Exact counts as the miner compares (float32, open window)."""
        low, high = np.float32(window[0]), np.float32(window[1])
        below, above = int((scores <= low).sum()), int((scores >= high).sum())
        return cls(below, scores.size - below - above, above)

    def __add__(self, other: WindowSplit) -> WindowSplit:
        return WindowSplit(
            self.below + other.below, self.inside + other.inside, self.above + other.above
        )


# one pass over a channel ----------------------------------------------------------


@dataclass
class ChannelScores:
    """One pass over a channel's finished neighbour parts."""

    channel: str
    parts: list[str]
    queries: int = 0
    histogram: ScoreHistogram = field(default_factory=ScoreHistogram)
    by_rank: dict[int, ScoreHistogram] = field(default_factory=dict)
    window: Window | None = None  # the window `in_window` counts exactly
    in_window: WindowSplit = WindowSplit(0, 0, 0)

    @property
    def scores(self) -> int:
        return self.histogram.total


def rank_points(k: int) -> tuple[int, ...]:
    """The list ranks (1-based) whose scores calibrate reports: 1, 5 and k."""
    return tuple(sorted({r for r in (1, 5, k) if r <= k}))


def finished_parts(run: RunDir, channel: str) -> list[str]:
    """The neighbour parts of `channel` that are marked done and have their file."""
    folder = neighbours_folder(channel)
    done = run.done_parts(neighbours_stage_name(channel))
    return [part for part in done if run.part_path(folder, part).exists()]


def scan_channel(
    run: RunDir,
    channel: str,
    parts: Sequence[str] | None = None,
    ranks: Sequence[int] = (),
    window: Window | None = None,
) -> ChannelScores:
    """Count the usable scores of `parts` (default: every finished part) of `channel`,
    overall and at `ranks`, and exactly around a fixed `window`."""
    chosen = list(parts) if parts is not None else finished_parts(run, channel)
    result = ChannelScores(channel, chosen, by_rank={r: ScoreHistogram() for r in ranks})
    result.window = window
    for part in chosen:
        _scan_part(run, result, part)
    return result


def _scan_part(run: RunDir, result: ChannelScores, part: str) -> None:
    path = run.part_path(neighbours_folder(result.channel), part)
    table = read_table(path, columns=list(NEIGHBOURS_SCHEMA.names))
    lists = ChannelLists.from_table(result.channel, table)
    starts = np.cumsum(lists.lengths) - lists.lengths
    position = np.arange(lists.scores.size) - np.repeat(starts, lists.lengths)
    query = np.repeat(lists.query_ids, lists.lengths)
    ids, scores = lists.neighbour_ids, lists.scores
    usable = (ids >= 0) & np.isfinite(scores) & (ids != query)
    scores, position = scores[usable], position[usable]
    result.queries += lists.query_ids.size
    result.histogram.add(scores)
    for rank, histogram in result.by_rank.items():
        histogram.add(scores[position == rank - 1])
    if result.window is not None:
        result.in_window = result.in_window + WindowSplit.of(scores, result.window)


# the rule -------------------------------------------------------------------------


def auto_window(histogram: ScoreHistogram, quantiles: tuple[float, float]) -> Window:
    """(Q(q_low), Q(q_high)) of the scores: the module's rule."""
    if histogram.total == 0:
        raise WindowUnresolvable("the channel has no neighbour scores")
    low, high = histogram.quantile(quantiles[0]), histogram.quantile(quantiles[1])
    if not low < high:
        raise WindowUnresolvable(
            f"its scores are too much alike: quantiles {quantiles} are both {low}"
        )
    return low, high


def window_record(run: RunDir, name: str, channel: ChannelConfig, parts: Sequence[str]) -> dict:
    """How the mine stage gets `name`'s window: the configured numbers, or the auto rule
    over `parts` with the numbers it chose (scores counted, digest of their histogram)."""
    if channel.window != AUTO:
        return {"window": list(channel.window), "rule": FIXED}
    scanned = scan_channel(run, name, parts)
    try:
        window = auto_window(scanned.histogram, channel.auto_window)
    except WindowUnresolvable as err:
        raise WindowUnresolvable(
            f"channel {name!r} (window: auto): {err}; set channels.{name}.window to numbers "
            f"(megapairs calibrate --run {run.uri} shows its scores)"
        ) from err
    return {
        "window": list(window),
        "rule": AUTO,
        "quantiles": list(channel.auto_window),
        "scores": scanned.scores,
        "queries": scanned.queries,
        "parts": len(parts),
        "digest": scanned.histogram.digest(),
    }


# calibrate ------------------------------------------------------------------------


@dataclass
class Calibration:
    """What `megapairs calibrate` found for one channel."""

    channel: str
    config: ChannelConfig
    k: int
    scanned: ChannelScores
    configured: Window | None  # the window mining uses (auto: resolved), None if unresolvable
    configured_split: WindowSplit | None
    suggested: Window | None
    suggested_split: WindowSplit | None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        histogram = self.scanned.histogram
        return {
            "channel": self.channel,
            "k": self.k,
            "parts": self.scanned.parts,
            "queries": self.scanned.queries,
            "scores": self.scanned.scores,
            "digest": histogram.digest(),
            "quantiles": _quantiles(histogram, SCORE_QUANTILES),
            "ranks": {
                str(rank): {**_quantiles(h, RANK_QUANTILES), "scores": h.total}
                for rank, h in self.scanned.by_rank.items()
            },
            "window": _window_json(self.config.window, self.configured, self.configured_split),
            "suggested": {
                "rule": RULE,
                "auto_window": list(self.config.auto_window),
                **_window_json(self.suggested, self.suggested, self.suggested_split),
            },
            "note": self.note,
        }


def _quantiles(histogram: ScoreHistogram, points: Sequence[float]) -> dict[str, float | None]:
    if histogram.total == 0:
        return {f"p{q * 100:g}": None for q in points}
    return {f"p{q * 100:g}": histogram.quantile(q) for q in points}


def _window_json(
    configured: object, window: Window | None, split: WindowSplit | None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "configured": configured if isinstance(configured, str) else list(configured or [])
    }
    data["resolved"] = list(window) if window else None
    if split is not None:
        data.update(below=split.below, inside=split.inside, above=split.above)
    return data


def calibrate_channel(run: RunDir, name: str, config: PipelineConfig) -> Calibration:
    """Scan `name`'s finished neighbours and place its scores around its windows."""
    channel, k = config.channels[name], config.neighbours.k
    fixed = None if channel.window == AUTO else channel.window
    scanned = scan_channel(run, name, ranks=rank_points(k), window=fixed)
    try:
        suggested: Window | None = auto_window(scanned.histogram, channel.auto_window)
    except WindowUnresolvable as err:
        suggested, note = None, f"no suggestion: {err}"
    else:
        note = ""
    split = scanned.histogram.split(suggested) if suggested else None
    configured = fixed or suggested
    configured_split = scanned.in_window if fixed else split
    return Calibration(
        name, channel, k, scanned, configured, configured_split, suggested, split, note
    )


def calibrate_run(run: RunDir, config: PipelineConfig) -> list[Calibration]:
    """Calibrate every enabled channel with finished neighbours; write each channel's
    `neighbours/<channel>/calibration.json`."""
    channels = [c for c in config.enabled_channels() if finished_parts(run, c)]
    if not channels:
        raise FileNotFoundError(
            f"no enabled channel of {run.uri} has finished neighbours; run "
            f"`megapairs neighbours --run {run.uri}` first"
        )
    results = [calibrate_channel(run, name, config) for name in channels]
    for result in results:
        path = run.folder(neighbours_folder(result.channel)) / CALIBRATION_FILE
        write_json(path, result.as_json())
    return results


# text -----------------------------------------------------------------------------


def format_window(window: Window | None) -> str:
    return "-" if window is None else f"[{window[0]:.4f}, {window[1]:.4f}]"


def _pct(count: int, total: int) -> str:
    return f"{count / max(total, 1):>8.1%}"


def _score_rows(results: Sequence[Calibration]) -> list[str]:
    head = "".join(f"{f'p{q * 100:g}':>8}" for q in SCORE_QUANTILES)
    lines = [f"  {'channel':<16}{'queries':>9}{'scores':>10}{head}"]
    for r in results:
        qs = _quantiles(r.scanned.histogram, SCORE_QUANTILES).values()
        cells = "".join(f"{'-' if v is None else f'{v:.4f}':>8}" for v in qs)
        lines.append(f"  {r.channel:<16}{r.scanned.queries:>9,}{r.scanned.scores:>10,}{cells}")
    return lines


def _rank_rows(results: Sequence[Calibration]) -> list[str]:
    lines = []
    for r in results:
        cells = []
        for rank, histogram in r.scanned.by_rank.items():
            qs = _quantiles(histogram, RANK_QUANTILES).values()
            text = " / ".join("-" if v is None else f"{v:.3f}" for v in qs)
            cells.append(f"rank {rank}: {text}")
        lines.append(f"  {r.channel:<16}" + "   ".join(cells))
    return lines


def _window_rows(results: Sequence[Calibration]) -> list[str]:
    lines = [
        f"  {'channel':<16}{'window':<19}{'rule':<6}{'below':>8}{'inside':>8}{'above':>8}"
        f"{'/query':>8}   {'suggested':<19}{'inside':>8}"
    ]
    for r in results:
        rule = AUTO if r.config.window == AUTO else FIXED
        s, n = r.configured_split, r.scanned.scores
        cells = (
            f"{_pct(s.below, n)}{_pct(s.inside, n)}{_pct(s.above, n)}"
            f"{s.inside / max(r.scanned.queries, 1):>8.1f}"
            if s
            else f"{'-':>8}{'-':>8}{'-':>8}{'-':>8}"
        )
        inside = _pct(r.suggested_split.inside, n) if r.suggested_split else f"{'-':>8}"
        lines.append(
            f"  {r.channel:<16}{format_window(r.configured):<19}{rule:<6}{cells}   "
            f"{format_window(r.suggested):<19}{inside}"
        )
        if r.note:
            lines.append(f"    {r.note}")
    return lines


def format_calibration(run: RunDir, results: Sequence[Calibration]) -> str:
    """The calibration of a run as tables for a terminal."""
    k = results[0].k if results else 0
    quantiles = {tuple(r.config.auto_window) for r in results}
    lines = [
        f"calibration of {run.uri}: neighbour scores per channel (top-{k} lists)",
        "score quantiles:",
        *_score_rows(results),
        "scores by list rank (p10 / p50 / p90):",
        *_rank_rows(results),
        "windows: neighbour entries below (<= low), inside and above (>= high); "
        "/query: inside entries per query",
        *_window_rows(results),
        f"suggested: {RULE}; auto_window (q_low, q_high) = "
        + ", ".join(f"({lo}, {hi})" for lo, hi in sorted(quantiles)),
        "use it with --set channels.<name>.window=auto, or copy the numbers; "
        "written to neighbours/<channel>/calibration.json",
    ]
    return "\n".join(lines)
