"""Checks of an exported dataset, ours or the released MegaPairs layout.

A dataset is a folder of Parquet shards and/or JSONL files (or one such file)
with at least the released columns `q_img` (str), `q_text` (list of str),
`t_img` (str) and `hns` (list of str); relative image paths are resolved against
an image root (default: the dataset folder, or the `image_root` its
dataset_info.json names). Every problem names its file, its row (0-based within
that file; none for a file-level problem), its column and what is wrong:

  missing_column, wrong_type        the schema
  invalid_json, null_value          a JSONL line that is not an object; a null path
  missing_image                     a referenced image that does not exist
  target_in_negatives               t_img among hns
  query_not_first                   hns does not start with q_img (the released convention)
  few_instructions, empty_instruction
  duplicate_pair                    the same (q_img, t_img) as an earlier row
  twin_mismatch                     a JSONL beside a Parquet shard with another row count
  empty                             no rows at all (unless `allow_empty`)

Where a Parquet shard has a JSONL twin (part-N.parquet + part-N.jsonl, as export
writes them) the Parquet file is checked and the twin only for its row count. The
dataset and its images may be on object storage (a URL such as `s3://bucket/run/dataset`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs.runs import (
    AnyPath,
    arrow_source,
    as_path,
    filesystem,
    is_url,
    local_path,
    parquet_metadata,
    relative_name,
)

INFO_FILE = "dataset_info.json"
DATA_SUFFIXES = (".parquet", ".jsonl")
SKIPPED_FOLDERS = {"images"}
BATCH_ROWS = 65_536
TEXT, TEXTS = "str", "list of str"
REQUIRED_COLUMNS = {"q_img": TEXT, "q_text": TEXTS, "t_img": TEXT, "hns": TEXTS}

SKIP: Any = object()  # a value not checked further: its column or type is wrong (reported)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset; `row` is None for a file-level problem."""

    file: str
    row: int | None
    column: str | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        column = f" {self.column}" if self.column else ""
        return f"{where}{column}: {self.message}"


@dataclass
class ValidationReport:
    """What `validate_dataset` found; `counts` counts every problem, `problems` keeps the
    first `max_problems` of them."""

    path: AnyPath
    image_root: AnyPath
    files: list[str] = field(default_factory=list)
    twins: list[str] = field(default_factory=list)
    rows: int = 0
    images_checked: int = 0
    images_missing: int = 0
    problems: list[Problem] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    max_problems: int = 10_000

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def problem_count(self) -> int:
        return sum(self.counts.values())

    def add(self, file: str, row: int | None, column: str | None, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(file, row, column, kind, message))


class ImageChecker:
    """Whether image paths exist, listing each folder once (a dataset names each image many
    times, and most share a few folders)."""

    def __init__(self, root: AnyPath) -> None:
        self.root = str(root)
        self.known: dict[str, bool] = {}
        self._folders: dict[str, frozenset[str]] = {}

    def exists(self, path: str) -> bool:
        found = self.known.get(path)
        if found is None:
            folder, name = os.path.split(self.resolve(path))
            found = name in self._listing(folder)
            self.known[path] = found
        return found

    def resolve(self, path: str) -> str:
        return path if is_url(path) else os.path.join(self.root, path)

    def _listing(self, folder: str) -> frozenset[str]:
        names = self._folders.get(folder)
        if names is None:
            try:
                names = frozenset(_list_names(folder))
            except OSError:
                names = frozenset()
            self._folders[folder] = names
        return names


def _list_names(folder: str) -> list[str]:
    """The names in a local folder or under a URL (one listing); OSError if unreadable."""
    if not is_url(folder):
        return os.listdir(folder)
    fs, key = filesystem(as_path(folder))
    return [name.rpartition("/")[2] for name in fs.find(key, maxdepth=1)]


