"""The template backend's answers under every check the annotate stage applies: its
descriptions are not degenerate, and its instructions keep enough that are neither copies
of a packaged demonstration nor ungrounded in the pair's description and captions."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from megapairs.annotation.backends.template import (
    FALLBACK_SUBJECT,
    SUBJECT_WORDS,
    describe_pair,
    instruct_pair,
)
from megapairs.annotation.checks import InstructionCheck, check_description, check_instructions
from megapairs.annotation.prompts import load_prompts
from megapairs.annotation.types import PairContext

_VOCABULARY_TEXT = """
red blue green small large old wooden dog cat bicycle car tree house street beach sofa running
sleeping snow night city two three photo picture image a the of on with in some one another
same similar
"""
VOCABULARY = _VOCABULARY_TEXT.split()
EDGE_CAPTIONS = [
    None,
    "",
    "a photo",
    "an image of something",
    "the same one",
    "IMG_1234.JPG",
    "Ein Hund auf der Straße",
    "A brown dog sleeping on a grey sofa next to a window in a bright living room with "
    "plants, books and a tall lamp",
]

DEMONSTRATIONS = load_prompts().demonstrations


def random_captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 8))) for _ in range(count)
    ]


def template_check(query: str | None, target: str | None) -> InstructionCheck:
    """The template's instructions for the pair, checked as the annotate stage does."""
    context = PairContext("p", query, target, word_num=70)
    description = describe_pair(context)
    assert check_description(description)[1] is None, description
    return check_instructions(
        json.dumps({"instructions": instruct_pair(context)}),
        target,
        3,
        6,
        (3, 40),
        demonstrations=DEMONSTRATIONS,
        copy_threshold=0.6,
        grounding="lexical",
        grounding_texts=(description, target or "", query or ""),
    )


def test_every_pair_of_captions_keeps_enough_instructions():
    captions = [*random_captions(30), *EDGE_CAPTIONS]
    for query, target in itertools.product(captions, captions):
        check = template_check(query, target)
        assert check.reason is None, (query, target, check.dropped)
        assert 3 <= len(check.accepted) <= 6
        assert not any(d.startswith("copied_demonstration") for d in check.dropped)


@pytest.mark.parametrize(
    ("query", "target"),
    [
        ("a red bicycle against a wall", "a red bicycle against a wall"),
        ("a red bicycle against a wall", None),
        (None, "a blue bicycle in a park"),
        (None, None),
        ("a photo", "an image"),
    ],
)
def test_identical_and_missing_captions_keep_enough_instructions(
    query: str | None, target: str | None
):
    check = template_check(query, target)
    assert check.reason is None and len(check.accepted) >= 3
    generic = instruct_pair(PairContext("p", query, target, word_num=70))[-5:]
    assert not {f"ungrounded: {g}" for g in generic} & set(check.dropped)


def test_generic_requests_name_the_shared_caption_words_or_a_fallback():
    shared = instruct_pair(PairContext("p", "a red car by a tree", "a red car at night", 70))
    assert "find another picture of red car closely related to this one" in shared
    long_caption = " ".join(VOCABULARY[:20])
    generic = instruct_pair(PairContext("p", None, long_caption, 70))[-1]
    assert len(generic.split()) <= 10 + SUBJECT_WORDS
    for query, target in [(None, None), ("a photo", "the same one")]:
        context = PairContext("p", query, target, 70)
        assert FALLBACK_SUBJECT in describe_pair(context)
        assert all(FALLBACK_SUBJECT in i for i in instruct_pair(context)[-5:])


def test_the_template_is_deterministic():
    context = PairContext("p", "three old houses", "a house in the snow", 70)
    assert instruct_pair(context) == instruct_pair(context)
    assert describe_pair(context) == describe_pair(context)
