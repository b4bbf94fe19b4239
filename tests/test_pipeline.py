"""End to end: `synthesize` on a tiny generated corpus with the paper's config, its
encoders swapped for tiny random CLIP and DINOv2 models loaded through the real
`from_pretrained` path and its annotator for the template backend; a crash or a
kill -9 at any point, then the same command again, gives output identical to an
uninterrupted run (the dataset included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from process_fixtures import kill_9_once_it_exists, start_cli

from megapairs.cli import main
from megapairs.config import PipelineConfig, load_config
from megapairs.corpus.store import read_corpus, read_rejects
from megapairs.demo.scenes import SceneCorpus, generate_scene_corpus
from megapairs.demo.summary import read_pairs
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.synthesize import build_stages
from megapairs.runs import RunDir

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"
N_IMAGES = 40
WIDE_WINDOW = "[-1.0, 0.9999]"  # random tiny encoders: keep every pair but near-copies


class Crash(RuntimeError):
    """A simulated crash."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SceneCorpus:
    return generate_scene_corpus(tmp_path_factory.mktemp("scenes"), N_IMAGES, seed=3)


@pytest.fixture(scope="module")
def config(corpus: SceneCorpus, tiny_clip, tiny_dinov2) -> PipelineConfig:
    overrides = [
        f"input.path={corpus.images_dir}",
        "input.shard_size=12",
        "ingest.min_side=32",
        f"channels.image_semantic.model={tiny_clip.path}",
        f"channels.caption.model={tiny_clip.path}",
        f"channels.image_pattern.model={tiny_dinov2.path}",
        "embed.batch_size=8",
        "embed.num_workers=0",
        "neighbours.k=6",
        "mine.max_targets=3",
        "mine.num_hard_negatives=4",
        "annotate.backend=template",
    ]
    overrides += [
        f"channels.{ch}.window={WIDE_WINDOW}"
        for ch in ("image_semantic", "image_pattern", "caption")
    ]
    return load_config(PAPER, overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, config: PipelineConfig) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("reference"))
    LocalRunner(run, config, progress=False).run_all(build_stages(config, progress=False))
    return run


# hold timestamps or build times
TIMED_METADATA = {"manifest.json", "index.json", "dataset_info.json"}


def run_contents(run: RunDir) -> dict[str, object]:
    """Every output file of a run by relative path: tables as rows, arrays, or bytes."""
    contents: dict[str, object] = {}
    for path in sorted(run.root.rglob("*")):
        name = str(path.relative_to(run.root))
        if path.is_dir() or path.name in TIMED_METADATA:
            continue
        if path.suffix == ".parquet":
            contents[name] = pq.read_table(path).to_pylist()
        elif path.suffix == ".npy":
            contents[name] = np.load(path).tolist()
        else:
            contents[name] = path.read_bytes()
    return contents


def test_synthesize_accounts_for_every_record(reference: RunDir, corpus: SceneCorpus):
    corpus_table, rejects = read_corpus(reference), read_rejects(reference)
    rejects = rejects.filter(pc.field("stage") == "ingest")
    assert corpus_table.num_rows == N_IMAGES
    assert corpus_table.num_rows + rejects.num_rows == corpus.n_files
    got = dict(zip(rejects["key"].to_pylist(), rejects["reason"].to_pylist(), strict=True))
    assert got == corpus.expected_rejects
    stages = reference.read_manifest()["stages"]
    assert all(entry["complete"] for entry in stages.values())
    ingest = stages["ingest"]["counts"]
    assert ingest["records"] == ingest["kept"] + ingest["rejected"] == corpus.n_files
    assert stages["embed.caption"]["counts"]["embedded"] == corpus.n_captioned


def test_synthesize_mines_pairs_by_the_rules(reference: RunDir, config: PipelineConfig):
    pairs = read_pairs(reference)
    ids = set(read_corpus(reference)["id"].to_pylist())
    assert pairs.num_rows > 0
    for row in pairs.to_pylist():
        assert row["query_id"] != row["target_id"]
        assert {row["query_id"], row["target_id"]} <= ids
        negatives = row["hard_negative_ids"]
        assert len(set(negatives)) == len(negatives) <= config.mine.num_hard_negatives
        assert row["target_id"] not in negatives and row["query_id"] not in negatives
        assert set(row["channels"]) <= set(config.enabled_channels())
    per_query = pairs.group_by("query_id").aggregate([("target_id", "count")])
    assert max(per_query["target_id_count"].to_pylist()) <= config.mine.max_targets


def test_every_kept_record_is_a_query_with_pairs_or_a_mine_reject(tmp_path, config):
    """Caption-only (Table 5 "T"): images without a caption have no vector anywhere and
    must still be accounted for."""
    caption_only = config.model_copy(
        update={
            "channels": {
                name: channel.model_copy(update={"enabled": name == "caption"})
                for name, channel in config.channels.items()
            }
        }
    )
    run = RunDir(tmp_path / "run")
    LocalRunner(run, caption_only, progress=False).run_all(
        build_stages(caption_only, progress=False)
    )
    kept = read_corpus(run, columns=["id", "has_caption"]).to_pylist()
    queries = set(read_pairs(run)["query_id"].to_pylist())
    mine_rejects = read_rejects(run).filter(pc.field("stage") == "mine").to_pylist()
    rejected = {row["id"]: row["reason"] for row in mine_rejects}
    assert all(row["key"] and row["uri"] for row in mine_rejects)  # named, not only an id
    assert queries.isdisjoint(rejected)
    assert queries | set(rejected) == {row["id"] for row in kept}
    uncaptioned = {row["id"] for row in kept if not row["has_caption"]}
    assert uncaptioned
    assert {i: rejected[i] for i in uncaptioned} == dict.fromkeys(uncaptioned, "not_in_any_channel")


@pytest.mark.parametrize(
    "stage, part",
    [
        ("ingest", "part-00002"),
        ("embed.image_pattern", "part-00001"),
        ("neighbours.caption", "part-00002"),
        ("mine", "part-00001"),
        ("annotate", "part-00002"),
        ("export", "part-00001"),
    ],
)
def test_crash_mid_stage_then_resume_is_identical(
    tmp_path, monkeypatch, config: PipelineConfig, reference: RunDir, stage: str, part: str
):
    """The crash hits after the part's files are written, before its marker: the worst spot."""
    original = RunDir.mark_done

    def crashing_mark_done(self, stage_name, part_name, counts):
        if (stage_name, part_name) == (stage, part):
            raise Crash(f"{stage_name} {part_name}")
        return original(self, stage_name, part_name, counts)

    run = RunDir(tmp_path / "run")
    monkeypatch.setattr(RunDir, "mark_done", crashing_mark_done)
    with pytest.raises(Crash):
        LocalRunner(run, config, progress=False).run_all(build_stages(config, progress=False))
    monkeypatch.setattr(RunDir, "mark_done", original)
    results = LocalRunner(run, config, progress=False).run_all(build_stages(config, progress=False))
    assert any(r.name == stage and 0 < r.computed < r.parts for r in results)
    assert run_contents(run) == run_contents(reference)


def test_kill_9_then_same_command_is_identical(tmp_path, config: PipelineConfig, reference):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    run = RunDir(tmp_path / "run")
    command = ["synthesize", "--config", str(config_file), "--run", str(run.root), "--quiet"]
    process = start_cli(command)
    kill_9_once_it_exists(
        process, run.root / "_progress" / "embed.image_pattern" / "part-00000.json"
    )
    assert not (run.root / "_progress" / "mine").exists()
    assert main(command) == 0
    assert run_contents(run) == run_contents(reference)
