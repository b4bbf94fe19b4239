"""The `score` stage (the quality gate): annotations/ + pairs/ -> scores/ + score_failures/.

Every instruction of every annotated pair is scored (`scorers.py`) against the target and
the pair's negatives: its mined hard negatives, then `score.random_negatives` corpus
records drawn from (run seed, pair id) alone (`negatives.py`). The rules (`rules.py`) give
its round-trip rank and margin, the text-only and image-only ranks and shortcut flags and
the hard negatives that score at least as high as the target (likely false negatives).
With `score.judge.enabled` a VLM also judges it (`judge.py`).

Nothing is lost: each instruction ends as one `scores/part-N.parquet` row (SCORES_SCHEMA,
in the annotations' order, then instruction order) or one `score_failures/part-N.parquet`
row (`SCORE_FAILURES_SCHEMA`) with a reason: `query_no_image_embedding`,
`target_no_image_embedding` (channels scorer: the image channel has no vector for it),
`query_image_unavailable`, `target_image_unavailable` (retriever scorers: the image cannot
be read). A negative without a vector or image is left out of `negatives` (counted as
`negatives_unavailable`). Counts per part: `pairs`, `instructions` (= `scored` +
`failed`), `failed_<reason>`, `rank_gt_1`, `text_shortcuts`, `image_shortcuts`,
`false_negatives` (instructions with at least one flagged hard negative),
`negatives_unavailable`; with the judge `judged`, `judge_yes`, `judge_no`,
`judge_repaired`, `judge_failed`, `judge_failed_<reason>`, `judge_failed_transient`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from megapairs.annotation.backends.base import AnnotatorBackend
from megapairs.annotation.backends.transport import register_endpoint_secrets
from megapairs.annotation.images import CorpusLookup
from megapairs.annotation.stage import OUTPUT_SETTINGS as ANNOTATE_SETTINGS
from megapairs.annotation.stage import STAGE_NAME as ANNOTATE_STAGE
from megapairs.config import PipelineConfig
from megapairs.corpus.store import read_corpus
from megapairs.embeddings import EMBED_OUTPUT_SETTINGS
from megapairs.pipeline.stage import PartProgress, StageBase
from megapairs.quality.judge import (
    JUDGE_SETTINGS,
    Judge,
    JudgeItem,
    Verdict,
    cache_key,
    item_key,
    judge_all,
    judge_cache,
)
from megapairs.quality.negatives import pair_negatives
from megapairs.quality.rules import Assessment, assess
from megapairs.quality.scorers import Scorer
from megapairs.runs import RunDir, read_table, write_table
from megapairs.schemas import (
    ANNOTATIONS_DIR,
    PAIRS_DIR,
    SCORE_FAILURES_DIR,
    SCORE_FAILURES_SCHEMA,
    SCORES_DIR,
    SCORES_SCHEMA,
)

STAGE_NAME = "score"
SCORE_SETTINGS = (
    "score.scorer",
    "score.model",
    "score.image_channel",
    "score.text_channel",
    "score.text_weight",
    "score.random_negatives",
    "score.device",
)
# what the score rows depend on besides their inputs: the scorer's and the judge's settings
# (export hashes these too when it reads the rows)
SCORE_ROW_SETTINGS = (*SCORE_SETTINGS, *JUDGE_SETTINGS)
# what changes the stage's output: its inputs' settings and the score rows' own
OUTPUT_SETTINGS = (*ANNOTATE_SETTINGS, *EMBED_OUTPUT_SETTINGS, *SCORE_ROW_SETTINGS)

JUDGE_COUNTS = (
    "judged",
    "judge_yes",
    "judge_no",
    "judge_repaired",
    "judge_failed",
    "judge_failed_transient",
)


@dataclass(frozen=True)
class Item:
    """One instruction of an annotated pair; `position` is its row in the part's order."""

    position: int
    pair_id: str
    query_id: int
    target_id: int
    index: int
    instruction: str


@dataclass
class PairWork:
    """One annotated pair's instructions and negatives (`hard` of them mined)."""

    pair_id: str
    query_id: int
    target_id: int
    items: list[Item]
    negatives: list[int] = field(default_factory=list)
    hard: int = 0


