"""Evaluation results: `EvalResult`, the results record (JSON), and the completeness of
a split (queries evaluated / queries in the split)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs.evaluation.types import BenchmarkDataError, EvalTask, TaskOutput
from megapairs.runs import environment_versions

if TYPE_CHECKING:
    from megapairs.evaluation.benchmarks import Benchmark
    from megapairs.evaluation.cache import CacheEvent

RESULTS_FORMAT = 2
INCOMPLETE_EXAMPLES = 5


@dataclass
class EvalResult:
    """One benchmark's evaluation: metrics (fractions in [0, 1]; empty for a split
    without ground truth), the full results `record` (as written to `results_path`),
    and the submission files written."""

    benchmark: str
    split: str
    metrics: dict[str, Any]
    record: dict[str, Any]
    results_path: Path | None = None
    submission_paths: list[Path] = field(default_factory=list)


class IncompleteSplit(BenchmarkDataError):
    """A split without ground truth that lost queries: its submission would be refused."""


def results_path(output: Path, benchmark: str, split: str) -> Path:
    """Where a benchmark's results JSON goes inside `output`."""
    return output / f"{benchmark}-{split}.json"


def has_ground_truth(tasks: Sequence[EvalTask]) -> bool:
    """False for a hidden test split: gallery tasks whose queries have no targets.
    Candidate tasks always have it (candidate 0 is the correct one)."""
    gallery_tasks = [task for task in tasks if task.gallery]
    if len(gallery_tasks) < len(tasks):
        return True
    return any(query.targets for task in gallery_tasks for query in task.queries)


def split_coverage(tasks: Sequence[EvalTask]) -> tuple[int, int]:
    """(queries evaluated, queries in the split): those dropped for missing or undecodable
    images (`allow_missing`) count in the split only."""
    evaluated = sum(len(task.queries) for task in tasks)
    dropped = sum(int(task.settings.get("dropped_queries") or 0) for task in tasks)
    return evaluated, evaluated + dropped


def check_complete(benchmark: str, split: str, tasks: Sequence[EvalTask]) -> None:
    """Refuse a hidden split that lost any query: the server scores only complete files."""
    evaluated, total = split_coverage(tasks)
    if evaluated == total:
        return
    examples = [
        str(example) for task in tasks for example in task.settings.get("dropped_query_ids") or []
    ][:INCOMPLETE_EXAMPLES]
    named = f" (e.g. queries {', '.join(examples)})" if examples else ""
    raise IncompleteSplit(
        f"{benchmark} {split}: only {evaluated} of {total} queries can be evaluated; "
        f"{total - evaluated} lost their images{named}. The evaluation server needs every "
        "query, so no submission was written: restore the missing images and run again"
    )


def build_record(
    benchmark: Benchmark,
    split: str,
    outputs: Sequence[TaskOutput],
    metrics: Mapping[str, Any],
    submissions: Sequence[Path],
    context: Any,
    events: Sequence[CacheEvent],
    settings: Mapping[str, Any],
    model: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The results record of one evaluation (`context`: the engine's `EvalContext`)."""
    evaluated, total = split_coverage([output.task for output in outputs])
    return {
        "format": RESULTS_FORMAT,
        "benchmark": benchmark.name,
        "split": split,
        "metrics": dict(metrics),
        "ground_truth": bool(metrics),
        "settings": dict(settings),
        "tasks": [_task_record(output) for output in outputs],
        "model": {**(model or {}), "key": context.model_key},
        "retriever": context.retriever.name,
        "counts": {
            "tasks": len(outputs),
            "queries": evaluated,
            "queries_in_split": total,
            "gallery": sum(len(o.task.gallery) for o in outputs),
            "candidates": sum(len(q.candidates) for o in outputs for q in o.task.queries),
            "encoded_queries": context.query_rows,
            "undecodable_images": context.undecodable_images,
        },
        "cache": {
            "dir": None if context.cache is None else str(context.cache.root),
            "hits": sum(event.status == "hit" for event in events),
            "misses": sum(event.status != "hit" for event in events),
            "encoded_rows": sum(e.encoded_rows for e in events) + context.encoded_candidates,
            "lookups": [event.as_dict() for event in events],
        },
        "search": {"index": "IndexFlatIP", "depth": benchmark.depth},
        "submissions": [str(path) for path in submissions],
        "batch_size": context.batch_size,
        "versions": environment_versions(),
    }


def _task_record(output: TaskOutput) -> dict[str, Any]:
    task = output.task
    return {
        "name": task.name,
        "label": output.label,
        "queries": len(task.queries),
        "gallery": len(task.gallery),
        "settings": task.settings,
        "seconds": {key: round(value, 3) for key, value in output.seconds.items()},
    }
