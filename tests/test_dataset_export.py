"""The `export` stage on the fixture run (tests/run_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_fixtures import INSTRUCTIONS, PAIRS, RECORDS, FixtureRun, build_run, fixture_config

from megapairs.config import PipelineConfig
from megapairs.dataset.export import (
    INFO_FILE,
    ExportError,
    ExportStage,
    image_extension,
    image_relpath,
)
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    DATASET_SCHEMA,
    PART_STRIDE,
)


def export(fixture: FixtureRun, config: PipelineConfig | None = None) -> StageResult:
    config = config or fixture_config()
    [result] = LocalRunner(fixture.run, config, progress=False).run_all([ExportStage(config)])
    return result


def dataset(fixture: FixtureRun) -> Path:
    return fixture.run.root / "dataset"


def read_part(fixture: FixtureRun, part: str) -> pa.Table:
    return pq.read_table(dataset(fixture) / f"{part}.parquet")


def test_extensions_follow_the_source_format() -> None:
    assert [image_extension(f) for f in ("JPEG", "png", "MPO", "TIFF", "AVIF", None)] == [
        "jpg",
        "png",
        "jpg",
        "tiff",
        "bin",
        "bin",
    ]
    assert image_relpath(PART_STRIDE + 17, "WEBP") == "images/part-00001/1000017.webp"


def test_copy_exports_annotated_pairs_with_original_image_bytes(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    result = export(fixture)
    assert result.counts["rows"] == 5 and result.counts["failed"] == 2
    # 8 distinct images: the stored one copied, 7 hard-linked to their source files
    images = sorted((fixture.run.root / "dataset" / "images").rglob("*.*"))
    assert len(images) == 8
    assert sorted(path.stat().st_nlink for path in images) == [1] + [2] * 7
    for part in fixture.parts:
        table = read_part(fixture, part)
        assert table.schema == DATASET_SCHEMA
        assert table["pair_id"].to_pylist() == fixture.annotated[part]  # pairs order, no failed
        for row in table.to_pylist():
            check_row(fixture, row)
    exported = {p.name for p in (dataset(fixture) / "images").rglob("*.*")}
    assert exported == {f"{rid}.{image_extension(RECORDS[rid][0])}" for rid in RECORDS} - {
        "4.png"  # only in a failed pair
    }


def check_row(fixture: FixtureRun, row: dict) -> None:
    q, t, negatives = row["query_id"], row["target_id"], row["hard_negative_ids"]
    expected = [image_relpath(i, RECORDS[i][0]) for i in (q, t, *negatives)]
    assert [row["q_img"], row["t_img"], *row["hns"][1:]] == expected
    assert row["hns"][0] == row["q_img"]
    assert row["q_text"] == INSTRUCTIONS[row["pair_id"]]
    assert (row["q_caption"], row["t_caption"]) == (RECORDS[q][1], RECORDS[t][1])
    assert row["backend"] == "template" and row["seed"] == 7
    for image_id, path in zip((q, t, *negatives), expected, strict=True):
        assert (dataset(fixture) / path).read_bytes() == fixture.image_bytes[image_id]


def test_reference_export_names_the_source_files(tmp_path: Path) -> None:
    fixture = build_run(tmp_path, store=False)
    result = export(fixture, fixture_config(images="reference"))
    assert result.counts["rows"] == 5
    assert not (dataset(fixture) / "images").exists()
    for part in fixture.parts:
        for row in read_part(fixture, part).to_pylist():
            ids = (row["query_id"], row["target_id"], row["query_id"], *row["hard_negative_ids"])
            paths = [row["q_img"], row["t_img"], *row["hns"]]
            assert paths == [str(fixture.source_path(i)) for i in ids]
            assert all(Path(p).is_absolute() for p in paths)


def test_reference_export_refuses_images_stored_only_in_the_run(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    with pytest.raises(ExportError, match=r"stored only|image store.*export\.images=copy"):
        export(fixture, fixture_config(images="reference"))


def test_resume_rewrites_only_the_unfinished_part(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture)
    folder = dataset(fixture)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    info_before = json.loads((folder / INFO_FILE).read_text())
    content = read_part(fixture, "part-00001")
    # a crash in part-00001 before its marker: its shard gone, no marker
    (folder / "part-00001.parquet").unlink()
    (fixture.run.root / "_progress" / "export" / "part-00001.json").unlink()
    result = export(fixture)
    assert result.computed == 1
    assert read_part(fixture, "part-00001").equals(content)
    for path, stamp in before.items():
        same = (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
        rewritten = path.name.startswith("part-00001") or path.name == INFO_FILE
        assert same != rewritten, path
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["counts"] == info_before["counts"] and info["complete"]


def test_a_deleted_shard_is_exported_again(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture)
    (dataset(fixture) / "part-00000.jsonl").unlink()  # marker kept
    result = export(fixture)
    assert result.computed == 1 and (dataset(fixture) / "part-00000.jsonl").exists()
    assert export(fixture).computed == 0


def test_a_part_annotated_again_is_exported_again(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture)
    # the annotate stage retried part-00001's failure and annotated it this time
    run, part = fixture.run, "part-00001"
    annotations = pq.read_table(run.part_path(ANNOTATIONS_DIR, part))
    retried = {**annotations.to_pylist()[0], "pair_id": f"{PART_STRIDE + 2}-0"}
    retried |= {"query_id": PART_STRIDE + 2, "target_id": 0}
    rows = [*annotations.to_pylist(), retried]
    pq.write_table(
        pa.Table.from_pylist(rows, ANNOTATIONS_SCHEMA), run.part_path(ANNOTATIONS_DIR, part)
    )
    failures = run.part_path(ANNOTATION_FAILURES_DIR, part)
    pq.write_table(pq.read_table(failures).slice(0, 0), failures)
    result = export(fixture)
    assert result.computed == 1 and result.counts["rows"] == 6 and result.counts["failed"] == 1
    assert read_part(fixture, part)["pair_id"].to_pylist() == [
        f"{PART_STRIDE}-{PART_STRIDE + 1}",
        f"{PART_STRIDE + 2}-0",
        f"{PART_STRIDE + 3}-{PART_STRIDE + 2}",
    ]
    assert (dataset(fixture) / image_relpath(4, "PNG")).read_bytes() == fixture.image_bytes[4]


def test_dataset_info_describes_the_finished_parts(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    marker = fixture.run.root / "_progress" / "annotate" / "part-00001.json"
    saved = marker.read_text()
    marker.unlink()  # annotation has finished part-00000 only
    export(fixture)
    info = json.loads((dataset(fixture) / INFO_FILE).read_text())
    assert info["complete"] is False and info["pending_parts"] == ["part-00001"]
    assert info["counts"]["rows"] == 3 and info["files"] == [
        "part-00000.parquet",
        "part-00000.jsonl",
    ]
    marker.write_text(saved)
    assert export(fixture).computed == 1
    info = json.loads((dataset(fixture) / INFO_FILE).read_text())
    assert info["complete"] is True and info["pending_parts"] == []
    assert info["counts"]["rows"] == 5 and list(info["parts"]) == ["part-00000", "part-00001"]
    assert info["columns"] == DATASET_SCHEMA.names and info["image_root"] == "."
    assert info["config"]["export"] == {
        "images": "copy",
        "jsonl": True,
        "filter": {
            "max_rank": 0,
            "min_margin": None,
            "drop_shortcuts": "none",
            "drop_false_negatives": False,
            "require_judge": False,
            "min_instructions": None,
        },
    }
    assert info["scored_parts"] == [] and "score" not in info["config"]


def test_jsonl_holds_the_same_rows_as_parquet(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture)
    for part in fixture.parts:
        lines = (dataset(fixture) / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        assert list(rows[0]) == DATASET_SCHEMA.names
        assert pa.Table.from_pylist(rows, DATASET_SCHEMA).equals(read_part(fixture, part))


def test_jsonl_is_optional(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture, fixture_config(jsonl=False))
    assert not list(dataset(fixture).glob("*.jsonl"))


def test_export_loads_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    fixture = build_run(tmp_path)
    export(fixture)
    files = sorted(str(p) for p in dataset(fixture).glob("part-*.parquet"))
    loaded = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == 5
    assert loaded.column_names == DATASET_SCHEMA.names
    first = loaded[0]
    assert first["q_text"] == INSTRUCTIONS["0-1"]
    assert all(isinstance(text, str) for row in loaded["q_text"] for text in row)
    assert first["hns"][0] == first["q_img"]


def test_export_refuses_a_part_that_lost_pairs(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    failures = fixture.run.part_path(ANNOTATION_FAILURES_DIR, "part-00001")
    pq.write_table(pq.read_table(failures).slice(0, 0), failures)
    with pytest.raises(ExportError, match=r"3 pairs but 2 annotations .* 0 failures"):
        export(fixture)


def test_export_refuses_a_source_image_changed_since_ingest(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    source = fixture.source_path(1)
    assert source is not None
    source.write_bytes(fixture.image_bytes[1] + b"tail")
    with pytest.raises(ExportError, match=r"record 1 .* changed since ingest"):
        export(fixture)


def test_every_pair_of_the_fixture_is_exported_or_failed(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture)
    exported = {r for p in fixture.parts for r in read_part(fixture, p)["pair_id"].to_pylist()}
    failed = {r for p in fixture.parts for r in fixture.failed[p]}
    every = {f"{q}-{t}" for pairs in PAIRS.values() for q, t, *_ in pairs}
    assert exported | failed == every and not exported & failed


def test_export_refuses_records_missing_from_the_corpus(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    (fixture.run.root / "_progress" / "ingest" / "part-00001.json").unlink()
    with pytest.raises(ExportError, match=r"records \[1000000, .*not in any finished corpus"):
        export(fixture)
