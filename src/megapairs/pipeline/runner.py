"""Runners: `BaseRunner` owns which parts are pending, reopened or done; a runner
only decides where `run_part` runs (`LocalRunner`: here, in order; `RayRunner` in
`megapairs.pipeline.ray_runner`: on a Ray cluster)."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from megapairs.config import PipelineConfig
from megapairs.pipeline import RUNNERS
from megapairs.pipeline.stage import (
    PartProgress,
    ReopensParts,
    Stage,
    execute_part,
    no_progress,
    release_worker_state,
)
from megapairs.runs import RunDir, environment_versions, now_iso

# Called on the driver each time a part is committed: (part, its counts).
PartDone = Callable[[str, dict[str, Any]], None]
# Reorders the pending parts before they are handed to `execute` (tests: reverse, shuffle).
PartOrder = Callable[[list[str]], list[str]]


class StageConfigChanged(RuntimeError):
    """A run directory holds parts made with a different config for this stage."""


@dataclass
class StageResult:
    """What one stage did: its summed counts and how many parts were (re)computed."""

    name: str
    counts: dict[str, int]
    parts: int
    computed: int


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


def check_config(run: RunDir, stage: Stage, config: PipelineConfig) -> str:
    """Refuse to mix parts made under a different config; return this config's hash."""
    digest = config.section_hash(*stage.config_sections)
    recorded = run.read_manifest().get("stages", {}).get(stage.name, {}).get("config_hash")
    if recorded and recorded != digest and run.done_parts(stage.name):
        raise StageConfigChanged(
            f"stage {stage.name!r} in {run.root} was run with another config "
            f"(sections {', '.join(stage.config_sections)} changed); "
            "use a new run directory or delete the stage's output"
        )
    return digest


def record_stage(run: RunDir, stage: Stage, digest: str, result: StageResult) -> None:
    manifest = run.read_manifest()
    stages = manifest.get("stages", {})
    stages[stage.name] = {
        "config_hash": digest,
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

    @abstractmethod
    def execute(self, stage: Stage, parts: list[str], done: PartDone) -> None:
        """Run and commit (`execute_part`) every part of `parts`, calling `done` on the
        driver as each is committed; raise if a part cannot be completed."""

    def start(self) -> None:
        """Create the run directory (clearing temp files of a killed earlier run) and record
        config and versions in its manifest."""
        if self.run.is_local:  # (on object storage, mkdir would create a missing bucket)
            self.run.root.mkdir(parents=True, exist_ok=True)
        self.run.remove_temp_files()
        manifest = self.run.read_manifest()
        self.run.update_manifest(
            config=self.config.model_dump(mode="json"),
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
        result = StageResult(stage.name, sum_counts(per_part), len(parts), len(todo))
        record_stage(self.run, stage, digest, result)
        return result

    def _record_hash(self, stage: Stage, digest: str) -> None:
        """Record the config hash before any part is written, so a crash keeps it."""
        manifest = self.run.read_manifest()
        stages = manifest.get("stages", {})
        entry = stages.setdefault(stage.name, {})
        if entry.get("config_hash") != digest:
            entry["config_hash"] = digest
            self.run.update_manifest(stages=stages)

    def run_all(self, stages: list[Stage]) -> list[StageResult]:
        self.start()
        try:
            return [self.run_stage(stage) for stage in stages]
        finally:
            self.close()

    def close(self) -> None:
        """Release what the runner holds (workers, cached state)."""
        release_worker_state()


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
