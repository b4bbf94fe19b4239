"""Mining rules (docs/design.md "Mining rules") and the `mine` stage."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megapairs.config import ChannelConfig, MineConfig, PipelineConfig
from megapairs.mining.mine import (
    ChannelLists,
    MinedPair,
    _descending_score_key,
    mine_blocks,
    mine_part,
    mine_query,
    pairs_table,
    round_robin,
    unpaired_rejects,
)
from megapairs.mining.stage import MineStage, neighbours_folder, neighbours_stage_name
from megapairs.pipeline.runner import LocalRunner
from megapairs.runs import RunDir, read_table, write_table
from megapairs.schemas import NEIGHBOURS_SCHEMA, PAIRS_SCHEMA, REJECTS_DIR

WINDOWS = {"dino": (0.8, 0.96), "image": (0.5, 0.9), "caption": (0.6, 0.95)}
F32 = np.float32


def cands(**lists: list[tuple[int, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Channel -> (ids, scores) from lists of (id, score)."""
    return {
        c: (np.array([i for i, _ in e], dtype=np.int64), np.array([s for _, s in e], dtype=F32))
        for c, e in lists.items()
    }


def mine(query: int, candidates, windows=None, max_targets=3, negatives=5) -> list[MinedPair]:
    return mine_query(query, candidates, windows or WINDOWS, max_targets, negatives)


def targets(pairs: list[MinedPair]) -> list[int]:
    return [p.target_id for p in pairs]


# hand-built examples, one rule each ----------------------------------------------


def test_window_bounds_are_open():
    pairs = mine(0, cands(dino=[(1, 0.96), (2, 0.95), (3, 0.81), (4, 0.8)]))
    assert targets(pairs) == [2, 3]
    assert pairs[0].hard_negative_ids == (3, 4)  # 4 sits exactly at low: below, topped up
    assert pairs[0].hard_negative_topped_up == 1


def test_union_records_every_channel_and_its_score():
    pairs = mine(
        0,
        cands(dino=[(5, 0.9)], image=[(5, 0.7), (6, 0.6)], caption=[(6, 0.97), (5, 0.61)]),
        max_targets=5,
    )
    by_target = {p.target_id: p for p in pairs}
    assert set(by_target) == {5, 6}
    assert by_target[5].channels == ("dino", "image", "caption")
    assert by_target[5].channel_scores == (F32(0.9), F32(0.7), F32(0.61))
    assert by_target[6].channels == ("image",)  # caption's 0.97 is above its window
    assert by_target[6].channel_scores == (F32(0.6),)


def test_channels_follow_window_order_not_candidate_order():
    windows = {"caption": WINDOWS["caption"], "dino": WINDOWS["dino"]}
    pairs = mine(0, cands(dino=[(5, 0.9)], caption=[(5, 0.7)]), windows)
    assert pairs[0].channels == ("caption", "dino")


def test_round_robin_over_channels_in_config_order_skipping_taken():
    candidates = cands(
        dino=[(1, 0.95), (2, 0.9), (3, 0.85)],
        image=[(2, 0.89), (4, 0.8), (5, 0.7)],
        caption=[(6, 0.9), (1, 0.8)],
    )
    pairs = mine(0, candidates, max_targets=10)
    # round 1: dino 1, image 2, caption 6; round 2: dino 2 taken -> 3, image 4,
    # caption 1 taken -> exhausted; round 3: image 5.
    assert targets(pairs) == [1, 2, 6, 3, 4, 5]
    assert [p.rank for p in pairs] == list(range(6))
    assert [p.pair_id for p in pairs[:2]] == ["0-1", "0-2"]


def test_each_channel_ranked_by_descending_score_whatever_the_list_order():
    pairs = mine(0, cands(dino=[(1, 0.85), (2, 0.93), (3, 0.9)]), max_targets=3)
    assert targets(pairs) == [2, 3, 1]


def test_targets_capped_and_negatives_include_uncapped_candidates():
    candidates = cands(dino=[(1, 0.95), (2, 0.9), (3, 0.85)], image=[(4, 0.8), (5, 0.7)])
    pairs = mine(0, candidates, max_targets=2, negatives=10)
    assert targets(pairs) == [1, 4]
    # negatives: the whole in-window union in round-robin order, minus the target
    assert pairs[0].hard_negative_ids == (4, 2, 5, 3)
    assert pairs[1].hard_negative_ids == (1, 2, 5, 3)
    assert all(p.hard_negative_topped_up == 0 for p in pairs)


