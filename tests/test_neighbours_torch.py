"""The torch engine: exact blocked kNN against FAISS exact search (same ids and scores),
its tie rule, fp16 candidates rescored in float32, the engine choice, and the stage with
engine=torch against engine=faiss over the same embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_neighbours import clustered_unit, embedded_run, pipeline_config, random_unit

from megapairs.config import NeighboursConfig
from megapairs.embeddings import l2_normalise
from megapairs.neighbours import search, stage
from megapairs.neighbours.search import (
    build_index,
    build_torch_index,
    resolve_engine,
    search_neighbours,
    torch_search,
)
from megapairs.neighbours.stage import NeighboursStage
from megapairs.pipeline.runner import LocalRunner
from megapairs.runs import RunDir

EXACT = NeighboursConfig(exact_max=10**6)
Lists = tuple[list[list[int]], list[list[float]]]


def neighbours_of(index, vectors: np.ndarray, k: int, block: int = 128) -> Lists:
    ids = np.arange(len(vectors), dtype=np.int64)
    found, scores = search_neighbours(index, vectors, ids, ids, k, block)
    return found.to_pylist(), scores.to_pylist()


def min_gap(vectors: np.ndarray, width: int) -> float:
    """The smallest difference between consecutive top-`width` scores of any row (float64),
    the row's own score included: how far the data is from a tie."""
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    top = np.sort(sims, axis=1)[:, ::-1][:, :width]
    return float(-np.diff(top, axis=1).max())


def test_torch_matches_faiss_exact_search_without_ties() -> None:
    vectors = random_unit(300, 32, seed=8)
    assert min_gap(vectors, 12) > 1e-5  # no near-ties: float32 rounding cannot reorder
    want_ids, want_scores = neighbours_of(build_index(vectors, EXACT, seed=0), vectors, k=10)
    ids, scores = neighbours_of(build_torch_index(vectors), vectors, k=10)
    assert ids == want_ids
    assert np.abs(np.array(scores) - np.array(want_scores)).max() <= 1e-6


def test_score_block_size_does_not_change_results() -> None:
    vectors = random_unit(300, 32, seed=8)  # no near-ties (as above): products of other
    # shapes round differently, by ~1e-7
    want_ids, want_scores = neighbours_of(build_torch_index(vectors), vectors, k=10, block=300)
    one_row_steps = build_torch_index(vectors, score_bytes=1)
    ids, scores = neighbours_of(one_row_steps, vectors, k=10, block=7)
    assert ids == want_ids
    assert np.abs(np.array(scores) - np.array(want_scores)).max() <= 1e-6


def tied_vectors() -> np.ndarray:
    """12 copies of one vector, 29 distinct ones, then 7 copies of distinct vector 16."""
    base = random_unit(30, 16, seed=2)
    copies = [np.repeat(base[:1], 12, axis=0), base[1:], np.repeat(base[5:6], 7, axis=0)]
    return np.concatenate(copies)


def test_exact_ties_keep_the_lowest_positions() -> None:
    vectors = tied_vectors()
    ids, scores = neighbours_of(build_torch_index(vectors), vectors[:12], k=3)
    for query in range(12):
        # the k+1 = 4 lowest copies; then self is dropped, or the last hit when absent
        assert ids[query] == [i for i in range(4) if i != query][:3]
        assert np.allclose(scores[query], 1.0, atol=1e-6)
    raw_scores, positions = torch_search(build_torch_index(vectors), vectors[41:42], 4)
    assert positions.tolist() == [[16, 41, 42, 43]]  # tied copies, ascending positions
    assert np.all(raw_scores == raw_scores[0, 0])


def test_ties_agree_with_faiss_up_to_the_members_picked_from_the_last_tie() -> None:
    """FAISS keeps the same scores, but which members of a tie cut by the k-th place it
    keeps depends on its scan order; complete ties hold the same ids in both."""
    vectors = tied_vectors()
    sims = vectors @ vectors.T
    faiss_lists = neighbours_of(build_index(vectors, EXACT, seed=0), vectors, k=5)
    torch_lists = neighbours_of(build_torch_index(vectors), vectors, k=5)
    for query in range(len(vectors)):
        want_ids, want_scores = faiss_lists[0][query], faiss_lists[1][query]
        got_ids, got_scores = torch_lists[0][query], torch_lists[1][query]
        assert np.allclose(got_scores, want_scores, atol=1e-6, rtol=0)
        assert_same_up_to_last_tie(sims[query], query, want_ids, got_ids, np.array(got_scores))


def assert_same_up_to_last_tie(
    sims: np.ndarray, query: int, want: list[int], got: list[int], scores: np.ndarray
) -> None:
    """Per score value: the same ids, except the last (possibly cut) tie, whose members
    must both come from that tie in the whole collection."""
    levels = np.unique(scores.round(6))
    for level in levels:
        want_group = {i for i in want if abs(sims[i] - level) <= 1e-6}
        got_group = {i for i in got if abs(sims[i] - level) <= 1e-6}
        if level != levels.min():
            assert want_group == got_group
        tie = set(np.flatnonzero(np.abs(sims - level) <= 1e-6).tolist()) - {query}
        assert len(want_group) == len(got_group) and want_group | got_group <= tie