def dataset_files(path: AnyPath) -> tuple[list[AnyPath], list[AnyPath]]:
    """(data files to read, JSONL twins of Parquet files) of a dataset folder or file."""
    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise FileNotFoundError(f"no dataset at {path}")
    local = local_path(path)
    found = _data_files(local) if local is not None else _remote_data_files(path)
    found.sort(key=lambda f: relative_name(f, path).split("/"))
    parquet = {f.with_suffix("") for f in found if f.suffix == ".parquet"}
    twins = [f for f in found if f.suffix == ".jsonl" and f.with_suffix("") in parquet]
    read = [f for f in found if not (f.suffix == ".jsonl" and f.with_suffix("") in parquet)]
    return read, twins


def _data_files(path: Path) -> list[AnyPath]:
    found: list[AnyPath] = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if _searched(d))
        found += [Path(folder) / n for n in names if n.endswith(DATA_SUFFIXES) and n[0] != "."]
    return found


def _remote_data_files(path: AnyPath) -> list[AnyPath]:
    """`_data_files` on object storage: one recursive listing."""
    fs, key = filesystem(path)
    prefix = key.rstrip("/") + "/"
    found: list[AnyPath] = []
    for name in fs.find(key):
        *folders, file = name[len(prefix) :].split("/")
        if all(map(_searched, folders)) and file.endswith(DATA_SUFFIXES) and file[0] != ".":
            found.append(path / name[len(prefix) :])
    return found


def _searched(folder: str) -> bool:
    return folder not in SKIPPED_FOLDERS and not folder.startswith((".", "_"))


def default_image_root(path: AnyPath) -> AnyPath:
    """The dataset folder (a file's folder), or the image root its dataset_info.json names."""
    folder = path if path.is_dir() else path.parent
    info = folder / INFO_FILE
    if info.exists():
        root = json.loads(info.read_text()).get("image_root", ".")
        return folder if root in ("", ".") else folder / root
    return folder


def validate_dataset(
    path: AnyPath | str,
    image_root: AnyPath | str | None = None,
    *,
    min_instructions: int = 3,
    check_images: bool = True,
    max_problems: int = 10_000,
    allow_empty: bool = False,
) -> ValidationReport:
    """Check every row of a dataset folder or file; see the module docstring. A dataset
    without a single row is a problem unless `allow_empty`."""
    path = as_path(path)
    files, twins = dataset_files(path)
    root = as_path(image_root) if image_root is not None else default_image_root(path)
    report = ValidationReport(path, root, max_problems=max_problems)
    checker = RowChecker(report, ImageChecker(root) if check_images else None, min_instructions)
    base = path if path.is_dir() else path.parent
    keys = []
    for file in files:
        report.files.append(relative_name(file, base))
        keys.append(checker.check_file(file, report.files[-1]))
    for twin in twins:
        report.twins.append(relative_name(twin, base))
        _check_twin(twin, report.twins[-1], report)
    _report_duplicates(keys, report)
    if checker.images is not None:
        report.images_checked = len(checker.images.known)
        report.images_missing = sum(not found for found in checker.images.known.values())
    order = {name: index for index, name in enumerate([*report.files, *report.twins])}
    report.problems.sort(key=lambda p: (order[p.file], -1 if p.row is None else p.row))
    if report.rows == 0 and not allow_empty:
        report.add(str(path), None, None, "empty", empty_message(len(report.files)))
    return report


def empty_message(files: int) -> str:
    found = "no data files" if files == 0 else f"{files} data files but no rows"
    return (
        f"the dataset is empty ({found}): nothing was exported, or the pairs all failed; "
        "see `megapairs stats` on the run, or pass --allow-empty if that is expected"
    )


