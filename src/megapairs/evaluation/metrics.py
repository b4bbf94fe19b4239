"""The benchmarks' metrics, as their reference evaluation code computes them.

Every function is pure and takes rankings (query id -> gallery ids, best first) or
per-candidate scores; searching is the evaluator's job. Values are fractions in
[0, 1] (the reference scripts print x100; tables multiply). Shared decisions:

- A ranking with a repeated id is an error (`check_unique`), as CIRCO's server says.
- `k` larger than a ranking counts hits in the whole ranking; k < 1 is an error.
- An empty ranking has no hits (every metric 0 for that query).
- Ties inside a ranking are not the metrics' concern: the order given is the order.
  Where scores are given (GeneCIS, MMEB) the tie rule is an argument whose default
  reproduces the reference code's order (GeneCIS: CUDA `torch.sort`; MMEB:
  `np.argmax`), documented there.
- Every query needs a ranking and every ranking a query; a mismatch is an error
  naming the ids, so a partial evaluation is never reported as a whole one.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np

from megapairs.evaluation.types import EvalQuery

TieRule = Literal["torch_cuda", "optimistic", "pessimistic"]
Rankings = Mapping[str, Sequence[str]]

CIRCO_KS = (5, 10, 25, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
GENECIS_KS = (1, 2, 3)
CIRCO_ASPECT_K = 10
# Rows up to this long are sorted on CUDA by PyTorch's in-place bitonic network of this size.
TORCH_BITONIC_SIZE = 32

MMEB_META_TASKS = ("classification", "vqa", "retrieval", "grounding")

# MMEB-eval subset names (TIGER-Lab/MMEB-eval), meta-task and split: the 20
# in-distribution datasets are the MMEB-train subsets; the other 16 are held out.
MMEB_DATASETS: dict[str, tuple[str, Literal["IND", "OOD"]]] = {
    "ImageNet-1K": ("classification", "IND"),
    "N24News": ("classification", "IND"),
    "HatefulMemes": ("classification", "IND"),
    "VOC2007": ("classification", "IND"),
    "SUN397": ("classification", "IND"),
    "Place365": ("classification", "OOD"),
    "ImageNet-A": ("classification", "OOD"),
    "ImageNet-R": ("classification", "OOD"),
    "ObjectNet": ("classification", "OOD"),
    "Country211": ("classification", "OOD"),
    "OK-VQA": ("vqa", "IND"),
    "A-OKVQA": ("vqa", "IND"),
    "DocVQA": ("vqa", "IND"),
    "InfographicsVQA": ("vqa", "IND"),
    "ChartQA": ("vqa", "IND"),
    "Visual7W": ("vqa", "IND"),
    "ScienceQA": ("vqa", "OOD"),
    "VizWiz": ("vqa", "OOD"),
    "GQA": ("vqa", "OOD"),
    "TextVQA": ("vqa", "OOD"),
    "VisDial": ("retrieval", "IND"),
    "CIRR": ("retrieval", "IND"),
    "VisualNews_t2i": ("retrieval", "IND"),
    "VisualNews_i2t": ("retrieval", "IND"),
    "MSCOCO_t2i": ("retrieval", "IND"),
    "MSCOCO_i2t": ("retrieval", "IND"),
    "NIGHTS": ("retrieval", "IND"),
    "WebQA": ("retrieval", "IND"),
    "OVEN": ("retrieval", "OOD"),
    "FashionIQ": ("retrieval", "OOD"),
    "EDIS": ("retrieval", "OOD"),
    "Wiki-SS-NQ": ("retrieval", "OOD"),
    "MSCOCO": ("grounding", "IND"),
    "RefCOCO": ("grounding", "OOD"),
    "RefCOCO-Matching": ("grounding", "OOD"),
    "Visual7W-Pointing": ("grounding", "OOD"),
}


# ---------------------------------------------------------------- shared checks


def check_unique(ranking: Sequence[str], query_id: str) -> None:
    """Raise ValueError naming the query and the ids that a ranking repeats."""
    repeated = sorted(item for item, count in Counter(ranking).items() if count > 1)
    if repeated:
        raise ValueError(f"query {query_id!r}: duplicate predictions {repeated[:10]}")


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def check_covered(ids: Iterable[str], queries: Sequence[EvalQuery], what: str) -> None:
    """Every query has an entry and every entry a query; no query id twice."""
    query_ids = [query.id for query in queries]
    if not query_ids:
        raise ValueError("no queries to evaluate")
    repeated = sorted(qid for qid, count in Counter(query_ids).items() if count > 1)
    if repeated:
        raise ValueError(f"query ids repeated: {repeated[:10]}")
    given, wanted = set(ids), set(query_ids)
    if missing := sorted(wanted - given):
        raise ValueError(f"{len(missing)} queries have no {what}: {missing[:10]}")
    if unknown := sorted(given - wanted):
        raise ValueError(f"{what} for {len(unknown)} unknown query ids: {unknown[:10]}")


def _first_target(query: EvalQuery) -> str:
    if not query.targets:
        raise ValueError(f"query {query.id!r} has no target")
    return query.targets[0]


def recall_at_k(ranking: Sequence[str], target: str, k: int) -> float:
    """1.0 when `target` is among the first `k` ids of `ranking`, else 0.0."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(target in ranking[:k])