@dataclass
class ScoreWorker:
    """What a worker builds once: the scorer, the corpus ids, the judge's backend."""

    scorer: Scorer
    pool: np.ndarray  # sorted corpus ids, random negatives are drawn from
    judge: AnnotatorBackend | None = None
    lookup: CorpusLookup | None = None


@dataclass
class Scored:
    """One part's rows, failures (by position) and counts so far."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)


class ScoreStage(StageBase):
    """Score (and optionally judge) every instruction of every annotated pair."""

    name = STAGE_NAME
    config_sections = OUTPUT_SETTINGS

    def __init__(self, config: PipelineConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress

    def needs_actor(self) -> bool:
        """Every scorer loads a model (a text encoder or a retriever)."""
        return True

    def wants_gpu(self) -> bool:
        judge = self.config.score.judge
        local_judge = judge.enabled and judge.backend == "hf" and judge.endpoint.device != "cpu"
        return self.config.score.device != "cpu" or local_judge

    def plan(self, run: RunDir) -> list[str]:
        """The parts the annotate stage finished."""
        return run.done_parts(ANNOTATE_STAGE)

    def stale_parts(self, run: RunDir) -> list[str]:
        """Finished parts with transient judge failures: a re-run asks those again."""
        if not self.config.score.judge.enabled:
            return []
        counts = run.part_counts(STAGE_NAME)
        return [p for p, c in sorted(counts.items()) if c.get("judge_failed_transient", 0) > 0]

    def prepare(self, run: RunDir) -> None:
        """Register the judge's key and URL passwords so nothing printed shows them."""
        register_endpoint_secrets(self.config.score.judge.endpoint)

    def problems(self, counts: dict[str, dict[str, Any]]) -> list[str]:
        """Parts where the judge server refused every instruction: a setting is wrong."""
        return [
            f"score {part}: the judge refused all {c['scored']} instructions (client_error); "
            f"check score.judge.endpoint (the scores rows' judge_reason says more)"
            for part, c in sorted(counts.items())
            if c.get("scored", 0) > 0 and c.get("judge_failed_client_error", 0) == c["scored"]
        ]

    def setup(self, run: RunDir) -> ScoreWorker:
        """Build the scorer, read the corpus ids and, with the judge, its checked backend."""
        from megapairs.quality.judge import build_judge_backend
        from megapairs.quality.scorers import build_channels_scorer, build_retriever_scorer

        score = self.config.score
        lookup = None
        if score.scorer != "channels" or score.judge.enabled:
            lookup = CorpusLookup(run, score.judge.image_max_side)
        scorer: Scorer
        if score.scorer == "channels":
            scorer = build_channels_scorer(run, self.config)
        else:
            scorer = build_retriever_scorer(run, self.config, lookup)
        pool = np.sort(read_corpus(run, columns=["id"])["id"].to_numpy())
        judge = build_judge_backend(score.judge) if score.judge.enabled else None
        return ScoreWorker(scorer, pool, judge, lookup)

    def run_part(
        self, run: RunDir, part: str, state: ScoreWorker, progress: PartProgress
    ) -> dict[str, int]:
        pairs = self.pair_works(run, part, state.pool)
        total = sum(len(p.items) for p in pairs)
        units = total * (2 if state.judge is not None else 1)
        scored = Scored()
        state.scorer.start_part()
        with one_torch_thread():
            for chunk in chunks(pairs, self.config.score.batch_size):
                score_chunk(state.scorer, chunk, scored)
                progress(len(scored.rows) + len(scored.failures), units)
        if state.judge is not None:
            self.judge_rows(run, part, state, scored, lambda done: progress(total + done, units))
        write_table(run.part_path(SCORES_DIR, part), rows_table(scored.rows, SCORES_SCHEMA))
        failures = rows_table(scored.failures, SCORE_FAILURES_SCHEMA)
        write_table(run.part_path(SCORE_FAILURES_DIR, part), failures)
        return part_counts(pairs, scored)

    def pair_works(self, run: RunDir, part: str, pool: np.ndarray) -> list[PairWork]:
        """The part's annotated pairs with their instructions (in the annotations' order)
        and negatives."""
        columns = ["pair_id", "query_id", "target_id", "instructions"]
        annotations = read_table(run.part_path(ANNOTATIONS_DIR, part), columns).to_pylist()
        hard = hard_negatives(run, part)
        score, works, position = self.config.score, [], 0
        for row in annotations:
            pair, query, target = row["pair_id"], row["query_id"], row["target_id"]
            texts = row["instructions"] or []
            items = [
                Item(position + i, pair, query, target, i, text) for i, text in enumerate(texts)
            ]
            position += len(items)
            drawn = (pool, score.random_negatives, self.config.seed, pair, query, target)
            negatives, count = pair_negatives(hard.get(pair) or [], *drawn)
            works.append(PairWork(pair, query, target, items, negatives, count))
        return works

    def judge_rows(
        self,
        run: RunDir,
        part: str,
        state: ScoreWorker,
        scored: Scored,
        progress: Callable[[int], None],
    ) -> None:
        """Ask the judge about every scored row; its verdicts go into the rows."""
        assert state.judge is not None and state.lookup is not None
        model = state.judge.model_name("describer")
        judge_config = self.config.score.judge
        cache = judge_cache(run, part, cache_key(self.config, model), judge_config.flush_every)
        judge = Judge(state.judge, state.lookup, cache, self.config.seed, judge_config.concurrency)
        for key in JUDGE_COUNTS:
            scored.counts[key] += 0  # present even when zero
        positions = sorted(scored.rows)
        items = [judge_item(scored.rows[p]) for p in positions]
        done = [0]

        def one_done() -> None:
            done[0] += 1
            progress(done[0] + len(scored.failures))

        verdicts = asyncio.run(judge_all(judge, items, one_done))
        for position, verdict in zip(positions, verdicts, strict=True):
            apply_verdict(scored.rows[position], verdict, model, scored.counts)
        if cache.quarantined:
            scored.counts["quarantined_cache_chunks"] += cache.quarantined


