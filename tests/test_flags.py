"""Curation flags (dataset/flags.py), `export --exclude-flagged` and the flags in `stats`."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gate_fixtures import GATE_RULES, gate_config, write_neighbours, write_scores
from run_fixtures import INSTRUCTIONS, FixtureRun, build_run, fixture_config

from megapairs.cli import main
from megapairs.config import PipelineConfig, hashed_dump, load_config
from megapairs.dataset.export import ExportStage
from megapairs.dataset.flags import (
    ActiveFlags,
    FlagError,
    FlagEvent,
    FlagStore,
    pair_part,
)
from megapairs.dataset.stats import dataset_stats, format_stats
from megapairs.pipeline.report import accounting_errors, flag_notes
from megapairs.pipeline.reset import STAGE_OUTPUTS
from megapairs.pipeline.runner import LocalRunner, StageResult, section_digests
from megapairs.runs import RunDir
from megapairs.schemas import FLAGS_DIR, PART_STRIDE, REJECTS_SCHEMA

S = PART_STRIDE
NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.json$")


def store_in(tmp_path: Path) -> FlagStore:
    return FlagStore(RunDir(tmp_path / "run"))


# the store ------------------------------------------------------------------------------


def test_events_round_trip_through_one_file_each(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    pair = store.add("0-1", "  unrelated_pair ", "alice")
    text = store.add("0-1", "wrong_instruction", "bob", instruction_index=2, instruction="x y")
    files = sorted((tmp_path / "run" / FLAGS_DIR).iterdir())
    assert [f.name for f in files] == [f"{pair.id}.json", f"{text.id}.json"]
    assert all(NAME.match(f.name) for f in files)
    assert json.loads(files[1].read_text()) == text.as_dict()
    assert FlagEvent.from_dict(text.as_dict()) == text
    assert pair.reason == "unrelated_pair" and pair.action == "flag"
    assert pair.time.endswith("+00:00") and pair.instruction_index is None
    assert FlagStore(RunDir(tmp_path / "run")).events() == [pair, text]  # a fresh reader


def test_names_keep_the_order_of_events_within_one_clock_tick(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    added = [store.add(f"{i}-{i + 1}", "other", "alice") for i in range(40)]
    assert [e.id for e in FlagStore(store.run).events()] == [e.id for e in added]
    assert len({e.id for e in added}) == 40


def test_the_last_action_on_a_key_wins(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    store.add("0-1", "unrelated_pair", "alice")
    store.add("0-1", "wrong_instruction", "bob", instruction_index=1, instruction="b")
    store.add("0-1", "", "alice", action="unflag")  # the whole pair only
    store.add("5-6", "near_duplicate", "alice")
    store.add("5-6", "false_negative", "carol")  # flagged again: the later reason counts
    active = store.active()
    assert set(active.pairs) == {"5-6"} and active.pairs["5-6"].reason == "false_negative"
    assert set(active.instructions) == {("0-1", 1)}
    assert active.summary() == {
        "flagged_pairs": 1,
        "flagged_instructions": 1,
        "by_reason": {"false_negative": 1, "wrong_instruction": 1},
        "by_user": {"bob": 1, "carol": 1},
        "events": 5,
        "unreadable": 0,
    }
    store.add("0-1", "undo", "bob", instruction_index=1, action="unflag")
    store.add("0-1", "unrelated_pair", "alice")
    again = store.active()
    assert set(again.pairs) == {"0-1", "5-6"} and not again.instructions
    assert [e.action for e in store.events()].count("unflag") == 2


def test_an_unreadable_file_is_skipped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_in(tmp_path)
    kept = store.add("0-1", "other", "alice")
    folder = tmp_path / "run" / FLAGS_DIR
    (folder / "20990101T000000.000000Z-deadbeef.json").write_text('{"id": "trunc')
    wrong_id = {**kept.as_dict(), "id": "20990101T000000.000001Z-00000000"}
    (folder / "20990101T000000.000002Z-00000001.json").write_text(json.dumps(wrong_id))
    bad_pair = {**kept.as_dict(), "id": "20990101T000000.000003Z-00000002", "pair_id": "x"}
    (folder / f"{bad_pair['id']}.json").write_text(json.dumps(bad_pair))
    with caplog.at_level(logging.WARNING, logger="megapairs.dataset.flags"):
        reader = FlagStore(store.run)
        assert reader.events() == [kept]
        active = reader.active()
    assert active.summary()["unreadable"] == 3 and set(active.pairs) == {"0-1"}
    assert "20990101T000000.000000Z-deadbeef.json" in caplog.text
    assert caplog.text.count("skipping unreadable flag file") == 3  # once per file


def test_a_crash_mid_write_leaves_no_partial_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_in(tmp_path)
    store.add("0-1", "other", "alice")
    folder = tmp_path / "run" / FLAGS_DIR
    # a writer killed between the temp file and the rename left this behind
    stray = folder / ".20990101T000000.000000Z-0badf00d.json.k3j2h1.tmp"
    stray.write_text('{"id": "20990101T000000.000000Z-0badf00d", "pair_id": "9-')

    def crash(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        Path.write_bytes(self, data[:10].encode())
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        store.add("7-8", "other", "alice")
    monkeypatch.undo()
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and stray.name in names  # the failed add left nothing
    reader = FlagStore(store.run)
    assert [e.pair_id for e in reader.events()] == ["0-1"]
    assert reader.active().unreadable == 0
    assert store.run.remove_temp_files() == 1 and not stray.exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"pair_id": "0_1"}, "not a pair id"),
        ({"pair_id": "12"}, "not a pair id"),
        ({"reason": "   "}, "needs a reason"),
        ({"reason": "x" * 201}, "at most 200"),
        ({"user": ""}, "user name"),
        ({"action": "delete"}, "flag or unflag"),
        ({"instruction_index": -1, "instruction": "a"}, "integer >= 0"),
        ({"instruction_index": 1}, "needs its text"),
    ],
)
def test_malformed_flags_are_refused_and_nothing_is_written(
    tmp_path: Path, call: dict[str, Any], message: str
) -> None:
    store = store_in(tmp_path)
    arguments = {"pair_id": "0-1", "reason": "other", "user": "alice", **call}
    pair, reason, user = arguments.pop("pair_id"), arguments.pop("reason"), arguments.pop("user")
    with pytest.raises(FlagError, match=message):
        store.add(pair, reason, user, **arguments)
    assert store.events() == [] and not (tmp_path / "run" / FLAGS_DIR).exists()
    assert issubclass(FlagError, ValueError)


def test_parts_and_digests_follow_what_the_flags_change(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    assert store.active().digest() is None and store.active().summary()["events"] == 0
    store.add("3-1", "other", "alice")
    store.add(f"{S + 2}-0", "wrong_instruction", "bob", instruction_index=0, instruction="a")
    active = store.active()
    assert pair_part(f"{S + 2}-0") == "part-00001" and pair_part("3-1") == "part-00000"
    first, second = active.for_part("part-00000"), active.for_part("part-00001")
    assert set(first.pairs) == {"3-1"} and not first.instructions
    assert set(second.instructions) == {(f"{S + 2}-0", 0)} and not second.pairs
    assert active.for_part("part-00002").digest() is None
    digest = first.digest()
    store.add("3-1", "", "alice", action="unflag")
    store.add("3-1", "other", "alice")  # the same flag again: the same digest
    assert store.active().for_part("part-00000").digest() == digest
    store.add("3-1", "near_duplicate", "alice")  # another reason: another rejects detail
    assert store.active().for_part("part-00000").digest() != digest
    assert store.active().for_part("part-00001").digest() == second.digest()


def test_reset_never_deletes_flags() -> None:
    outputs = [p for o in STAGE_OUTPUTS.values() for p in (*o.folders, *o.shared)]
    assert outputs and not any(p.split("/")[0] == FLAGS_DIR for p in outputs)


# the config hash --------------------------------------------------------------------------


def test_exclude_flagged_is_not_in_the_export_hash() -> None:
    on = load_config(None, ["export.exclude_flagged=true"])
    off = PipelineConfig()
    assert on.export.exclude_flagged and not off.export.exclude_flagged
    assert on.section_hash("export") == off.section_hash("export")
    assert "exclude_flagged" not in hashed_dump(on)["export"]
    assert "exclude_flagged" in on.model_dump()["export"]  # still in the stored config
    stage_on, stage_off = ExportStage(on), ExportStage(off)
    assert section_digests(on, stage_on) == section_digests(off, stage_off)
    # the hash of a config without the field: what runs made before it recorded
    import hashlib

    legacy = off.model_dump(mode="json")["export"]
    legacy.pop("exclude_flagged")
    expected = hashlib.sha256(json.dumps({"export": legacy}).encode()).hexdigest()[:16]
    assert on.section_hash("export") == expected
    # other export settings still count
    assert load_config(None, ["export.jsonl=false"]).section_hash("export") != expected


# export on the fixture run -----------------------------------------------------------------


def export(fixture: FixtureRun, config: PipelineConfig) -> StageResult:
    [result] = LocalRunner(fixture.run, config, progress=False).run_all([ExportStage(config)])
    return result


def excluding(config: PipelineConfig | None = None) -> PipelineConfig:
    data = (config or fixture_config()).model_dump(mode="json")
    data["export"]["exclude_flagged"] = True
    return PipelineConfig.model_validate(data)


def rows(fixture: FixtureRun, part: str) -> dict[str, dict[str, Any]]:
    table = pq.read_table(fixture.run.root / "dataset" / f"{part}.parquet")
    return {row["pair_id"]: row for row in table.to_pylist()}


def rejects(run: RunDir, part: str) -> list[dict[str, Any]]:
    table = pq.read_table(run.root / "rejects" / f"export-{part}.parquet")
    assert table.schema == REJECTS_SCHEMA
    return table.to_pylist()


def test_flagged_instructions_leave_and_too_few_left_rejects_the_pair(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    store = FlagStore(fixture.run)
    store.add("0-1", "wrong_instruction", "bob", instruction_index=0, instruction="find the same")
    store.add("0-1", "wrong_instruction", "bob", instruction_index=1, **_text("0-1", 1))
    big = f"{S}-{S + 1}"
    store.add(big, "wrong_instruction", "bob", instruction_index=3, **_text(big, 3))
    store.add(big, "other", "bob", instruction_index=9, instruction="gone")
    result = export(fixture, excluding())
    first = rows(fixture, "part-00000")
    assert "0-1" not in first and list(first) == [f"0-{S + 1}", "2-3"]
    [rejected] = rejects(fixture.run, "part-00000")
    assert rejected["reason"] == "flagged_instructions" and rejected["key"] == "0-1"
    assert rejected["id"] == 0 and "bob: wrong_instruction" in rejected["detail"]
    second = rows(fixture, "part-00001")
    assert second[big]["q_text"] == [t for i, t in enumerate(INSTRUCTIONS[big]) if i != 3]
    assert not (fixture.run.root / "rejects" / "export-part-00001.parquet").exists()
    counts = fixture.run.part_counts("export")
    # index 0's flag names another text: stale; index 9 is gone: stale
    assert counts["part-00000"]["stale_flags"] == 1 and counts["part-00001"]["stale_flags"] == 1
    assert counts["part-00000"]["flagged_instructions"] == 1
    assert counts["part-00001"]["flagged_instructions"] == 1
    assert result.counts["flag_rejected_pairs"] == 1 and result.counts["flagged_pairs"] == 0
    assert result.problems == [] and accounting_errors([result]) == []
    assert flag_notes([result]) == [
        "export: 1 pair flagged and left out (0 flagged, 1 with too few instructions left), "
        "2 flagged instructions dropped; 2 stale instruction flags ignored (the text changed "
        "since)"
    ]


def _text(pair: str, index: int) -> dict[str, str]:
    return {"instruction": INSTRUCTIONS[pair][index]}


def test_only_parts_whose_flags_changed_are_exported_again(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    assert export(fixture, fixture_config()).computed == 2
    markers = fixture.run.root / "_progress" / "export"
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in markers.iterdir()}
    store = FlagStore(fixture.run)
    assert export(fixture, excluding()).computed == 0  # no flags: nothing to change
    store.add(f"{S + 3}-{S + 2}", "unrelated_pair", "alice")
    result = export(fixture, excluding())
    assert result.computed == 1 and result.counts["rows"] == 4
    first = markers / "part-00000.json"
    assert (first.stat().st_mtime_ns, first.read_text()) == before["part-00000.json"]
    assert list(rows(fixture, "part-00001")) == [f"{S}-{S + 1}"]
    [rejected] = rejects(fixture.run, "part-00001")
    assert rejected == {
        "id": S + 3,
        "key": f"{S + 3}-{S + 2}",
        "uri": None,
        "stage": "export",
        "reason": "flagged",
        "detail": "flagged by alice: unrelated_pair",
        "duplicate_of": None,
    }
    assert export(fixture, excluding()).computed == 0  # unchanged flags: done
    store.add(f"{S + 3}-{S + 2}", "", "alice", action="unflag")
    assert export(fixture, excluding()).computed == 1  # the flag went: back in
    assert len(rows(fixture, "part-00001")) == 2
    assert not (fixture.run.root / "rejects" / "export-part-00001.parquet").exists()
    store.add(f"{S + 3}-{S + 2}", "unrelated_pair", "alice")
    assert export(fixture, excluding()).computed == 1
    off = export(fixture, fixture_config())  # switched off: the flagged part again
    assert off.computed == 1 and off.counts["rows"] == 5
    assert (first.stat().st_mtime_ns, first.read_text()) == before["part-00000.json"]


def test_flags_apply_before_the_gate_and_keep_its_scores_aligned(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    write_scores(fixture)
    write_neighbours(fixture)
    store = FlagStore(fixture.run)
    big = f"{S}-{S + 1}"
    # the gate keeps instructions 0 and 2 of `big`; 2 flagged: 0 stays, with its own scores
    store.add(big, "wrong_instruction", "bob", instruction_index=2, **_text(big, 2))
    store.add("0-1", "unrelated_pair", "alice")
    config = excluding(gate_config(**GATE_RULES))
    result = export(fixture, config)
    row = rows(fixture, "part-00001")[big]
    assert row["q_text"] == [INSTRUCTIONS[big][0]]
    assert row["instruction_ranks"] == [1] and row["instruction_margins"] == [0.3]
    assert row["gate_dropped_instructions"] == [
        f"min_margin: {INSTRUCTIONS[big][1]}",
        f"text_shortcut: {INSTRUCTIONS[big][3]}",
        f"max_rank: {INSTRUCTIONS[big][4]}",
    ]
    assert list(rows(fixture, "part-00000")) == ["2-3"]
    reasons = [(r["key"], r["reason"]) for r in rejects(fixture.run, "part-00000")]
    assert reasons == [("0-1", "flagged"), (f"0-{S + 1}", "gate:max_rank")]
    counts = fixture.run.part_counts("export")
    assert counts["part-00000"]["annotated"] == 3 == 1 + 1 + 1  # rows + gate + flags
    assert counts["part-00001"]["instructions_in"] == 7  # 8 annotated, 1 flagged out
    assert result.problems == []
    stats = dataset_stats(fixture.run.root / "dataset", fixture.run)
    assert stats.gate is not None and stats.gate.balanced and stats.gate.flag_rejected == 1
    assert stats.gate.reject_reasons == {"gate:max_rank": 1}
    assert all(part.balanced for part in stats.parts)


def test_counts_that_do_not_add_up_are_reported() -> None:
    stage = ExportStage(fixture_config())
    good = {"rows": 3, "pairs": 5, "failed": 1, "annotated": 4, "flag_rejected_pairs": 1}
    bad = {**good, "rows": 2}
    old = {"rows": 3, "pairs": 4, "failed": 1}  # exported before `annotated` was recorded
    assert stage.problems({"part-00000": good, "part-00002": old}) == []
    [problem] = stage.problems({"part-00001": bad})
    assert problem.startswith("export part-00001:") and "1 left out for flags" in problem


def test_stats_without_flags_say_none(tmp_path: Path) -> None:
    fixture = build_run(tmp_path)
    export(fixture, fixture_config())
    text = format_stats(dataset_stats(fixture.run.root / "dataset", fixture.run))
    assert "\nflags: none\n" in text
    alone = Path(shutil.copytree(fixture.run.root / "dataset", tmp_path / "released"))
    assert "\nflags: " not in format_stats(dataset_stats(alone))  # not a run's dataset


def test_active_flags_replay_is_pure() -> None:
    def event(i: int, action: str, index: int | None = None) -> FlagEvent:
        text = None if index is None else "t"
        return FlagEvent(f"{i:03d}", "t", "u", action, "1-2", index, text, "r")

    replayed = ActiveFlags.replay([event(1, "flag"), event(2, "flag", 0), event(3, "unflag")])
    assert not replayed.pairs and list(replayed.instructions) == [("1-2", 0)]
    assert replayed.count == 1 and replayed.events == 3


# the command line, on the demo run ------------------------------------------------------------


def demo_copy(explore_demo_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared demo run (other tests read it)."""
    return Path(shutil.copytree(explore_demo_run, tmp_path / "run", symlinks=True))


