"""Printing what stages did, and checking that every record is accounted for."""

from __future__ import annotations

from megapairs.pipeline.runner import StageResult

# (total, the counts it must equal the sum of), for any stage that records all of them
BALANCES = (
    ("records", ("kept", "rejected")),  # ingest
    ("records", ("valid", "invalid")),  # ingest.decode
    ("pairs", ("annotated", "failed")),  # annotate
)


def accounting_errors(results: list[StageResult]) -> list[str]:
    """Stages whose counts do not add up (records in != records out, pairs in != pairs out)."""
    errors = []
    for result in results:
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


def print_stage_results(results: list[StageResult]) -> int:
    """Print each stage's counts and the accounting check; 1 if records went missing."""
    print(format_results(results))
    errors = accounting_errors(results)
    for error in errors:
        print(f"ACCOUNTING ERROR {error}")
    return 1 if errors else 0
