"""What a benchmark loader produces and the evaluator consumes.

A benchmark becomes one or more `EvalTask`s (CIRCO: one; FashionIQ: one per
category; GeneCIS: one per subtask; MMEB: one per dataset). A task either has
a shared `gallery` that every query is ranked against (CIRCO, CIRR, FashionIQ),
or each query carries its own `candidates` (GeneCIS, MMEB), where the correct
candidate is listed first by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImageRef:
    """An image file, optionally cropped to a box (x, y, width, height) in pixels."""

    path: Path
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Candidate:
    """One item to rank: an image, a text, or both (MMEB candidates may be either)."""

    id: str
    image: ImageRef | None = None
    text: str | None = None


@dataclass(frozen=True)
class EvalQuery:
    """One query: a reference image and/or a text, with an optional task instruction.

    `targets` are the ids that count as hits (CIRCO: all ground truths, the target
    first; others: one id). `exclude` ids are removed from this query's ranking
    (CIRR removes the reference image). `subset` restricts a second ranking (CIRR's
    `img_set.members`). `meta` keeps benchmark-specific fields (CIRCO's
    `semantic_aspects`)."""

    id: str
    image: ImageRef | None
    text: str | None
    targets: tuple[str, ...] = ()
    instruction: str | None = None
    candidates: tuple[Candidate, ...] = ()
    exclude: tuple[str, ...] = ()
    subset: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalTask:
    """Queries and what they are ranked against."""

    benchmark: str  # circo | cirr | fashioniq | genecis | mmeb
    name: str  # e.g. "circo/val", "fashioniq/dress/val", "genecis/focus_object"
    split: str
    queries: tuple[EvalQuery, ...]
    gallery: tuple[Candidate, ...] = ()  # empty when queries carry their own candidates
    settings: dict[str, Any] = field(default_factory=dict)  # templates etc., for the results


@dataclass
class TaskOutput:
    """What retrieval produced for one task: `rankings` (query id -> gallery ids, best
    first, exclusions removed) and `subset_rankings` for gallery tasks; `scores` (query id
    -> one score per candidate, candidate 0 the correct one) for candidate tasks."""

    task: EvalTask
    rankings: dict[str, list[str]] = field(default_factory=dict)
    subset_rankings: dict[str, list[str]] | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The task's part in its benchmark: category, subtask or dataset name."""
        return task_label(self.task)


def task_label(task: EvalTask) -> str:
    """`fashioniq/dress/val` -> `dress`, `genecis/focus_object` -> `focus_object`,
    `mmeb/ImageNet-1K` -> `ImageNet-1K` (the benchmark and split parts removed)."""
    parts = task.name.split("/")
    if parts and parts[0] == task.benchmark:
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == task.split:
        parts = parts[:-1]
    return "/".join(parts) or task.name


class BenchmarkDataError(ValueError):
    """A data root or annotation file that cannot be evaluated; names the file and entry."""
