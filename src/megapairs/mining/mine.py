"""Mining correlated image pairs with hard negatives from per-channel neighbour lists.

Paper section 3.1; the rules are docs/design.md "Mining rules". For a query q,
a neighbour entry (t, s) of channel c is *in window* when `low_c < s < high_c`
(open interval, compared in float32, the precision scores are stored in),
*below* when `s <= low_c` and *above* when `s >= high_c`. Entries are judged
one by one: an entry above its window is never used, but does not stop the same
id from being used through another channel's (or another) entry.

- Targets: the in-window ids of all channels, taken round-robin over channels in
  the given order, each channel's by descending score, skipping ids already
  taken, up to `max_targets`. Each target records every channel that found it
  in window, with that channel's (highest in-window) score.
- Hard negatives of (q, t_i): the other in-window ids in the same round-robin
  order, then ids found only below the window (merged over channels by
  descending score, ties by channel order then list position), at most
  `num_hard_negatives`, never t_i, never q, never twice.
- q itself, ids < 0 (FAISS pads missing results with -1) and non-finite scores
  are never used.

`mine_query` mines one query from arrays, `mine_part` a whole part from
NEIGHBOURS_SCHEMA tables; both run the same code. `unpaired_rejects` explains
the queries that got no pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megapairs.config import MineConfig
from megapairs.schemas import NEIGHBOURS_SCHEMA, PAIRS_SCHEMA, rejects_table

Window = tuple[float, float]
NO_TARGET_IN_WINDOW = "no_target_in_window"
BLOCK_SIZE = 65_536  # queries whose lists are Python objects at once


class MinedPair(NamedTuple):
    """One (query, target) pair with the channels that found it and its hard negatives."""

    query_id: int
    target_id: int
    rank: int
    channels: tuple[str, ...]
    channel_scores: tuple[float, ...]
    hard_negative_ids: tuple[int, ...]
    hard_negative_topped_up: int

    @property
    def pair_id(self) -> str:
        return f"{self.query_id}-{self.target_id}"


@dataclass(frozen=True)
class ChannelLists:
    """One channel's neighbour lists, flattened: query `query_ids[i]` owns the next
    `lengths[i]` entries of `neighbour_ids` / `scores`."""

    query_ids: np.ndarray  # int64 (n,)
    lengths: np.ndarray  # int64 (n,)
    neighbour_ids: np.ndarray  # int64 (sum of lengths,)
    scores: np.ndarray  # float32 (sum of lengths,)

    @classmethod
    def from_table(cls, channel: str, table: pa.Table) -> ChannelLists:
        """Flatten a NEIGHBOURS_SCHEMA table; refuse duplicate queries and ragged rows."""
        table = _conform(channel, table)
        if table.column("id").null_count:
            raise ValueError(f"channel {channel!r}: neighbours table has rows without an id")
        query_ids = table.column("id").to_numpy().astype(np.int64)
        ids_col = table.column("neighbour_ids").combine_chunks()
        scores_col = table.column("scores").combine_chunks()
        lengths = _list_lengths(ids_col)
        ragged = np.flatnonzero(lengths != _list_lengths(scores_col))
        if ragged.size:
            raise ValueError(
                f"channel {channel!r}: query {query_ids[ragged[0]]} has "
                "neighbour_ids and scores of different lengths"
            )
        unique, counts = np.unique(query_ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"channel {channel!r}: query {unique[counts > 1][0]} appears twice")
        flat_ids = pc.fill_null(pc.list_flatten(ids_col), -1).to_numpy()
        flat_scores = pc.fill_null(pc.list_flatten(scores_col), np.nan).to_numpy()
        return cls(query_ids, lengths, flat_ids.astype(np.int64), flat_scores.astype(np.float32))

    @classmethod
    def single(cls, query_id: int, neighbour_ids: np.ndarray, scores: np.ndarray) -> ChannelLists:
        """The lists of one query."""
        neighbour_ids = np.asarray(neighbour_ids, dtype=np.int64).ravel()
        scores = np.asarray(scores, dtype=np.float32).ravel()
        if neighbour_ids.shape != scores.shape:
            raise ValueError(f"query {query_id}: {neighbour_ids.size} ids for {scores.size} scores")
        return cls(
            np.array([query_id], dtype=np.int64),
            np.array([neighbour_ids.size], dtype=np.int64),
            neighbour_ids,
            scores,
        )


def _conform(channel: str, table: pa.Table) -> pa.Table:
    missing = [name for name in NEIGHBOURS_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"channel {channel!r}: neighbours table lacks columns {missing}")
    try:
        return table.select(NEIGHBOURS_SCHEMA.names).cast(NEIGHBOURS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(
            f"channel {channel!r}: neighbours table does not fit the schema: {err}"
        ) from err


def _list_lengths(lists: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)


# classification ----------------------------------------------------------------


@dataclass(frozen=True)
class _Entries:
    """One channel's entries with their query's index in the sorted union of query ids."""

    query_index: np.ndarray  # int64, per entry
    neighbour_ids: np.ndarray
    scores: np.ndarray
    in_window: np.ndarray  # bool
    below: np.ndarray  # bool
    above: np.ndarray  # bool


def _classify(lists: ChannelLists, union: np.ndarray, window: Window) -> _Entries:
    """Place each usable entry in, below or above the window (q, ids < 0, NaN: none)."""
    query_index = np.repeat(np.searchsorted(union, lists.query_ids), lists.lengths)
    ids, scores = lists.neighbour_ids, lists.scores
    usable = (ids >= 0) & np.isfinite(scores) & (ids != union[query_index])
    low, high = np.float32(window[0]), np.float32(window[1])
    return _Entries(
        query_index=query_index,
        neighbour_ids=ids,
        scores=scores,
        in_window=usable & (scores > low) & (scores < high),
        below=usable & (scores <= low),
        above=usable & (scores >= high),
    )


@dataclass(frozen=True)
class _Grouped:
    """Entries sorted by query, then descending score; query u owns [starts[u], starts[u+1])."""

    starts: np.ndarray
    ids: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Grouped:
        """No entries for any of n queries."""
        return cls(np.zeros(n + 1, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    def block(self, first: int, stop: int) -> tuple[list[int], list[int], list[float]]:
        """Queries [first, stop) as Python lists: starts relative to the block, ids, scores."""
        lo, hi = self.starts[first], self.starts[stop]
        starts = (self.starts[first : stop + 1] - lo).tolist()
        return starts, self.ids[lo:hi].tolist(), self.scores[lo:hi].tolist()


def _group(query_index: np.ndarray, ids: np.ndarray, scores: np.ndarray, n: int) -> _Grouped:
    """Sort by (query, -score, given order) and find where each of n queries starts."""
    order = np.argsort(_descending_score_key(query_index, scores), kind="stable")
    starts = np.searchsorted(query_index[order], np.arange(n + 1))
    return _Grouped(starts, ids[order], scores[order])


def _descending_score_key(query_index: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One int64 per entry ordering by query, then descending finite float32 score.

    A stable sort of this one key is several times faster than a lexsort of three,
    and neighbour lists arrive nearly in this order already (per query, descending)."""
    bits = (scores.astype(np.float32) + np.float32(0)).view(np.int32)  # -0.0 becomes +0.0
    ascending = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    return query_index.astype(np.int64) * (1 << 33) + ((1 << 31) - ascending)


