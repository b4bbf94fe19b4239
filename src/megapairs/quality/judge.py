"""The optional judge of the score stage (`score.judge.enabled`): a vision-language model
asked, per instruction, whether the instruction applied to the query image describes the
target image, answering strict JSON `{"verdict": "yes" | "no", "reason": "..."}`.

It runs on the annotation backends (`openai`, `hf`): the judge's endpoint is sent as an
annotate describer, so the openai backend's readiness check, capability probe, retries,
`SetupError`s (a refused key, an unserved model: the run stops) and secret redaction all
apply. One request per instruction carries the query image, the target image (fitted into
`image_max_side`) and the instruction. Answers are parsed leniently (a fenced block, JSON
inside prose, `<think>` blocks dropped); an answer that holds no verdict gets one repair
request (the conversation plus what was wrong); a second miss fails as `unparseable`.

A failed instruction keeps its scores row with `judge_verdict` null and
`judge_reason` = `judge failed (<reason>): <detail>`; the part's counts hold
`judge_failed_<reason>` (and `judge_failed_transient` for server-side failures, which a
re-run retries). Every answer and final failure is cached in `judge_cache/<part>/` (the
annotation cache's format, keyed by pair id, instruction index and instruction digest),
so a killed stage resends only what is missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from string import Template

from megapairs.annotation.backends.base import BACKENDS, AnnotatorBackend
from megapairs.annotation.cache import AnswerCache, CacheKey
from megapairs.annotation.checks import strip_reasoning
from megapairs.annotation.flow import first_error_stops_all
from megapairs.annotation.images import CorpusLookup, ImageUnavailable
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    ImagePart,
    PairContext,
    PromptRequest,
    SetupError,
    Step,
    TextPart,
)
from megapairs.config import AnnotateConfig, JudgeConfig, PipelineConfig
from megapairs.runs import RunDir
from megapairs.schemas import JUDGE_CACHE_DIR

log = logging.getLogger(__name__)

JUDGE_PROMPT = Template(
    "You check training data for composed image retrieval. The first image is the query "
    "image, the second the target image. The instruction below was written so that the "
    "query image together with the instruction finds the target image.\n\n"
    "Instruction: $instruction\n\n"
    "Does the instruction, applied to the query image, describe the target image? Answer "
    'with strict JSON only, no other text: {"verdict": "yes" or "no", "reason": "one short '
    'sentence"}'
)
REPAIR_PROMPT = Template(
    "Your answer could not be used ($problem). Answer again with only the JSON object "
    '{"verdict": "yes" or "no", "reason": "one short sentence"}.'
)
PROMPT_VERSION = (
    "judge-v1-"
    + hashlib.sha256((JUDGE_PROMPT.template + REPAIR_PROMPT.template).encode()).hexdigest()[:8]
)
VERDICTS = ("yes", "no")
MAX_REASON = 2000  # characters of a reason or failure detail kept

# Judge settings that change its answers (not URLs, timeouts, concurrency or retries).
JUDGE_SETTINGS = (
    "score.judge.enabled",
    "score.judge.backend",
    "score.judge.image_max_side",
    *(
        f"score.judge.endpoint.{name}"
        for name in ("model", "temperature", "top_p", "max_tokens", "extra_body")
    ),
)
_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


# parsing ----------------------------------------------------------------------------


def parse_verdict(text: str) -> tuple[tuple[str, str] | None, str]:
    """((verdict, reason), "") from an answer, or (None, what is wrong with it). Takes the
    first JSON object with a `verdict` of yes/no (any case), in a fenced block or in text."""
    problem = "no JSON object in the answer"
    for data in json_objects(strip_reasoning(text)):
        if "verdict" not in data:
            problem = "the JSON object has no 'verdict'"
            continue
        verdict = str(data["verdict"]).strip().lower()
        if verdict not in VERDICTS:
            problem = f"verdict {data['verdict']!r} is neither 'yes' nor 'no'"
            continue
        reason = data.get("reason")
        return (verdict, str(reason).strip()[:MAX_REASON] if reason is not None else ""), ""
    return None, problem


def json_objects(text: str) -> Iterator[dict[str, object]]:
    """JSON objects in `text`: fenced blocks first, then each `{` that starts one."""
    decoder = json.JSONDecoder()
    sources = [block.strip() for block in _FENCED.findall(text)] + [text]
    for source in sources:
        for start in (m.start() for m in re.finditer(r"\{", source)):
            try:
                data, _ = decoder.raw_decode(source, start)
            except ValueError:
                continue
            if isinstance(data, dict):
                yield data


# backend, cache, items ---------------------------------------------------------------


def judge_annotate_config(judge: JudgeConfig) -> AnnotateConfig:
    """An annotate config whose describer is the judge (its backend's transport settings)."""
    settings = {
        "backend": judge.backend,
        "describer": judge.endpoint,
        "concurrency": judge.concurrency,
        "max_retries": judge.max_retries,
        "backoff_initial": judge.backoff_initial,
        "backoff_max": judge.backoff_max,
        "flush_every": judge.flush_every,
        "image_max_side": judge.image_max_side,
    }
    return AnnotateConfig.model_validate(settings)


def build_judge_backend(judge: JudgeConfig) -> AnnotatorBackend:
    """The judge's backend (describer role only), checked ready: probe included."""
    from megapairs.annotation.backends import factory  # noqa: F401  (fills BACKENDS)

    try:
        backend = BACKENDS.build(judge.backend, judge_annotate_config(judge), ("describer",))
        backend.check_ready()
    except (ValueError, RuntimeError) as err:
        if type(err) not in (ValueError, RuntimeError, SetupError):
            raise
        message = f"score.judge (its endpoint checked as annotate.describer): {err}"
        raise type(err)(message) from err  # the same kind: SetupError still stops the run
    return backend


def judge_cache(run: RunDir, part: str, key: CacheKey, flush_every: int) -> AnswerCache:
    """The annotation cache's format and behaviour, in `judge_cache/<part>/`."""
    return AnswerCache(run, part, key, flush_every, folder=JUDGE_CACHE_DIR)


def cache_key(config: PipelineConfig, model: str) -> CacheKey:
    return CacheKey(
        PROMPT_VERSION, model, "judge", config.seed, config.section_hash(*JUDGE_SETTINGS)
    )


@dataclass(frozen=True)
class JudgeItem:
    """One instruction to judge; `key` names it in the cache."""

    key: str
    query_id: int
    target_id: int
    instruction: str


def item_key(pair_id: str, index: int, instruction: str) -> str:
    digest = hashlib.sha256(instruction.encode()).hexdigest()[:12]
    return f"{pair_id}#{index}#{digest}"


def request_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % 2**31


@dataclass(frozen=True)
class Verdict:
    """The judge's answer on one instruction; `failure` set (and `verdict` None) when none."""

    verdict: str | None
    reason: str
    repaired: bool = False
    failure: str | None = None
    transient: bool = False


@dataclass
class JudgeFailed(Exception):
    reason: str
    detail: str
    transient: bool = False

    def verdict(self) -> Verdict:
        text = f"judge failed ({self.reason}): {self.detail}"[:MAX_REASON]
        return Verdict(None, text, failure=self.reason, transient=self.transient)


# judging ------------------------------------------------------------------------------

Messages = tuple[ChatMessage, ...]


@dataclass
class Judge:
    """What judging one part's instructions needs."""

    backend: AnnotatorBackend
    lookup: CorpusLookup
    cache: AnswerCache
    seed: int
    concurrency: int

    async def judge(self, item: JudgeItem) -> Verdict:
        """The verdict on `item` (asking once more when the answer holds none)."""
        first = await self.ask(item, "describe", lambda: self.first_messages(item))
        parsed, problem = parse_verdict(first.text)
        if parsed is None:
            repair = lambda: self.repair_messages(item, first.text, problem)  # noqa: E731
            second = await self.ask(item, "repair", repair)
            parsed, problem = parse_verdict(second.text)
            if parsed is None:
                raise JudgeFailed("unparseable", f"{problem}: {second.text[:200]!r}")
            return Verdict(*parsed, repaired=True)
        return Verdict(*parsed)

    async def ask(
        self, item: JudgeItem, step: Step, build: Callable[[], Awaitable[Messages]]
    ) -> Completion:
        """The cached answer of this step, or the backend's (then cached)."""
        entry = self.cache.get(item.key, step)
        if entry is None:
            context = PairContext(item.key, None, None, 0)
            seed = request_seed(self.seed, item.key)
            request = PromptRequest("describer", step, await build(), context, seed)
            try:
                entry = await self.backend.complete(request)
            except BackendError as err:
                if not err.transient:
                    self.cache.put(item.key, step, err)
                entry = err
            else:
                self.cache.put(item.key, step, entry)
        if isinstance(entry, BackendError):
            raise JudgeFailed(entry.reason, entry.detail[:MAX_REASON], entry.transient)
        return entry

    async def first_messages(self, item: JudgeItem) -> Messages:
        query, target = await asyncio.to_thread(self.images, item)
        prompt = JUDGE_PROMPT.substitute(instruction=item.instruction)
        parts = (TextPart("Query image:"), ImagePart(query), TextPart("Target image:"))
        return (ChatMessage("user", (*parts, ImagePart(target), TextPart(prompt))),)

    async def repair_messages(self, item: JudgeItem, previous: str, problem: str) -> Messages:
        asked = await self.first_messages(item)
        answer = ChatMessage("assistant", (TextPart(previous),))
        repair = ChatMessage("user", (TextPart(REPAIR_PROMPT.substitute(problem=problem)),))
        return (*asked, answer, repair)

    def images(self, item: JudgeItem) -> tuple[bytes, bytes]:
        try:
            return (
                self.lookup.prepared_image(item.query_id),
                self.lookup.prepared_image(item.target_id),
            )
        except ImageUnavailable as err:
            raise JudgeFailed("image_unavailable", str(err)) from err


async def judge_all(
    judge: Judge, items: list[JudgeItem], on_done: Callable[[], None] = lambda: None
) -> list[Verdict]:
    """A verdict per item, `concurrency` at a time; a `SetupError` stops them all."""
    verdicts: list[Verdict | None] = [None] * len(items)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for position in range(len(items)):
        queue.put_nowait(position)

    async def worker() -> None:
        while not queue.empty():
            position = queue.get_nowait()
            verdicts[position] = await judged(judge, items[position])
            on_done()

    workers = min(judge.concurrency, len(items))
    try:
        await first_error_stops_all([worker() for _ in range(workers)])
    finally:
        judge.cache.flush()
        await judge.backend.aclose()
    return [v for v in verdicts if v is not None]


async def judged(judge: Judge, item: JudgeItem) -> Verdict:
    """`judge.judge(item)`, its failure as a verdict; a `SetupError` goes through."""
    try:
        return await judge.judge(item)
    except SetupError:
        raise
    except JudgeFailed as failed:
        return failed.verdict()
    except Exception as err:  # a bug or an unforeseen answer: recorded, retried by a re-run
        log.warning("judging %s raised %s: %s", item.key, type(err).__name__, err)
        return JudgeFailed("internal_error", f"{type(err).__name__}: {err}", True).verdict()
