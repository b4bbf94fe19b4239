"""The evaluation engine: evaluation tasks in memory -> rankings or scores -> an `EvalResult`.

`evaluate_tasks` takes a benchmark plug-in's tasks (loaded from disk by
`evaluator.evaluate`, or built in memory, as `demo --learn` does), checks before any
encoding that every image it will decode can be decoded (`cache.find_undecodable`: one
error listing them, or with `allow_missing` they are dropped and counted), refuses a
hidden test split that lost any query (the evaluation server needs every one), and, per
task:

- gallery tasks (CIRCO, CIRR, FashionIQ): the gallery is embedded once per checkpoint and
  gallery content (`GalleryCache`), the queries are embedded (image + text, image or text,
  with the task instruction as the loader set it: None leaves the retriever's own
  default), and FAISS inner-product search (`IndexFlatIP`, on the GPUs when FAISS sees
  one) returns each query's top `depth + len(exclude) + margin` ids; excluded ids are
  dropped and the ranking cut to the benchmark's `depth`. Queries with a `subset` (CIRR)
  also get the subset ranked exactly by score.
- candidate tasks (GeneCIS, MMEB): each query's candidates are scored by dot product
  (candidate 0 is the correct one); the distinct candidates of a task are embedded
  through the same cache.

The plug-in (`benchmarks.BENCHMARKS`) turns those into metrics and, for splits without
ground truth, into server submission files; `results.py` builds the results record.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from megapairs.evaluation import metrics as M
from megapairs.evaluation.benchmarks import benchmark as find_benchmark
from megapairs.evaluation.cache import (
    DECODE_WORKERS,
    GalleryCache,
    ImageDecodeError,
    encode_items,
    find_undecodable,
    gallery_key,
    undecodable_report,
)
from megapairs.evaluation.loaders.base import drop_images
from megapairs.evaluation.results import (
    EvalResult,
    build_record,
    check_complete,
    has_ground_truth,
    results_path,
)
from megapairs.evaluation.types import (
    BenchmarkDataError,
    Candidate,
    EvalQuery,
    EvalTask,
    ImageRef,
    TaskOutput,
)
from megapairs.models.base import Retriever
from megapairs.runs import now_iso, write_json

SEARCH_MARGIN = 8  # extra hits fetched beyond depth + exclusions (slack for ties/padding)
SEARCH_BLOCK = 16_384  # queries per FAISS search call
GpuMode = bool | None  # None: use the GPUs when FAISS sees one


def evaluate_tasks(
    benchmark: str,
    tasks: Sequence[EvalTask],
    retriever: Retriever,
    model_key: str,
    cache_dir: Path | None = None,
    output: Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
    *,
    settings: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    gpu: GpuMode = None,
    workers: int = DECODE_WORKERS,
    source: str = "",
) -> EvalResult:
    """Evaluate `retriever` on `tasks` of `benchmark` (all of one split); see the module
    docstring. `model_key` identifies the checkpoint for the cache; `settings` and `model`
    are recorded as given; with `output` the results JSON and, for a split without ground
    truth, the submission files are written there (a hidden split needs it)."""
    plugin = find_benchmark(benchmark)
    if not tasks:
        raise BenchmarkDataError(f"{benchmark} {source}: no tasks loaded")
    split = tasks[0].split
    started, clock = now_iso(), time.perf_counter()
    hidden = not has_ground_truth(tasks)
    if hidden and output is None:
        raise ValueError(f"{benchmark} {split} has no ground truth: give an output folder")
    cache = GalleryCache(cache_dir, workers=workers) if cache_dir is not None else None
    context = EvalContext(retriever, model_key, cache, batch_size, progress, gpu, workers)
    tasks = decodable_tasks(tasks, context, source or f"{benchmark} {split}")
    if hidden:
        check_complete(benchmark, split, tasks)
    outputs = [run_task(task, plugin.depth, context) for task in tasks]
    metrics = {} if hidden else plugin.score(outputs)
    submissions = []
    if hidden and plugin.submit is not None and output is not None:
        submissions = plugin.submit(outputs, Path(output))
    events = context.cache.events if context.cache is not None else []
    record = build_record(
        plugin, split, outputs, metrics, submissions, context, events, settings or {}, model
    )
    record["search"]["gpu"] = use_gpu(context.gpu)
    record.update(started=started, finished=now_iso())
    record["seconds"] = round(time.perf_counter() - clock, 3)
    path = None
    if output is not None:
        path = results_path(Path(output), benchmark, split)
        write_json(path, record)
    return EvalResult(benchmark, split, metrics, record, path, submissions)


@dataclass
class EvalContext:
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

    def has_cached(self, items: Sequence[Candidate]) -> bool:
        """Whether the cache holds the embeddings of `items` (keyed by their content, not by
        the task that asks)."""
        if self.cache is None:
            return False
        key = gallery_key(items, self.retriever, self.model_key)
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


def decodable_tasks(tasks: Sequence[EvalTask], context: EvalContext, source: str) -> list[EvalTask]:
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


def _images_to_encode(task: EvalTask, context: EvalContext) -> list[ImageRef]:
    """The images of `task` that evaluating it decodes: its queries', and its gallery's or
    candidates' unless the cache holds their embeddings."""
    items = task.gallery or tuple(_distinct_candidates(task.queries)[0])
    images = [query.image for query in task.queries]
    if not context.has_cached(items):
        images += [item.image for item in items]
    return [image for image in images if image is not None]


def run_task(task: EvalTask, depth: int, context: EvalContext) -> TaskOutput:
    """Rankings (gallery task) or candidate scores (candidate task) of one task."""
    if task.gallery:
        return _rank_gallery(task, depth, context)
    if all(query.candidates for query in task.queries):
        return _score_candidates(task, context)
    raise BenchmarkDataError(
        f"task {task.name!r}: no gallery, and not every query has its own candidates"
    )


def _rank_gallery(task: EvalTask, depth: int, context: EvalContext) -> TaskOutput:
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


def _gallery_embeddings(task: EvalTask, context: EvalContext) -> tuple[list[str], np.ndarray]:
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


def _score_candidates(task: EvalTask, context: EvalContext) -> TaskOutput:
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
