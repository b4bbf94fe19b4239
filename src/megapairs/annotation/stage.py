"""The `annotate` stage: pairs/part-N.parquet -> annotations/ + annotation_failures/.

Every pair of a part ends in exactly one of the two tables (pairs = annotated +
failed). Model answers are cached per part as they arrive (`AnswerCache`), so a
killed run resumes where it stopped. When `annotate.retry_failed` is on, a re-run
re-opens finished parts whose failures were transient (server errors, timeouts,
rate limits) and retries just those pairs; cached answers are not sent again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from megapairs.annotation.backends.base import AnnotatorBackend
from megapairs.annotation.cache import AnswerCache, CacheKey
from megapairs.annotation.flow import Annotator, Outcomes, PairJob, annotate_all
from megapairs.annotation.images import CorpusLookup
from megapairs.annotation.prompts import PromptSet, load_prompts
from megapairs.config import PipelineConfig
from megapairs.mining.stage import STAGE_NAME as MINE_STAGE
from megapairs.runs import RunDir, read_table, write_table
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    PAIRS_DIR,
)

STAGE_NAME = "annotate"

# Settings that change what the stage writes (transport settings such as the server URL,
# timeouts, concurrency and retries do not).
OUTPUT_SETTINGS = (
    "seed",
    "channels",
    "neighbours",
    "mine",
    "annotate.backend",
    "annotate.prompts",
    "annotate.word_range",
    "annotate.num_demonstrations",
    "annotate.min_instructions",
    "annotate.max_instructions",
    "annotate.instruction_words",
    "annotate.image_max_side",
    *(
        f"annotate.{role}.{name}"
        for role in ("describer", "instructor")
        for name in ("model", "temperature", "top_p", "max_tokens", "extra_body")
    ),
)


class AnnotateStage:
    """Describe -> instruct for every mined pair of a part."""

    name = STAGE_NAME
    config_sections = OUTPUT_SETTINGS

    def __init__(self, config: PipelineConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self._backend: AnnotatorBackend | None = None
        self._prompts: PromptSet | None = None
        self._lookup: CorpusLookup | None = None

    def plan(self, run: RunDir) -> list[str]:
        """The parts the mine stage finished."""
        return run.done_parts(MINE_STAGE)

    def stale_parts(self, run: RunDir) -> list[str]:
        """Finished parts with transient failures, which a re-run retries (retry_failed)."""
        if not self.config.annotate.retry_failed:
            return []
        return [p for p in run.done_parts(STAGE_NAME) if transient_failures(run, p) > 0]

    def prepare(self, run: RunDir) -> None:
        """Load prompts, the backend (models stay loaded across parts) and the corpus lookup."""
        from megapairs.annotation.backends.factory import build_backend

        if self._prompts is None:
            self._prompts = load_prompts(self.config.annotate.prompts or None)
            pool, drawn = len(self._prompts.demonstrations), self.config.annotate.num_demonstrations
            if drawn > pool:
                raise ValueError(
                    f"annotate.num_demonstrations is {drawn}, but the prompts "
                    f"{self._prompts.version} hold only {pool} demonstrations"
                )
        if self._backend is None:
            backend = build_backend(self.config.annotate)
            backend.check_ready()
            self._backend = backend
        if self._lookup is None:
            self._lookup = CorpusLookup(run, self.config.annotate.image_max_side)

    def run_part(self, run: RunDir, part: str) -> dict[str, int]:
        self.prepare(run)
        assert self._backend and self._prompts and self._lookup
        pairs = read_table(run.part_path(PAIRS_DIR, part))
        jobs = self._jobs(pairs, self._lookup)
        annotator = Annotator(
            self._backend,
            self._prompts,
            self.config.annotate,
            self.config.seed,
            AnswerCache(run, part, self._cache_key(), self.config.annotate.flush_every),
            self._lookup,
        )
        bar = tqdm(
            total=len(jobs),
            desc=f"annotate {part}",
            unit="pair",
            leave=False,
            disable=not self.progress,
        )
        with bar:
            outcomes = asyncio.run(annotate_all(annotator, jobs, lambda: bar.update(1)))
        annotations, failures = outcome_tables(outcomes)
        write_table(run.part_path(ANNOTATIONS_DIR, part), annotations)
        write_table(run.part_path(ANNOTATION_FAILURES_DIR, part), failures)
        return part_counts(len(jobs), annotations, failures, annotator.counts)

    def _cache_key(self) -> CacheKey:
        assert self._backend and self._prompts
        return CacheKey(
            self._prompts.version,
            self._backend.model_name("describer"),
            self._backend.model_name("instructor"),
            self.config.seed,
            self.config.section_hash(*OUTPUT_SETTINGS),
        )

    @staticmethod
    def _jobs(pairs: pa.Table, lookup: CorpusLookup) -> list[PairJob]:
        return [
            PairJob(pair_id, q, t, lookup.caption(q), lookup.caption(t))
            for pair_id, q, t in zip(
                pairs["pair_id"].to_pylist(),
                pairs["query_id"].to_pylist(),
                pairs["target_id"].to_pylist(),
                strict=True,
            )
        ]


def outcome_tables(outcomes: Outcomes) -> tuple[pa.Table, pa.Table]:
    """The annotation and failure tables, each in the pairs' order."""
    annotated = [outcomes.annotated[p] for p in sorted(outcomes.annotated)]
    failed = [outcomes.failed[p] for p in sorted(outcomes.failed)]
    return (
        pa.Table.from_pylist(annotated, schema=ANNOTATIONS_SCHEMA),
        pa.Table.from_pylist(failed, schema=ANNOTATION_FAILURES_SCHEMA),
    )


def part_counts(
    pairs: int, annotations: pa.Table, failures: pa.Table, counted: Counter[str]
) -> dict[str, int]:
    """Pairs in, annotated, failed (by reason), instructions and requests of one part."""
    reasons = Counter(failures["reason"].to_pylist())
    instructions = pc.sum(pc.list_value_length(annotations["instructions"])).as_py() or 0
    counts: dict[str, Any] = {
        "pairs": pairs,
        "annotated": annotations.num_rows,
        "failed": failures.num_rows,
        "failed_transient": int(pc.sum(failures["transient"]).as_py() or 0),
        "repaired": int(pc.sum(annotations["repaired"]).as_py() or 0),
        "instructions": int(instructions),
        "answers": counted["answers"],  # model answers used (fresh or from the cache)
        "http_attempts": counted["http_attempts"],  # requests those answers took
    }
    counts.update({f"failed_{reason}": n for reason, n in sorted(reasons.items())})
    return counts


def transient_failures(run: RunDir, part: str) -> int:
    """How many of a finished part's failures a re-run may retry."""
    path = run.part_path(ANNOTATION_FAILURES_DIR, part)
    if not path.exists():
        return 0
    return int(pc.sum(read_table(path, ["transient"])["transient"]).as_py() or 0)
