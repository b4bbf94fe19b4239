"""One composed-retrieval evaluator for every benchmark, with a thin adapter per benchmark.

`evaluate` loads a benchmark's tasks (`loaders.load_benchmark`), checks before any
encoding that every image it will decode can be decoded (`cache.find_undecodable`: one
error listing them, or with `allow_missing` they are dropped and counted), and, per task:

- gallery tasks (CIRCO, CIRR, FashionIQ): the gallery is embedded once per checkpoint
  (`GalleryCache`), the queries are embedded (image + text, image or text, with the
  task instruction as the loader set it: None leaves the retriever's own default), and
  FAISS inner-product search (`IndexFlatIP`, on the GPUs when FAISS sees one) returns
  each query's top `depth + len(exclude) + margin` ids; excluded ids are dropped and the
  ranking cut to the adapter's `depth`. Queries with a `subset` (CIRR) also get the
  subset ranked exactly by score.
- candidate tasks (GeneCIS, MMEB): each query's candidates are scored by dot product
  (candidate 0 is the correct one); the distinct candidates of a task are embedded
  through the same cache.

The adapter (`ADAPTERS[benchmark]`) turns those rankings or scores into the
benchmark's metrics (`metrics.py`) and, for splits without ground truth (CIRCO test,
CIRR test1), into server submission files (`submissions.py`). The results JSON holds
metrics, settings and templates, model, versions, counts, cache hits and dates.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from megapairs.evaluation import metrics as M
from megapairs.evaluation import submissions as S
from megapairs.evaluation.cache import (
    DECODE_WORKERS,
    GalleryCache,
    ImageDecodeError,
    checkpoint_key,
    encode_items,
    entry_key,
    find_undecodable,
    undecodable_report,
)
from megapairs.evaluation.loaders import DEFAULT_SPLITS, SPLITS, load_benchmark
from megapairs.evaluation.loaders.base import drop_images
from megapairs.evaluation.loaders.genecis import SUBTASKS as GENECIS_SUBTASKS
from megapairs.evaluation.types import (
    BenchmarkDataError,
    Candidate,
    EvalQuery,
    EvalTask,
    ImageRef,
)
from megapairs.models.base import Retriever
from megapairs.runs import environment_versions, now_iso, write_json

RESULTS_FORMAT = 1
SEARCH_MARGIN = 8  # extra hits fetched beyond depth + exclusions (slack for ties/padding)
SEARCH_BLOCK = 16_384  # queries per FAISS search call
GpuMode = bool | None  # None: use the GPUs when FAISS sees one


# outputs of one task ------------------------------------------------------------


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


# adapters ---------------------------------------------------------------------


Scorer = Callable[[Sequence[TaskOutput]], dict[str, Any]]
Submitter = Callable[[Sequence[TaskOutput], Path], list[Path]]


@dataclass(frozen=True)
class BenchmarkAdapter:
    """How one benchmark is scored: the ranking `depth` its metrics and submissions need,
    its metrics, and (for hidden test splits) its submission writer."""

    depth: int
    metrics: Scorer
    submit: Submitter | None = None


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
    if missing := [subtask for subtask in GENECIS_SUBTASKS if subtask not in per_subtask]:
        result["missing_subtasks"] = missing
        result["average_note"] = (
            f"no average R@1: it needs all {len(GENECIS_SUBTASKS)} subtasks, "
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


ADAPTERS: dict[str, BenchmarkAdapter] = {
    "circo": BenchmarkAdapter(max(M.CIRCO_KS), _circo_metrics, _circo_submit),
    "cirr": BenchmarkAdapter(max(M.CIRR_KS), _cirr_metrics, _cirr_submit),
    "fashioniq": BenchmarkAdapter(max(M.FASHIONIQ_KS), _fashioniq_metrics),
    "genecis": BenchmarkAdapter(0, _genecis_metrics),
    "mmeb": BenchmarkAdapter(0, _mmeb_metrics),
}
BENCHMARKS = tuple(ADAPTERS)


# results ----------------------------------------------------------------------


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


def results_path(output: Path, benchmark: str, split: str) -> Path:
    """Where `evaluate` writes a benchmark's results JSON inside `output`."""
    return output / f"{benchmark}-{split}.json"


