import json
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


def test_train_command_trains_and_resumes_from_its_output_folder(tmp_path, capsys, tiny_clip):
    from run_fixtures import build_run, fixture_config

    from megapairs.dataset.export import ExportStage
    from megapairs.pipeline.runner import LocalRunner

    fixture = build_run(tmp_path)
    runner = LocalRunner(fixture.run, fixture_config(), progress=False)
    runner.start()
    runner.run_stage(ExportStage(fixture_config()))
    config = Path(__file__).resolve().parents[1] / "configs" / "train_demo.yaml"
    settings = [
        f"model.name_or_path={tiny_clip.path}",
        f"data.paths=[{fixture.run.root / 'dataset'}]",
        f"output_dir={tmp_path / 'train'}",
        "batch_size=4",
        "chunk_size=2",
        "data.num_negatives=2",
        "num_workers=0",
        "save_every=2",
    ]
    args = ["train", "--config", str(config), "--quiet"]
    args += [item for pair in (("--set", s) for s in settings) for item in pair]
    assert main([*args, "--set", "steps=2"]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert main([*args, "--set", "steps=2"]) == 0  # finished: nothing left to do
    assert (tmp_path / "train" / "final").is_dir()


def test_eval_command_writes_results_and_reuses_the_gallery_cache(tmp_path, capsys, tiny_clip):
    from eval_fixtures import write_circo_root

    root = write_circo_root(tmp_path / "circo")
    args = ["eval", "--benchmark", "circo", "--kind", "clip", "--model", str(tiny_clip.path)]
    args += ["--data-root", str(root), "--output", str(tmp_path / "out"), "--quiet"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MMRet-Base" in out and "CIRCO" in out  # the paper's rows beside ours
    results = json.loads((tmp_path / "out" / "circo-val.json").read_text())
    assert 0.0 <= results["metrics"]["mAP@5"] <= 1.0
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "circo-val.json").read_text())
    assert again["metrics"] == results["metrics"]
    missing = ["--data-root", str(tmp_path / "nowhere")]
    assert main([*args[:-7], *missing, "--quiet"]) == 2
    assert "error" in capsys.readouterr().err


def test_validate_refuses_an_empty_dataset_unless_allowed(tmp_path, capsys):
    (tmp_path / "dataset").mkdir()
    assert main(["validate", str(tmp_path / "dataset")]) == 1
    out = capsys.readouterr().out
    assert "1 problems" in out and "the dataset is empty (no data files)" in out
    assert main(["validate", str(tmp_path / "dataset"), "--allow-empty"]) == 0
    assert ": OK" in capsys.readouterr().out


def test_reset_mine_then_annotate_warns_that_it_has_nothing_to_do(tmp_path, capsys):
    from run_fixtures import build_run

    from megapairs.runs import RunDir

    run = build_run(tmp_path, annotate=False).run
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"seed": 7}))
    args = ["annotate", "--run", str(run.root), "--config", str(config), "--quiet"]
    assert main(args) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["reset", "--run", str(run.root), "--stage", "mine"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:]] == [["mine", "deleted"], ["annotate", "deleted"]]
    assert RunDir(run.root).done_parts("annotate") == []
    assert main(args) == 0
    assert (
        "warning: annotate: nothing to do: no parts planned (its input is empty, or the stage "
        "before it has not run)"
    ) in capsys.readouterr().err


def test_annotate_of_zero_pairs_is_a_warning(tmp_path, capsys):
    from run_fixtures import build_run

    from megapairs.runs import write_table
    from megapairs.schemas import PAIRS_DIR, PAIRS_SCHEMA

    fixture = build_run(tmp_path, annotate=False)
    for part in fixture.parts:  # the mine stage found no pair
        write_table(fixture.run.part_path(PAIRS_DIR, part), PAIRS_SCHEMA.empty_table())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"seed": 7}))
    args = ["annotate", "--run", str(fixture.run.root), "--config", str(config), "--quiet"]
    assert main(args) == 0
    assert "warning: annotate: got no pairs to annotate (pairs 0)" in capsys.readouterr().err
