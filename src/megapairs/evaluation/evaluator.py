"""Evaluate a retriever on a benchmark split read from disk: the benchmark's plug-in
loads the tasks (`benchmarks.py`), the engine evaluates them (`engine.py`), and the
record goes to the results JSON (`results.py`); `command.py` is `megapairs eval`.

    evaluate("circo", retriever, model_key, data_root, "val", settings, cache_dir, output)

Names used elsewhere are re-exported here (`EvalResult`, `TaskOutput`, `search`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megapairs.evaluation.benchmarks import BENCHMARKS, Benchmark, benchmark
from megapairs.evaluation.cache import DECODE_WORKERS
from megapairs.evaluation.engine import SEARCH_MARGIN, GpuMode, evaluate_tasks, search
from megapairs.evaluation.results import EvalResult, IncompleteSplit, results_path
from megapairs.evaluation.types import TaskOutput
from megapairs.models.base import Retriever

__all__ = [
    "BENCHMARKS",
    "SEARCH_MARGIN",
    "Benchmark",
    "EvalResult",
    "IncompleteSplit",
    "TaskOutput",
    "evaluate",
    "evaluate_tasks",
    "results_path",
    "search",
]


def evaluate(
    benchmark_name: str,
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
    """Evaluate `retriever` on `benchmark_name`'s `split` read from `data_root`.

    `settings` go to the benchmark's loader (templates, folders); `model_key`
    identifies the checkpoint for the cache (`cache.checkpoint_key`); `model` (e.g.
    kind and path) is recorded as given. Without `cache_dir` galleries are encoded
    but not stored. With `output` (a folder) the results JSON
    (`<benchmark>-<split>.json`) and, for a split without ground truth, the server
    submission files are written there; a hidden split without `output` is an error,
    since it has nothing else to give. `gpu`: search on FAISS GPUs (None: when FAISS
    sees one); `workers`: image-decoding threads."""
    plugin = benchmark(benchmark_name)
    tasks = plugin.load(Path(data_root), split, settings)
    return evaluate_tasks(
        plugin.name,
        tasks,
        retriever,
        model_key,
        cache_dir,
        output,
        batch_size,
        progress,
        settings=settings,
        model=model,
        gpu=gpu,
        workers=workers,
        source=f"{split} under {data_root}",
    )
