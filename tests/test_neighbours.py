"""The neighbours stage: FAISS search against brute force, self exclusion, IVF recall
(float32 and fp16 lists), blocking, and the stage over a run directory (the stage
contract: prepare on the driver, setup per worker, resume)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from megapairs.config import ChannelConfig, NeighboursConfig, PipelineConfig
from megapairs.embeddings import embed_stage_name, l2_normalise, write_shard
from megapairs.neighbours import search, stage
from megapairs.neighbours.search import (
    IndexPlan,
    build_index,
    default_nlist,
    plan_index,
    resolve_gpu,
    search_neighbours,
)
from megapairs.neighbours.stage import IndexOutOfDate, NeighboursStage, SearchState
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.stage import StageBase
from megapairs.runs import RunDir, part_name
from megapairs.schemas import NEIGHBOURS_SCHEMA, record_id

EXACT = NeighboursConfig(k=10)


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((n, dim)))


def clustered_unit(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Points around random centres on the sphere (cosine to their centre ~0.9)."""
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.standard_normal((clusters, dim)))
    labels = rng.integers(0, clusters, n)
    noise = rng.standard_normal((n, dim)) * (0.5 / np.sqrt(dim))
    return l2_normalise(centres[labels] + noise)


def brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by cosine of each row among the other rows."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def search_all(index: faiss.Index, vectors: np.ndarray, k: int, block: int = 256):
    ids = np.arange(len(vectors), dtype=np.int64)
    found, scores = search_neighbours(index, vectors, ids, ids, k, block)
    return found.to_pylist(), scores.to_pylist()


def test_exact_search_matches_brute_force() -> None:
    vectors = random_unit(600, 24)
    found, scores = search_all(build_index(vectors, EXACT, seed=0), vectors, k=10)
    want_ids, want_scores = brute_force(vectors, 10)
    assert np.array_equal(np.array(found), want_ids)
    assert np.allclose(np.array(scores), want_scores, atol=1e-5)


def test_scores_descend_and_lists_have_k_entries() -> None:
    vectors = random_unit(300, 16, seed=1)
    found, scores = search_all(build_index(vectors, EXACT, seed=0), vectors, k=7)
    assert all(len(row) == 7 for row in found)
    assert all(np.all(np.diff(row) <= 0) for row in scores)


def test_duplicates_never_list_the_query_itself() -> None:
    # 40 distinct vectors, each repeated 4 times: 3 copies score 1.0 with the query.
    vectors = np.repeat(random_unit(40, 16, seed=2), 4, axis=0)
    found, scores = search_all(build_index(vectors, EXACT, seed=0), vectors, k=5)
    for query, (row, sims) in enumerate(zip(found, scores, strict=True)):
        copies = {query - query % 4 + j for j in range(4)} - {query}
        assert query not in row and len(row) == 5
        assert set(row[:3]) == copies
        assert np.allclose(sims[:3], 1.0, atol=1e-5)


def test_self_missing_from_tied_hits_drops_the_last_hit() -> None:
    # 12 identical vectors, k=3: the query's own id may fall outside the k+1 ties.
    vectors = np.repeat(random_unit(1, 8, seed=3), 12, axis=0)
    vectors = np.concatenate([vectors, random_unit(20, 8, seed=4)])
    found, scores = search_all(build_index(vectors, EXACT, seed=0), vectors[:12], k=3)
    for query, (row, sims) in enumerate(zip(found, scores, strict=True)):
        assert query not in row and len(row) == 3 and set(row) <= set(range(12))
        assert np.allclose(sims, 1.0, atol=1e-5)


def test_fewer_candidates_than_k_give_shorter_lists_without_fillers() -> None:
    vectors = random_unit(5, 8, seed=5)
    found, scores = search_all(build_index(vectors, EXACT, seed=0), vectors, k=10)
    for query, (row, sims) in enumerate(zip(found, scores, strict=True)):
        assert sorted(row) == sorted(set(range(5)) - {query})
        assert all(np.isfinite(sims))


def test_block_size_does_not_change_results() -> None:
    vectors = clustered_unit(700, 16, clusters=20, seed=6)
    index = build_index(vectors, EXACT, seed=0)
    assert search_all(index, vectors, k=8, block=7) == search_all(index, vectors, k=8, block=700)


