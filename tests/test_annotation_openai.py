"""The `openai` backend against a real chat-completions server on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
from collections.abc import Iterator

import pytest
from chat_server import ChatServer, Faults, description_for, instructions_for
from image_fixtures import jpeg_bytes

from megapairs.annotation.backends.base import BACKENDS
from megapairs.annotation.backends.openai_chat import OpenAIBackend, parse_retry_after
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    ImagePart,
    PairContext,
    PromptRequest,
    SetupError,
    TextPart,
)
from megapairs.config import AnnotateConfig, EndpointConfig

KEY_ENV = "MEGAPAIRS_TEST_CHAT_KEY"
SECRET = "sk-test-5ecret-never-logged"


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer() as chat:
        yield chat


@pytest.fixture(autouse=True)
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def endpoint(base_url: str, model: str, **overrides: object) -> EndpointConfig:
    settings: dict[str, object] = {
        "model": model,
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 200,
        "timeout": 2.0,
    }
    return EndpointConfig.model_validate(settings | overrides)


def annotate_config(
    base_url: str, instructor_url: str | None = None, **overrides: object
) -> AnnotateConfig:
    settings: dict[str, object] = {
        "backend": "openai",
        "describer": endpoint(base_url, "vlm-test", extra_body={"top_k": 20, "min_p": 0.05}),
        "instructor": endpoint(instructor_url or base_url, "llm-test"),
        "concurrency": 8,
        "max_retries": 2,
        "backoff_initial": 0.01,
        "backoff_max": 2.0,
    }
    return AnnotateConfig.model_validate(settings | overrides)


def describe_request(
    query_caption: str = "a brown dog on a sunny beach",
    target_caption: str = "a brown dog in deep snow",
    seed: int = 7,
    images: tuple[bytes, bytes] | None = None,
) -> PromptRequest:
    query, target = images or (jpeg_bytes((200, 30, 30)), jpeg_bytes((30, 30, 200)))
    text = (
        f"Query image caption: {query_caption}\nTarget image caption: {target_caption}\n"
        "Describe what the two images share and how the target differs, in about 80 words."
    )
    message = ChatMessage("user", (ImagePart(query), ImagePart(target), TextPart(text)))
    context = PairContext("pair-1", query_caption, target_caption, word_num=80)
    return PromptRequest("describer", "describe", (message,), context, seed)


def instruct_request(query_caption: str = "a red bike", seed: int = 11) -> PromptRequest:
    text = (
        f"Description: both show a bicycle.\nQuery image caption: {query_caption}\n"
        'Target image caption: a blue bike on a hill\nAnswer as {"instructions": [...]}.'
    )
    system = ChatMessage("system", (TextPart("You write image search requests."),))
    message = ChatMessage("user", (TextPart(text),))
    context = PairContext("pair-2", query_caption, "a blue bike on a hill", word_num=70)
    return PromptRequest("instructor", "instruct", (system, message), context, seed)


def complete_all(
    backend: OpenAIBackend, *requests: PromptRequest
) -> list[Completion | BackendError]:
    """Run the requests concurrently in one event loop, as the stage does per part."""

    async def go() -> list[Completion | BackendError]:
        try:
            results = await asyncio.gather(
                *(backend.complete(r) for r in requests), return_exceptions=True
            )
        finally:
            await backend.aclose()
        for result in results:
            if not isinstance(result, Completion | BackendError):
                raise result
        return results  # type: ignore[return-value]

    return asyncio.run(go())


def complete_one(backend: OpenAIBackend, request: PromptRequest) -> Completion | BackendError:
    return complete_all(backend, request)[0]


def failed(result: Completion | BackendError) -> BackendError:
    assert isinstance(result, BackendError), f"expected a failure, got {result!r}"
    return result


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# wiring


def test_registered_factory_refuses_a_missing_model(server: ChatServer) -> None:
    config = annotate_config(server.base_url)
    backend = BACKENDS.build("openai", config)
    assert isinstance(backend, OpenAIBackend)
    assert backend.name == "openai" and backend.reads_images
    assert (backend.model_name("describer"), backend.model_name("instructor")) == (
        "vlm-test",
        "llm-test",
    )
    config = config.model_copy(update={"instructor": endpoint(server.base_url, "")})
    with pytest.raises(ValueError, match=r"annotate\.instructor\.model"):
        BACKENDS.build("openai", config)


def test_describer_request_on_the_wire(server: ChatServer) -> None:
    images = (jpeg_bytes((250, 0, 0)), jpeg_bytes((0, 0, 250)))
    backend = OpenAIBackend(annotate_config(server.base_url))
    result = complete_one(backend, describe_request(seed=1234, images=images))

    assert isinstance(result, Completion) and result.attempts == 1
    (request,) = server.requests
    body = request.body
    assert body["model"] == "vlm-test"
    assert (body["seed"], body["temperature"], body["top_p"], body["max_tokens"]) == (
        1234,
        0.3,
        0.9,
        200,
    )
    assert (body["top_k"], body["min_p"]) == (20, 0.05)  # extra_body merged in
    (message,) = body["messages"]
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds == ["image_url", "image_url", "text"]
    for part, image in zip(message["content"][:2], images, strict=True):
        prefix, encoded = part["image_url"]["url"].split(",", 1)
        assert prefix == "data:image/jpeg;base64"
        assert base64.b64decode(encoded) == image
    text = message["content"][2]["text"]
    assert "a brown dog on a sunny beach" in text and "a brown dog in deep snow" in text
    assert "authorization" not in request.headers  # no key variable set
    assert result.text == description_for(body)
    assert 70 <= len(result.text.split()) <= 90  # the server honours the 80-word budget


def test_each_role_goes_to_its_own_server(server: ChatServer) -> None:
    with ChatServer() as instructor_server:
        config = annotate_config(server.base_url, instructor_server.base_url)
        backend = OpenAIBackend(config)
        described, instructed = complete_all(backend, describe_request(), instruct_request())

    assert isinstance(described, Completion) and isinstance(instructed, Completion)
    assert [b["model"] for b in server.bodies] == ["vlm-test"]
    (body,) = instructor_server.bodies
    assert body["model"] == "llm-test" and body["seed"] == 11
    assert "top_k" not in body  # the describer's extra_body stays with the describer
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "a red bike" in body["messages"][1]["content"]
    instructions = json.loads(instructed.text)["instructions"]
    assert 3 <= len(instructions) <= 4


def test_api_key_is_sent_and_never_leaked(
    server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    backend = OpenAIBackend(annotate_config(server.base_url))
    assert isinstance(complete_one(backend, instruct_request()), Completion)
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"

    server.faults.rule = lambda body: "http_401"  # the server echoes the key it got
    with pytest.raises(SetupError) as refused:  # a wrong key: stop, do not fail the pair
        complete_one(backend, instruct_request())
    assert SECRET in server.requests[-1].headers["authorization"]
    assert len(server.requests) == 2  # not retried
    for text in (str(refused.value), repr(refused.value), repr(backend)):
        assert SECRET not in text
    assert "HTTP 401" in str(refused.value) and "<redacted>" in str(refused.value)
    assert KEY_ENV in str(refused.value)

    monkeypatch.setenv(KEY_ENV, "")
    server.faults.rule = None
    assert isinstance(complete_one(backend, instruct_request()), Completion)
    assert "authorization" not in server.requests[-1].headers


# retries


def first_request_gets(fault: str) -> object:
    seen: list[str] = []

    def rule(body: dict) -> str | None:
        seen.append(fault)
        return fault if len(seen) == 1 else None

    return rule


def test_a_server_error_is_retried(server: ChatServer) -> None:
    server.faults.rule = first_request_gets("http_500")  # type: ignore[assignment]
    result = complete_one(OpenAIBackend(annotate_config(server.base_url)), instruct_request())
    assert isinstance(result, Completion) and result.attempts == 2
    assert [r.fault for r in server.requests] == ["http_500", None]
    assert server.bodies[0] == server.bodies[1]  # the same request, resent


def test_retry_after_is_honoured(server: ChatServer) -> None:
    server.faults.rule = first_request_gets("http_429")  # type: ignore[assignment]
    server.faults.retry_after = 1
    config = annotate_config(server.base_url, backoff_initial=0.001, backoff_max=5.0)
    result = complete_one(OpenAIBackend(config), instruct_request())
    assert isinstance(result, Completion) and result.attempts == 2
    first, second = server.requests
    assert second.time - first.time >= 0.95  # only Retry-After explains a wait this long


@pytest.mark.parametrize(
    ("fault", "reason", "attempts"),
    [
        ("http_500", "server_error", 3),
        ("http_503", "server_error", 3),
        ("http_429", "rate_limited", 3),
        ("malformed_json", "malformed_response", 3),
        ("disconnect", "connection_error", 3),
        ("http_400", "client_error", 1),
        ("empty", "empty_response", 1),
    ],
)
def test_failures_end_with_their_reason(
    server: ChatServer, fault: str, reason: str, attempts: int
) -> None:
    server.faults.rule = lambda body: fault
    server.faults.retry_after = 30  # capped by backoff_max: no test waits for it
    config = annotate_config(server.base_url, max_retries=2, backoff_max=0.05)
    start = time.monotonic()
    error = failed(complete_one(OpenAIBackend(config), describe_request()))
    assert (error.reason, error.attempts) == (reason, attempts)
    assert len(server.requests) == attempts
    assert time.monotonic() - start < 1.5
    assert server.base_url.removesuffix("/v1") in error.detail  # says where it went wrong
    if fault.startswith("http_"):
        assert fault.removeprefix("http_") in error.detail
    if fault == "malformed_json":
        assert error.raw.startswith('{"id": "chatcmpl-broken"')
    assert error.transient == (reason != "client_error" and reason != "empty_response")


def test_a_hanging_server_times_out(server: ChatServer) -> None:
    server.faults = Faults(timeout=1.0, hang=3.0)
    slow = endpoint(server.base_url, "llm-test", timeout=0.3)
    config = annotate_config(server.base_url, max_retries=1, instructor=slow)
    start = time.monotonic()
    error = failed(complete_one(OpenAIBackend(config), instruct_request()))
    assert (error.reason, error.attempts) == ("timeout", 2)
    assert time.monotonic() - start < 1.5
    assert "0.3 s" in error.detail


def test_a_closed_port_is_a_connection_error() -> None:
    config = annotate_config(f"http://127.0.0.1:{closed_port()}/v1", max_retries=1)
    error = failed(complete_one(OpenAIBackend(config), instruct_request()))
    assert (error.reason, error.attempts) == ("connection_error", 2)
    assert "is the server up" in error.detail


def test_unparseable_answers_reach_the_caller(server: ChatServer) -> None:
    """Prose instead of JSON is a valid chat answer: the pair flow's repair deals with it."""
    server.faults = Faults(unparseable=1.0)
    backend = OpenAIBackend(annotate_config(server.base_url))
    described, instructed = complete_all(backend, describe_request(), instruct_request())
    assert isinstance(described, Completion) and isinstance(instructed, Completion)
    (describer_body,) = [b for b in server.bodies if b["model"] == "vlm-test"]
    assert described.text == description_for(describer_body)  # describer requests unaffected
    with pytest.raises(json.JSONDecodeError):
        json.loads(instructed.text)


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (parse_retry_after(later) or 0) <= 31
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# concurrency and event loops


