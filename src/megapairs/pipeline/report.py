"""Printing what stages did, and checking that every record is accounted for."""

from __future__ import annotations

from megapairs.pipeline.runner import StageResult


def accounting_errors(results: list[StageResult]) -> list[str]:
    """Stages whose counts do not add up (records in != records out)."""
    errors = []
    for result in results:
        counts = result.counts
        if {"records", "kept", "rejected"} <= counts.keys():
            kept, rejected = counts["kept"], counts["rejected"]
            if counts["records"] != kept + rejected:
                errors.append(
                    f"{result.name}: {counts['records']} records in, but {kept} kept + "
                    f"{rejected} rejected = {kept + rejected}"
                )
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