def test_ivf_recall_against_exact_on_clustered_data() -> None:
    vectors = clustered_unit(6000, 32, clusters=60, seed=7)
    ivf_cfg = NeighboursConfig(k=10, exact_max=100, nprobe=8)
    ivf = build_index(vectors, ivf_cfg, seed=0)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.nlist == default_nlist(6000)
    exact_ids, _ = search_all(build_index(vectors, EXACT, seed=0), vectors, k=10, block=2048)
    ivf_ids, _ = search_all(ivf, vectors, k=10, block=2048)
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact_ids, ivf_ids, strict=True))
    assert hits / (10 * len(vectors)) >= 0.95


def test_list_batched_ivf_search_matches_faiss_search() -> None:
    vectors = clustered_unit(2000, 16, clusters=20, seed=13)
    index = build_index(vectors, NeighboursConfig(exact_max=100, nprobe=3), seed=0)
    scores, positions = search.search_by_list(index, vectors, 6)
    want_scores, want_positions = index.search(vectors, 6)
    assert np.allclose(scores, want_scores, atol=1e-5)
    assert (positions == want_positions).mean() > 0.999  # BLAS rounding may swap near-ties


SQ_FP16 = NeighboursConfig(k=10, exact_max=100, nprobe=8, ivf_storage="sq_fp16")


def test_fp16_ivf_lists_halve_the_index_and_keep_recall() -> None:
    vectors = clustered_unit(6000, 32, clusters=60, seed=7)
    flat = build_index(vectors, SQ_FP16.model_copy(update={"ivf_storage": "flat"}), seed=0)
    sq = build_index(vectors, SQ_FP16, seed=0)
    assert isinstance(sq, faiss.IndexIVFScalarQuantizer) and sq.nlist == flat.nlist
    saved = len(faiss.serialize_index(flat)) - len(faiss.serialize_index(sq))
    assert saved >= 6000 * 32 * 2 - 1024  # 2 of float32's 4 bytes per value, less a header
    exact_ids, _ = search_all(build_index(vectors, EXACT, seed=0), vectors, k=10, block=2048)
    sq_ids, _ = search_all(sq, vectors, k=10, block=2048)
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact_ids, sq_ids, strict=True))
    assert hits / (10 * len(vectors)) >= 0.95


def test_list_batched_fp16_ivf_search_matches_faiss_search() -> None:
    vectors = clustered_unit(2000, 16, clusters=20, seed=13)
    index = build_index(vectors, SQ_FP16.model_copy(update={"nprobe": 3}), seed=0)
    assert search.list_batched(index) and index.by_residual
    scores, positions = search.search_by_list(index, vectors, 6)
    want_scores, want_positions = index.search(vectors, 6)
    assert np.allclose(scores, want_scores, atol=1e-5)
    assert (positions == want_positions).mean() > 0.999


def test_plan_records_the_ivf_storage() -> None:
    sq = plan_index(5000, 8, NeighboursConfig(exact_max=10, ivf_storage="sq_fp16"))
    assert sq.as_dict()["storage"] == "sq_fp16" and sq.kind == "ivf"
    exact = plan_index(5000, 8, NeighboursConfig(ivf_storage="sq_fp16"))
    assert exact.storage == "flat"  # exact search keeps float32 vectors


def test_ivf_lists_with_fewer_than_k_candidates_give_short_lists() -> None:
    vectors = clustered_unit(400, 32, clusters=40, seed=14)
    cfg = NeighboursConfig(exact_max=10, nlist=40, nprobe=1, train_size=400)
    found, scores = search_all(build_index(vectors, cfg, seed=0), vectors, k=30)
    assert min(len(row) for row in found) < 30
    for query, (row, sims) in enumerate(zip(found, scores, strict=True)):
        assert query not in row and min(row, default=0) >= 0 and len(row) == len(sims)
        assert np.all(np.diff(sims) <= 0)


def test_ivf_build_is_deterministic_for_a_seed() -> None:
    vectors = clustered_unit(3000, 16, clusters=30, seed=8)
    cfg = NeighboursConfig(k=5, exact_max=100, nlist=20, nprobe=2, train_size=1000)
    first, second = (build_index(vectors, cfg, seed=11) for _ in range(2))
    centroids = [index.quantizer.reconstruct_n(0, 20) for index in (first, second)]
    assert np.array_equal(*centroids)
    assert search_all(first, vectors, k=5) == search_all(second, vectors, k=5)


def test_plan_index_rules() -> None:
    assert plan_index(1000, 8, NeighboursConfig(exact_max=1000)) == IndexPlan("exact", 1000, 8)
    big = plan_index(1_000_000, 8, NeighboursConfig(exact_max=10, nprobe=16))
    assert big == IndexPlan("ivf", 1_000_000, 8, 2000, 16, 40 * 2000)
    assert default_nlist(100) == 2  # capped at size / 39
    assert default_nlist(10_000) == 200
    assert plan_index(5000, 8, NeighboursConfig(exact_max=10, train_size=10**9)).train_size == 5000
    with pytest.raises(ValueError, match="nlist=6000 exceeds"):
        plan_index(5000, 8, NeighboursConfig(exact_max=10, nlist=6000))