def test_negatives_capped_at_requested_number():
    candidates = cands(dino=[(i, 0.95 - i * 0.01) for i in range(1, 10)])
    pairs = mine(0, candidates, max_targets=3, negatives=4)
    assert pairs[0].hard_negative_ids == (2, 3, 4, 5)
    assert pairs[2].hard_negative_ids == (1, 2, 4, 5)


def test_top_up_from_below_window_merged_by_score_never_above():
    candidates = cands(
        dino=[(1, 0.99), (2, 0.9), (3, 0.7), (4, 0.5)],
        image=[(5, 0.95), (6, 0.6), (7, 0.45), (3, 0.4)],
    )
    pairs = mine(0, candidates, negatives=5)
    assert targets(pairs) == [2, 6]
    # in-window first, then below: 3 (0.7), 7 (0.45 below image's 0.5), 4 (0.5 below dino)
    assert pairs[0].hard_negative_ids == (6, 3, 4, 7)
    assert pairs[0].hard_negative_topped_up == 3
    assert 1 not in pairs[0].hard_negative_ids and 5 not in pairs[0].hard_negative_ids


def test_below_window_id_that_is_in_window_elsewhere_is_not_topped_up_twice():
    candidates = cands(dino=[(1, 0.9), (2, 0.7)], image=[(2, 0.6), (1, 0.3)])
    pairs = mine(0, candidates, negatives=5)
    assert targets(pairs) == [1, 2]
    assert pairs[0].hard_negative_ids == (2,)
    assert pairs[1].hard_negative_ids == (1,)  # 1's below-window image entry adds nothing


def test_fewer_negatives_when_candidates_run_out():
    pairs = mine(0, cands(dino=[(1, 0.9), (2, 0.5)]), negatives=5)
    assert pairs[0].hard_negative_ids == (2,)
    assert pairs[0].hard_negative_topped_up == 1


def test_no_in_window_candidate_means_no_pairs():
    assert mine(0, cands(dino=[(1, 0.99), (2, 0.5)], image=[])) == []


def test_query_among_its_own_neighbours_is_never_used():
    candidates = cands(dino=[(7, 0.95), (1, 0.9), (7, 0.5)], image=[(7, 0.7), (2, 0.3)])
    pairs = mine(7, candidates, negatives=5)
    assert targets(pairs) == [1]
    assert pairs[0].hard_negative_ids == (2,)


def test_padding_ids_and_nan_scores_are_ignored():
    candidates = cands(dino=[(1, 0.9), (-1, 0.85), (2, float("nan")), (-1, -math.inf)])
    pairs = mine(0, candidates)
    assert targets(pairs) == [1]
    assert pairs[0].hard_negative_ids == ()


def test_channel_missing_from_candidates_found_nothing():
    pairs = mine(0, cands(image=[(1, 0.7)]))
    assert targets(pairs) == [1] and pairs[0].channels == ("image",)


def test_candidates_for_a_channel_without_window_are_refused():
    with pytest.raises(ValueError, match=r"without a window.*'other'"):
        mine(0, cands(other=[(1, 0.9)]))


def test_zero_negatives_requested():
    pairs = mine(0, cands(dino=[(1, 0.9), (2, 0.85), (3, 0.5)]), negatives=0)
    assert [p.hard_negative_ids for p in pairs] == [(), ()]


def test_round_robin_limit():
    assert round_robin([[1, 2, 3], [2, 4]], limit=3) == [1, 2, 3]
    assert round_robin([[], [5]], limit=9) == [5]


# properties over random neighbour lists ------------------------------------------

SCORES = [-1.0, 0.3, 0.5, 0.55, 0.6, 0.7, 0.79, 0.8, 0.85, 0.9, 0.95, 0.96, 0.99, math.nan]
entry = st.tuples(st.integers(-1, 14), st.sampled_from(SCORES) | st.floats(-1, 1, width=32))
channel_lists = st.dictionaries(st.sampled_from(list(WINDOWS)), st.lists(entry, max_size=25))


def reference_round_robin(ranked: list[list[int]]) -> list[int]:
    """Simulate the rule by popping from copies of the lists."""
    queues = [list(ids) for ids in ranked]
    order: list[int] = []
    while any(queues):
        for queue in queues:
            while queue and queue[0] in order:
                queue.pop(0)
            if queue:
                order.append(queue.pop(0))
    return order


