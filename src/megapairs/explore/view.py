"""What the explorer shows of a run: pages of pairs, one pair with everything known about it,
and the run overview. Reads only finished parts; never writes the run's tables."""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import PipelineConfig
from megapairs.corpus.store import read_corpus, read_rejects
from megapairs.dataset.export import SCORE_STAGE
from megapairs.dataset.flags import PAIR_ID, ActiveFlags, FlagEvent, FlagStore, pair_part
from megapairs.dataset.stats import word_counts
from megapairs.demo.summary import channel_windows, stored_config
from megapairs.explore.index import (
    ANNOTATE_STAGE,
    MINE_STAGE,
    InstructionText,
    PairFilter,
    cached_index,
    row_dicts,
    run_signature,
    select,
)
from megapairs.neighbours.calibrate import GRID, ScoreHistogram
from megapairs.pipeline.runner import sum_counts
from megapairs.runs import RunDir, concat_tables, read_table
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    PAIRS_DIR,
    SCORES_DIR,
)

log = logging.getLogger(__name__)

RECORD_COLUMNS = ["id", "caption", "uri", "width", "height"]
HISTOGRAM_BINS = 50
REJECT_EXAMPLES = 8
TEXT_MATCHES_KEPT = 16  # text searches whose matching pairs are kept
QUALITY_FIELDS = (
    "rank", "margin", "text_only_rank", "image_only_rank", "text_shortcut", "image_shortcut",
    "judge_verdict", "judge_reason", "scorer",
)  # fmt: skip


class UnknownPair(KeyError):
    """No finished pair has this id (a 404)."""


