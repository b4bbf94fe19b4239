"""What every benchmark loader shares: the registry, settings, annotation reading, image checks.

A loader is `loader(data_root, split, settings) -> list[EvalTask]`, registered in
`LOADERS` under the benchmark's name. Errors in the data are `BenchmarkDataError`s
that name the file and the entry; errors in the settings are `ValueError`s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef
from megapairs.registry import Registry

Loader = Callable[[Path, str, Mapping[str, Any]], list[EvalTask]]

LOADERS: Registry[list[EvalTask]] = Registry("benchmark loader")
"""Benchmark name -> loader(data_root: Path, split: str, settings: Mapping) -> list[EvalTask]."""


class LoaderSettings(BaseModel):
    """The settings every loader takes; each benchmark's `Settings` adds its own. Unknown
    keys and values of the wrong type are errors (`resolve_settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # False: read annotation files only (no image folder is listed or checked).
    check_images: bool = True
    # True: evaluate without missing images (dropped and counted in the task's settings).
    allow_missing: bool = False
    # The task instruction every query carries (EvalQuery.instruction). None: none is
    # given, so the retriever's own default applies (the one it was trained with).
    instruction: str | None = None


MISSING_EXAMPLES = 5


def resolve_settings(
    benchmark: str, model: type[LoaderSettings], given: Mapping[str, Any]
) -> dict[str, Any]:
    """`given` checked against the benchmark's `Settings` model and completed with its
    defaults; an unknown key or a value of the wrong type is a ValueError naming it."""
    known = sorted(model.model_fields)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {benchmark} settings {unknown}; known: {known}")
    try:
        return model.model_validate(dict(given)).model_dump()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in error.errors()
        )
        raise ValueError(f"{benchmark} settings: {problems}") from None


def check_split(benchmark: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"{benchmark} has no split {split!r}; splits: {list(splits)}")


def resolve_path(data_root: Path, value: str | Path) -> Path:
    """`value` itself when absolute, else relative to `data_root` ("" is the root)."""
    path = Path(value)
    return path if path.is_absolute() else data_root / path


def resolve_template(setting: str, value: Any, table: Mapping[str, str]) -> tuple[str, str | None]:
    """`(template, name)` for a template setting: a literal template (it holds `{`) is
    taken as given, its name the table's name for it if any; a value without `{` must be
    a name of `table` (else a ValueError listing the names)."""
    if not isinstance(value, str):
        raise ValueError(f"setting {setting!r} should be a template or a name, got {value!r}")
    if "{" in value:
        return value, next((name for name, known in table.items() if known == value), None)
    if value not in table:
        raise ValueError(
            f"setting {setting!r}: {value!r} is not a template (no {{...}} placeholder) nor a "
            f"template name; names: {', '.join(table)}"
        )
    return table[value], value


def check_template(setting: str, template: str, *args: str, **fields: str) -> None:
    """Refuse a template that cannot be filled with these placeholders (before reading data)."""
    if not isinstance(template, str):
        raise ValueError(f"setting {setting!r} should be a string, got {template!r}")
    try:
        template.format(*args, **fields)
    except (KeyError, IndexError, ValueError) as error:
        names = [f"{{{i}}}" for i in range(len(args))] + [f"{{{name}}}" for name in fields]
        raise ValueError(
            f"setting {setting!r}: template {template!r} cannot be filled ({error!r}); "
            f"placeholders: {', '.join(names)}"
        ) from None


def read_json(path: Path, kind: type = list) -> Any:
    """The parsed JSON file at `path`, whose top level must be a `kind`."""
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: annotation file not found")
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(
            f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({error.reason})") from None
    if not isinstance(data, kind):
        raise BenchmarkDataError(
            f"{path}: top level should be {_json_name(kind)}, got {_json_name(type(data))}"
        )
    return data


def _json_name(kind: type) -> str:
    names = {
        list: "an array",
        dict: "an object",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }
    return names.get(kind, f"a {kind.__name__}")


@dataclass(frozen=True)
class Entry:
    """One record of an annotation file; its field getters raise errors naming file and entry."""

    file: Path
    index: int
    data: Mapping[str, Any]
    unit: str = "entry"  # "entry" (index in a JSON array) or "line" / "row"

    def where(self) -> str:
        label = ""
        for key in ("id", "pairid"):
            if isinstance(self.data.get(key), int | str):
                label = f" ({key} {self.data[key]})"
                break
        return f"{self.file}: {self.unit} {self.index}{label}"

    def error(self, message: str) -> BenchmarkDataError:
        return BenchmarkDataError(f"{self.where()}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...]) -> Any:
        """Field `name`, which must exist and be of `kind` (a bool is not an int)."""
        if name not in self.data:
            raise self.error(f"missing field {name!r}")
        return self.check(name, self.data[name], kind)

    def optional(self, name: str, kind: type | tuple[type, ...]) -> Any:
        """Field `name` of `kind`, or None when absent or null."""
        value = self.data.get(name)
        return None if value is None else self.check(name, value, kind)

    def check(self, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(_json_name(k) for k in kinds)
            raise self.error(f"field {name!r} should be {wanted}, got {value!r:.80}")
        return value

    def items(self, name: str, kind: type | tuple[type, ...], *, min_len: int = 0) -> list[Any]:
        """Field `name`: a list of at least `min_len` items, each of `kind`."""
        values = self.get(name, list)
        if len(values) < min_len:
            raise self.error(f"field {name!r} should have at least {min_len} items")
        return [self.check(f"{name}[{i}]", value, kind) for i, value in enumerate(values)]


def entries(path: Path, records: list[Any], unit: str = "entry") -> Iterator[Entry]:
    """The records of a JSON array as `Entry`s; a record that is not an object is an error."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise BenchmarkDataError(
                f"{path}: {unit} {index} should be a JSON object, got {record!r:.80}"
            )
        yield Entry(path, index, record, unit)


def check_unique_ids(path: Path, ids: Sequence[str], what: str = "query id") -> None:
    seen: set[str] = set()
    for index, value in enumerate(ids):
        if value in seen:
            raise BenchmarkDataError(f"{path}: entry {index}: duplicate {what} {value!r}")
        seen.add(value)


def unique_ids(ids: Sequence[str]) -> list[str]:
    """`ids` with repeats made unique by a `#k` suffix (the first keeps its id)."""
    counts: dict[str, int] = {}
    result = []
    for value in ids:
        seen = counts.get(value, 0)
        counts[value] = seen + 1
        result.append(value if seen == 0 else f"{value}#{seen}")
    return result


class FolderListing:
    """Which files exist, answered from one directory listing per folder (not a stat per file).

    Folders are keyed by their path string: a gallery of 100k+ paths is checked in
    well under a second (building `Path.parent` objects per file would not be)."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}
        self.absent: set[str] = set()

    def names(self, folder: str | Path) -> frozenset[str]:
        """The names of the regular files in `folder` (empty when it does not exist)."""
        key = os.fspath(folder)
        if key not in self._names:
            try:
                with os.scandir(key or ".") as scan:
                    self._names[key] = frozenset(e.name for e in scan if e.is_file())
            except (FileNotFoundError, NotADirectoryError):
                self._names[key] = frozenset()
                self.absent.add(key)
        return self._names[key]

    def exists(self, path: str | Path) -> bool:
        folder, name = os.path.split(os.fspath(path))
        return name in self.names(folder)


@dataclass
class ImageCheck:
    """Existence of every referenced image file; what is missing and where it is referenced."""

    listing: FolderListing = field(default_factory=FolderListing)
    checked: set[str] = field(default_factory=set)
    missing: dict[str, str] = field(default_factory=dict)  # path -> first place referring to it

    def ok(self, image: ImageRef | None, where: str) -> bool:
        if image is None:
            return True
        path = os.fspath(image.path)
        self.checked.add(path)
        if self.listing.exists(path):
            return True
        self.missing.setdefault(path, where)
        return False

    def report(self, source: str) -> str:
        examples = "; ".join(
            f"{path} ({where})" for path, where in list(self.missing.items())[:MISSING_EXAMPLES]
        )
        folders = sorted({os.path.dirname(path) for path in self.missing})
        absent = [folder for folder in folders if folder in self.listing.absent]
        note = f"; folder(s) not found: {', '.join(absent[:3])}" if absent else ""
        return (
            f"{source}: {len(self.missing)} of {len(self.checked)} referenced image files are "
            f"missing, e.g. {examples}{note}. The data root is incomplete: fix the image "
            "folder setting or pass allow_missing=True to evaluate without them (the count is "
            "recorded in the results)"
        )


@dataclass(frozen=True)
class CheckedImages:
    """Queries and gallery with images that could be found, and what was dropped."""

    queries: tuple[EvalQuery, ...]
    gallery: tuple[Candidate, ...]
    counts: dict[str, Any]  # dropped_* counts, and `dropped_query_ids` (a few examples)


def verify_images(
    queries: Sequence[EvalQuery],
    gallery: Sequence[Candidate],
    source: str,
    settings: Mapping[str, Any],
    required: Sequence[tuple[ImageRef, str]] = (),
) -> CheckedImages:
    """Check that every image that `queries` and `gallery` refer to exists.

    Missing files raise a `BenchmarkDataError` (count and examples, each with the
    query or gallery item that refers to it) unless `settings["allow_missing"]`;
    then gallery items and candidates without their image are dropped, and so is a
    query whose own image or first (correct) candidate is missing. A missing target
    of a shared gallery stays a target: it counts as a miss. `required` are other
    images that must exist (with where they are referenced); nothing is dropped for them."""
    if not settings["check_images"]:
        counts: dict[str, Any] = {"missing_images": None}
        return CheckedImages(tuple(queries), tuple(gallery), counts)
    check = ImageCheck()
    for image, where in required:
        check.ok(image, where)
    kept = keep_images(queries, gallery, check.ok)
    if check.missing and not settings["allow_missing"]:
        raise BenchmarkDataError(check.report(source))
    counts = {"missing_images": len(check.missing), **kept.counts}
    return CheckedImages(kept.queries, kept.gallery, counts)


def keep_images(
    queries: Sequence[EvalQuery],
    gallery: Sequence[Candidate],
    ok: Callable[[ImageRef | None, str], bool],
) -> CheckedImages:
    """The queries and gallery items whose images pass `ok(image, where)`, dropped as
    `verify_images` says; `counts` has `dropped_queries`, `_gallery` and `_candidates`."""
    kept_queries, dropped_candidates = [], 0
    for query in queries:
        query_ok = ok(query.image, f"query {query.id!r} reference image")
        where = f"query {query.id!r} candidate"
        candidates = tuple(c for c in query.candidates if ok(c.image, f"{where} {c.id!r}"))
        first_ok = not query.candidates or candidates[:1] == query.candidates[:1]
        if query_ok and first_ok:
            dropped_candidates += len(query.candidates) - len(candidates)
            kept_queries.append(_with_candidates(query, candidates))
    kept_gallery = tuple(c for c in gallery if ok(c.image, f"gallery item {c.id!r}"))
    kept_ids = {query.id for query in kept_queries}
    dropped_ids = [query.id for query in queries if query.id not in kept_ids]
    counts: dict[str, Any] = {
        "dropped_query_ids": dropped_ids[:MISSING_EXAMPLES],
        "dropped_queries": len(queries) - len(kept_queries),
        "dropped_gallery": len(gallery) - len(kept_gallery),
        "dropped_candidates": dropped_candidates,
    }
    return CheckedImages(tuple(kept_queries), kept_gallery, counts)


def drop_images(task: EvalTask, bad: Collection[ImageRef]) -> EvalTask:
    """`task` without the items whose image is in `bad` (dropped as `verify_images` drops
    missing ones), the counts added to its settings (`undecodable_images`, `dropped_*`)."""
    refs = set(bad)

    def ok(image: ImageRef | None, where: str) -> bool:
        return image is None or image not in refs

    kept = keep_images(task.queries, task.gallery, ok)
    settings = dict(task.settings)
    used = {image for query in task.queries for image in _images(query)}
    used |= {item.image for item in task.gallery if item.image is not None}
    settings["undecodable_images"] = len(refs & used)
    for name, count in kept.counts.items():
        if isinstance(count, list):  # examples
            settings[name] = [*(settings.get(name) or []), *count][:MISSING_EXAMPLES]
        else:
            settings[name] = (settings.get(name) or 0) + (count or 0)
    if "gallery_size" in settings:
        settings["gallery_size"] = len(kept.gallery)
    return replace(task, queries=kept.queries, gallery=kept.gallery, settings=settings)


def _images(query: EvalQuery) -> Iterator[ImageRef]:
    if query.image is not None:
        yield query.image
    yield from (c.image for c in query.candidates if c.image is not None)


def with_instruction(queries: Sequence[EvalQuery], instruction: str | None) -> list[EvalQuery]:
    """`queries` carrying the `instruction` setting (unchanged when it is None)."""
    if instruction is None:
        return list(queries)
    return [replace(query, instruction=instruction) for query in queries]


def _with_candidates(query: EvalQuery, candidates: tuple[Candidate, ...]) -> EvalQuery:
    return query if candidates == query.candidates else replace(query, candidates=candidates)


def recorded(settings: Mapping[str, Any], data_root: Path, **extra: Any) -> dict[str, Any]:
    """The settings as they go into `EvalTask.settings`: JSON-friendly, with the data root."""
    record = {key: _plain(value) for key, value in settings.items()}
    record["data_root"] = str(data_root)
    record.update({key: _plain(value) for key, value in extra.items()})
    return record


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value