def spec(query: int, lists: dict[str, list[tuple[int, float]]], windows):
    """Per channel, best in-window and best below-window score of each usable id."""
    inside: dict[str, dict[int, float]] = {}
    below: dict[int, float] = {}
    ranked = []
    for channel, (low, high) in windows.items():
        inside[channel] = {}
        usable = [(i, F32(s)) for i, s in lists.get(channel, []) if i >= 0 and i != query]
        entries = sorted([(i, s) for i, s in usable if np.isfinite(s)], key=lambda e: -e[1])
        in_window = [(i, s) for i, s in entries if F32(low) < s < F32(high)]
        for i, s in in_window:
            inside[channel].setdefault(i, float(s))
        for i, s in entries:
            if s <= F32(low):
                below[i] = max(below.get(i, -math.inf), float(s))
        ranked.append([i for i, _ in in_window])
    union = set().union(*(set(d) for d in inside.values()))
    below_only = {i: s for i, s in below.items() if i not in union}
    return inside, union, below_only, reference_round_robin(ranked)


def check_invariants(query, lists, windows, max_targets, num_negatives, pairs):
    inside, union, below_only, order = spec(query, lists, windows)
    found = targets(pairs)
    assert found == order[:max_targets]
    assert len(found) == len(set(found)) == min(max_targets, len(union))
    assert query not in found
    for rank, pair in enumerate(pairs):
        assert (pair.query_id, pair.rank, pair.pair_id) == (query, rank, f"{query}-{found[rank]}")
        t = pair.target_id
        expected = [c for c in windows if t in inside[c]]
        assert list(pair.channels) == expected
        for channel, score in zip(pair.channels, pair.channel_scores, strict=True):
            low, high = windows[channel]
            assert F32(low) < F32(score) < F32(high)
            assert score == inside[channel][t]
        negatives = pair.hard_negative_ids
        n_inside = len(negatives) - pair.hard_negative_topped_up
        assert len(set(negatives)) == len(negatives) <= num_negatives
        assert t not in negatives and query not in negatives
        assert list(negatives[:n_inside]) == [i for i in order if i != t][:n_inside]
        topped = negatives[n_inside:]
        assert all(i in below_only for i in topped)
        assert [below_only[i] for i in topped] == sorted(
            (below_only[i] for i in topped), reverse=True
        )
        if topped:
            cut = min(below_only[i] for i in topped)
            assert all(s <= cut for i, s in below_only.items() if i not in topped)
        assert len(negatives) == min(num_negatives, len(union) - 1 + len(below_only))


@settings(max_examples=300, deadline=None)
@given(
    query=st.integers(0, 14),
    lists=channel_lists,
    enabled=st.lists(st.sampled_from(list(WINDOWS)), min_size=1, unique=True),
    max_targets=st.integers(1, 6),
    num_negatives=st.integers(0, 8),
)
def test_mining_invariants(query, lists, enabled, max_targets, num_negatives):
    windows = {c: WINDOWS[c] for c in enabled}  # any subset, in any order
    lists = {c: e for c, e in lists.items() if c in windows}
    pairs = mine(query, cands(**lists), windows, max_targets, num_negatives)
    check_invariants(query, lists, windows, max_targets, num_negatives, pairs)


def neighbours_table(rows: dict[int, list[tuple[int, float]]]) -> pa.Table:
    ids = sorted(rows)
    return pa.table(
        {
            "id": ids,
            "neighbour_ids": [[i for i, _ in rows[q]] for q in ids],
            "scores": [[s for _, s in rows[q]] for q in ids],
        },
        schema=NEIGHBOURS_SCHEMA,
    )


part_lists = st.dictionaries(
    st.sampled_from(list(WINDOWS)),
    st.dictionaries(st.integers(0, 14), st.lists(entry, max_size=12), max_size=8),
)


