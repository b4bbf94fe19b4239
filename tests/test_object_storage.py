"""Runs and inputs on object storage, against a moto S3 server on loopback.

The run directory's rule holds on S3 as on disk: a part's files are written whole, then
its marker; listings see what another process wrote at once. Inputs (tar shards, Parquet,
manifests, folders) are listed and read through fsspec. End to end, a run on S3, also one
killed with SIGKILL and started again, holds the same tables as a local run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import s3_fixtures
import yaml
from corpus_fixtures import (
    img2dataset_sample,
    jpeg_bytes,
    png_bytes,
    write_files,
    write_hf_parquet,
    write_manifest,
    write_tar,
)
from process_fixtures import kill_9_once_it_exists, start_cli
from s3_fixtures import local_run_contents, new_bucket, remote_files, remote_run_contents, upload

from megapairs.annotation.cache import AnswerCache, CacheKey
from megapairs.annotation.types import BackendError, Completion
from megapairs.config import InputConfig, PipelineConfig, load_config
from megapairs.corpus.images import ImageLimits
from megapairs.corpus.ingest import (
    RejectedRecord,
    ValidRecord,
    load_or_create_plan,
    validate_record,
)
from megapairs.corpus.readers import InputError, SourceRecord, detect_format, plan_input, read_part
from megapairs.corpus.store import load_image_bytes
from megapairs.runs import (
    RunDir,
    as_path,
    atomic_path,
    parquet_metadata,
    read_array,
    read_bytes,
    read_table,
    write_array,
    write_json,
    write_table,
)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
N_IMAGES = 40
# the moto server, the AWS environment pointing at it, a fresh bucket per test
moto_endpoint, s3_env, s3_url = s3_fixtures.moto_endpoint, s3_fixtures.s3_env, s3_fixtures.s3_url
TIMED = frozenset({"manifest.json", "index.json", "dataset_info.json"})
WRITER = """
import sys
import pyarrow as pa
from megapairs.runs import RunDir, write_table
run = RunDir(sys.argv[1])
write_table(run.part_path("things", "part-00001"), pa.table({"x": [3, 4]}))
run.mark_done("make", "part-00001", {"rows": 2})
"""


def read_all(config: InputConfig) -> list[SourceRecord]:
    return [record for part in plan_input(config) for record in read_part(part)]


def same_records(remote: list[SourceRecord], local: list[SourceRecord]) -> None:
    """Records that differ only in where they were read from."""
    assert [(r.key, r.data, r.caption, r.error) for r in remote] == [
        (r.key, r.data, r.caption, r.error) for r in local
    ]


# the run directory ----------------------------------------------------------------------


def test_a_url_root_is_a_upath_and_a_local_root_stays_a_path(s3_url, tmp_path):
    remote = RunDir(s3_url)
    assert not isinstance(remote.root, Path) and remote.root.protocol == "s3"
    assert remote.root.storage_options.get("use_listings_cache") is False
    assert not remote.is_local and remote.uri == s3_url
    local = RunDir(tmp_path / "run")
    assert type(local.root) is type(tmp_path) and local.is_local
    assert local.uri == str(tmp_path / "run")
    assert RunDir(str(tmp_path)).root == tmp_path
    assert RunDir(f"file://{tmp_path}").is_local


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_other_fsspec_urls_hold_runs_too(scheme, tmp_path):
    url = f"memory://runs/{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path}/run"
    run = RunDir(url)
    write_table(run.part_path("things", "part-00000"), pa.table({"x": [1]}))
    run.mark_done("make", "part-00000", {"rows": 1})
    assert [p.name for p in run.files("things", "make")] == ["part-00000.parquet"]
    assert RunDir(url).part_counts("make") == {"part-00000": {"rows": 1}}
    if scheme == "file":
        assert (tmp_path / "run" / "_progress" / "make" / "part-00000.json").is_file()


def test_atomic_writes_and_reads_on_s3(s3_url):
    run = RunDir(s3_url)
    table = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]})
    write_table(run.part_path("things", "part-00000"), table)
    path = run.part_path("things", "part-00000")
    assert read_table(path) == table
    assert read_table(path, ["name"]).column_names == ["name"]
    assert read_table(path, filters=[("id", "in", [2])])["name"].to_pylist() == ["b"]
    assert parquet_metadata(path).num_rows == 3
    vectors = np.arange(12, dtype=np.float16).reshape(3, 4)
    write_array(run.part_path("vectors", "part-00000", ".npy"), vectors)
    loaded = read_array(run.part_path("vectors", "part-00000", ".npy"), mmap=True)
    assert loaded.dtype == np.float16 and np.array_equal(loaded, vectors)
    write_json(run.root / "side.json", {"k": 1})
    assert read_bytes(run.root / "side.json").startswith(b"{")
    assert sorted(remote_files(s3_url)) == [
        "side.json",
        "things/part-00000.parquet",
        "vectors/part-00000.npy",
    ]


def test_an_atomic_write_that_fails_leaves_nothing(s3_url):
    target = RunDir(s3_url).root / "index.faiss"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half an index")
        raise RuntimeError("killed while writing")
    assert not target.exists() and not tmp.exists()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"a whole index")
    assert target.read_bytes() == b"a whole index" and not tmp.exists()


def _rows_of(path) -> int:
    return read_table(path).num_rows


def test_paths_made_before_a_fork_read_in_the_child(s3_url):
    """DataLoader workers are forked: s3fs refuses an instance made in the parent."""
    import multiprocessing

    path = RunDir(s3_url).part_path("things", "part-00000")
    write_table(path, pa.table({"x": [1, 2]}))
    assert read_table(path).num_rows == 2  # the parent's file system is built and used
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_rows_of, (path,)).get(timeout=60) == 2


def test_markers_and_listings_see_another_process_at_once(s3_url):
    run = RunDir(s3_url)
    write_table(run.part_path("things", "part-00000"), pa.table({"x": [1, 2]}))
    run.mark_done("make", "part-00000", {"rows": 2})
    assert run.done_parts("make") == ["part-00000"]  # listed once: a cache would now go stale
    subprocess.run([sys.executable, "-c", WRITER, s3_url], check=True, env=os.environ)
    assert run.done_parts("make") == ["part-00000", "part-00001"]
    assert run.is_done("make", "part-00001")
    assert [p.name for p in run.files("things", "make")] == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert run.part_counts("make") == {"part-00000": {"rows": 2}, "part-00001": {"rows": 2}}
    run.reopen("make", "part-00000")
    assert RunDir(s3_url).done_parts("make") == ["part-00001"]
    assert [p.name for p in run.files("things", "make")] == ["part-00001.parquet"]


def test_manifest_and_temp_files_on_s3(s3_url):
    run = RunDir(s3_url)
    assert run.read_manifest() == {}
    run.update_manifest(config={"seed": 1})
    run.update_manifest(stages={"ingest": {"parts": 2}})
    assert RunDir(s3_url).read_manifest() == {
        "config": {"seed": 1},
        "stages": {"ingest": {"parts": 2}},
    }
    assert run.remove_temp_files() == 0
    run.root.mkdir(parents=True, exist_ok=True)  # what a runner does first: harmless on S3


def test_annotation_cache_chunks_on_s3(s3_url):
    key = CacheKey("v1-abc", "describer", "instructor", 7, "digest")
    cache = AnswerCache(RunDir(s3_url), "part-00000", key, flush_every=2)
    cache.put("0-1", "describe", Completion("two red cubes", 1))
    cache.put("0-1", "instruct", BackendError("client_error", "400", 1, "bad"))
    cache.put("0-2", "describe", Completion("a blue ball", 2))
    cache.flush()
    again = AnswerCache(RunDir(s3_url), "part-00000", key, flush_every=2)
    assert again.next_chunk == 2
    assert again.get("0-2", "describe") == Completion("a blue ball", 2)
    failure = again.get("0-1", "instruct")
    assert isinstance(failure, BackendError) and failure.reason == "client_error"


# inputs -------------------------------------------------------------------------------


def test_webdataset_shards_on_s3_read_like_local_ones(s3_url, tmp_path):
    shards = tmp_path / "shards"
    write_tar(
        shards / "00000.tar",
        img2dataset_sample("000000000", jpeg_bytes(1), "first caption")
        + img2dataset_sample("000000001", jpeg_bytes(2), None),
    )
    write_tar(shards / "00001.tar", img2dataset_sample("000010000", jpeg_bytes(3), "other"))
    (shards / "00001_stats.json").write_text("{}")
    url = upload(shards, f"{s3_url}/shards")
    config = InputConfig(path=f"{url}/")
    assert detect_format(config) == "webdataset"
    parts = plan_input(config)
    assert [p.source for p in parts] == [f"{url}/00000.tar", f"{url}/00001.tar"]
    records = read_all(config)
    same_records(records, read_all(InputConfig(path=str(shards))))
    assert records[0].uri == f"{url}/00000.tar#000000000.jpg"
    [glob_part] = plan_input(InputConfig(path=f"{url}/0000[1].tar"))
    assert glob_part.source == f"{url}/00001.tar"


def test_a_cut_tar_on_s3_ends_with_a_corrupt_archive_record(s3_url, tmp_path):
    full = write_tar(tmp_path / "full.tar", img2dataset_sample("k0", jpeg_bytes(1), "c"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[:700])
    url = upload(cut, f"{s3_url}/cut.tar")
    records = read_all(InputConfig(path=url, format="webdataset"))
    assert records[-1].error is not None and records[-1].error[0] == "corrupt_archive"


def test_hf_parquet_on_s3_reads_like_a_local_file(s3_url, tmp_path):
    images = [png_bytes(i) for i in range(5)]
    local = write_hf_parquet(tmp_path / "train.parquet", images, list("abcde"), row_group_size=2)
    url = upload(local, f"{s3_url}/data/train.parquet")
    config = InputConfig(path=url, caption_column="text", shard_size=3)
    assert detect_format(config) == "parquet"
    assert [(p.start, p.stop) for p in plan_input(config)] == [(0, 3), (3, 5)]
    local_config = config.model_copy(update={"path": str(local)})
    same_records(read_all(config), read_all(local_config))
    folder = InputConfig(path=f"{s3_url}/data", caption_column="text")
    assert len(read_all(folder)) == 5


def test_resume_refuses_an_input_object_rewritten_since_planning(s3_url, tmp_path):
    """A remote Parquet file's rows would shift under the same ids: its ETag is stamped."""
    local = write_hf_parquet(tmp_path / "a.parquet", [png_bytes(i) for i in range(3)], list("abc"))
    url = upload(local, f"{s3_url}/in/train.parquet")
    config = InputConfig(path=url, caption_column="text", shard_size=2)
    run = RunDir(tmp_path / "run")
    assert len(load_or_create_plan(run, config)) == 2
    assert len(load_or_create_plan(run, config)) == 2  # unchanged: the stored plan
    other = write_hf_parquet(tmp_path / "b.parquet", [png_bytes(9)] * 3, list("xyz"))
    upload(other, url)
    with pytest.raises(RuntimeError, match="input changed since this run planned it"):
        load_or_create_plan(run, config)


