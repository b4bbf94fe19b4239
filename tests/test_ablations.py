"""scripts/ablations.py: config overlays run over one base run's embeddings and neighbours
(hard-linked, never computed again), each through mine -> annotate -> export."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from megapairs.config import ConfigError
from megapairs.demo.run import demo_config
from megapairs.demo.scenes import generate_scene_corpus
from megapairs.demo.summary import read_pairs
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.synthesize import build_stages
from megapairs.runs import RunDir

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablations.py"
OVERLAYS = SCRIPT.parents[1] / "configs" / "ablations"
N_IMAGES = 120
SHARED_STEPS = ("ingest", "embed", "neighbours")


def load_script():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


ablations = load_script()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A demo run through neighbours (its three channels), the shared part of every overlay."""
    root = tmp_path_factory.mktemp("ablations")
    corpus = generate_scene_corpus(root / "scenes", N_IMAGES, seed=0)
    config = demo_config(None, corpus, seed=0)
    run = RunDir(root / "base")
    LocalRunner(run, config, progress=False).run_all(build_stages(config, SHARED_STEPS, False))
    return run


@pytest.fixture(scope="module")
def results(base: RunDir, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("overlays")
    overlays = [OVERLAYS / "table5-D.yaml", OVERLAYS / "table4-hn0.yaml"]
    return {o.stem: ablations.run_ablation(base, o, out) for o in overlays}


def test_every_paper_overlay_is_a_valid_overlay_of_the_demo_config(base):
    stored = ablations.base_config(base)
    names = {p.stem for p in OVERLAYS.glob("*.yaml")}
    table5 = {f"table5-{c}" for c in ("D", "I", "T", "DI", "DT", "IT", "DIT")}
    assert table5 | {f"table4-hn{n}" for n in (0, 1, 3, 5)} <= names
    for path in sorted(OVERLAYS.glob("*.yaml")):
        config = ablations.overlay_config(stored, path)
        assert ablations.reuse_problems(base, stored, config) == [], path.name
    letters = {"D": "image_pattern", "I": "image_semantic", "T": "caption"}
    for name in table5:
        config = ablations.overlay_config(stored, OVERLAYS / f"{name}.yaml")
        assert set(config.enabled_channels()) == {letters[c] for c in name.split("-")[1]}


def test_shared_stages_are_linked_not_computed(base, results):
    for ablation in results.values():
        run = Path(ablation.run.uri)
        assert ablation.linked > 0
        assert [r.name for r in ablation.results] == ["mine", "annotate", "export"]
        for channel in ablation.config.enabled_channels():
            for name in (
                f"embeddings/{channel}/part-00000.npy",
                f"neighbours/{channel}/part-00000.parquet",
            ):
                assert (run / name).samefile(Path(base.uri) / name)
        # the normal runner sees the shared stages as finished under this config
        stages = build_stages(ablation.config, SHARED_STEPS, False)
        again = LocalRunner(ablation.run, ablation.config, progress=False).run_all(stages)
        assert {r.name: r.computed for r in again} == {r.name: 0 for r in again}
        assert any(r.name.startswith("embed.") for r in again)


def test_outputs_differ_as_the_overlays_say(results):
    single = read_pairs(results["table5-D"].run).to_pylist()
    assert single and all(p["channels"] == ["image_pattern"] for p in single)
    no_negatives = read_pairs(results["table4-hn0"].run).to_pylist()
    assert no_negatives and all(p["hard_negative_ids"] == [] for p in no_negatives)
    assert len({c for p in no_negatives for c in p["channels"]}) == 3
    table = ablations.format_table(list(results.values()))
    for name, ablation in results.items():
        mine = ablation.counts("mine")
        assert name in table and f"{mine['pairs']:,}" in table
        assert ablation.counts("export")["rows"] == mine["pairs"]
    assert "image_pattern" in table and "(100%)" in table


def test_an_overlay_that_changes_the_shared_stages_is_refused(base, tmp_path):
    overlay = tmp_path / "k.yaml"
    overlay.write_text("neighbours: {k: 5}\n")
    with pytest.raises(ConfigError, match="neighbours differs"):
        ablations.run_ablation(base, overlay, tmp_path / "out")


def test_the_script_has_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--base" in done.stdout and "table5-DIT" in done.stdout