@settings(max_examples=100, deadline=None)
@given(per_channel=part_lists, cfg=st.builds(MineConfig, max_targets=st.integers(1, 4)))
def test_mine_part_equals_mine_query_per_query(per_channel, cfg):
    windows = dict(WINDOWS)
    tables = {c: neighbours_table(per_channel.get(c, {})) for c in windows}
    table = mine_part(tables, windows, cfg)
    assert table.schema == PAIRS_SCHEMA
    queries = sorted({q for rows in per_channel.values() for q in rows})
    expected = []
    for q in queries:
        lists = {c: rows[q] for c, rows in per_channel.items() if q in rows}
        pairs = mine(q, cands(**lists), windows, cfg.max_targets, cfg.num_hard_negatives)
        check_invariants(q, lists, windows, cfg.max_targets, cfg.num_hard_negatives, pairs)
        expected.extend(pairs)
    assert table.equals(pairs_table(expected))
    lists = {c: ChannelLists.from_table(c, t) for c, t in tables.items()}
    blocks = list(mine_blocks(lists, windows, cfg.max_targets, cfg.num_hard_negatives, 3))
    assert [p for block in blocks for p in block] == expected
    assert all(len({p.query_id for p in block}) <= 3 for block in blocks)
    rejects = unpaired_rejects(tables, windows, table)
    paired = set(table.column("query_id").to_pylist())
    assert sorted(rejects.column("id").to_pylist()) == sorted(set(queries) - paired)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3), st.floats(width=32, allow_nan=False) | st.sampled_from(SCORES[:-1])
        ),
        max_size=40,
    )
)
@example([(0, -0.0), (0, 0.0), (1, 0.0), (1, -0.0)])  # equal scores keep their order
def test_sort_key_orders_by_query_then_descending_score(entries):
    query_index = np.array([q for q, _ in entries], dtype=np.int64)
    scores = np.array([s for _, s in entries], dtype=F32)
    got = np.argsort(_descending_score_key(query_index, scores), kind="stable")
    expected = sorted(range(len(entries)), key=lambda i: (query_index[i], -scores[i]))
    assert got.tolist() == expected


def test_neighbour_tables_are_validated():
    good = neighbours_table({1: [(2, 0.9)]})
    cfg = MineConfig()
    windows = {"dino": WINDOWS["dino"]}
    ragged = pa.table(
        {"id": [1], "neighbour_ids": [[2, 3]], "scores": [[0.9]]}, schema=NEIGHBOURS_SCHEMA
    )
    with pytest.raises(ValueError, match="'dino': query 1 has neighbour_ids and scores"):
        mine_part({"dino": ragged}, windows, cfg)
    with pytest.raises(ValueError, match="query 1 appears twice"):
        mine_part({"dino": pa.concat_tables([good, good])}, windows, cfg)
    with pytest.raises(ValueError, match=r"lacks columns \['scores'\]"):
        mine_part({"dino": good.drop_columns(["scores"])}, windows, cfg)
    with pytest.raises(ValueError, match=r"no neighbours table for channels \['image'\]"):
        mine_part({"dino": good}, {**windows, "image": WINDOWS["image"]}, cfg)


def test_rejects_say_why_a_query_got_no_pair():
    tables = {
        "dino": neighbours_table({1: [(2, 0.99), (3, 0.4)], 2: [(1, 0.9)]}),
        "image": neighbours_table({2: [(3, 0.7)]}),
    }
    windows = {"dino": WINDOWS["dino"], "image": WINDOWS["image"]}
    pairs = mine_part(tables, windows, MineConfig())
    rejects = unpaired_rejects(tables, windows, pairs)
    assert rejects.column("id").to_pylist() == [1]
    assert rejects.column("reason").to_pylist() == ["no_target_in_window"]
    detail = rejects.column("detail")[0].as_py()
    assert "dino: 1 at or above 0.96, 1 at or below 0.8, best 0.9900" in detail
    assert "image: no neighbours" in detail


# the stage --------------------------------------------------------------------

CHANNEL_ROWS = {
    "dino": {
        "part-00000": {1: [(2, 0.9), (3, 0.85), (4, 0.99)], 2: [(1, 0.9)], 3: [(9, 0.3)]},
        "part-00001": {1_000_000: [(1_000_001, 0.82), (2, 0.7)], 1_000_001: [(1_000_000, 0.82)]},
    },
    "image": {
        "part-00000": {1: [(3, 0.6), (5, 0.7)], 2: [(1, 0.4)]},
        "part-00001": {1_000_000: [(3, 0.55)], 1_000_001: []},
    },
    "caption": {  # 3 and 1_000_001 have no caption
        "part-00000": {1: [(5, 0.93), (2, 0.7)], 2: [(6, 0.7)]},
        "part-00001": {1_000_000: [(1_000_001, 0.65)]},
    },
}