# evaluation -------------------------------------------------------------------


def evaluate(
    benchmark: str,
    retriever: Retriever,
    model_key: str,
    data_root: Path,
    split: str,
    settings: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
    output: Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
    *,
    model: Mapping[str, Any] | None = None,
    gpu: GpuMode = None,
    workers: int = DECODE_WORKERS,
) -> EvalResult:
    """Evaluate `retriever` on `benchmark`'s `split` read from `data_root`.

    `settings` go to the benchmark's loader (templates, folders); `model_key`
    identifies the checkpoint for the cache (`cache.checkpoint_key`); `model` (e.g.
    kind and path) is recorded as given. Without `cache_dir` galleries are encoded
    but not stored. With `output` (a folder) the results JSON
    (`<benchmark>-<split>.json`) and, for a split without ground truth, the server
    submission files are written there; a hidden split without `output` is an error,
    since it has nothing else to give. `gpu`: search on FAISS GPUs (None: when FAISS
    sees one); `workers`: image-decoding threads."""
    adapter = _adapter(benchmark)
    started, clock = now_iso(), time.perf_counter()
    tasks = load_benchmark(benchmark, Path(data_root), split, dict(settings or {}))
    if not tasks:
        raise BenchmarkDataError(f"{benchmark} {split} under {data_root}: no tasks loaded")
    hidden = not has_ground_truth(tasks)
    if hidden and output is None:
        raise ValueError(f"{benchmark} {split} has no ground truth: give an output folder")
    cache = GalleryCache(cache_dir, workers=workers) if cache_dir is not None else None
    context = _Context(retriever, model_key, cache, batch_size, progress, gpu, workers)
    tasks = _decodable_tasks(tasks, context, f"{benchmark} {split} under {data_root}")
    outputs = [_run_task(task, adapter.depth, context) for task in tasks]
    metrics = {} if hidden else adapter.metrics(outputs)
    submissions = []
    if hidden and adapter.submit is not None and output is not None:
        submissions = adapter.submit(outputs, Path(output))
    record = _record(
        benchmark, split, outputs, metrics, submissions, context, settings or {}, model
    )
    record.update(started=started, finished=now_iso())
    record["seconds"] = round(time.perf_counter() - clock, 3)
    path = None
    if output is not None:
        path = results_path(Path(output), benchmark, split)
        write_json(path, record)
    return EvalResult(benchmark, split, metrics, record, path, submissions)


def has_ground_truth(tasks: Sequence[EvalTask]) -> bool:
    """False for a hidden test split: gallery tasks whose queries have no targets.
    Candidate tasks always have it (candidate 0 is the correct one)."""
    gallery_tasks = [task for task in tasks if task.gallery]
    if len(gallery_tasks) < len(tasks):
        return True
    return any(query.targets for task in gallery_tasks for query in task.queries)


def _adapter(benchmark: str) -> BenchmarkAdapter:
    if benchmark not in ADAPTERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[benchmark]


