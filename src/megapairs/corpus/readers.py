"""Input readers: turn a corpus on disk into a deterministic list of parts of records.

Formats (registered by name in `READERS`):

- `folder`: a tree of image files, captions in sidecar `x.txt` files beside `x.jpg`.
- `manifest`: a CSV/TSV/JSONL/Parquet table of image paths and captions.
- `webdataset`: img2dataset-style `.tar` shards (`<key>.jpg`, `<key>.txt`, `<key>.json`).
- `parquet`: Hugging Face datasets style Parquet with image bytes in a column.

`plan_input(config)` lists the parts (small picklable `InputPart`s, deterministic
order); `read_part(part)` yields `SourceRecord`s. A reader never raises on a bad
record: it yields the record with `error` set. It raises `InputError` only when
the input as a whole cannot be read.

`input.path` (and `input.image_root`, and image paths in manifests) may be fsspec URLs
on object storage (`s3://bucket/shards/`, `gs://...`): files are listed and opened
through fsspec, credentials and endpoints come from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...). Web URLs (http, https, ftp) of images are not fetched.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from megapairs.config import InputConfig
from megapairs.registry import Registry
from megapairs.runs import (
    AnyPath,
    arrow_source,
    as_path,
    filesystem,
    is_url,
    local_path,
    parquet_metadata,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_SUFFIXES = frozenset({".txt", ".json"})
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet",)
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_EXTENSION = "txt"
# image URLs that are downloads, not files (img2dataset fetches them)
WEB_SCHEMES = ("http://", "https://", "ftp://")
# files a folder of images should not hold: another format's input (the first found names it)
ARCHIVE_FORMATS = {".tar": "webdataset", ".parquet": "parquet or manifest"} | dict.fromkeys(
    (".csv", ".tsv", ".jsonl"), "manifest"
)


class InputError(ValueError):
    """The input as a whole cannot be read (missing path, unknown format, missing column)."""


@dataclass(frozen=True)
class SourceRecord:
    """One input record: a local image file (`path`) or bytes (`data`), or a known error."""

    key: str
    uri: str
    path: str | None = None
    data: bytes | None = None
    caption: str | None = None
    error: tuple[str, str] | None = None  # (reason code, detail)


@dataclass(frozen=True)
class InputPart:
    """A picklable description of one part of the input: what `read_part` needs, no more."""

    reader: str
    source: str  # absolute folder or file this part reads
    members: tuple[str, ...] = ()  # folder: relative file paths
    start: int = 0  # manifest / parquet: row range [start, stop)
    stop: int = 0
    image_column: str = "image"
    caption_column: str = "caption"
    image_root: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputPart:
        return cls(**{**data, "members": tuple(data.get("members", ()))})


class Reader(Protocol):
    """One input format: how to split it into parts and how to read a part."""

    def plan(self, config: InputConfig) -> list[InputPart]: ...

    def read(self, part: InputPart) -> Iterator[SourceRecord]: ...


READERS: Registry[Reader] = Registry("input reader")


def plan_input(config: InputConfig) -> list[InputPart]:
    """The parts of the input, in a deterministic order; raise InputError if unreadable."""
    fmt = detect_format(config) if config.format == "auto" else config.format
    parts = READERS.build(fmt).plan(config)
    if not parts:
        raise InputError(f"input {config.path!r} (format {fmt}) holds no records")
    return parts


def read_part(part: InputPart) -> Iterator[SourceRecord]:
    """The records of one part, in order."""
    return READERS.build(part.reader).read(part)


# locating files -----------------------------------------------------------


def _is_hidden(relative: Path) -> bool:
    return any(name.startswith(".") for name in relative.parts)


def _location(path: str) -> AnyPath:
    """A local path (`~` expanded) or, for a URL, a UPath on its file system."""
    return as_path(path) if is_url(path) else Path(path).expanduser()


def _walk(root: AnyPath) -> list[str]:
    """Every non-hidden file under `root` (hidden folders skipped too), as sorted relative
    posix paths."""
    local = local_path(root)
    if local is None:
        return _walk_remote(root)
    found: list[str] = []
    for folder, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder).relative_to(local)
        found.extend((base / f).as_posix() for f in files if not f.startswith("."))
    return sorted(found)


def _walk_remote(root: AnyPath) -> list[str]:
    """`_walk` on object storage: one recursive listing."""
    fs, key = filesystem(root)
    prefix = key.rstrip("/") + "/"
    names = [name[len(prefix) :] for name in fs.find(key) if name.startswith(prefix)]
    return sorted(name for name in names if not _is_hidden(Path(name)))


def _existing_path(path: str) -> AnyPath:
    if not path:
        raise InputError("input.path is not set")
    resolved = _location(path)
    if not resolved.exists():
        raise InputError(f"input path {path!r} does not exist")
    return resolved.absolute() if isinstance(resolved, Path) else resolved


def _candidate_files(path: str) -> list[AnyPath]:
    """The files a path names: itself, the files under a folder, or a glob's matches."""
    if glob.has_magic(path):
        matches = _glob(path)
        if not matches:
            raise InputError(f"input pattern {path!r} matches no files")
        return [m for m in matches if m.is_file()]
    root = _existing_path(path)
    return [root / name for name in _walk(root)] if root.is_dir() else [root]


