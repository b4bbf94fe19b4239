"""The Ray runner gives the local runner's output whatever the order the parts run in,
retries a part whose worker was killed (task or actor), raises a stage's own error
without retrying it, and runs parts on every node of a two-node cluster."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray")

import ray
import ray_fixtures
import s3_fixtures
from ray_fixtures import (
    ModelSquaresStage,
    SquaresStage,
    TwoNodeCluster,
    loopback_only,
    run_contents,
    start_local_ray,
    use_token_auth,
    wait_for,
)

from megapairs.cli import main
from megapairs.config import PipelineConfig, load_config
from megapairs.corpus.store import read_corpus, read_rejects
from megapairs.demo.scenes import generate_scene_corpus
from megapairs.pipeline.ray_runner import (
    OBJECT_STORE_BYTES,
    ActorPool,
    RayRunner,
    actor_gpus,
    forwarded_env,
    local_cpus,
    pool_size,
)
from megapairs.pipeline.runner import BaseRunner, LocalRunner, StageResult, build_runner
from megapairs.pipeline.stage import Stage
from megapairs.pipeline.synthesize import build_stages
from megapairs.runs import RunDir, part_name, read_table

N_PARTS = 6
COMPARED = ("squares", "_progress")
ORDERS: dict[str, Callable[[list[str]], list[str]]] = {
    "forward": lambda parts: list(parts),
    "reverse": lambda parts: parts[::-1],
    "random": lambda parts: random.Random(7).sample(parts, len(parts)),
}
STAGES = {"tasks": SquaresStage, "actors": ModelSquaresStage}


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    """Ray on loopback only, the toy stages shipped by value (Ray's workers cannot import
    the tests folder); whatever a test started is shut down after the module."""
    loopback_only()
    ray.cloudpickle.register_pickle_by_value(ray_fixtures)
    yield
    ray.shutdown()


@pytest.fixture
def local_ray() -> None:
    """Ray in this process with 2 CPUs, started once and shared by the tests using it."""
    start_local_ray(num_cpus=2)


def run_with(
    runner: BaseRunner, stages: list[Stage]
) -> tuple[RunDir, list[StageResult], dict[str, Any]]:
    results = runner.run_all(stages)
    return runner.run, results, run_contents(runner.run, COMPARED)


def make_stage(kind: str, trace: Path, **options: Any) -> SquaresStage:
    return STAGES[kind](trace=str(trace), n_parts=N_PARTS, **options)


def local_reference(tmp_path: Path, kind: str) -> tuple[list[StageResult], dict[str, Any]]:
    runner = LocalRunner(RunDir(tmp_path / "local"), PipelineConfig(), progress=False)
    _, results, contents = run_with(runner, [make_stage(kind, tmp_path / "local-trace")])
    return results, contents


def assert_rows_unique(run: RunDir) -> None:
    ids = [row["id"] for name, rows in run_contents(run, ("squares",)).items() for row in rows]
    assert len(ids) == len(set(ids)) == N_PARTS * 10


@pytest.mark.parametrize(
    "kind, order",
    [("tasks", "forward"), ("tasks", "reverse"), ("tasks", "random"), ("actors", "random")],
)
def test_same_output_as_local_in_any_order(tmp_path, local_ray, kind: str, order: str):
    expected_results, expected = local_reference(tmp_path, kind)
    stage = make_stage(kind, tmp_path / "trace")
    runner = RayRunner(RunDir(tmp_path / "ray"), PipelineConfig(), False, order=ORDERS[order])
    _, results, contents = run_with(runner, [stage])
    assert contents == expected and results == expected_results
    attempts = stage.attempts()
    assert sorted(attempts) == [part_name(i) for i in range(N_PARTS)]
    assert all(len(tries) == 1 for tries in attempts.values())
    pids = {tries[0]["pid"] for tries in attempts.values()}
    assert os.getpid() not in pids
    setups = [setup["pid"] for setup in stage.setups()]
    assert sorted(setups) == sorted(pids)  # state built once in each worker process
    if kind == "actors":
        assert len(pids) == 2  # one actor per CPU, each loads its "model" once


@pytest.mark.parametrize("kind", STAGES)
def test_killed_worker_reruns_its_part_only(tmp_path, local_ray, caplog, kind: str):
    """SIGKILL the worker running part 1 while every part in flight waits: the part runs
    again elsewhere, and the output is the local runner's, without duplicate rows."""
    _, expected = local_reference(tmp_path, kind)
    trace, victim = tmp_path / "trace", part_name(1)
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_attempt, args=(trace, victim, killed))
    killer.start()
    stage = make_stage(kind, trace, hold=True)
    runner = RayRunner(RunDir(tmp_path / "ray"), PipelineConfig(), progress=False)
    try:
        run, _, contents = run_with(runner, [stage])
    finally:
        (trace / "go").touch()
        killer.join()
    assert contents == expected
    assert_rows_unique(run)
    attempts = stage.attempts()
    assert {part: len(tries) for part, tries in attempts.items()} == {
        part_name(i): 2 if i == 1 else 1 for i in range(N_PARTS)
    }
    assert attempts[victim][0]["pid"] == killed[0] != attempts[victim][1]["pid"]
    assert f"{stage.name} {victim}: its worker died" in caplog.text
    assert "running it again (1/3)" in caplog.text
    if kind == "actors":
        assert len(stage.setups()) == 3  # two actors, and the one that replaced the killed