def _in_window_groups(entries: _Entries, n: int) -> _Grouped:
    keep = entries.in_window
    return _group(entries.query_index[keep], entries.neighbour_ids[keep], entries.scores[keep], n)


def _below_groups(entries: Sequence[_Entries], n: int) -> _Grouped:
    """Below-window entries of all channels merged; ties by channel order, then position."""
    return _group(
        np.concatenate([e.query_index[e.below] for e in entries] or [np.empty(0, np.int64)]),
        np.concatenate([e.neighbour_ids[e.below] for e in entries] or [np.empty(0, np.int64)]),
        np.concatenate([e.scores[e.below] for e in entries] or [np.empty(0, np.float32)]),
        n,
    )


# per-query selection -----------------------------------------------------------


def round_robin(ranked: Sequence[Sequence[int]], limit: int) -> list[int]:
    """Up to `limit` ids taken one per list in turn, each list in order, skipping ids taken."""
    order: list[int] = []
    taken: set[int] = set()
    pointers = [0] * len(ranked)
    progressed = True
    while progressed and len(order) < limit:
        progressed = False
        for c, ids in enumerate(ranked):
            p = pointers[c]
            while p < len(ids) and ids[p] in taken:
                p += 1
            if p < len(ids) and len(order) < limit:
                taken.add(ids[p])
                order.append(ids[p])
                p += 1
                progressed = True
            pointers[c] = p
    return order


