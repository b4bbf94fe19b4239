"""Checks on model answers: reasoning removal, descriptions, instruction parsing and filtering."""

from __future__ import annotations

import json

import pytest

from megapairs.annotation.checks import (
    ParseError,
    check_description,
    check_instructions,
    mentions_image_order,
    parse_instructions,
    restates_caption,
    strip_reasoning,
)

GOOD = ["Show this dog asleep on a sofa", "Same dog, but curled up indoors", "Find it napping"]
CAPTION = "a brown dog sleeping on a grey sofa"


def answer(*instructions: object) -> str:
    return json.dumps({"instructions": list(instructions)})


def check(raw: str, caption: str | None = CAPTION, low: int = 3, high: int = 5):
    return check_instructions(raw, caption, low, high, (3, 12))


# reasoning and descriptions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<think>hmm\nlet me see</think>\n  The answer. ", "The answer."),
        ("<THINK>a</THINK>one<think>b</think> two", "one two"),
        ("reasoning without an opening tag</think>The answer.", "The answer."),
        ("The answer.<think>cut off mid-thought", "The answer."),
        ("  plain  ", "plain"),
    ],
)
def test_strip_reasoning(raw: str, expected: str):
    assert strip_reasoning(raw) == expected


def test_check_description():
    text = "Both images show a red bus;\n\nthe target is at night."
    assert check_description(f"<think>x</think>{text}") == (
        "Both images show a red bus; the target is at night.",
        None,
    )
    assert check_description("  <think>only thoughts</think> ") == ("", "empty_description")
    assert check_description("A red bus.") == ("A red bus.", "too_short_description")


# parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        answer(*GOOD),
        f"```json\n{answer(*GOOD)}\n```",
        f"Sure! Here they are:\n{answer(*GOOD)}\nHope this helps {{:-)}}",
        json.dumps(GOOD),
        f"The list: {json.dumps(GOOD)}.",
        f"<think>maybe {{'a': 1}}</think>{answer(*GOOD)}",
        f'Items [1] below: {{"instructions": {json.dumps(GOOD)}, "note": "ok"}}',
        '{"instructions": ' + json.dumps(GOOD) + ", oops}",  # a broken object around the list
    ],
)
def test_parse_accepts_the_usual_wrappings(raw: str):
    assert parse_instructions(raw) == GOOD


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "empty"),
        ("Show this dog asleep on a sofa.", "not valid JSON"),
        ('{"instructions": ["a", "b"', "not valid JSON"),
        ('{"queries": ["a", "b", "c"]}', 'no "instructions" key.*"queries"'),
        ('{"instructions": "a, b, c"}', "must be a list of strings, not a string"),
        ('{"instructions": ["a", 2, "c"]}', "instruction 2 is a number"),
        ('[{"text": "a"}]', "instruction 1 is an object"),
        ('Note {"lang": "en"} then {"instructions": [1]}', "instruction 1 is a number"),
    ],
)
def test_parse_errors_explain_the_problem(raw: str, problem: str):
    with pytest.raises(ParseError, match=problem) as error:
        parse_instructions(raw)
    assert error.value.problem == str(error.value)


# image order ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Like the first image but red",
        "Make the Second Picture brighter",
        "Image 1 with a hat",
        "Show picture two in winter",
        "the 2nd photo at night",
        "Same as the left image",
        "Same as the right photo but blue",
        "Keep the former and add snow",
        "Show the latter with a cat",
        "What both images share, in green",
        "Combine the two pictures",
        "Pick the second one",
        "Change the query image to night",
        "Find the target image",
        "The other photo, but smaller",
    ],
)
def test_image_order_is_caught(text: str):
    assert mentions_image_order(text)


@pytest.mark.parametrize(
    "text",
    [
        "Show this dog with a second dog beside it",
        "A house with a second floor balcony",
        "Both dogs running on the beach",
        "The two cats asleep together",
        "Turn left at the bridge, in winter",
        "The right shoe only, in red",
        "First light over the mountains",
        "A second picture frame on the wall",
        "Find my photo's scene at night",
    ],
)
def test_legitimate_words_are_not_caught(text: str):
    assert not mentions_image_order(text)


# instruction checks --------------------------------------------------------------------------


def test_good_answer_is_accepted_with_whitespace_normalised():
    result = check(answer("  Show this dog\n asleep on a sofa ", *GOOD[1:]))
    assert result.accepted == tuple(GOOD)
    assert (result.dropped, result.reason, result.problem) == ((), None, "")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("   ", "empty"),
        ("Red dog", "too_short"),
        ("Show this same brown dog but asleep on a big grey sofa by a window", "too_long"),
        ("The second image but with a cat", "mentions_image_order"),
        ("A brown dog sleeping on a grey sofa.", "restates_target_caption"),
        ("Find a photo of a brown dog sleeping on a grey sofa", "restates_target_caption"),
        ("show this DOG asleep, on a sofa!", "duplicate"),
    ],
)
def test_each_drop_reason(bad: str, reason: str):
    result = check(answer(*GOOD, bad))
    assert result.accepted == tuple(GOOD)
    assert result.dropped == (f"{reason}: {' '.join(bad.split())}",)
    assert result.reason is None


def test_restating_needs_a_caption_and_a_close_match():
    assert not restates_caption("A brown dog sleeping on a grey sofa", None)
    assert not restates_caption("A brown dog sleeping on a grey sofa", "  ")
    assert restates_caption("brown dog, sleeping, grey sofa", CAPTION)  # Jaccard 1.0
    assert not restates_caption("Show this brown dog awake on a grey sofa", CAPTION)  # 4/6
    result = check(answer(*GOOD, "A brown dog sleeping on a grey sofa"), caption=None)
    assert len(result.accepted) == 4


def test_at_most_max_instructions_are_kept():
    extra = ["Show it on a blue couch", "Find the dog dozing at home", "This pup asleep indoors"]
    result = check(answer(*GOOD, *extra), high=4)
    assert result.accepted == (*GOOD, extra[0])
    assert result.dropped == tuple(f"beyond_max: {e}" for e in extra[1:])
    assert result.reason is None


def test_too_few_explains_what_was_dropped():
    result = check(answer(GOOD[0], "the first image in blue", GOOD[0].upper(), "Dog"))
    assert result.accepted == (GOOD[0],)
    assert result.reason == "too_few_instructions"
    assert result.dropped == (
        "mentions_image_order: the first image in blue",
        f"duplicate: {GOOD[0].upper()}",
        "too_short: Dog",
    )
    assert "only 1 usable instruction was given, but at least 3" in result.problem
    assert '"the first image in blue" was dropped because it refers to the images' in (
        result.problem
    )
    assert "repeats another instruction" in result.problem
    assert "fewer than 3 words" in result.problem


def test_too_few_without_drops():
    result = check(answer(*GOOD[:2]))
    assert result.reason == "too_few_instructions"
    assert (
        result.problem
        == "only 2 usable instructions were given, but at least 3 distinct ones are needed."
    )


def test_unparseable_answer():
    result = check("I cannot help with that.")
    assert (result.accepted, result.dropped, result.reason) == ((), (), "unparseable")
    assert "not valid JSON" in result.problem