@dataclass
class RowChecker:
    """The per-row checks of one validation."""

    report: ValidationReport
    images: ImageChecker | None
    min_instructions: int

    def check_file(self, file: AnyPath, name: str) -> np.ndarray:
        """Check one file's rows; returns (row, hash of (q_img, t_img)) per row with both."""
        keys: list[tuple[int, int]] = []
        batches = (
            _jsonl_batches(file, name, self.report)
            if file.suffix == ".jsonl"
            else (_parquet_batches(file, name, self.report))
        )
        row = 0
        for batch in batches:
            for values in batch:
                self.check_row(values, name, row)
                query, target = values["q_img"], values["t_img"]
                if isinstance(query, str) and isinstance(target, str):
                    keys.append((row, hash((query, target))))
                row += 1
        self.report.rows += row
        return np.array(keys, dtype=np.int64).reshape(-1, 2)

    def check_row(self, values: dict[str, Any], name: str, row: int) -> None:
        add = self.report.add
        for column, value in values.items():
            if value is None:
                add(name, row, column, "null_value", f"{column} is null")
        self._check_instructions(values["q_text"], name, row)
        self._check_negatives(values, name, row)
        if self.images is not None:
            self._check_images(values, name, row)

    def _check_instructions(self, texts: Any, name: str, row: int) -> None:
        if texts is None or texts is SKIP:
            return
        if len(texts) < self.min_instructions:
            message = f"{len(texts)} instructions, at least {self.min_instructions} needed"
            self.report.add(name, row, "q_text", "few_instructions", message)
        for position, text in enumerate(texts):
            if text is None or not text.strip():
                message = f"instruction {position} is empty"
                self.report.add(name, row, "q_text", "empty_instruction", message)

    def _check_negatives(self, values: dict[str, Any], name: str, row: int) -> None:
        negatives, query, target = values["hns"], values["q_img"], values["t_img"]
        if negatives is None or negatives is SKIP:
            return
        for position in (i for i, path in enumerate(negatives) if path is None):
            self.report.add(name, row, "hns", "null_value", f"hard negative {position} is null")
        if isinstance(target, str) and target in negatives:
            message = f"the target {target} is hard negative {negatives.index(target)}"
            self.report.add(name, row, "hns", "target_in_negatives", message)
        if isinstance(query, str) and (not negatives or negatives[0] != query):
            message = "does not start with the query image (the released convention)"
            self.report.add(name, row, "hns", "query_not_first", message)

    def _check_images(self, values: dict[str, Any], name: str, row: int) -> None:
        assert self.images is not None
        named = [(c, values[c]) for c in ("q_img", "t_img")]
        if isinstance(values["hns"], list):
            named += [(f"hns[{i}]", p) for i, p in enumerate(values["hns"])]
        for label, image in named:
            if isinstance(image, str) and not self.images.exists(image):
                column = label.partition("[")[0]
                message = (
                    f"{label}: image {image} not found (looked at {self.images.resolve(image)})"
                )
                self.report.add(name, row, column, "missing_image", message)


def _parquet_batches(file: AnyPath, name: str, report: ValidationReport) -> Iterator[list[dict]]:
    """Rows (required columns; SKIP for a missing or mistyped column), a batch at a time."""
    with arrow_source(file) as opened:
        yield from _parquet_file_batches(pq.ParquetFile(opened), name, report)


def _parquet_file_batches(
    source: pq.ParquetFile, name: str, report: ValidationReport
) -> Iterator[list[dict]]:
    schema = source.schema_arrow
    usable = []
    for column, kind in REQUIRED_COLUMNS.items():
        if schema.get_field_index(column) < 0:
            report.add(name, None, column, "missing_column", f"required column {column} missing")
        elif _arrow_kind(found := schema.field(column).type) != kind:
            report.add(name, None, column, "wrong_type", f"is {found}, must be {kind}")
        else:
            usable.append(column)
    skipped = dict.fromkeys(set(REQUIRED_COLUMNS) - set(usable), SKIP)
    if not usable:  # still count the rows
        for group in range(source.num_row_groups):
            yield [skipped] * source.metadata.row_group(group).num_rows
        return
    for batch in source.iter_batches(BATCH_ROWS, columns=usable):
        yield [{**skipped, **row} for row in batch.to_pylist()]


def _arrow_kind(kind: pa.DataType) -> str | None:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return TEXT
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_type
        if pa.types.is_string(item) or pa.types.is_large_string(item):
            return TEXTS
    return None


