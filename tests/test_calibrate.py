"""`megapairs calibrate` and `window: auto`: the quantile rule on a fixed grid, windows
resolved before mining and recorded, a resume that keeps them, recomputed neighbours
noticed; and, on the demo corpus with its real encoders, auto windows that let every
channel contribute without mining worse pairs than the demo's hand-set windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from megapairs.cli import main
from megapairs.config import PipelineConfig
from megapairs.corpus.store import read_corpus
from megapairs.demo.run import attribute_agreement, demo_config
from megapairs.demo.scenes import generate_scene_corpus, read_attributes
from megapairs.demo.summary import format_summary, read_pairs, summarize_run
from megapairs.mining.stage import WINDOWS_FILE, MineStage, WindowsChanged, read_windows
from megapairs.neighbours.calibrate import (
    CALIBRATION_FILE,
    ScoreHistogram,
    WindowSplit,
    WindowUnresolvable,
    auto_window,
    scan_channel,
)
from megapairs.neighbours.stage import neighbours_folder, neighbours_stage_name
from megapairs.pipeline.reset import reset_stage
from megapairs.pipeline.runner import LocalRunner
from megapairs.pipeline.synthesize import build_stages
from megapairs.runs import RunDir, write_table
from megapairs.schemas import NEIGHBOURS_SCHEMA, PAIRS_DIR

# --- the histogram and the rule ------------------------------------------------------


def test_quantiles_are_grid_values_with_that_share_at_or_below():
    scores = np.linspace(0.1, 0.9, 1001, dtype=np.float32)
    histogram = ScoreHistogram()
    histogram.add(scores)
    for q in (0.0, 0.1, 0.5, 0.75, 0.995, 1.0):
        value = histogram.quantile(q)
        assert value == round(value, 4)
        assert (scores <= np.float32(value)).mean() >= q
        below = np.float32(round(value - 1e-4, 4))
        assert (scores <= below).mean() < q or q == 0.0


def test_counts_around_a_grid_window_are_exact_as_the_miner_compares():
    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [rng.uniform(0.3, 1.0, 5000).astype(np.float32), np.float32([0.8, 0.96, 0.96, 1.0])]
    )
    histogram = ScoreHistogram()
    for chunk in np.array_split(scores, 7):
        histogram.add(chunk)
    for window in [(0.8, 0.96), (0.5, 1.0), (0.7123, 0.9001)]:
        assert histogram.split(window) == WindowSplit.of(scores, window)


def test_the_same_scores_in_any_order_give_the_same_window_and_digest():
    scores = np.random.default_rng(1).normal(0.7, 0.1, 4000).clip(-1, 1).astype(np.float32)
    first, second = ScoreHistogram(), ScoreHistogram()
    first.add(scores)
    for chunk in np.array_split(scores[::-1], 5):
        second.add(chunk)
    assert auto_window(first, (0.75, 0.995)) == auto_window(second, (0.75, 0.995))
    assert first.digest() == second.digest()
    second.add(np.float32([0.5]))
    assert first.digest() != second.digest()


def test_scores_all_alike_or_none_give_no_window():
    alike = ScoreHistogram()
    alike.add(np.full(100, 0.9, np.float32))
    with pytest.raises(WindowUnresolvable, match="alike"):
        auto_window(alike, (0.75, 0.995))
    with pytest.raises(WindowUnresolvable, match="no neighbour scores"):
        auto_window(ScoreHistogram(), (0.75, 0.995))


# --- a run with hand-written neighbours -----------------------------------------------

K = 6
CHANNELS = ("wide", "narrow")


def neighbours_table(part: int, n: int, centre: float, spread: float, seed: int) -> pa.Table:
    """n queries of a part, each with K descending scores around `centre`, one padding
    entry (-1) and, for the first query, itself listed (both must be ignored)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n) + part * 1_000_000
    rows = []
    for i, query in enumerate(ids):
        others = rng.choice(np.delete(ids, i), K, replace=False).tolist()
        scores = sorted((centre + spread * rng.standard_normal(K)).clip(-1, 1), reverse=True)
        if i == 0:
            others[0] = int(query)
        others[-1], scores[-1] = -1, float("nan")
        rows.append({"id": int(query), "neighbour_ids": others, "scores": scores})
    return pa.Table.from_pylist(rows, schema=NEIGHBOURS_SCHEMA)


