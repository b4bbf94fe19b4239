"""Checks on model answers: reasoning removal, descriptions, instruction parsing and filtering."""

from __future__ import annotations

import json
import random

import pytest

from megapairs.annotation.checks import (
    ParseError,
    check_description,
    check_instructions,
    copies_demonstration,
    grounding_stems,
    is_degenerate,
    is_grounded,
    mentions_image_order,
    parse_instructions,
    restates_caption,
    strip_reasoning,
)
from megapairs.annotation.prompts import load_prompts
from megapairs.annotation.types import Demonstration

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


# Descriptions as a describer writes them, 60-100 words, repeating "the", "image" and "and".
GOOD_DESCRIPTIONS = [
    "Both images show the same brown and white beagle lying on a grey fabric sofa in a bright "
    "living room. In the query image the dog is curled up asleep with its head on a cushion "
    "and the curtains are drawn. In the target image the dog is awake and sitting upright, "
    "looking at the camera, and the curtains are open so the afternoon sun falls across the "
    "sofa and the wooden floor.",
    "The query image shows a red double-decker bus driving over Westminster Bridge on a clear "
    "day, with the Houses of Parliament and Big Ben behind it. The target image shows the same "
    "kind of bus on the same bridge at night: the bus is lit from inside, the street lamps "
    "glow orange, and the clock face of the tower is illuminated. The image is taken from a "
    "similar angle, and the river is dark and still.",
    "Both images are product photos of a pair of running shoes on a white background. The "
    "query shoe is black with a white sole and white laces. The target shoe has the identical "
    "design, but it is bright neon green with a black sole, and it is shown from above rather "
    "than from the side. The image lighting, the shadow under the shoe and the plain backdrop "
    "are the same in both.",
    "The image on the query side shows a bowl of ramen with sliced pork, a soft-boiled egg, "
    "spring onions and nori in a dark broth, photographed from the side on a wooden table. "
    "The target image shows the same dish from directly above; the egg has been cut in half, "
    "chopsticks rest on the rim of the bowl, and a small dish of chili oil sits next to it. "
    "It's a cosy, warm-looking close-up.",
    "**Shared:** a small sailing boat with a white hull and a blue sail, moored in a harbour. "
    "**Query:** the boat sits in calm water at sunrise, with pink light on the sail and the "
    "hills behind it. **Target:** the same boat is heeling in strong wind on open sea, its "
    "sail taut, with white-capped waves around it and dark storm clouds overhead. Only the "
    "boat and its colours stay the same; the weather, the light and the mood change completely.",
    "Both images show the Eiffel Tower in Paris. In the first one, taken in 2019 in summer, "
    "the tower rises above green trees under a blue sky and tourists walk along the Champ de "
    "Mars. In the target picture the tower is seen in winter from the Trocadéro, the trees are "
    "bare, a light snow covers the ground and the lamps along the path are lit, giving the "
    "whole scene a quiet, cold, blue-grey look.",
]
HEX = random.Random(3)
DEGENERATE_DESCRIPTIONS = {
    "one token 512 times": " ".join(["class_name"] * 512),
    "one word over and over": "dog " * 200,
    "a few words over and over": "dog dog dog dog dog dog",
    "a phrase loop": "the dog is on the sofa " * 40,
    "a sentence then a loop": GOOD_DESCRIPTIONS[0] + " and the" * 150,
    "a two-token loop": "image, the " * 60,
    "mostly non-words": "<unk> ## class_name 12 the ## <unk> 0x3f dog ## 77 <pad> |||| ## cat",
    "digits": " ".join(str(n) for n in range(40)),
    "random hex": " ".join(f"{HEX.getrandbits(32):08x}" for _ in range(60)),
    "symbols": "* * * -- == ## ** // the %% ^^ ~~ ::",
}


@pytest.mark.parametrize("text", GOOD_DESCRIPTIONS)
def test_real_descriptions_are_not_degenerate(text: str):
    assert 60 <= len(text.split()) <= 100
    assert check_description(text) == (text, None)