def test_gpu_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search.faiss, "get_num_gpus", lambda: 0)
    assert resolve_gpu("auto") is False and resolve_gpu("never") is False
    with pytest.raises(RuntimeError, match="gpu=always but FAISS sees no GPU"):
        resolve_gpu("always")
    monkeypatch.setattr(search.faiss, "get_num_gpus", lambda: 2)
    assert resolve_gpu("auto") is True and resolve_gpu("never") is False


# the stage over a run directory ---------------------------------------------------


def pipeline_config(**neighbours: object) -> PipelineConfig:
    return PipelineConfig(
        seed=3,
        channels={"img": ChannelConfig(encoder="test")},
        neighbours=NeighboursConfig(**{"k": 6, "query_block": 50, **neighbours}),
    )


def embedded_run(root, vectors: np.ndarray, parts: int) -> tuple[RunDir, np.ndarray]:
    """A run dir holding `vectors` as finished embed parts of channel `img`; returns ids."""
    run = RunDir(root)
    all_ids = []
    for number, chunk in enumerate(np.array_split(vectors, parts)):
        ids = np.array([record_id(number, i) for i in range(len(chunk))], dtype=np.int64)
        write_shard(run, "img", part_name(number), ids, chunk)
        run.mark_done(embed_stage_name("img"), part_name(number), {"embedded": len(ids)})
        all_ids.append(ids)
    return run, np.concatenate(all_ids)


def run_neighbours(run: RunDir, config: PipelineConfig):
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    return runner.run_stage(NeighboursStage(config, "img"))


def test_stage_matches_brute_force_over_all_parts(tmp_path) -> None:
    vectors = random_unit(400, 16, seed=9)
    run, ids = embedded_run(tmp_path, vectors, parts=3)
    result = run_neighbours(run, pipeline_config())
    assert result.parts == 3 and result.counts["queries"] == 400
    assert result.counts["neighbours"] == 400 * 6 and result.counts["short_lists"] == 0
    tables = [pq.read_table(p) for p in run.files("neighbours/img", "neighbours.img")]
    assert len(tables) == 3 and all(t.schema.equals(NEIGHBOURS_SCHEMA) for t in tables)
    rows = [r for t in tables for r in t.to_pylist()]
    # float16 storage rounds the vectors: compare with brute force on what was stored
    stored = l2_normalise(l2_normalise(vectors).astype(np.float16))
    want_pos, want_scores = brute_force(stored, 6)
    assert [r["id"] for r in rows] == ids.tolist()
    assert [r["neighbour_ids"] for r in rows] == ids[want_pos].tolist()
    assert np.allclose([r["scores"] for r in rows], want_scores, atol=1e-5)
    info = (tmp_path / "neighbours/img/index.json").read_text()
    assert '"kind": "exact"' in info and '"parts": [' in info


def test_resume_reuses_the_saved_index_and_gives_identical_parts(tmp_path, monkeypatch) -> None:
    vectors = clustered_unit(3000, 16, clusters=30, seed=10)
    run, _ = embedded_run(tmp_path, vectors, parts=3)
    config = pipeline_config(exact_max=500, nprobe=4)
    run_neighbours(run, config)
    part = tmp_path / "neighbours/img/part-00001.parquet"
    first = pq.read_table(part)
    part.unlink()
    (tmp_path / "_progress/neighbours.img/part-00001.json").unlink()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the saved index should be loaded, not rebuilt")

    monkeypatch.setattr(stage, "build_index", no_rebuild)
    result = run_neighbours(run, config)
    assert result.computed == 1 and result.counts["queries"] == 3000
    assert pq.read_table(part).equals(first)
    assert '"kind": "ivf"' in (tmp_path / "neighbours/img/index.json").read_text()


def test_new_embedding_parts_after_search_are_refused(tmp_path) -> None:
    run, _ = embedded_run(tmp_path, random_unit(100, 8, seed=11), parts=2)
    config = pipeline_config()
    run_neighbours(run, config)
    write_shard(run, "img", part_name(2), np.array([record_id(2, 0)]), random_unit(1, 8))
    run.mark_done(embed_stage_name("img"), part_name(2), {"embedded": 1})
    with pytest.raises(IndexOutOfDate, match="delete"):
        run_neighbours(run, config)