def hard_negatives(run: RunDir, part: str) -> dict[str, list[int]]:
    """Pair id -> its mined hard negatives, from the part's pairs table."""
    mined = read_table(run.part_path(PAIRS_DIR, part), ["pair_id", "hard_negative_ids"])
    ids, negatives = mined["pair_id"].to_pylist(), mined["hard_negative_ids"].to_pylist()
    return dict(zip(ids, negatives, strict=True))


def chunks(pairs: list[PairWork], size: int) -> list[list[PairWork]]:
    """Pairs grouped by query (shared images and negatives), packed into chunks of about
    `size` instructions (a pair is never split)."""
    ordered = sorted(pairs, key=lambda p: p.query_id)
    out: list[list[PairWork]] = [[]]
    held = 0
    for pair in ordered:
        if out[-1] and held + len(pair.items) > size:
            out.append([])
            held = 0
        out[-1].append(pair)
        held += len(pair.items)
    return [chunk for chunk in out if chunk]


def score_chunk(scorer: Scorer, pairs: list[PairWork], scored: Scored) -> None:
    """Score every instruction of `pairs` into `scored`."""
    items = [item for pair in pairs for item in pair.items]
    if not items:
        return
    ids = list(dict.fromkeys(i for p in pairs for i in (p.target_id, *p.negatives)))
    candidates = scorer.candidates(ids)
    row_of = {record: row for row, record in enumerate(ids)}
    composed = scorer.composed([i.query_id for i in items], [i.instruction for i in items])
    texts = scorer.text_only([i.instruction for i in items])
    queries = list(dict.fromkeys(p.query_id for p in pairs))
    images = scorer.image_only(queries)
    query_row = {record: row for row, record in enumerate(queries)}
    missing = {**candidates.missing, **images.missing, **composed.missing}
    at = 0
    for pair in pairs:
        negatives = [n for n in pair.negatives if n not in candidates.missing]
        hard = sum(1 for n in pair.negatives[: pair.hard] if n not in candidates.missing)
        scored.counts["negatives_unavailable"] += len(pair.negatives) - len(negatives)
        matrix = candidates.vectors[[row_of[r] for r in (pair.target_id, *negatives)]]
        image_scores = matrix @ images.vectors[query_row[pair.query_id]]
        for item in pair.items:
            failure = item_failure(item, missing, scorer.name)
            if failure is not None:
                scored.failures[item.position] = failure
            else:
                found = assess(
                    matrix @ composed.vectors[at], matrix @ texts[at], image_scores, negatives, hard
                )
                scored.rows[item.position] = score_row(item, scorer.name, negatives, found)
            at += 1