def test_fewer_candidates_than_k_give_the_same_short_lists() -> None:
    vectors = random_unit(5, 8, seed=5)
    want = neighbours_of(build_index(vectors, EXACT, seed=0), vectors, k=10)
    ids, scores = neighbours_of(build_torch_index(vectors), vectors, k=10)
    assert ids == want[0] and all(len(row) == 4 for row in ids)
    assert np.allclose(scores, want[1], atol=1e-6)
    _, positions = torch_search(build_torch_index(vectors), vectors[:1], 7)
    assert positions[0, 5:].tolist() == [-1, -1]  # padded as FAISS pads


def test_fp16_candidates_rescored_in_float32_stay_within_fp16_precision() -> None:
    vectors = clustered_unit(800, 32, clusters=16, seed=3)
    half = build_torch_index(vectors, dtype=torch.float16)  # what CUDA gets, here on CPU
    assert half.rescored
    want_ids, want_scores = neighbours_of(build_index(vectors, EXACT, seed=0), vectors, k=10)
    ids, scores = neighbours_of(half, vectors, k=10)
    # each score is q . fp16(x): off by at most 2^-12 (fp16's relative rounding)
    assert np.abs(np.array(scores) - np.array(want_scores)).max() <= 2**-12
    hits = sum(len(set(a) & set(b)) for a, b in zip(want_ids, ids, strict=True))
    assert hits / (10 * len(vectors)) >= 0.99  # only near-ties swap


def test_engine_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    def machine(faiss_gpus: int, cuda: bool) -> None:
        monkeypatch.setattr(search.faiss, "get_num_gpus", lambda: faiss_gpus)
        monkeypatch.setattr(search, "torch_has_cuda", lambda: cuda)

    machine(faiss_gpus=0, cuda=True)  # CUDA torch, faiss-cpu only
    assert resolve_engine("auto", "auto") == ("torch", True)
    assert resolve_engine("auto", "never") == ("faiss", False)
    assert resolve_engine("faiss", "auto") == ("faiss", False)
    machine(faiss_gpus=1, cuda=True)  # faiss-gpu installed
    assert resolve_engine("auto", "auto") == ("faiss", True)
    assert resolve_engine("torch", "auto") == ("torch", True)
    machine(faiss_gpus=0, cuda=False)  # a CPU machine
    assert resolve_engine("auto", "auto") == ("faiss", False)
    assert resolve_engine("torch", "auto") == ("torch", False)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        resolve_engine("torch", "always")


# the stage with each engine ------------------------------------------------------


def stored_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors whose float16 storage (as the embed stage writes them) has no near-ties."""
    vectors = random_unit(n, dim, seed=seed)
    assert min_gap(l2_normalise(vectors.astype(np.float16)), 8) > 1e-5
    return vectors


def run_engine(root, vectors: np.ndarray, **neighbours: object) -> RunDir:
    run, _ = embedded_run(root, vectors, parts=3)
    config = pipeline_config(**neighbours)
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    runner.run_stage(NeighboursStage(config, "img"))
    return run


def tables(run: RunDir) -> list:
    return [pq.read_table(p) for p in run.files("neighbours/img", "neighbours.img")]


def test_stage_with_torch_writes_the_faiss_tables(tmp_path) -> None:
    vectors = stored_vectors(300, 16, seed=8)
    faiss_run = run_engine(tmp_path / "faiss", vectors, engine="faiss")
    # exact_max below N: FAISS would build IVF, the torch engine still searches exactly
    torch_run = run_engine(tmp_path / "torch", vectors, engine="torch", exact_max=10)
    for want, got in zip(tables(faiss_run), tables(torch_run), strict=True):
        assert got.schema.equals(want.schema)
        assert got["id"].equals(want["id"])
        assert got["neighbour_ids"].equals(want["neighbour_ids"])
        diff = np.array(got["scores"].to_pylist()) - np.array(want["scores"].to_pylist())
        assert np.abs(diff).max() <= 1e-6
    marker = torch_run.part_counts("neighbours.img")["part-00000"]
    assert marker["engine"] == "torch" and marker["queries"] == 100
    info = json.loads((tmp_path / "torch/neighbours/img/index.json").read_text())
    assert (info["engine"], info["kind"]) == ("torch", "exact")
    assert not (tmp_path / "torch/neighbours/img/index.faiss").exists()


def test_auto_engine_resolved_to_torch_on_a_worker_uses_the_vectors(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine=auto: prepare builds the FAISS index; a worker on CUDA without faiss-gpu
    searches with torch instead (simulated on the CPU) and writes the same tables."""
    vectors = stored_vectors(300, 16, seed=9)
    want = tables(run_engine(tmp_path / "faiss", vectors, engine="faiss"))
    monkeypatch.setattr(stage, "resolve_engine", lambda engine, gpu: ("torch", False))
    auto_run = run_engine(tmp_path / "auto", vectors, engine="auto")
    assert (tmp_path / "auto/neighbours/img/index.faiss").exists()
    assert auto_run.part_counts("neighbours.img")["part-00002"]["engine"] == "torch"
    for expected, got in zip(want, tables(auto_run), strict=True):
        assert got["neighbour_ids"].equals(expected["neighbour_ids"])