def _glob(pattern: str) -> list[AnyPath]:
    if not is_url(pattern):
        return sorted(Path(p).absolute() for p in glob.glob(pattern, recursive=True))
    fs, key = filesystem(as_path(pattern))
    return [as_path(fs.unstrip_protocol(p)) for p in sorted(fs.glob(key))]


def _input_files(path: str, suffixes: tuple[str, ...], what: str) -> list[AnyPath]:
    """The files of `path` with one of `suffixes`; InputError when there are none."""
    files = [f for f in _candidate_files(path) if f.name.lower().endswith(suffixes)]
    if not files:
        raise InputError(f"input {path!r} holds no {what} files ({', '.join(suffixes)})")
    return files


def _row_ranges(rows: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def _row_parts(reader: str, path: AnyPath, rows: int, config: InputConfig) -> list[InputPart]:
    """Parts of at most `config.shard_size` consecutive rows of one table file."""
    return [
        InputPart(
            reader,
            str(path),
            start=start,
            stop=stop,
            image_column=config.image_column,
            caption_column=config.caption_column,
            image_root=_absolute_root(config),
        )
        for start, stop in _row_ranges(rows, config.shard_size)
    ]


def _resolve(value: str, base: AnyPath) -> AnyPath:
    if is_url(value):
        return as_path(value)
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path.as_posix()


def _image_base(part: InputPart) -> AnyPath:
    return _location(part.image_root) if part.image_root else _location(part.source).parent


def _absolute_root(config: InputConfig) -> str | None:
    if not config.image_root or is_url(config.image_root):
        return config.image_root or None
    return str(Path(config.image_root).expanduser().absolute())


def _local_file_record(key: str, value: str, base: AnyPath, caption: str | None) -> SourceRecord:
    """A record for an image named by a path or an object-storage URL; `missing_file` for a
    web URL or a local path that is not a file (a remote file is checked when read)."""
    if "://" in value and (value.lower().startswith(WEB_SCHEMES) or not _known_url(value)):
        detail = f"{value!r} is a URL, not a local file; download the images first (img2dataset)"
        return SourceRecord(key, value, caption=caption, error=("missing_file", detail))
    path = _resolve(value, base)
    local = local_path(path)
    if local is None:
        return SourceRecord(key, str(path), path=str(path), caption=caption)
    if not local.is_file():
        detail = f"image file {str(local)!r} does not exist"
        return SourceRecord(key, str(local), caption=caption, error=("missing_file", detail))
    return SourceRecord(key, str(local), path=str(local), caption=caption)


def _known_url(value: str) -> bool:
    """True for a URL of a file system fsspec can open (s3, gs, az, file, ...)."""
    import fsspec

    return is_url(value) and value.split("://", 1)[0].lower() in fsspec.available_protocols()


# auto detection -------------------------------------------------------------


def detect_format(config: InputConfig) -> str:
    """The reader for `config.path`: images -> folder, .tar -> webdataset, Parquet with
    an image bytes column -> parquet, other tables -> manifest."""
    files = _candidate_files(config.path)
    suffixes = {f.suffix.lower() for f in files}
    is_dir = not glob.has_magic(config.path) and _location(config.path).is_dir()
    if is_dir and suffixes & IMAGE_SUFFIXES:
        return "folder"
    if suffixes & set(TAR_SUFFIXES):
        return "webdataset"
    parquet = [f for f in files if f.suffix.lower() == ".parquet"]
    if parquet and _has_image_bytes(parquet[0], config.image_column):
        return "parquet"
    if suffixes & set(MANIFEST_SUFFIXES):
        return "manifest"
    found = ", ".join(sorted(suffixes)) or "no files"
    raise InputError(
        f"cannot tell the format of input {config.path!r} (found {found}); "
        f"set input.format to one of {', '.join(READERS.names())}"
    )


def _is_image_bytes_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _has_image_bytes(path: AnyPath, column: str) -> bool:
    schema = _parquet_schema(path)
    return column in schema.names and _is_image_bytes_type(schema.field(column).type)


def _parquet_schema(path: AnyPath) -> pa.Schema:
    try:
        with arrow_source(path) as source:
            return pq.read_schema(source)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"cannot read Parquet file {str(path)!r}: {err}") from err