def test_manifest_on_s3_with_relative_and_url_paths(s3_url, tmp_path):
    write_files(tmp_path / "imgs", {"a.png": png_bytes(1), "b/c.jpg": jpeg_bytes(2)})
    images = upload(tmp_path / "imgs", f"{s3_url}/imgs")
    rows = [
        {"image": "a.png", "caption": "first"},
        {"image": f"{images}/b/c.jpg", "caption": "by URL"},
        {"image": "gone.png", "caption": "missing"},
        {"image": "https://example.com/x.jpg", "caption": "web"},
    ]
    manifest = upload(write_manifest(tmp_path / "list.csv", rows), f"{images}/list.csv")
    config = InputConfig(path=manifest)
    assert detect_format(config) == "manifest"
    first, by_url, missing, web = read_all(config)
    assert first.path == f"{images}/a.png" and by_url.path == f"{images}/b/c.jpg"
    assert web.error is not None and web.error[0] == "missing_file"
    limits = ImageLimits(min_side=8, max_pixels=10**8, max_bytes=10**8)
    kept = validate_record(first, limits)
    assert isinstance(kept, ValidRecord) and kept.data == png_bytes(1)
    assert load_image_bytes(5, by_url.path, {}) == jpeg_bytes(2)
    gone = validate_record(missing, limits)
    assert isinstance(gone, RejectedRecord) and gone.reason == "missing_file"
    large = validate_record(first, ImageLimits(min_side=8, max_pixels=10**8, max_bytes=10))
    assert isinstance(large, RejectedRecord) and large.reason == "too_large_file"