@dataclass
class _Context:
    """What every task of one evaluation shares."""

    retriever: Retriever
    model_key: str
    cache: GalleryCache | None
    batch_size: int
    progress: bool
    gpu: GpuMode
    workers: int
    query_rows: int = 0
    encoded_candidates: int = 0
    undecodable_images: int = 0

    def embed_candidates(self, items: Sequence[Candidate], name: str, task: EvalTask) -> np.ndarray:
        """Embeddings of `items` through the cache (or encoded directly without one)."""
        if self.cache is not None:
            _, vectors = self.cache.embed_items(
                items,
                name=name,
                benchmark=task.benchmark,
                split=task.split,
                retriever=self.retriever,
                model_key=self.model_key,
                batch_size=self.batch_size,
                progress=self.progress,
            )
            return vectors
        self.encoded_candidates += len(items)
        encode = self.retriever.encode_candidates
        with tqdm(total=len(items), desc="gallery", disable=not self.progress) as bar:
            return encode_items(
                items, encode, self.batch_size, workers=self.workers, on_batch=bar.update
            )

    def has_cached(self, items: Sequence[Candidate], name: str, task: EvalTask) -> bool:
        """Whether the cache holds the embeddings of `items` (as `embed_candidates` names them)."""
        if self.cache is None:
            return False
        key = entry_key(items, name, task.benchmark, task.split, self.retriever, self.model_key)
        return self.cache.has_entry(key, [item.id for item in items])

    def embed_queries(self, queries: Sequence[EvalQuery]) -> np.ndarray:
        """Query embeddings, encoded per instruction group (float32, input order)."""
        groups: dict[str | None, list[int]] = defaultdict(list)
        for position, query in enumerate(queries):
            groups[query.instruction].append(position)
        output: np.ndarray | None = None
        with tqdm(total=len(queries), desc="queries", disable=not self.progress) as bar:
            for instruction, positions in groups.items():
                encode = partial(self.retriever.encode_queries, instruction=instruction)
                group = [queries[p] for p in positions]
                rows = encode_items(
                    group, encode, self.batch_size, workers=self.workers, on_batch=bar.update
                )
                if output is None:
                    output = np.empty((len(queries), rows.shape[1]), np.float32)
                output[positions] = rows
        self.query_rows += len(queries)
        return output if output is not None else np.zeros((0, 0), np.float32)


def _decodable_tasks(tasks: Sequence[EvalTask], context: _Context, source: str) -> list[EvalTask]:
    """Before any encoding: the images still to encode that cannot be decoded are one
    `ImageDecodeError` (count and examples), or, with `allow_missing`, dropped from the
    tasks and counted (`drop_images`). Tasks loaded without `check_images` are not probed."""
    refs = [
        ref
        for task in tasks
        if task.settings.get("check_images", True)
        for ref in _images_to_encode(task, context)
    ]
    failures = find_undecodable(refs, context.workers, context.progress)
    context.undecodable_images = len(failures)
    if not failures:
        return list(tasks)
    if not all(task.settings.get("allow_missing") for task in tasks):
        raise ImageDecodeError(undecodable_report(failures, source))
    return [drop_images(task, failures) for task in tasks]


def _images_to_encode(task: EvalTask, context: _Context) -> list[ImageRef]:
    """The images of `task` that evaluating it decodes: its queries', and its gallery's or
    candidates' unless the cache holds their embeddings."""
    items = task.gallery or tuple(_distinct_candidates(task.queries)[0])
    name = task.name if task.gallery else f"{task.name}/candidates"
    images = [query.image for query in task.queries]
    if not context.has_cached(items, name, task):
        images += [item.image for item in items]
    return [image for image in images if image is not None]


def _run_task(task: EvalTask, depth: int, context: _Context) -> TaskOutput:
    """Rankings (gallery task) or candidate scores (candidate task) of one task."""
    if task.gallery:
        return _rank_gallery(task, depth, context)
    if all(query.candidates for query in task.queries):
        return _score_candidates(task, context)
    raise BenchmarkDataError(
        f"task {task.name!r}: no gallery, and not every query has its own candidates"
    )


def _rank_gallery(task: EvalTask, depth: int, context: _Context) -> TaskOutput:
    output = TaskOutput(task)
    clock = time.perf_counter()
    ids, gallery = _gallery_embeddings(task, context)
    output.seconds["gallery"] = time.perf_counter() - clock
    clock = time.perf_counter()
    queries = context.embed_queries(task.queries)
    output.seconds["queries"] = time.perf_counter() - clock
    clock = time.perf_counter()
    widest = max((len(query.exclude) for query in task.queries), default=0)
    _, positions = search(gallery, queries, depth + widest + SEARCH_MARGIN, context.gpu)
    output.seconds["search"] = time.perf_counter() - clock
    output.rankings = {
        query.id: _cut(row, ids, query.exclude, depth)
        for query, row in zip(task.queries, positions, strict=True)
    }
    if any(query.subset for query in task.queries):
        output.subset_rankings = _subset_rankings(task, ids, gallery, queries)
    return output


