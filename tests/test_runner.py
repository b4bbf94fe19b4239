"""The local runner's contract: parts are skipped once done, a crash loses nothing,
and a run directory refuses a changed config."""

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from megapairs.config import PipelineConfig
from megapairs.pipeline.report import accounting_errors
from megapairs.pipeline.runner import LocalRunner, StageConfigChanged, StageResult
from megapairs.pipeline.stage import StageBase
from megapairs.runs import RunDir, write_array

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"


class Crash(RuntimeError):
    pass


@dataclass
class SquaresStage(StageBase):
    """Writes part-i.npy = squares of a range; crashes once on `crash_on`."""

    n_parts: int = 4
    crash_on: str | None = None
    computed: list[str] = field(default_factory=list)
    name: str = "squares"
    config_sections: tuple[str, ...] = ("mine",)

    def plan(self, run):
        return [f"part-{i:05d}" for i in range(self.n_parts)]

    def run_part(self, run, part, state, progress):
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


@dataclass
class CountingStage(SquaresStage):
    """Squares that also records finalize calls and reports progress per value."""

    finalized: list[dict] = field(default_factory=list)
    reported: list[tuple[str, int, int]] = field(default_factory=list)
    name: str = "counting"

    def run_part(self, run, part, state, progress):
        for done in range(1, 4):
            progress(done, 3)
        return super().run_part(run, part, state, progress)

    def finalize(self, run, counts):
        self.finalized.append(dict(counts))


def test_finalize_runs_once_after_all_parts_with_every_parts_counts(tmp_path):
    stage = CountingStage()
    runner = LocalRunner(RunDir(tmp_path), PipelineConfig(), progress=True)
    runner.run_all([stage])
    assert len(stage.finalized) == 1
    assert sorted(stage.finalized[0]) == [f"part-{i:05d}" for i in range(4)]
    assert all(c == {"values": 10} for c in stage.finalized[0].values())


def test_setup_builds_worker_state_once_per_process_and_stage(tmp_path):
    built = []

    @dataclass
    class StatefulStage(SquaresStage):
        def setup(self, run):
            built.append(run.root)
            return object()

        def run_part(self, run, part, state, progress):
            assert state is not None
            return super().run_part(run, part, state, progress)

    LocalRunner(RunDir(tmp_path), PipelineConfig(), progress=False).run_all([StatefulStage()])
    assert built == [tmp_path]


def test_stale_parts_lose_their_marker_before_they_are_recomputed(tmp_path):
    run = RunDir(tmp_path)
    seen_markers = []

    @dataclass
    class Reopening(SquaresStage):
        def stale_parts(self, run):
            return ["part-00001"]

        def run_part(self, run, part, state, progress):
            seen_markers.append((part, run.is_done(self.name, part)))
            return super().run_part(run, part, state, progress)

    LocalRunner(run, PipelineConfig(), progress=False).run_all([SquaresStage()])
    result = LocalRunner(run, PipelineConfig(), progress=False).run_stage(Reopening())
    assert seen_markers == [("part-00001", False)]
    assert (result.parts, result.computed) == (4, 1)


def test_every_pipeline_stage_pickles_before_setup(tiny_clip, tiny_dinov2):
    """Stages are shipped to other processes: they hold only their config."""
    from megapairs.config import load_config
    from megapairs.pipeline.synthesize import build_stages

    config = load_config(
        PAPER,
        [
            f"channels.image_semantic.model={tiny_clip.path}",
            f"channels.caption.model={tiny_clip.path}",
            f"channels.image_pattern.model={tiny_dinov2.path}",
        ],
    )
    stages = build_stages(config, progress=False)
    assert [s.name for s in stages][:2] == ["ingest.decode", "ingest"]
    for stage in stages:
        clone = pickle.loads(pickle.dumps(stage))
        assert clone.name == stage.name and clone.config == stage.config


def test_accounting_checks_the_decode_step_too():
    bad = StageResult("ingest.decode", {"records": 5, "valid": 3, "invalid": 1}, 1, 1)
    assert accounting_errors([bad]) == ["ingest.decode: 5 records in, but 3 valid + 1 invalid = 4"]


def test_a_changed_config_names_exactly_the_sections_that_changed(tmp_path):
    run = RunDir(tmp_path)
    stage = SquaresStage(config_sections=("seed", "mine", "annotate.backend"))
    LocalRunner(run, PipelineConfig(), progress=False).run_all([stage])
    recorded = run.read_manifest()["stages"]["squares"]["settings"]
    assert sorted(recorded) == ["annotate.backend", "mine", "seed"]
    changed = PipelineConfig.model_validate({"seed": 3})
    with pytest.raises(StageConfigChanged, match=r"another config \(seed changed\); .*") as err:
        LocalRunner(run, changed, progress=False).run_stage(stage)
    assert f"megapairs reset --run {run.uri} --stage squares;" in str(err.value)


def test_a_manifest_without_section_digests_says_the_settings_changed(tmp_path):
    run = RunDir(tmp_path)
    LocalRunner(run, PipelineConfig(), progress=False).run_all([SquaresStage()])
    stages = run.read_manifest()["stages"]
    del stages["squares"]["settings"]  # written by an older version
    run.update_manifest(stages=stages)
    changed = PipelineConfig.model_validate({"mine": {"max_targets": 9}})
    with pytest.raises(StageConfigChanged, match=r"another config \(its settings changed\)"):
        LocalRunner(run, changed, progress=False).run_stage(SquaresStage())


def test_problems_a_stage_reports_are_errors_of_the_command(tmp_path, capsys):
    from megapairs.pipeline.report import print_stage_results

    @dataclass
    class Complaining(SquaresStage):
        def problems(self, counts):
            return [f"{part}: all 10 values failed" for part in sorted(counts)][:1]

    result = LocalRunner(RunDir(tmp_path), PipelineConfig(), progress=False).run_all(
        [Complaining()]
    )[0]
    assert result.problems == ["part-00000: all 10 values failed"]
    assert print_stage_results([result]) == 1
    assert "error: part-00000: all 10 values failed" in capsys.readouterr().err


def test_a_stage_with_nothing_to_do_is_a_warning(tmp_path, capsys):
    from megapairs.pipeline.report import print_stage_results

    result = LocalRunner(RunDir(tmp_path), PipelineConfig(), progress=False).run_all(
        [SquaresStage(n_parts=0)]
    )[0]
    empty = [
        result,
        StageResult("annotate", {"pairs": 0, "annotated": 0, "failed": 0}, 2, 2),
        StageResult("ingest.decode", {"records": 0, "valid": 0, "invalid": 0}, 1, 1),
        StageResult("mine", {"queries": 4, "pairs": 0}, 1, 1),
        StageResult("embed.caption", {"embedded": 3}, 1, 1),  # not empty
    ]
    assert print_stage_results(empty) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: squares: nothing to do: no parts planned (its input is empty, or the stage "
        "before it has not run)",
        "warning: annotate: got no pairs to annotate (pairs 0)",
        "warning: ingest.decode: read no input records; check input.path (records 0)",
        "warning: mine: mined no pairs; check the channels' similarity windows (pairs 0)",
    ]