def test_a_folder_of_images_on_s3_is_auto_detected(s3_url, tmp_path):
    files = {"a.png": png_bytes(1), "a.txt": "a caption", "sub/b.jpg": jpeg_bytes(2)}
    files[".hidden/c.png"] = png_bytes(3)
    url = upload(write_files(tmp_path / "tree", files), f"{s3_url}/tree")
    config = InputConfig(path=url)
    assert detect_format(config) == "folder"
    records = read_all(config)
    assert [(r.key, r.caption) for r in records] == [("a.png", "a caption"), ("sub/b.jpg", None)]
    assert records[1].path == f"{url}/sub/b.jpg"


def test_the_folder_reader_names_the_format_of_tar_shards(tmp_path):
    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", img2dataset_sample("k", jpeg_bytes(1), "c"))
    (shards / "00000.parquet").write_bytes(b"img2dataset metadata")
    with pytest.raises(InputError, match=r"input\.format: webdataset"):
        plan_input(InputConfig(path=str(shards), format="folder"))
    assert detect_format(InputConfig(path=str(shards))) == "webdataset"
    (shards / "stray.png").write_bytes(png_bytes(1))
    records = {r.key: r for r in read_all(InputConfig(path=str(shards), format="folder"))}
    assert records["stray.png"].error is None
    error = records["00000.tar"].error
    assert error is not None and error[0] == "not_an_image" and "webdataset" in error[1]


