"""The in-process runner: runs stages part by part, skipping finished parts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from megapairs.config import PipelineConfig
from megapairs.pipeline.stage import ReopensParts, Stage
from megapairs.runs import RunDir, environment_versions, now_iso


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


class LocalRunner:
    """Runs stages in this process, in order, with progress bars."""

    def __init__(self, run: RunDir, config: PipelineConfig, progress: bool = True) -> None:
        self.run = run
        self.config = config
        self.progress = progress

    def start(self) -> None:
        """Create the run directory (clearing temp files of a killed earlier run) and record
        config and versions in its manifest."""
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

    def run_stage(self, stage: Stage) -> StageResult:
        """Run every unfinished part of `stage`; return the stage's total counts."""
        digest = check_config(self.run, stage, self.config)
        self._record_hash(stage, digest)
        parts = stage.plan(self.run)
        stale = set(stage.stale_parts(self.run)) if isinstance(stage, ReopensParts) else set()
        todo = [p for p in parts if p in stale or not self.run.is_done(stage.name, p)]
        if todo:
            stage.prepare(self.run)
        bar = tqdm(todo, desc=stage.name, unit="part", disable=not self.progress or not todo)
        for part in bar:
            if part in stale:
                self.run.reopen(stage.name, part)
            counts = stage.run_part(self.run, part)
            self.run.mark_done(stage.name, part, counts)
        per_part = {k: v for k, v in self.run.part_counts(stage.name).items() if k in set(parts)}
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
        return [self.run_stage(stage) for stage in stages]
