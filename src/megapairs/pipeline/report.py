"""Printing what stages did, and checking that every record is accounted for: counts
on stdout; warnings (empty input, quarantined files) and errors on stderr."""

from __future__ import annotations

import sys

from megapairs.pipeline.runner import StageResult
from megapairs.runs import QUARANTINE_DIR

# (total, the counts it must equal the sum of), for any stage that records all of them
BALANCES = (
    ("records", ("kept", "rejected")),  # ingest
    ("records", ("valid", "invalid")),  # ingest.decode
    ("pairs", ("annotated", "failed")),  # annotate
    ("instructions", ("scored", "failed")),  # score
)


# export's counts of what curation flags left out (dataset/export.py)
FLAG_COUNTS = ("flag_rejected_pairs", "flagged_pairs", "flagged_instructions", "stale_flags")
# stages that check each part's balance themselves (`problems`): their summed counts may mix
# parts recorded before a count existed (export: `annotated` only in gated parts before flags)
CHECKS_ITS_PARTS = frozenset({"export"})

# stage kind -> (the count that must not be zero, what it means when it is)
EMPTY_INPUTS = {
    "ingest.decode": ("records", "read no input records; check input.path"),
    "ingest": ("records", "got no decoded records"),
    "embed": ("embedded", "embedded no record"),
    "mine": ("pairs", "mined no pairs; check the channels' similarity windows"),
    "annotate": ("pairs", "got no pairs to annotate"),
    "score": ("instructions", "got no instructions to score"),
    "export": ("rows", "exported no rows"),
}


def accounting_errors(results: list[StageResult]) -> list[str]:
    """Stages whose counts do not add up (records in != records out, pairs in != pairs out)."""
    errors = []
    for result in results:
        if _kind(result.name) in CHECKS_ITS_PARTS:
            continue
        counts = result.counts
        for total, parts in BALANCES:
            if not {total, *parts} <= counts.keys():
                continue
            summed = sum(counts[p] for p in parts)
            if counts[total] != summed:
                listed = " + ".join(f"{counts[p]} {p}" for p in parts)
                errors.append(f"{result.name}: {counts[total]} {total} in, but {listed} = {summed}")
    return errors


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value:,}" for key, value in counts.items())


def format_results(results: list[StageResult]) -> str:
    lines = []
    for result in results:
        resumed = result.parts - result.computed
        note = f" ({resumed} of {result.parts} parts already done)" if resumed else ""
        lines.append(f"{result.name:<24} {format_counts(result.counts)}{note}")
    return "\n".join(lines)


def empty_warnings(results: list[StageResult]) -> list[str]:
    """Stages that had nothing to do: no parts, or a zero input (or output) count."""
    warnings = []
    for result in results:
        if result.parts == 0:
            warnings.append(
                f"{result.name}: nothing to do: no parts planned "
                "(its input is empty, or the stage before it has not run)"
            )
            continue
        key, meaning = EMPTY_INPUTS.get(_kind(result.name), ("", ""))
        if key in result.counts and result.counts[key] == 0:
            warnings.append(f"{result.name}: {meaning} ({key} 0)")
    return warnings


def quarantine_warnings(results: list[StageResult], run: str | None = None) -> list[str]:
    """A line per stage whose finished parts had unreadable files this time (moved aside,
    the parts computed again). Files a stage quarantines itself are in its counts."""
    where = f"{run.rstrip('/')}/{QUARANTINE_DIR}" if run else f"the run's {QUARANTINE_DIR}/"
    return [
        f"{result.name}: quarantined {result.quarantined} unreadable files (moved to {where}); "
        "their parts were computed again"
        for result in results
        if result.quarantined
    ]


def flag_notes(results: list[StageResult]) -> list[str]:
    """What curation flags left out of an export (`export.exclude_flagged`), one line each."""
    notes = []
    for result in results:
        counts = {key: result.counts.get(key, 0) for key in FLAG_COUNTS}
        if _kind(result.name) != "export" or not any(counts.values()):
            continue
        left_out, flagged = counts["flag_rejected_pairs"], counts["flagged_pairs"]
        note = f"{result.name}: {_plural(left_out, 'pair')} flagged and left out"
        if left_out != flagged:
            note += f" ({flagged} flagged, {left_out - flagged} with too few instructions left)"
        note += f", {_plural(counts['flagged_instructions'], 'flagged instruction')} dropped"
        if counts["stale_flags"]:
            stale = _plural(counts["stale_flags"], "stale instruction flag")
            note += f"; {stale} ignored (the text changed since)"
        notes.append(note)
    return notes


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_stage_results(results: list[StageResult], run: str | None = None) -> int:
    """Print each stage's counts (and what flags left out of an export); warnings (empty
    input, quarantined files) and the errors (accounting, problems the stages reported) on
    stderr; 1 when there are errors."""
    print(format_results(results))
    for note in flag_notes(results):
        print(note)
    for warning in empty_warnings(results) + quarantine_warnings(results, run):
        print(f"warning: {warning}", file=sys.stderr)
    errors = accounting_errors(results)
    for error in errors:
        print(f"ACCOUNTING ERROR {error}")
    problems = [problem for result in results for problem in result.problems]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if errors or problems else 0


def _kind(stage: str) -> str:
    """`embed` for `embed.caption`; a name with no channel as it is."""
    return stage if stage in EMPTY_INPUTS else stage.partition(".")[0]