def _jsonl_batches(file: AnyPath, name: str, report: ValidationReport) -> Iterator[list[dict]]:
    """Rows of a JSONL file (blank lines skipped), a batch at a time; a column absent from the
    first record is a file-level problem, a value of the wrong type a row-level one."""
    absent: set[str] | None = None
    batch: list[dict[str, Any]] = []
    with file.open(encoding="utf-8") as handle:
        for row, line in enumerate(line for line in handle if line.strip()):
            record = _parse_line(line, name, row, report)
            if absent is None and record is not None:
                absent = _absent_columns(record, name, report)
            batch.append(_typed_values(record, absent or set(), name, row, report))
            if len(batch) == BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _parse_line(line: str, name: str, row: int, report: ValidationReport) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        report.add(name, row, None, "invalid_json", f"not JSON: {err}")
        return None
    if not isinstance(record, dict):
        report.add(name, row, None, "invalid_json", "not a JSON object")
        return None
    return record


def _absent_columns(record: dict[str, Any], name: str, report: ValidationReport) -> set[str]:
    absent = {c for c in REQUIRED_COLUMNS if c not in record}
    for column in sorted(absent):
        report.add(name, None, column, "missing_column", f"required column {column} missing")
    return absent


def _typed_values(
    record: dict[str, Any] | None, absent: set[str], name: str, row: int, report: ValidationReport
) -> dict[str, Any]:
    """The record's required values; SKIP where unusable (reported here)."""
    values: dict[str, Any] = dict.fromkeys(REQUIRED_COLUMNS, SKIP)
    if record is None:
        return values
    for column, kind in REQUIRED_COLUMNS.items():
        if column in absent:
            continue
        if column not in record:
            report.add(name, row, column, "missing_column", f"no {column} in this record")
            continue
        value = record[column]
        if value is not None and _json_kind(value) != kind:
            message = f"is {type(value).__name__}, must be {kind}"
            report.add(name, row, column, "wrong_type", message)
            continue
        values[column] = value
    return values


def _json_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return TEXT
    if isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
        return TEXTS
    return None


def _check_twin(twin: AnyPath, name: str, report: ValidationReport) -> None:
    """A JSONL twin must hold as many rows as its Parquet shard."""
    expected = parquet_metadata(twin.with_suffix(".parquet")).num_rows
    with twin.open(encoding="utf-8") as handle:
        found = sum(1 for line in handle if line.strip())
    if found != expected:
        message = f"{found} rows, but {twin.with_suffix('.parquet').name} has {expected}"
        report.add(name, None, None, "twin_mismatch", message)


def _report_duplicates(keys: list[np.ndarray], report: ValidationReport) -> None:
    """Rows whose (q_img, t_img) an earlier row (in file order) already has."""
    if sum(len(k) for k in keys) < 2:
        return
    files = np.concatenate([np.full(len(k), i) for i, k in enumerate(keys)])
    rows = np.concatenate([k[:, 0] for k in keys])
    hashes = np.concatenate([k[:, 1] for k in keys])
    order = np.argsort(hashes, kind="stable")  # equal hashes keep file and row order
    ordered = hashes[order]
    new_group = np.r_[True, ordered[1:] != ordered[:-1]]
    first = order[np.flatnonzero(new_group)[np.cumsum(new_group) - 1]]
    for later, earliest in zip(order[~new_group], first[~new_group], strict=True):
        where = f"{report.files[files[earliest]]} row {rows[earliest]}"
        message = f"same q_img and t_img as {where}"
        report.add(report.files[files[later]], int(rows[later]), "t_img", "duplicate_pair", message)


def format_report(report: ValidationReport, limit: int = 50) -> str:
    """A summary line, problem counts by kind and the first `limit` problems."""
    files = f"{len(report.files)} file{'s' * (len(report.files) != 1)}"
    twins = f" (+ {len(report.twins)} JSONL twins)" if report.twins else ""
    images = f", {report.images_checked} distinct images ({report.images_missing} missing)"
    verdict = "OK" if report.ok else f"{report.problem_count} problems"
    lines = [f"{report.path}: {files}{twins}, {report.rows} rows{images}: {verdict}"]
    lines += [f"  {kind}: {count}" for kind, count in sorted(report.counts.items())]
    lines += [f"  {problem}" for problem in report.problems[:limit]]
    hidden = report.problem_count - min(limit, len(report.problems))
    if hidden > 0:
        lines.append(f"  ... and {hidden} more")
    return "\n".join(lines)
