"""Dataset validation: a clean export, planted problems, the released layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_fixtures import FixtureRun, build_run, fixture_config

from megapairs.dataset.export import ExportStage
from megapairs.dataset.validate import format_report, validate_dataset
from megapairs.pipeline.runner import LocalRunner

RELEASED = ["q_img", "q_text", "t_img", "hns"]
MISSING = "images/part-00000/404.jpg"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> FixtureRun:
    fixture = build_run(tmp_path_factory.mktemp("validate"))
    config = fixture_config()
    LocalRunner(fixture.run, config, progress=False).run_all([ExportStage(config)])
    return fixture


def dataset(fixture: FixtureRun) -> Path:
    return fixture.run.root / "dataset"


def clean_rows(fixture: FixtureRun) -> list[dict]:
    """The 5 exported rows, part-00000 then part-00001."""
    parts = sorted(dataset(fixture).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()


def broken_rows(fixture: FixtureRun) -> list[dict]:
    """One planted problem per row (see EXPECTED)."""
    rows = clean_rows(fixture)
    rows[0]["q_img"] = rows[0]["hns"][0] = MISSING
    rows[1]["hns"] = [*rows[1]["hns"], rows[1]["t_img"]]
    rows[2]["q_text"] = rows[2]["q_text"][:2]
    rows[3]["q_text"][1] = "   "
    rows[4]["hns"] = rows[4]["hns"][1:]
    return [*rows, dict(clean_rows(fixture)[2])]  # row 5 repeats row 2's pair


EXPECTED = {
    ("missing_image", 0, "q_img"),
    ("missing_image", 0, "hns"),
    ("target_in_negatives", 1, "hns"),
    ("few_instructions", 2, "q_text"),
    ("empty_instruction", 3, "q_text"),
    ("query_not_first", 4, "hns"),
    ("duplicate_pair", 5, "t_img"),
}


def found(report) -> set[tuple]:
    return {(p.kind, p.row, p.column) for p in report.problems}


def test_a_clean_export_has_no_problem(exported: FixtureRun) -> None:
    report = validate_dataset(dataset(exported))
    assert report.ok, format_report(report)
    assert report.rows == 5 and report.images_checked == 8 and report.images_missing == 0
    assert report.files == ["part-00000.parquet", "part-00001.parquet"]
    assert report.twins == ["part-00000.jsonl", "part-00001.jsonl"]
    assert format_report(report).endswith(": OK")


def test_each_planted_problem_is_found_at_its_row(exported: FixtureRun, tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(broken_rows(exported)), path)
    report = validate_dataset(path, image_root=dataset(exported))
    assert found(report) == EXPECTED
    assert report.rows == 6 and report.images_missing == 1
    assert all(p.file == "broken.parquet" for p in report.problems)
    duplicate = next(p for p in report.problems if p.kind == "duplicate_pair")
    assert "broken.parquet row 2" in duplicate.message
    text = format_report(report, limit=3)
    assert "7 problems" in text and "broken.parquet row 0 q_img:" in text
    assert "... and 4 more" in text


def test_jsonl_problems_have_the_same_rows(exported: FixtureRun, tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(row) for row in broken_rows(exported)]
    first, second = clean_rows(exported)[:2]  # (0.jpg, 1.png), (0.jpg, 1000001.gif)
    lines += ["", "not json", json.dumps({**second, "q_text": "one string"})]
    lines.append(json.dumps({**first, "hns": [first["q_img"], None]}))
    path.write_text("\n".join(lines) + "\n")
    report = validate_dataset(path, image_root=dataset(exported))
    extra = {
        ("invalid_json", 6, None),  # the blank line before it is not a row
        ("wrong_type", 7, "q_text"),
        ("duplicate_pair", 7, "t_img"),  # of row 1, whose hns alone was broken
        ("null_value", 8, "hns"),
    }
    assert found(report) == EXPECTED | extra


def test_a_missing_column_is_a_file_problem(exported: FixtureRun, tmp_path: Path) -> None:
    table = pa.Table.from_pylist(clean_rows(exported)).drop_columns(["t_img"])
    pq.write_table(table, tmp_path / "no-target.parquet")
    table = pa.Table.from_pylist(clean_rows(exported))
    table = table.set_column(0, "q_img", pa.array([1, 2, 3, 4, 5]))
    pq.write_table(table, tmp_path / "wrong-type.parquet")
    report = validate_dataset(tmp_path, image_root=dataset(exported))
    assert found(report) == {("missing_column", None, "t_img"), ("wrong_type", None, "q_img")}
    assert report.rows == 10


def test_the_released_layout_validates_against_an_image_root(
    exported: FixtureRun, tmp_path: Path
) -> None:
    images = tmp_path / "images-elsewhere"
    shutil.copytree(dataset(exported) / "images", images / "images")
    released = tmp_path / "released" / "data"
    released.mkdir(parents=True)
    table = pa.Table.from_pylist(clean_rows(exported)).select(RELEASED)
    pq.write_table(table.slice(0, 3), released / "train-00000.parquet")
    pq.write_table(table.slice(3), released / "train-00001.parquet")
    report = validate_dataset(released.parent, image_root=images)
    assert report.ok, format_report(report)
    assert report.rows == 5 and report.files == [
        "data/train-00000.parquet",
        "data/train-00001.parquet",
    ]
    unresolved = validate_dataset(released.parent)  # images are not beside the data
    assert unresolved.images_missing == 8 and set(unresolved.counts) == {"missing_image"}


def test_minimum_instructions_is_configurable(exported: FixtureRun) -> None:
    report = validate_dataset(dataset(exported), min_instructions=4)
    assert {(p.file, p.row) for p in report.problems} == {
        ("part-00000.parquet", 0),
        ("part-00000.parquet", 2),
        ("part-00001.parquet", 1),
    }


def test_a_jsonl_twin_with_other_rows_is_reported(exported: FixtureRun, tmp_path: Path) -> None:
    copy = tmp_path / "dataset"
    shutil.copytree(dataset(exported), copy, ignore=shutil.ignore_patterns("images"))
    twin = copy / "part-00001.jsonl"
    twin.write_text(twin.read_text().splitlines()[0] + "\n")
    report = validate_dataset(copy, check_images=False)
    assert found(report) == {("twin_mismatch", None, None)}
    assert report.problems[0].file == "part-00001.jsonl"


def test_an_empty_dataset_is_a_problem_unless_allowed(exported: FixtureRun, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    report = validate_dataset(empty)
    assert found(report) == {("empty", None, None)}
    assert "the dataset is empty (no data files)" in format_report(report)
    assert "--allow-empty" in str(report.problems[0])
    schema = pq.read_schema(dataset(exported) / "part-00000.parquet")
    pq.write_table(schema.empty_table(), empty / "part-00000.parquet")
    report = validate_dataset(empty)
    assert report.problems[0].message.startswith("the dataset is empty (1 data files but no rows)")
    allowed = validate_dataset(empty, allow_empty=True)
    assert allowed.ok and allowed.rows == 0
