"""Submission files for the hidden test splits: CIRCO test and CIRR test1.

Builders turn rankings into the servers' JSON objects; validators check an object's
structure (keys, lengths, types, uniqueness, CIRR's reference and subset rules) and
raise ValueError naming the problem; `write_submission` validates before it writes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from megapairs.evaluation.metrics import (
    Rankings,
    check_covered,
    check_unique,
    subset_ranking,
    without,
)
from megapairs.evaluation.types import EvalQuery
from megapairs.runs import write_json

CIRCO_TOP_K = 50
CIRR_TOP_K = 50
CIRR_SUBSET_TOP_K = 3
CIRR_VERSION = "rc2"
CIRR_HEADER_KEYS = ("version", "metric")


def _top(ranking: Sequence[str], k: int, query_id: str) -> list[str]:
    check_unique(ranking, query_id)
    if len(ranking) < k:
        raise ValueError(f"query {query_id!r}: ranking has {len(ranking)} ids, {k} needed")
    return list(ranking[:k])


def circo_submission(
    rankings: Rankings, queries: Sequence[EvalQuery], k: int = CIRCO_TOP_K
) -> dict[str, list[int]]:
    """CIRCO test: {"<query id>": [k gallery ids as ints, best first], ...} for every
    query. The reference image is not removed (CIRCO ranks the whole gallery)."""
    check_covered(rankings, queries, "ranking")
    submission = {}
    for query in queries:
        top = _top(rankings[query.id], k, query.id)
        try:
            submission[query.id] = [int(item) for item in top]
        except ValueError as error:
            raise ValueError(f"query {query.id!r}: CIRCO ids must be integers ({error})") from None
    validate_circo_submission(submission, [query.id for query in queries], k)
    return submission


def validate_circo_submission(obj: Any, query_ids: Collection[str], k: int = CIRCO_TOP_K) -> None:
    """Every query id (as a string key) maps to k unique ints; no other keys."""
    _check_keys(obj, {str(qid) for qid in query_ids})
    for key, value in obj.items():
        _check_list(value, k, key)
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise ValueError(f"query {key!r}: CIRCO predictions must be ints")


def cirr_submissions(
    rankings: Rankings,
    queries: Sequence[EvalQuery],
    subset_rankings: Rankings | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """CIRR test1: ({"version": "rc2", "metric": "recall", "<pairid>": [50 names]},
    {"version": "rc2", "metric": "recall_subset", "<pairid>": [3 names]}), with the
    reference (`query.exclude`) removed from both. The subset list comes from
    `subset_rankings` when given, else from `rankings` (see `metrics.subset_ranking`)."""
    check_covered(rankings, queries, "ranking")
    if subset_rankings is not None:
        check_covered(subset_rankings, queries, "subset ranking")
    source = rankings if subset_rankings is None else subset_rankings
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for query in queries:
        check_unique(rankings[query.id], query.id)
        recall[query.id] = _top(without(rankings[query.id], query.exclude), CIRR_TOP_K, query.id)
        check_unique(source[query.id], query.id)
        members = subset_ranking(source[query.id], query, CIRR_SUBSET_TOP_K)
        subset[query.id] = _top(members, CIRR_SUBSET_TOP_K, query.id)
    validate_cirr_recall_submission(recall, queries)
    validate_cirr_subset_submission(subset, queries)
    return recall, subset


def validate_cirr_recall_submission(obj: Any, queries: Sequence[EvalQuery]) -> None:
    """version rc2, metric recall, every pairid -> 50 unique names without its reference."""
    _validate_cirr(obj, queries, "recall", CIRR_TOP_K, subset_only=False)


def validate_cirr_subset_submission(obj: Any, queries: Sequence[EvalQuery]) -> None:
    """version rc2, metric recall_subset, every pairid -> 3 unique names, all members of
    its `img_set` and none its reference."""
    _validate_cirr(obj, queries, "recall_subset", CIRR_SUBSET_TOP_K, subset_only=True)


def _validate_cirr(
    obj: Any, queries: Sequence[EvalQuery], metric: str, k: int, subset_only: bool
) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"a submission must be a JSON object, got {type(obj).__name__}")
    if obj.get("version") != CIRR_VERSION:
        raise ValueError(f"'version' must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    if obj.get("metric") != metric:
        raise ValueError(f"'metric' must be {metric!r}, got {obj.get('metric')!r}")
    entries = {key: value for key, value in obj.items() if key not in CIRR_HEADER_KEYS}
    _check_keys(entries, {query.id for query in queries})
    for query in queries:
        names = entries[query.id]
        _check_list(names, k, query.id)
        if not all(isinstance(name, str) for name in names):
            raise ValueError(f"pairid {query.id!r}: CIRR predictions must be image names")
        if reference := sorted(set(names) & set(query.exclude)):
            raise ValueError(f"pairid {query.id!r}: predictions include the reference {reference}")
        if subset_only and (outside := sorted(set(names) - set(query.subset))):
            raise ValueError(f"pairid {query.id!r}: {outside} are not members of its img_set")


def _check_keys(obj: Any, wanted: set[str]) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"a submission must be a JSON object, got {type(obj).__name__}")
    if non_strings := [key for key in obj if not isinstance(key, str)]:
        raise ValueError(f"submission keys must be strings, got {non_strings[:10]}")
    if missing := sorted(wanted - set(obj)):
        raise ValueError(f"{len(missing)} queries missing from the submission: {missing[:10]}")
    if unknown := sorted(set(obj) - wanted):
        raise ValueError(f"{len(unknown)} unknown query ids in the submission: {unknown[:10]}")


def _check_list(value: Any, k: int, key: str) -> None:
    if not isinstance(value, list):
        raise ValueError(f"query {key!r}: predictions must be a list, got {type(value).__name__}")
    if len(value) != k:
        raise ValueError(f"query {key!r}: {len(value)} predictions, exactly {k} required")
    check_unique([str(item) for item in value], key)


def write_submission(path: Path, obj: Any, validator: Callable[[Any], None]) -> Path:
    """Validate `obj` with `validator` (which raises ValueError), then write it as
    JSON atomically; nothing is written when validation fails."""
    validator(obj)
    write_json(path, obj)
    return path