def test_requests_run_concurrently_up_to_the_limit(server: ChatServer) -> None:
    server.faults.latency = 0.2
    backend = OpenAIBackend(annotate_config(server.base_url, concurrency=16))
    requests = [instruct_request(f"a red bike number {i}", seed=i) for i in range(16)]
    start = time.monotonic()
    results = complete_all(backend, *requests)
    assert time.monotonic() - start < 1.0  # 16 x 0.2 s sequentially would be 3.2 s
    assert all(isinstance(r, Completion) for r in results)
    assert server.max_in_flight >= 8


def test_concurrency_one_serialises(server: ChatServer) -> None:
    server.faults.latency = 0.1
    backend = OpenAIBackend(annotate_config(server.base_url, concurrency=1))
    start = time.monotonic()
    results = complete_all(backend, *(instruct_request(seed=i) for i in range(4)))
    assert time.monotonic() - start >= 0.4
    assert all(isinstance(r, Completion) for r in results)
    assert server.max_in_flight == 1


def test_one_backend_serves_successive_event_loops(server: ChatServer) -> None:
    backend = OpenAIBackend(annotate_config(server.base_url))
    assert isinstance(complete_one(backend, instruct_request()), Completion)  # closes its client
    assert isinstance(asyncio.run(backend.complete(instruct_request())), Completion)  # no aclose
    assert isinstance(asyncio.run(backend.complete(instruct_request())), Completion)
    assert len(server.requests) == 3