def write_neighbours(run: RunDir, seed: int = 0) -> None:
    for part in range(2):
        for c, (centre, spread) in zip(CHANNELS, [(0.6, 0.15), (0.95, 0.02)], strict=True):
            name = f"part-{part:05d}"
            table = neighbours_table(part, 40, centre, spread, seed + part)
            write_table(run.part_path(neighbours_folder(c), name), table)
            run.mark_done(neighbours_stage_name(c), name, {"queries": 40})


def small_config(window: object = "auto") -> PipelineConfig:
    channels = {c: {"encoder": "any", "window": window} for c in CHANNELS}
    return PipelineConfig.model_validate(
        {"channels": channels, "neighbours": {"k": K}, "mine": {"max_targets": 3}}
    )


def mine(run: RunDir, config: PipelineConfig):
    runner = LocalRunner(run, config, progress=False)
    return runner.run_all([MineStage(config)])[0]


def test_auto_windows_are_resolved_recorded_and_used(tmp_path):
    run = RunDir(tmp_path / "run")
    write_neighbours(run)
    result = mine(run, small_config())
    recorded = read_windows(run)
    assert recorded == run.read_manifest()["windows"]
    usable = {c: scan_channel(run, c).histogram for c in CHANNELS}
    for c in CHANNELS:
        entry = recorded[c]
        assert entry["rule"] == "auto" and entry["quantiles"] == [0.75, 0.995]
        assert entry["scores"] == 2 * (40 * (K - 1) - 1)  # per part: no padding, no self
        assert tuple(entry["window"]) == auto_window(usable[c], (0.75, 0.995))
    pairs = read_pairs(run).to_pylist()
    assert result.counts["pairs"] == len(pairs) > 0
    for pair in pairs:
        for channel, score in zip(pair["channels"], pair["channel_scores"], strict=True):
            low, high = recorded[channel]["window"]
            assert np.float32(low) < np.float32(score) < np.float32(high)
    assert {c for p in pairs for c in p["channels"]} == set(CHANNELS)


def test_a_resume_keeps_the_windows_and_the_config_hash(tmp_path):
    run = RunDir(tmp_path / "run")
    write_neighbours(run)
    mine(run, small_config())
    first = (run.folder(PAIRS_DIR) / WINDOWS_FILE).read_bytes()
    digest = run.read_manifest()["stages"]["mine"]["config_hash"]
    again = mine(run, small_config())
    assert again.computed == 0
    assert (run.folder(PAIRS_DIR) / WINDOWS_FILE).read_bytes() == first
    assert run.read_manifest()["stages"]["mine"]["config_hash"] == digest


def test_recomputed_neighbours_are_noticed_once_parts_are_mined(tmp_path):
    run = RunDir(tmp_path / "run")
    write_neighbours(run)
    mine(run, small_config())
    write_neighbours(run, seed=7)  # the neighbours stage computed again, other scores
    with pytest.raises(WindowsChanged, match=r"reset --run .* --stage mine"):
        mine(run, small_config())
    reset_stage(run, "mine")
    assert mine(run, small_config()).computed == 2
    assert read_windows(run)["wide"]["digest"] == scan_channel(run, "wide").histogram.digest()


def test_fixed_windows_are_recorded_as_fixed(tmp_path):
    run = RunDir(tmp_path / "run")
    write_neighbours(run)
    mine(run, small_config([0.5, 0.99]))
    assert read_windows(run) == {c: {"window": [0.5, 0.99], "rule": "fixed"} for c in CHANNELS}


