"""The two-step annotation of one pair, and of many pairs concurrently.

For each pair: draw its word budget and demonstrations (from the run seed and the
pair id), ask the describer for a description of the two images, check it, ask
the instructor for instructions, check them, and when they fail (unparseable or
too few usable) ask once more with a repair prompt. Every answer is cached
(`AnswerCache`) before it is used, so a re-run resends only what is missing. A
pair ends as an annotation row or a failure row, never neither.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from megapairs.annotation.backends.base import AnnotatorBackend
from megapairs.annotation.cache import AnswerCache
from megapairs.annotation.checks import InstructionCheck, check_description, check_instructions
from megapairs.annotation.images import CorpusLookup, ImageUnavailable
from megapairs.annotation.prompts import (
    PromptSet,
    describe_messages,
    instruct_messages,
    pair_context,
    repair_messages,
    sample_pair_settings,
)
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    PairContext,
    PromptRequest,
    Role,
    SetupError,
    Step,
)
from megapairs.config import AnnotateConfig

REPAIRABLE = frozenset({"unparseable", "too_few_instructions"})
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairJob:
    """One mined pair to annotate, with the captions of its two images."""

    pair_id: str
    query_id: int
    target_id: int
    query_caption: str | None
    target_caption: str | None


@dataclass
class PairFailed(Exception):
    """A pair that could not be annotated, with the step and the reason."""

    step: str
    reason: str
    detail: str
    raw: str = ""
    attempts: int = 0
    transient: bool = False


@dataclass
class Annotator:
    """What annotating the pairs of one part needs, and what it counted."""

    backend: AnnotatorBackend
    prompts: PromptSet
    config: AnnotateConfig
    seed: int
    cache: AnswerCache
    lookup: CorpusLookup | None = None
    counts: Counter[str] = field(default_factory=Counter)

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "describer_model": self.backend.model_name("describer"),
            "instructor_model": self.backend.model_name("instructor"),
            "prompt_version": self.prompts.version,
            "seed": self.seed,
        }

    async def ask(
        self,
        pair_id: str,
        role: Role,
        step: Step,
        messages: tuple[ChatMessage, ...],
        context: PairContext,
        request_seed: int,
    ) -> Completion:
        """The cached answer of this step, or the backend's (then cached)."""
        entry = self.cache.get(pair_id, step)
        if entry is None:
            request = PromptRequest(role, step, messages, context, request_seed)
            try:
                entry = await self.backend.complete(request)
            except BackendError as err:
                if not err.transient:  # final: a re-run must not send it again
                    self.cache.put(pair_id, step, err)
                entry = err
            else:
                self.cache.put(pair_id, step, entry)
        if isinstance(entry, BackendError):
            raise PairFailed(
                step, entry.reason, entry.detail, entry.raw, entry.attempts, entry.transient
            )
        self.counts["answers"] += 1
        self.counts["http_attempts"] += entry.attempts
        return entry

    async def images(self, job: PairJob) -> tuple[bytes, bytes]:
        """The two prepared images, or empty bytes for a backend that does not read them."""
        if not self.backend.reads_images or self.lookup is None:
            return b"", b""
        lookup = self.lookup
        try:
            return await asyncio.to_thread(
                lambda: (lookup.prepared_image(job.query_id), lookup.prepared_image(job.target_id))
            )
        except ImageUnavailable as err:
            raise PairFailed("load_images", "image_unavailable", str(err)) from err

    async def annotate(self, job: PairJob) -> dict[str, Any]:
        """The pair's annotation row; raises PairFailed."""
        config = self.config
        settings = sample_pair_settings(
            job.pair_id,
            self.seed,
            config.word_range,
            config.num_demonstrations,
            len(self.prompts.demonstrations),
        )
        context = pair_context(
            job.pair_id, job.query_caption, job.target_caption, settings, self.prompts
        )
        description = await self.describe(job, context, settings.request_seed)
        context = replace(context, description=description)
        check, repaired = await self.instruct(job, context, settings.request_seed)
        return {
            "pair_id": job.pair_id,
            "query_id": job.query_id,
            "target_id": job.target_id,
            "description": description,
            "instructions": list(check.accepted),
            "dropped_instructions": list(check.dropped),
            "word_num": settings.word_num,
            "demonstration_ids": [d.id for d in context.demonstrations],
            "repaired": repaired,
            **self.provenance(),
        }

    async def describe(self, job: PairJob, context: PairContext, request_seed: int) -> str:
        if self.cache.get(job.pair_id, "describe") is None:
            query_image, target_image = await self.images(job)
        else:
            query_image = target_image = b""  # answered before: the images are not sent
        messages = describe_messages(self.prompts, context, query_image, target_image)
        answer = await self.ask(
            job.pair_id, "describer", "describe", messages, context, request_seed
        )
        description, reason = check_description(answer.text)
        if reason is not None:
            detail = "the describer's answer is unusable"
            raise PairFailed("describe", reason, detail, answer.text, answer.attempts)
        return description

    async def instruct(
        self, job: PairJob, context: PairContext, request_seed: int
    ) -> tuple[InstructionCheck, bool]:
        """Checked instructions, asking once more with a repair prompt when they fail."""
        config = self.config
        bounds = (config.min_instructions, config.max_instructions)
        messages = instruct_messages(self.prompts, context, *bounds)
        answer = await self.ask(
            job.pair_id, "instructor", "instruct", messages, context, request_seed
        )
        check = self.check(answer.text, job, context)
        if check.reason is None:
            return check, False
        if check.reason not in REPAIRABLE:
            raise PairFailed("instruct", check.reason, check.problem, answer.text, answer.attempts)
        context = replace(context, previous_output=answer.text, problem=check.problem)
        messages = repair_messages(self.prompts, messages, context, *bounds)
        answer = await self.ask(
            job.pair_id, "instructor", "repair", messages, context, request_seed
        )
        check = self.check(answer.text, job, context)
        if check.reason is not None:
            raise PairFailed("repair", check.reason, check.problem, answer.text, answer.attempts)
        return check, True

    def check(self, raw: str, job: PairJob, context: PairContext) -> InstructionCheck:
        """The instructor answer checked: format, length, image order, restated caption,
        copied demonstrations and (with `grounding: lexical`) grounding in the pair's texts."""
        config = self.config
        grounding = (context.description, job.target_caption or "", job.query_caption or "")
        return check_instructions(
            raw,
            job.target_caption,
            config.min_instructions,
            config.max_instructions,
            config.instruction_words,
            demonstrations=self.prompts.demonstrations,
            copy_threshold=config.copy_threshold,
            grounding_texts=grounding,
            grounding=config.grounding,
        )


