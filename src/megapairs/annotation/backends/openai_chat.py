"""The `openai` backend: any OpenAI-compatible chat-completions server.

It talks to vLLM, SGLang, the llama.cpp server, Ollama and hosted APIs alike: one
`POST {base_url}/chat/completions` per request, images as base64 data URLs in
`image_url` content parts, the per-pair seed in `seed`, and the endpoint's
`extra_body` merged into the JSON body. The describer and the instructor may be
different servers, and each may be several servers of the same model (`base_url` a
list): every attempt picks one (`servers.ServerPool`: fewest in flight, a server that
times out, refuses connections or answers 5xx sits out a growing cool-down and the retry
goes elsewhere); `server_stats()` says what each did. The API key is read from the
environment variable named by the endpoint's `api_key_env` at send time, sent as
`Authorization: Bearer ...` only when set, and never logged or written into an error.

Retry policy (per request, `max_retries` retries after the first attempt):
- retried: timeouts, connection errors, HTTP 429 and 5xx, and malformed answers (an
  HTTP 200 whose body is not JSON or has no string `choices[0].message.content`);
- waits: exponential backoff with full jitter (`backoff_initial` doubling, capped at
  `backoff_max`); a 429 or 503 carrying `Retry-After` (seconds or an HTTP date) waits
  that long instead, also capped at `backoff_max`;
- not retried: any other 4xx (`client_error`) and an answer whose content is empty
  (`empty_response`): resending the same request would not change them.
A request that fails for good raises `BackendError` with the reason of its last attempt.
Answers that mean the configuration is wrong (HTTP 401, 403 and 404: a refused key, a
wrong base_url or model name) raise `SetupError` instead: the run stops at once and
nothing is cached, so the same command resumes once the setting is fixed.

Start-up (`check_ready`): each server's `GET /models` must answer (401/403 and other
non-200s but 404/405, "no model list", stop the run; a listed model set without ours
too); a line names each role's model, servers and the proxy from the environment they
go through; then the describer's capability probe (`probe.py`) must see two coloured
squares. A describe answer cut at `max_tokens` (`finish_reason: length`) fails as
`truncated_description`, one whose reported prompt is shorter than its two images
plausibly take (see `probe.PromptFloor`) as `images_ignored`.

Secrets: the key and any password in a URL are registered with `megapairs.redaction`
and replaced by `<redacted>` in every answer, error and log line; plain http with a key
to a host that is not this machine is refused unless the endpoint's `allow_insecure`.
At most `concurrency` HTTP requests are in flight, over all servers (a semaphore; a
request waiting to retry, or for a server to come back, does not hold a slot). The HTTP
client and the semaphore belong to the running event loop: they are created on first
use in a loop and released by `aclose()`.
HTTP goes through httpx2 (httpx's maintained fork, installed with transformers) when
present, else httpx: httpcore 1.0's connection pool costs several times more CPU per
request with dozens of connections open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import logging
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

try:  # httpx's maintained fork: its connection pool stays fast with many connections
    import httpx2 as httpx
except ImportError:  # pragma: no cover - same API; httpcore 1.0 pools cost ~8x more CPU here
    import httpx  # type: ignore[no-redef]

from megapairs.annotation.backends.base import BACKENDS, ROLES
from megapairs.annotation.backends.probe import (
    PromptFloor,
    image_tokens,
    judge_answer,
    new_probe,
)
from megapairs.annotation.backends.servers import Server, ServerPool, ServerStats
from megapairs.annotation.backends.transport import (
    check_transport,
    endpoint_key,
    register_endpoint_secrets,
    route_text,
)
from megapairs.annotation.checks import strip_reasoning
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    ImagePart,
    PromptRequest,
    Role,
    SetupError,
)
from megapairs.config import AnnotateConfig, EndpointConfig
from megapairs.redaction import redact

logger = logging.getLogger(__name__)

RETRIED_REASONS = frozenset(
    {"timeout", "connection_error", "server_error", "rate_limited", "malformed_response"}
)
RAW_LIMIT = 20_000  # characters of a response body kept in BackendError.raw
EXCERPT_LIMIT = 200  # characters of a response body quoted in an error's detail
CLIENT_ERROR_HINTS = {413: "lower annotate.image_max_side or the prompt size"}
KEY_HINT = "check the API key in ${env} (the variable annotate.{role}.api_key_env names)"
SETUP_HINTS = {
    401: KEY_HINT,
    403: KEY_HINT,
    404: "check annotate.{role}.base_url (it ends before /chat/completions) and "
    "annotate.{role}.model (the name the server serves)",
}
NO_MODEL_LIST = frozenset({404, 405})  # GET /models statuses of a server that lists none
RESUME_HINT = "the run stopped and this answer was not cached: fix it and run the same command"


class _AttemptFailed(Exception):
    """One failed attempt: the error it would end with, and a server-requested wait."""

    def __init__(self, error: BackendError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _is_retried(exc: BaseException) -> bool:
    return isinstance(exc, _AttemptFailed) and exc.error.reason in RETRIED_REASONS


@dataclass
class _LoopState:
    """What one event loop owns: the HTTP client and the concurrency slots."""

    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    slots: asyncio.Semaphore


class OpenAIBackend:
    """Describer and instructor requests over OpenAI-compatible chat-completions servers."""

    name = "openai"
    reads_images = True

    def __init__(self, config: AnnotateConfig, roles: tuple[Role, ...] = ROLES) -> None:
        self.config = config
        self._endpoints: dict[Role, EndpointConfig] = {r: getattr(config, r) for r in roles}
        for role, endpoint in self._endpoints.items():
            key = register_endpoint_secrets(endpoint)
            for url in endpoint.base_urls:
                check_transport(f"annotate.{role}", url, bool(key), endpoint.allow_insecure)
        self._pools = {role: server_pool(role, ep) for role, ep in self._endpoints.items()}
        self._state: _LoopState | None = None
        self.prompt_floor: PromptFloor | None = None  # set by the describer's probe

    def __repr__(self) -> str:
        models = {role: ep.model for role, ep in self._endpoints.items()}
        return f"OpenAIBackend(models={models}, concurrency={self.config.concurrency})"

    def model_name(self, role: Role) -> str:
        return self._endpoints[role].model

    def server_stats(self) -> dict[Role, list[ServerStats]]:
        """Per role, what each of its servers did (requests, failures, times taken out)."""
        return {role: pool.stats() for role, pool in self._pools.items()}

    def check_ready(self) -> None:
        """Fail early, before any pair is sent, when no server of a role can be reached, a
        server refuses the key or does not serve the configured model (GET /models, where
        the server has it), or the describer cannot see images (the probe). Servers that
        cannot be reached while others of their role can are taken out."""
        for role, endpoint in self._endpoints.items():
            down = check_servers(role, endpoint)
            pool = self._pools[role]
            for server in pool.servers:
                if server.url in down:
                    pool.take_out(server, f"the readiness check ({down[server.url]})")
            routes = ", ".join(route_text(url) for url in endpoint.base_urls)
            logger.info("annotate.%s: model %r at %s", role, endpoint.model, routes)
            if role == "describer" and endpoint.probe:
                up = [url for url in endpoint.base_urls if url not in down]
                self.prompt_floor = probe_describer(endpoint, up)

    async def complete(self, request: PromptRequest) -> Completion:
        endpoint = self._endpoints[request.role]
        body = request_body(endpoint, request)
        attempt_number = 0
        try:
            async for attempt in self._retrying():
                with attempt:
                    attempt_number = attempt.retry_state.attempt_number
                    answer = await self._attempt(request.role, body)
                    return self._judged(request, replace(answer, attempts=attempt_number))
        except _AttemptFailed as failed:
            error = failed.error
            error.attempts = attempt_number
            if attempt_number > 1:
                error.detail += f" (gave up after {attempt_number} attempts)"
            raise error from failed.__cause__
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _judged(self, request: PromptRequest, answer: Completion) -> Completion:
        """`answer`, or a final `BackendError` for a describe answer cut at max_tokens or
        made from a prompt too short to have held its two images."""
        if request.step != "describe":
            return answer
        endpoint = self._endpoints[request.role]
        if answer.finish_reason == "length":
            detail = (
                f"the description stopped at max_tokens ({endpoint.max_tokens}) before its "
                f"end; raise annotate.{request.role}.max_tokens"
            )
            raise BackendError("truncated_description", detail, answer.attempts, answer.text)
        floor, counted = self.prompt_floor, answer.prompt_tokens
        if floor is not None and counted is not None:
            words = sum(len(m.text.split()) for m in request.messages)
            if counted < floor.minimum(words):
                detail = (
                    f"the server counted {counted} prompt tokens, fewer than the text and two "
                    f"images take (at least {floor.minimum(words)}): it dropped the images"
                )
                raise BackendError("images_ignored", detail, answer.attempts, answer.text)
        return answer

    async def aclose(self) -> None:
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            await state.client.aclose()

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            # A state left by an earlier loop (no aclose) cannot be awaited here: drop it.
            limit = self.config.concurrency
            limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
            client = httpx.AsyncClient(limits=limits)
            self._state = _LoopState(loop, client, asyncio.Semaphore(limit))
        return self._state

    def _retrying(self) -> AsyncRetrying:
        backoff = wait_random_exponential(
            multiplier=self.config.backoff_initial, max=self.config.backoff_max
        )

        def wait(state: RetryCallState) -> float:
            failed = state.outcome.exception() if state.outcome else None
            if isinstance(failed, _AttemptFailed) and failed.retry_after is not None:
                return min(failed.retry_after, self.config.backoff_max)
            return backoff(state)

        return AsyncRetrying(
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(_is_retried),
            before_sleep=before_sleep_log(logger, logging.DEBUG),
            reraise=True,
        )

    async def _attempt(self, role: Role, body: dict[str, Any]) -> Completion:
        """One HTTP attempt on a server of `role`: the answer, or `_AttemptFailed`."""
        endpoint, state = self._endpoints[role], self._loop_state()
        key = endpoint_key(endpoint)
        headers = auth_headers(key)
        async with _server_slot(self._pools[role], state.slots) as server:
            url = chat_url(server.url)
            where = f"model {endpoint.model!r} at {safe_url(url)}"
            try:
                async with asyncio.timeout(endpoint.timeout):
                    response = await state.client.post(
                        url, json=body, headers=headers, timeout=httpx.Timeout(endpoint.timeout)
                    )
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                detail = f"base_url {safe_url(url)!r} is not an http(s) URL ({type(exc).__name__})"
                raise _AttemptFailed(BackendError("client_error", detail)) from exc
            except (httpx.TimeoutException, TimeoutError) as exc:
                detail = (
                    f"no answer from {where} within {endpoint.timeout:g} s "
                    f"({type(exc).__name__}); raise the endpoint timeout or lower concurrency"
                )
                raise _AttemptFailed(BackendError("timeout", detail)) from exc
            except httpx.TransportError as exc:
                reason = redact(f"{type(exc).__name__}: {exc}", key)
                detail = f"could not talk to {where} ({reason}); is the server up?"
                raise _AttemptFailed(BackendError("connection_error", detail)) from exc
            except httpx.HTTPError as exc:  # e.g. a body that does not decode (bad gzip)
                reason = redact(f"{type(exc).__name__}: {exc}", key)
                detail = f"{where} sent a response that could not be read ({reason})"
                raise _AttemptFailed(BackendError("malformed_response", detail)) from exc
            return read_answer(response, where, key, setup_hint(role, endpoint))


@contextlib.asynccontextmanager
async def _server_slot(pool: ServerPool, slots: asyncio.Semaphore) -> AsyncIterator[Server]:
    """A concurrency slot and a server for one attempt, handed back with the attempt's
    outcome; while every server is cooling down it waits without holding a slot."""
    while True:
        await pool.wait()
        await slots.acquire()
        server = pool.pick()
        if server is not None:
            break
        slots.release()
    try:
        yield server
    except _AttemptFailed as failed:
        pool.done(server, failed.error.reason)
        raise
    except BaseException:  # cancelled: no outcome to judge the server by
        pool.release(server)
        raise
    else:
        pool.done(server, None)
    finally:
        slots.release()


def server_pool(role: Role, endpoint: EndpointConfig) -> ServerPool:
    return ServerPool(
        f"annotate.{role}",
        endpoint.base_urls,
        cooldown=endpoint.cooldown,
        cooldown_max=endpoint.cooldown_max,
        label=safe_url,
    )


START_HINT = "start the server (see the README's recipe) or use annotate.backend=template"


def check_servers(role: Role, endpoint: EndpointConfig) -> dict[str, str]:
    """The servers of `role` that cannot be reached, with why (`check_server`); raises
    RuntimeError when none can be, or when one serves other models only."""
    urls = endpoint.base_urls
    timeout = httpx.Timeout(min(endpoint.timeout, 10.0))
    with (
        httpx.Client(timeout=timeout) as client,  # one client: its TLS set-up costs ~0.1 s
        ThreadPoolExecutor(max_workers=min(len(urls), 16)) as threads,
    ):
        problems = list(threads.map(lambda url: check_server(role, endpoint, url, client), urls))
    down = {url: problem for url, problem in zip(urls, problems, strict=True) if problem}
    if len(urls) == 1 and down:
        raise RuntimeError(f"annotate.{role}: cannot reach {down[urls[0]]}; {START_HINT}")
    if len(down) == len(urls):
        listed = ", ".join(down.values())
        raise RuntimeError(
            f"annotate.{role}: cannot reach any of its {len(urls)} servers ({listed}); {START_HINT}"
        )
    return down


def check_server(
    role: Role, endpoint: EndpointConfig, base_url: str, client: httpx.Client
) -> str | None:
    """None when `base_url` answers GET /models (or has no model list), else what could not
    be reached; raises `SetupError` when it refuses the key, answers another error, lists
    other models only, or is not an http(s) URL (it never will be)."""
    url = base_url.rstrip("/") + "/models"
    key = endpoint_key(endpoint)
    try:
        response = client.get(url, headers=auth_headers(key))
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
        raise SetupError(
            f"annotate.{role}: cannot reach {safe_url(url)}: not an http(s) URL "
            f"({type(err).__name__})"
        ) from None
    except httpx.HTTPError as err:
        return f"{safe_url(url)} ({type(err).__name__})"
    status = response.status_code
    if status in NO_MODEL_LIST:
        return None  # not every server lists its models; the first request will tell
    if status >= 500:
        return f"{safe_url(url)} (HTTP {status})"
    if status != 200:
        hint = setup_hint(role, endpoint).get(status, "check the server's settings")
        excerpt = _excerpt(redact(response.text, key))
        raise SetupError(
            f"annotate.{role}: {safe_url(url)} answered HTTP {status}: {excerpt}; {hint}"
        )
    served = served_models(response)
    if served and endpoint.model not in served:
        listed = redact(", ".join(served), key)
        raise SetupError(
            f"annotate.{role}.model {endpoint.model!r} is not served at "
            f"{safe_url(base_url)}; it serves: {listed}"
        )
    return None


def served_models(response: httpx.Response) -> list[str]:
    """The model ids of a GET /models answer (empty when it lists none or is not one)."""
    try:
        return [str(item["id"]) for item in response.json().get("data", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def setup_hint(role: Role, endpoint: EndpointConfig) -> dict[int, str]:
    """What to fix, per HTTP status that means the configuration of `role` is wrong."""
    env = endpoint.api_key_env or "(no variable)"
    return {status: hint.format(env=env, role=role) for status, hint in SETUP_HINTS.items()}


PROBE_TRIES = 3  # a probe that meets a 5xx or a dropped connection is sent again
PROBE_SEED = 0


def probe_describer(endpoint: EndpointConfig, urls: list[str]) -> PromptFloor | None:
    """Send the capability probe to each server in `urls`; raise `SetupError` when one
    cannot see its images. Returns the smallest prompt floor measured (None: unreported)."""
    timeout = httpx.Timeout(endpoint.timeout)
    with (
        httpx.Client(timeout=timeout) as client,
        ThreadPoolExecutor(max_workers=max(1, min(len(urls), 16))) as threads,
    ):
        floors = list(threads.map(lambda url: _probe_server(endpoint, url, client), urls))
    known = [floor for floor in floors if floor is not None]
    return min(known, key=lambda f: f.image_tokens) if known else None


def _probe_server(endpoint: EndpointConfig, url: str, client: httpx.Client) -> PromptFloor | None:
    probe = new_probe()
    where = f"annotate.describer: model {endpoint.model!r} at {safe_url(url)}"
    seen = _probe_answer(endpoint, url, client, probe.messages, where)
    problem = judge_answer(probe, strip_reasoning(seen.text))
    excerpt = _excerpt(seen.text)
    if problem is not None:
        raise SetupError(
            f"{where} cannot see images: asked for the colours of a {probe.colours[0]} and a "
            f"{probe.colours[1]} square, {problem} (answer: {excerpt}); serve a vision-language "
            "model as the describer (a text-only model drops the images silently); "
            "to skip this check set annotate.describer.probe=false"
        )
    if seen.prompt_tokens is None:
        return None
    blind = _probe_answer(endpoint, url, client, probe.text_only, where, max_tokens=1)
    cost = image_tokens(seen.prompt_tokens, blind.prompt_tokens)
    if cost is None or blind.prompt_tokens is None:
        return None
    if cost <= 0:
        raise SetupError(
            f"{where} counted no prompt tokens for the two images of the probe "
            f"({seen.prompt_tokens} with them, {blind.prompt_tokens} without): it drops images; "
            "serve a vision-language model as the describer"
        )
    return PromptFloor(blind.prompt_tokens, cost, probe.words)


def _probe_answer(
    endpoint: EndpointConfig,
    url: str,
    client: httpx.Client,
    messages: tuple[ChatMessage, ...],
    where: str,
    max_tokens: int | None = None,
) -> Completion:
    """The answer to one probe request (tried again on a 5xx or a dropped connection): the
    endpoint's own body (`extra_body` too: a server may need its fields), greedy."""
    body = chat_body(endpoint, messages, PROBE_SEED)
    body.update(temperature=0.0, max_tokens=max_tokens or endpoint.max_tokens)
    key = endpoint_key(endpoint)
    problem = ""
    for _ in range(PROBE_TRIES):
        try:
            response = client.post(chat_url(url), json=body, headers=auth_headers(key))
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}"
            continue
        if response.status_code >= 500:
            problem = f"HTTP {response.status_code}"
            continue
        try:
            return read_answer(response, where, key, setup_hint("describer", endpoint))
        except _AttemptFailed as failed:
            if max_tokens is not None and failed.error.reason in ("truncated", "empty_response"):
                return Completion("", finish_reason="length", prompt_tokens=_usage(response))
            raise SetupError(f"the capability probe failed: {failed.error.detail}") from None
    raise SetupError(f"{where}: the capability probe got no answer ({problem})")


