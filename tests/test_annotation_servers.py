"""Several annotation servers per role: the server pool on a fake clock, the `openai`
backend over real loopback servers (tests/chat_server.py), and the annotate stage with
one of three servers killed mid-run."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from chat_server import Body, ChatServer, Faults
from pydantic import ValidationError
from run_fixtures import RECORDS, build_run, pair_id

from megapairs.annotation.backends.openai_chat import OpenAIBackend
from megapairs.annotation.backends.servers import ServerPool
from megapairs.annotation.stage import AnnotateStage
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    PairContext,
    PromptRequest,
    TextPart,
)
from megapairs.config import AnnotateConfig, EndpointConfig, PipelineConfig, load_config
from megapairs.pipeline.runner import LocalRunner, StageResult
from megapairs.runs import RunDir, concat_tables, write_table
from megapairs.schemas import (
    ANNOTATION_FAILURES_DIR,
    ANNOTATION_FAILURES_SCHEMA,
    ANNOTATIONS_DIR,
    ANNOTATIONS_SCHEMA,
    PAIRS_DIR,
    PAIRS_SCHEMA,
    PART_STRIDE,
)

KEY_ENV = "MEGAPAIRS_TEST_CHAT_KEY"
URLS = ("http://a:1/v1", "http://b:2/v1", "http://c:3/v1")


@pytest.fixture(autouse=True)
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def servers() -> Iterator[list[ChatServer]]:
    chats = [ChatServer() for _ in range(3)]
    for chat in chats:
        chat.start()
    yield chats
    for chat in chats:
        chat.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool_of(*urls: str, cooldown: float = 1.0, cooldown_max: float = 4.0) -> ServerPool:
    return ServerPool("annotate.test", urls, cooldown=cooldown, cooldown_max=cooldown_max)


def picked(pool: ServerPool, times: int = 6) -> list[str]:
    """The servers of `times` one-at-a-time attempts that all answer."""
    urls = []
    for _ in range(times):
        server = pool.pick()
        assert server is not None
        urls.append(server.url)
        pool.done(server, None)
    return urls


def backend_config(urls: list[str] | str, **overrides: Any) -> AnnotateConfig:
    endpoint = {
        "base_url": urls,
        "api_key_env": KEY_ENV,
        "timeout": 2.0,
        "cooldown": (cooldown := overrides.pop("cooldown", 0.3)),
        "cooldown_max": max(cooldown, 2.0),
    }
    settings: dict[str, Any] = {
        "backend": "openai",
        "describer": {"model": "vlm-test", "probe": False, **endpoint},  # counts pool requests
        "instructor": {"model": "llm-test", **endpoint},
        "concurrency": 8,
        "max_retries": 3,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
    }
    return AnnotateConfig.model_validate(settings | overrides)


def instruct_request(seed: int = 1) -> PromptRequest:
    text = f"Query image caption: a red bike\nTarget image caption: a blue bike {seed}"
    message = ChatMessage("user", (TextPart(text),))
    context = PairContext(f"pair-{seed}", "a red bike", f"a blue bike {seed}", word_num=70)
    return PromptRequest("instructor", "instruct", (message,), context, seed)


def complete(backend: OpenAIBackend, *requests: PromptRequest) -> list[Completion | BackendError]:
    async def go() -> list[Completion | BackendError]:
        try:
            return await asyncio.gather(
                *(backend.complete(r) for r in requests), return_exceptions=True
            )  # type: ignore[return-value]
        finally:
            await backend.aclose()

    return asyncio.run(go())


def stats_by_url(backend: OpenAIBackend, role: str = "instructor") -> dict[str, Any]:
    return {s.url: s for s in backend.server_stats()[role]}  # type: ignore[index]


# config ---------------------------------------------------------------------------------------
def test_base_url_is_one_url_or_a_list_of_them() -> None:
    assert EndpointConfig(base_url="http://a:1/v1").base_urls == ("http://a:1/v1",)
    one = EndpointConfig.model_validate({"base_url": ["http://a:1/v1"]})
    assert one.base_url == "http://a:1/v1" and one == EndpointConfig(base_url="http://a:1/v1")
    many = EndpointConfig.model_validate({"base_url": list(URLS)})
    assert many.base_urls == URLS and many.model_dump(mode="json")["base_url"] == list(URLS)
    for bad, message in (([], "empty list"), ([URLS[0], URLS[0]], "twice"), ([" "], "empty")):
        with pytest.raises(ValidationError, match=message):
            EndpointConfig.model_validate({"base_url": bad})
    config = load_config(overrides=[f"annotate.describer.base_url=[{URLS[0]}, {URLS[1]}]"])
    assert config.annotate.describer.base_urls == URLS[:2]


# the pool on a fake clock ---------------------------------------------------------------------
def attempt(pool: ServerPool, url: str, failure: str | None) -> None:
    """An attempt on the server of `url` that ends with `failure` (None: answered)."""
    (server,) = [s for s in pool.servers if s.url == url]
    server.in_flight += 1
    server.requests += 1
    pool.done(server, failure)


def test_fewest_in_flight_first_ties_in_turn() -> None:
    pool = pool_of(*URLS)
    held = [pool.pick() for _ in range(4)]
    assert [s.url for s in held if s] == [URLS[0], URLS[1], URLS[2], URLS[0]]
    pool.done(held[1], None)  # type: ignore[arg-type]
    server = pool.pick()
    assert server is not None and server.url == URLS[1]  # the only one with none in flight
    assert picked(pool_of(*URLS)) == [*URLS, *URLS]  # one at a time: round-robin


def test_a_failed_server_sits_out_its_cooldown_then_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    pool = ServerPool("annotate.test", URLS, cooldown=1.0, cooldown_max=3.0, clock=clock)
    with caplog.at_level(logging.WARNING):
        attempt(pool, URLS[0], "connection_error")
    assert "annotate.test: server http://a:1/v1 taken out for 1 s" in caplog.text
    assert URLS[0] not in picked(pool)
    clock.now += 0.99
    assert URLS[0] not in picked(pool)
    clock.now += 0.01  # its cool-down is over: on probation, tried again
    assert URLS[0] in picked(pool, 3)
    assert pool.stats()[0].in_service  # it answered: back in service
    assert "server http://a:1/v1 answers again; back in service" in caplog.text

    for seconds in (1.0, 2.0, 3.0, 3.0):  # failing again on each return: doubling, capped
        attempt(pool, URLS[0], "server_error")
        assert pool.servers[0].out_until == pytest.approx(clock.now + seconds)
        attempt(pool, URLS[0], "timeout")  # sent before the take-out: no new cool-down
        assert pool.servers[0].out_until == pytest.approx(clock.now + seconds)
        clock.now += seconds
    stats = pool.stats()[0]
    assert (stats.requests, stats.failures, stats.taken_out) == (10, 9, 5)
    assert not stats.in_service
    attempt(pool, URLS[0], None)  # it answers: the next cool-down starts over
    attempt(pool, URLS[0], "timeout")
    assert pool.servers[0].out_until == pytest.approx(clock.now + 1.0)


def test_client_errors_and_rate_limits_keep_a_server_in_service() -> None:
    pool = pool_of(*URLS)
    for reason in ("client_error", "rate_limited", "malformed_response", "empty_response"):
        attempt(pool, URLS[1], reason)
    assert [s.in_service for s in pool.stats()] == [True, True, True]
    assert pool.stats()[1].failures == 0


def test_a_server_on_probation_gets_one_attempt_at_a_time_beside_healthy_ones() -> None:
    clock = Clock()
    pool = ServerPool("annotate.test", URLS[:2], cooldown=1.0, clock=clock)
    attempt(pool, URLS[0], "connection_error")
    clock.now += 1.0
    held = [pool.pick() for _ in range(4)]
    assert [s.url for s in held if s].count(URLS[0]) == 1
    attempt(pool, URLS[1], "connection_error")  # no server in service: no limit
    assert {s.url for s in (pool.pick(), pool.pick()) if s} == {URLS[0]}


def test_every_server_out_means_none_to_pick_until_the_first_is_back() -> None:
    clock = Clock()
    pool = ServerPool("annotate.test", URLS[:2], cooldown=1.0, clock=clock)
    attempt(pool, URLS[0], "connection_error")
    clock.now += 0.5
    attempt(pool, URLS[1], "connection_error")
    assert pool.pick() is None
    clock.now += 0.5
    assert picked(pool, 1) == [URLS[0]]


def test_a_single_server_is_never_taken_out() -> None:
    pool = pool_of(URLS[0])
    for _ in range(3):
        attempt(pool, URLS[0], "connection_error")
    stats = pool.stats()[0]
    assert (stats.requests, stats.failures, stats.taken_out, stats.in_service) == (3, 3, 0, True)
    assert picked(pool, 1) == [URLS[0]]


# the openai backend over real loopback servers -----------------------------------------------
def test_a_failing_server_is_taken_out_and_retries_go_to_the_others(
    servers: list[ChatServer],
) -> None:
    first, *others = servers
    first.faults.rule = lambda body: "http_500"
    backend = OpenAIBackend(backend_config([s.base_url for s in servers], cooldown=30.0))
    results = complete(backend, *(instruct_request(i) for i in range(6)))

    assert all(isinstance(r, Completion) for r in results), results
    retried = sorted(r.attempts for r in results if isinstance(r, Completion))
    assert retried == [1, 1, 1, 1, 2, 2]  # the two sent to the failing server went elsewhere
    assert first.fault_counts() == {"http_500": 2}
    assert sum(len(s.answered) for s in others) == 6
    stats = stats_by_url(backend)
    assert (stats[first.base_url].failures, stats[first.base_url].taken_out) == (2, 1)
    assert not stats[first.base_url].in_service
    assert [stats[s.base_url].requests for s in others] == [len(s.requests) for s in others]
    assert all(stats[s.base_url].in_service for s in others)


def test_with_every_server_out_a_request_waits_for_the_first_back(
    servers: list[ChatServer], caplog: pytest.LogCaptureFixture
) -> None:
    urls = [s.base_url for s in servers]
    for chat in servers:
        chat.kill()
    backend = OpenAIBackend(backend_config(urls, cooldown=0.5, max_retries=6))

    def revive_the_first_once_all_are_out() -> None:
        deadline = time.monotonic() + 10
        while sum(s.taken_out for s in backend.server_stats()["instructor"]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        servers[0].revive()

    reviver = threading.Thread(target=revive_the_first_once_all_are_out)
    reviver.start()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        (result,) = complete(backend, instruct_request())
    reviver.join()

    assert isinstance(result, Completion), result
    assert result.attempts == 4  # each server refused once; the first was tried again when back
    assert time.monotonic() - start >= 0.5  # it waited out the first cool-down
    assert len(servers[0].answered) == 1
    stats = stats_by_url(backend)
    assert (stats[urls[0]].taken_out, stats[urls[0]].in_service) == (1, True)
    assert [(stats[u].failures, stats[u].in_service) for u in urls[1:]] == [(1, False)] * 2
    assert f"server {urls[0]} answers again; back in service" in caplog.text


def test_a_list_of_one_url_behaves_as_a_single_url(servers: list[ChatServer]) -> None:
    server = servers[0]
    seen: list[Body] = []

    def first_fails(body: Body) -> str | None:
        seen.append(body)
        return "http_500" if len(seen) == 1 else None

    server.faults.rule = first_fails
    config = backend_config([server.base_url], cooldown=30.0)
    assert config == backend_config(server.base_url, cooldown=30.0)
    backend = OpenAIBackend(config)
    start = time.monotonic()
    (result,) = complete(backend, instruct_request())
    assert isinstance(result, Completion) and result.attempts == 2
    assert time.monotonic() - start < 1.0  # the backoff, not a cool-down
    (stats,) = backend.server_stats()["instructor"]
    assert (stats.requests, stats.failures, stats.taken_out, stats.in_service) == (2, 1, 0, True)


def test_the_readiness_check_takes_out_unreachable_servers(
    servers: list[ChatServer], caplog: pytest.LogCaptureFixture
) -> None:
    up, down, also_up = servers
    safe_down = down.base_url
    urls = [up.base_url, safe_down.replace("http://", "http://user:hunter2@"), also_up.base_url]
    down.kill()
    backend = OpenAIBackend(backend_config(urls, cooldown=30.0))
    with caplog.at_level(logging.WARNING):
        backend.check_ready()
    assert f"annotate.describer: server {safe_down} taken out for 30 s" in caplog.text
    assert f"annotate.instructor: server {safe_down} taken out" in caplog.text
    stats = stats_by_url(backend)
    assert (stats[safe_down].taken_out, stats[safe_down].in_service) == (1, False)

    results = complete(backend, *(instruct_request(i) for i in range(6)))
    assert [r.attempts for r in results if isinstance(r, Completion)] == [1] * 6
    assert len(up.answered) + len(also_up.answered) == 6 and stats_by_url(backend)[safe_down]
    assert stats_by_url(backend)[safe_down].requests == 0
    assert "hunter2" not in caplog.text + repr(backend.server_stats())

    up.kill()
    also_up.kill()
    with pytest.raises(RuntimeError, match=r"annotate\.describer: cannot reach any of its 3"):
        OpenAIBackend(backend_config(urls)).check_ready()


def test_a_server_of_another_model_stops_the_run_before_any_pair() -> None:
    with ChatServer(models=("vlm-test", "llm-test")) as good, ChatServer(models=("x",)) as other:
        backend = OpenAIBackend(backend_config([good.base_url, other.base_url]))
        with pytest.raises(RuntimeError, match=r"'vlm-test' is not served at .*; it serves: x"):
            backend.check_ready()


# the annotate stage, one of three servers killed mid-run --------------------------------------
def write_many_pairs(run: RunDir) -> list[str]:
    """Replace the fixture's pairs by every ordered pair of its records (72)."""
    ids = sorted(RECORDS)
    names: list[str] = []
    for index, part in enumerate(("part-00000", "part-00001")):
        rows = [
            {
                "pair_id": pair_id(query, target),
                "query_id": query,
                "target_id": target,
                "rank": 0,
                "channels": ["image"],
                "channel_scores": [0.9],
                "hard_negative_ids": [],
                "hard_negative_topped_up": 0,
            }
            for query in ids
            if query // PART_STRIDE == index
            for target in ids
            if target != query
        ]
        write_table(run.part_path(PAIRS_DIR, part), pa.Table.from_pylist(rows, PAIRS_SCHEMA))
        run.mark_done("mine", part, {"pairs": len(rows)})
        names += [str(row["pair_id"]) for row in rows]
    return names


