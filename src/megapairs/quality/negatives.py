"""The negatives an instruction is scored against: the pair's mined hard negatives, then
random corpus records drawn from (run seed, pair id) alone, so any worker, in any part
order, draws the same ones."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

import numpy as np

SALT = "score.random_negatives:"  # not the stream annotation draws from the same pair id


def pair_rng(seed: int, pair_id: str) -> np.random.Generator:
    """A generator seeded by the run seed and the pair id only."""
    digest = hashlib.sha256(f"{SALT}{pair_id}".encode()).digest()
    return np.random.default_rng([seed % 2**64, int.from_bytes(digest[:8], "little")])


def draw_random(
    pool: np.ndarray, count: int, seed: int, pair_id: str, exclude: Collection[int]
) -> list[int]:
    """`count` distinct ids of `pool` (sorted unique corpus ids) outside `exclude`, in draw
    order; every eligible id when there are no more than `count`."""
    if count <= 0 or len(pool) == 0:
        return []
    rng = pair_rng(seed, pair_id)
    banned = {int(i) for i in exclude}
    eligible = len(pool) - in_pool(pool, banned)
    if eligible <= count:
        order = rng.permutation(len(pool))
        return [int(pool[i]) for i in order if int(pool[i]) not in banned]
    chosen: dict[int, None] = {}
    while len(chosen) < count:
        for index in rng.integers(0, len(pool), size=2 * count + 8):
            record = int(pool[index])
            if record not in banned and record not in chosen:
                chosen[record] = None
                if len(chosen) == count:
                    break
    return list(chosen)


def in_pool(pool: np.ndarray, ids: Collection[int]) -> int:
    """How many of `ids` are in `pool` (sorted): O(len(ids) log len(pool))."""
    wanted = np.asarray(sorted(ids), dtype=np.int64)
    if wanted.size == 0:
        return 0
    found = np.minimum(np.searchsorted(pool, wanted), len(pool) - 1)
    return int(np.count_nonzero(pool[found] == wanted))


def pair_negatives(
    hard: Sequence[int],
    pool: np.ndarray,
    count: int,
    seed: int,
    pair_id: str,
    query: int,
    target: int,
) -> tuple[list[int], int]:
    """(negatives, how many of them are hard): the hard negatives (deduplicated, never the
    query or the target), then `count` random ones that are none of those."""
    kept = [int(i) for i in dict.fromkeys(int(h) for h in hard) if i not in (query, target)]
    randoms = draw_random(pool, count, seed, pair_id, {query, target, *kept})
    return kept + randoms, len(kept)
