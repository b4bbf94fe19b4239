"""A run is a directory: atomic shard files, per-part completion markers, a manifest.

Layout (a part of a stage is done when its marker exists):

    <run>/manifest.json
    <run>/<folder>/part-00000.parquet            (or .npy); folders named by the stages
    <run>/_progress/<stage>/part-00000.json      counts of that part, written last
    <run>/.megapairs.lock                        the one writer (megapairs.pipeline.lock)
    <run>/quarantine/<path in the run>           files that did not open, moved aside

Markers are separate files rather than manifest entries, so parts can be
finished by separate processes (a Ray runner) without a shared mutable file.
Data files are renamed into place when complete; a part's files only count
once its marker exists.

A run may live on object storage (`s3://bucket/prefix`, any fsspec URL): its root is
then a `upath.UPath` whose listings are never cached, and every file is written to a
local temp file first and uploaded whole in one request (an object becomes visible
only once complete), so the same rule holds: data files first, then the marker.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from upath import UPath

# A local path, or a UPath on any fsspec file system (object storage, memory, ...).
AnyPath: TypeAlias = "Path | UPath"

MANIFEST = "manifest.json"
QUARANTINE_DIR = "quarantine"  # unreadable files, moved aside so their parts are redone
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


# paths that may be URLs ----------------------------------------------------------

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_PROTOCOLS = frozenset({"file", "local"})


def is_url(value: object) -> bool:
    """True for a string with a URL scheme (`s3://...`, `gs://...`, `file://...`)."""
    return isinstance(value, str) and _URL.match(value) is not None


def as_path(value: str | Path | UPath) -> AnyPath:
    """A `Path` for a local path, a `UPath` for a URL (directory listings never cached:
    other processes write into runs, so a listing must never be stale)."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        return value  # already a UPath
    if not is_url(value):
        return Path(value)
    from upath import UPath

    try:
        path = UPath(value, use_listings_cache=False)
        path.fs  # noqa: B018 (building the file system refuses options it does not take)
    except TypeError:
        path = UPath(value)
    return path


def filesystem(path: AnyPath) -> tuple[Any, str]:
    """The fsspec file system holding `path`, and the path on it. Looked up per process
    (fsspec's instance cache starts afresh after a fork; a UPath's own `fs` does not)."""
    import fsspec

    if isinstance(path, Path):
        return fsspec.filesystem("file"), str(path.absolute())
    return fsspec.filesystem(path.protocol, **path.storage_options), path.path


def relative_name(path: AnyPath, base: AnyPath) -> str:
    """`path` relative to `base`, a folder above it, as a posix string."""
    if isinstance(path, Path) and isinstance(base, Path):
        return path.relative_to(base).as_posix()
    return str(path)[len(str(base).rstrip("/")) + 1 :]


def local_path(path: AnyPath) -> Path | None:
    """The local file system path of `path` (also of a `file://` UPath); None if remote."""
    if isinstance(path, Path):
        return path
    return Path(path.path) if path.protocol in LOCAL_PROTOCOLS else None


@contextmanager
def atomic_path(path: AnyPath) -> Iterator[Path]:
    """Yield a local temp path; on success it becomes `path` whole: renamed into place
    (local: a temp file in the same folder), or uploaded in one piece (remote)."""
    local = local_path(path)
    if local is None:
        with _uploaded_on_success(path) as upload:
            yield upload
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, local)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def _scratch_file(name: str) -> Iterator[Path]:
    """An empty file in the system temp folder, deleted afterwards."""
    fd, tmp = tempfile.mkstemp(prefix="megapairs-", suffix=f"-{name}")
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _uploaded_on_success(path: AnyPath) -> Iterator[Path]:
    """A temp file in the system temp folder, uploaded to `path` (one object) on success."""
    with _scratch_file(path.name) as tmp:
        yield tmp
        fs, key = filesystem(path)
        fs.put_file(str(tmp), key)


@contextmanager
def local_file(path: AnyPath) -> Iterator[Path]:
    """`path` as a local file for libraries that only open file names (FAISS): itself,
    or a temp copy of a remote object, deleted afterwards."""
    local = local_path(path)
    if local is not None:
        yield local
        return
    with _scratch_file(path.name) as tmp:
        fs, key = filesystem(path)
        fs.get_file(key, str(tmp))
        yield tmp


