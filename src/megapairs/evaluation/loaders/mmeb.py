"""MMEB (Massive Multimodal Embedding Benchmark): 36 datasets of evaluation rows.

Each row is `qry_text` (the task instruction, with an image token such as
"<|image_1|>" where the query has an image), `qry_img_path` (may be empty),
`tgt_text` and `tgt_img_path` (candidate lists of equal length; paths may be
empty). The correct candidate is index 0. A dataset is read from the first of:

    {data_root}/{dataset}.jsonl
    {data_root}/{dataset}.parquet
    {data_root}/{dataset}/{split}-*.parquet      TIGER-Lab/MMEB-eval as downloaded
    {data_root}/{dataset}/{split}/*.parquet      its parquet-converter branch

with image paths relative to `{data_root}/images/` (`image_folder`; the
MMEB-eval images.zip unpacked there). One task per dataset, `mmeb/{dataset}`;
`datasets` picks any subset (default: all 36; a missing one is an error unless
`allow_missing`, which records it as `missing_datasets`).

Query and candidate texts are the row's texts with the image token removed and
whitespace stripped (None when nothing is left). The row's text is instruction
and content in one string, which cannot be split reliably, so it all goes to
`EvalQuery.text` and `instruction` stays None (unless the `instruction` setting
gives one); the original is kept in
`meta["raw_text"]` (with the token) for retrievers that place the image where
the token was. Candidate ids hash (image path, text), so a candidate shared by
many rows (a class name) has one id; query ids are row positions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs.evaluation.loaders.base import (
    LOADERS,
    Entry,
    LoaderSettings,
    check_split,
    recorded,
    resolve_path,
    resolve_settings,
    unique_ids,
    verify_images,
    with_instruction,
)
from megapairs.evaluation.types import BenchmarkDataError, Candidate, EvalQuery, EvalTask, ImageRef

SPLITS = ("test",)
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

_GROUPS = {
    ("classification", "IND"): "ImageNet-1K N24News HatefulMemes VOC2007 SUN397",
    ("classification", "OOD"): "Place365 ImageNet-A ImageNet-R ObjectNet Country211",
    ("vqa", "IND"): "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W",
    ("vqa", "OOD"): "ScienceQA VizWiz GQA TextVQA",
    ("retrieval", "IND"): "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t "
    "NIGHTS WebQA",
    ("retrieval", "OOD"): "OVEN FashionIQ EDIS Wiki-SS-NQ",
    ("grounding", "IND"): "MSCOCO",
    ("grounding", "OOD"): "RefCOCO RefCOCO-Matching Visual7W-Pointing",
}
DATASETS: dict[str, tuple[str, str]] = {
    name: group for group, names in _GROUPS.items() for name in names.split()
}
"""The 36 MMEB datasets -> (meta-task, "IND" or "OOD"): 20 in-distribution, 16 out."""


class Settings(LoaderSettings):
    """MMEB's settings (paths relative to the data root)."""

    datasets: str | tuple[str, ...] | None = None  # None: all 36
    image_folder: str = "images"
    image_token: str = "<|image_1|>"


@LOADERS.register("mmeb")
def load_mmeb(data_root: Path, split: str, settings: Mapping[str, Any]) -> list[EvalTask]:
    """One task per dataset, `mmeb/{dataset}`, each row with its own candidates."""
    check_split("mmeb", split, SPLITS)
    config = resolve_settings("mmeb", Settings, settings)
    names = _dataset_names(config["datasets"])
    found = {name: _dataset_files(data_root, name, split) for name in names}
    missing = [name for name, files in found.items() if not files]
    if missing and not config["allow_missing"]:
        raise BenchmarkDataError(
            f"{data_root}: MMEB datasets not found: {', '.join(missing)} (looked for "
            f"{{name}}.jsonl, {{name}}.parquet, {{name}}/{split}-*.parquet, "
            f"{{name}}/{split}/*.parquet); pass allow_missing=True to evaluate the others"
        )
    folder = resolve_path(data_root, config["image_folder"])
    config = {**config, "missing_datasets": missing}
    return [
        _dataset_task(data_root, split, name, files, folder, config)
        for name, files in found.items()
        if files
    ]


