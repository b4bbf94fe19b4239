"""`megapairs eval`: benchmarks and splits from the registry, settings from `--set`, a
retriever from a checkpoint, results, submissions and Table 1 into the output folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from megapairs.evaluation.benchmarks import BENCHMARKS
from megapairs.evaluation.benchmarks import benchmark as find_benchmark
from megapairs.evaluation.cache import checkpoint_key
from megapairs.evaluation.engine import GpuMode
from megapairs.evaluation.evaluator import evaluate
from megapairs.evaluation.results import EvalResult
from megapairs.models.base import Retriever


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
    exists, each on `splits[benchmark]` (default: each benchmark's default split) with
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
        split = (splits or {}).get(benchmark, BENCHMARKS[benchmark].default_split)
        root = data_roots.get(benchmark)
        if split not in BENCHMARKS[benchmark].splits:
            known = ", ".join(BENCHMARKS[benchmark].splits)
            log(f"skipping {benchmark}: it has no split {split!r} (its splits: {known})")
        elif root is None or not Path(root).is_dir():
            where = "no data root given" if root is None else f"{root} does not exist"
            log(f"skipping {benchmark}: {where}")
        else:
            plan[benchmark] = (Path(root), split)
    return plan


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


PAPER_SPLIT = "paper"  # --split paper: each benchmark on the split the paper reports


def chosen_splits(benchmarks: Sequence[str], split: str | None) -> dict[str, str]:
    """Benchmark -> split: `split` for each, each one's default when None, and the split
    the paper's Table 1 reports for each with `paper`."""
    if split == PAPER_SPLIT:
        return {name: BENCHMARKS[name].reported_split for name in benchmarks}
    return {name: split or BENCHMARKS[name].default_split for name in benchmarks}


def check_split_choice(benchmarks: Sequence[str], split: str | None) -> None:
    """Refuse, before any work, a `split` that none of `benchmarks` has (one benchmark:
    that it lacks); with several, the others are skipped later (`plan_benchmarks`)."""
    if split in (None, PAPER_SPLIT) or any(split in BENCHMARKS[n].splits for n in benchmarks):
        return
    known = "; ".join(f"{name}: {', '.join(BENCHMARKS[name].splits)}" for name in benchmarks)
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
        find_benchmark(name)
    check_split_choice(benchmarks, split)
    settings = parse_settings(overrides, benchmarks)
    options = retriever_placement(kind, device, retriever_options)
    retriever = build_retriever(kind, model, **options)
    key = checkpoint_key(model) + f"?{json.dumps(options, sort_keys=True)}"
    common: dict[str, Any] = {"model": {"kind": kind, "path": model, "options": options}}
    splits = chosen_splits(benchmarks, split)
    if benchmark == "all":
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
                splits[benchmark],
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
