"""Negative selection strategies (paper Table 4) over the released `hns` layout."""

import random

import pytest

from megapairs.training.negatives import (
    NegativeStrategy,
    negatives_per_query,
    select_negatives,
)

HNS = ["query.jpg", "n1.jpg", "n2.jpg", "n3.jpg", "n4.jpg", "n5.jpg"]
MINED = set(HNS[1:])


def test_none_gives_no_negatives() -> None:
    assert select_negatives(HNS, "none", 4, random.Random(0)) == []
    assert select_negatives([], NegativeStrategy.NONE, 4, random.Random(0)) == []
    assert negatives_per_query("none", 4) == 0


def test_query_image_is_the_first_hard_negative() -> None:
    assert select_negatives(HNS, "query_image", 4, random.Random(0)) == ["query.jpg"]
    assert negatives_per_query("query_image", 4) == 1


def test_mined_draws_distinct_negatives_never_the_query_image() -> None:
    rng = random.Random(0)
    draws = [select_negatives(HNS, "mined", 4, rng) for _ in range(50)]
    for chosen in draws:
        assert len(chosen) == 4 == negatives_per_query("mined", 4)
        assert len(set(chosen)) == 4
        assert set(chosen) <= MINED
    assert len({tuple(chosen) for chosen in draws}) > 1, "draws should vary with the rng"
    assert set().union(*draws) == MINED, "every mined negative should be drawn at some point"


def test_mined_is_reproducible_for_a_seed() -> None:
    first = select_negatives(HNS, "mined", 3, random.Random(7))
    assert select_negatives(HNS, "mined", 3, random.Random(7)) == first


def test_mined_pads_short_rows_with_replacement() -> None:
    chosen = select_negatives(["query.jpg", "n1.jpg", "n2.jpg"], "mined", 5, random.Random(0))
    assert len(chosen) == 5
    assert set(chosen) == {"n1.jpg", "n2.jpg"}, "all available negatives come first, then repeats"
    assert select_negatives(["q.jpg", "n1.jpg"], "mined", 3, random.Random(0)) == ["n1.jpg"] * 3


def test_both_puts_the_query_image_first_then_mined() -> None:
    chosen = select_negatives(HNS, "both", 4, random.Random(0))
    assert chosen[0] == "query.jpg"
    assert len(chosen) == 4 == negatives_per_query("both", 4)
    assert len(set(chosen[1:])) == 3
    assert set(chosen[1:]) <= MINED


@pytest.mark.parametrize("strategy", ["mined", "both"])
def test_rows_without_mined_negatives_are_refused(strategy: str) -> None:
    with pytest.raises(ValueError, match="no mined hard negatives"):
        select_negatives(["query.jpg"], strategy, 4, random.Random(0))


@pytest.mark.parametrize("strategy", ["query_image", "mined", "both"])
def test_empty_hns_is_refused(strategy: str) -> None:
    with pytest.raises(ValueError, match="hns is empty"):
        select_negatives([], strategy, 4, random.Random(0))


@pytest.mark.parametrize(("strategy", "count"), [("mined", 0), ("both", 1)])
def test_too_small_counts_are_refused(strategy: str, count: int) -> None:
    with pytest.raises(ValueError, match="needs count >="):
        negatives_per_query(strategy, count)


@pytest.mark.parametrize("hns", [HNS, HNS[1:], [*HNS[1:3], "query.jpg", *HNS[3:]]])
def test_the_query_image_is_q_img_wherever_hns_puts_it(hns: list[str]) -> None:
    """Given `query_image` (the row's q_img), hns may hold it first, elsewhere or not at all:
    the query-image negative is q_img and the mined ones are the other entries."""
    assert select_negatives(hns, "query_image", 4, random.Random(0), "query.jpg") == ["query.jpg"]
    rng = random.Random(0)
    for _ in range(20):
        mined = select_negatives(hns, "mined", 5, rng, query_image="query.jpg")
        assert sorted(mined) == sorted(MINED)  # all five, never the query image
        both = select_negatives(hns, "both", 4, rng, query_image="query.jpg")
        assert both[0] == "query.jpg" and set(both[1:]) <= MINED and len(set(both)) == 4


def test_with_q_img_the_query_image_needs_no_hns() -> None:
    assert select_negatives([], "query_image", 1, random.Random(0), "q.jpg") == ["q.jpg"]
    with pytest.raises(ValueError, match="no mined hard negatives"):
        select_negatives(["q.jpg"], "both", 2, random.Random(0), query_image="q.jpg")


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="'random'"):
        select_negatives(HNS, "random", 4, random.Random(0))