def kill_first_attempt(trace: Path, part: str, killed: list[int]) -> None:
    """Wait for `part` to start, SIGKILL its process, then let every part go on."""
    log = trace / "attempts" / part
    wait_for(log, timeout=60)
    if log.exists():
        pid = json.loads(log.read_text().splitlines()[0])["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    (trace / "go").touch()


@pytest.mark.parametrize("kind", STAGES)
def test_stage_error_is_raised_once_then_resume_completes(tmp_path, local_ray, kind: str):
    _, expected = local_reference(tmp_path, kind)
    run, bad = RunDir(tmp_path / "ray"), part_name(3)
    stage = make_stage(kind, tmp_path / "trace", fail_on=bad)
    with pytest.raises(ValueError, match=f"bad data in {bad}"):
        RayRunner(run, PipelineConfig(), progress=False).run_all([stage])
    assert len(stage.attempts()[bad]) == 1  # a bug or bad data is not retried
    assert not run.is_done(stage.name, bad)
    fixed = make_stage(kind, tmp_path / "trace-2")
    _, results, contents = run_with(RayRunner(run, PipelineConfig(), progress=False), [fixed])
    assert contents == expected
    assert bad in fixed.attempts() and results[0].computed < N_PARTS


DEMO = Path(str(resources.files("megapairs") / "configs" / "demo.yaml"))
PIPELINE_FOLDERS = ("corpus", "rejects", "pairs", "annotations", "dataset")
# planted across parts (shard_size 20): duplicate file -> the file it copies, whose id is
# lower (the keeper); scene-00061 is the generator's own copy of scene-00007
PLANTED = {"scene-00045.jpg": "scene-00003.jpg", "scene-00053.jpg": "scene-00024.jpg"}


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    """The packaged demo config (real EfficientNet-Lite0 and MiniLM encoders) over 60
    scenes in 4 parts, with duplicates planted across parts, one of them in both
    directions: part 1's scene-00024 becomes a copy of part 2's scene-00053."""
    images = generate_scene_corpus(tmp_path_factory.mktemp("scenes"), 60, seed=5).images_dir
    shutil.copyfile(images / "scene-00003.jpg", images / "scene-00045.jpg")
    shutil.copyfile(images / "scene-00053.jpg", images / "scene-00024.jpg")
    overrides = [f"input.path={images}", "input.shard_size=20", "embed.num_workers=0"]
    return load_config(DEMO, [*overrides, "runner.actors=1"])


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory: pytest.TempPathFactory, demo_config) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("demo-local"))
    LocalRunner(run, demo_config, progress=False).run_all(build_stages(demo_config, progress=False))
    return run