def item_failure(item: Item, missing: dict[int, str], scorer: str) -> dict[str, Any] | None:
    """The failure row of an instruction whose query or target has no vector, else None."""
    for role, record in (("query", item.query_id), ("target", item.target_id)):
        if record in missing:
            return {
                **item_columns(item),
                "scorer": scorer,
                "reason": f"{role}_{missing[record]}",
                "detail": f"the {role} record {record} has no vector ({missing[record]})",
            }
    return None


def item_columns(item: Item) -> dict[str, Any]:
    return {
        "pair_id": item.pair_id,
        "query_id": item.query_id,
        "target_id": item.target_id,
        "instruction_index": item.index,
        "instruction": item.instruction,
    }


def score_row(item: Item, scorer: str, negatives: list[int], found: Assessment) -> dict[str, Any]:
    return {
        **item_columns(item),
        "scorer": scorer,
        "negatives": negatives,
        "target_score": found.target_score,
        "rank": found.rank,
        "margin": found.margin,
        "text_only_rank": found.text_only_rank,
        "image_only_rank": found.image_only_rank,
        "text_shortcut": found.text_shortcut,
        "image_shortcut": found.image_shortcut,
        "false_negative_ids": found.false_negative_ids,
        "judge_verdict": None,
        "judge_reason": None,
        "judge_model": None,
    }


def judge_item(row: dict[str, Any]) -> JudgeItem:
    key = item_key(row["pair_id"], row["instruction_index"], row["instruction"])
    return JudgeItem(key, row["query_id"], row["target_id"], row["instruction"])


def apply_verdict(row: dict[str, Any], verdict: Verdict, model: str, counts: Counter[str]) -> None:
    """Put the judge's verdict into a scores row and count it."""
    row.update(judge_verdict=verdict.verdict, judge_reason=verdict.reason, judge_model=model)
    if verdict.verdict is None:
        counts["judge_failed"] += 1
        counts[f"judge_failed_{verdict.failure}"] += 1
        counts["judge_failed_transient"] += int(verdict.transient)
        return
    counts["judged"] += 1
    counts[f"judge_{verdict.verdict}"] += 1
    counts["judge_repaired"] += int(verdict.repaired)


def rows_table(rows: dict[int, dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([rows[p] for p in sorted(rows)], schema=schema)


def part_counts(pairs: list[PairWork], scored: Scored) -> dict[str, int]:
    """The part's counts (module docstring)."""
    rows = scored.rows.values()
    reasons = Counter(f["reason"] for f in scored.failures.values())
    counts = {
        "pairs": len(pairs),
        "instructions": sum(len(p.items) for p in pairs),
        "scored": len(scored.rows),
        "failed": len(scored.failures),
        "rank_gt_1": sum(1 for r in rows if r["rank"] > 1),
        "text_shortcuts": sum(1 for r in rows if r["text_shortcut"]),
        "image_shortcuts": sum(1 for r in rows if r["image_shortcut"]),
        "false_negatives": sum(1 for r in rows if r["false_negative_ids"]),
        **{f"failed_{reason}": n for reason, n in sorted(reasons.items())},
    }
    counts.update(sorted(scored.counts.items()))
    return counts


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Encode with one torch intra-op thread: with more, CPU kernels add in another order
    and scores move in the last bits, so a part would score differently in a Ray actor
    (one CPU) than in a process with several; with one, every runner gives one table."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