class RunView:
    """A run as the explorer sees it; caches rebuilt when another part is finished."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.config: PipelineConfig | None = stored_config(run)
        self.channels = list(self.config.enabled_channels()) if self.config else []
        self.flags = FlagStore(run)
        self._lock = threading.RLock()
        self._signature: tuple[str, ...] | None = None
        self._index: pa.Table | None = None
        self._overview: dict[str, Any] | None = None
        self._text: InstructionText | None = None
        self._matches: OrderedDict[str, pa.Array] = OrderedDict()
        self._records: pa.Table | None = None
        self._record_ids: np.ndarray | None = None

    # caches -----------------------------------------------------------------------

    def warm(self) -> None:
        """Build the pair index and read the corpus records now (in a background thread at
        start-up), so the first page does not wait for them; an error here is left for the
        first request to report."""
        try:
            self.index()
            self.records()
            self.overview()
        except Exception:
            log.warning("the explorer could not read the run at start-up", exc_info=True)

    def index(self) -> pa.Table:
        """The pair index, rebuilt when a mine or annotate part was finished since."""
        signature = run_signature(self.run)
        with self._lock:
            if self._index is None or signature != self._signature:
                self._index = cached_index(self.run, self.channels, signature)
                self._signature = signature
                self._overview = None
                self._text = None
                self._records = None
            return self._index

    def _matching(self, text: str) -> pa.Array:
        with self._lock:
            if self._text is None:
                self._text = InstructionText(self.run)
                self._matches.clear()
            key = text.lower()
            if key not in self._matches:
                self._matches[key] = self._text.matches(text)
                while len(self._matches) > TEXT_MATCHES_KEPT:
                    self._matches.popitem(last=False)
            self._matches.move_to_end(key)
            return self._matches[key]

    def records(self) -> tuple[np.ndarray, pa.Table]:
        """Corpus records sorted by id: (ids, table of RECORD_COLUMNS)."""
        with self._lock:
            if self._records is None:
                table = read_corpus(self.run, columns=RECORD_COLUMNS)
                order = np.argsort(table["id"].to_numpy(), kind="stable")
                self._records = table.take(pa.array(order))
                self._record_ids = self._records["id"].to_numpy()
            assert self._record_ids is not None
            return self._record_ids, self._records

    def record(self, record_id: int) -> dict[str, Any]:
        """Caption, uri and size of a corpus record (only the id when it is not in it)."""
        ids, table = self.records()
        row = int(np.searchsorted(ids, record_id))
        if row < len(ids) and ids[row] == record_id:
            return table.slice(row, 1).to_pylist()[0]
        return {"id": record_id, "caption": None, "uri": None, "width": None, "height": None}

    # pages ------------------------------------------------------------------------

    def pairs(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """One page of pairs for the query parameters of `/api/pairs`."""
        chosen = PairFilter.parse(params, self.channels)
        index = self.index()
        active = self.flags.active()
        matching = self._matching(chosen.text) if chosen.text else None
        page = select(index, chosen, set(active.pairs), matching)
        rows = row_dicts(page.rows, self.channels)
        counted = Counter(pair for pair, _ in active.instructions)
        for row in rows:
            row["flagged"] = row["pair_id"] in active.pairs
            row["flagged_instructions"] = counted.get(row["pair_id"], 0)
        return {
            "total": page.total,
            "offset": chosen.offset,
            "limit": chosen.limit,
            "elapsed_ms": round(page.elapsed_ms, 2),
            "channels": self.channels,
            "rows": rows,
        }

    # one pair ---------------------------------------------------------------------

    def pair(self, pair_id: str) -> dict[str, Any]:
        """Everything known about one pair; UnknownPair when no finished pair has the id."""
        part, mined = self._mined(pair_id)
        annotation = self._row(ANNOTATIONS_DIR, ANNOTATE_STAGE, part, pair_id)
        failure = self._row(ANNOTATION_FAILURES_DIR, ANNOTATE_STAGE, part, pair_id)
        scores = self._scores(part, pair_id)
        events = self.flags.events()
        active = ActiveFlags.replay(events)
        return {
            "pair_id": pair_id,
            "part": part,
            "rank": mined["rank"],
            "query": self.record(mined["query_id"]),
            "target": self.record(mined["target_id"]),
            "negatives": self._negatives(mined["hard_negative_ids"], scores),
            "hard_negative_topped_up": mined["hard_negative_topped_up"],
            "channels": mined["channels"],
            "channel_scores": [round(float(s), 6) for s in mined["channel_scores"]],
            "status": "annotated" if annotation else "failed" if failure else "pending",
            "description": annotation["description"] if annotation else None,
            "instructions": _instructions(pair_id, annotation, scores, active),
            "dropped_instructions": annotation["dropped_instructions"] if annotation else [],
            "provenance": _provenance(annotation or failure),
            "failure": _failure(failure),
            **_pair_flags(pair_id, active, events),
        }

    def instructions(self, pair_id: str) -> list[str]:
        """The pair's annotated instructions ([] before or without an annotation);
        UnknownPair when no finished pair has the id."""
        part, _ = self._mined(pair_id)
        annotation = self._row(ANNOTATIONS_DIR, ANNOTATE_STAGE, part, pair_id)
        return annotation["instructions"] if annotation else []

    def _mined(self, pair_id: str) -> tuple[str, dict[str, Any]]:
        """The pair's part and mined row; UnknownPair for a malformed or unknown id."""
        if PAIR_ID.match(pair_id) is None:
            raise UnknownPair(f"{pair_id!r} is not a pair id (QUERY-TARGET, two record ids)")
        part = pair_part(pair_id)
        mined = self._row(PAIRS_DIR, MINE_STAGE, part, pair_id)
        if mined is None:
            raise UnknownPair(f"no finished pair {pair_id}")
        return part, mined

    def _row(self, folder: str, stage: str, part: str, pair_id: str) -> dict[str, Any] | None:
        path = self.run.part_path(folder, part)
        if not self.run.is_done(stage, part) or not path.exists():
            return None
        rows = read_table(path, filters=pc.field("pair_id") == pair_id).to_pylist()
        return rows[0] if rows else None

    def _scores(self, part: str, pair_id: str) -> dict[int, dict[str, Any]]:
        path = self.run.part_path(SCORES_DIR, part)
        if not self.run.is_done(SCORE_STAGE, part) or not path.exists():
            return {}
        rows = read_table(path, filters=pc.field("pair_id") == pair_id).to_pylist()
        return {row["instruction_index"]: row for row in rows}

    def _negatives(self, ids: list[int], scores: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        false = {i for row in scores.values() for i in row["false_negative_ids"] or []}
        return [{**self.record(i), "false_negative": i in false} for i in ids]

    # overview ---------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """Counts, rejects, histograms and distributions of the run (cached per signature)."""
        index = self.index()
        with self._lock:
            if self._overview is None:
                self._overview = self._compute_overview(index)
            cached = dict(self._overview)
        cached["flags"] = self.flags.active().summary()
        return cached

    def _compute_overview(self, index: pa.Table) -> dict[str, Any]:
        rejects = read_rejects(self.run)
        _, records = self.records()
        return {
            "run": self.run.uri,
            "stages": self._stages(),
            "records": {"corpus": records.num_rows, "rejected": rejects.num_rows},
            "rejects": _reject_groups(rejects),
            "channels": self._channel_charts(index),
            "combinations": _combinations(index),
            "instructions_per_pair": _instruction_counts(index),
            "instruction_words": _instruction_words(self.run),
            "annotation": _annotation_counts(index),
        }

    def _stages(self) -> list[dict[str, Any]]:
        stages = self.run.read_manifest().get("stages", {})
        out = []
        for name in stages:
            counts = self.run.part_counts(name)
            out.append({"stage": name, "parts_done": len(counts), "counts": sum_counts(counts)})
        return out

    def _channel_charts(self, index: pa.Table) -> list[dict[str, Any]]:
        windows = channel_windows(self.run)
        charts = []
        for name in self.channels:
            entry = windows.get(name)
            column = index[f"score:{name}"]
            charts.append(
                {
                    "name": name,
                    "window": list(entry.window) if entry and entry.window else None,
                    "rule": entry.rule if entry else None,
                    "pairs": len(column) - column.null_count,
                    "histogram": _bins(entry.neighbours.histogram)
                    if entry and entry.neighbours
                    else None,
                }
            )
        return charts


def _instructions(
    pair_id: str,
    annotation: dict[str, Any] | None,
    scores: dict[int, dict[str, Any]],
    active: ActiveFlags,
) -> list[dict[str, Any]]:
    if annotation is None:
        return []
    out = []
    for index, text in enumerate(annotation["instructions"]):
        flag = active.instructions.get((pair_id, index))
        score = scores.get(index)
        quality = {k: _finite(score[k]) for k in QUALITY_FIELDS} if score else None
        out.append(
            {
                "index": index,
                "text": text,
                "flagged": flag is not None,
                "flag": flag.as_dict() if flag else None,
                "quality": quality,
            }
        )
    return out


def _finite(value: Any) -> Any:
    """JSON has no infinity: a margin without negatives is shown as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _provenance(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("backend", "describer_model", "instructor_model", "prompt_version", "seed")
    extra = ("word_num", "repaired", "demonstration_ids")
    return {k: row.get(k) for k in (*keys, *extra) if k in row}


def _failure(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("step", "reason", "detail", "raw_output", "attempts", "transient")
    return {k: row[k] for k in keys}


def _pair_flags(pair_id: str, active: ActiveFlags, events: list[FlagEvent]) -> dict[str, Any]:
    flag = active.pairs.get(pair_id)
    history = [e.as_dict() for e in events if e.pair_id == pair_id]
    return {"flagged": flag is not None, "flag": flag.as_dict() if flag else None, "flags": history}


def _reject_groups(rejects: pa.Table) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for stage, reason, record in zip(
        rejects["stage"].to_pylist(),
        rejects["reason"].to_pylist(),
        rejects["id"].to_pylist(),
        strict=True,
    ):
        groups.setdefault((stage, reason), []).append(record)
    return [
        {"stage": s, "reason": r, "count": len(ids), "examples": ids[:REJECT_EXAMPLES]}
        for (s, r), ids in sorted(groups.items(), key=lambda item: -len(item[1]))
    ]


def _bins(histogram: ScoreHistogram) -> dict[str, list[float]] | None:
    """The 1e-4-grid histogram as HISTOGRAM_BINS equal bins over the scores' range."""
    if histogram.total == 0:
        return None
    low, high = histogram.quantile(1e-12) - 1e-4, histogram.quantile(1.0)
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    cells = np.clip(np.searchsorted(GRID, edges), 0, GRID.size - 1)
    at_or_below = np.concatenate([[0], histogram.at_or_below()])
    cumulative = at_or_below[np.minimum(cells + 1, at_or_below.size - 1)]
    counts = np.diff(cumulative)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def _combinations(index: pa.Table) -> list[dict[str, Any]]:
    counts = pc.value_counts(index["combo"].combine_chunks().dictionary_decode())
    rows = [
        {"channels": item["values"].split("+") if item["values"] else [], "pairs": item["counts"]}
        for item in counts.to_pylist()
    ]
    return sorted(rows, key=lambda r: -r["pairs"])


def _instruction_counts(index: pa.Table) -> list[dict[str, int]]:
    counts = pc.value_counts(index["num_instructions"].drop_null()).to_pylist()
    return sorted(
        ({"instructions": c["values"], "pairs": c["counts"]} for c in counts),
        key=lambda r: r["instructions"],
    )


def _instruction_words(run: RunDir) -> dict[str, list[int]]:
    table = concat_tables(
        run.files(ANNOTATIONS_DIR, ANNOTATE_STAGE), ANNOTATIONS_SCHEMA, ["instructions"]
    )
    if table.num_rows == 0:
        return {"edges": [], "counts": []}
    words = word_counts(table["instructions"]).to_numpy(zero_copy_only=False)
    top = int(words.max()) + 1
    counts = np.bincount(words, minlength=top)
    return {"edges": list(range(top + 1)), "counts": counts.tolist()}


def _annotation_counts(index: pa.Table) -> dict[str, Any]:
    status = Counter(index["status"].to_pylist())
    reasons = pc.value_counts(index["failure_reason"].drop_null()).to_pylist()
    return {
        "annotated": status.get("annotated", 0),
        "failed": status.get("failed", 0),
        "pending": status.get("pending", 0),
        "failures": [{"reason": r["values"], "count": r["counts"]} for r in reasons],
    }
