"""Self-repair of partial files: an unreadable annotation cache chunk or part output is
moved to `<run>/quarantine/` and what it held is computed (or asked) again."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from run_fixtures import build_run

from megapairs.annotation.cache import AnswerCache, CacheKey
from megapairs.annotation.stage import AnnotateStage
from megapairs.annotation.types import Completion
from megapairs.config import PipelineConfig
from megapairs.pipeline.report import print_stage_results
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.pipeline.stage import StageBase
from megapairs.runs import RunDir, read_table, write_table
from megapairs.schemas import ANNOTATION_CACHE_DIR, ANNOTATIONS_DIR

KEY = CacheKey("v1", "describer", "instructor", 7, "digest")


def truncate(path: Path) -> None:
    """Cut a file in half, as a crash of a non-atomic writer would leave it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_quarantine_keeps_the_path_within_the_run_and_never_overwrites(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for content in (b"first", b"second"):
        path = run.part_path("pairs", "part-00000")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        moved = run.quarantine(path)
        assert not path.exists() and moved.read_bytes() == content
    quarantine = tmp_path / "quarantine" / "pairs"
    assert sorted(p.name for p in quarantine.iterdir()) == [
        "part-00000.parquet",
        "part-00000.parquet~1",
    ]


def test_a_truncated_cache_chunk_is_quarantined_and_its_answers_asked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(tmp_path)
    cache = AnswerCache(run, "part-00000", KEY, flush_every=1)
    cache.put("0-1", "describe", Completion("two red cubes"))
    cache.put("0-2", "describe", Completion("a blue ball"))  # chunk-00001
    chunk = tmp_path / ANNOTATION_CACHE_DIR / "part-00000" / "chunk-00001.parquet"
    truncate(chunk)
    with caplog.at_level(logging.WARNING, "megapairs"):
        again = AnswerCache(run, "part-00000", KEY, flush_every=1)
    assert again.get("0-1", "describe") == Completion("two red cubes")
    assert again.get("0-2", "describe") is None  # sent again
    assert again.quarantined == 1 and again.next_chunk == 2  # no chunk number reused
    moved = tmp_path / "quarantine" / ANNOTATION_CACHE_DIR / "part-00000" / "chunk-00001.parquet"
    assert moved.exists() and not chunk.exists()
    assert f"annotation cache chunk {chunk} does not open" in caplog.text
    assert f"moved to {moved}" in caplog.text
    assert AnswerCache(run, "part-00000", KEY, flush_every=1).quarantined == 0  # once


@dataclass
class TablesStage(StageBase):
    """Writes tables/part-i.parquet; declares its output folder."""

    name: str = "tables"
    config_sections: tuple[str, ...] = ("mine",)
    output_dirs: tuple[str, ...] = ("tables",)

    def plan(self, run):
        return [f"part-{i:05d}" for i in range(3)]

    def run_part(self, run, part, state, progress):
        write_table(run.part_path("tables", part), pa.table({"part": [part] * 100}))
        return {"rows": 100}


def test_an_unreadable_part_output_is_quarantined_and_the_part_redone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(tmp_path)
    LocalRunner(run, PipelineConfig(), progress=False).run_all([TablesStage()])
    broken = run.part_path("tables", "part-00001")
    truncate(broken)
    with caplog.at_level(logging.WARNING, "megapairs"):
        result = LocalRunner(run, PipelineConfig(), progress=False).run_all([TablesStage()])[0]
    assert (result.quarantined, result.computed, result.counts) == (1, 1, {"rows": 300})
    assert read_table(broken)["part"].to_pylist() == ["part-00001"] * 100
    moved = tmp_path / "quarantine" / "tables" / "part-00001.parquet"
    assert moved.exists()
    assert f"tables part-00001: {broken} does not open as Parquet; moved to {moved}" in caplog.text
    again = LocalRunner(run, PipelineConfig(), progress=False).run_all([TablesStage()])[0]
    assert (again.quarantined, again.computed) == (0, 0)


def test_the_annotate_stage_redoes_a_part_whose_annotations_do_not_open(tmp_path: Path) -> None:
    fixture = build_run(tmp_path, annotate=False)
    config = PipelineConfig.model_validate({"seed": 7})
    LocalRunner(fixture.run, config, progress=False).run_all([AnnotateStage(config, False)])
    path = fixture.run.part_path(ANNOTATIONS_DIR, "part-00001")
    expected = read_table(path)
    truncate(path)
    runner = LocalRunner(fixture.run, config, progress=False)
    result = runner.run_all([AnnotateStage(config, False)])[0]
    assert (result.quarantined, result.computed) == (1, 1)
    assert read_table(path).equals(expected)
    assert (tmp_path / "run" / "quarantine" / ANNOTATIONS_DIR / "part-00001.parquet").exists()


def test_the_summary_says_how_many_files_were_quarantined(capsys) -> None:
    result = StageResult("annotate", {"pairs": 7}, parts=2, computed=1, quarantined=2)
    assert print_stage_results([result], "runs/x") == 0
    err = capsys.readouterr().err
    assert (
        "warning: annotate: quarantined 2 unreadable files (moved to runs/x/quarantine); "
        "their parts were computed again"
    ) in err
