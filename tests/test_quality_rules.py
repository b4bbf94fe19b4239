"""The quality gate's pure rules (ranks, margins, ties, shortcuts, false negatives) and its
random negatives (reproducible from the seed and the pair id alone)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megapairs.quality.negatives import draw_random, in_pool, pair_negatives
from megapairs.quality.rules import (
    assess,
    false_negatives,
    is_shortcut,
    margin,
    rank,
)


def test_rank_counts_negatives_at_or_above_the_target() -> None:
    assert rank(0.9, [0.1, 0.5, 0.89]) == 1
    assert rank(0.5, [0.9, 0.1, 0.7]) == 3
    assert rank(0.5, [0.5]) == 2  # a tie counts against the target
    assert rank(0.5, [0.5, 0.5, 0.2]) == 3
    assert rank(-0.2, np.array([-0.3, -0.1])) == 2


def test_margin_is_target_minus_best_negative() -> None:
    assert margin(0.9, [0.1, 0.5]) == pytest.approx(0.4)
    assert margin(0.3, [0.1, 0.5]) == pytest.approx(-0.2)
    assert margin(0.5, [0.5]) == 0.0


def test_no_negatives_rank_one_infinite_margin_no_shortcut() -> None:
    assert rank(0.1, []) == 1
    assert margin(0.1, []) == math.inf
    assert not is_shortcut(1, 0)


def test_shortcut_needs_rank_one_among_some_negatives() -> None:
    assert is_shortcut(1, 3)
    assert not is_shortcut(2, 3)


def test_false_negatives_are_hard_negatives_at_or_above_the_target() -> None:
    assert false_negatives(0.5, [0.6, 0.5, 0.4], [10, 11, 12]) == [10, 11]
    assert false_negatives(0.5, [], []) == []
    with pytest.raises(ValueError):
        false_negatives(0.5, [0.6], [1, 2])


def test_assess_combines_the_three_rankings() -> None:
    # negatives: two hard (ids 7, 8), then two random (ids 20, 21)
    composed = np.array([0.8, 0.9, 0.2, 0.8, 0.1])
    text_only = np.array([0.7, 0.1, 0.2, 0.3, 0.4])
    image_only = np.array([0.5, 0.6, 0.1, 0.1, 0.1])
    found = assess(composed, text_only, image_only, [7, 8, 20, 21], hard=2)
    assert found.target_score == pytest.approx(0.8)
    assert found.rank == 3  # 0.9 above, 0.8 tied (a random negative)
    assert found.margin == pytest.approx(-0.1)
    assert (found.text_only_rank, found.text_shortcut) == (1, True)
    assert (found.image_only_rank, found.image_shortcut) == (2, False)
    assert found.false_negative_ids == [7]  # the tied random negative is not flagged


def test_an_image_shortcut_is_an_image_that_finds_the_target_without_the_instruction() -> None:
    composed = np.array([0.9, 0.1])
    image_first = np.array([0.9, 0.1])
    text_misses, text_finds = np.array([0.1, 0.9]), np.array([0.9, 0.1])
    alone = assess(composed, text_misses, image_first, [5], hard=1)
    assert (alone.image_shortcut, alone.text_shortcut) == (True, False)
    both = assess(composed, text_finds, image_first, [5], hard=1)  # the instruction finds it
    assert (both.image_shortcut, both.text_shortcut) == (False, True)


def test_assess_refuses_vectors_of_another_length() -> None:
    with pytest.raises(ValueError):
        assess(np.zeros(3), np.zeros(3), np.zeros(2), [1, 2], hard=1)


# random negatives -------------------------------------------------------------------------
POOL = np.arange(0, 1000, 3, dtype=np.int64)  # sorted corpus ids


def test_random_negatives_are_reproducible_distinct_and_exclude_what_they_must() -> None:
    exclude = {0, 3, 6, 999}
    first = draw_random(POOL, 20, 7, "12-34", exclude)
    assert first == draw_random(POOL, 20, 7, "12-34", exclude)
    assert len(first) == len(set(first)) == 20
    assert not set(first) & exclude and set(first) <= set(POOL.tolist())
    assert first != draw_random(POOL, 20, 7, "12-35", exclude)  # another pair
    assert first != draw_random(POOL, 20, 8, "12-34", exclude)  # another seed


def test_a_draw_does_not_depend_on_what_was_drawn_before() -> None:
    alone = draw_random(POOL, 5, 1, "b", set())
    draw_random(POOL, 50, 1, "a", set())
    assert draw_random(POOL, 5, 1, "b", set()) == alone


def test_a_small_pool_gives_every_eligible_id_once() -> None:
    pool = np.array([1, 2, 3, 4, 5], dtype=np.int64)
    drawn = draw_random(pool, 10, 0, "p", {2, 9})
    assert sorted(drawn) == [1, 3, 4, 5]
    assert draw_random(pool, 0, 0, "p", set()) == []
    assert draw_random(np.array([], np.int64), 3, 0, "p", set()) == []


def test_pair_negatives_put_hard_ones_first_then_random_ones() -> None:
    negatives, hard = pair_negatives([9, 12, 9, 5], POOL, 4, 0, "5-6", query=5, target=6)
    assert negatives[:2] == [9, 12] and hard == 2  # deduplicated, never the query
    assert len(negatives) == 6 and len(set(negatives)) == 6
    assert not {5, 6} & set(negatives[2:])


def test_in_pool_counts_members() -> None:
    assert in_pool(POOL, {0, 1, 3, 999, 2000}) == 3
    assert in_pool(POOL, set()) == 0
