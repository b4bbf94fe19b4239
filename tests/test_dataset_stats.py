"""Dataset statistics on the fixture run: exact counts, failures, per-part balance."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gate_fixtures import GATE_RULES, SCORES, gate_config, write_neighbours, write_scores
from run_fixtures import INSTRUCTIONS, FixtureRun, build_run, fixture_config

from megapairs.dataset.export import ExportStage
from megapairs.dataset.stats import (
    DroppedStats,
    GateStats,
    PartBalance,
    Summary,
    dataset_stats,
    dropped_stats,
    format_stats,
    margin_quantiles,
)
from megapairs.pipeline.runner import LocalRunner
from megapairs.runs import RunDir
from megapairs.schemas import ANNOTATION_FAILURES_DIR, ANNOTATIONS_DIR

# part -> dropped_instructions of its annotation rows, in the rows' order
DROPPED = {
    "part-00000": [
        [
            "copied_demonstration: Find this car in orange instead of silver",
            "ungrounded: find something like this one",
            "duplicate: note: a colon in the text",
        ],
        [],
        ["ungrounded: another one like it"],
    ],
    "part-00001": [["too_short: Dog", "beyond_max: a seventh one"], []],
}


@pytest.fixture
def exported(tmp_path: Path) -> FixtureRun:
    fixture = build_run(tmp_path)
    config = fixture_config()
    LocalRunner(fixture.run, config, progress=False).run_all([ExportStage(config)])
    return fixture


def dataset(fixture: FixtureRun) -> Path:
    return fixture.run.root / "dataset"


def test_counts_of_the_fixture_export(exported: FixtureRun) -> None:
    stats = dataset_stats(dataset(exported))
    assert stats.rows == 5 and stats.files == ["part-00000.parquet", "part-00001.parquet"]
    assert stats.distinct_queries == 4 and stats.distinct_targets == 4
    assert stats.pairs_per_channel == {"image": 4, "caption": 2, "dino": 2}
    assert stats.pairs_per_channel_combination == {
        "dino+image": 2,
        "image": 1,
        "caption+image": 1,
        "caption": 1,
    }
    assert stats.instructions_per_pair.counts == {3: 3, 4: 1, 5: 1}
    assert stats.negatives_per_pair.counts == {1: 1, 2: 3, 3: 1}
    assert stats.provenance["backend"] == {"template": 5}
    assert stats.provenance["prompt_version"] == {"default-1a2b3c": 5}


def test_instruction_length_distribution(exported: FixtureRun) -> None:
    words = dataset_stats(dataset(exported)).instruction_words
    lengths = [len(text.split()) for texts in INSTRUCTIONS.values() for text in texts]
    assert words.count == 18 == len(lengths)
    assert (words.min, words.median, words.quantile(0.9), words.max) == (2, 4, 7, 11)
    assert words.median == int(np.percentile(lengths, 50, method="inverted_cdf"))
    assert words.quantile(0.9) == int(np.percentile(lengths, 90, method="inverted_cdf"))
    assert words.mean == pytest.approx(np.mean(lengths))
    assert sum(n for *_, n in words.histogram()) == 18


def test_summary_edges() -> None:
    assert Summary({}).median == 0 and Summary({}).histogram() == []
    summary = Summary({0: 1, 100: 1})
    assert summary.median == 0 and summary.quantile(0.9) == 100
    assert [(low, high, n) for low, high, n in summary.histogram(bins=4) if n] == [
        (0, 25, 1),
        (78, 103, 1),
    ]


def test_failures_and_part_balance_from_the_run(exported: FixtureRun) -> None:
    stats = dataset_stats(dataset(exported))
    assert stats.run == exported.run.root
    assert stats.failures is not None
    assert stats.failures.reasons == {"timeout": 1, "unparseable": 1}
    assert stats.failures.transient == 1 and stats.failures.transient_share == 0.5
    assert stats.parts == [
        PartBalance("part-00000", pairs=4, annotated=3, failed=1, exported=3),
        PartBalance("part-00001", pairs=3, annotated=2, failed=1, exported=2),
    ]
    text = format_stats(stats)
    assert "pairs per channel: image: 4, caption: 2, dino: 2" in text
    assert "instructions per pair: 3: 3, 4: 1, 5: 1" in text
    assert "annotation failures (finished parts): 2, transient 1 (50%" in text
    assert "all 2 parts balance: 7 pairs in, none lost" in text
    assert stats.scores is None and stats.gate is None and "scores (" not in text


def test_only_finished_annotate_parts_count(exported: FixtureRun) -> None:
    (exported.run.root / "_progress" / "annotate" / "part-00001.json").unlink()
    stats = dataset_stats(dataset(exported))
    assert stats.failures is not None and stats.failures.reasons == {"timeout": 1}
    assert [p.part for p in stats.parts] == ["part-00000"]


def test_a_part_that_lost_pairs_is_flagged(exported: FixtureRun) -> None:
    failures = exported.run.part_path(ANNOTATION_FAILURES_DIR, "part-00001")
    pq.write_table(pq.read_table(failures).slice(0, 0), failures)
    stats = dataset_stats(dataset(exported))
    assert [p.balanced for p in stats.parts] == [True, False]
    assert "MISMATCH in 1 parts (part-00001)" in format_stats(stats)


def test_released_layout_and_jsonl_give_the_same_counts(
    exported: FixtureRun, tmp_path: Path
) -> None:
    released, jsonl_only = tmp_path / "released", tmp_path / "jsonl"
    released.mkdir()
    jsonl_only.mkdir()
    for part in exported.parts:
        table = pq.read_table(dataset(exported) / f"{part}.parquet")
        pq.write_table(
            table.select(["q_img", "q_text", "t_img", "hns"]), released / f"{part}.parquet"
        )
        shutil.copy(dataset(exported) / f"{part}.jsonl", jsonl_only)
    full = dataset_stats(dataset(exported), run=None)
    for path in (released, jsonl_only):
        stats = dataset_stats(path)
        assert stats.run is None and stats.failures is None and stats.parts == []
        assert stats.dropped is None
        assert stats.instructions_per_pair == full.instructions_per_pair
        assert stats.instruction_words == full.instruction_words
        assert stats.negatives_per_pair == full.negatives_per_pair
        assert stats.distinct_queries == full.distinct_queries
    assert dataset_stats(released).pairs_per_channel == {}
    jsonl = dataset_stats(jsonl_only / "part-00000.jsonl")
    assert jsonl.rows == 3 and jsonl.pairs_per_channel == {"image": 2, "caption": 2}


def test_an_explicit_run_adds_its_failures(exported: FixtureRun, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(dataset(exported), moved, ignore=shutil.ignore_patterns("images"))
    assert dataset_stats(moved).failures is None
    stats = dataset_stats(moved, run=RunDir(exported.run.root))
    assert stats.failures is not None and stats.failures.total == 2


def set_dropped(fixture: FixtureRun) -> None:
    """Write `DROPPED` into the fixture's annotation tables."""
    for part, dropped in DROPPED.items():
        path = fixture.run.part_path(ANNOTATIONS_DIR, part)
        table = pq.read_table(path)
        index = table.schema.get_field_index("dropped_instructions")
        column = pa.array(dropped, table.schema.field(index).type)
        pq.write_table(table.set_column(index, "dropped_instructions", column), path)


