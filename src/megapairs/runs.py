"""A run is a directory: atomic shard files, per-part completion markers, a manifest.

Layout (a part of a stage is done when its marker exists):

    <run>/manifest.json
    <run>/<folder>/part-00000.parquet            (or .npy); folders named by the stages
    <run>/_progress/<stage>/part-00000.json      counts of that part, written last

Markers are separate files rather than manifest entries, so parts can be
finished by separate processes (a Ray runner) without a shared mutable file.
Data files are renamed into place when complete; a part's files only count
once its marker exists.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("megapairs", "torch", "transformers", "faiss-cpu", "pyarrow", "numpy", "pillow")


def part_name(index: int) -> str:
    """The file stem of part `index`: part-00042."""
    return f"part-{index:05d}"


def part_index(name: str) -> int:
    """The index in a part name such as part-00042."""
    prefix = "part-"
    if not name.startswith(prefix):
        raise ValueError(f"not a part name: {name!r}")
    return int(name[len(prefix) :])


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path in the same folder; rename it onto `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_array(path: Path, array: np.ndarray) -> None:
    """Write a .npy file atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def concat_tables(
    paths: list[Path], schema: pa.Schema, columns: list[str] | None = None
) -> pa.Table:
    """Concatenate Parquet files; an empty list gives an empty table of `schema`."""
    if not paths:
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables([read_table(p, columns) for p in paths])


class RunDir:
    """One pipeline run on disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def part_path(self, stage: str, part: str, suffix: str = ".parquet") -> Path:
        return self.folder(stage) / f"{part}{suffix}"

    def files(self, folder: str, stage: str, suffix: str = ".parquet") -> list[Path]:
        """The data files in `folder` of the parts `stage` has finished, in part order."""
        done = set(self.done_parts(stage))
        files = sorted(self.folder(folder).glob(f"part-*{suffix}"))
        return [f for f in files if f.name[: -len(suffix)] in done]

    # completion markers ---------------------------------------------------
    def _progress(self, stage: str) -> Path:
        return self.root / "_progress" / stage

    def _marker(self, stage: str, part: str) -> Path:
        return self._progress(stage) / f"{part}.json"

    def is_done(self, stage: str, part: str) -> bool:
        return self._marker(stage, part).exists()

    def mark_done(self, stage: str, part: str, counts: dict[str, Any]) -> None:
        write_json(self._marker(stage, part), counts)

    def reopen(self, stage: str, part: str) -> None:
        """Forget that `part` of `stage` is done (before computing it again), so a crash
        while its files are rewritten cannot leave new files under an old marker."""
        self._marker(stage, part).unlink(missing_ok=True)

    def done_parts(self, stage: str) -> list[str]:
        return sorted(p.stem for p in self._progress(stage).glob("part-*.json"))

    def part_counts(self, stage: str) -> dict[str, dict[str, Any]]:
        """The counts recorded by each finished part of a stage."""
        markers = sorted(self._progress(stage).glob("part-*.json"))
        return {p.stem: json.loads(p.read_text()) for p in markers}

    def remove_temp_files(self) -> int:
        """Delete temp files a killed writer left behind (`.<name>.<random>.tmp`); only
        safe while no other process writes into this run. Returns how many went."""
        stale = list(self.root.rglob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # manifest -------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **entries: Any) -> dict[str, Any]:
        """Merge top-level entries into the manifest (atomically rewritten)."""
        manifest = self.read_manifest()
        manifest.update(entries)
        write_json(self.manifest_path, manifest)
        return manifest


def environment_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the output."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