def _gallery_embeddings(task: EvalTask, context: _Context) -> tuple[list[str], np.ndarray]:
    ids = [item.id for item in task.gallery]
    if len(set(ids)) != len(ids):
        M.check_unique(ids, f"<{task.name} gallery>")
    return ids, context.embed_candidates(task.gallery, task.name, task)


def _cut(row: np.ndarray, ids: Sequence[str], exclude: Sequence[str], depth: int) -> list[str]:
    """The ids of FAISS positions `row` (padding -1 skipped) without `exclude`, first `depth`."""
    dropped = set(exclude)
    ranking = [ids[p] for p in row if p >= 0 and ids[p] not in dropped]
    return ranking[:depth]


def _subset_rankings(
    task: EvalTask, ids: Sequence[str], gallery: np.ndarray, queries: np.ndarray
) -> dict[str, list[str]]:
    """Per query, its subset members (exclusions removed) by descending score; equal
    scores keep subset order."""
    position = {item: number for number, item in enumerate(ids)}
    rankings = {}
    for query, vector in zip(task.queries, queries, strict=True):
        members = [m for m in dict.fromkeys(query.subset) if m not in set(query.exclude)]
        if unknown := [m for m in members if m not in position]:
            raise BenchmarkDataError(
                f"task {task.name!r} query {query.id!r}: subset members {unknown[:5]} "
                "are not in the gallery"
            )
        scores = gallery[[position[m] for m in members]] @ vector
        order = np.argsort(-scores, kind="stable")
        rankings[query.id] = [members[i] for i in order]
    return rankings


def _score_candidates(task: EvalTask, context: _Context) -> TaskOutput:
    output = TaskOutput(task)
    clock = time.perf_counter()
    distinct, slots = _distinct_candidates(task.queries)
    vectors = context.embed_candidates(distinct, f"{task.name}/candidates", task)
    output.seconds["candidates"] = time.perf_counter() - clock
    clock = time.perf_counter()
    queries = context.embed_queries(task.queries)
    output.seconds["queries"] = time.perf_counter() - clock
    output.scores = {
        query.id: (vectors[rows] @ vector).tolist()
        for query, rows, vector in zip(task.queries, slots, queries, strict=True)
    }
    return output


def _distinct_candidates(
    queries: Sequence[EvalQuery],
) -> tuple[list[Candidate], list[list[int]]]:
    """The distinct candidates (same image, box and text = same item) of all queries,
    and each query's candidates as rows of that list."""
    rows: dict[tuple[Any, ...], int] = {}
    distinct: list[Candidate] = []
    slots = []
    for query in queries:
        slot = []
        for candidate in query.candidates:
            image = candidate.image
            key = (
                None if image is None else (str(image.path), image.box),
                candidate.text,
            )
            if key not in rows:
                rows[key] = len(distinct)
                distinct.append(Candidate(str(len(distinct)), image, candidate.text))
            slot.append(rows[key])
        slots.append(slot)
    return distinct, slots


# search -----------------------------------------------------------------------


def use_gpu(gpu: GpuMode) -> bool:
    """Whether to search on GPUs: `None` means when FAISS sees one; True requires one."""
    gpus = faiss.get_num_gpus()
    if gpu is True and gpus == 0:
        raise RuntimeError("GPU search requested, but FAISS sees no GPU (install faiss-gpu)")
    return gpus > 0 if gpu is None else gpu