def parquet_tables(run: RunDir) -> dict[str, Any]:
    contents = run_contents(run, PIPELINE_FOLDERS)
    return {name: rows for name, rows in contents.items() if name.endswith(".parquet")}


def duplicate_keepers(run: RunDir) -> dict[str, str]:
    """Rejected duplicate's file -> the kept file it copies."""
    corpus = read_corpus(run, columns=["id", "key"]).to_pydict()
    keys = dict(zip(corpus["id"], corpus["key"], strict=True))
    rejects = [r for r in read_rejects(run).to_pylist() if r["reason"] == "duplicate"]
    return {r["key"]: keys[r["duplicate_of"]] for r in rejects}


@pytest.mark.parametrize("order", ORDERS)
def test_demo_pipeline_gives_the_local_tables_in_any_order(
    tmp_path, local_ray, demo_config, demo_reference, order: str
):
    run = RunDir(tmp_path / "ray")
    runner = RayRunner(run, demo_config, progress=False, order=ORDERS[order])
    results = runner.run_all(build_stages(demo_config, progress=False))
    assert all(r.computed == r.parts > 0 for r in results)
    expected = parquet_tables(demo_reference)
    assert len(expected) > 20 and parquet_tables(run) == expected
    assert duplicate_keepers(run) == {**PLANTED, "scene-00061.png": "scene-00007.png"}


def test_unpicklable_stage_names_the_attribute(tmp_path, local_ray):
    stage = make_stage("tasks", tmp_path / "trace")
    stage.lock = threading.Lock()  # e.g. a client or a model built in __init__
    with pytest.raises(RuntimeError, match=r"'squares' cannot be sent .*attributes: lock"):
        RayRunner(RunDir(tmp_path / "ray"), PipelineConfig(), progress=False).run_all([stage])


def test_runner_starts_ray_itself_and_shuts_it_down(tmp_path, monkeypatch):
    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runner = build_runner("ray", RunDir(tmp_path / "ray"), PipelineConfig(), progress=False)
    assert isinstance(runner, RayRunner)
    runner.start()
    runner.run_stage(make_stage("tasks", tmp_path / "trace"))
    resources = ray.cluster_resources()
    assert resources["CPU"] == local_cpus()
    assert resources["object_store_memory"] == OBJECT_STORE_BYTES
    runner.close()
    assert not ray.is_initialized()


def test_missing_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'megapairs\[ray\]'"):
        build_runner("ray", RunDir(tmp_path), PipelineConfig())


def test_pool_size_and_gpus_follow_the_cluster():
    cpu_only, gpus = {"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}
    model = ModelSquaresStage(trace="")
    assert actor_gpus(-1, model, cpu_only) == 0 and actor_gpus(-1, model, gpus) == 1
    assert actor_gpus(-1, SquaresStage(trace=""), gpus) == 0
    assert actor_gpus(0.5, model, cpu_only) == 0.5
    assert pool_size(0, 2.0, 0.0, [cpu_only]) == 4 and pool_size(0, 1.0, 0.0, [{}]) == 1
    assert pool_size(0, 1.0, 1.0, [gpus, gpus]) == 8 and pool_size(0, 1.0, 0.5, [gpus]) == 8
    assert pool_size(0, 6.0, 1.0, [gpus]) == 2  # CPUs bind first
    assert pool_size(0, 1.5, 0.0, [{"CPU": 2.0}, {"CPU": 2.0}]) == 2  # per node, not 4 // 1.5
    assert pool_size(3, 1.0, 1.0, [gpus]) == 3 and pool_size(9, 1.0, 1.0, [gpus]) == 4


def test_forwarded_environment():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "HF_HOME": "/models", "PATH": "/bin"}
    env |= {"MEGAPAIRS_X": "1", "OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0"}
    assert set(forwarded_env(env)) == {"AWS_ENDPOINT_URL", "HF_HOME", "MEGAPAIRS_X"} | {
        "OMP_NUM_THREADS"
    }


