"""The benchmarks' metrics against hand-computed values and a brute-force AP@k."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from megapairs.evaluation.metrics import (
    MMEB_DATASETS,
    average_precision_at_k,
    check_unique,
    circo_metrics,
    cirr_metrics,
    fashioniq_metrics,
    genecis_average,
    genecis_metrics,
    mmeb_missing,
    mmeb_precision_at_1,
    mmeb_summary,
    rank_of_first,
    ranking_from_scores,
    subset_ranking,
    torch_cuda_order,
)
from megapairs.evaluation.types import EvalQuery

CIRCO_VAL = Path(__file__).resolve().parents[2] / "shared" / "reference-data" / "circo" / "val.json"


def query(qid: str, targets: tuple[str, ...], **fields: object) -> EvalQuery:
    return EvalQuery(id=qid, image=None, text="t", targets=targets, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- AP@k


def direct_ap(ranking: list[str], gts: set[str], k: int) -> Fraction:
    """The formula written out with exact fractions, one position at a time."""
    total, hits = Fraction(0), 0
    for position, item in enumerate(ranking[:k], start=1):
        if item in gts:
            hits += 1
            total += Fraction(hits, position)
    return total / min(k, len(gts))


def test_ap_hand_computed() -> None:
    ranking = ["a", "x", "b", "y", "c"]
    # hits at 1, 3, 5: (1/1 + 2/3 + 3/5) / min(5, 3)
    assert average_precision_at_k(ranking, {"a", "b", "c"}, 5) == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3
    )
    # only position 1 is inside k=2, but 3 ground truths: normalised by min(2, 3) = 2
    assert average_precision_at_k(ranking, {"a", "b", "c"}, 2) == pytest.approx(0.5)
    # fewer ground truths than k: normalised by 1, not 5
    assert average_precision_at_k(["x", "a", "y"], {"a"}, 5) == pytest.approx(0.5)


def test_ap_edges() -> None:
    # k larger than the ranking: still normalised by min(k, |gt|) = 2
    assert average_precision_at_k(["a"], {"a", "b"}, 10) == pytest.approx(0.5)
    assert average_precision_at_k([], {"a"}, 5) == 0.0
    assert average_precision_at_k(["a", "b"], ["a", "a", "b"], 5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ground truth"):
        average_precision_at_k(["a"], set(), 5)
    with pytest.raises(ValueError, match="k must be"):
        average_precision_at_k(["a"], {"a"}, 0)


def test_ap_matches_direct_formula_on_random_rankings() -> None:
    rng = np.random.default_rng(7)
    gallery = [f"g{i}" for i in range(40)]
    for _ in range(300):
        length = int(rng.integers(0, 40))
        ranking = list(rng.choice(gallery, size=length, replace=False))
        gts = set(rng.choice(gallery, size=int(rng.integers(1, 12)), replace=False))
        k = int(rng.integers(1, 60))
        expected = float(direct_ap(ranking, gts, k))
        assert average_precision_at_k(ranking, gts, k) == pytest.approx(expected, abs=1e-12)


def test_check_unique_names_the_query() -> None:
    check_unique(["a", "b"], "q1")
    with pytest.raises(ValueError, match=r"'q7'.*\['b'\]"):
        check_unique(["a", "b", "c", "b"], "q7")


# ---------------------------------------------------------------- CIRCO


def test_circo_metrics_hand_computed_with_aspects() -> None:
    queries = [
        query("0", ("t", "g1", "g2"), meta={"semantic_aspects": ["cardinality", "addition"]}),
        query("1", ("u",), meta={"semantic_aspects": ["cardinality"]}),
    ]
    rankings = {
        # the reference "r0" is ranked first and NOT removed: hits at 2 and 3
        "0": ["r0", "g1", "t", "x", "y"],
        "1": ["u", "z"],
    }
    metrics = circo_metrics(rankings, queries, ks=(1, 5))
    ap0_k5 = (1 / 2 + 2 / 3) / 3
    assert metrics["mAP@1"] == pytest.approx((0 + 1) / 2)
    assert metrics["mAP@5"] == pytest.approx((ap0_k5 + 1) / 2)
    # Recall uses only the first target: "t" is 3rd for query 0 (a ground truth is 2nd)
    assert metrics["Recall@1"] == pytest.approx(0.5)
    assert metrics["Recall@5"] == pytest.approx(1.0)
    # aspects use AP@10 whatever ks are: query 0's AP@10 = (1/2 + 2/3) / 3
    assert metrics["mAP@10/aspect/addition"] == pytest.approx(ap0_k5)
    assert metrics["mAP@10/aspect/cardinality"] == pytest.approx((ap0_k5 + 1) / 2)
    assert not any(key.endswith("negation") for key in metrics)


def test_circo_rejects_duplicates_and_coverage_errors() -> None:
    queries = [query("0", ("t",)), query("1", ("u",))]
    with pytest.raises(ValueError, match=r"query '0': duplicate"):
        circo_metrics({"0": ["t", "x", "t"], "1": ["u"]}, queries)
    with pytest.raises(ValueError, match=r"no ranking: \['1'\]"):
        circo_metrics({"0": ["t"]}, queries)
    with pytest.raises(ValueError, match=r"unknown query ids: \['9'\]"):
        circo_metrics({"0": ["t"], "1": ["u"], "9": []}, queries)
    with pytest.raises(ValueError, match="no target"):
        circo_metrics({"0": ["t"]}, [query("0", ())])
    with pytest.raises(ValueError, match="no queries"):
        circo_metrics({}, [])


def test_circo_empty_ranking_scores_zero() -> None:
    metrics = circo_metrics({"0": []}, [query("0", ("t",))], ks=(5,))
    assert metrics == {"mAP@5": 0.0, "Recall@5": 0.0}


@pytest.mark.skipif(not CIRCO_VAL.exists(), reason="shared CIRCO val.json not present")
def test_circo_real_val_annotations_perfect_ranking() -> None:
    entries = json.loads(CIRCO_VAL.read_text())
    queries = [
        query(
            str(entry["id"]),
            tuple(str(i) for i in entry["gt_img_ids"]),
            meta={"semantic_aspects": entry["semantic_aspects"]},
        )
        for entry in entries
    ]
    assert all(
        q.targets[0] == str(e["target_img_id"]) for q, e in zip(queries, entries, strict=True)
    )
    # ground truths first, then the reference: a perfect ranking on every query
    rankings = {
        str(e["id"]): [str(i) for i in e["gt_img_ids"]] + [str(e["reference_img_id"])]
        for e in entries
    }
    metrics = circo_metrics(rankings, queries)
    assert all(value == pytest.approx(1.0) for value in metrics.values())
    aspects = {key.rsplit("/", 1)[1] for key in metrics if "/aspect/" in key}
    assert {"cardinality", "addition", "negation", "viewpoint"} <= aspects
    # the reference first instead: Recall@1 drops to 0, AP@5 falls
    shifted = {qid: [ranking[-1], *ranking[:-1]] for qid, ranking in rankings.items()}
    shifted_metrics = circo_metrics(shifted, queries, ks=(1, 5))
    assert shifted_metrics["Recall@1"] == 0.0 and shifted_metrics["Recall@5"] == 1.0
    assert shifted_metrics["mAP@5"] < 1.0


# ---------------------------------------------------------------- CIRR


def cirr_query(qid: str = "p1") -> EvalQuery:
    members = ("r", "t", "m1", "m2", "m3", "m4")
    return query(qid, ("t",), exclude=("r",), subset=members)


def test_cirr_removes_reference_and_ranks_subset() -> None:
    ranking = ["r", "m1", "x", "t", "m2", "y", "m3", "m4"]
    metrics = cirr_metrics({"p1": ranking}, [cirr_query()], ks=(1, 2, 3), subset_ks=(1, 2, 3))
    # without "r": m1, x, t, ... -> target 3rd
    assert (metrics["Recall@1"], metrics["Recall@2"], metrics["Recall@3"]) == (0.0, 0.0, 1.0)
    # subset order m1, t, m2, m3, m4 -> target 2nd
    assert metrics["Recall_subset@1"] == 0.0
    assert metrics["Recall_subset@2"] == 1.0
    assert metrics["Recall_subset@3"] == 1.0


def test_cirr_reference_first_is_removed_but_counts_elsewhere() -> None:
    ranking = ["r", "t", "m1", "m2", "m3", "m4"]
    q = cirr_query()
    assert cirr_metrics({"p1": ranking}, [q], ks=(1,), subset_ks=(1,))["Recall@1"] == 1.0
    circo = circo_metrics({"p1": ranking}, [q], ks=(1,))
    fiq = fashioniq_metrics({"dress": ({"p1": ranking}, [q])}, ks=(1,))
    assert circo["Recall@1"] == 0.0 and circo["mAP@1"] == 0.0
    assert fiq["dress/R@1"] == 0.0


def test_cirr_prefix_ranking_and_subset_rankings() -> None:
    q = cirr_query()
    # top-2 search: places only one member, the order of the rest is unknown
    with pytest.raises(ValueError, match="places 1 of 5 subset members"):
        cirr_metrics({"p1": ["x", "m2"]}, [q], ks=(1,))
    # a short prefix that places three members is enough for Recall_subset@3
    metrics = cirr_metrics({"p1": ["m2", "r", "m1", "x", "m3"]}, [q], ks=(1, 10))
    assert metrics["Recall@10"] == 0.0
    assert metrics["Recall_subset@3"] == 0.0
    # or the evaluator passes the members' own order
    metrics = cirr_metrics(
        {"p1": ["x", "m2"]}, [q], ks=(1,), subset_rankings={"p1": ["m2", "r", "t", "m1"]}
    )
    assert metrics["Recall_subset@1"] == 0.0 and metrics["Recall_subset@2"] == 1.0
    assert subset_ranking(["t", "r", "m1"], q, needed=2) == ["t", "m1"]


def test_cirr_errors() -> None:
    q = cirr_query()
    with pytest.raises(ValueError, match="duplicate"):
        cirr_metrics({"p1": ["t", "t", "m1", "m2", "m3", "m4"]}, [q])
    bad = query("p2", ("t",), exclude=("r",), subset=("r", "m1", "m2", "m3"))
    with pytest.raises(ValueError, match="not a subset member"):
        cirr_metrics({"p2": ["m1", "m2", "m3", "t"]}, [bad])
    # without subset metrics the subset is not needed
    assert cirr_metrics({"p2": ["t"]}, [bad], ks=(1,), subset_ks=()) == {"Recall@1": 1.0}


# ---------------------------------------------------------------- FashionIQ


def test_fashioniq_average_is_over_categories() -> None:
    dress = (
        {"d1": ["a", "t1"], "d2": ["b", "c"]},
        [query("d1", ("t1",)), query("d2", ("t2",))],
    )
    shirt = ({"s1": ["t3"]}, [query("s1", ("t3",))])
    metrics = fashioniq_metrics({"dress": dress, "shirt": shirt}, ks=(1, 10))
    assert metrics["dress/R@1"] == 0.0 and metrics["dress/R@10"] == 0.5
    assert metrics["shirt/R@1"] == 1.0 and metrics["shirt/R@10"] == 1.0
    # mean of categories (0.5 + 1) / 2, not pooled queries 2 / 3
    assert metrics["average/R@10"] == pytest.approx(0.75)
    assert metrics["average/R@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="duplicate"):
        fashioniq_metrics({"dress": ({"d1": ["a", "a"]}, [query("d1", ("t",))])})


# ---------------------------------------------------------------- GeneCIS


GENECIS_SCORES = {
    "q1": [0.5, 0.5, 0.1],  # tie with the target
    "q2": [0.9, 0.1, 0.2],
    "q3": [0.2, 0.3, 0.2, 0.1],  # one higher, one tied
}


def test_genecis_ties_follow_the_reference_cuda_sort_by_default() -> None:
    # GeneCIS ranks with similarities.sort(descending=True) on GPU: the bitonic network
    # puts the target after an equal candidate in q1 and after both in q3 (ranks 1, 0, 2)
    metrics = genecis_metrics(GENECIS_SCORES)
    assert metrics["Recall@1"] == pytest.approx(1 / 3)
    assert metrics["Recall@2"] == pytest.approx(2 / 3)
    assert metrics["Recall@3"] == pytest.approx(1.0)
    optimistic = genecis_metrics(GENECIS_SCORES, ties="optimistic")
    # ranks 0, 0, 1
    assert optimistic["Recall@1"] == pytest.approx(2 / 3)
    assert optimistic["Recall@2"] == pytest.approx(1.0)
    pessimistic = genecis_metrics(GENECIS_SCORES, ties="pessimistic")
    assert pessimistic == metrics  # the same ranks here, but not in general (below)
    # a collapsed model (15 equal scores): the target is 6th, so it scores nothing
    assert torch_cuda_order([0.3] * 15) == [7, 6, 4, 5, 1, 0, 2, 3, 11, 10, 8, 9, 13, 12, 14]
    assert genecis_metrics({"q": [0.3] * 15})["Recall@3"] == 0.0
    assert genecis_metrics({"q": [0.3] * 15}, ks=(6,))["Recall@6"] == 1.0


def test_torch_cuda_order_matches_orders_reported_from_cuda() -> None:
    # torch.sort / argsort (ascending) on CUDA, as reported in pytorch/pytorch issues
    # #28871 (1.3), #103909 (2.0.1) and #120874 (2.2); ascending x = descending -x
    reported = [
        ([1, 2, 5, 4, 5], [0, 1, 3, 4, 2]),
        ([1, 2, 3, 3, 2, 1], [5, 0, 1, 4, 2, 3]),
        ([3, 1, 4, 1, 5, 9, 2, 6, 5], [1, 3, 6, 0, 2, 8, 4, 7, 5]),
    ]
    for values, order in reported:
        assert torch_cuda_order([-v for v in values]) == order
    rng = np.random.default_rng(3)
    for _ in range(200):  # it sorts: descending, each index once
        row = rng.integers(0, 4, size=int(rng.integers(1, 33))).astype(float).tolist()
        order = torch_cuda_order(row)
        assert sorted(order) == list(range(len(row)))
        assert [row[i] for i in order] == sorted(row, reverse=True)
    with pytest.raises(ValueError, match="at most 32"):
        torch_cuda_order([0.0] * 33)


def test_genecis_tie_order_depends_on_the_tied_position() -> None:
    """A 15-candidate row whose target ties with gallery item j at the top: the CUDA
    network puts the target first for some j and second for others, so neither bound
    reproduces the reference."""
    base = [0.9 - 0.01 * i for i in range(15)]
    ranks = {}
    for j in (1, 2, 4, 8):
        row = list(base)
        row[0] = row[j] = 0.95
        ranks[j] = rank_of_first(row, "torch_cuda")
        assert rank_of_first(row, "optimistic") == 0 and rank_of_first(row, "pessimistic") == 1
    assert ranks == {1: 1, 2: 0, 4: 1, 8: 0}
    longer = [0.5] * 40  # beyond the bitonic network: a stable sort, target first
    assert rank_of_first(longer, "torch_cuda") == 0
    with pytest.raises(ValueError, match="unknown tie rule"):
        rank_of_first([0.1, 0.2], "random")  # type: ignore[arg-type]


def test_genecis_average_and_errors() -> None:
    per_subtask = {
        "focus_attribute": {"Recall@1": 0.2},
        "change_attribute": {"Recall@1": 0.1},
        "focus_object": {"Recall@1": 0.3},
        "change_object": {"Recall@1": 0.2},
    }
    assert genecis_average(per_subtask) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="NaN"):
        genecis_metrics({"q": [float("nan"), 0.1]})
    with pytest.raises(ValueError, match="non-empty"):
        rank_of_first([], "pessimistic", "q")


# ---------------------------------------------------------------- MMEB


def test_mmeb_precision_at_1_ties() -> None:
    rows = {"a": [1.0, 1.0, 0.0], "b": [0.0, 1.0], "c": [2.0, 1.0, 1.0]}
    # the reference's np.argmax takes the first maximum: row "a" is correct
    assert mmeb_precision_at_1(rows) == pytest.approx(2 / 3)
    assert mmeb_precision_at_1(rows, ties="pessimistic") == pytest.approx(1 / 3)


def test_mmeb_table_has_the_36_datasets() -> None:
    assert len(MMEB_DATASETS) == 36
    groups = [meta for meta, _ in MMEB_DATASETS.values()]
    assert [groups.count(m) for m in ("classification", "vqa", "retrieval", "grounding")] == [
        10,
        10,
        12,
        4,
    ]
    ind = [meta for meta, split in MMEB_DATASETS.values() if split == "IND"]
    assert len(ind) == 20
    assert [ind.count(m) for m in ("classification", "vqa", "retrieval", "grounding")] == [
        5,
        6,
        8,
        1,
    ]


def test_mmeb_summary_over_present_datasets() -> None:
    scores = {"ImageNet-1K": 0.5, "Place365": 0.3, "CIRR": 0.8, "RefCOCO": 0.6}
    summary = mmeb_summary(scores)
    assert summary == pytest.approx(
        {
            "classification": 0.4,
            "retrieval": 0.8,
            "grounding": 0.6,
            "IND": 0.65,
            "OOD": 0.45,
            "overall": 0.55,
        }
    )
    assert "vqa" not in summary
    missing = mmeb_missing(scores)
    assert len(missing) == 32 and "OK-VQA" in missing and "CIRR" not in missing
    full = mmeb_summary(dict.fromkeys(MMEB_DATASETS, 0.25))
    assert full["overall"] == pytest.approx(0.25) and len(full) == 7
    with pytest.raises(ValueError, match="ImageNet_1K"):
        mmeb_summary({"ImageNet_1K": 0.5})


# ---------------------------------------------------------------- scores -> rankings


def test_ranking_from_scores_ties_exclude_and_k() -> None:
    ids = ["a", "b", "c", "d"]
    scores = np.array([[0.1, 0.5, 0.5, 0.9], [0.5, 0.5, 0.5, 0.5]])
    assert ranking_from_scores(scores, ids, 2) == [["d", "b"], ["a", "b"]]
    assert ranking_from_scores(scores, ids, 3, exclude=[{"d"}, {"a", "zz"}]) == [
        ["b", "c", "a"],
        ["b", "c", "d"],
    ]
    assert ranking_from_scores(scores, ids, 10)[0] == ["d", "b", "c", "a"]
    with pytest.raises(ValueError, match="duplicate"):
        ranking_from_scores(scores, ["a", "a", "c", "d"], 2)
    with pytest.raises(ValueError, match="shape"):
        ranking_from_scores(scores, ids[:3], 2)


def test_ranking_from_scores_matches_full_stable_sort() -> None:
    rng = np.random.default_rng(3)
    ids = [f"g{i}" for i in range(30)]
    for _ in range(50):
        scores = rng.integers(0, 5, size=(4, 30)).astype(np.float32)  # many ties
        k = int(rng.integers(1, 35))
        expected = [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]
        assert ranking_from_scores(scores, ids, k) == expected