def stage_config(urls: list[str]) -> PipelineConfig:
    endpoint = {"base_url": urls, "timeout": 2.0, "cooldown": 0.3, "cooldown_max": 1.0}
    settings = {
        "backend": "openai",
        "concurrency": 8,
        "max_retries": 4,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "flush_every": 8,
        "describer": {"model": "fake-vlm", "probe": False, **endpoint},  # counts requests
        "instructor": {"model": "fake-llm", **endpoint},
    }
    return PipelineConfig.model_validate({"seed": 7, "annotate": settings})


def annotate(run: RunDir, config: PipelineConfig) -> StageResult:
    runner = LocalRunner(run, config, progress=False)
    runner.start()
    return runner.run_stage(AnnotateStage(config, progress=False))


def kill_after(server: ChatServer, requests: int, others: list[ChatServer]) -> dict[str, Any]:
    """Make `server` die on receiving its `requests`-th request (atomically: a watcher
    polling the count could let one more in); the returned dict gets, from a thread, what
    each other server had answered when it died, and that thread."""
    seen: dict[str, Any] = {}
    server.die_after = requests

    def watch() -> None:
        deadline = time.monotonic() + 30
        while len(server.requests) < requests and time.monotonic() < deadline:
            time.sleep(0.001)
        seen["answered"] = [len(s.answered) for s in others]

    seen["thread"] = threading.Thread(target=watch, daemon=True)
    seen["thread"].start()
    return seen


