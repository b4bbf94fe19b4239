"""Benchmark loaders: each benchmark's released layout -> `EvalTask`s.

`load_benchmark("circo", data_root, "val", settings)` reads one benchmark's data
root; `settings` overrides the loader's defaults (file names, image folders,
query-text templates) and is recorded, resolved, in every task's `settings`.
Settings every loader takes:

- `check_images` (True): check that every referenced image file exists, with one
  directory listing per folder. False reads the annotation files only.
- `allow_missing` (False): a missing image is an error naming the file, the count
  and examples; True evaluates without them instead (dropped, and the counts
  `missing_images`, `dropped_queries`, `dropped_gallery`, `dropped_candidates`
  recorded in the task's settings).
- `instruction` (None): the task instruction every query carries
  (`EvalQuery.instruction`), recorded in the results. None gives none, so the
  retriever's own default applies (MMRet models use the one they were trained with).

The benchmarks' layouts and settings are described in their modules: `circo`,
`cirr`, `fashioniq`, `genecis`, `mmeb`. Their splits, default splits, metrics and
submissions are in the benchmark plug-ins (`megapairs.evaluation.benchmarks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megapairs.evaluation.loaders import circo, cirr, fashioniq, genecis, mmeb  # noqa: F401
from megapairs.evaluation.loaders.base import LOADERS, Loader
from megapairs.evaluation.types import BenchmarkDataError, EvalTask


def load_benchmark(
    name: str, data_root: Path, split: str, settings: Mapping[str, Any] | None = None
) -> list[EvalTask]:
    """The tasks of benchmark `name` read from `data_root` (see the module docstring)."""
    loader = LOADERS.get(name)
    root = Path(data_root)
    if not root.is_dir():
        raise BenchmarkDataError(f"{name} data root {root} is not a folder")
    return loader(root, split, dict(settings or {}))


__all__ = ["DEFAULT_SPLITS", "LOADERS", "SPLITS", "Loader", "load_benchmark"]