def _require_columns(path: AnyPath, names: list[str], wanted: Iterable[str]) -> None:
    missing = [c for c in wanted if c and c not in names]
    if missing:
        raise InputError(
            f"{str(path)!r} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {', '.join(map(repr, names))} "
            "(set input.image_column / input.caption_column)"
        )


# folder -----------------------------------------------------------------------


@READERS.register("folder")
class FolderReader:
    """A tree of image files; `x.txt` beside `x.jpg` is its caption.

    Every non-hidden file that is not a .txt/.json sidecar is a record, whatever
    its suffix, so a stray file ends in the rejects (not_an_image), not nowhere. A
    folder of only tar shards or tables is another format's input: an InputError says
    which `input.format` reads it; among images, such a file's reject says so.
    """

    def plan(self, config: InputConfig) -> list[InputPart]:
        root = _existing_path(config.path)
        if not root.is_dir():
            raise InputError(f"input {config.path!r} is not a folder (format folder)")
        members = [m for m in _walk(root) if Path(m).suffix.lower() not in SIDECAR_SUFFIXES]
        _refuse_other_formats(config.path, members)
        return [
            InputPart("folder", str(root), members=tuple(members[start:stop]))
            for start, stop in _row_ranges(len(members), config.shard_size)
        ]

    def read(self, part: InputPart) -> Iterator[SourceRecord]:
        root = _location(part.source)
        for relative in part.members:
            path = root / relative
            other = ARCHIVE_FORMATS.get(Path(relative).suffix.lower())
            if other:
                detail = f"{relative} is not an image but input for input.format: {other}"
                yield SourceRecord(relative, str(path), error=("not_an_image", detail))
                continue
            try:
                caption = _read_sidecar(path)
            except OSError as err:
                error = ("unreadable_caption", f"cannot read the caption file of {relative}: {err}")
                yield SourceRecord(relative, str(path), error=error)
                continue
            yield SourceRecord(relative, str(path), path=str(path), caption=caption)


def _refuse_other_formats(path: str, members: list[str]) -> None:
    """InputError when every file is a tar shard or a table: the wrong input.format."""
    suffixes = sorted({Path(m).suffix.lower() for m in members})
    if not suffixes or not set(suffixes) <= set(ARCHIVE_FORMATS):
        return
    wanted = next(kind for suffix, kind in ARCHIVE_FORMATS.items() if suffix in suffixes)
    raise InputError(
        f"input {path!r} holds {', '.join(suffixes)} files, not images: set input.format: "
        f"{wanted} (or auto) instead of folder"
    )


def _read_sidecar(image_path: AnyPath) -> str | None:
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return sidecar.read_text(encoding="utf-8", errors="replace")


# manifest -----------------------------------------------------------------------

MANIFEST_LOADERS: Registry[pa.Table] = Registry("manifest file type")


@READERS.register("manifest")
class ManifestReader:
    """A table of image paths and captions; relative paths resolve against
    `input.image_root`, else the manifest's folder."""

    def plan(self, config: InputConfig) -> list[InputPart]:
        parts = []
        for path in _input_files(config.path, MANIFEST_SUFFIXES, "manifest"):
            table = _load_manifest(str(path), config.image_column, config.caption_column)
            parts += _row_parts("manifest", path, table.num_rows, config)
        return parts

    def read(self, part: InputPart) -> Iterator[SourceRecord]:
        table = _load_manifest(part.source, part.image_column, part.caption_column)
        rows = table.slice(part.start, part.stop - part.start)
        base = _image_base(part)
        name = Path(part.source).name
        images, captions = rows.column("image").to_pylist(), rows.column("caption").to_pylist()
        for row, (value, caption) in enumerate(zip(images, captions, strict=True), part.start):
            if value is None or not value.strip():
                detail = f"row {row} of {name} has an empty {part.image_column!r} column"
                yield SourceRecord(
                    f"{name}#{row}", part.source, caption=caption, error=("no_image", detail)
                )
                continue
            yield _local_file_record(value, value, base, caption)


