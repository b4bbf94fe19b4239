"""The score stage on the annotated fixture run: every instruction scored or failed with a
reason, the channels scorer's exact scores and ranks recomputed independently, counts that
add up, the same tables in any part order, and the CLIP retriever scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_fixtures import INSTRUCTIONS, PAIRS, RECORDS, FixtureRun
from score_fixtures import (
    build_score_run,
    caption_vectors,
    image_vectors,
    run_score,
    score_config,
    score_failures,
    scores,
)
from tiny_models import Tiny

from megapairs.config import ChannelConfig, PipelineConfig
from megapairs.embeddings import l2_normalise
from megapairs.encoders.factory import build_encoder
from megapairs.runs import read_table
from megapairs.schemas import ANNOTATIONS_DIR, PART_STRIDE

HARD = {f"{q}-{t}": hard for part in PAIRS.values() for q, t, _, _, hard in part}
INSTRUCTION_COUNT = sum(len(v) for v in INSTRUCTIONS.values())


@pytest.fixture
def fixture(tmp_path: Path, tiny_clip: Tiny) -> FixtureRun:
    return build_score_run(tmp_path, tiny_clip.path)


def stored(vectors: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The vectors as the embed stage stores them (unit rows, float16), read back as float32."""
    ids = sorted(vectors)
    rows = l2_normalise(np.stack([vectors[i] for i in ids])).astype(np.float16)
    return dict(zip(ids, rows.astype(np.float32), strict=True))


def expected_order(fixture: FixtureRun) -> list[tuple[str, int]]:
    """(pair id, instruction index) in the annotations' order, then instruction order."""
    order = []
    for part in fixture.parts:
        table = read_table(fixture.run.part_path(ANNOTATIONS_DIR, part))
        pairs, texts = table["pair_id"].to_pylist(), table["instructions"].to_pylist()
        order += [
            (pair, i) for pair, got in zip(pairs, texts, strict=True) for i in range(len(got))
        ]
    return order


def test_every_instruction_gets_a_row_in_the_annotations_order(
    fixture: FixtureRun, tiny_clip: Tiny
) -> None:
    config = score_config(tiny_clip.path)
    result = run_score(fixture.run, config)
    table = scores(fixture.run)
    assert table.num_rows == INSTRUCTION_COUNT and score_failures(fixture.run).num_rows == 0
    got = list(
        zip(table["pair_id"].to_pylist(), table["instruction_index"].to_pylist(), strict=True)
    )
    assert got == expected_order(fixture)
    for row in table.to_pylist():
        assert row["instruction"] == INSTRUCTIONS[row["pair_id"]][row["instruction_index"]]
        assert row["scorer"] == "channels:image+caption"
        assert row["judge_verdict"] is None and row["judge_model"] is None
    assert result.counts["instructions"] == result.counts["scored"] == INSTRUCTION_COUNT
    assert result.counts["pairs"] == len(INSTRUCTIONS)


def check_negatives(row: dict[str, Any], random_count: int) -> None:
    hard = HARD[row["pair_id"]]
    negatives = row["negatives"]
    assert negatives[: len(hard)] == hard
    randoms = negatives[len(hard) :]
    eligible = set(RECORDS) - {row["query_id"], row["target_id"], *hard}
    assert len(randoms) == min(random_count, len(eligible)) == len(set(randoms))
    assert set(randoms) <= eligible


def test_channels_scores_ranks_and_flags_match_an_independent_computation(
    tmp_path: Path, tiny_clip: Tiny
) -> None:
    fixture = build_score_run(tmp_path, tiny_clip.path)
    weight = 0.3
    run_score(fixture.run, score_config(tiny_clip.path, text_weight=weight))
    images, captions = stored(image_vectors()), stored(caption_vectors(tiny_clip.path))
    encoder = build_encoder(ChannelConfig(encoder="clip-text", model=str(tiny_clip.path)), "cpu")
    blank = np.zeros(len(next(iter(captions.values()))), np.float32)
    for row in scores(fixture.run).to_pylist():
        check_negatives(row, 3)
        text = encoder.encode_texts([row["instruction"]])[0]
        ids = [row["target_id"], *row["negatives"]]
        image_sim = np.array([images[row["query_id"]] @ images[c] for c in ids])
        text_sim = np.array([text @ captions.get(c, blank) for c in ids])
        composed = (1 - weight) * image_sim + weight * text_sim
        assert row["target_score"] == pytest.approx(composed[0], abs=1e-5)
        assert row["rank"] == 1 + int(np.sum(composed[1:] >= composed[0] - 1e-6))
        assert row["margin"] == pytest.approx(composed[0] - composed[1:].max(), abs=1e-5)
        assert row["text_only_rank"] == 1 + int(np.sum(text_sim[1:] >= text_sim[0] - 1e-6))
        assert row["image_only_rank"] == 1 + int(np.sum(image_sim[1:] >= image_sim[0] - 1e-6))
        assert row["text_shortcut"] == (row["text_only_rank"] == 1)
        assert row["image_shortcut"] == (row["image_only_rank"] == 1)
        hard = HARD[row["pair_id"]]
        hard_scores = composed[1 : len(hard) + 1]
        flagged = [h for h, s in zip(hard, hard_scores, strict=True) if s >= composed[0] - 1e-6]
        assert row["false_negative_ids"] == flagged


