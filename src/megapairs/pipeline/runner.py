"""Runners: `BaseRunner` owns which parts are pending, reopened or done; a runner
only decides where `run_part` runs (`LocalRunner`: here, in order; `RayRunner` in
`megapairs.pipeline.ray_runner`: on a Ray cluster). The driver holds the run's lock
from `start` to `close`; finished parts whose Parquet files do not open are quarantined
and computed again."""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from megapairs.config import PipelineConfig
from megapairs.pipeline import RUNNERS
from megapairs.pipeline.lock import acquire_run_lock, release_run_lock
from megapairs.pipeline.reset import output_dirs
from megapairs.pipeline.stage import (
    PartProgress,
    ReopensParts,
    ReportsProblems,
    Stage,
    execute_part,
    no_progress,
    release_worker_state,
)
from megapairs.runs import (
    AnyPath,
    RunDir,
    environment_versions,
    list_files,
    now_iso,
    parquet_metadata,
)

log = logging.getLogger(__name__)
# footers read at once when checking a remote run's finished parts
FOOTER_READERS = 16

# Called on the driver each time a part is committed: (part, its counts).
PartDone = Callable[[str, dict[str, Any]], None]
# Reorders the pending parts before they are handed to `execute` (tests: reverse, shuffle).
PartOrder = Callable[[list[str]], list[str]]


class StageConfigChanged(RuntimeError):
    """A run directory holds parts made with a different config for this stage."""


@dataclass
class StageResult:
    """What one stage did: its summed counts, how many parts were (re)computed, how many
    unreadable files were quarantined, and the errors the stage reported."""

    name: str
    counts: dict[str, int]
    parts: int
    computed: int
    quarantined: int = 0  # unreadable output files moved to <run>/quarantine (parts redone)
    problems: list[str] = field(default_factory=list)  # errors the command reports


