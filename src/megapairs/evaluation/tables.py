"""Markdown tables of evaluation results: the paper's Table 1 layout and per-benchmark details.

Metrics are stored as fractions in [0, 1]; tables print them x100 with one decimal, as
the paper does. A benchmark without results is shown as an en dash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs.evaluation.benchmarks import BENCHMARKS

MISSING = "\u2013"  # an en dash, as the paper prints a missing number

Record = Mapping[str, Any]
"""A results record as `evaluate` writes it (needs `metrics`; `split` is shown if present)."""


@dataclass(frozen=True)
class Column:
    """A Table 1 column: its header and where its number comes from."""

    header: str
    benchmark: str
    metric: str


@dataclass(frozen=True)
class PaperRow:
    """A reference row of the paper's Table 1 (zero-shot, in percent)."""

    model: str
    backbone: str
    values: tuple[float, ...]


TABLE1_COLUMNS = tuple(
    Column(header, plugin.name, metric)
    for plugin in BENCHMARKS.values()
    for header, metric in plugin.table1
)
"""The paper's Table 1 columns, in the order of the benchmark registry."""

# MegaPairs paper, Table 1 (zero-shot); see docs in ../shared/docs/benchmarks.md.
PAPER_TABLE1 = (
    PaperRow("MagicLens-B", "CLIP-B", (23.1, 27.0, 66.7, 26.3, 15.0)),
    PaperRow("MMRet-Base", "CLIP-B", (34.3, 36.1, 71.6, 31.9, 18.0)),
    PaperRow("MagicLens-L", "CLIP-L", (29.6, 30.1, 68.1, 30.7, 16.3)),
    PaperRow("MMRet-Large", "CLIP-L", (39.2, 38.0, 73.2, 34.6, 18.1)),
    PaperRow("MMRet-MLLM", "LLaVA-1.6 7B", (42.2, 46.7, 75.4, 35.6, 21.1)),
)


def percent(value: Any) -> str:
    """A fraction as a percentage with one decimal; anything else as `MISSING`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING
    return f"{100 * value:.1f}"


def table1_markdown(
    ours: Mapping[str, Mapping[str, Record]],
    backbone: Mapping[str, str] | None = None,
    paper: Sequence[PaperRow] = PAPER_TABLE1,
) -> str:
    """Table 1: the paper's reference rows, then one row per model of `ours` (label ->
    benchmark -> results record), named "ours: <label>". A note under the table says
    which split each of our numbers comes from (the paper's are the test splits for
    CIRCO and CIRR, the validation splits for FashionIQ, and GeneCIS's one set)."""
    headers = ["model", "backbone", *(column.header for column in TABLE1_COLUMNS)]
    rows = [[row.model, row.backbone, *(f"{v:.1f}" for v in row.values)] for row in paper]
    for label, records in ours.items():
        values = [_value(records.get(column.benchmark), column.metric) for column in TABLE1_COLUMNS]
        rows.append([f"ours: {label}", (backbone or {}).get(label, MISSING), *values])
    lines = _markdown(headers, rows)
    notes = [_splits_note(label, records) for label, records in ours.items()]
    return "\n".join([*lines, "", *(note for note in notes if note)]).rstrip() + "\n"


def details_markdown(records: Mapping[str, Record]) -> str:
    """Every metric of every benchmark (benchmark -> record), one table per benchmark."""
    sections = []
    for benchmark, record in records.items():
        title = f"### {benchmark} ({record.get('split', '?')}{_coverage(record)})"
        metrics = record.get("metrics") or {}
        numeric = {k: v for k, v in metrics.items() if _is_number(v)}
        if not numeric:
            sections.append(f"{title}\n\nno ground truth: submission files written\n")
            continue
        rows = [[name, percent(value)] for name, value in numeric.items()]
        section = [title, "", *_markdown(["metric", "value (%)"], rows)]
        for name, value in metrics.items():
            if not _is_number(value):
                section.append(f"\n{name}: {value}")
        sections.append("\n".join(section) + "\n")
    return "\n".join(sections)


def load_records(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Results JSON files (as `evaluate` writes them) by benchmark."""
    records = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        records[record["benchmark"]] = record
    return records


def _value(record: Record | None, metric: str) -> str:
    if record is None:
        return MISSING
    return percent((record.get("metrics") or {}).get(metric))


def _splits_note(label: str, records: Mapping[str, Record]) -> str:
    splits = [f"{name} {record.get('split', '?')}" for name, record in records.items()]
    return f"ours: {label} evaluated on {', '.join(splits)}." if splits else ""


def _coverage(record: Record) -> str:
    """`, 799/800 queries` (evaluated / in the split), when the record says."""
    counts = record.get("counts") or {}
    evaluated, total = counts.get("queries"), counts.get("queries_in_split")
    return f", {evaluated}/{total} queries" if evaluated is not None and total else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