def test_a_hard_negative_identical_to_the_target_ties_against_it(
    tmp_path: Path, tiny_clip: Tiny
) -> None:
    """Records 0, 1, 2 share an image vector: pair 0-1's hard negative 2 ties its target."""
    fixture = build_score_run(tmp_path, tiny_clip.path)
    run_score(fixture.run, score_config(tiny_clip.path, text_weight=0.0))
    rows = [r for r in scores(fixture.run).to_pylist() if r["pair_id"] == "0-1"]
    assert len(rows) == len(INSTRUCTIONS["0-1"])
    for row in rows:
        assert row["target_score"] == pytest.approx(1.0, abs=1e-3)
        assert (row["rank"], row["margin"]) == (2, 0.0)
        assert row["false_negative_ids"] == [2]
        assert (row["image_only_rank"], row["image_shortcut"]) == (2, False)


def test_counts_add_up_and_match_the_tables(fixture: FixtureRun, tiny_clip: Tiny) -> None:
    result = run_score(fixture.run, score_config(tiny_clip.path))
    rows = scores(fixture.run).to_pylist()
    counts = result.counts
    assert counts["instructions"] == counts["scored"] + counts["failed"] == INSTRUCTION_COUNT
    assert counts["rank_gt_1"] == sum(r["rank"] > 1 for r in rows)
    assert counts["text_shortcuts"] == sum(r["text_shortcut"] for r in rows)
    assert counts["image_shortcuts"] == sum(r["image_shortcut"] for r in rows)
    assert counts["false_negatives"] == sum(bool(r["false_negative_ids"]) for r in rows)
    assert counts["negatives_unavailable"] == 0


def test_the_same_tables_in_any_part_order_and_on_a_rerun(tmp_path: Path, tiny_clip: Tiny) -> None:
    config = score_config(tiny_clip.path, text_weight=0.4)
    forward = build_score_run(tmp_path / "forward", tiny_clip.path)
    backward = build_score_run(tmp_path / "backward", tiny_clip.path)
    run_score(forward.run, config)
    run_score(backward.run, config, order=lambda parts: parts[::-1])
    assert scores(forward.run).equals(scores(backward.run))
    again = run_score(forward.run, config)
    assert again.computed == 0 and scores(forward.run).equals(scores(backward.run))


def test_a_record_without_an_image_vector_fails_its_instructions_with_a_reason(
    tmp_path: Path, tiny_clip: Tiny
) -> None:
    """Record 3 (target of pair 2-3, hard negative of another) left out of the image channel."""
    fixture = build_score_run(tmp_path, tiny_clip.path, no_image={3})
    result = run_score(fixture.run, score_config(tiny_clip.path))
    failures = score_failures(fixture.run).to_pylist()
    assert [(f["pair_id"], f["instruction_index"]) for f in failures] == [
        ("2-3", i) for i in range(3)
    ]
    assert {f["reason"] for f in failures} == {"target_no_image_embedding"}
    rows = scores(fixture.run).to_pylist()
    assert len(rows) + len(failures) == INSTRUCTION_COUNT
    assert all(3 not in r["negatives"] for r in rows)
    counts = result.counts
    assert counts["failed"] == counts["failed_target_no_image_embedding"] == 3
    assert counts["negatives_unavailable"] >= 1  # hard negative of pair 1000000-1000001


def test_the_channels_scorer_needs_a_caption_channel(fixture: FixtureRun, tiny_clip: Tiny) -> None:
    config = PipelineConfig.model_validate(
        {"seed": 7, "channels": {"image": {"encoder": "efficientnet-lite0"}}}
    )
    with pytest.raises(ValueError, match="needs an enabled text channel"):
        run_score(fixture.run, config)
    wrong = score_config(tiny_clip.path, image_channel="caption")
    with pytest.raises(ValueError, match="is not an image channel"):
        run_score(fixture.run, wrong)


# the CLIP retriever scorer -----------------------------------------------------------------
def test_the_clip_retriever_scores_with_eval_encodings_and_reports_lost_images(
    fixture: FixtureRun, tiny_clip: Tiny
) -> None:
    from megapairs.annotation.images import CorpusLookup
    from megapairs.corpus.images import open_rgb
    from megapairs.models.base import build_retriever

    source = fixture.source_path(1)
    assert source is not None
    source.unlink()  # pair 0-1's target, a hard negative of pair 0-1000001
    config = score_config(tiny_clip.path, scorer="clip", model=str(tiny_clip.path), batch_size=3)
    result = run_score(fixture.run, config)
    failures = score_failures(fixture.run).to_pylist()
    assert {(f["pair_id"], f["reason"]) for f in failures} == {("0-1", "target_image_unavailable")}
    rows = scores(fixture.run).to_pylist()
    assert len(rows) + len(failures) == INSTRUCTION_COUNT == result.counts["instructions"]
    assert all(1 not in r["negatives"] for r in rows)
    retriever = build_retriever("clip", str(tiny_clip.path), device="cpu", dtype="float32")
    lookup = CorpusLookup(fixture.run, 512)
    row = rows[0]
    assert row["scorer"] == retriever.name
    query = open_rgb(lookup.image_bytes(row["query_id"]))
    target = open_rgb(lookup.image_bytes(row["target_id"]))
    composed = retriever.encode_queries([query], [row["instruction"]])[0]
    candidate = retriever.encode_candidates([target], None)[0]
    assert row["target_score"] == pytest.approx(float(composed @ candidate), abs=1e-5)
    assert PART_STRIDE + 1 in {r["target_id"] for r in rows}
