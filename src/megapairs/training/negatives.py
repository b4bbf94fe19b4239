"""Which hard negatives a training query gets: the strategies of the paper's Table 4.

A dataset row's `hns` lists hard-negative image paths with the query image first, then the
mined negatives (the released MegaPairs schema). A training batch needs the same number of
negatives for every query, so `select_negatives` always returns exactly
`negatives_per_query(strategy, count)` paths:

- `none`: no negatives (only in-batch ones).
- `query_image`: the query image, `hns[0]` (`count` is ignored).
- `mined`: `count` mined negatives drawn from `hns[1:]` without replacement; a row with
  fewer than `count` is padded by drawing again, with replacement, from the ones it has.
- `both`: the query image, then `count - 1` mined negatives drawn as for `mined`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import StrEnum


class NegativeStrategy(StrEnum):
    """Hard negatives used in training (Table 4: none, Qry, HN, Qry + HN)."""

    NONE = "none"
    QUERY_IMAGE = "query_image"
    MINED = "mined"
    BOTH = "both"


def negatives_per_query(strategy: NegativeStrategy | str, count: int) -> int:
    """Number of negatives each query gets; `count` is the total for `mined` and `both`."""
    strategy = NegativeStrategy(strategy)
    if strategy is NegativeStrategy.NONE:
        return 0
    if strategy is NegativeStrategy.QUERY_IMAGE:
        return 1
    minimum = 1 if strategy is NegativeStrategy.MINED else 2
    if count < minimum:
        raise ValueError(f"strategy {strategy.value!r} needs count >= {minimum}, got {count}")
    return count


def select_negatives(
    hns: Sequence[str], strategy: NegativeStrategy | str, count: int, rng: random.Random
) -> list[str]:
    """The negatives of one query: see the module docstring for each strategy.

    Raises ValueError when the row lacks what the strategy needs (no query image for
    `query_image`/`both`, no mined negative for `mined`/`both`).
    """
    strategy = NegativeStrategy(strategy)
    wanted = negatives_per_query(strategy, count)
    if strategy is NegativeStrategy.NONE:
        return []
    if not hns:
        raise ValueError(
            f"strategy {strategy.value!r} needs the query image in hns[0]; hns is empty"
        )
    if strategy is NegativeStrategy.QUERY_IMAGE:
        return [hns[0]]
    if strategy is NegativeStrategy.MINED:
        return sample_mined(hns[1:], wanted, rng)
    return [hns[0], *sample_mined(hns[1:], wanted - 1, rng)]


def sample_mined(mined: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """`count` of `mined` without replacement, padded with replacement when there are fewer."""
    if not mined:
        raise ValueError("no mined hard negatives in hns[1:] to sample from")
    if len(mined) >= count:
        return rng.sample(list(mined), count)
    shuffled = rng.sample(list(mined), len(mined))
    return shuffled + rng.choices(mined, k=count - len(mined))
