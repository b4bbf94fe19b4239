"""Score rows and neighbour lists for the fixture run (tests/run_fixtures.py), written as the
score and neighbours stages would, so export's quality gate runs on exactly known values."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from run_fixtures import INSTRUCTIONS, PAIRS, FixtureRun

from megapairs.config import PipelineConfig
from megapairs.runs import write_table
from megapairs.schemas import NEIGHBOURS_SCHEMA, PART_STRIDE, SCORES_DIR, SCORES_SCHEMA

S = PART_STRIDE
# (rank, margin, text shortcut, image shortcut, false negatives, judge verdict); None: the
# score stage failed on that instruction (no row)
Score = tuple[int, float, bool, bool, list[int], str | None]
SCORES: dict[str, list[Score | None]] = {
    "0-1": [
        (1, 0.2, False, False, [], "yes"),
        (2, 0.0, False, False, [S], "yes"),  # at both thresholds: kept
        (3, -0.05, False, False, [2], "no"),  # max_rank (first failing rule)
    ],
    f"0-{S + 1}": [  # every instruction fails: rejected as gate:max_rank (3 of 4)
        (5, -0.3, False, False, [], "no"),
        (4, -0.2, False, False, [], "no"),
        (1, 0.1, True, False, [], "yes"),
        (3, -0.1, False, False, [], "no"),
    ],
    "2-3": [
        (1, 0.3, False, True, [0], "yes"),  # image shortcut: kept with drop_shortcuts=text
        None,  # unscored
        (2, 0.05, False, False, [S + 3], None),
    ],
    f"{S}-{S + 1}": [
        (1, 0.3, False, True, [], "yes"),
        (1, -0.1, False, False, [3], "yes"),  # min_margin; its false negative is ignored
        (2, 0.0, False, False, [], None),
        (1, 0.5, True, False, [], "yes"),  # text shortcut
        (3, 0.2, False, False, [], "yes"),  # max_rank
    ],
    f"{S + 3}-{S + 2}": [
        (1, 0.4, False, False, [], "yes"),
        (1, 0.2, False, False, [0], "yes"),
        (1, 0.1, False, False, [], "yes"),
    ],
}
WINDOW = (0.8, 0.96)
NAN = float("nan")
# part -> channel -> query -> (neighbour ids, scores), descending as FAISS gives them
NEIGHBOURS: dict[str, dict[str, dict[int, tuple[list[int], list[float]]]]] = {
    "part-00000": {
        "image": {
            0: (
                [1, S + 1, 3, S, 2, 0, 4, S + 3, -1],
                [0.9, 0.85, 0.97, 0.7, 0.6, 0.6, 0.5, 0.5, NAN],
            ),
            2: ([2, 3, 0, S + 3, S + 1], [0.99, 0.9, 0.5, 0.4, 0.3]),
        },
        "caption": {
            0: ([S + 3, 1], [0.55, 0.5]),
            2: ([S + 1], [0.85]),  # in window here: never a top-up for query 2
        },
    },
    "part-00001": {
        "image": {
            S: ([S + 1, 4], [0.9, 0.1]),
            S + 3: ([S + 2, S + 3, 0, 1, 1, 2], [0.5, 0.99, 0.45, 0.4, 0.3, 0.2]),
        },
        "caption": {S: ([S + 1], [0.82])},
    },
}
GATE_RULES = {
    "max_rank": 2,
    "min_margin": 0.0,
    "drop_shortcuts": "text",
    "drop_false_negatives": True,
}


def gate_config(**rules: Any) -> PipelineConfig:
    """The fixture's config with two channels, 2 hard negatives per pair and `rules` as
    export.filter (a pair is kept with one instruction left, unless `rules` say)."""
    rules = {"min_instructions": 1, **rules}
    channels = {name: {"encoder": "test", "window": WINDOW} for name in ("image", "caption")}
    return PipelineConfig.model_validate(
        {
            "seed": 7,
            "channels": channels,
            "mine": {"num_hard_negatives": 2},
            "export": {"filter": rules},
        }
    )


def score_rows(part: str) -> list[dict[str, Any]]:
    """SCORES_SCHEMA rows of the part's annotated pairs, from SCORES."""
    rows = []
    for query, target, _, _, negatives in PAIRS[part]:
        pair = f"{query}-{target}"
        for index, score in enumerate(SCORES.get(pair, [])):
            if score is not None:
                rows.append(_score_row(pair, query, target, negatives, index, score))
    return rows


def _score_row(
    pair: str, query: int, target: int, negatives: list[int], index: int, score: Score
) -> dict[str, Any]:
    rank, margin, text, image, false_negatives, verdict = score
    return {
        "pair_id": pair,
        "query_id": query,
        "target_id": target,
        "instruction_index": index,
        "instruction": INSTRUCTIONS[pair][index],
        "scorer": "channels:image+caption",
        "negatives": negatives,
        "target_score": 0.5 + margin,
        "rank": rank,
        "margin": margin,
        "text_only_rank": 1 if text else 4,
        "image_only_rank": 1 if image else 3,
        "text_shortcut": text,
        "image_shortcut": image,
        "false_negative_ids": false_negatives,
        "judge_verdict": verdict,
        "judge_reason": None if verdict is None else f"judged {verdict}",
        "judge_model": None if verdict is None else "judge-vlm",
    }


def write_scores(fixture: FixtureRun) -> None:
    """scores/part-N.parquet of every part and the score stage's markers."""
    for part in fixture.parts:
        table = pa.Table.from_pylist(score_rows(part), SCORES_SCHEMA)
        write_table(fixture.run.part_path(SCORES_DIR, part), table)
        fixture.run.mark_done("score", part, {"instructions": table.num_rows})


def write_neighbours(fixture: FixtureRun) -> None:
    """neighbours/<channel>/part-N.parquet of the fixture's queries and their markers."""
    for part, channels in NEIGHBOURS.items():
        for channel, lists in channels.items():
            rows = [{"id": q, "neighbour_ids": i, "scores": s} for q, (i, s) in lists.items()]
            path = fixture.run.part_path(f"neighbours/{channel}", part)
            write_table(path, pa.Table.from_pylist(rows, NEIGHBOURS_SCHEMA))
            fixture.run.mark_done(f"neighbours.{channel}", part, {"queries": len(rows)})
