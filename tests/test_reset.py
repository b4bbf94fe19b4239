"""`megapairs reset`: a stage's outputs, markers and manifest entry go, with those of every
later stage that depends on it; the other channels and earlier stages stay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from run_fixtures import FixtureRun, build_run, fixture_config

from megapairs.annotation.stage import AnnotateStage
from megapairs.cli import main
from megapairs.config import PipelineConfig
from megapairs.dataset.export import ExportStage
from megapairs.pipeline.lock import LOCK_FILE, RunLocked
from megapairs.pipeline.reset import reset_stage, stages_to_reset
from megapairs.pipeline.runner import LocalRunner, StageConfigChanged
from megapairs.runs import RunDir, write_json, write_table
from megapairs.schemas import (
    ANNOTATION_CACHE_DIR,
    ANNOTATION_FAILURES_DIR,
    ANNOTATIONS_DIR,
    CORPUS_DIR,
    DATASET_DIR,
    PAIRS_DIR,
)

CHANNEL_STAGES = ["embed.a", "embed.b", "neighbours.a", "neighbours.b"]


@pytest.fixture
def annotated(tmp_path: Path) -> FixtureRun:
    """The fixture run, annotated by the template backend and exported."""
    fixture = build_run(tmp_path, annotate=False)
    config = fixture_config()
    stages = [AnnotateStage(config, False), ExportStage(config)]
    LocalRunner(fixture.run, config, progress=False).run_all(stages)
    return fixture


def test_reset_annotate_clears_it_and_export_but_not_the_pairs(annotated: FixtureRun) -> None:
    run = annotated.run
    done = {item.stage: item for item in reset_stage(run, "annotate")}
    assert set(done) == {"annotate", "score", "export"}  # score: nothing of it to delete
    assert done["annotate"].markers == 2 and done["annotate"].recorded
    assert done["annotate"].files >= 4  # 2 annotation, 2 failure tables, cache chunks
    assert done["export"].markers == 2 and done["export"].files > 2
    for folder in (ANNOTATIONS_DIR, ANNOTATION_FAILURES_DIR, ANNOTATION_CACHE_DIR, DATASET_DIR):
        assert not run.folder(folder).exists()
    assert run.done_parts("annotate") == run.done_parts("export") == []
    assert set(run.read_manifest()["stages"]) == set()
    assert run.done_parts("mine") == annotated.parts and run.folder(PAIRS_DIR).exists()
    assert run.folder(CORPUS_DIR).exists()
    assert not (run.root / LOCK_FILE).exists()


def test_a_changed_config_names_its_sections_and_reset_lets_it_run(annotated: FixtureRun) -> None:
    run = annotated.run
    changed = PipelineConfig.model_validate(
        {"seed": 7, "annotate": {"word_range": [50, 90], "describer": {"temperature": 0.3}}}
    )
    with pytest.raises(StageConfigChanged) as refused:
        LocalRunner(run, changed, progress=False).run_all([AnnotateStage(changed, False)])
    assert str(refused.value) == (
        f"stage 'annotate' in {run.uri} was run with another config (annotate.word_range, "
        "annotate.describer.temperature changed); to run it again with this config, clear it "
        f"and the stages after it: megapairs reset --run {run.uri} --stage annotate; "
        "or use a new run directory"
    )
    reset_stage(run, "annotate")
    result = LocalRunner(run, changed, progress=False).run_all([AnnotateStage(changed, False)])[0]
    assert result.computed == result.parts == 2


def test_the_cli_prints_what_it_deleted(annotated: FixtureRun, capsys) -> None:
    root = str(annotated.run.root)
    files = sum(p.is_file() for p in annotated.run.folder(DATASET_DIR).rglob("*"))
    assert main(["reset", "--run", root, "--stage", "export", "--yes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"reset export in {root}:",
        f"  export                   deleted {files} files, 2 part markers, manifest entry",
    ]
    assert main(["reset", "--run", root, "--stage", "export"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "  nothing to delete"


def test_an_unknown_stage_or_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    assert main(["reset", "--run", str(tmp_path / "run"), "--stage", "anotate"]) == 2
    err = capsys.readouterr().err
    assert "megapairs reset: error: unknown stage 'anotate'; stages: ingest.decode" in err
    assert main(["reset", "--run", str(tmp_path / "none"), "--stage", "mine"]) == 2
    assert f"no run at {tmp_path / 'none'}" in capsys.readouterr().err


def channel_run(root: Path) -> RunDir:
    """Markers of two channels' embed and neighbours stages, then mine."""
    run = RunDir(root)
    for stage in [*CHANNEL_STAGES, "mine"]:
        run.mark_done(stage, "part-00000", {})
    return run