def write_json(path: AnyPath, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def write_table(path: AnyPath, table: pa.Table) -> None:
    """Write a Parquet file atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_array(path: AnyPath, array: np.ndarray) -> None:
    """Write a .npy file atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


@contextmanager
def arrow_source(path: AnyPath) -> Iterator[Any]:
    """What pyarrow should read `path` from: a local file name, or an open remote file."""
    local = local_path(path)
    if local is not None:
        yield str(local)
        return
    fs, key = filesystem(path)
    with fs.open(key, "rb") as handle:
        yield handle


def read_table(path: AnyPath, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """A Parquet file (local or remote), optionally only some columns or rows."""
    with arrow_source(path) as source:
        return pq.read_table(source, columns=columns, filters=filters)


def parquet_metadata(path: AnyPath) -> pq.FileMetaData:
    """The footer of a Parquet file (row counts, schema) without reading its data."""
    with arrow_source(path) as source:
        return pq.read_metadata(source)


def parquet_rows(path: AnyPath) -> int:
    """The row count of a Parquet file from its footer; 0 when the file does not exist."""
    return parquet_metadata(path).num_rows if path.exists() else 0


def read_array(path: AnyPath, mmap: bool = False) -> np.ndarray:
    """A .npy file; memory-mapped read-only with `mmap` when local (remote: read whole)."""
    local = local_path(path)
    if local is not None:
        return np.load(local, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(read_bytes(path)))


def read_bytes(path: AnyPath) -> bytes:
    """The whole content of a file, local or remote (one request)."""
    local = local_path(path)
    if local is not None:
        return local.read_bytes()
    fs, key = filesystem(path)
    return bytes(fs.cat_file(key))


def move_file(source: AnyPath, target: AnyPath) -> None:
    """Move a file within one file system (local: a rename; remote: the store's move)."""
    local = local_path(source)
    if local is not None:
        destination = local_path(target)
        assert destination is not None, f"cannot move local {source} to {target}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, destination)
        return
    fs, key = filesystem(source)
    fs.mv(key, filesystem(target)[1])


def list_files(folder: AnyPath, pattern: str) -> list[AnyPath]:
    """The files in `folder` whose names match a glob `pattern`, sorted by name."""
    found: list[AnyPath] = [*folder.glob(pattern)]
    return sorted(found, key=lambda path: path.name)


def concat_tables(
    paths: list[AnyPath], schema: pa.Schema, columns: list[str] | None = None
) -> pa.Table:
    """Concatenate Parquet files; an empty list gives an empty table of `schema`."""
    if not paths:
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables([read_table(p, columns) for p in paths])


class RunDir:
    """One pipeline run: a local folder, or a URL on object storage (`s3://bucket/run`)."""

    def __init__(self, root: str | Path | UPath) -> None:
        self.root: AnyPath = as_path(root)

    @property
    def is_local(self) -> bool:
        """True when the run is on the local file system (also as a `file://` URL)."""
        return local_path(self.root) is not None

    @property
    def uri(self) -> str:
        """The run's root as a string: a local path, or a URL."""
        return str(self.root)

    def folder(self, stage: str) -> AnyPath:
        return self.root / stage

    def part_path(self, stage: str, part: str, suffix: str = ".parquet") -> AnyPath:
        return self.folder(stage) / f"{part}{suffix}"

    def files(self, folder: str, stage: str, suffix: str = ".parquet") -> list[AnyPath]:
        """The data files in `folder` of the parts `stage` has finished, in part order."""
        done = set(self.done_parts(stage))
        files = list_files(self.folder(folder), f"part-*{suffix}")
        return [f for f in files if f.name[: -len(suffix)] in done]

    # completion markers ---------------------------------------------------
    def _progress(self, stage: str) -> AnyPath:
        return self.root / "_progress" / stage

    def _marker(self, stage: str, part: str) -> AnyPath:
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
        return [p.stem for p in list_files(self._progress(stage), "part-*.json")]

    def part_counts(self, stage: str) -> dict[str, dict[str, Any]]:
        """The counts recorded by each finished part of a stage."""
        markers = list_files(self._progress(stage), "part-*.json")
        return {p.stem: json.loads(p.read_text()) for p in markers}

    def remove_temp_files(self) -> int:
        """Delete temp files a killed writer left behind (`.<name>.<random>.tmp`); only
        safe while no other process writes into this run. Returns how many went. A remote
        run has none: its temp files are in the writer's local temp folder."""
        root = local_path(self.root)
        if root is None:
            return 0
        stale = list(root.rglob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # unreadable files -----------------------------------------------------
    def quarantine(self, path: AnyPath) -> AnyPath:
        """Move `path`, a file of this run, to `quarantine/<its path in the run>` (a number
        appended if that is taken); return where it went."""
        first = self.root / QUARANTINE_DIR / relative_name(path, self.root)
        target, taken = first, 0
        while target.exists():
            taken += 1
            target = first.with_name(f"{first.name}~{taken}")
        move_file(path, target)
        return target

    # manifest -------------------------------------------------------------
    @property
    def manifest_path(self) -> AnyPath:
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
