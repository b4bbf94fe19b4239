"""The quality gate: export.filter's rules on hand-written score rows (dataset/gate.py), and
export with scores on the fixture run, rules on and off."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gate_fixtures import (
    GATE_RULES,
    SCORES,
    _score_row,
    gate_config,
    write_neighbours,
    write_scores,
)
from run_fixtures import INSTRUCTIONS, PAIRS, RECORDS, FixtureRun, build_run, fixture_config

from megapairs.config import FilterConfig, PipelineConfig
from megapairs.corpus.store import read_rejects
from megapairs.dataset.export import INFO_FILE, ExportError, ExportStage, image_relpath
from megapairs.dataset.gate import (
    RULES,
    ChannelNeighbours,
    Dropped,
    below_window_candidates,
    failed_rule,
    gate_counts,
    gate_instructions,
    gate_pair,
    reject_reason,
    rule_detail,
    top_up,
)
from megapairs.pipeline.runner import LocalRunner, StageConfigChanged, StageResult
from megapairs.runs import RunDir
from megapairs.schemas import (
    DATASET_SCHEMA,
    PART_STRIDE,
    REJECTS_SCHEMA,
    SCORED_DATASET_SCHEMA,
    SCORES_DIR,
)

S = PART_STRIDE


def score(**values: Any) -> dict[str, Any]:
    """A score row that passes every rule, with `values` changed."""
    row = {
        "rank": 1,
        "margin": 0.1,
        "text_only_rank": 5,
        "image_only_rank": 5,
        "text_shortcut": False,
        "image_shortcut": False,
        "false_negative_ids": [],
        "judge_verdict": "yes",
    }
    return {**row, **values}


def rules(**values: Any) -> FilterConfig:
    return FilterConfig(**values)


def no_candidates(query_id: int) -> list[int]:
    raise AssertionError(f"no top-up expected (asked for query {query_id})")


# rules ---------------------------------------------------------------------------------


def test_rank_threshold_keeps_the_tie() -> None:
    scores = [score(rank=1), score(rank=2), score(rank=3), score(rank=None)]
    kept, dropped = gate_instructions(scores, rules(max_rank=2))
    assert kept == [0, 1]
    assert dropped == [
        Dropped(2, "max_rank", "rank 3 > 2"),
        Dropped(3, "max_rank", "rank None > 2"),
    ]
    assert gate_instructions(scores, rules())[0] == [0, 1, 2, 3]  # max_rank 0: off


def test_margin_threshold_keeps_the_tie() -> None:
    margins = [0.05, 0.0500001, 0.0499999, -1.0, math.nan, None]
    kept, dropped = gate_instructions([score(margin=m) for m in margins], rules(min_margin=0.05))
    assert kept == [0, 1]
    assert [d.index for d in dropped] == [2, 3, 4, 5]
    assert {d.rule for d in dropped} == {"min_margin"}
    assert dropped[0].detail == "margin 0.05 < 0.05" and dropped[2].detail == "margin none < 0.05"
    assert gate_instructions([score(margin=-5.0)], rules(min_margin=-5.0))[0] == [0]


@pytest.mark.parametrize(
    ("mode", "kept"),
    [("none", [0, 1, 2, 3]), ("text", [0, 2]), ("image", [0, 1]), ("either", [0])],
)
def test_shortcuts_of_the_configured_kind(mode: str, kept: list[int]) -> None:
    flags = [(False, False), (True, False), (False, True), (True, True)]
    scores = [score(text_shortcut=t, image_shortcut=i) for t, i in flags]
    assert gate_instructions(scores, rules(drop_shortcuts=mode))[0] == kept


def test_shortcut_rules_name_their_kind() -> None:
    both = score(text_shortcut=True, image_shortcut=True, text_only_rank=1, image_only_rank=1)
    assert failed_rule(both, rules(drop_shortcuts="either")) == "text_shortcut"
    assert failed_rule(both, rules(drop_shortcuts="image")) == "image_shortcut"
    detail = rule_detail("image_shortcut", both, rules(drop_shortcuts="image"))
    assert detail == "image shortcut (image-only-rank 1)"


def test_judge_must_say_yes() -> None:
    scores = [score(judge_verdict=v) for v in ("yes", "no", None)]
    kept, dropped = gate_instructions(scores, rules(require_judge=True))
    assert kept == [0]
    assert [(d.rule, d.detail) for d in dropped] == [
        ("judge", "judge said no"),
        ("judge", "judge said nothing"),
    ]
    assert gate_instructions(scores, rules())[0] == [0, 1, 2]


def test_first_failing_rule_counts_and_unscored_only_under_a_rule() -> None:
    worst = score(rank=9, margin=-1.0, text_shortcut=True, judge_verdict="no")
    every = rules(max_rank=1, min_margin=0.0, drop_shortcuts="either", require_judge=True)
    assert failed_rule(worst, every) == "max_rank"
    assert failed_rule(score(margin=-1.0, judge_verdict="no"), every) == "min_margin"
    assert failed_rule(None, every) == "unscored"
    assert failed_rule(None, rules()) is None
    assert failed_rule(None, rules(drop_false_negatives=True)) is None  # no instruction rule


def test_reject_reason_is_the_rule_that_removed_most() -> None:
    dropped = [Dropped(0, "judge", "judge said no"), Dropped(1, "max_rank", "rank 4 > 2")]
    dropped.append(Dropped(2, "judge", "judge said nothing"))
    reason, detail = reject_reason(dropped)
    assert reason == "gate:judge"
    assert detail == (
        "3 instructions failed the gate: #0 judge: judge said no; #1 max_rank: rank 4 > 2; "
        "#2 judge: judge said nothing"
    )
    assert reject_reason(dropped[:2])[0] == "gate:max_rank"  # a tie: RULES order
    with pytest.raises(ValueError):
        reject_reason([])


# false negatives -----------------------------------------------------------------------


def test_below_window_candidates_follow_mining_order() -> None:
    image = ChannelNeighbours(
        ids=[10, 11, 12, 13, 14, 1, 15, -1, 16, 13],
        scores=[0.97, 0.9, 0.8, 0.5, 0.5, 0.99, math.nan, 0.3, 0.4, 0.2],
        window=(0.8, 0.96),
    )
    caption = ChannelNeighbours(
        ids=[11, 17, 18, 16], scores=[0.3, 0.5, 0.6, 0.85], window=(0.5, 0.9)
    )
    # 10 above, 11 in image's window, 16 in caption's; 12 at the low bound is below; 1 is
    # the query; 15 (NaN) and -1 are no entries; ties: image's 13, 14 before caption's 17
    assert below_window_candidates(1, [image, caption]) == [12, 13, 14, 17]
    assert below_window_candidates(1, []) == []


def test_top_up_never_takes_target_query_flagged_or_duplicates() -> None:
    new, added = top_up(
        [5, 6, 7],
        flagged=[6, 9],
        candidates=[1, 2, 5, 9, 7, 8, 8, 3, 4],
        query_id=1,
        target_id=2,
        limit=4,
    )
    assert (new, added) == ([5, 7, 8, 3], [8, 3])
    assert top_up([5, 6], [6], [], query_id=1, target_id=2, limit=2) == ([5], [])
    assert top_up([5, 6, 7], [7], [8], query_id=1, target_id=2, limit=1) == ([5, 6], [])


def test_gate_pair_drops_false_negatives_of_kept_instructions_only() -> None:
    scores = [score(false_negative_ids=[21]), score(rank=5, false_negative_ids=[22]), None]
    filter_on = rules(max_rank=2, drop_false_negatives=True)
    asked: list[int] = []

    def candidates(query_id: int) -> list[int]:
        asked.append(query_id)
        return [21, 22, 1, 2, 23, 23, 24]

    pair = gate_pair(1, 2, [21, 22, 20], scores, filter_on, candidates, num_hard_negatives=4)
    assert asked == [1]
    assert (pair.kept, [d.rule for d in pair.dropped]) == ([0], ["max_rank", "unscored"])
    assert pair.false_negatives == pair.removed == [21]
    assert (pair.negatives, pair.topped_up) == ([22, 20, 23, 24], [23, 24])
    kept_all = gate_pair(1, 2, [21, 22], scores, rules(), no_candidates, num_hard_negatives=4)
    assert kept_all.false_negatives == [21, 22] and kept_all.negatives == [21, 22]
    assert kept_all.removed == [] and kept_all.topped_up == []


def test_a_pair_without_instructions_left_is_rejected_untouched() -> None:
    scores = [score(rank=3, false_negative_ids=[21]), score(judge_verdict=None)]
    filter_on = rules(max_rank=2, require_judge=True, drop_false_negatives=True)
    pair = gate_pair(1, 2, [21], scores, filter_on, no_candidates, num_hard_negatives=2)
    assert pair.rejected and pair.negatives == [21] and pair.removed == []
    assert reject_reason(pair.dropped)[0] == "gate:max_rank"
    counts = gate_counts([pair])
    assert counts["gate_rejected_pairs"] == 1 and counts["instructions_in"] == 2
    assert counts["dropped_rank"] == counts["dropped_judge"] == 1


def test_gate_counts_add_up() -> None:
    filter_on = rules(max_rank=1, drop_shortcuts="either", drop_false_negatives=True)
    pairs = [
        gate_pair(1, 2, [3], [score(false_negative_ids=[3]), None], filter_on, lambda q: [4], 1),
        gate_pair(
            5, 6, [], [score(text_shortcut=True), score(rank=2)], filter_on, no_candidates, 1
        ),
    ]
    counts = gate_counts(pairs)
    dropped = sum(counts[f"dropped_{r}"] for r in ("unscored", "rank", "margin", "judge"))
    dropped += counts["dropped_text_shortcut"] + counts["dropped_image_shortcut"]
    assert counts["instructions_in"] == 4 == counts["instructions_kept"] + dropped
    assert counts == {
        "instructions_in": 4,
        "instructions_kept": 1,
        "dropped_unscored": 1,
        "dropped_rank": 1,
        "dropped_margin": 0,
        "dropped_text_shortcut": 1,
        "dropped_image_shortcut": 0,
        "dropped_judge": 0,
        "gate_rejected_pairs": 1,
        "dropped_false_negatives": 1,
        "topped_up_negatives": 1,
    }
    assert set(RULES) == {"unscored", "max_rank", "min_margin"} | {
        "text_shortcut",
        "image_shortcut",
        "judge",
    }


# export with scores --------------------------------------------------------------------


def export(fixture: FixtureRun, config: PipelineConfig) -> StageResult:
    [result] = LocalRunner(fixture.run, config, progress=False).run_all([ExportStage(config)])
    return result


def scored_run(root: Path) -> FixtureRun:
    fixture = build_run(root)
    write_scores(fixture)
    write_neighbours(fixture)
    return fixture


def rows_of(fixture: FixtureRun, part: str) -> dict[str, dict[str, Any]]:
    table = pq.read_table(fixture.run.root / "dataset" / f"{part}.parquet")
    assert table.schema == SCORED_DATASET_SCHEMA
    return {row["pair_id"]: row for row in table.to_pylist()}


def path_of(record_id: int) -> str:
    return image_relpath(record_id, RECORDS[record_id][0])


def export_rejects(fixture: FixtureRun, part: str) -> list[dict[str, Any]]:
    table = pq.read_table(fixture.run.root / "rejects" / f"export-{part}.parquet")
    assert table.schema == REJECTS_SCHEMA
    return table.to_pylist()


EXPECTED_COUNTS = {
    "part-00000": {
        "rows": 2,
        "pairs": 4,
        "failed": 1,
        "annotated": 3,
        "gate_rejected_pairs": 1,
        "instructions_in": 10,
        "instructions_kept": 4,
        "dropped_unscored": 1,
        "dropped_rank": 4,
        "dropped_margin": 0,
        "dropped_text_shortcut": 1,
        "dropped_image_shortcut": 0,
        "dropped_judge": 0,
        "dropped_false_negatives": 3,
        "topped_up_negatives": 1,
    },
    "part-00001": {
        "rows": 2,
        "pairs": 3,
        "failed": 1,
        "annotated": 2,
        "gate_rejected_pairs": 0,
        "instructions_in": 8,
        "instructions_kept": 5,
        "dropped_unscored": 0,
        "dropped_rank": 1,
        "dropped_margin": 1,
        "dropped_text_shortcut": 1,
        "dropped_image_shortcut": 0,
        "dropped_judge": 0,
        "dropped_false_negatives": 1,
        "topped_up_negatives": 2,
    },
}


def test_export_with_rules_filters_and_records_everything(tmp_path: Path) -> None:
    fixture = scored_run(tmp_path)
    result = export(fixture, gate_config(**GATE_RULES))
    recorded = fixture.run.part_counts("export")
    for part, expected in EXPECTED_COUNTS.items():
        assert {k: recorded[part][k] for k in expected} == expected
        counts = recorded[part]
        assert counts["annotated"] == counts["rows"] + counts["gate_rejected_pairs"]
        dropped = sum(v for k, v in counts.items() if k.startswith("dropped_") and "false" not in k)
        assert counts["instructions_in"] == counts["instructions_kept"] + dropped
    assert result.counts["rows"] == 4 and result.counts["gate_rejected_pairs"] == 1

    first = rows_of(fixture, "part-00000")
    assert list(first) == ["0-1", "2-3"]  # pairs order, 0-1000001 rejected
    row = first["0-1"]
    assert row["q_text"] == INSTRUCTIONS["0-1"][:2]
    assert row["instruction_ranks"] == [1, 2] and row["instruction_margins"] == [0.2, 0.0]
    assert row["judge_verdicts"] == ["yes", "yes"] and row["judge_model"] == "judge-vlm"
    assert row["gate_dropped_instructions"] == [f"max_rank: {INSTRUCTIONS['0-1'][2]}"]
    # 1000000 flagged by a kept instruction (2 only by the dropped one): replaced by the
    # best below-window neighbour of query 0 that is not flagged, the target or in hns
    assert row["false_negative_ids"] == [S] and row["topped_up_negative_ids"] == [S + 3]
    assert row["hard_negative_ids"] == [2, S + 3]
    assert row["hns"] == [path_of(0), path_of(2), path_of(S + 3)]
    assert (fixture.run.root / "dataset" / path_of(S + 3)).read_bytes() == fixture.image_bytes[
        S + 3
    ]
    row = first["2-3"]
    assert row["q_text"] == [INSTRUCTIONS["2-3"][0], INSTRUCTIONS["2-3"][2]]
    assert row["image_shortcuts"] == [True, False] and row["judge_verdicts"] == ["yes", None]
    assert row["gate_dropped_instructions"] == [f"unscored: {INSTRUCTIONS['2-3'][1]}"]
    # both negatives flagged; query 2's other below-window neighbour is in caption's window
    assert row["false_negative_ids"] == [0, S + 3] and row["hard_negative_ids"] == []
    assert row["hns"] == [path_of(2)]

    second = rows_of(fixture, "part-00001")
    row = second[f"{S}-{S + 1}"]
    assert row["q_text"] == [INSTRUCTIONS[f"{S}-{S + 1}"][i] for i in (0, 2)]
    assert row["hard_negative_ids"] == [2, 3, S + 2]  # 3 flagged by a dropped instruction
    assert row["false_negative_ids"] == [] and row["text_shortcuts"] == [False, False]
    assert [d.split(":")[0] for d in row["gate_dropped_instructions"]] == [
        "min_margin",
        "text_shortcut",
        "max_rank",
    ]
    row = second[f"{S + 3}-{S + 2}"]
    assert row["hard_negative_ids"] == [1, 2] and row["topped_up_negative_ids"] == [1, 2]

    [reject] = export_rejects(fixture, "part-00000")
    assert (reject["id"], reject["key"], reject["stage"]) == (0, f"0-{S + 1}", "export")
    assert reject["reason"] == "gate:max_rank"
    for text in ("rank 5 > 2", "rank 4 > 2", "rank 3 > 2", "#2 text_shortcut"):
        assert text in reject["detail"]
    assert export_rejects(fixture, "part-00001") == []
    assert [r["key"] for r in read_rejects(fixture.run).to_pylist()] == [f"0-{S + 1}"]

    info = json.loads((fixture.run.root / "dataset" / INFO_FILE).read_text())
    assert info["columns"] == SCORED_DATASET_SCHEMA.names
    assert info["scored_parts"] == fixture.parts and info["counts"]["dropped_rank"] == 5
    for part in fixture.parts:
        lines = (fixture.run.root / "dataset" / f"{part}.jsonl").read_text().splitlines()
        table = pa.Table.from_pylist([json.loads(x) for x in lines], SCORED_DATASET_SCHEMA)
        assert table.equals(pq.read_table(fixture.run.root / "dataset" / f"{part}.parquet"))


def test_export_with_rules_off_keeps_everything_and_the_scores(tmp_path: Path) -> None:
    fixture = scored_run(tmp_path)
    export(fixture, gate_config())
    exported = {**rows_of(fixture, "part-00000"), **rows_of(fixture, "part-00001")}
    assert set(exported) == set(INSTRUCTIONS)
    negatives = {f"{q}-{t}": ns for pairs in PAIRS.values() for q, t, *_, ns in pairs}
    for pair, row in exported.items():
        assert row["q_text"] == INSTRUCTIONS[pair] and row["gate_dropped_instructions"] == []
        assert row["hard_negative_ids"] == negatives[pair] and row["topped_up_negative_ids"] == []
        ranks = [None if s is None else s[0] for s in SCORES[pair]]
        assert row["instruction_ranks"] == ranks
    assert exported["0-1"]["false_negative_ids"] == [S, 2]  # every instruction kept
    for counts in fixture.run.part_counts("export").values():
        assert counts["rows"] == counts["annotated"] and counts["gate_rejected_pairs"] == 0
        assert counts["instructions_kept"] == counts["instructions_in"]
        assert counts["dropped_false_negatives"] == 0
    assert export_rejects(fixture, "part-00000") == []


def test_a_part_without_scores_stays_as_before(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    write_scores(fixture)
    (fixture.run.root / "_progress" / "score" / "part-00001.json").unlink()  # unfinished
    export(fixture, gate_config())
    table = pq.read_table(fixture.run.root / "dataset" / "part-00001.parquet")
    assert table.schema == DATASET_SCHEMA
    assert "scores_sha256" not in fixture.run.part_counts("export")["part-00001"]
    assert not (fixture.run.root / "rejects" / "export-part-00001.parquet").exists()
    info = json.loads((fixture.run.root / "dataset" / INFO_FILE).read_text())
    assert info["scored_parts"] == ["part-00000"]


def test_rules_without_scores_are_refused(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    with pytest.raises(ExportError, match="score stage has not finished part-00000"):
        export(fixture, gate_config(require_judge=True))


def test_scores_of_other_annotations_are_refused(tmp_path: Path) -> None:
    fixture = scored_run(tmp_path)
    path = fixture.run.part_path(SCORES_DIR, "part-00001")
    table = pq.read_table(path)
    texts = table["instruction"].to_pylist()
    column = pa.array(["changed", *texts[1:]], pa.string())
    pq.write_table(
        table.set_column(table.schema.get_field_index("instruction"), "instruction", column), path
    )
    with pytest.raises(ExportError, match=r"score of pair 1000000-1000001 instruction 0 .*re-run"):
        export(fixture, gate_config())


def test_changed_scores_export_again_and_changed_rules_are_refused(tmp_path: Path) -> None:
    fixture = scored_run(tmp_path)
    config = gate_config(**GATE_RULES)
    export(fixture, config)
    assert export(fixture, config).computed == 0
    path = fixture.run.part_path(SCORES_DIR, "part-00001")
    table = pq.read_table(path)
    ranks = pa.array([9] * table.num_rows, pa.int32())
    pq.write_table(table.set_column(table.schema.get_field_index("rank"), "rank", ranks), path)
    result = export(fixture, config)
    assert result.computed == 1 and result.counts["gate_rejected_pairs"] == 3
    assert rows_of(fixture, "part-00001") == {}
    assert len(export_rejects(fixture, "part-00001")) == 2
    with pytest.raises(StageConfigChanged, match="export"):
        export(fixture, gate_config(**{**GATE_RULES, "max_rank": 3}))


def test_score_settings_are_in_the_hash_when_scoring_is_on() -> None:
    off = ExportStage(fixture_config())
    on = ExportStage(PipelineConfig.model_validate({"score": {"enabled": True}}))
    assert off.config_sections == ("export",)
    assert on.config_sections[0] == "export" and "score.scorer" in on.config_sections
    assert "score.batch_size" not in on.config_sections


def test_rejects_are_read_only_for_finished_export_parts(tmp_path: Path) -> None:
    fixture = scored_run(tmp_path)
    export(fixture, gate_config(**GATE_RULES))
    (fixture.run.root / "_progress" / "export" / "part-00000.json").unlink()
    assert read_rejects(RunDir(fixture.run.root)).num_rows == 0


def test_a_top_up_uses_the_window_mining_used(tmp_path: Path) -> None:
    fixture = scored_run(tmp_path)
    config = gate_config(drop_false_negatives=True)
    data = config.model_dump()
    data["channels"]["caption"]["window"] = "auto"
    with pytest.raises(ExportError, match=r"holds no auto window for channel 'caption'"):
        export(fixture, PipelineConfig.model_validate(data))  # mining recorded none


def test_a_pair_left_with_fewer_instructions_than_a_triplet_needs_is_rejected() -> None:
    ranks = [1, 5, 6]  # one of three passes max_rank 2
    scores = [
        _score_row("0-1", 0, 1, [3], i, (r, 0.1, False, False, [], None))
        for i, r in enumerate(ranks)
    ]
    rules = FilterConfig(max_rank=2)
    pair = gate_pair(0, 1, [3], scores, rules, lambda q: [], 1, min_kept=3)
    assert pair.kept == [0] and pair.rejected
    assert reject_reason(pair.dropped)[0] == "gate:max_rank"
    assert not gate_pair(0, 1, [3], scores, rules, lambda q: [], 1, min_kept=1).rejected