def test_a_channel_resets_only_its_branch_and_what_joins_them(tmp_path: Path) -> None:
    run = channel_run(tmp_path)
    later = ["mine", "annotate", "score", "export"]
    assert stages_to_reset(run, "embed.a") == ["embed.a", "neighbours.a", *later]
    assert stages_to_reset(run, "neighbours.b") == ["neighbours.b", *later]
    assert stages_to_reset(run, "embed") == [*CHANNEL_STAGES, *later]
    assert stages_to_reset(run, "ingest") == ["ingest.decode", "ingest", *CHANNEL_STAGES, *later]
    assert stages_to_reset(run, "export") == ["export"]


def test_reset_deletes_a_channels_files_and_its_rejects_only(tmp_path: Path) -> None:
    run = channel_run(tmp_path)
    for channel in ("a", "b"):
        write_json(run.folder(f"embeddings/{channel}") / "encoder.json", {})
        write_table(run.part_path("rejects", f"embed.{channel}-part-00000"), pa.table({"x": [1]}))
    write_table(run.part_path("rejects", "mine-part-00000"), pa.table({"x": [1]}))
    write_table(run.part_path("rejects", "part-00000"), pa.table({"x": [1]}))  # ingest's
    done = {item.stage: item for item in reset_stage(run, "embed.a")}
    assert (done["embed.a"].files, done["embed.a"].markers) == (2, 1)
    assert done["mine"].files == 1
    rejects = sorted(p.name for p in run.folder("rejects").iterdir())
    assert rejects == ["embed.b-part-00000.parquet", "part-00000.parquet"]
    assert run.folder("embeddings/b").exists() and not run.folder("embeddings/a").exists()
    assert run.done_parts("embed.b") == ["part-00000"] and run.done_parts("mine") == []


def test_reset_works_on_object_storage(tmp_path: Path) -> None:
    run = RunDir(f"memory://reset/{tmp_path.name}")
    write_table(run.part_path(PAIRS_DIR, "part-00000"), pa.table({"x": [1]}))
    write_table(run.part_path(ANNOTATIONS_DIR, "part-00000"), pa.table({"x": [1]}))
    run.mark_done("mine", "part-00000", {})
    run.mark_done("annotate", "part-00000", {})
    run.update_manifest(stages={"mine": {}, "annotate": {}})
    done = {item.stage: item for item in reset_stage(run, "annotate")}
    assert (done["annotate"].files, done["annotate"].markers) == (1, 1)
    assert run.done_parts("annotate") == [] and run.done_parts("mine") == ["part-00000"]
    assert list(run.read_manifest()["stages"]) == ["mine"]
    assert run.part_path(PAIRS_DIR, "part-00000").exists()
    assert not run.folder(ANNOTATIONS_DIR).exists()


def test_reset_waits_for_no_one_it_refuses_while_a_run_is_in_use(tmp_path: Path) -> None:
    run = channel_run(tmp_path)
    hold = (
        "import sys, time; from megapairs.pipeline.lock import acquire_run_lock; "
        "from megapairs.runs import RunDir; acquire_run_lock(RunDir(sys.argv[1])); "
        "print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(RunLocked, match=f"in use by pid {holder.pid}"):
            reset_stage(run, "mine")
    finally:
        holder.kill()
        holder.wait()
    assert run.done_parts("mine") == ["part-00000"]