def sum_counts(per_part: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Add up the integer counts recorded by each part."""
    total: Counter[str] = Counter()
    for counts in per_part.values():
        total.update({k: v for k, v in counts.items() if isinstance(v, int)})
    return dict(total)


def config_key(config: PipelineConfig) -> str:
    """A digest of the whole config: identifies cached worker state."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def section_digests(config: PipelineConfig, stage: Stage) -> dict[str, str]:
    """A digest of each config section of `stage`, to name the ones that changed."""
    return {section: config.section_hash(section) for section in stage.config_sections}


def check_config(run: RunDir, stage: Stage, config: PipelineConfig) -> str:
    """Refuse to mix parts made under a different config; return this config's hash."""
    digest = config.section_hash(*stage.config_sections)
    entry = run.read_manifest().get("stages", {}).get(stage.name, {})
    recorded = entry.get("config_hash")
    if recorded and recorded != digest and run.done_parts(stage.name):
        changed = changed_sections(entry.get("settings"), section_digests(config, stage))
        raise StageConfigChanged(config_changed_message(run, stage.name, changed))
    return digest


def changed_sections(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The sections whose digest differs from the recorded one (none known: [])."""
    if not recorded:
        return []
    return [section for section, digest in current.items() if recorded.get(section) != digest]


def config_changed_message(run: RunDir, stage: str, changed: list[str]) -> str:
    what = f"{', '.join(changed)} changed" if changed else "its settings changed"
    return (
        f"stage {stage!r} in {run.uri} was run with another config ({what}); to run it "
        f"again with this config, clear it and the stages after it: megapairs reset "
        f"--run {run.uri} --stage {stage}; or use a new run directory"
    )


def record_stage(
    run: RunDir, stage: Stage, config: PipelineConfig, digest: str, result: StageResult
) -> None:
    manifest = run.read_manifest()
    stages = manifest.get("stages", {})
    stages[stage.name] = {
        "config_hash": digest,
        "settings": section_digests(config, stage),
        "parts": result.parts,
        "counts": result.counts,
        "complete": result.parts == len(run.done_parts(stage.name)),
        "finished_at": now_iso(),
    }
    run.update_manifest(stages=stages)


class BaseRunner(ABC):
    """Runs stages part by part: skips finished parts, reopens stale ones, refuses a
    changed config, prepares and finalizes on the driver; `execute` places the parts."""

    name = "base"

    def __init__(
        self,
        run: RunDir,
        config: PipelineConfig,
        progress: bool = True,
        order: PartOrder | None = None,
    ) -> None:
        self.run = run
        self.config = config
        self.progress = progress
        self.config_key = config_key(config)
        self.order = order
        self.locked = False  # whether this runner holds the run's lock

    @abstractmethod
    def execute(self, stage: Stage, parts: list[str], done: PartDone) -> None:
        """Run and commit (`execute_part`) every part of `parts`, calling `done` on the
        driver as each is committed; raise if a part cannot be completed."""

    def start(self) -> None:
        """Create the run directory, take its lock (RunLocked if another process writes
        it), clear temp files of a killed earlier run and record config and versions in its
        manifest."""
        if self.run.is_local:  # (on object storage, mkdir would create a missing bucket)
            self.run.root.mkdir(parents=True, exist_ok=True)
        if not self.locked:
            acquire_run_lock(self.run)
            self.locked = True
        self.run.remove_temp_files()
        manifest = self.run.read_manifest()
        self.run.update_manifest(
            config=self.config.public_dump(),  # (no credentials from server URLs)
            versions=environment_versions(),
            seed=self.config.seed,
            created_at=manifest.get("created_at", now_iso()),
            updated_at=now_iso(),
        )

    def pending_parts(self, stage: Stage, parts: list[str]) -> tuple[list[str], set[str]]:
        """The parts to compute (unfinished or stale, in plan order) and the stale ones."""
        stale = set(stage.stale_parts(self.run)) if isinstance(stage, ReopensParts) else set()
        todo = [p for p in parts if p in stale or not self.run.is_done(stage.name, p)]
        return todo, stale & set(todo)

    def run_stage(self, stage: Stage) -> StageResult:
        """Run every unfinished part of `stage`; return the stage's total counts."""
        digest = check_config(self.run, stage, self.config)
        self._record_hash(stage, digest)
        parts = stage.plan(self.run)
        quarantined = self.quarantine_unreadable(stage, parts)
        todo, stale = self.pending_parts(stage, parts)
        if todo:
            stage.prepare(self.run)
            for part in sorted(stale):  # forget the marker before its files are rewritten
                self.run.reopen(stage.name, part)
            bar = tqdm(total=len(todo), desc=stage.name, unit="part", disable=not self.progress)
            with bar:
                ordered = self.order(todo) if self.order else todo
                self.execute(stage, ordered, lambda part, counts: bar.update(1))
        wanted = set(parts)
        per_part = {k: v for k, v in self.run.part_counts(stage.name).items() if k in wanted}
        stage.finalize(self.run, per_part)
        problems = stage.problems(per_part) if isinstance(stage, ReportsProblems) else []
        counts = sum_counts(per_part)
        result = StageResult(stage.name, counts, len(parts), len(todo), quarantined, problems)
        record_stage(self.run, stage, self.config, digest, result)
        return result

    def quarantine_unreadable(self, stage: Stage, parts: list[str]) -> int:
        """Move each finished part's Parquet output that does not open (a truncated file)
        to the run's quarantine folder and reopen its part; how many files went."""
        done = set(self.run.done_parts(stage.name)) & set(parts)
        if not done:
            return 0
        files = [
            path
            for folder in output_dirs(stage)
            for path in list_files(self.run.folder(folder), "part-*.parquet")
            if path.name.removesuffix(".parquet") in done
        ]
        opens = self._footers_open(files)
        unreadable = [path for path, ok in zip(files, opens, strict=True) if not ok]
        for path in unreadable:
            part = path.name.removesuffix(".parquet")
            self.run.reopen(stage.name, part)  # first: a crash now still redoes the part
            moved = self.run.quarantine(path)
            log.warning(
                "%s %s: %s does not open as Parquet; moved to %s, the part is computed again",
                stage.name,
                part,
                path,
                moved,
            )
        return len(unreadable)

    def _footers_open(self, files: list[AnyPath]) -> list[bool]:
        """Whether each file's Parquet footer reads (remote runs: several at once)."""
        if self.run.is_local or len(files) < 2:
            return [footer_opens(path) for path in files]
        with ThreadPoolExecutor(FOOTER_READERS) as pool:
            return list(pool.map(footer_opens, files))

    def _record_hash(self, stage: Stage, digest: str) -> None:
        """Record the config hash (and each section's) before any part is written, so a
        crash keeps them."""
        manifest = self.run.read_manifest()
        stages = manifest.get("stages", {})
        entry = stages.setdefault(stage.name, {})
        settings = section_digests(self.config, stage)
        if entry.get("config_hash") != digest or entry.get("settings") != settings:
            entry["config_hash"] = digest
            entry["settings"] = settings
            self.run.update_manifest(stages=stages)

    def run_all(self, stages: list[Stage]) -> list[StageResult]:
        try:
            self.start()
            return [self.run_stage(stage) for stage in stages]
        finally:
            self.close()

    def close(self) -> None:
        """Release what the runner holds (cached state, the run's lock)."""
        release_worker_state()
        if self.locked:
            self.locked = False
            release_run_lock(self.run)


class LocalRunner(BaseRunner):
    """Runs the parts in this process, in plan order, with a bar inside each part."""

    name = "local"

    def execute(self, stage: Stage, parts: list[str], done: PartDone) -> None:
        try:
            for part in parts:
                counts = execute_part(
                    stage, self.run, part, self.config_key, self._part_progress(stage, part)
                )
                done(part, counts)
        finally:
            release_worker_state(stage)  # free the stage's model or index before the next

    def _part_progress(self, stage: Stage, part: str) -> PartProgress:
        """A bar over one part's units of work (batches, pairs), shown while it runs."""
        if not self.progress:
            return no_progress
        bars: list[tqdm] = []  # made on the first report, so silent stages show none

        def advance(finished: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, desc=f"{stage.name} {part}", leave=False))
            bar = bars[0]
            bar.total = total
            bar.n = finished
            bar.refresh()
            if finished >= total:
                bar.close()

        return advance


def footer_opens(path: AnyPath) -> bool:
    """Whether `path`'s Parquet footer reads (False for a truncated or garbage file)."""
    try:
        parquet_metadata(path)
    except pa.ArrowInvalid:
        return False
    return True


def build_runner(
    kind: str,
    run: RunDir,
    config: PipelineConfig,
    progress: bool = True,
    address: str | None = None,
) -> BaseRunner:
    """The runner named `kind` (`local` or `ray`; `address`: the Ray cluster to join)."""
    if kind == "local":
        return LocalRunner(run, config, progress)
    if kind == "ray":
        from megapairs.pipeline.ray_runner import RayRunner

        return RayRunner(run, config, progress, address=address)
    raise ValueError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")