# end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    """The demo: its packaged config (real EfficientNet-Lite0 and MiniLM encoders, the
    template annotator) over a small generated corpus in 4 parts."""
    from megapairs.demo.scenes import generate_scene_corpus

    corpus = generate_scene_corpus(tmp_path_factory.mktemp("scenes"), N_IMAGES, seed=3)
    overrides = [f"input.path={corpus.images_dir}", "input.shard_size=12", "embed.num_workers=0"]
    return load_config(DEMO, overrides)


def synthesize(root: str | Path, config: PipelineConfig) -> RunDir:
    from megapairs.pipeline.runner import LocalRunner
    from megapairs.pipeline.synthesize import build_stages

    run = RunDir(root)
    LocalRunner(run, config, progress=False).run_all(build_stages(config, progress=False))
    return run


@pytest.fixture(scope="module")
def local_contents(tmp_path_factory: pytest.TempPathFactory, config) -> dict[str, object]:
    run = synthesize(tmp_path_factory.mktemp("local") / "run", config)
    return local_run_contents(run.root, TIMED)


@pytest.fixture(scope="module")
def s3_run(s3_env, config) -> RunDir:
    return synthesize(new_bucket(), config)


def test_a_run_on_s3_holds_the_same_files_as_a_local_run(s3_run, local_contents):
    remote = remote_run_contents(s3_run.uri, TIMED)
    assert sorted(remote) == sorted(local_contents)
    assert remote == local_contents
    assert all(entry["complete"] for entry in s3_run.read_manifest()["stages"].values())


def test_summary_stats_and_validation_of_a_run_on_s3(s3_run):
    from megapairs.dataset.stats import dataset_stats
    from megapairs.dataset.validate import validate_dataset
    from megapairs.demo.summary import format_summary, summarize_run

    summary = summarize_run(RunDir(s3_run.uri))
    assert summary.pairs > 0 and s3_run.uri in format_summary(summary)
    stats = dataset_stats(f"{s3_run.uri}/dataset")
    assert stats.rows > 0 and stats.parts and all(p.balanced for p in stats.parts)
    report = validate_dataset(f"{s3_run.uri}/dataset")
    assert report.ok, report.problems[:5]
    assert report.images_checked > 0 and report.images_missing == 0


def test_kill_9_on_s3_then_same_command_is_identical(s3_env, tmp_path, config, local_contents):
    from megapairs.cli import main

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    url = new_bucket()
    command = ["synthesize", "--config", str(config_file), "--run", url, "--quiet"]
    process = start_cli(command)
    marker = as_path(url) / "_progress" / "embed.image_pattern" / "part-00000.json"
    kill_9_once_it_exists(process, marker, poll=0.1)
    assert not (as_path(url) / "_progress" / "mine").exists()
    assert main(command) == 0
    assert remote_run_contents(url, TIMED) == local_contents