def _load_manifest(path: str, image_column: str, caption_column: str) -> pa.Table:
    """The manifest as a table of two string columns, `image` and `caption`.

    Cached (keyed by the file's size and mtime too), so the parts of one manifest
    do not each parse the whole file again.
    """
    try:
        version, size = file_version(path)
    except OSError as err:
        raise InputError(f"cannot read manifest {path!r}: {err}") from err
    return _load_manifest_cached(path, version, size, image_column, caption_column)


def file_version(path: str) -> tuple[str | int, int]:
    """(mtime_ns, size) of a local file; (ETag or modification time, size) of a remote
    one: what changes when the file is rewritten."""
    if not is_url(path):
        stat = os.stat(path)
        return stat.st_mtime_ns, stat.st_size
    fs, key = filesystem(as_path(path))
    info = fs.info(key)
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return str(version), int(info["size"])


@functools.lru_cache(maxsize=2)
def _load_manifest_cached(
    path: str, _version: str | int, _size: int, image_column: str, caption_column: str
) -> pa.Table:
    source = _location(path)
    suffix = source.suffix.lower()
    try:
        table = MANIFEST_LOADERS.build(suffix, source)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"cannot read manifest {path!r}: {err}") from err
    _require_columns(source, table.column_names, (image_column, caption_column))
    captions = (
        table.column(caption_column).cast(pa.string())
        if caption_column
        else pa.nulls(table.num_rows, pa.string())
    )
    images = table.column(image_column).cast(pa.string())
    return pa.table({"image": images, "caption": captions})


@MANIFEST_LOADERS.register(".csv")
def _load_csv(path: AnyPath) -> pa.Table:
    return _read_delimited(path, ",")


@MANIFEST_LOADERS.register(".tsv")
def _load_tsv(path: AnyPath) -> pa.Table:
    return _read_delimited(path, "\t")


