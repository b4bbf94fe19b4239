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
import os
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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

from megapairs.annotation.backends.base import BACKENDS
from megapairs.annotation.backends.servers import Server, ServerPool, ServerStats
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    ImagePart,
    PromptRequest,
    Role,
)
from megapairs.config import AnnotateConfig, EndpointConfig

logger = logging.getLogger(__name__)

RETRIED_REASONS = frozenset(
    {"timeout", "connection_error", "server_error", "rate_limited", "malformed_response"}
)
RAW_LIMIT = 20_000  # characters of a response body kept in BackendError.raw
EXCERPT_LIMIT = 200  # characters of a response body quoted in an error's detail
CLIENT_ERROR_HINTS = {
    401: "check the API key in the endpoint's api_key_env variable",
    403: "check the API key in the endpoint's api_key_env variable",
    404: "check base_url (it ends before /chat/completions) and the served model name",
    413: "lower annotate.image_max_side or the prompt size",
}


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

    def __init__(self, config: AnnotateConfig) -> None:
        self.config = config
        self._endpoints: dict[Role, EndpointConfig] = {
            "describer": config.describer,
            "instructor": config.instructor,
        }
        self._pools = {role: server_pool(role, ep) for role, ep in self._endpoints.items()}
        self._state: _LoopState | None = None

    def __repr__(self) -> str:
        models = {role: ep.model for role, ep in self._endpoints.items()}
        return f"OpenAIBackend(models={models}, concurrency={self.config.concurrency})"

    def model_name(self, role: Role) -> str:
        return self._endpoints[role].model

    def server_stats(self) -> dict[Role, list[ServerStats]]:
        """Per role, what each of its servers did (requests, failures, times taken out)."""
        return {role: pool.stats() for role, pool in self._pools.items()}

    def check_ready(self) -> None:
        """Fail early, before any pair is sent, when no server of a role can be reached or a
        server does not serve the configured model (GET /models, where the server has it).
        Servers that cannot be reached while others of their role can are taken out."""
        for role, endpoint in self._endpoints.items():
            down = check_servers(role, endpoint)
            pool = self._pools[role]
            for server in pool.servers:
                if server.url in down:
                    pool.take_out(server, f"the readiness check ({down[server.url]})")

    async def complete(self, request: PromptRequest) -> Completion:
        endpoint = self._endpoints[request.role]
        body = request_body(endpoint, request)
        attempt_number = 0
        try:
            async for attempt in self._retrying():
                with attempt:
                    attempt_number = attempt.retry_state.attempt_number
                    text = await self._attempt(request.role, body)
                    return Completion(text=text, attempts=attempt_number)
        except _AttemptFailed as failed:
            error = failed.error
            error.attempts = attempt_number
            if attempt_number > 1:
                error.detail += f" (gave up after {attempt_number} attempts)"
            raise error from failed.__cause__
        raise AssertionError("unreachable: the retry loop returns or raises")

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

    async def _attempt(self, role: Role, body: dict[str, Any]) -> str:
        """One HTTP attempt on a server of `role`: the answer's content, or `_AttemptFailed`."""
        endpoint, state = self._endpoints[role], self._loop_state()
        key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
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
                reason = _redact(f"{type(exc).__name__}: {exc}", key)
                detail = f"could not talk to {where} ({reason}); is the server up?"
                raise _AttemptFailed(BackendError("connection_error", detail)) from exc
            except httpx.HTTPError as exc:  # e.g. a body that does not decode (bad gzip)
                reason = _redact(f"{type(exc).__name__}: {exc}", key)
                detail = f"{where} sent a response that could not be read ({reason})"
                raise _AttemptFailed(BackendError("malformed_response", detail)) from exc
            return read_answer(response, where, key)


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
    """None when `base_url` answers GET /models, else what could not be reached (no
    credentials); raises RuntimeError when it is not an http(s) URL (it never will be) or
    lists other models only."""
    url = base_url.rstrip("/") + "/models"
    key = os.environ.get(endpoint.api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = client.get(url, headers=headers)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
        raise RuntimeError(
            f"annotate.{role}: cannot reach {safe_url(url)}: not an http(s) URL "
            f"({type(err).__name__})"
        ) from None
    except httpx.HTTPError as err:
        return f"{safe_url(url)} ({type(err).__name__})"
    if response.status_code != 200:
        return None  # not every server lists its models; the first request will tell
    try:
        served = [item["id"] for item in response.json().get("data", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if served and endpoint.model not in served:
        raise RuntimeError(
            f"annotate.{role}.model {endpoint.model!r} is not served at "
            f"{safe_url(base_url)}; it serves: {', '.join(served)}"
        )
    return None


def request_body(endpoint: EndpointConfig, request: PromptRequest) -> dict[str, Any]:
    """The chat-completions JSON body of `request`; `extra_body` fields win."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": [to_openai_message(m) for m in request.messages],
        "temperature": endpoint.temperature,
        "top_p": endpoint.top_p,
        "max_tokens": endpoint.max_tokens,
        "seed": request.seed,
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


def read_answer(response: httpx.Response, where: str, key: str = "") -> str:
    """The content of a chat-completions answer, or `_AttemptFailed` saying what went wrong."""
    status = response.status_code
    raw = _redact(response.text, key)
    excerpt = _excerpt(raw)
    if status == 429 or status >= 500:
        reason = "rate_limited" if status == 429 else "server_error"
        hint = "; lower annotate.concurrency" if status == 429 else ""
        detail = f"{where} answered HTTP {status}: {excerpt}{hint}"
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status not in (429, 503):
            retry_after = None
        raise _AttemptFailed(BackendError(reason, detail, raw=raw[:RAW_LIMIT]), retry_after)
    if status != 200:
        hint = CLIENT_ERROR_HINTS.get(status, "check max_tokens and the endpoint's extra_body")
        detail = f"{where} refused the request with HTTP {status}: {excerpt}; {hint}"
        raise _AttemptFailed(BackendError("client_error", detail, raw=raw[:RAW_LIMIT]))
    content, problem = _content(response)
    if content is None and _finish_reason(response) == "length":
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
    return content


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


def _redact(text: str, key: str) -> str:
    return text.replace(key, "<redacted>") if key else text


def _excerpt(text: str) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    if not flat:
        return "(empty body)"
    return repr(flat[:EXCERPT_LIMIT] + ("..." if len(flat) > EXCERPT_LIMIT else ""))


@BACKENDS.register("openai")
def build_openai_backend(config: AnnotateConfig) -> OpenAIBackend:
    """The `openai` backend; both endpoints must name their served model."""
    for role in ("describer", "instructor"):
        if not getattr(config, role).model:
            raise ValueError(
                f"annotate.{role}.model is empty: set it to the model name the server serves"
            )
    return OpenAIBackend(config)