# the loopback server itself


def test_fault_draws_are_reproducible() -> None:
    def faults_seen(seed: int) -> list[str | None]:
        with ChatServer(Faults(http_500=0.3, empty=0.2, seed=seed)) as chat:
            backend = OpenAIBackend(annotate_config(chat.base_url, max_retries=0))
            complete_all(backend, *(instruct_request(f"bike {i}", seed=i) for i in range(24)))
            by_seed = {r.body["seed"]: r.fault for r in chat.requests}
        return [by_seed[i] for i in range(24)]

    first = faults_seen(seed=5)
    assert first == faults_seen(seed=5)
    assert first != faults_seen(seed=6)
    assert {"http_500", "empty", None} <= set(first)


def test_default_instructions_read_like_search_requests() -> None:
    def body(caption: str) -> dict:
        return {"messages": [{"role": "user", "content": f"Target image caption: {caption}"}]}

    answers = [instructions_for(body(c)) for c in ("a red kite", "an old stone bridge")]
    for instructions in answers:
        assert 3 <= len(instructions) <= 4 and len(set(instructions)) == len(instructions)
        for instruction in instructions:
            assert 4 <= len(instruction.split()) <= 20
            assert not re.search(r"\b(first|second) image\b", instruction)
    assert answers[0] != answers[1]
    assert any("kite" in i for i in answers[0]) and any("bridge" in i for i in answers[1])