def dataset_table(run: Path, part: str) -> pa.Table:
    return pq.read_table(run / "dataset" / f"{part}.parquet")


def test_export_exclude_flagged_on_the_demo_run(
    explore_demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = demo_copy(explore_demo_run, tmp_path)
    parts = sorted(p.stem for p in (run / "dataset").glob("part-*.parquet"))
    assert len(parts) >= 2, "the demo run should have several parts"
    original = {part: dataset_table(run, part) for part in parts}
    total = sum(t.num_rows for t in original.values())
    last = original[parts[-1]].to_pylist()
    flagged = [row["pair_id"] for row in last[:10]]
    edited = next(row for row in last[10:] if len(row["q_text"]) > 3)
    store = FlagStore(RunDir(run))
    for pair in flagged:
        store.add(pair, "unrelated_pair", "alice")
    store.add(
        edited["pair_id"],
        "wrong_instruction",
        "alice",
        instruction_index=1,
        instruction=edited["q_text"][1],
    )
    markers = run / "_progress" / "export"
    untouched = {p: (markers / f"{p}.json").stat().st_mtime_ns for p in parts[:-1]}
    capsys.readouterr()

    assert main(["export", "--run", str(run), "--exclude-flagged", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "export: 10 pairs flagged and left out, 1 flagged instruction dropped" in out
    assert {p: (markers / f"{p}.json").stat().st_mtime_ns for p in parts[:-1]} == untouched
    exported = dataset_table(run, parts[-1]).to_pylist()
    assert sum(dataset_table(run, p).num_rows for p in parts) == total - 10
    by_pair = {row["pair_id"]: row for row in exported}
    assert not set(flagged) & set(by_pair)
    kept = by_pair[edited["pair_id"]]["q_text"]
    assert kept == [t for i, t in enumerate(edited["q_text"]) if i != 1]
    jsonl = (run / "dataset" / f"{parts[-1]}.jsonl").read_text().splitlines()
    assert len(jsonl) == len(exported)
    left_out = rejects(RunDir(run), parts[-1])
    assert [r["reason"] for r in left_out] == ["flagged"] * 10
    assert [r["key"] for r in left_out] == flagged
    assert [r["id"] for r in left_out] == [int(p.split("-")[0]) for p in flagged]
    counts = json.loads((markers / f"{parts[-1]}.json").read_text())
    assert counts["flagged_pairs"] == 10 and counts["flagged_instructions"] == 1
    assert counts["annotated"] == counts["rows"] + counts["flag_rejected_pairs"]
    assert counts["flags_sha256"] == store.active().for_part(parts[-1]).digest()
    info = json.loads((run / "dataset" / "dataset_info.json").read_text())
    assert info["config"]["export"]["exclude_flagged"] is True
    assert main(["validate", str(run / "dataset")]) == 0

    capsys.readouterr()
    assert main(["stats", str(run)]) == 0
    out = capsys.readouterr().out
    assert (
        "flags: 10 pairs, 1 instruction (by reason: unrelated_pair 10, wrong_instruction 1; "
        "by user: alice 11); 0 of the exported rows are flagged; export left out 10 pairs and "
        "1 instruction (--exclude-flagged)"
    ) in out
    assert "MISMATCH" not in out

    assert main(["export", "--run", str(run), "--quiet"]) == 0  # kept in the run's config
    assert f"({len(parts)} of {len(parts)} parts already done)" in capsys.readouterr().out

    assert main(["export", "--run", str(run), "--no-exclude-flagged", "--quiet"]) == 0
    assert f"(1 of {len(parts)} parts already done)" in capsys.readouterr().out
    assert all(dataset_table(run, p).equals(original[p]) for p in parts)
    assert not (run / "rejects" / f"export-{parts[-1]}.parquet").exists()
    assert {p: (markers / f"{p}.json").stat().st_mtime_ns for p in parts[:-1]} == untouched
    assert main(["stats", str(run)]) == 0
    assert "10 of the exported rows are flagged" in capsys.readouterr().out