def without(ranking: Sequence[str], excluded: Collection[str]) -> list[str]:
    """The ranking with `excluded` ids removed, order kept (CIRR drops the reference)."""
    drop = set(excluded)
    return [item for item in ranking if item not in drop]


def _mean_recalls(
    rankings: Mapping[str, Sequence[str]], queries: Sequence[EvalQuery], ks: tuple[int, ...]
) -> dict[int, float]:
    """Mean over queries of Recall@k on each query's first target."""
    hits = {k: [recall_at_k(rankings[q.id], _first_target(q), k) for q in queries] for k in ks}
    return {k: float(np.mean(values)) for k, values in hits.items()}


# ---------------------------------------------------------------- CIRCO


def average_precision_at_k(ranking: Sequence[str], gts: Collection[str], k: int) -> float:
    """CIRCO's AP@k: sum of precision_i * label_i over i <= k, divided by min(k, |gts|).

    labels_i = [ranking_i in gts]; precision_i = (hits among the first i) / i.
    Decisions: ground truths are a set (a repeated ground truth counts once); empty
    ground truth is an error (AP is undefined); a ranking shorter than k sums what it
    has but is still normalised by min(k, |gts|), as the reference slices [:k];
    duplicates in the ranking are the caller's check (`check_unique`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevant = set(gts)
    if not relevant:
        raise ValueError("average precision needs at least one ground truth")
    labels = np.fromiter((item in relevant for item in ranking[:k]), dtype=np.float64)
    precisions = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
    return float(precisions.sum() / min(k, len(relevant)))


def circo_metrics(
    rankings: Rankings, queries: Sequence[EvalQuery], ks: Sequence[int] = CIRCO_KS
) -> dict[str, float]:
    """CIRCO: `mAP@k` over all ground truths (`query.targets`), `Recall@k` on the
    first target (`target_img_id`) only, and `mAP@10/aspect/<tag>` per semantic
    aspect (`query.meta["semantic_aspects"]`; a query counts once in each of its
    aspects; only aspects that occur are reported). The reference image is NOT
    removed from the ranking. Fractions in [0, 1]."""
    ks = _check_ks(ks)
    check_covered(rankings, queries, "ranking")
    per_k: dict[int, list[float]] = defaultdict(list)
    per_aspect: dict[str, list[float]] = defaultdict(list)
    for query in queries:
        ranking = rankings[query.id]
        check_unique(ranking, query.id)
        _first_target(query)
        for k in ks:
            per_k[k].append(average_precision_at_k(ranking, query.targets, k))
        aspect_ap = average_precision_at_k(ranking, query.targets, CIRCO_ASPECT_K)
        for aspect in query.meta.get("semantic_aspects", ()):
            per_aspect[str(aspect)].append(aspect_ap)
    result = {f"mAP@{k}": float(np.mean(per_k[k])) for k in ks}
    result |= {f"Recall@{k}": value for k, value in _mean_recalls(rankings, queries, ks).items()}
    for aspect in sorted(per_aspect):
        result[f"mAP@{CIRCO_ASPECT_K}/aspect/{aspect}"] = float(np.mean(per_aspect[aspect]))
    return result


# ---------------------------------------------------------------- CIRR


def subset_ranking(
    ranking: Sequence[str], query: EvalQuery, needed: int = max(CIRR_SUBSET_KS)
) -> list[str]:
    """CIRR's subset ranking: `ranking` without `query.exclude`, kept to `query.subset`.

    `ranking` may be a prefix of the full ranking (a top-k search): members it lacks
    rank after every member it has, so the prefix is exact as far as it goes. It must
    place `needed` members (or all of them); otherwise the order is unknown and this
    raises, asking for a longer ranking.
    """
    members = set(query.subset) - set(query.exclude)
    placed = [item for item in without(ranking, query.exclude) if item in members]
    if len(placed) < min(needed, len(members)):
        raise ValueError(
            f"query {query.id!r}: the ranking places {len(placed)} of {len(members)} subset "
            f"members, {needed} needed; pass a longer ranking or a subset ranking"
        )
    return placed


def cirr_metrics(
    rankings: Rankings,
    queries: Sequence[EvalQuery],
    ks: Sequence[int] = CIRR_KS,
    subset_ks: Sequence[int] = CIRR_SUBSET_KS,
    subset_rankings: Rankings | None = None,
) -> dict[str, float]:
    """CIRR: `Recall@k` with `query.exclude` (the reference) removed from each ranking
    first, hit on `targets[0]`; `Recall_subset@k` on the ranking (reference removed)
    kept to `query.subset` (`img_set.members`). `subset_rankings` (query id -> member
    ids, best first) may replace `rankings` for the subset metric when the search
    returned only a top-k (see `subset_ranking`). A query whose target is not one of
    its subset members is an error; `subset_ks=()` skips the subset metric."""
    ks = _check_ks(ks)
    subset_ks = _check_ks(subset_ks) if subset_ks else ()
    check_covered(rankings, queries, "ranking")
    kept = {}
    for query in queries:
        check_unique(rankings[query.id], query.id)
        kept[query.id] = without(rankings[query.id], query.exclude)
    result = {f"Recall@{k}": value for k, value in _mean_recalls(kept, queries, ks).items()}
    if subset_ks:
        source = kept if subset_rankings is None else subset_rankings
        if subset_rankings is not None:
            check_covered(subset_rankings, queries, "subset ranking")
        restricted = {q.id: _cirr_subset(source[q.id], q, max(subset_ks)) for q in queries}
        recalls = _mean_recalls(restricted, queries, subset_ks)
        result |= {f"Recall_subset@{k}": value for k, value in recalls.items()}
    return result


def _cirr_subset(ranking: Sequence[str], query: EvalQuery, needed: int) -> list[str]:
    check_unique(ranking, query.id)
    if _first_target(query) not in query.subset:
        raise ValueError(f"query {query.id!r}: target {query.targets[0]!r} is not a subset member")
    return subset_ranking(ranking, query, needed)


# ---------------------------------------------------------------- FashionIQ


def fashioniq_metrics(
    per_category: Mapping[str, tuple[Rankings, Sequence[EvalQuery]]],
    ks: Sequence[int] = FASHIONIQ_KS,
) -> dict[str, float]:
    """FashionIQ: `<category>/R@k` (hit of `targets[0]` in the category's ranking; the
    reference is NOT removed) and `average/R@k`, the plain mean of the categories'
    values (not pooled over queries), as the benchmark reports it."""
    ks = _check_ks(ks)
    if not per_category:
        raise ValueError("no FashionIQ categories to evaluate")
    result: dict[str, float] = {}
    for category, (rankings, queries) in per_category.items():
        check_covered(rankings, queries, f"{category} ranking")
        for query in queries:
            check_unique(rankings[query.id], query.id)
        for k, value in _mean_recalls(rankings, queries, ks).items():
            result[f"{category}/R@{k}"] = value
    for k in ks:
        result[f"average/R@{k}"] = float(np.mean([result[f"{c}/R@{k}"] for c in per_category]))
    return result


# ---------------------------------------------------------------- candidate scores


def rank_of_first(scores: Sequence[float], ties: TieRule, row_id: str = "") -> int:
    """0-based rank of candidate 0 among `scores`.

    `torch_cuda`: its place in `torch.sort(scores, descending=True)` run on a CUDA
    device, as reference code that sorts on GPU ranks it (see `torch_cuda_order`).
    `optimistic`: the number of candidates scoring strictly higher (a tie goes to
    candidate 0, like `np.argmax` or a stable descending sort). `pessimistic`: the
    number of other candidates scoring higher or equal (a tie counts against it, so
    constant scores never look correct). NaN scores and empty rows are errors.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"row {row_id!r}: need a non-empty 1-d list of scores")
    if np.isnan(values).any():
        raise ValueError(f"row {row_id!r}: NaN score")
    others = values[1:]
    if ties == "optimistic":
        return int((others > values[0]).sum())
    if ties == "pessimistic":
        return int((others >= values[0]).sum())
    if ties == "torch_cuda":
        if (others == values[0]).any() and values.size <= TORCH_BITONIC_SIZE:
            return torch_cuda_order(values.tolist()).index(0)
        return int((others > values[0]).sum())  # no tie, or a stable sort (longer rows)
    raise ValueError(f"unknown tie rule {ties!r}")