def test_calibrate_prints_each_channel_and_writes_its_file(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    write_neighbours(run)
    run.update_manifest(config=small_config().model_dump(mode="json"))
    status = main(
        ["calibrate", "--run", str(run.root), "--set", "channels.narrow.window=[0.9, 0.99]"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "score quantiles" in out and "rank 1:" in out and f"rank {K}:" in out
    for c in CHANNELS:
        assert c in out
        data = json.loads((run.folder(neighbours_folder(c)) / CALIBRATION_FILE).read_text())
        window = data["window"]
        assert window["below"] + window["inside"] + window["above"] == data["scores"]
        assert data["suggested"]["auto_window"] == [0.75, 0.995]
        assert set(data["ranks"]) == {"1", "5", str(K)}
    narrow = json.loads((run.folder(neighbours_folder("narrow")) / CALIBRATION_FILE).read_text())
    assert narrow["window"]["configured"] == [0.9, 0.99]
    assert "[0.9000, 0.9900]   fixed" in out


# --- acceptance: the demo corpus with its real encoders ---------------------------------

N_IMAGES = 300
MIN_CHANNEL_SHARE = 0.15
AUTO = [f"channels.{c}.window=auto" for c in ("image_semantic", "image_pattern", "caption")]


def channel_shares(pairs: pa.Table, channels: list[str]) -> dict[str, float]:
    """The share of pairs each channel found (a pair found by two counts for both)."""
    found = pairs["channels"].to_pylist()
    return {c: sum(c in names for names in found) / max(len(found), 1) for c in channels}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory):
    """The demo corpus mined with its config's fixed windows, then (after `reset --stage
    mine`, as a user would) with `window: auto` for every channel: (run, fixed pairs,
    auto pairs, ground truth)."""
    root = tmp_path_factory.mktemp("calibrate-demo")
    corpus = generate_scene_corpus(root / "scenes", N_IMAGES, seed=0)
    config = demo_config(None, corpus, seed=0)
    run = RunDir(root / "run")
    steps = ("ingest", "embed", "neighbours", "mine")
    LocalRunner(run, config, progress=False).run_all(build_stages(config, steps, False))
    fixed_pairs = read_pairs(run)
    reset_stage(run, "mine")
    mine(run, demo_config(None, corpus, seed=0, overrides=AUTO))
    return run, fixed_pairs, read_pairs(run), read_attributes(corpus.attributes_path)


def test_auto_windows_share_the_pairs_and_mine_no_worse_pairs(demo_runs, capsys):
    run, fixed_pairs, auto_pairs, truth = demo_runs
    channels = ["image_semantic", "image_pattern", "caption"]
    corpus = read_corpus(run)
    fixed = attribute_agreement(fixed_pairs, corpus, truth)
    auto = attribute_agreement(auto_pairs, corpus, truth)
    fixed_shares = channel_shares(fixed_pairs, channels)
    auto_shares = channel_shares(auto_pairs, channels)
    windows = read_windows(run)
    with capsys.disabled():
        print(
            f"\nfixed windows: {fixed.pairs} pairs, attributes shared {fixed.mined_mean:.4f}, "
            f"channel shares {_fmt(fixed_shares)}\n"
            f"auto windows:  {auto.pairs} pairs, attributes shared {auto.mined_mean:.4f}, "
            f"channel shares {_fmt(auto_shares)}\n"
            "auto windows chosen: " + ", ".join(f"{c} {w['window']}" for c, w in windows.items())
        )
    assert all(share >= MIN_CHANNEL_SHARE for share in auto_shares.values()), auto_shares
    assert auto.mined_mean >= fixed.mined_mean
    assert all(windows[c]["rule"] == "auto" for c in channels)
    assert run.read_manifest()["windows"] == windows


def test_summary_marks_each_window_and_says_it_was_auto(demo_runs):
    run = demo_runs[0]
    text = format_summary(summarize_run(run, examples=0))
    for channel in ("image_semantic", "image_pattern", "caption"):
        assert f"score histogram, {channel}: window [" in text
    assert text.count("---- window low") == text.count("---- window high") == 3
    assert text.count(" auto: quantiles (0.75, 0.995) of ") == 3


def test_calibrate_on_the_demo_suggests_the_auto_windows(demo_runs, capsys):
    run = demo_runs[0]
    assert main(["calibrate", "--run", str(run.root)]) == 0  # the stored (auto) config
    out = capsys.readouterr().out
    for channel, entry in read_windows(run).items():
        data = json.loads((run.folder(neighbours_folder(channel)) / CALIBRATION_FILE).read_text())
        assert data["suggested"]["resolved"] == entry["window"]
        assert f"[{entry['window'][0]:.4f}, {entry['window'][1]:.4f}]   auto" in out


def _fmt(shares: dict[str, float]) -> str:
    return ", ".join(f"{c} {s:.1%}" for c, s in shares.items())
