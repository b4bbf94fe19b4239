"""The all-gather path of InfoNCE and of gradient caching, on 2 CPU processes (gloo).

Derivation of what the ranks must compute. With W ranks of B queries each, rank r's loss is
L_r = (1/B) sum_{i in r} l_i over the gathered candidates, and the full-batch loss is
L = (1/(W B)) sum_i l_i = (1/W) sum_r L_r. The backward of the all-gather sums every rank's
gradient into the owner of each slice, so the gradient rank r sees for its inputs x_r is
d(sum_s L_s)/dx_r = W dL/dx_r. DDP then averages parameter gradients over ranks, giving
(1/W) d(sum_s L_s)/dtheta = dL/dtheta: exactly the full-batch gradients.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megapairs.training.distributed import gather_with_grad, rank, world_size
from megapairs.training.gradcache import chunk_inputs, gradcache_step
from megapairs.training.losses import InfoNCELoss

WORLD = 2
PER_RANK = 3
NEGATIVES = 2
DIM = 4
TEMPERATURE = 0.05


def make_batch() -> dict[str, torch.Tensor]:
    """The global batch: raw query, positive and negative vectors (normalised in the loss)."""
    generator = torch.Generator().manual_seed(0)
    total = WORLD * PER_RANK
    return {
        "queries": torch.randn(total, DIM, generator=generator, dtype=torch.float64),
        "positives": torch.randn(total, DIM, generator=generator, dtype=torch.float64),
        "negatives": torch.randn(total, NEGATIVES, DIM, generator=generator, dtype=torch.float64),
    }


def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    leaves = {name: value.clone().requires_grad_(True) for name, value in batch.items()}
    normalised = [F.normalize(leaves[name], dim=-1) for name in batch]
    loss = InfoNCELoss(TEMPERATURE)(*normalised)
    loss.backward()
    return loss.item(), {name: leaf.grad for name, leaf in leaves.items()}  # type: ignore[misc]


def make_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM, DIM, dtype=torch.float64)


def grouped_candidates(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each query's positive then its negatives, in query order (the GradCache layout)."""
    return torch.cat([batch["positives"][:, None], batch["negatives"]], dim=1).flatten(0, 1)


def encoder_loss_grads(batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Loss and weight gradient of a shared linear encoder on the whole batch, one process."""
    encoder = make_encoder()
    queries = F.normalize(encoder(batch["queries"]), dim=-1)
    candidates = F.normalize(encoder(grouped_candidates(batch)), dim=-1)
    loss = InfoNCELoss(TEMPERATURE).grouped(queries, candidates)
    loss.backward()
    return loss.item(), encoder.weight.grad  # type: ignore[return-value]


def worker(process: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)  # two ranks share two cores; more threads only contend
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=process, world_size=WORLD
    )
    try:
        assert (rank(), world_size()) == (process, WORLD)
        local = {
            k: v[process * PER_RANK : (process + 1) * PER_RANK] for k, v in make_batch().items()
        }
        loss, grads = loss_and_grads(local)
        model = DistributedDataParallel(make_encoder())

        def encode(inputs: torch.Tensor) -> torch.Tensor:
            return F.normalize(model(inputs), dim=-1)

        cached_loss = gradcache_step(
            chunk_inputs(local["queries"], 2),
            chunk_inputs(grouped_candidates(local), 4),
            encode,
            encode,
            InfoNCELoss(TEMPERATURE).grouped,
            no_sync=model.no_sync,
        )
        result = {"loss": loss, "grads": grads, "cached_loss": cached_loss.item()}
        result["weight_grad"] = model.module.weight.grad
        torch.save(result, Path(out) / f"rank{process}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without running destructors: freeing the DDP model at function exit destroys
    # the gloo process group while holding the GIL, and its worker thread, still releasing
    # the last allreduce, waits for the GIL: the rank hangs for ever (seen twice on CI-like
    # runs: ~ProcessGroupGloo joining a thread in gil_scoped_acquire). The results are saved.
    os._exit(0)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_rank_losses_average_to_the_full_batch_loss(rank_results: list[dict]) -> None:
    full_loss, _ = loss_and_grads(make_batch())
    mean = sum(result["loss"] for result in rank_results) / WORLD
    assert mean == pytest.approx(full_loss, abs=1e-12)
    assert rank_results[0]["loss"] != pytest.approx(rank_results[1]["loss"])


def test_rank_input_grads_are_world_times_full_batch_grads(rank_results: list[dict]) -> None:
    _, full_grads = loss_and_grads(make_batch())
    for process, result in enumerate(rank_results):
        rows = slice(process * PER_RANK, (process + 1) * PER_RANK)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad / WORLD, full_grads[name][rows], rtol=0, atol=1e-12)


def test_gradcache_under_ddp_gives_full_batch_parameter_grads(rank_results: list[dict]) -> None:
    full_loss, full_grad = encoder_loss_grads(make_batch())
    ranks_mean = sum(result["cached_loss"] for result in rank_results) / WORLD
    assert ranks_mean == pytest.approx(full_loss, abs=1e-12)
    for result in rank_results:
        torch.testing.assert_close(result["weight_grad"], full_grad, rtol=0, atol=1e-12)


def test_single_process_helpers_are_no_ops() -> None:
    tensor = torch.ones(2, 3)
    assert gather_with_grad(tensor) is tensor
    assert (rank(), world_size()) == (0, 1)
