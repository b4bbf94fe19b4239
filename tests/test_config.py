from pathlib import Path

import pytest

from megapairs.config import ConfigError, PipelineConfig, load_config
from megapairs.registry import Registry

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "megapairs" / "configs"


def test_paper_config_holds_the_papers_parameters():
    config = load_config(CONFIGS / "paper.yaml")
    assert set(config.channels) == {"image_semantic", "image_pattern", "caption"}
    assert all(ch.window == (0.8, 0.96) for ch in config.channels.values())
    assert config.mine.num_hard_negatives == 5
    assert config.channels["image_pattern"].encoder == "dinov2"


def test_overrides_are_parsed_as_yaml_and_nested():
    config = load_config(
        CONFIGS / "paper.yaml",
        [
            "mine.max_targets=7",
            "channels.caption.enabled=false",
            "channels.caption.window=[0.5, 0.9]",
        ],
    )
    assert config.mine.max_targets == 7
    assert config.channels["caption"].window == (0.5, 0.9)
    assert list(config.enabled_channels()) == ["image_semantic", "image_pattern"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.max_targetz=3", "max_targetz"),
        ("channels.caption.window=[0.9, 0.8]", "low < high"),
        ("neighbours.k=0", "greater than or equal to 1"),
        ("no_equals_sign", "key.path=value"),
    ],
)
def test_bad_overrides_are_errors_naming_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "paper.yaml", [override])


def test_unreadable_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_section_hash_tracks_only_the_named_sections():
    base = PipelineConfig()
    changed = base.model_copy(update={"seed": 5})
    assert base.section_hash("mine") == changed.section_hash("mine")
    assert base.section_hash("seed") != changed.section_hash("seed")


def test_registry_refuses_duplicates_and_lists_known_names():
    registry: Registry[int] = Registry("thing")
    registry.register("one")(lambda: 1)
    assert registry.build("one") == 1
    with pytest.raises(ValueError, match="already registered"):
        registry.register("one")(lambda: 2)
    with pytest.raises(ValueError, match="known: one"):
        registry.build("two")
