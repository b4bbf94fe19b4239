"""Prompt folders: loading and validation, per-pair sampling, message rendering, the pool."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from megapairs.annotation.checks import check_instructions, parse_instructions
from megapairs.annotation.prompts import (
    NO_CAPTION,
    PairSettings,
    PromptError,
    PromptSet,
    describe_messages,
    instruct_messages,
    load_prompts,
    packaged_prompts_dir,
    pair_context,
    repair_messages,
    sample_pair_settings,
)
from megapairs.annotation.types import ImagePart, TextPart

QUERY_JPEG = b"\xff\xd8query"
TARGET_JPEG = b"\xff\xd8target"


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    return load_prompts(None)


@pytest.fixture
def prompt_copy(tmp_path: Path) -> Path:
    """An editable copy of the packaged prompt folder."""
    return Path(shutil.copytree(packaged_prompts_dir(), tmp_path / "mine"))


def settings_for(pair_id: str, seed: int = 7, pool: int = 50) -> PairSettings:
    return sample_pair_settings(pair_id, seed, (60, 100), 5, pool)


# loading ---------------------------------------------------------------------------


def test_packaged_prompts_load(prompts: PromptSet):
    assert prompts.name == "v1"
    assert re.fullmatch(r"v1-[0-9a-f]{8}", prompts.version)
    assert len(prompts.demonstrations) == 50
    assert len({d.id for d in prompts.demonstrations}) == 50
    assert load_prompts("") == prompts


def test_version_follows_folder_name_and_content(prompts: PromptSet, prompt_copy: Path):
    copy = load_prompts(prompt_copy)
    assert copy.name == "mine"
    assert copy.version.split("-")[1] == prompts.version.split("-")[1]  # same bytes
    (prompt_copy / "repair.txt").write_text(
        (prompt_copy / "repair.txt").read_text() + "\nPlease.\n"
    )
    assert load_prompts(prompt_copy).version != copy.version


def test_readme_is_not_part_of_the_version(prompt_copy: Path):
    before = load_prompts(prompt_copy).version
    (prompt_copy / "README.md").write_text("my notes")
    assert load_prompts(prompt_copy).version == before


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("describe.txt", "${word_num}", "some", r"missing placeholder.*\$\{word_num\}"),
        ("instruct.txt", "${description}", "${desc}", r"missing.*\$\{description\}"),
        ("instruct.txt", "${description}", "${description}${desc}", r"unknown.*\$\{desc\}"),
        ("repair.txt", "${problem}", "${problem} ${word_num}", r"unknown placeholder.*word_num"),
        ("describe.txt", "Query image: ", "Costs $5: ", r"'\$'"),
        ("describe.txt", "${query_image}", "${target_image}", r"missing.*\$\{query_image\}"),
        (
            "describe.txt",
            "Query image: ${query_image}\nTarget image: ${target_image}",
            "${target_image}${query_image}",
            r"query_image.*then.*target_image.*found target_image, query_image",
        ),
    ],
)
def test_template_errors_name_the_file(prompt_copy, file, old, new, message):
    replace_in(prompt_copy / file, old, new)
    with pytest.raises(PromptError, match=message) as error:
        load_prompts(prompt_copy)
    assert str(prompt_copy / file) in str(error.value)


def test_a_literal_dollar_is_allowed(prompt_copy: Path, prompts: PromptSet):
    replace_in(prompt_copy / "instruct.txt", "Rules:", "Rules ($$0 cost):")
    custom = load_prompts(prompt_copy)
    context = pair_context("1-2", "a", "b", settings_for("1-2"), custom)
    assert "Rules ($0 cost):" in instruct_messages(custom, context, 3, 6)[0].text


def test_missing_file_is_named(prompt_copy: Path):
    (prompt_copy / "instruct.txt").unlink()
    with pytest.raises(PromptError, match=r"instruct\.txt: missing"):
        load_prompts(prompt_copy)
    with pytest.raises(PromptError, match="not found"):
        load_prompts(prompt_copy / "nowhere")


def demo_line(**changes: object) -> str:
    record: dict[str, object] = {
        "id": "x1",
        "relation": "viewpoint",
        "query_caption": "a cup",
        "target_caption": "a cup from above",
        "description": "Both show a cup; the target is seen from above.",
        "instructions": ["See this cup from above", "Top-down view of it", "Overhead shot"],
    }
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not None})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (demo_line(description=None), "missing key.*description"),
        (demo_line(colour="red"), "unknown key.*colour"),
        (demo_line(instructions=["a", "b"]), "2 instructions, at least 3"),
        (demo_line(instructions="a b c"), "list of strings"),
        (demo_line(relation=3), "relation must be a string"),
        (demo_line(id="d01"), "duplicate id 'd01'"),
    ],
)
def test_demonstration_errors_name_file_and_line(prompt_copy, bad_line, message):
    path = prompt_copy / "demonstrations.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptError, match=message) as error:
        load_prompts(prompt_copy)
    assert f"{path}, line 3" in str(error.value)


# per-pair settings -------------------------------------------------------------------


def test_settings_are_deterministic_per_pair_and_seed():
    assert settings_for("10-20") == settings_for("10-20")
    assert settings_for("10-20") != settings_for("10-21")
    assert settings_for("10-20", seed=7) != settings_for("10-20", seed=8)


def test_settings_cover_the_word_range_and_draw_distinct_demonstrations():
    drawn = [settings_for(f"{i}-{i + 1}") for i in range(2000)]
    words = {s.word_num for s in drawn}
    assert min(words) == 60 and max(words) == 100 and len(words) == 41
    for s in drawn:
        assert len(set(s.demonstration_indices)) == 5
        assert all(0 <= i < 50 for i in s.demonstration_indices)
        assert 0 <= s.request_seed < 2**31
    assert len({s.demonstration_indices for s in drawn}) > 1900  # pairs see other examples
    assert len({i for s in drawn for i in s.demonstration_indices}) == 50  # all of the pool


def test_settings_refuse_a_small_pool_and_bad_ranges():
    with pytest.raises(ValueError, match="pool of 4"):
        settings_for("1-2", pool=4)
    with pytest.raises(ValueError, match="word_range"):
        sample_pair_settings("1-2", 0, (100, 60), 5, 50)
    assert sample_pair_settings("1-2", 0, (80, 80), 0, 0).demonstration_indices == ()


# rendering ---------------------------------------------------------------------------


def test_describe_puts_both_images_in_order_with_captions_and_budget(prompts: PromptSet):
    settings = settings_for("3-4")
    context = pair_context("3-4", "a red bus", "a bus at night", settings, prompts)
    (message,) = describe_messages(prompts, context, QUERY_JPEG, TARGET_JPEG)
    assert message.role == "user"
    images = [p for p in message.parts if isinstance(p, ImagePart)]
    assert [i.data for i in images] == [QUERY_JPEG, TARGET_JPEG]
    assert all(isinstance(p, TextPart) and p.text for p in message.parts if p not in images)
    text = message.text
    assert "a red bus" in text and "a bus at night" in text
    assert f"about {settings.word_num} words" in text
    assert "$" not in text


def test_instruct_renders_the_drawn_demonstrations(prompts: PromptSet):
    settings = settings_for("5-6")
    context = pair_context("5-6", "a mug", "a shirt", settings, prompts)
    context = dataclasses.replace(context, description="Both carry the same logo.")
    (message,) = instruct_messages(prompts, context, 3, 6)
    text = message.text
    assert message.parts == (TextPart(text),)
    drawn = [prompts.demonstrations[i] for i in settings.demonstration_indices]
    assert context.demonstrations == tuple(drawn)
    answers = re.findall(r"^Answer: (.*)$", text, flags=re.MULTILINE)
    assert [parse_instructions(a) for a in answers] == [list(d.instructions) for d in drawn]
    for number, demo in enumerate(drawn, start=1):
        assert f"Example {number}\n" in text and demo.description in text
    assert "Example 6" not in text
    assert "Both carry the same logo." in text and "a mug" in text and "a shirt" in text
    assert "between 3 and 6" in text and '{"instructions"' in text


def test_missing_captions_render_as_no_caption(prompts: PromptSet):
    for caption in (None, "", "   "):
        context = pair_context("7-8", caption, caption, settings_for("7-8"), prompts)
        describe = describe_messages(prompts, context, QUERY_JPEG, TARGET_JPEG)[0].text
        instruct = instruct_messages(prompts, context, 3, 6)[0].text
        assert describe.count(NO_CAPTION) == 2
        assert f"Query caption: {NO_CAPTION}\nTarget caption: {NO_CAPTION}\nDescription" in (
            instruct
        )


def test_repair_continues_the_instruct_conversation(prompts: PromptSet):
    context = pair_context("9-10", "a", "b", settings_for("9-10"), prompts)
    instruct = instruct_messages(prompts, context, 3, 5)
    context = dataclasses.replace(context, previous_output="not json", problem="it was prose.")
    messages = repair_messages(prompts, instruct, context, 3, 5)
    assert messages[:1] == instruct
    assert [m.role for m in messages] == ["user", "assistant", "user"]
    assert messages[1].text == "not json"
    assert "it was prose." in messages[2].text and "between 3 and 5" in messages[2].text


# the packaged pool ------------------------------------------------------------------------


def test_every_demonstration_passes_the_instruction_checks(prompts: PromptSet):
    for demo in prompts.demonstrations:
        answer = json.dumps({"instructions": list(demo.instructions)})
        check = check_instructions(answer, demo.target_caption, 3, 6, (3, 40))
        assert check.reason is None and check.dropped == (), (demo.id, check)
        assert check.accepted == demo.instructions
        assert 3 <= len(demo.instructions) <= 4
        assert 40 <= len(demo.description.split()) <= 90, demo.id
        assert demo.query_caption and demo.target_caption


def test_demonstrations_cover_diverse_relations(prompts: PromptSet):
    relations = [d.relation for d in prompts.demonstrations]
    assert len(set(relations)) >= 8
    assert max(relations.count(r) for r in set(relations)) <= 8  # no relation dominates
    assert {"shared_concept", "style", "viewpoint", "count", "part_whole"} <= set(relations)