def _read_delimited(path: AnyPath, delimiter: str) -> pa.Table:
    """Every column read as text, so captions such as `1984` stay strings."""
    with arrow_source(path) as source:
        header = pa_csv.open_csv(source, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
        names = header.schema.names
        header.close()
    with arrow_source(path) as source:
        return pa_csv.read_csv(
            source,
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )


@MANIFEST_LOADERS.register(".jsonl")
def _load_jsonl(path: AnyPath) -> pa.Table:
    """One JSON object per line; scalars of any type become text, absent keys null."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{str(path)!r} line {number} is not valid JSON: {err}") from err
            if not isinstance(row, dict):
                raise InputError(f"{str(path)!r} line {number} is not a JSON object")
            rows.append({k: _as_text(v) for k, v in row.items()})
    names = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({n: pa.array([r.get(n) for r in rows], pa.string()) for n in names})


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


@MANIFEST_LOADERS.register(".parquet")
def _load_parquet_manifest(path: AnyPath) -> pa.Table:
    with arrow_source(path) as source:
        return pq.read_table(source)


# webdataset -------------------------------------------------------------------

# webdataset's own rule: the key is the path up to the first dot of the file name.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@READERS.register("webdataset")
class WebDatasetReader:
    """img2dataset-style tar shards, one part per shard; consecutive members with
    the same key form a sample (image .jpg/.jpeg/.png/.webp, caption .txt)."""

    def plan(self, config: InputConfig) -> list[InputPart]:
        shards = _input_files(config.path, TAR_SUFFIXES, "tar")
        return [InputPart("webdataset", str(shard)) for shard in shards]

    def read(self, part: InputPart) -> Iterator[SourceRecord]:
        shard = part.source
        samples = _tar_samples(shard)
        while True:
            try:
                key, files = next(samples)
            except StopIteration:
                return
            except (tarfile.TarError, OSError, EOFError) as err:
                detail = f"tar shard {shard!r} cannot be read past this point: {err}"
                yield SourceRecord(
                    f"{Path(shard).name}#unreadable", shard, error=("corrupt_archive", detail)
                )
                return
            yield _sample_record(shard, key, files)


def _split_member(name: str) -> tuple[str, str]:
    match = _KEY_AND_EXTENSION.match(name)
    return (match.group(1), match.group(2)) if match else (name, "")


def _tar_samples(shard: str) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """(key, [(member name, extension, bytes)]) for runs of members sharing a key."""
    key: str | None = None
    files: list[tuple[str, str, bytes]] = []
    with _open_tar(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_member(member.name)
            if key is not None and member_key != key:
                yield key, files  # before reading on, so a later bad member costs only itself
                files = []
            key = member_key
            handle = tar.extractfile(member)
            files.append((member.name, extension, handle.read() if handle else b""))
    if key is not None:
        yield key, files


@contextmanager
def _open_tar(shard: str) -> Iterator[tarfile.TarFile]:
    """A tar shard as a stream: a local file, or a remote object read front to back."""
    if not is_url(shard):
        with tarfile.open(shard, mode="r|*") as tar:
            yield tar
        return
    with as_path(shard).open("rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        yield tar


def _sample_record(shard: str, key: str, files: list[tuple[str, str, bytes]]) -> SourceRecord:
    by_extension = {extension.lower(): (name, data) for name, extension, data in reversed(files)}
    caption_file = by_extension.get(WDS_CAPTION_EXTENSION)
    caption = caption_file[1].decode("utf-8", errors="replace") if caption_file else None
    for extension in WDS_IMAGE_EXTENSIONS:
        if extension in by_extension:
            name, data = by_extension[extension]
            return SourceRecord(key, f"{shard}#{name}", data=data, caption=caption)
    names = ", ".join(name for name, _, _ in files)
    detail = (
        f"sample {key!r} has no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)}); it holds {names}"
    )
    return SourceRecord(key, f"{shard}#{key}", caption=caption, error=("no_image", detail))


# parquet (Hugging Face datasets style) ------------------------------------------


@READERS.register("parquet")
class ParquetReader:
    """Parquet files whose image column holds bytes, as a struct {bytes, path}
    (Hugging Face `Image` feature) or plain binary, beside a caption column."""

    def plan(self, config: InputConfig) -> list[InputPart]:
        parts = []
        for path in _input_files(config.path, PARQUET_SUFFIXES, "Parquet"):
            schema = _parquet_schema(path)
            _require_columns(path, schema.names, (config.image_column, config.caption_column))
            kind = schema.field(config.image_column).type
            if not _is_image_bytes_type(kind):
                raise InputError(
                    f"column {config.image_column!r} of {str(path)!r} has type {kind}, "
                    "not binary or a struct with `bytes`; use input.format=manifest for paths"
                )
            parts += _row_parts("parquet", path, parquet_metadata(path).num_rows, config)
        return parts

    def read(self, part: InputPart) -> Iterator[SourceRecord]:
        table = _read_row_range(_location(part.source), part)
        images = table.column(part.image_column).to_pylist()
        captions = (
            table.column(part.caption_column).cast(pa.string()).to_pylist()
            if part.caption_column
            else [None] * table.num_rows
        )
        for row, (value, caption) in enumerate(zip(images, captions, strict=True), part.start):
            yield _parquet_record(part, row, value, caption)


def _read_row_range(path: AnyPath, part: InputPart) -> pa.Table:
    """Rows [start, stop) of `path`, reading only the row groups that hold them."""
    with arrow_source(path) as source:
        return _row_range(pq.ParquetFile(source), part)


def _row_range(parquet: pq.ParquetFile, part: InputPart) -> pa.Table:
    columns = [c for c in (part.image_column, part.caption_column) if c]
    groups, first_row, offset = [], None, 0
    for index in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(index).num_rows
        if offset < part.stop and offset + size > part.start:
            groups.append(index)
            first_row = offset if first_row is None else first_row
        offset += size
    table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(part.start - (first_row or 0), part.stop - part.start)


def _parquet_record(part: InputPart, row: int, value: Any, caption: str | None) -> SourceRecord:
    """A record from one image cell: bytes, a struct {bytes, path}, or nothing."""
    name = Path(part.source).name
    uri = f"{part.source}#row={row}"
    cell = value if isinstance(value, dict) else {"bytes": value, "path": None}
    data, stored_path = cell.get("bytes"), cell.get("path")
    key = stored_path or f"{name}#{row}"
    if data is not None:
        return SourceRecord(key, uri, data=data, caption=caption)
    if stored_path:
        return _local_file_record(key, stored_path, _image_base(part), caption)
    detail = f"row {row} of {name} has no bytes or path in column {part.image_column!r}"
    return SourceRecord(key, uri, caption=caption, error=("no_image", detail))
