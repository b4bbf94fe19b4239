"""One plug-in per benchmark, in one registry: what the evaluator, the CLI and the tables
know of a benchmark comes from here.

A `Benchmark` names its splits and default split, loads a split's tasks (its loader in
`loaders/`, settings checked there: an unknown key is an error), says how deep a ranking
its metrics and submissions need, turns the engine's `TaskOutput`s into its metrics
(`metrics.py`), writes the server submission files of a hidden test split
(`submissions.py`), and names its columns of the paper's Table 1. To add a benchmark:
write its loader (registered in `loaders.base.LOADERS`) and register a `Benchmark` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from megapairs.evaluation import metrics as M
from megapairs.evaluation import submissions as S
from megapairs.evaluation.loaders import circo, cirr, fashioniq, genecis, load_benchmark, mmeb
from megapairs.evaluation.loaders.base import LoaderSettings
from megapairs.evaluation.types import EvalTask, TaskOutput

Scorer = Callable[[Sequence[TaskOutput]], dict[str, Any]]
Submitter = Callable[[Sequence[TaskOutput], Path], list[Path]]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: splits, loading, ranking depth, metrics, submissions, Table 1 columns
    ((header, metric) pairs)."""

    name: str
    splits: tuple[str, ...]
    default_split: str
    depth: int  # ranking depth its metrics and submissions need (0: candidate scoring)
    score: Scorer
    submit: Submitter | None = None  # for splits without ground truth
    table1: tuple[tuple[str, str], ...] = ()
    primary_metric: str = ""
    paper_split: str = ""  # the split the paper's Table 1 reports (empty: default_split)
    settings: type[LoaderSettings] = LoaderSettings  # its loader's typed settings

    @property
    def reported_split(self) -> str:
        """The split the paper's numbers are on (`--split paper`)."""
        return self.paper_split or self.default_split

    def load(
        self, data_root: Path, split: str, settings: Mapping[str, Any] | None = None
    ) -> list[EvalTask]:
        """The tasks of `split` read from `data_root` (see the loader's module)."""
        return load_benchmark(self.name, data_root, split, settings)


def _circo_metrics(outputs: Sequence[TaskOutput]) -> dict[str, Any]:
    (output,) = outputs
    return M.circo_metrics(output.rankings, output.task.queries)


def _cirr_metrics(outputs: Sequence[TaskOutput]) -> dict[str, Any]:
    (output,) = outputs
    return M.cirr_metrics(
        output.rankings, output.task.queries, subset_rankings=output.subset_rankings
    )


def _fashioniq_metrics(outputs: Sequence[TaskOutput]) -> dict[str, Any]:
    per_category = {o.label: (o.rankings, o.task.queries) for o in outputs}
    return M.fashioniq_metrics(per_category)


def _genecis_metrics(outputs: Sequence[TaskOutput]) -> dict[str, Any]:
    """Per-subtask Recall@{1,2,3}; the average R@1 (the headline) only over all four
    subtasks, else `missing_subtasks` and a note on why it is absent."""
    per_subtask = {o.label: M.genecis_metrics(o.scores) for o in outputs}
    result: dict[str, Any] = {
        f"{subtask}/{name}": value
        for subtask, values in per_subtask.items()
        for name, value in values.items()
    }
    if missing := [subtask for subtask in genecis.SUBTASKS if subtask not in per_subtask]:
        result["missing_subtasks"] = missing
        result["average_note"] = (
            f"no average R@1: it needs all {len(genecis.SUBTASKS)} subtasks, "
            f"{', '.join(missing)} missing"
        )
    else:
        result["average/Recall@1"] = M.genecis_average(per_subtask)
    return result


def _mmeb_metrics(outputs: Sequence[TaskOutput]) -> dict[str, Any]:
    per_dataset = {o.label: M.mmeb_precision_at_1(o.scores) for o in outputs}
    result: dict[str, Any] = {f"{name}/Precision@1": value for name, value in per_dataset.items()}
    result |= {f"{group}/Precision@1": v for group, v in M.mmeb_summary(per_dataset).items()}
    if missing := M.mmeb_missing(per_dataset):
        result["missing_datasets"] = missing
    return result


def _circo_submit(outputs: Sequence[TaskOutput], folder: Path) -> list[Path]:
    (output,) = outputs
    queries = output.task.queries
    submission = S.circo_submission(output.rankings, queries)
    validate = partial(S.validate_circo_submission, query_ids=[q.id for q in queries])
    path = folder / f"circo-{output.task.split}-submission.json"
    return [S.write_submission(path, submission, validate)]


def _cirr_submit(outputs: Sequence[TaskOutput], folder: Path) -> list[Path]:
    (output,) = outputs
    queries = output.task.queries
    recall, subset = S.cirr_submissions(output.rankings, queries, output.subset_rankings)
    split = output.task.split
    return [
        S.write_submission(
            folder / f"cirr-{split}-recall-submission.json",
            recall,
            partial(S.validate_cirr_recall_submission, queries=queries),
        ),
        S.write_submission(
            folder / f"cirr-{split}-recall_subset-submission.json",
            subset,
            partial(S.validate_cirr_subset_submission, queries=queries),
        ),
    ]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "circo",
            circo.SPLITS,
            "val",
            max(M.CIRCO_KS),
            _circo_metrics,
            _circo_submit,
            (("CIRCO mAP@5", "mAP@5"),),
            "mAP@5",
            "test",
            circo.Settings,
        ),
        Benchmark(
            "cirr",
            cirr.SPLITS,
            "val",
            max(M.CIRR_KS),
            _cirr_metrics,
            _cirr_submit,
            (("CIRR R@1", "Recall@1"), ("CIRR Rs@1", "Recall_subset@1")),
            "Recall@1",
            "test1",
            cirr.Settings,
        ),
        Benchmark(
            "fashioniq",
            fashioniq.SPLITS,
            "val",
            max(M.FASHIONIQ_KS),
            _fashioniq_metrics,
            table1=(("FashionIQ R@10", "average/R@10"),),
            primary_metric="average/R@10",
            settings=fashioniq.Settings,
        ),
        Benchmark(
            "genecis",
            genecis.SPLITS,
            "val",
            0,
            _genecis_metrics,
            table1=(("GeneCIS Rs@1", "average/Recall@1"),),
            primary_metric="average/Recall@1",
            settings=genecis.Settings,
        ),
        Benchmark(
            "mmeb",
            mmeb.SPLITS,
            "test",
            0,
            _mmeb_metrics,
            primary_metric="overall/Precision@1",
            settings=mmeb.Settings,
        ),
    )
}
"""Benchmark name -> plug-in, in the paper's order."""


def benchmark(name: str) -> Benchmark:
    """The plug-in of `name`; a ValueError listing the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
