"""InfoNCE against losses written out by hand, one per negative strategy (paper Table 4)."""

import math
import random

import pytest
import torch

from megapairs.training.losses import InfoNCELoss, split_grouped
from megapairs.training.negatives import negatives_per_query, select_negatives

# Unit vectors whose dot products are exact decimals. q1, q2 are composed queries, p1, p2
# their targets, qimg* the query images (hns[0]) and n* the mined hard negatives.
VECTORS = {
    "q1": (1.0, 0.0),
    "q2": (0.0, 1.0),
    "p1": (0.6, 0.8),
    "p2": (0.28, 0.96),
    "qimg1": (0.8, -0.6),
    "qimg2": (-0.6, 0.8),
    "n1a": (0.0, 1.0),
    "n1b": (-1.0, 0.0),
    "n2a": (1.0, 0.0),
    "n2b": (0.6, -0.8),
}
ROWS = [("q1", "p1", ["qimg1", "n1a", "n1b"]), ("q2", "p2", ["qimg2", "n2a", "n2b"])]
# Scores of each query against every candidate of the batch:
#        p1    p2    qimg1 qimg2 n1a  n1b  n2a  n2b
# q1:    0.6   0.28  0.8   -0.6  0    -1   1    0.6
# q2:    0.8   0.96  -0.6  0.8   1    0    0    -0.8
# (own positive score, the other candidates' scores) per query, for each strategy.
BY_HAND = {
    "none": [(0.6, [0.28]), (0.96, [0.8])],
    "query_image": [(0.6, [0.28, 0.8, -0.6]), (0.96, [0.8, -0.6, 0.8])],
    "mined": [(0.6, [0.28, 0.0, -1.0, 1.0, 0.6]), (0.96, [0.8, 1.0, 0.0, 0.0, -0.8])],
    "both": [
        (0.6, [0.28, 0.8, 0.0, -1.0, -0.6, 1.0, 0.6]),
        (0.96, [0.8, -0.6, 1.0, 0.0, 0.8, 0.0, -0.8]),
    ],
}
# The same means, evaluated once with plain Python floats.
EXPECTED = {
    "none": 0.5811183551104075,
    "query_image": 1.1239705795946873,
    "mined": 1.473112193184536,
    "both": 1.7291392352794202,
}
COUNT = {"none": 0, "query_image": 1, "mined": 2, "both": 3}


def by_hand(rows: list[tuple[float, list[float]]], temperature: float) -> float:
    """Mean over queries of -s_pos / tau + log(sum_j exp(s_j / tau))."""
    losses = [
        -pos / temperature + math.log(sum(math.exp(s / temperature) for s in [pos, *others]))
        for pos, others in rows
    ]
    return sum(losses) / len(losses)


def embed(*names: str) -> torch.Tensor:
    return torch.tensor([VECTORS[name] for name in names], dtype=torch.float64)


def batch_for(strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries, positives and the strategy's negatives, picked by `select_negatives`."""
    rng = random.Random(0)
    chosen = [select_negatives(hns, strategy, COUNT[strategy], rng) for _, _, hns in ROWS]
    assert all(len(c) == negatives_per_query(strategy, COUNT[strategy]) for c in chosen)
    negatives = torch.stack([embed(*names) for names in chosen]) if chosen[0] else None
    return embed(*(q for q, _, _ in ROWS)), embed(*(p for _, p, _ in ROWS)), negatives


@pytest.mark.parametrize("strategy", ["none", "query_image", "mined", "both"])
def test_loss_matches_hand_computation_per_strategy(strategy: str) -> None:
    queries, positives, negatives = batch_for(strategy)
    loss = InfoNCELoss(temperature=1.0)(queries, positives, negatives)
    assert by_hand(BY_HAND[strategy], 1.0) == pytest.approx(EXPECTED[strategy], abs=1e-12)
    assert loss.item() == pytest.approx(EXPECTED[strategy], abs=1e-12)


def test_temperature_sharpens_the_softmax() -> None:
    queries, positives, _ = batch_for("none")
    loss = InfoNCELoss(temperature=0.1)(queries, positives)
    assert loss.item() == pytest.approx(by_hand(BY_HAND["none"], 0.1), abs=1e-12)
    assert loss.item() == pytest.approx(0.11192703702538465, abs=1e-12)
    assert InfoNCELoss().temperature == 0.02
    assert InfoNCELoss()(queries, positives).item() < loss.item()


def test_gradient_is_softmax_minus_target_over_temperature() -> None:
    queries, positives, negatives = batch_for("both")
    queries.requires_grad_(True)
    InfoNCELoss(temperature=0.5)(queries, positives, negatives).backward()
    assert negatives is not None
    candidates = torch.cat([positives, negatives.flatten(0, 1)])
    probabilities = torch.softmax(queries.detach() @ candidates.T / 0.5, dim=1)
    expected = (probabilities @ candidates - positives) / 0.5 / len(queries)
    torch.testing.assert_close(queries.grad, expected)


def test_no_negatives_equals_empty_negatives() -> None:
    queries, positives, _ = batch_for("none")
    empty = torch.empty(2, 0, 2, dtype=torch.float64)
    loss = InfoNCELoss(1.0)
    assert loss(queries, positives, empty).item() == loss(queries, positives).item()


@pytest.mark.parametrize("strategy", ["none", "both"])
def test_grouped_layout_gives_the_same_loss(strategy: str) -> None:
    queries, positives, negatives = batch_for(strategy)
    groups = (
        positives[:, None] if negatives is None else torch.cat([positives[:, None], negatives], 1)
    )
    loss = InfoNCELoss(1.0)
    assert loss.grouped(queries, groups.flatten(0, 1)).item() == pytest.approx(
        EXPECTED[strategy], abs=1e-12
    )


def test_split_grouped_recovers_positives_and_negatives() -> None:
    candidates = torch.arange(12.0).reshape(6, 2)
    positives, negatives = split_grouped(candidates, num_queries=2)
    assert positives.tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert negatives is not None
    assert negatives.tolist() == [[[2.0, 3.0], [4.0, 5.0]], [[8.0, 9.0], [10.0, 11.0]]]
    with pytest.raises(ValueError, match="grouped candidates"):
        split_grouped(candidates, num_queries=4)


@pytest.mark.parametrize(
    ("queries", "positives", "negatives", "message"),
    [
        ((2,), (2,), None, "queries must be"),
        ((0, 2), (0, 2), None, "queries must be"),
        ((2, 2), (3, 2), None, "positives must match"),
        ((2, 2), (2, 3), None, "positives must match"),
        ((2, 2), (2, 2), (2, 2), "negatives must be"),
        ((2, 2), (2, 2), (3, 1, 2), "negatives must be"),
        ((2, 2), (2, 2), (2, 1, 3), "negatives must be"),
    ],
)
def test_shapes_are_validated(
    queries: tuple[int, ...],
    positives: tuple[int, ...],
    negatives: tuple[int, ...] | None,
    message: str,
) -> None:
    extra = None if negatives is None else torch.zeros(negatives)
    with pytest.raises(ValueError, match=message):
        InfoNCELoss()(torch.zeros(queries), torch.zeros(positives), extra)


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature must be positive"):
        InfoNCELoss(temperature=0.0)