def _assemble(
    query_id: int,
    channels: Sequence[str],
    in_window: Sequence[tuple[list[int], list[float]]],
    below: Sequence[int],
    max_targets: int,
    num_hard_negatives: int,
) -> list[MinedPair]:
    """The pairs of one query from its channels' in-window lists (descending score) and
    its merged below-window ids (descending score)."""
    n = num_hard_negatives
    # n + 1 in-window ids fill every pair's negatives; beyond that none is needed, and
    # when fewer exist, `ordered` holds all of them.
    ordered = round_robin([ids for ids, _ in in_window], max(max_targets, n + 1))
    if not ordered:
        return []
    head = ordered[: n + 1]
    top_up = _top_up(below, set(ordered), n + 1 - len(head)) if len(head) <= n else []
    pairs = []
    for rank, target in enumerate(ordered[:max_targets]):
        # target is head[rank] when rank < len(head), else not in head at all
        inside = (head[:rank] + head[rank + 1 :])[:n]
        extra = top_up[: n - len(inside)]
        found, scores = _channel_hits(target, channels, in_window)
        pairs.append(
            MinedPair(query_id, target, rank, found, scores, tuple(inside + extra), len(extra))
        )
    return pairs


def _channel_hits(
    target: int, channels: Sequence[str], in_window: Sequence[tuple[list[int], list[float]]]
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The channels that found `target` in window and their scores (the first in-window
    entry of a channel has its highest score)."""
    found: list[str] = []
    scores: list[float] = []
    for channel, (ids, channel_scores) in zip(channels, in_window, strict=True):
        if target in ids:
            found.append(channel)
            scores.append(channel_scores[ids.index(target)])
    return tuple(found), tuple(scores)


def _top_up(below: Sequence[int], in_window_ids: set[int], limit: int) -> list[int]:
    """The first `limit` distinct below-window ids that no channel found in window."""
    picked: list[int] = []
    seen = set(in_window_ids)
    for i in below:
        if len(picked) >= limit:
            break
        if i not in seen:
            seen.add(i)
            picked.append(i)
    return picked


# whole queries and parts -------------------------------------------------------


def _check_channels(given: Iterable[str], windows: Mapping[str, Window]) -> None:
    unknown = sorted(set(given) - set(windows))
    if unknown:
        raise ValueError(f"neighbours given for channels without a window: {unknown}")


def union_query_ids(lists: Iterable[ChannelLists]) -> np.ndarray:
    """The sorted distinct query ids of all channels."""
    parts = [cl.query_ids for cl in lists]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def mine_blocks(
    lists: Mapping[str, ChannelLists],
    windows: Mapping[str, Window],
    max_targets: int,
    num_hard_negatives: int,
    block_size: int = BLOCK_SIZE,
) -> Iterator[list[MinedPair]]:
    """The pairs of every query in `lists`, queries in ascending id order, in blocks of
    `block_size` queries, so only one block's entries are Python objects at a time.

    `windows` gives the channels and their order; a channel missing from `lists`
    has no neighbours for any query."""
    _check_channels(lists, windows)
    channels = list(windows)
    union = union_query_ids(lists.values())
    n = union.size
    entries = {c: _classify(lists[c], union, windows[c]) for c in channels if c in lists}
    in_window = [
        _in_window_groups(entries[c], n) if c in entries else _Grouped.empty(n) for c in channels
    ]
    below = _below_groups(list(entries.values()), n)
    del entries
    for first in range(0, n, block_size):
        stop = min(first + block_size, n)
        yield _mine_block(
            union[first:stop].tolist(),
            channels,
            [g.block(first, stop) for g in in_window],
            below.block(first, stop),
            max_targets,
            num_hard_negatives,
        )


def _mine_block(
    query_ids: list[int],
    channels: list[str],
    in_window: list[tuple[list[int], list[int], list[float]]],
    below: tuple[list[int], list[int], list[float]],
    max_targets: int,
    num_hard_negatives: int,
) -> list[MinedPair]:
    """The pairs of a block of queries from their (starts, ids, scores) lists."""
    below_starts, below_ids, _ = below
    pairs: list[MinedPair] = []
    for u, query_id in enumerate(query_ids):
        own = [(ids[st[u] : st[u + 1]], scores[st[u] : st[u + 1]]) for st, ids, scores in in_window]
        own_below = below_ids[below_starts[u] : below_starts[u + 1]]
        pairs.extend(_assemble(query_id, channels, own, own_below, max_targets, num_hard_negatives))
    return pairs


def mine_lists(
    lists: Mapping[str, ChannelLists],
    windows: Mapping[str, Window],
    max_targets: int,
    num_hard_negatives: int,
) -> list[MinedPair]:
    """All pairs of `mine_blocks` in one list."""
    blocks = mine_blocks(lists, windows, max_targets, num_hard_negatives)
    return [pair for block in blocks for pair in block]


def mine_query(
    query_id: int,
    candidates: Mapping[str, tuple[np.ndarray, np.ndarray]],
    windows: Mapping[str, Window],
    max_targets: int,
    num_hard_negatives: int,
) -> list[MinedPair]:
    """The pairs of one query from its (neighbour ids, scores) per channel.

    Channels are taken in `windows` order; one missing from `candidates` found nothing."""
    lists = {c: ChannelLists.single(query_id, ids, s) for c, (ids, s) in candidates.items()}
    return mine_lists(lists, windows, max_targets, num_hard_negatives)


def mine_part(
    neighbours: Mapping[str, pa.Table], windows: Mapping[str, Window], cfg: MineConfig
) -> pa.Table:
    """The PAIRS_SCHEMA table of one part from its channels' NEIGHBOURS_SCHEMA tables.

    `windows` gives the enabled channels in config order; each needs a table (a query
    may be missing from some of them)."""
    missing = [c for c in windows if c not in neighbours]
    if missing:
        raise ValueError(f"no neighbours table for channels {missing}")
    _check_channels(neighbours, windows)
    lists = {c: ChannelLists.from_table(c, neighbours[c]) for c in windows}
    blocks = mine_blocks(lists, windows, cfg.max_targets, cfg.num_hard_negatives)
    tables = [pairs_table(block) for block in blocks]
    return pa.concat_tables(tables) if tables else pairs_table([])


def pairs_table(pairs: Sequence[MinedPair]) -> pa.Table:
    """MinedPairs as a PAIRS_SCHEMA table, in the given order."""
    columns = {
        "pair_id": [p.pair_id for p in pairs],
        "query_id": [p.query_id for p in pairs],
        "target_id": [p.target_id for p in pairs],
        "rank": [p.rank for p in pairs],
        "channels": [p.channels for p in pairs],
        "channel_scores": [p.channel_scores for p in pairs],
        "hard_negative_ids": [p.hard_negative_ids for p in pairs],
        "hard_negative_topped_up": [p.hard_negative_topped_up for p in pairs],
    }
    return pa.table(columns, schema=PAIRS_SCHEMA)


# queries without pairs -----------------------------------------------------------


def unpaired_rejects(
    neighbours: Mapping[str, pa.Table],
    windows: Mapping[str, Window],
    pairs: pa.Table,
    stage: str = "mine",
) -> pa.Table:
    """A REJECTS_SCHEMA row for each query of `neighbours` that has no row in `pairs`,
    saying per channel how its neighbours fell around the window."""
    _check_channels(neighbours, windows)
    tables = {c: neighbours[c] for c in windows if c in neighbours}
    ids = [t.column("id").to_numpy().astype(np.int64) for t in tables.values()]
    union = np.unique(np.concatenate(ids)) if ids else np.empty(0, np.int64)
    union = union[~np.isin(union, pairs.column("query_id").to_numpy())]  # the unpaired
    lists = {
        c: ChannelLists.from_table(c, t.filter(pc.is_in(t["id"], pa.array(union))))
        for c, t in tables.items()
    }
    summaries = {
        c: _window_summary(_classify(cl, union, windows[c]), union.size) for c, cl in lists.items()
    }
    details = []
    for u in range(union.size):
        parts = [_describe(c, windows[c], summaries.get(c), u) for c in windows]
        details.append("no neighbour inside any channel window; " + "; ".join(parts))
    return rejects_table(union, stage, NO_TARGET_IN_WINDOW, details)


def _window_summary(entries: _Entries, n: int) -> dict[str, list]:
    """Per query: entries above and below the window and the best usable score."""
    usable = entries.in_window | entries.below | entries.above
    best = np.full(n, -np.inf, dtype=np.float64)
    np.maximum.at(best, entries.query_index[usable], entries.scores[usable])
    return {
        "above": np.bincount(entries.query_index[entries.above], minlength=n).tolist(),
        "below": np.bincount(entries.query_index[entries.below], minlength=n).tolist(),
        "best": best.tolist(),
    }


def _describe(channel: str, window: Window, summary: dict[str, list] | None, u: int) -> str:
    if summary is None or summary["best"][u] == -np.inf:
        return f"{channel}: no neighbours"
    low, high = window
    return (
        f"{channel}: {summary['above'][u]} at or above {high}, {summary['below'][u]} "
        f"at or below {low}, best {summary['best'][u]:.4f}"
    )
