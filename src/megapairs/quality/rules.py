"""The quality rules over one instruction's scores: pure, deterministic functions.

Each rule sees the target's score and its negatives' scores under one query (composed,
text-only or image-only). Shortcuts teach no composition: a *text shortcut* is an
instruction that ranks the target first on its own (it needs no image); an *image
shortcut* is a query image that ranks the target first on its own while the instruction
alone does not (the instruction adds nothing the image lacks, so a model can ignore it).
The image test alone would be a property of the pair, the same for every instruction.
Ties count against the target: a negative scoring exactly the
target's score outranks it. Without negatives there is no evidence against the target:
its rank is 1, its margin `+inf` (so a `min_margin` filter keeps it, as `max_rank` does)
and no shortcut is flagged (a shortcut needs a negative to beat).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NO_NEGATIVES_MARGIN = math.inf


def rank(target: float, negatives: Sequence[float] | np.ndarray) -> int:
    """1 + how many negatives score >= the target (1-based; ties against the target)."""
    return 1 + int(np.count_nonzero(np.asarray(negatives, dtype=np.float64) >= target))


def margin(target: float, negatives: Sequence[float] | np.ndarray) -> float:
    """Target score minus the best negative's; `+inf` without negatives."""
    values = np.asarray(negatives, dtype=np.float64)
    return NO_NEGATIVES_MARGIN if values.size == 0 else float(target - values.max())


def is_shortcut(single_rank: int, negatives: int) -> bool:
    """Whether one modality alone ranks the target first among at least one negative."""
    return negatives > 0 and single_rank == 1


def false_negatives(
    target: float, hard_scores: Sequence[float] | np.ndarray, hard_ids: Sequence[int]
) -> list[int]:
    """The hard negatives whose composed score is >= the target's (likely also matches)."""
    scores = np.asarray(hard_scores, dtype=np.float64)
    if len(scores) != len(hard_ids):
        raise ValueError(f"{len(scores)} scores for {len(hard_ids)} hard negatives")
    return [int(i) for i, s in zip(hard_ids, scores, strict=True) if s >= target]


@dataclass(frozen=True)
class Assessment:
    """What the rules say about one instruction."""

    target_score: float
    rank: int
    margin: float
    text_only_rank: int
    image_only_rank: int
    text_shortcut: bool
    image_shortcut: bool
    false_negative_ids: list[int]


def assess(
    composed: np.ndarray,
    text_only: np.ndarray,
    image_only: np.ndarray,
    negative_ids: Sequence[int],
    hard: int,
) -> Assessment:
    """The rules over three score vectors, each `[target, *negatives]` in `negative_ids`
    order, whose first `hard` negatives are the mined hard negatives (the rest random)."""
    count = len(negative_ids)
    if not len(composed) == len(text_only) == len(image_only) == count + 1:
        raise ValueError(f"score vectors must hold the target and {count} negatives")
    target = float(composed[0])
    text_rank = rank(float(text_only[0]), text_only[1:])
    image_rank = rank(float(image_only[0]), image_only[1:])
    return Assessment(
        target_score=target,
        rank=rank(target, composed[1:]),
        margin=margin(target, composed[1:]),
        text_only_rank=text_rank,
        image_only_rank=image_rank,
        text_shortcut=is_shortcut(text_rank, count),
        image_shortcut=is_shortcut(image_rank, count) and not is_shortcut(text_rank, count),
        false_negative_ids=false_negatives(target, composed[1 : hard + 1], negative_ids[:hard]),
    )