def request_body(endpoint: EndpointConfig, request: PromptRequest) -> dict[str, Any]:
    """The chat-completions JSON body of `request`; `extra_body` fields win."""
    return chat_body(endpoint, request.messages, request.seed)


def chat_body(
    endpoint: EndpointConfig, messages: tuple[ChatMessage, ...], seed: int
) -> dict[str, Any]:
    """A chat-completions JSON body with the endpoint's sampling; `extra_body` fields win."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": [to_openai_message(m) for m in messages],
        "temperature": endpoint.temperature,
        "top_p": endpoint.top_p,
        "max_tokens": endpoint.max_tokens,
        "seed": seed,
    }
    body.update(endpoint.extra_body)
    return body


def to_openai_message(message: ChatMessage) -> dict[str, Any]:
    """A message in the OpenAI format: a plain string when text-only, else content parts."""
    if not any(isinstance(p, ImagePart) for p in message.parts):
        return {"role": message.role, "content": message.text}
    parts: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, ImagePart):
            url = f"data:{part.mime};base64,{base64.b64encode(part.data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": part.text})
    return {"role": message.role, "content": parts}


def read_answer(
    response: httpx.Response, where: str, key: str = "", setup: dict[int, str] | None = None
) -> Completion:
    """A chat-completions answer (secrets redacted), `SetupError` for a status in `setup`
    (the configuration is wrong), or `_AttemptFailed` saying what went wrong."""
    status = response.status_code
    raw = redact(response.text, key)
    excerpt = _excerpt(raw)
    if status == 429 or status >= 500:
        reason = "rate_limited" if status == 429 else "server_error"
        hint = "; lower annotate.concurrency" if status == 429 else ""
        detail = f"{where} answered HTTP {status}: {excerpt}{hint}"
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status not in (429, 503):
            retry_after = None
        raise _AttemptFailed(BackendError(reason, detail, raw=raw[:RAW_LIMIT]), retry_after)
    if setup and status in setup:
        raise SetupError(
            f"{where} refused the request with HTTP {status}: {excerpt}; {setup[status]}; "
            f"{RESUME_HINT}"
        )
    if status != 200:
        hint = CLIENT_ERROR_HINTS.get(status, "check max_tokens and the endpoint's extra_body")
        detail = f"{where} refused the request with HTTP {status}: {excerpt}; {hint}"
        raise _AttemptFailed(BackendError("client_error", detail, raw=raw[:RAW_LIMIT]))
    content, problem = _content(response)
    finish_reason = _finish_reason(response)
    if content is None and finish_reason == "length":
        detail = (
            f"{where} stopped at max_tokens before any answer text (finish_reason length, e.g. "
            "a reasoning model still thinking); raise the endpoint's max_tokens"
        )
        raise _AttemptFailed(BackendError("truncated", detail, raw=raw[:RAW_LIMIT]))
    if content is None:
        detail = f"{where} answered HTTP 200 with {problem}: {excerpt}"
        raise _AttemptFailed(BackendError("malformed_response", detail, raw=raw[:RAW_LIMIT]))
    if not content.strip():
        detail = f"{where} answered with empty content: {excerpt}"
        raise _AttemptFailed(BackendError("empty_response", detail, raw=raw[:RAW_LIMIT]))
    return Completion(redact(content, key), 1, finish_reason, _usage(response))


def _usage(response: httpx.Response) -> int | None:
    """`usage.prompt_tokens` of an answer, when the server reports it."""
    try:
        tokens = response.json()["usage"]["prompt_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _content(response: httpx.Response) -> tuple[str | None, str]:
    """(content, "") for a well-formed answer, else (None, what is wrong with it)."""
    try:
        data = response.json()
    except ValueError:
        return None, "a body that is not JSON"
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, "JSON without choices[0].message.content"
    if not isinstance(content, str):
        return None, f"a content of type {type(content).__name__}, not a string"
    return content, ""


def _finish_reason(response: httpx.Response) -> str | None:
    try:
        reason = response.json()["choices"][0].get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay in seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def chat_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def safe_url(url: str) -> str:
    """`url` without user info or query string, where credentials may hide."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None, query=None))
    except httpx.InvalidURL:
        return "<invalid URL>"


def _excerpt(text: str) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    if not flat:
        return "(empty body)"
    return repr(flat[:EXCERPT_LIMIT] + ("..." if len(flat) > EXCERPT_LIMIT else ""))


@BACKENDS.register("openai")
def build_openai_backend(config: AnnotateConfig, roles: tuple[Role, ...] = ROLES) -> OpenAIBackend:
    """The `openai` backend for `roles`; each of their endpoints must name its served model."""
    for role in roles:
        if not getattr(config, role).model:
            raise ValueError(
                f"annotate.{role}.model is empty: set it to the model name the server serves"
            )
    return OpenAIBackend(config, roles)