def failure_row(job: PairJob, failure: PairFailed, provenance: dict[str, Any]) -> dict[str, Any]:
    return {
        "pair_id": job.pair_id,
        "query_id": job.query_id,
        "target_id": job.target_id,
        "step": failure.step,
        "reason": failure.reason,
        "detail": failure.detail,
        "raw_output": failure.raw,
        "attempts": failure.attempts,
        "transient": failure.transient,
        **provenance,
    }


def internal_failure(err: Exception) -> PairFailed:
    """A failure row for an unexpected exception: kept, and retried by a re-run (transient)
    once the cause is fixed; MEGAPAIRS_DEBUG=1 logs the traceback."""
    logger.warning(
        "annotating a pair raised %s: %s",
        type(err).__name__,
        err,
        exc_info=bool(os.environ.get("MEGAPAIRS_DEBUG")),
    )
    detail = f"{type(err).__name__}: {err}"[:2000]
    return PairFailed("annotate", "internal_error", detail, transient=True)


@dataclass
class Outcomes:
    """Annotation rows and failure rows, by position of the pair in its part."""

    annotated: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)


async def annotate_all(
    annotator: Annotator,
    jobs: list[PairJob],
    on_done: Callable[[], None] = lambda: None,
) -> Outcomes:
    """Annotate `jobs` with at most `concurrency` pairs in flight; `on_done` ticks per pair."""
    outcomes = Outcomes()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for position in range(len(jobs)):
        queue.put_nowait(position)

    async def worker() -> None:
        while not queue.empty():
            position = queue.get_nowait()
            job = jobs[position]
            try:
                outcomes.annotated[position] = await annotator.annotate(job)
            except SetupError:
                raise  # the configuration is wrong: stop every pair, cache nothing of it
            except PairFailed as failure:
                outcomes.failed[position] = failure_row(job, failure, annotator.provenance())
            except Exception as err:  # a bug or an unforeseen answer: record it, go on
                failure = internal_failure(err)
                outcomes.failed[position] = failure_row(job, failure, annotator.provenance())
            on_done()

    workers = min(annotator.config.concurrency, len(jobs))
    try:
        await first_error_stops_all([worker() for _ in range(workers)])
    finally:
        annotator.cache.flush()
        await annotator.backend.aclose()
    return outcomes


async def first_error_stops_all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run `coroutines` concurrently; the first that raises cancels the others, then its
    exception is raised (unlike `gather`, which leaves the others running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
