from pathlib import Path

import pytest
import yaml

from megapairs.cli import STEP_COMMANDS, build_parser, main

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"


@pytest.mark.parametrize("command", [*STEP_COMMANDS, "demo", "summary", "config"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: megapairs" in capsys.readouterr().out


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--set", "mine.max_targets=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["mine"]["max_targets"] == 2


def test_step_without_config_or_manifest_is_a_clear_error(tmp_path, capsys):
    assert main(["mine", "--run", str(tmp_path / "nothing")]) == 2
    assert "no --config given" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    args = ["ingest", "--run", str(tmp_path), "--config", str(PAPER), "--set", "ingest.min_sid=3"]
    assert main(args) == 2
    assert "min_sid" in capsys.readouterr().err


def test_steps_reuse_the_config_stored_in_the_run(tmp_path, capsys):
    from megapairs.demo.scenes import generate_scene_corpus

    corpus = generate_scene_corpus(tmp_path / "scenes", 12, seed=1)
    run = str(tmp_path / "run")
    args = ["ingest", "--config", str(PAPER), "--input", str(corpus.images_dir), "--run", run]
    assert main([*args, "--set", "ingest.min_side=32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"records {corpus.n_files}" in printed
    assert f"kept {corpus.n_images}" in printed
    # A second step without --config reads the manifest's config; ingest is already done.
    assert main(["ingest", "--run", run, "--quiet"]) == 0
    assert "1 of 1 parts already done" in capsys.readouterr().out
    assert main(["summary", "--run", run]) == 0
    summary = capsys.readouterr().out
    assert f"images: {corpus.n_images} kept" in summary
    assert "ingest rejected truncated: 1" in summary


def test_validate_and_stats_commands_report_and_set_the_exit_code(tmp_path, capsys):
    from run_fixtures import build_run, fixture_config

    from megapairs.dataset.export import ExportStage
    from megapairs.pipeline.runner import LocalRunner

    fixture = build_run(tmp_path)
    config = fixture_config()
    runner = LocalRunner(fixture.run, config, progress=False)
    runner.start()
    runner.run_stage(ExportStage(config))
    dataset = fixture.run.root / "dataset"
    assert main(["validate", str(dataset)]) == 0
    assert main(["stats", str(fixture.run.root)]) == 0
    out = capsys.readouterr().out
    assert "5 pairs" in out and "timeout" in out and "unparseable" in out
    next(dataset.rglob("*.png")).unlink()  # a referenced image goes missing
    assert main(["validate", str(dataset)]) == 1
    assert "missing_image" in capsys.readouterr().out
