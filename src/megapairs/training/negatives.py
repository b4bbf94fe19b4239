"""Which hard negatives a training query gets: the strategies of the paper's Table 4.

The query image is the row's `q_img`; the mined negatives are the entries of its `hns` other
than `q_img` (the released MegaPairs schema lists the query image first in `hns`, then the
mined ones; a dataset without it there works the same). A training batch needs the same
number of negatives for every query, so `select_negatives` always returns exactly
`negatives_per_query(strategy, count)` paths:

- `none`: no negatives (only in-batch ones).
- `query_image`: the query image (`count` is ignored).
- `mined`: `count` mined negatives drawn without replacement; a row with fewer than `count`
  is padded by drawing again, with replacement, from the ones it has.
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


def uses_hard_negatives(strategy: NegativeStrategy | str) -> bool:
    """Whether `strategy` reads a row's `hns` (the mined negatives)."""
    return NegativeStrategy(strategy) in (NegativeStrategy.MINED, NegativeStrategy.BOTH)


def select_negatives(
    hns: Sequence[str],
    strategy: NegativeStrategy | str,
    count: int,
    rng: random.Random,
    query_image: str | None = None,
) -> list[str]:
    """The negatives of one query: see the module docstring for each strategy.

    `query_image` is the row's `q_img`; None reads the released layout, whose `hns[0]` is
    the query image. Raises ValueError when the row lacks what the strategy needs (no
    query image for `query_image`/`both`, no mined negative for `mined`/`both`).
    """
    strategy = NegativeStrategy(strategy)
    wanted = negatives_per_query(strategy, count)
    if strategy is NegativeStrategy.NONE:
        return []
    if query_image is None:
        if not hns:
            raise ValueError(
                f"strategy {strategy.value!r} needs the query image in hns[0]; hns is empty"
            )
        query_image, mined = hns[0], list(hns[1:])
    else:
        mined = [path for path in hns if path != query_image]
    if strategy is NegativeStrategy.QUERY_IMAGE:
        return [query_image]
    if strategy is NegativeStrategy.MINED:
        return sample_mined(mined, wanted, rng)
    return [query_image, *sample_mined(mined, wanted - 1, rng)]


def sample_mined(mined: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """`count` of `mined` without replacement, padded with replacement when there are fewer."""
    if not mined:
        raise ValueError("no mined hard negatives (hns entries other than the query image)")
    if len(mined) >= count:
        return rng.sample(list(mined), count)
    shuffled = rng.sample(list(mined), len(mined))
    return shuffled + rng.choices(mined, k=count - len(mined))