def test_non_finite_vectors_are_reported_with_their_file(tmp_path) -> None:
    vectors = random_unit(60, 8, seed=12)
    vectors[45, 3] = np.nan
    run, _ = embedded_run(tmp_path, vectors, parts=2)
    with pytest.raises(ValueError, match=r"part-00001\.npy row 15 holds NaN"):
        run_neighbours(run, pipeline_config())


def test_unknown_channel_is_refused() -> None:
    with pytest.raises(ValueError, match="'text' is not in the config"):
        NeighboursStage(pipeline_config(), "text")


def test_prepare_saves_the_index_and_setup_opens_it_without_rebuilding(
    tmp_path, monkeypatch
) -> None:
    run, ids = embedded_run(tmp_path, clustered_unit(900, 16, clusters=9, seed=15), parts=3)
    config = pipeline_config(exact_max=100, nprobe=4, ivf_storage="sq_fp16", engine="faiss")
    neighbours = NeighboursStage(config, "img")
    assert isinstance(neighbours, StageBase)
    neighbours.prepare(run)
    assert set(vars(neighbours)) == {"config", "channel"}  # nothing built is kept on self
    shipped = pickle.loads(pickle.dumps(neighbours))  # as a runner ships it to workers
    monkeypatch.setattr(stage, "build_index", lambda *a, **k: pytest.fail("rebuilt"))
    shipped.prepare(run)  # the saved index matches: kept
    state = shipped.setup(run)
    assert isinstance(state, SearchState) and isinstance(state.index, faiss.IndexIVFScalarQuantizer)
    assert (state.engine, state.on_gpu, state.index.nprobe) == ("faiss", False, 4)
    assert np.array_equal(state.ids, ids)
    info = json.loads((tmp_path / "neighbours/img/index.json").read_text())
    assert (info["kind"], info["storage"], info["engine"]) == ("ivf", "sq_fp16", "faiss")


def test_run_part_reports_progress_per_query_block(tmp_path) -> None:
    run, _ = embedded_run(tmp_path, random_unit(230, 8, seed=16), parts=2)
    neighbours = NeighboursStage(pipeline_config(query_block=50), "img")
    neighbours.prepare(run)
    reports: list[tuple[int, int]] = []
    counts = neighbours.run_part(
        run, part_name(0), neighbours.setup(run), lambda *done: reports.append(done)
    )
    assert reports == [(1, 3), (2, 3), (3, 3)]  # 115 queries in blocks of 50
    assert counts == {
        "queries": 115,
        "neighbours": 115 * 6,
        "short_lists": 0,
        "gpu_parts": 0,
        "engine": "faiss",
    }
    assert not run.is_done(neighbours.name, part_name(0))  # the runner writes markers


def test_setup_without_a_prepared_index_is_refused(tmp_path) -> None:
    run, _ = embedded_run(tmp_path, random_unit(20, 8, seed=17), parts=1)
    with pytest.raises(FileNotFoundError, match=r"index\.json is missing"):
        NeighboursStage(pipeline_config(), "img").setup(run)


THREADED_SEARCH = """
import sys
import numpy as np
from test_neighbours import clustered_unit
from megapairs.config import NeighboursConfig
from megapairs.neighbours.search import build_index, search_neighbours
vectors = clustered_unit(3000, 512, 60, seed=11)
index = build_index(vectors, NeighboursConfig(exact_max=10**6), seed=0, gpu=False)
ids = np.arange(len(vectors), dtype=np.int64)
found, scores = search_neighbours(index, vectors, ids, ids, k=20, block=1000)
raw, _ = index.search(vectors, 21)
np.savez(sys.argv[1], found=np.asarray(found.to_pylist()), scores=np.asarray(scores.to_pylist()),
         raw=raw)
"""


def test_results_are_the_same_bits_whatever_the_blas_threads(tmp_path):
    """A Ray worker with one CPU runs BLAS on one thread, the local runner on all: FAISS's
    raw scores then differ in the last bit; the rescored neighbours must not."""
    outputs = {}
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        out = tmp_path / f"threads-{threads}.npz"
        subprocess.run([sys.executable, "-c", THREADED_SEARCH, str(out)], env=env, check=True)
        outputs[threads] = np.load(out)
    one, two = outputs["1"], outputs["2"]
    assert np.array_equal(one["found"], two["found"])
    assert np.array_equal(one["scores"], two["scores"])  # bit for bit
    np.testing.assert_allclose(one["raw"], two["raw"], atol=1e-5)