def request_key(body: Body) -> str:
    return json.dumps(body, sort_keys=True)


def test_a_server_dying_mid_run_loses_no_pair_and_answers_none_twice(
    tmp_path: Path, servers: list[ChatServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build_run(tmp_path, annotate=False).run
    pairs = write_many_pairs(run)
    *alive, dying = servers
    for chat in servers:
        chat.faults = Faults(latency=0.02)
    built: list[OpenAIBackend] = []
    init = OpenAIBackend.__init__

    def init_and_keep(self: OpenAIBackend, config: AnnotateConfig, *roles: Any) -> None:
        init(self, config, *roles)
        built.append(self)  # the stage's backend, to read its server stats

    monkeypatch.setattr(OpenAIBackend, "__init__", init_and_keep)
    urls = [chat.base_url for chat in servers]
    death = kill_after(dying, 12, alive)
    result = annotate(run, stage_config(urls))
    death["thread"].join()

    annotated = concat_tables(run.files(ANNOTATIONS_DIR, "annotate"), ANNOTATIONS_SCHEMA)
    failed = concat_tables(
        run.files(ANNOTATION_FAILURES_DIR, "annotate"), ANNOTATION_FAILURES_SCHEMA
    )
    ids = annotated["pair_id"].to_pylist() + failed["pair_id"].to_pylist()
    assert sorted(ids) == sorted(pairs)  # every pair exactly once
    counts = result.counts
    assert counts["pairs"] == counts["annotated"] + counts["failed"] == len(pairs) == 72
    assert not any(failed["transient"].to_pylist())  # no pair lost to the dead server

    assert len(dying.requests) == 12  # nothing reached it after its death
    assert all(len(s.answered) > then for s, then in zip(alive, death["answered"], strict=True))
    answers = [r.body for s in servers for r in s.answered]
    assert counts["answers"] == len(answers)  # each answer came from one server ...
    assert max(Counter(map(request_key, answers)).values()) == 1  # ... and none was asked twice

    (backend,) = built
    stats = {role: {s.url: s for s in by_role} for role, by_role in backend.server_stats().items()}
    for chat in alive:  # every attempt sent to a live server reached it, none failed
        assert sum(stats[role][chat.base_url].requests for role in stats) == len(chat.requests)
        assert all(stats[role][chat.base_url].taken_out == 0 for role in stats)
    dead = [stats[role][urls[2]] for role in stats]
    assert sum(s.taken_out for s in dead) >= 1 and not all(s.in_service for s in dead)
    attempts = sum(s.requests for by_role in stats.values() for s in by_role.values())
    assert attempts == counts["http_attempts"]  # counts add up: every attempt is accounted for

    again = annotate(run, stage_config(urls[:1]))  # other servers: same config, nothing resent
    assert again.computed == 0 and len(alive[0].requests) == sum(
        stats[role][urls[0]].requests for role in stats
    )
