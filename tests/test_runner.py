"""The local runner's contract: parts are skipped once done, a crash loses nothing,
and a run directory refuses a changed config."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from megapairs.config import PipelineConfig
from megapairs.pipeline.report import accounting_errors
from megapairs.pipeline.runner import LocalRunner, StageConfigChanged, StageResult
from megapairs.runs import RunDir, write_array


class Crash(RuntimeError):
    pass


@dataclass
class SquaresStage:
    """Writes part-i.npy = squares of a range; crashes once on `crash_on`."""

    n_parts: int = 4
    crash_on: str | None = None
    computed: list[str] = field(default_factory=list)
    name: str = "squares"
    config_sections: tuple[str, ...] = ("mine",)

    def plan(self, run):
        return [f"part-{i:05d}" for i in range(self.n_parts)]

    def prepare(self, run):
        pass

    def run_part(self, run, part):
        if part == self.crash_on:
            self.crash_on = None
            raise Crash(part)
        start = int(part.split("-")[1]) * 10
        write_array(run.part_path("squares", part, ".npy"), np.arange(start, start + 10) ** 2)
        self.computed.append(part)
        return {"values": 10}


def test_crash_mid_stage_then_resume_computes_only_the_rest(tmp_path):
    config = PipelineConfig()
    run = RunDir(tmp_path / "run")
    stage = SquaresStage(crash_on="part-00002")
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    with pytest.raises(Crash):
        runner.run_stage(stage)
    assert run.done_parts("squares") == ["part-00000", "part-00001"]
    result = runner.run_stage(stage)
    assert stage.computed == [f"part-{i:05d}" for i in range(4)]
    assert result == StageResult("squares", {"values": 40}, parts=4, computed=2)
    values = np.concatenate([np.load(p) for p in run.files("squares", "squares", ".npy")])
    assert np.array_equal(values, np.arange(40) ** 2)
    again = runner.run_stage(stage)
    assert again.computed == 0
    manifest = run.read_manifest()
    assert manifest["stages"]["squares"]["complete"] is True
    assert manifest["config"]["mine"]["max_targets"] == config.mine.max_targets


def test_start_clears_temp_files_of_a_killed_writer(tmp_path):
    run = RunDir(tmp_path)
    stale = run.folder("squares") / ".part-00000.npy.abc123.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    keep = run.part_path("squares", "part-00001", ".npy")
    keep.write_bytes(b"whole")
    LocalRunner(run, PipelineConfig(), progress=False).start()
    assert not stale.exists() and keep.exists()


def test_unfinished_part_files_are_not_listed(tmp_path):
    run = RunDir(tmp_path)
    write_array(run.part_path("squares", "part-00000", ".npy"), np.zeros(3))
    assert run.files("squares", "squares", ".npy") == []
    run.mark_done("squares", "part-00000", {})
    assert len(run.files("squares", "squares", ".npy")) == 1


def test_changed_config_is_refused(tmp_path):
    run = RunDir(tmp_path)
    LocalRunner(run, PipelineConfig(), progress=False).run_all([SquaresStage()])
    changed = PipelineConfig.model_validate({"mine": {"max_targets": 9}})
    with pytest.raises(StageConfigChanged, match="another config"):
        LocalRunner(run, changed, progress=False).run_stage(SquaresStage())


def test_accounting_flags_records_that_went_missing():
    good = StageResult("ingest", {"records": 5, "kept": 3, "rejected": 2}, 1, 1)
    bad = StageResult("ingest", {"records": 5, "kept": 3, "rejected": 1}, 1, 1)
    assert accounting_errors([good]) == []
    assert "5 records in" in accounting_errors([bad])[0]
