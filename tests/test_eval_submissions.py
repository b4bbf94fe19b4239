"""CIRCO and CIRR test-server submission files: built, validated, written."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from megapairs.evaluation.submissions import (
    circo_submission,
    cirr_submissions,
    validate_circo_submission,
    validate_cirr_recall_submission,
    validate_cirr_subset_submission,
    write_submission,
)
from megapairs.evaluation.types import EvalQuery

GALLERY = [f"img-{i}" for i in range(100)]


def circo_queries() -> list[EvalQuery]:
    return [EvalQuery(id=qid, image=None, text="t") for qid in ("0", "1")]


def circo_rankings() -> dict[str, list[str]]:
    return {"0": [str(100 + i) for i in range(60)], "1": [str(500 - i) for i in range(55)]}


def cirr_queries() -> list[EvalQuery]:
    members = ("img-0", "img-1", "img-7", "img-8", "img-9", "img-55")
    return [
        EvalQuery(id="101", image=None, text="t", exclude=("img-0",), subset=members),
        EvalQuery(
            id="102", image=None, text="t", exclude=("img-3",), subset=("img-3", *GALLERY[40:45])
        ),
    ]


def cirr_rankings() -> dict[str, list[str]]:
    return {"101": list(GALLERY), "102": list(reversed(GALLERY))}


# ---------------------------------------------------------------- CIRCO


def test_circo_submission_roundtrip(tmp_path: Path) -> None:
    submission = circo_submission(circo_rankings(), circo_queries())
    assert set(submission) == {"0", "1"}
    assert submission["0"] == list(range(100, 150))
    assert submission["1"][:2] == [500, 499] and len(submission["1"]) == 50
    path = write_submission(
        tmp_path / "circo_test.json",
        submission,
        partial(validate_circo_submission, query_ids=["0", "1"]),
    )
    assert json.loads(path.read_text()) == submission


def test_circo_submission_needs_50_unique_int_ids() -> None:
    rankings = circo_rankings()
    with pytest.raises(ValueError, match=r"'1': ranking has 49 ids, 50 needed"):
        circo_submission({**rankings, "1": rankings["1"][:49]}, circo_queries())
    with pytest.raises(ValueError, match=r"'0': duplicate"):
        circo_submission({**rankings, "0": ["7", *rankings["0"][:49], "7"]}, circo_queries())
    with pytest.raises(ValueError, match="must be integers"):
        circo_submission({**rankings, "0": ["x", *rankings["0"]]}, circo_queries())
    with pytest.raises(ValueError, match=r"no ranking: \['1'\]"):
        circo_submission({"0": rankings["0"]}, circo_queries())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("1"), r"missing from the submission: \['1'\]"),
        (lambda s: s.update({"7": list(range(50))}), r"unknown query ids .*\['7'\]"),
        (lambda s: s.update({"0": s["0"][:49]}), "49 predictions, exactly 50"),
        (lambda s: s.update({"0": [s["0"][1], *s["0"][1:]]}), "duplicate"),
        (lambda s: s.update({"0": [str(i) for i in s["0"]]}), "must be ints"),
        (lambda s: s.update({"0": [True, *s["0"][1:]]}), "must be ints"),
        (lambda s: s.update({"0": tuple(s["0"])}), "must be a list"),
    ],
)
def test_validate_circo_rejects(change: Any, message: str) -> None:
    submission = circo_submission(circo_rankings(), circo_queries())
    change(submission)
    with pytest.raises(ValueError, match=message):
        validate_circo_submission(submission, ["0", "1"])


def test_validate_circo_rejects_non_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        validate_circo_submission([1, 2], ["0"])


# ---------------------------------------------------------------- CIRR


def test_cirr_submissions_remove_reference_and_keep_members() -> None:
    recall, subset = cirr_submissions(cirr_rankings(), cirr_queries())
    assert recall["version"] == subset["version"] == "rc2"
    assert (recall["metric"], subset["metric"]) == ("recall", "recall_subset")
    assert set(recall) == set(subset) == {"version", "metric", "101", "102"}
    assert recall["101"] == GALLERY[1:51]  # img-0, the reference, removed
    assert len(recall["102"]) == 50 and "img-3" not in recall["102"]
    assert subset["101"] == ["img-1", "img-7", "img-8"]
    assert subset["102"] == ["img-44", "img-43", "img-42"]


def test_cirr_subset_from_subset_rankings() -> None:
    queries = cirr_queries()
    short = {"101": GALLERY[20:75], "102": GALLERY[:55]}
    # the top-55 of query 101 holds only img-55 of its members: order unknown
    with pytest.raises(ValueError, match="places 1 of 5 subset members"):
        cirr_submissions(short, queries)
    members = {"101": ["img-55", "img-0", "img-9", "img-1"], "102": GALLERY[40:45]}
    _, subset = cirr_submissions(short, queries, subset_rankings=members)
    assert subset["101"] == ["img-55", "img-9", "img-1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"version": "rc1"}), "'version' must be 'rc2'"),
        (lambda s: s.update({"metric": "recall_subset"}), "'metric' must be 'recall'"),
        (lambda s: s.pop("102"), r"missing from the submission: \['102'\]"),
        (lambda s: s.update({"101": ["img-0", *s["101"][1:]]}), "include the reference"),
        (lambda s: s.update({"101": s["101"][:10]}), "10 predictions, exactly 50"),
        (lambda s: s.update({"101": [1, *s["101"][1:]]}), "image names"),
    ],
)
def test_validate_cirr_recall_rejects(change: Any, message: str) -> None:
    recall, _ = cirr_submissions(cirr_rankings(), cirr_queries())
    change(recall)
    with pytest.raises(ValueError, match=message):
        validate_cirr_recall_submission(recall, cirr_queries())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"metric": "recall"}), "'metric' must be 'recall_subset'"),
        (
            lambda s: s.update({"101": ["img-1", "img-7", "img-30"]}),
            r"\['img-30'\] are not members",
        ),
        (lambda s: s.update({"101": ["img-0", "img-7", "img-8"]}), "include the reference"),
        (lambda s: s.update({"101": ["img-1", "img-7", "img-7"]}), "duplicate"),
        (lambda s: s.update({"101": ["img-1", "img-7"]}), "2 predictions, exactly 3"),
    ],
)
def test_validate_cirr_subset_rejects(change: Any, message: str) -> None:
    _, subset = cirr_submissions(cirr_rankings(), cirr_queries())
    change(subset)
    with pytest.raises(ValueError, match=message):
        validate_cirr_subset_submission(subset, cirr_queries())


def test_write_submission_validates_before_writing(tmp_path: Path) -> None:
    recall, _ = cirr_submissions(cirr_rankings(), cirr_queries())
    recall["metric"] = "recall_subset"
    path = tmp_path / "cirr_recall.json"
    with pytest.raises(ValueError, match="'metric'"):
        write_submission(
            path, recall, partial(validate_cirr_recall_submission, queries=cirr_queries())
        )
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
