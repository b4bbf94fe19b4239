"""Gradient caching: contrastive batches larger than memory (Gao et al. 2021, GradCache).

A contrastive loss couples every query with every candidate, so its batch cannot simply be
split into accumulation steps. `gradcache_step` instead

1. embeds every chunk of queries and candidates without autograd graphs, recording each
   chunk's RNG state (CPU and CUDA) before its forward pass;
2. computes the loss once on the full batch of (detached) embeddings and takes the loss's
   gradient with respect to each embedding;
3. re-runs each chunk with autograd, replaying its recorded RNG state so dropout draws the
   same masks, and back-propagates the cached embedding gradient into the parameters.

Parameter gradients (accumulated into `.grad`) and the returned loss then equal those of one
forward/backward pass over the whole batch, at the memory of one chunk plus the embeddings.

Use with `InfoNCELoss`: lay the candidates out grouped per query, the positive then the m
negatives of query 0, then those of query 1, ... (B * (1 + m) inputs), chunk them freely
(`chunk_inputs`), and pass `loss_fn=InfoNCELoss(...).grouped`, which splits the
concatenated candidate embeddings back into positives (B, d) and negatives (B, m, d).

Mixed precision: call `gradcache_step` inside `torch.autocast(...)` (or autocast inside the
encode callables); embeddings keep the dtype the encoders return and the cached gradients
are cast to it.

DDP: pass `no_sync=ddp_model.no_sync`. The encode callables must call the DDP-wrapped
module's forward. All re-run chunks but the last run under `no_sync()`, so gradients are
all-reduced once, in the last backward. Candidate chunks are re-run first and query chunks
last, so that for MMRet-CLIP (queries use both towers) the synchronised pass touches every
trained parameter; otherwise DDP needs `find_unused_parameters=True`. The loss may gather
embeddings across ranks (`gather_with_grad`): step 2 runs it on every rank together, so
every rank must pass the same number of chunks (DDP forwards are collective too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, overload

import torch

Encode = Callable[[Any], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RngState:
    """The CPU and (initialised) CUDA generator states, to replay a forward pass's randomness."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls) -> RngState:
        cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda_in_use else [])

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this state; the global RNG is left as it was before."""
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


@dataclass
class _Chunk:
    inputs: Any
    encode: Encode
    embedding: torch.Tensor
    rng: RngState


def gradcache_step(
    query_chunks: Sequence[Any],
    candidate_chunks: Sequence[Any],
    encode_queries: Encode,
    encode_candidates: Encode,
    loss_fn: LossFn,
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
) -> torch.Tensor:
    """Accumulate into `.grad` the parameter gradients of `loss_fn` over the whole batch.

    `encode_queries(chunk)` / `encode_candidates(chunk)` return (n, d) embeddings of a chunk;
    `loss_fn(queries, candidates)` gets the embeddings of all chunks concatenated in order
    and returns a scalar. Returns the loss, detached. See the module docstring for the
    candidate layout with `InfoNCELoss`, autocast and DDP (`no_sync`).
    """
    if not query_chunks or not candidate_chunks:
        raise ValueError("gradcache_step needs at least one query chunk and one candidate chunk")
    queries = [_embed(chunk, encode_queries) for chunk in query_chunks]
    candidates = [_embed(chunk, encode_candidates) for chunk in candidate_chunks]
    loss = _cache_embedding_grads(queries, candidates, loss_fn)
    _backward_chunks(candidates + queries, no_sync)
    return loss


def _embed(inputs: Any, encode: Encode) -> _Chunk:
    rng = RngState.capture()
    with torch.no_grad():
        embedding = encode(inputs)
    if embedding.ndim != 2:
        raise ValueError(f"an encoder must return (n, d) embeddings, got {tuple(embedding.shape)}")
    return _Chunk(inputs, encode, embedding.detach().requires_grad_(), rng)


def _cache_embedding_grads(
    queries: list[_Chunk], candidates: list[_Chunk], loss_fn: LossFn
) -> torch.Tensor:
    """Run the loss on all embeddings; leave d loss / d embedding in each chunk's `.grad`."""
    query_embeddings = torch.cat([chunk.embedding for chunk in queries])
    candidate_embeddings = torch.cat([chunk.embedding for chunk in candidates])
    loss = loss_fn(query_embeddings, candidate_embeddings)
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    loss.backward()
    return loss.detach()


def _backward_chunks(
    chunks: list[_Chunk], no_sync: Callable[[], AbstractContextManager[Any]] | None
) -> None:
    """Re-run each chunk with autograd and back-propagate its cached embedding gradient."""
    for index, chunk in enumerate(chunks):
        gradient = chunk.embedding.grad
        if gradient is None:
            raise ValueError("the loss does not depend on every embedding")
        is_last = index == len(chunks) - 1
        sync = contextlib.nullcontext() if no_sync is None or is_last else no_sync()
        with sync, chunk.rng.replay():
            embedding = chunk.encode(chunk.inputs)
            torch.autograd.backward(embedding, grad_tensors=gradient.to(embedding.dtype))


@overload
def chunk_inputs(inputs: torch.Tensor, size: int) -> list[torch.Tensor]: ...
@overload
def chunk_inputs(
    inputs: Mapping[str, torch.Tensor], size: int
) -> list[dict[str, torch.Tensor]]: ...
def chunk_inputs(
    inputs: torch.Tensor | Mapping[str, torch.Tensor], size: int
) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Split a tensor, or a mapping of equally long tensors (tokenizer output), along dim 0."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(size))
    lengths = {len(value) for value in inputs.values()}
    if len(lengths) != 1:
        raise ValueError(f"inputs to chunk must share one non-empty length, got {sorted(lengths)}")
    parts = {key: value.split(size) for key, value in inputs.items()}
    count = len(next(iter(parts.values())))
    return [{key: value[i] for key, value in parts.items()} for i in range(count)]