def search(
    gallery: np.ndarray, queries: np.ndarray, k: int, gpu: GpuMode = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (scores, gallery positions), k capped at the gallery."""
    index: Any = faiss.IndexFlatIP(gallery.shape[1])
    if use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    k = min(k, len(gallery))
    blocks = [
        index.search(np.ascontiguousarray(queries[start : start + SEARCH_BLOCK]), k)
        for start in range(0, len(queries), SEARCH_BLOCK)
    ]
    if not blocks:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


# the results record -----------------------------------------------------------


def _record(
    benchmark: str,
    split: str,
    outputs: Sequence[TaskOutput],
    metrics: Mapping[str, Any],
    submissions: Sequence[Path],
    context: _Context,
    settings: Mapping[str, Any],
    model: Mapping[str, Any] | None,
) -> dict[str, Any]:
    events = context.cache.events if context.cache is not None else []
    return {
        "format": RESULTS_FORMAT,
        "benchmark": benchmark,
        "split": split,
        "metrics": dict(metrics),
        "ground_truth": bool(metrics),
        "settings": dict(settings),
        "tasks": [_task_record(output) for output in outputs],
        "model": {**(model or {}), "key": context.model_key},
        "retriever": context.retriever.name,
        "counts": {
            "tasks": len(outputs),
            "queries": sum(len(o.task.queries) for o in outputs),
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
        "search": {
            "index": "IndexFlatIP",
            "gpu": use_gpu(context.gpu),
            "depth": ADAPTERS[benchmark].depth,
        },
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


# every benchmark ----------------------------------------------------------------


def benchmark_roots(data_root: Path) -> dict[str, Path]:
    """Each benchmark's data root under a common `data_root`: `<data_root>/<benchmark>`."""
    return {benchmark: Path(data_root) / benchmark for benchmark in BENCHMARKS}


def evaluate_all(
    retriever: Retriever,
    model_key: str,
    data_roots: Mapping[str, Path],
    splits: Mapping[str, str] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: Path | None = None,
    output: Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
    *,
    model: Mapping[str, Any] | None = None,
    gpu: GpuMode = None,
    log: Callable[[str], None] = print,
) -> dict[str, EvalResult]:
    """`evaluate` on every benchmark of `data_roots` (benchmark -> data root) whose root
    exists, each on `splits[benchmark]` (default `DEFAULT_SPLITS`) with
    `settings[benchmark]`. Benchmarks without a root, or without the split asked for, are
    skipped and `log` says so, all before the first evaluation starts."""
    plan = plan_benchmarks(data_roots, splits, log)
    return {
        benchmark: evaluate(
            benchmark,
            retriever,
            model_key,
            root,
            split,
            (settings or {}).get(benchmark, {}),
            cache_dir,
            output,
            batch_size,
            progress,
            model=model,
            gpu=gpu,
        )
        for benchmark, (root, split) in plan.items()
    }


def plan_benchmarks(
    data_roots: Mapping[str, Path],
    splits: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, tuple[Path, str]]:
    """Benchmark -> (data root, split) of the benchmarks `evaluate_all` runs; `log` says
    why each other one is skipped (no split of that name, no root given, or absent)."""
    plan = {}
    for benchmark in BENCHMARKS:
        split = (splits or {}).get(benchmark, DEFAULT_SPLITS[benchmark])
        root = data_roots.get(benchmark)
        if split not in SPLITS[benchmark]:
            known = ", ".join(SPLITS[benchmark])
            log(f"skipping {benchmark}: it has no split {split!r} (its splits: {known})")
        elif root is None or not Path(root).is_dir():
            where = "no data root given" if root is None else f"{root} does not exist"
            log(f"skipping {benchmark}: {where}")
        else:
            plan[benchmark] = (Path(root), split)
    return plan


# the command ------------------------------------------------------------------


def parse_settings(
    overrides: Sequence[str], benchmarks: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """`key=value` overrides -> benchmark -> settings. With one benchmark a key may be
    bare (`template=...`) or prefixed (`circo.template=...`); with several, the prefix is
    required. Values are JSON when they parse as JSON (`true`, `5`, `[...]`), else text."""
    settings: dict[str, dict[str, Any]] = {benchmark: {} for benchmark in benchmarks}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {override!r}: expected KEY=VALUE")
        prefix, dot, rest = key.strip().partition(".")
        if dot and prefix in settings:
            benchmark, name = prefix, rest
        elif len(benchmarks) == 1:
            benchmark, name = benchmarks[0], key.strip()
        else:
            raise ValueError(
                f"--set {override!r}: name the benchmark, e.g. {benchmarks[0]}.{key.strip()}=..."
            )
        settings[benchmark][name] = _setting_value(raw)
    return settings


def _setting_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def check_split_choice(benchmarks: Sequence[str], split: str | None) -> None:
    """Refuse, before any work, a `split` that none of `benchmarks` has (one benchmark:
    that it lacks); with several, the others are skipped later (`plan_benchmarks`)."""
    if split is None or any(split in SPLITS[name] for name in benchmarks):
        return
    known = "; ".join(f"{name}: {', '.join(SPLITS[name])}" for name in benchmarks)
    raise ValueError(f"no benchmark has split {split!r} (splits: {known})")


def retriever_placement(
    kind: str, device: str | None, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The retriever's loading `options` with the device and dtype resolved: `device`
    (or the options' own) defaults to `auto` (cuda when available); the dtype defaults to
    `auto` (float16 on cuda) for the MLLM and float32 for CLIP. Resolved names, not
    `auto`, go to the loader and the cache key, so a cache entry says what computed it."""
    from megapairs.models.common import resolve_placement

    given = dict(options or {})
    wanted_device = device or given.get("device") or "auto"
    default_dtype = "auto" if kind == "mmret-mllm" else "float32"
    torch_device, torch_dtype = resolve_placement(
        str(wanted_device), str(given.get("dtype") or default_dtype)
    )
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return {**given, "device": str(torch_device), "dtype": dtype_name}


def run_eval_command(
    benchmark: str,
    model: str,
    kind: str,
    data_root: Path,
    split: str | None = None,
    output: Path | None = None,
    cache_dir: Path | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    retriever_options: Mapping[str, Any] | None = None,
) -> int:
    """`megapairs eval`: build the `kind` retriever from `model` (with `device` and
    `retriever_options`; `auto` placement by default, see `retriever_placement`),
    evaluate it on `benchmark` read from `data_root`, or with `all` on every
    `<data_root>/<benchmark>` folder that exists (the others are skipped, and `echo`
    says so), each on `split` or its default split. With `all`, benchmarks without
    `split` are skipped and said so; a split that none has is refused before any work.
    Writes results JSON, submissions and `table.md` into `output`; prints (`echo`) the
    paper's Table 1 layout with our row, then every metric. `overrides` are `--set
    key=value` loader settings (`parse_settings`). Returns the exit code, 0; errors
    raise (BenchmarkDataError, ValueError, OSError) with messages meant for the user."""
    from megapairs.evaluation.tables import details_markdown, table1_markdown
    from megapairs.models.base import build_retriever

    benchmarks = list(BENCHMARKS) if benchmark == "all" else [benchmark]
    for name in benchmarks:
        _adapter(name)
    check_split_choice(benchmarks, split)
    settings = parse_settings(overrides, benchmarks)
    options = retriever_placement(kind, device, retriever_options)
    retriever = build_retriever(kind, model, **options)
    key = checkpoint_key(model) + f"?{json.dumps(options, sort_keys=True)}"
    common: dict[str, Any] = {"model": {"kind": kind, "path": model, "options": options}}
    if benchmark == "all":
        splits = dict.fromkeys(benchmarks, split) if split else None
        results = evaluate_all(
            retriever,
            key,
            benchmark_roots(data_root),
            splits,
            settings,
            cache_dir,
            output,
            batch_size,
            progress,
            log=echo,
            **common,
        )
    else:
        results = {
            benchmark: evaluate(
                benchmark,
                retriever,
                key,
                data_root,
                split or DEFAULT_SPLITS[benchmark],
                settings[benchmark],
                cache_dir,
                output,
                batch_size,
                progress,
                **common,
            )
        }
    records = {name: result.record for name, result in results.items()}
    text = table1_markdown({Path(model).name or model: records}) + "\n" + details_markdown(records)
    for result in results.values():
        for path in [result.results_path, *result.submission_paths]:
            if path is not None:
                text += f"\nwrote {path}"
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "table.md").write_text(text + "\n")
    echo(text)
    return 0
