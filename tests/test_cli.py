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