def test_the_demonstrations_descriptions_are_not_degenerate():
    demonstrations = load_prompts().demonstrations
    assert len(demonstrations) >= 10
    for demonstration in demonstrations:
        assert check_description(demonstration.description)[1] is None, demonstration.id


@pytest.mark.parametrize("name", sorted(DEGENERATE_DESCRIPTIONS))
def test_degenerate_descriptions_are_refused(name: str):
    text, reason = check_description(DEGENERATE_DESCRIPTIONS[name])
    assert reason == "degenerate_description"
    assert text == " ".join(DEGENERATE_DESCRIPTIONS[name].split())


def test_short_plain_descriptions_are_not_degenerate():
    assert not is_degenerate("A red bus and a red car.")  # too few tokens for a share
    assert not is_degenerate("The dog, the cat and the bird sat in the old barn yard today.")
    assert is_degenerate("yes yes yes yes yes")


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


# copied demonstrations -----------------------------------------------------------------------
CAR = Demonstration(
    "d06",
    "attribute_colour",
    "A silver coupe, and an orange one.",
    (
        "Show me this sports car painted bright orange",
        "Same coupe in the showroom, but orange with black wheels",
        "Find this car in orange instead of silver",
    ),
)
SHOES = Demonstration("d15", "viewpoint", "Sneakers from above.", ("Same shoes", "Top-down pair"))
DEMOS = (SHOES, CAR)
DOG = ("a brown dog sleeping on a grey sofa", "Both images show a dog napping on a sofa.")


def check_with(raw: str, **options: object):
    return check_instructions(raw, CAPTION, 3, 5, (2, 12), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "Find this car in orange instead of silver",  # verbatim
        "find this CAR, in orange instead of silver!",  # case and punctuation
        "Show me this sports car painted bright green",  # 5 of 6 3-grams
        "Please find this car in orange instead of silver",  # 6 of 7 3-grams
        "Same shoes.",  # shorter than 3 words: equal once normalised
    ],
)
def test_copies_of_a_demonstration_instruction_are_found(text: str):
    assert copies_demonstration(text, DEMOS) in {"d06", "d15"}


@pytest.mark.parametrize(
    "text",
    [
        "Show me this dog asleep on the porch",  # only the opener "show me this" is shared
        "Find this dog in the rain instead of the sun",
        "Same shoes but red",  # 3 words or more: compared by 3-grams, none shared
        "Shoes",
    ],
)
def test_instructions_that_only_share_common_words_are_not_copies(text: str):
    assert copies_demonstration(text, DEMOS) is None


def test_copy_threshold_is_a_containment_share():
    text = "Find this car in the snow"  # 3-grams in the demo: 2 of 4 (0.5)
    assert copies_demonstration(text, [CAR], threshold=0.5) == "d06"
    assert copies_demonstration(text, [CAR], threshold=0.51) is None
    assert copies_demonstration(text, [], threshold=0.1) is None
    assert copies_demonstration("   ", DEMOS) is None


def test_copied_instructions_are_dropped_and_explained():
    copied = "Find this car in orange instead of silver"
    result = check_with(answer(*GOOD, copied), demonstrations=DEMOS)
    assert result.accepted == tuple(GOOD) and result.reason is None
    assert result.dropped == (f"copied_demonstration: {copied}",)
    assert check_with(answer(*GOOD, copied)).accepted == (*GOOD, copied)  # no demonstrations
    few = check_with(answer(GOOD[0], copied, "Same shoes"), demonstrations=DEMOS)
    assert few.reason == "too_few_instructions"
    assert few.dropped == (f"copied_demonstration: {copied}", "copied_demonstration: Same shoes")
    assert "copies an example instruction instead of describing this pair" in few.problem


def test_copy_check_comes_after_restating_and_before_duplicates():
    restated = Demonstration("x", "r", "d", ("A brown dog sleeping on a grey sofa",))
    result = check_with(
        answer(*GOOD, "A brown dog sleeping on a grey sofa", GOOD[0]),
        demonstrations=(restated, Demonstration("y", "r", "d", (GOOD[0],))),
    )
    assert result.accepted == tuple(GOOD[1:])
    assert [d.split(":")[0] for d in result.dropped] == [
        "copied_demonstration",
        "restates_target_caption",
        "copied_demonstration",
    ]


