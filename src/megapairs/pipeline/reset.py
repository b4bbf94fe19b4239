"""What each stage writes, and `megapairs reset`: clear a stage and every stage after it.

Resetting a stage deletes its output files, its part markers (`_progress/<stage>/`) and
its manifest entry, and those of every later stage that depends on it, in pipeline
order: ingest.decode, ingest, embed.<channel>, neighbours.<channel>, mine, annotate,
export. A name also selects the stages named under it (`ingest`: ingest.decode too;
`embed`: every embed.<channel>); `embed.caption` resets neighbours.caption, mine,
annotate and export, but not the other channels. Works on local and object-store runs,
under the run's lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megapairs.pipeline.lock import run_lock
from megapairs.pipeline.stage import Stage
from megapairs.runs import RunDir, filesystem
from megapairs.schemas import (
    ANNOTATION_CACHE_DIR,
    ANNOTATION_FAILURES_DIR,
    ANNOTATIONS_DIR,
    CORPUS_DIR,
    DATASET_DIR,
    DECODED_DIR,
    EMBEDDINGS_DIR,
    IMAGES_DIR,
    JUDGE_CACHE_DIR,
    NEIGHBOURS_DIR,
    PAIRS_DIR,
    REJECTS_DIR,
    SCORE_FAILURES_DIR,
    SCORES_DIR,
)

PROGRESS_DIR = "_progress"
PLAN_FILE = "_plan.json"  # corpus.ingest.PLAN_FILE, written by ingest.decode's plan


@dataclass(frozen=True)
class StageOutputs:
    """Where a stage writes, relative to the run (`{channel}`: the stage's channel)."""

    folders: tuple[str, ...]  # folders of this stage (and of none after it)
    shared: tuple[str, ...] = ()  # globs of its files in folders other stages write to


# What each kind of stage writes, in pipeline order (`embed`: every `embed.<channel>`).
# This table must follow the stages (corpus/ingest.py, encoders/stage.py,
# neighbours/stage.py, mining/stage.py, annotation/stage.py, dataset/export.py): when a
# stage writes a new folder or file, list it here, or reset leaves it behind.
STAGE_OUTPUTS: dict[str, StageOutputs] = {
    "ingest.decode": StageOutputs((DECODED_DIR, IMAGES_DIR), (f"{CORPUS_DIR}/{PLAN_FILE}",)),
    "ingest": StageOutputs((CORPUS_DIR,), (f"{REJECTS_DIR}/part-*.parquet",)),
    "embed": StageOutputs(
        (f"{EMBEDDINGS_DIR}/{{channel}}",), (f"{REJECTS_DIR}/embed.{{channel}}-part-*.parquet",)
    ),
    "neighbours": StageOutputs((f"{NEIGHBOURS_DIR}/{{channel}}",)),
    "mine": StageOutputs((PAIRS_DIR,), (f"{REJECTS_DIR}/mine-part-*.parquet",)),
    "annotate": StageOutputs((ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR, ANNOTATION_CACHE_DIR)),
    "score": StageOutputs((SCORES_DIR, SCORE_FAILURES_DIR, JUDGE_CACHE_DIR)),
    "export": StageOutputs((DATASET_DIR,), (f"{REJECTS_DIR}/export-part-*.parquet",)),
}
KINDS = tuple(STAGE_OUTPUTS)
CHANNEL_KINDS = ("embed", "neighbours")  # stages named <kind>.<channel>, one per channel


def stage_kind(name: str) -> tuple[str, str | None]:
    """(kind, channel) of a stage name: (`embed`, `caption`) for `embed.caption`."""
    if name in STAGE_OUTPUTS:
        return name, None
    kind, _, channel = name.partition(".")
    if kind in CHANNEL_KINDS and channel:
        return kind, channel
    known = ", ".join(f"{k}[.CHANNEL]" if k in CHANNEL_KINDS else k for k in KINDS)
    raise ValueError(f"unknown stage {name!r}; stages: {known}")


def stage_folders(name: str) -> tuple[str, ...]:
    """The output folders of the stage `name` (none for a stage not in the table)."""
    try:
        kind, channel = stage_kind(name)
    except ValueError:
        return ()
    return tuple(folder.format(channel=channel) for folder in STAGE_OUTPUTS[kind].folders)


def output_dirs(stage: Stage) -> tuple[str, ...]:
    """The folders `stage` writes: its own `output_dirs`, else those of the table."""
    declared: tuple[str, ...] = tuple(getattr(stage, "output_dirs", ()))
    return declared or stage_folders(stage.name)


# reset ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageReset:
    """What resetting one stage deleted."""

    stage: str
    files: int  # output files
    markers: int  # part markers
    recorded: bool  # whether the manifest had an entry for it

    @property
    def deleted_anything(self) -> bool:
        return bool(self.files or self.markers or self.recorded)


def known_stages(run: RunDir) -> list[str]:
    """The stages a run has: its manifest entries, progress folders and channel folders,
    and every stage kind without a channel; in pipeline order."""
    names = set(run.read_manifest().get("stages", {}))
    names |= set(_subfolders(run, PROGRESS_DIR))
    for kind, folder in (("embed", EMBEDDINGS_DIR), ("neighbours", NEIGHBOURS_DIR)):
        names |= {f"{kind}.{channel}" for channel in _subfolders(run, folder)}
    names |= {kind for kind in KINDS if kind not in CHANNEL_KINDS}
    return sorted((n for n in names if _is_pipeline_stage(n)), key=_order)


def stages_to_reset(run: RunDir, name: str) -> list[str]:
    """`name` (and the stages named under it) and every later stage that depends on it."""
    kind, channel = stage_kind(name)
    first = min(KINDS.index(k) for k in KINDS if k == kind or k.startswith(f"{kind}."))
    candidates = set(known_stages(run)) | ({name} if channel else set())
    chosen = []
    for stage in sorted(candidates, key=_order):
        other_kind, other_channel = stage_kind(stage)
        other_branch = channel is not None and other_channel not in (None, channel)
        if KINDS.index(other_kind) >= first and not other_branch:
            chosen.append(stage)
    return chosen


def reset_stage(run: RunDir, name: str) -> list[StageReset]:
    """Delete the outputs, markers and manifest entries of `name` and every stage after it
    that depends on it (under the run's lock); what went, per stage."""
    with run_lock(run):
        stages = stages_to_reset(run, name)
        recorded = run.read_manifest().get("stages", {})
        done = [_reset_one(run, stage, stage in recorded) for stage in stages]
        if any(stage in recorded for stage in stages):
            kept = {k: v for k, v in recorded.items() if k not in stages}
            run.update_manifest(stages=kept)
    return done


def format_reset(run: RunDir, name: str, done: list[StageReset]) -> str:
    """A line per stage that had anything to delete."""
    lines = [f"reset {name} in {run.uri}:"]
    for item in done:
        if item.deleted_anything:
            entry = ", manifest entry" if item.recorded else ""
            lines.append(
                f"  {item.stage:<24} deleted {item.files} files, {item.markers} part markers{entry}"
            )
    if len(lines) == 1:
        lines.append("  nothing to delete")
    return "\n".join(lines)


def _reset_one(run: RunDir, stage: str, recorded: bool) -> StageReset:
    kind, channel = stage_kind(stage)
    outputs = STAGE_OUTPUTS[kind]
    files = sum(_delete_folder(run, f.format(channel=channel)) for f in outputs.folders)
    files += sum(_delete_glob(run, g.format(channel=channel)) for g in outputs.shared)
    markers = _delete_folder(run, f"{PROGRESS_DIR}/{stage}")
    return StageReset(stage, files, markers, recorded)


def _is_pipeline_stage(name: str) -> bool:
    try:
        stage_kind(name)
    except ValueError:
        return False
    return True


def _order(name: str) -> tuple[int, str]:
    return KINDS.index(stage_kind(name)[0]), name


def _files(run: RunDir) -> tuple[Any, str]:
    fs, root = filesystem(run.root)
    return fs, root.rstrip("/")


def _subfolders(run: RunDir, folder: str) -> list[str]:
    """Names of the folders directly in `folder` of the run."""
    fs, root = _files(run)
    path = f"{root}/{folder}"
    if not fs.isdir(path):
        return []
    entries = fs.ls(path, detail=True)
    return [e["name"].rstrip("/").rpartition("/")[2] for e in entries if e["type"] == "directory"]


def _delete_folder(run: RunDir, folder: str) -> int:
    """Delete a folder of the run and everything in it; how many files went."""
    fs, root = _files(run)
    path = f"{root}/{folder}"
    if not fs.exists(path):
        return 0
    count = len(fs.find(path))
    fs.rm(path, recursive=True)
    return count


def _delete_glob(run: RunDir, pattern: str) -> int:
    """Delete the files of the run that match `pattern`; how many went."""
    fs, root = _files(run)
    found = [p for p in fs.glob(f"{root}/{pattern}") if fs.isfile(p)]
    for path in found:
        fs.rm(path)
    return len(found)