def test_dropped_instructions_are_counted_by_reason(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    assert dropped_stats(fixture.run) == DroppedStats(0, 0, 5, {})
    set_dropped(fixture)
    assert dropped_stats(fixture.run) == DroppedStats(
        total=6,
        pairs=3,
        annotated=5,
        reasons={
            "ungrounded": 2,
            "beyond_max": 1,
            "copied_demonstration": 1,
            "duplicate": 1,
            "too_short": 1,
        },
    )
    (fixture.run.root / "_progress" / "annotate" / "part-00001.json").unlink()
    unfinished = dropped_stats(fixture.run)
    assert (unfinished.total, unfinished.annotated) == (4, 3)
    assert "too_short" not in unfinished.reasons


def test_dropped_instructions_are_reported(exported: FixtureRun) -> None:
    text = format_stats(dataset_stats(dataset(exported)))
    assert "dropped instructions (finished parts): 0 in 0 of 5 annotated pairs" in text
    set_dropped(exported)
    stats = dataset_stats(dataset(exported))
    assert stats.dropped is not None and stats.dropped.reasons["copied_demonstration"] == 1
    lines = format_stats(stats).splitlines()
    start = lines.index("dropped instructions (finished parts): 6 in 3 of 5 annotated pairs")
    assert lines[start + 1 : start + 6] == [
        "  ungrounded: 2",
        "  beyond_max: 1",
        "  copied_demonstration: 1",
        "  duplicate: 1",
        "  too_short: 1",
    ]


def test_a_file_without_the_released_columns_is_refused(exported: FixtureRun) -> None:
    with pytest.raises(ValueError, match="not a dataset file: it lacks q_img, q_text, t_img, hns"):
        dataset_stats(exported.run.root / "pairs")


def gated(tmp_path: Path) -> FixtureRun:
    """The fixture run with scores, exported through the gate (tests/gate_fixtures.py)."""
    fixture = build_run(tmp_path)
    write_scores(fixture)
    write_neighbours(fixture)
    config = gate_config(**GATE_RULES)
    LocalRunner(fixture.run, config, progress=False).run_all([ExportStage(config)])
    return fixture


def test_score_distributions_from_the_run(tmp_path: Path) -> None:
    stats = dataset_stats(dataset(gated(tmp_path)))
    scores = stats.scores
    assert scores is not None
    rows = [s for listed in SCORES.values() for s in listed if s is not None]
    assert scores.instructions == 17 == len(rows) and scores.pairs == 5
    assert scores.ranks.counts == {1: 9, 2: 3, 3: 3, 4: 1, 5: 1}
    margins = [margin for _, margin, *_ in rows]
    for name, share in {"p10": 10, "median": 50, "p90": 90}.items():
        assert scores.margins[name] == np.percentile(margins, share, method="inverted_cdf")
    assert (scores.margins["min"], scores.margins["max"]) == (-0.3, 0.5)
    assert (scores.text_shortcuts, scores.image_shortcuts) == (2, 2)
    assert (scores.false_negatives, scores.with_false_negatives) == (6, 6)
    assert scores.pairs_with_false_negatives == 4
    assert scores.judge == {"yes": 11, "no": 4, "": 2}
    text = format_stats(stats)
    assert "scores (finished score parts): 17 instructions, 5 pairs" in text
    assert "  shortcuts: text 2 (12%), image 2 (12%)" in text
    assert "  judge: yes: 11, no: 4, (none): 2" in text


def test_what_the_gate_removed_and_the_balance(tmp_path: Path) -> None:
    fixture = gated(tmp_path)
    stats = dataset_stats(dataset(fixture))
    assert stats.gate == GateStats(
        parts=2,
        annotated=5,
        rows=4,
        rejected_pairs=1,
        reject_reasons={"gate:max_rank": 1},
        instructions_in=18,
        instructions_kept=9,
        dropped={
            "unscored": 1,
            "max_rank": 5,
            "min_margin": 1,
            "text_shortcut": 2,
            "image_shortcut": 0,
            "judge": 0,
        },
        false_negatives_removed=4,
        negatives_topped_up=3,
    )
    assert stats.gate.balanced
    assert stats.parts[0] == PartBalance("part-00000", 4, 3, 1, exported=2, gate_rejected=1)
    assert all(p.balanced for p in stats.parts)
    lines = format_stats(stats).splitlines()
    start = lines.index(
        "gate (export.filter, 2 scored parts): 18 instructions in, 9 kept; dropped: unscored 1, "
        "max_rank 5, min_margin 1, text_shortcut 2"
    )
    assert lines[start + 1 : start + 3] == [
        "  pairs: 5 annotated, 4 exported, 1 rejected (gate:max_rank: 1)",
        "  hard negatives: 4 false negatives removed, 3 topped up",
    ]
    assert "  part-00000: 4 pairs, 3 annotated, 1 failed, 2 exported, 1 gate-rejected" in lines
    # a lost reject file shows: the rejected pair is no longer accounted for
    (fixture.run.root / "rejects" / "export-part-00000.parquet").unlink()
    broken = dataset_stats(dataset(fixture)).gate
    assert broken is not None and not broken.balanced
    assert "MISMATCH: the gate's counts" in format_stats(dataset_stats(dataset(fixture)))


def test_margin_quantiles_skip_missing_values() -> None:
    assert margin_quantiles(pa.chunked_array([[None, float("nan")]], pa.float64())) == {}
    column = pa.chunked_array([[0.3, None, -0.1], [0.2, float("nan")]], pa.float64())
    assert margin_quantiles(column) == {
        "min": -0.1,
        "p10": -0.1,
        "median": 0.2,
        "p90": 0.3,
        "max": 0.3,
    }
