"""torch.distributed helpers that degrade to no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order, keeping gradients.

    Every rank must pass a tensor of the same shape. The backward pass sums, for each
    rank's slice, the gradients that all ranks computed for it and returns that sum to the
    owning rank (`torch.distributed.nn.functional.all_gather`). Returns `tensor` itself
    when not distributed.
    """
    if not is_distributed():
        return tensor
    return torch.cat(all_gather(tensor), dim=0)