def torch_cuda_order(scores: Sequence[float]) -> list[int]:
    """The indices `torch.sort(scores, descending=True)` returns on a CUDA device for a
    row of at most 32 scores, ties included.

    PyTorch's default (unstable) sort puts such rows through an in-place bitonic
    network of 32 slots, the row padded with invalid entries (aten/src/ATen/native/
    cuda/SortUtils.cuh `bitonicSortKVInPlace`, called by Sort.cu `sortKeyValueInplace`
    for every row of 2 to 32): a step swaps equal keys whenever its direction is false,
    so ties end in a fixed order that is not the input order. (Longer rows take other
    kernels, stable in recent releases.) Checked against the CUDA orders reported in
    pytorch/pytorch issues #28871 (1.3), #103909 (2.0.1) and #120874 (2.2).
    """
    n = len(scores)
    if n > TORCH_BITONIC_SIZE:
        raise ValueError(f"the bitonic network sorts at most {TORCH_BITONIC_SIZE}, got {n}")
    keys = [float(score) for score in scores] + [0.0] * (TORCH_BITONIC_SIZE - n)
    slots = list(range(TORCH_BITONIC_SIZE))  # slot -> original index; >= n is padding
    for size, stride in _bitonic_steps(TORCH_BITONIC_SIZE):
        for thread in range(TORCH_BITONIC_SIZE // 2):
            a = 2 * thread - (thread & (stride - 1))
            b = a + stride
            swap = (slots[a] < n and keys[a] > keys[b]) or slots[b] >= n
            if swap == bool(thread & (size // 2)):
                keys[a], keys[b] = keys[b], keys[a]
                slots[a], slots[b] = slots[b], slots[a]
    return slots[:n]


def _bitonic_steps(power: int) -> Iterator[tuple[int, int]]:
    """(merge size, stride) of each step of a bitonic sort of `power` slots; in the last
    merge (size = power) every thread's direction is false."""
    size = 2
    while size <= power:
        stride = size // 2
        while stride:
            yield size, stride
            stride //= 2
        size *= 2


def genecis_metrics(
    scores: Mapping[str, Sequence[float]],
    ks: Sequence[int] = GENECIS_KS,
    ties: TieRule = "torch_cuda",
) -> dict[str, float]:
    """GeneCIS, one subtask: `Recall@k`, the fraction of queries whose correct
    candidate (index 0 of [target] + gallery) ranks within the top k.

    Ties: the reference (facebookresearch/genecis eval/eval_functions.py, `validate`)
    ranks with `_, sort_idxs = similarities.sort(dim=-1, descending=True)` on GPU and
    counts a hit when the target rank 0 is in `sort_idxs[:, :k]`; the default
    (`torch_cuda`) reproduces that order exactly, ties included (for rows of at most
    32 candidates, which GeneCIS' are; see `torch_cuda_order`). Its ties are neither
    for nor against the target: with 15 equal scores the target ranks 6th, so a
    collapsed model scores 0. `pessimistic` and `optimistic` are the bounds.
    """
    ks = _check_ks(ks)
    if not scores:
        raise ValueError("no GeneCIS queries to evaluate")
    ranks = np.array([rank_of_first(row, ties, qid) for qid, row in scores.items()])
    return {f"Recall@{k}": float(np.mean(ranks < k)) for k in ks}


def genecis_average(per_subtask: Mapping[str, Mapping[str, float]]) -> float:
    """GeneCIS headline: the mean of `Recall@1` over the subtasks given (plain mean,
    not pooled over queries)."""
    if not per_subtask:
        raise ValueError("no GeneCIS subtasks to average")
    return float(np.mean([metrics["Recall@1"] for metrics in per_subtask.values()]))


def mmeb_precision_at_1(
    scores: Mapping[str, Sequence[float]], ties: TieRule = "optimistic"
) -> float:
    """MMEB Precision@1 of one dataset: the fraction of rows whose candidate 0 scores
    highest. Ties: the reference (VLM2Vec `get_pred`) takes `np.argmax`, the first
    maximum, so a tie with candidate 0 counts as correct; that is the default
    (`optimistic`) so numbers compare with published ones. `pessimistic` is stricter."""
    if not scores:
        raise ValueError("no MMEB rows to evaluate")
    return float(np.mean([rank_of_first(row, ties, rid) == 0 for rid, row in scores.items()]))


def mmeb_missing(per_dataset: Mapping[str, float]) -> list[str]:
    """The MMEB datasets (of the 36, in table order) that `per_dataset` lacks."""
    return [name for name in MMEB_DATASETS if name not in per_dataset]


def mmeb_summary(per_dataset: Mapping[str, float]) -> dict[str, float]:
    """MMEB averages of per-dataset Precision@1: each meta-task (`classification`,
    `vqa`, `retrieval`, `grounding`), `IND`, `OOD` and `overall`, each the plain mean
    over the datasets of that group that are present (a group with none is left out;
    `mmeb_missing` names what is absent). Unknown dataset names are an error."""
    if unknown := sorted(set(per_dataset) - set(MMEB_DATASETS)):
        raise ValueError(f"unknown MMEB datasets {unknown}; known: {list(MMEB_DATASETS)}")
    groups: dict[str, list[float]] = defaultdict(list)
    for name, value in per_dataset.items():
        meta_task, split = MMEB_DATASETS[name]
        for group in (meta_task, split, "overall"):
            groups[group].append(float(value))
    order = (*MMEB_META_TASKS, "IND", "OOD", "overall")
    return {group: float(np.mean(groups[group])) for group in order if groups[group]}


# ---------------------------------------------------------------- scores -> rankings


def ranking_from_scores(
    scores: np.ndarray,
    ids: Sequence[str],
    k: int,
    exclude: Sequence[Collection[str]] | None = None,
) -> list[list[str]]:
    """Top-k gallery ids per query from a (queries, gallery) score matrix, best first.

    Equal scores keep gallery order (the lower index first), also at the k-th place,
    so the result is deterministic. `exclude[i]` ids are removed from query i's
    ranking before the top k is taken (ids not in the gallery are ignored). Duplicate
    gallery ids and NaN scores are errors. k larger than the gallery returns it all.
    """
    matrix = np.asarray(scores)
    if matrix.ndim != 2 or matrix.shape[1] != len(ids):
        raise ValueError(f"scores shape {matrix.shape} does not match {len(ids)} gallery ids")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.isnan(matrix).any():
        raise ValueError("NaN in scores")
    index = {item: position for position, item in enumerate(ids)}
    if len(index) != len(ids):
        check_unique(list(ids), "<gallery>")
    if exclude is not None and len(exclude) != len(matrix):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(matrix)} queries")
    excluded = exclude if exclude is not None else [()] * len(matrix)
    rankings = []
    for row, row_exclude in zip(matrix, excluded, strict=True):
        dropped = [index[item] for item in row_exclude if item in index]
        keep = np.setdiff1d(np.arange(len(ids)), dropped)
        top = keep[_top_k_stable(row[keep], k)]
        rankings.append([ids[position] for position in top])
    return rankings


def _top_k_stable(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values, descending, equal values in position order."""
    if k < len(values):
        threshold = np.partition(values, len(values) - k)[len(values) - k]
        above = np.flatnonzero(values > threshold)
        at = np.flatnonzero(values == threshold)[: k - len(above)]
        chosen = np.concatenate([above, at])
    else:
        chosen = np.arange(len(values))
    return chosen[np.argsort(-values[chosen], kind="stable")]