def test_the_packaged_demonstrations_do_not_copy_each_other():
    demonstrations = load_prompts().demonstrations
    for demonstration in demonstrations:
        others = [d for d in demonstrations if d.id != demonstration.id]
        for instruction in demonstration.instructions:
            assert copies_demonstration(instruction, others) is None, instruction
            assert copies_demonstration(instruction, [demonstration]) == demonstration.id


# grounding ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("word", "stem"),
    [
        ("dogs", "dog"),
        ("boxes", "box"),
        ("cities", "city"),
        ("running", "run"),
        ("falling", "fall"),
        ("glasses", "glass"),
        ("glass", "glass"),
        ("dresses", "dress"),
        ("bikes", "bik"),
        ("bike", "bik"),
        ("biking", "bik"),
        ("baked", "bak"),
        ("parked", "park"),
        ("bus", "bus"),
    ],
)
def test_stems_match_simple_inflections(word: str, stem: str):
    assert grounding_stems(word) == {stem}


def test_grounding_words_leave_out_function_and_request_words():
    assert grounding_stems("Find me another one just like this, but the same!") == frozenset()
    assert grounding_stems("Show the dogs SLEEPING on sofas") == {"dog", "sleep", "sofa"}
    grounding = grounding_stems(DOG[0]) | grounding_stems(DOG[1])
    assert is_grounded("Those pups asleep on a couch, but two dogs", grounding)
    assert not is_grounded("Those pups asleep on a couch", grounding)


def test_ungrounded_instructions_are_dropped_with_lexical_grounding():
    ungrounded = "Find something similar to this one"
    options = {"grounding": "lexical", "grounding_texts": DOG}
    result = check_with(answer(*GOOD, ungrounded, "Same sofas, but snowy"), **options)
    assert result.accepted == (*GOOD, "Same sofas, but snowy")
    assert result.dropped == (f"ungrounded: {ungrounded}",)
    assert check_with(answer(*GOOD, ungrounded)).dropped == ()  # grounding "off"
    empty = {"grounding": "lexical", "grounding_texts": ("", "  ")}
    assert check_with(answer(*GOOD, ungrounded), **empty).dropped == ()  # nothing to ground in


def test_too_few_grounded_instructions_explain_why():
    options = {"grounding": "lexical", "grounding_texts": DOG}
    result = check_with(answer(GOOD[0], "A cat on a bike", "Another one like it"), **options)
    assert result.reason == "too_few_instructions" and result.accepted == (GOOD[0],)
    assert result.dropped == ("ungrounded: A cat on a bike", "ungrounded: Another one like it")
    assert "names nothing from this pair's description or captions" in result.problem


def test_grounding_comes_after_the_copy_check_and_before_duplicates():
    options = {
        "grounding": "lexical",
        "grounding_texts": DOG,
        "demonstrations": DEMOS,
    }
    copied = "Find this car in orange instead of silver"
    result = check_with(answer(*GOOD, copied, "A cat on a bike", "A cat on a bike"), **options)
    assert result.dropped == (
        f"copied_demonstration: {copied}",
        "ungrounded: A cat on a bike",
        "ungrounded: A cat on a bike",
    )


def test_an_unknown_grounding_mode_is_refused():
    with pytest.raises(ValueError, match="grounding must be one of"):
        check_with(answer(*GOOD), grounding="semantic")


def test_the_demonstrations_instructions_are_grounded_in_their_own_texts():
    """Lexical grounding misses only synonyms ("vehicle" for a truck): rarely."""
    total = missed = 0
    for demonstration in load_prompts().demonstrations:
        texts = (demonstration.description, demonstration.target_caption)
        grounding = frozenset().union(*(grounding_stems(t) for t in texts))
        for instruction in demonstration.instructions:
            total += 1
            missed += not is_grounded(instruction, grounding)
    assert total >= 100 and missed <= total * 0.03