def config(enabled=("dino", "image", "caption"), **mine_cfg) -> PipelineConfig:
    channels = {
        c: ChannelConfig(encoder="test", window=WINDOWS[c], enabled=c in enabled) for c in WINDOWS
    }
    return PipelineConfig(channels=channels, mine=MineConfig(**mine_cfg))


def write_neighbours(run: RunDir, rows=CHANNEL_ROWS) -> None:
    for channel, parts in rows.items():
        for part, per_query in parts.items():
            path = run.part_path(neighbours_folder(channel), part)
            write_table(path, neighbours_table(per_query))
            run.mark_done(neighbours_stage_name(channel), part, {"queries": len(per_query)})


def run_mine(root: Path, cfg: PipelineConfig):
    run = RunDir(root)
    return run, LocalRunner(run, cfg, progress=False).run_stage(MineStage(cfg))


def test_stage_writes_pairs_rejects_and_counts(tmp_path):
    run = RunDir(tmp_path)
    write_neighbours(run)
    run, result = run_mine(tmp_path, config(max_targets=2, num_hard_negatives=2))
    assert (result.parts, result.computed) == (2, 2)
    first = read_table(run.part_path("pairs", "part-00000"))
    assert first.column("pair_id").to_pylist() == ["1-2", "1-5", "2-1", "2-6"]
    assert first.column("hard_negative_ids").to_pylist() == [[5, 3], [2, 3], [6], [1]]
    assert first.column("channels")[1].as_py() == ["image", "caption"]
    rejects = read_table(run.folder(REJECTS_DIR) / "mine-part-00000.parquet")
    assert rejects.column("id").to_pylist() == [3]
    assert result.counts == {
        "queries": 5,
        "not_in_any_channel": 0,  # no ingest stage in this run: nothing to compare against
        "queries_with_pairs": 4,
        "pairs": 7,
        "hard_negatives": 10,
        "topped_up": 2,
        "pairs_dino": 4,
        "pairs_image": 2,
        "pairs_caption": 4,
    }


@pytest.mark.parametrize(
    "enabled",
    [c for n in (1, 2, 3) for c in itertools.combinations(WINDOWS, n)],
    ids=lambda c: "+".join(c),
)
def test_disabled_channels_contribute_nothing(tmp_path, enabled):
    run = RunDir(tmp_path)
    write_neighbours(run)
    windows = {c: WINDOWS[c] for c in enabled}
    run, result = run_mine(tmp_path, config(enabled))
    for part in ("part-00000", "part-00001"):
        tables = {c: neighbours_table(CHANNEL_ROWS[c][part]) for c in enabled}
        got = read_table(run.part_path("pairs", part))
        assert got.equals(mine_part(tables, windows, MineConfig()))
        used = {c for row in got.column("channels").to_pylist() for c in row}
        assert used <= set(enabled)
    assert {k for k in result.counts if k.startswith("pairs_")} == {f"pairs_{c}" for c in enabled}


def test_disabled_channel_may_lack_files(tmp_path):
    run = RunDir(tmp_path)
    write_neighbours(run, {c: CHANNEL_ROWS[c] for c in ("dino", "image")})
    _, result = run_mine(tmp_path, config(("dino", "image")))
    assert result.parts == 2


def test_plan_refuses_channels_with_different_finished_parts(tmp_path):
    run = RunDir(tmp_path)
    rows = {**CHANNEL_ROWS, "image": {"part-00000": CHANNEL_ROWS["image"]["part-00000"]}}
    write_neighbours(run, rows)
    with pytest.raises(RuntimeError, match=r"neighbours\.image lacks part-00001"):
        MineStage(config()).plan(run)
    assert MineStage(config(("dino", "caption"))).plan(run) == ["part-00000", "part-00001"]


def test_plan_refuses_without_enabled_channels(tmp_path):
    with pytest.raises(ValueError, match="at least one enabled channel"):
        MineStage(config(())).plan(RunDir(tmp_path))


def test_resumed_run_gives_identical_parquet(tmp_path):
    run = RunDir(tmp_path)
    write_neighbours(run)
    cfg = config(max_targets=2)
    run_mine(tmp_path, cfg)
    path = run.part_path("pairs", "part-00001")
    before = path.read_bytes()
    path.unlink()
    (tmp_path / "_progress" / "mine" / "part-00001.json").unlink()
    _, result = run_mine(tmp_path, cfg)
    assert (result.parts, result.computed) == (2, 1)
    assert path.read_bytes() == before
    assert read_table(path).num_rows == 3