def _dataset_names(datasets: Any) -> list[str]:
    if datasets is None:
        return list(DATASETS)
    names = [datasets] if isinstance(datasets, str) else list(datasets)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"mmeb datasets should be a list of dataset names, got {datasets!r}")
    return names


def _dataset_files(data_root: Path, name: str, split: str) -> list[Path]:
    for single in (data_root / f"{name}.jsonl", data_root / f"{name}.parquet"):
        if single.is_file():
            return [single]
    folder = data_root / name
    return sorted(folder.glob(f"{split}-*.parquet")) or sorted((folder / split).glob("*.parquet"))


def _dataset_task(
    data_root: Path,
    split: str,
    name: str,
    files: list[Path],
    folder: Path,
    config: Mapping[str, Any],
) -> EvalTask:
    token = config["image_token"]
    queries = [
        _query(entry, str(position), folder, token)
        for position, entry in enumerate(entry for path in files for entry in _rows(path))
    ]
    queries = with_instruction(queries, config["instruction"])
    checked = verify_images(queries, (), ", ".join(map(str, files)), config)
    meta_task, distribution = DATASETS.get(name, (None, None))
    settings_record = recorded(
        {**config, "dataset": name, "meta_task": meta_task, "distribution": distribution},
        data_root,
        annotation_file=files,
    )
    settings_record.update(checked.counts)
    return EvalTask(
        benchmark="mmeb",
        name=f"mmeb/{name}",
        split=split,
        queries=checked.queries,
        settings=settings_record,
    )


def _rows(path: Path) -> Iterator[Entry]:
    return _jsonl_rows(path) if path.suffix == ".jsonl" else _parquet_rows(path)


def _jsonl_rows(path: Path) -> Iterator[Entry]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkDataError(
                    f"{path}: line {number}: malformed JSON at column {error.colno}: {error.msg}"
                ) from None
            if not isinstance(record, dict):
                raise BenchmarkDataError(f"{path}: line {number}: should be a JSON object")
            yield Entry(path, number, record, unit="line")


def _parquet_rows(path: Path) -> Iterator[Entry]:
    try:
        present = set(pq.read_schema(path).names)
        missing = [column for column in COLUMNS if column not in present]
        if missing:
            raise BenchmarkDataError(f"{path}: missing column(s) {missing}")
        table = pq.read_table(path, columns=list(COLUMNS))
    except (pa.ArrowException, OSError) as error:
        raise BenchmarkDataError(f"{path}: unreadable Parquet file: {error}") from None
    for index, record in enumerate(table.to_pylist()):
        yield Entry(path, index, record, unit="row")


def _query(entry: Entry, query_id: str, folder: Path, token: str) -> EvalQuery:
    raw_text = entry.get("qry_text", str)
    image_path = entry.optional("qry_img_path", str) or ""
    texts = entry.items("tgt_text", str, min_len=1)
    paths = [path or "" for path in entry.items("tgt_img_path", (str, type(None)))]
    if len(paths) != len(texts):
        raise entry.error(f"tgt_text has {len(texts)} candidates but tgt_img_path {len(paths)}")
    query = _item(entry, "query", raw_text, image_path, folder, token)
    candidates = [
        _item(entry, f"candidate {i}", text, path, folder, token)
        for i, (text, path) in enumerate(zip(texts, paths, strict=True))
    ]
    ids = unique_ids([_candidate_id(path, text) for text, path in zip(texts, paths, strict=True)])
    return EvalQuery(
        id=query_id,
        image=query[1],
        text=query[0],
        targets=(ids[0],),
        candidates=tuple(
            Candidate(id=i, image=image, text=text)
            for i, (text, image) in zip(ids, candidates, strict=True)
        ),
        meta={"raw_text": raw_text},
    )


def _item(
    entry: Entry, what: str, raw_text: str, image_path: str, folder: Path, token: str
) -> tuple[str | None, ImageRef | None]:
    text = raw_text.replace(token, "").strip() or None
    image = ImageRef(folder / image_path) if image_path else None
    if text is None and image is None:
        raise entry.error(f"{what} has neither a text nor an image")
    return text, image


def _candidate_id(image_path: str, raw_text: str) -> str:
    return hashlib.sha1(f"{image_path}\n{raw_text}".encode()).hexdigest()[:16]
