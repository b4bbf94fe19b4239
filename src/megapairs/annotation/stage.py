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
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from megapairs.annotation.backends.base import ROLES, AnnotatorBackend
from megapairs.annotation.backends.transport import register_endpoint_secrets
from megapairs.annotation.cache import AnswerCache, CacheKey
from megapairs.annotation.flow import Annotator, Outcomes, PairJob, annotate_all
from megapairs.annotation.images import CorpusLookup
from megapairs.annotation.prompts import PromptSet, load_prompts
from megapairs.config import PipelineConfig
from megapairs.mining.stage import STAGE_NAME as MINE_STAGE
from megapairs.pipeline.stage import PartProgress, StageBase
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
    "annotate.describer.backend",
    "annotate.instructor.backend",
    "annotate.prompts",
    "annotate.word_range",
    "annotate.num_demonstrations",
    "annotate.min_instructions",
    "annotate.max_instructions",
    "annotate.instruction_words",
    "annotate.image_max_side",
    "annotate.copy_threshold",
    "annotate.grounding",
    *(
        f"annotate.{role}.{name}"
        for role in ("describer", "instructor")
        for name in ("model", "temperature", "top_p", "max_tokens", "extra_body")
    ),
)


@dataclass
class AnnotateWorker:
    """What a worker builds once: the backend (models stay loaded), prompts, corpus lookup."""

    backend: AnnotatorBackend
    prompts: PromptSet
    lookup: CorpusLookup


class AnnotateStage(StageBase):
    """Describe -> instruct for every mined pair of a part."""

    name = STAGE_NAME
    config_sections = OUTPUT_SETTINGS

    def __init__(self, config: PipelineConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress

    def needs_actor(self) -> bool:
        """Local models (`hf`) are costly to load: keep them in long-lived workers."""
        return bool(self._local_roles())

    def wants_gpu(self) -> bool:
        annotate = self.config.annotate
        return any(getattr(annotate, role).device != "cpu" for role in self._local_roles())

    def _local_roles(self) -> list[str]:
        annotate = self.config.annotate
        return [role for role in ROLES if annotate.backend_for(role) == "hf"]

    def plan(self, run: RunDir) -> list[str]:
        """The parts the mine stage finished."""
        return run.done_parts(MINE_STAGE)

    def stale_parts(self, run: RunDir) -> list[str]:
        """Finished parts with transient failures, which a re-run retries (retry_failed)."""
        if not self.config.annotate.retry_failed:
            return []
        return [p for p in run.done_parts(STAGE_NAME) if transient_failures(run, p) > 0]

    def prepare(self, run: RunDir) -> None:
        """Check the prompts on the driver, before any part is sent anywhere, and register
        the API keys so that nothing the driver prints shows them."""
        self._prompts()
        for role in ROLES:
            register_endpoint_secrets(getattr(self.config.annotate, role))

    def problems(self, counts: dict[str, dict[str, Any]]) -> list[str]:
        """Parts whose every pair failed with a client error: a setting is wrong."""
        return [
            f"annotate {part}: all {c['pairs']} pairs failed with client_error (the server "
            f"refused every request; see {ANNOTATION_FAILURES_DIR}/{part}.parquet, column detail)"
            for part, c in sorted(counts.items())
            if c.get("pairs", 0) > 0 and c.get("failed_client_error", 0) == c["pairs"]
        ]

    def _prompts(self) -> PromptSet:
        prompts = load_prompts(self.config.annotate.prompts or None)
        pool, drawn = len(prompts.demonstrations), self.config.annotate.num_demonstrations
        if drawn > pool:
            raise ValueError(
                f"annotate.num_demonstrations is {drawn}, but the prompts "
                f"{prompts.version} hold only {pool} demonstrations"
            )
        return prompts

    def setup(self, run: RunDir) -> AnnotateWorker:
        """Load prompts, the backend (checked ready) and the corpus lookup."""
        from megapairs.annotation.backends.factory import build_backend

        backend = build_backend(self.config.annotate)
        backend.check_ready()
        lookup = CorpusLookup(run, self.config.annotate.image_max_side)
        return AnnotateWorker(backend, self._prompts(), lookup)

    def run_part(
        self, run: RunDir, part: str, state: AnnotateWorker, progress: PartProgress
    ) -> dict[str, int]:
        pairs = read_table(run.part_path(PAIRS_DIR, part))
        jobs = self._jobs(pairs, state.lookup)
        annotator = Annotator(
            state.backend,
            state.prompts,
            self.config.annotate,
            self.config.seed,
            AnswerCache(run, part, self._cache_key(state), self.config.annotate.flush_every),
            state.lookup,
        )
        finished = [0]

        def one_done() -> None:
            finished[0] += 1
            progress(finished[0], len(jobs))

        outcomes = asyncio.run(annotate_all(annotator, jobs, one_done))
        annotations, failures = outcome_tables(outcomes)
        write_table(run.part_path(ANNOTATIONS_DIR, part), annotations)
        write_table(run.part_path(ANNOTATION_FAILURES_DIR, part), failures)
        counts = part_counts(len(jobs), annotations, failures, annotator.counts)
        if annotator.cache.quarantined:  # unreadable cache chunks, moved aside and re-asked
            counts["quarantined_cache_chunks"] = annotator.cache.quarantined
        return counts

    def _cache_key(self, state: AnnotateWorker) -> CacheKey:
        return CacheKey(
            state.prompts.version,
            state.backend.model_name("describer"),
            state.backend.model_name("instructor"),
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
