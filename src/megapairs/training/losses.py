"""InfoNCE with in-batch and hard negatives, the MMRet training objective (paper 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megapairs.training.distributed import gather_with_grad, rank


class InfoNCELoss(nn.Module):
    """Contrastive loss of queries against the positives and hard negatives of the batch.

    Inputs are L2-normalised embeddings: `queries` (B, d), `positives` (B, d) where
    `positives[i]` is the target of `queries[i]`, and optionally `negatives` (B, m, d), the m
    hard negatives of each query. Every query is scored against every candidate of the batch,
    the B positives then the B * m negatives (so the other queries' positives and negatives
    are in-batch negatives); `logits = queries @ candidates.T / temperature` and the loss is
    the mean cross-entropy with query i's own positive as its target.

    Under torch.distributed (world size > 1) the candidates of all ranks are gathered with
    gradients (`gather_with_grad`, every rank must pass the same B and m) while the queries
    stay local, so each rank's loss is the mean over its own queries against the global
    candidates. The gathered gradients of a rank's inputs are the sum over all ranks' losses,
    so after DDP averages parameter gradients they equal those of the mean loss over the
    global batch.

    Same idea as sentence-transformers' MultipleNegativesRankingLoss (with hard negatives)
    and the InfoNCE of CLIP-style retrievers; `temperature` 0.02 is the paper's.
    """

    def __init__(self, temperature: float = 0.02) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_shapes(queries, positives, negatives)
        candidates = [gather_with_grad(positives)]
        if negatives is not None and negatives.shape[1] > 0:
            candidates.append(gather_with_grad(negatives.flatten(0, 1)))
        logits = queries @ torch.cat(candidates).T / self.temperature
        offset = rank() * queries.shape[0]
        targets = torch.arange(offset, offset + queries.shape[0], device=queries.device)
        return F.cross_entropy(logits, targets)

    def grouped(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The loss with each query's candidates in one flat tensor (see `split_grouped`)."""
        return self(queries, *split_grouped(candidates, queries.shape[0]))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def split_grouped(
    candidates: torch.Tensor, num_queries: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split (B * (1 + m), d) candidates, grouped per query as [positive, m negatives], in
    query order, into positives (B, d) and negatives (B, m, d) (None when m is 0)."""
    if candidates.ndim != 2 or num_queries < 1 or candidates.shape[0] % num_queries:
        raise ValueError(
            f"grouped candidates must be (B * (1 + m), d) for B={num_queries} queries, "
            f"got shape {tuple(candidates.shape)}"
        )
    groups = candidates.unflatten(0, (num_queries, -1))
    negatives = groups[:, 1:] if groups.shape[1] > 1 else None
    return groups[:, 0], negatives


def check_shapes(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None
) -> None:
    """Raise ValueError unless queries and positives are (B, d) and negatives (B, m, d)."""
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise ValueError(f"queries must be (B, d) with B > 0, got {tuple(queries.shape)}")
    if positives.shape != queries.shape:
        raise ValueError(
            f"positives must match queries {tuple(queries.shape)}, got {tuple(positives.shape)}"
        )
    if negatives is None:
        return
    batch, dim = queries.shape
    if negatives.ndim != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim:
        raise ValueError(
            f"negatives must be (B, m, d) = ({batch}, m, {dim}), got {tuple(negatives.shape)}"
        )