def test_actor_stages_run_one_part_per_actor():
    runner = object.__new__(RayRunner)
    runner.config = PipelineConfig.model_validate({"runner": {"max_in_flight": 0}})
    pool = object.__new__(ActorPool)
    pool.slots = 3
    assert RayRunner.in_flight(runner, pool) == 3


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoNodeCluster]:
    """Two nodes on this machine with token authentication, as `ray start` makes them;
    this process's own Ray is shut down first, so the runner joins the cluster."""
    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # restored afterwards
    use_token_auth()
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    cluster = TwoNodeCluster(logs)
    try:
        cluster.start()
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def test_two_node_cluster_runs_parts_on_both_nodes(tmp_path, cluster, monkeypatch):
    _, expected_tasks = local_reference(tmp_path / "tasks", "tasks")
    _, expected_actors = local_reference(tmp_path / "actors", "actors")
    monkeypatch.setenv("MEGAPAIRS_RAY_PROBE", "forwarded")  # the nodes were started without
    tasks = make_stage("tasks", tmp_path / "trace-tasks", delay=0.3)
    actors = make_stage("actors", tmp_path / "trace-actors", delay=0.3)
    runs = [RunDir(tmp_path / "ray-tasks"), RunDir(tmp_path / "ray-actors")]
    for run, stage in zip(runs, [tasks, actors], strict=True):
        RayRunner(run, PipelineConfig(), progress=False, address=cluster.address).run_all([stage])
        assert not ray.is_initialized()  # the runner joined, so it left
    assert run_contents(runs[0], COMPARED) == expected_tasks
    assert run_contents(runs[1], COMPARED) == expected_actors
    for stage in (tasks, actors):
        where = [tries[0] for tries in stage.attempts().values()]
        assert len({w["node"] for w in where}) == 2
        assert {w["probe"] for w in where} == {"forwarded"}


def test_the_cli_pipeline_on_a_two_node_cluster_gives_the_local_tables(
    tmp_path, cluster, demo_config, demo_reference
):
    """`megapairs synthesize --runner ray --ray-address HOST:PORT`, the real stages with
    real encoders, one embedding actor per node."""
    config_file = tmp_path / "config.yaml"
    settings = demo_config.model_dump(mode="json")
    settings["runner"]["actors"] = 0  # as many as the nodes hold: one each
    config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    run = RunDir(tmp_path / "cluster-run")
    command = ["synthesize", "--config", str(config_file), "--run", str(run.root), "--quiet"]
    assert main([*command, "--runner", "ray", "--ray-address", cluster.address]) == 0
    assert not ray.is_initialized()
    assert parquet_tables(run) == parquet_tables(demo_reference)
    stages = run.read_manifest()["stages"]
    assert stages["ingest"]["counts"]["duplicates"] == 3
    assert all(entry["complete"] for entry in stages.values())


moto_endpoint, s3_env, s3_url = s3_fixtures.moto_endpoint, s3_fixtures.s3_env, s3_fixtures.s3_url


def test_workers_write_a_run_on_object_storage(tmp_path, s3_url):
    """A run directory on S3: the runner forwards the endpoint and keys (AWS_*) to the
    workers it starts; their files and markers equal a local run's."""
    ray.shutdown()  # the runner starts its own Ray, with the forwarded environment
    local_reference(tmp_path, "tasks")
    local = RunDir(tmp_path / "local")
    run = RunDir(s3_url)
    results = RayRunner(run, PipelineConfig(), progress=False).run_all(
        [make_stage("tasks", tmp_path / "trace")]
    )
    assert not ray.is_initialized() and results[0].computed == N_PARTS
    assert run.part_counts("squares") == local.part_counts("squares")
    for part in run.done_parts("squares"):
        remote_rows = read_table(run.part_path("squares", part)).to_pylist()
        assert remote_rows == read_table(local.part_path("squares", part)).to_pylist()
