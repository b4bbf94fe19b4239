"""An OpenAI-compatible chat-completions server on loopback, with fault injection.

Tests and the annotation benchmark run the `openai` backend against it: a real HTTP/1.1
server (stdlib `ThreadingHTTPServer`, one thread per keep-alive connection) answering
`POST /v1/chat/completions` in the OpenAI response shape and recording every request.

Default answers: a request with `image_url` parts is a describer request and gets a
description built from the words of the prompt's caption lines, about as many words as
the prompt asks for; any other request is an instructor (or repair) request and gets
`{"instructions": [...]}` with three or four distinct search requests that reuse those
caption words. Pass `answer=` to replace them (a callable returning the content, or
(content, finish_reason)).

What the server sees and checks, as real servers do:
- images: it decodes them; asked about colours (the describer's capability probe), it
  names each image's colour. `sees_images=False` plays a text-only model behind an
  OpenAI-compatible server: images are dropped silently (no colours, no tokens counted).
- `usage.prompt_tokens`: the prompt's words plus `image_tokens` per image it sees.
- `api_key`: every route wants `Authorization: Bearer <api_key>`, else HTTP 401 whose
  message echoes the key it got (as careless servers do: clients must redact it).
- `models`: listed by `GET /v1/models` (unless `list_models=False`: then 404, as servers
  without that route) and the only ones served: another model's chat request gets a 404.

Faults are drawn per request from a RNG seeded by (seed, request body, how many times
that body was seen), so a run's faults do not depend on thread timing, and a retried
request gets a fresh draw. `Faults.rule(body)` may name a fault for chosen requests.
`kill()` makes the server die as a crashed process does (connections refused, open ones
dropped, requests in flight unanswered); `revive()` serves again on the same port.

As a script (for the benchmark; prints the base URL on the first line, serves until killed):
    python tests/chat_server.py --port 0 --latency 0.2 --jitter 0.05 --error-rate 0.05 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import random
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megapairs.annotation.backends.probe import PALETTE

Body = dict[str, Any]

# Faults drawn by probability, in this order; the rule may also name the RULE_ONLY ones.
DRAWN_FAULTS = ("http_500", "http_429", "timeout", "malformed_json", "unparseable", "empty")
RULE_ONLY_FAULTS = ("http_400", "http_401", "http_503", "disconnect")
FAULT_NAMES = DRAWN_FAULTS + RULE_ONLY_FAULTS

_STOPWORD_TEXT = """the and for with from into onto over under near its are was were been this that
these those there their his her our your than then very some any each both other another more most
few one two three not but about above below caption captions image images query target picture
pictures photo photos none"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())  # words under three letters are skipped anyway
FALLBACK_WORDS = ("scene", "object", "colour", "shape", "light", "setting")


@dataclass
class Faults:
    """What goes wrong, and how slow the server is; mutable while the server runs."""

    http_500: float = 0.0  # probability of an HTTP 500
    http_429: float = 0.0  # probability of an HTTP 429 with `Retry-After: retry_after`
    timeout: float = 0.0  # probability of hanging `hang` seconds before answering
    malformed_json: float = 0.0  # probability of an HTTP 200 with a broken JSON body
    unparseable: float = 0.0  # instructor requests: prose content instead of the JSON format
    empty: float = 0.0  # probability of an empty content
    latency: float = 0.0  # seconds before each answer
    jitter: float = 0.0  # latency varies uniformly by +- jitter
    retry_after: int = 1  # seconds, sent with 429 and 503
    hang: float = 5.0  # seconds a `timeout` request hangs (longer than the client waits)
    seed: int = 0
    rule: Callable[[Body], str | None] | None = None  # a fault name for chosen requests

    def __post_init__(self) -> None:
        chances = [getattr(self, name) for name in DRAWN_FAULTS]
        if any(not 0.0 <= p <= 1.0 for p in chances) or sum(chances) > 1.0:
            raise ValueError(f"fault probabilities must lie in [0, 1] and sum to <= 1: {self}")

    def draw(self, body: Body, rng: random.Random) -> str | None:
        """The fault for this request: the rule's choice first, else a random one."""
        if self.rule is not None:
            chosen = self.rule(body)
            if chosen is not None:
                if chosen not in FAULT_NAMES:
                    raise ValueError(f"unknown fault {chosen!r}; known: {FAULT_NAMES}")
                return chosen
        roll = rng.random()
        for name in DRAWN_FAULTS:
            roll -= getattr(self, name)
            if roll < 0:
                return name
        return None

    def delay(self, rng: random.Random) -> float:
        return max(0.0, self.latency + rng.uniform(-self.jitter, self.jitter))


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received and the fault it got (None: answered normally)."""

    body: Body
    headers: dict[str, str]
    fault: str | None
    time: float


@dataclass
class _Reply:
    status: int
    payload: bytes
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    disconnect: bool = False
    record: RecordedRequest | None = None  # the chat request this reply answers


class ChatServer:
    """A loopback chat-completions server: `with ChatServer(Faults(...)) as server: ...`."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        answer: Callable[[Body], str | tuple[str, str]] | None = None,
        models: tuple[str, ...] = (),
        list_models: bool = True,
        api_key: str | None = None,
        sees_images: bool | Callable[[Body], bool] = True,
        image_tokens: int = 64,
    ) -> None:
        self.faults = faults or Faults()
        self.models = models  # listed by GET /v1/models (empty: the list is empty, any served)
        self.list_models = list_models
        self.api_key = api_key  # None: no key wanted
        self.sees_images = sees_images  # or per request: a callable of the body
        self.image_tokens = image_tokens
        self.answer = answer or default_answer
        self._address = (host, port)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._answered: list[RecordedRequest] = []
        self._dead = False
        # die (as `kill`) on receiving this many chat requests: exactly that many are recorded
        self.die_after: int | None = None
        self._port: int | None = None  # of the last start, for `revive`
        self._seen: Counter[str] = Counter()
        self._in_flight = 0
        self.max_in_flight = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> str:
        """Start serving in a daemon thread; returns the base URL `http://host:port/v1`."""
        httpd = _HTTPServer(self._address, _Handler)
        httpd.chat = self
        self._httpd = httpd
        self._port = httpd.server_port
        self._stopping.clear()
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="chat-server"
        )
        self._thread.daemon = True
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving; hanging requests are woken and their threads left to finish."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def kill(self) -> None:
        """Die as a crashed server does: new connections are refused, open ones dropped, and
        requests received but not yet answered never are (`requests` keeps them)."""
        with self._lock:
            self._dead = True
        httpd = self._httpd
        self.stop()
        if httpd is not None:
            httpd.drop_connections()

    def revive(self) -> str:
        """Serve again, on the port of the last start; returns the base URL."""
        with self._lock:
            self._dead = False
        if self._port is not None:
            self._address = (self._address[0], self._port)
        return self.start()

    def __enter__(self) -> ChatServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return f"http://{self._address[0]}:{self._httpd.server_port}/v1"

    # what was seen
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def bodies(self) -> list[Body]:
        return [r.body for r in self.requests]

    @property
    def answered(self) -> list[RecordedRequest]:
        """The chat requests whose reply was sent (a killed server's unanswered ones are not)."""
        with self._lock:
            return list(self._answered)

    def fault_counts(self) -> Counter[str]:
        """How many requests got each fault ("ok": none)."""
        return Counter(r.fault or "ok" for r in self.requests)

    def reset(self) -> None:
        """Forget recorded requests and the in-flight maximum (faults stay)."""
        with self._lock:
            self._requests.clear()
            self._answered.clear()
            self.max_in_flight = self._in_flight

    # serving
    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _reply(self, raw: bytes, headers: dict[str, str]) -> _Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            return _Reply(400, _error_payload("the body is not JSON", "invalid_request_error"))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _Reply(400, _error_payload("'messages' is required", "invalid_request_error"))
        refused = self._refusal(headers, body)
        if refused is not None:
            return refused
        sees = self.sees_images(body) if callable(self.sees_images) else self.sees_images
        if not sees:
            body = without_images(body)
        faults = self.faults
        rng = self._rng(raw, faults.seed)
        fault = faults.draw(body, rng)
        if fault == "unparseable" and is_describer_request(body):
            fault = None
        record = RecordedRequest(body, headers, fault, time.time())
        with self._lock:
            if self._dead:
                return _Reply(200, b"", disconnect=True)
            self._requests.append(record)
            if self.die_after is not None and len(self._requests) >= self.die_after:
                self._dead = True  # from this request on, under the same lock
                threading.Thread(target=self.kill, daemon=True).start()
        reply = _fault_reply(fault, body, headers, faults) if fault else None
        if reply is None:
            answer = self.answer(body)
            content, finish = answer if isinstance(answer, tuple) else (answer, "stop")
            tokens = prompt_tokens(body, self.image_tokens)
            reply = _Reply(200, _completion_payload(body, content, finish, tokens))
        reply.delay += faults.delay(rng) + (faults.hang if fault == "timeout" else 0.0)
        reply.record = record
        return reply

    def _refusal(self, headers: dict[str, str], body: Body | None) -> _Reply | None:
        """A 401 for a missing or wrong key, a 404 for a model not served; else None."""
        if self.api_key is not None:
            key = headers.get("authorization", "").removeprefix("Bearer ")
            if key != self.api_key:
                message = f"Incorrect API key provided: {key}"
                return _Reply(401, _error_payload(message, "authentication_error"))
        model = (body or {}).get("model")
        if body is not None and self.models and model not in self.models:
            message = f"The model `{model}` does not exist."
            return _Reply(404, _error_payload(message, "NotFoundError"))
        return None

    def _delivering(self, reply: _Reply) -> bool:
        """Whether to send `reply` (not when dead); counts a chat request as answered."""
        with self._lock:
            if self._dead:
                return False
            if reply.record is not None:
                self._answered.append(reply.record)
            return True

    def _rng(self, raw: bytes, seed: int) -> random.Random:
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            seen = self._seen[digest]
            self._seen[digest] += 1
        return random.Random(f"{seed}:{digest}:{seen}")

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # many clients connect at once
    chat: ChatServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.connections: set[socket.socket] = set()  # open client connections
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Shut every open connection, as the death of the server process would."""
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (~40 ms)
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        chat = self.server.chat
        headers = {k.lower(): v for k, v in self.headers.items()}
        refused = chat._refusal(headers, None)
        if refused is not None:
            self._send(refused)
        elif self.path.rstrip("/") == "/v1/models" and chat.list_models:
            listed = [{"id": name, "object": "model"} for name in self.server.chat.models]
            models = {"object": "list", "data": listed}
            self._send(_Reply(200, json.dumps(models).encode()))
        else:
            self._send(_Reply(404, _error_payload(f"no route {self.path}", "not_found")))

    def do_POST(self) -> None:
        chat = self.server.chat
        chat._enter()
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/chat/completions":
                reply = _Reply(404, _error_payload(f"no route {self.path}", "not_found"))
            else:
                reply = chat._reply(raw, {k.lower(): v for k, v in self.headers.items()})
            chat._sleep(reply.delay)
            if reply.disconnect or not chat._delivering(reply):
                self.close_connection = True
            else:
                self._send(reply)
        except OSError:  # the client went away, or the server was killed
            self.close_connection = True
        finally:
            chat._leave()

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply.payload)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.payload)


def _fault_reply(fault: str, body: Body, headers: dict[str, str], faults: Faults) -> _Reply | None:
    """The reply that injects `fault`; None where the fault only changes the content."""
    wait = {"Retry-After": str(faults.retry_after)}
    if fault == "http_500":
        return _Reply(500, _error_payload("injected internal error", "server_error"))
    if fault == "http_503":
        return _Reply(503, _error_payload("injected overload", "server_error"), headers=wait)
    if fault == "http_429":
        return _Reply(429, _error_payload("injected rate limit", "rate_limit"), headers=wait)
    if fault == "http_400":
        return _Reply(400, _error_payload("injected bad request", "invalid_request_error"))
    if fault == "http_401":  # echoes the key, as careless servers do: clients must redact it
        key = headers.get("authorization", "").removeprefix("Bearer ")
        return _Reply(401, _error_payload(f"Incorrect API key provided: {key}", "auth"))
    if fault == "disconnect":
        return _Reply(200, b"", disconnect=True)
    if fault == "timeout":
        return None  # answered normally, after hanging
    if fault == "malformed_json":
        return _Reply(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
    if fault == "unparseable":
        prose = "Sure! " + " ".join(instructions_for(body)) + " Hope this helps."
        return _Reply(200, _completion_payload(body, prose))
    if fault == "empty":
        return _Reply(200, _completion_payload(body, ""))
    raise ValueError(f"unknown fault {fault!r}")


def _error_payload(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()


def _completion_payload(
    body: Body, content: str, finish_reason: str = "stop", prompt_tokens: int | None = None
) -> bytes:
    prompt_words = len(prompt_text(body).split()) if prompt_tokens is None else prompt_tokens
    answer = {
        "id": f"chatcmpl-{hashlib.sha256(content.encode()).hexdigest()[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(content.split()),
            "total_tokens": prompt_words + len(content.split()),
        },
    }
    return json.dumps(answer).encode()


# default answers
def is_describer_request(body: Body) -> bool:
    """Whether any message carries an `image_url` part (or did, before a text-only server
    dropped them)."""
    dropped = bool(body.get(DROPPED_IMAGES))
    return dropped or any(part.get("type") == "image_url" for part in _parts(body))


def prompt_text(body: Body) -> str:
    """All text of the request's messages, in order."""
    return "\n".join(part.get("text", "") for part in _parts(body) if part.get("type") == "text")


def caption_words(text: str) -> list[str]:
    """Content words of the pair's two caption lines (the last two `... caption: ...` lines,
    after any demonstrations; else of the whole text), in order."""
    lines = [ln.split(":", 1)[-1] for ln in text.splitlines() if "caption:" in ln.lower()]
    words = _content_words(" ".join(lines[-2:])) or _content_words(text)
    return words or list(FALLBACK_WORDS)


def default_answer(body: Body) -> str:
    if is_describer_request(body):
        if "colour of the first image" in prompt_text(body).lower():  # asked to name colours
            return colours_answer(body)
        return description_for(body)
    return json.dumps({"instructions": instructions_for(body)})


COLOURS = PALETTE  # the colour names a seeing server knows: those the probe uses


def colours_answer(body: Body) -> str:
    """The colour of each image, named as the nearest of `COLOURS` to its mean pixel."""
    names = [nearest_colour(image_pixels(url)) for url in image_data_urls(body)]
    return "The images are " + " and ".join(names) + "."


def nearest_colour(rgb: tuple[float, float, float]) -> str:
    return min(
        COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(COLOURS[n], rgb, strict=True))
    )


def image_pixels(data_url: str) -> tuple[float, float, float]:
    """The mean RGB colour of a base64 data URL's image."""
    import base64
    import io

    from PIL import Image, ImageStat

    data = base64.b64decode(data_url.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        red, green, blue = ImageStat.Stat(image.convert("RGB")).mean
    return red, green, blue


def image_data_urls(body: Body) -> list[str]:
    return [p["image_url"]["url"] for p in _parts(body) if p.get("type") == "image_url"]


def prompt_tokens(body: Body, per_image: int) -> int:
    """The prompt's words plus `per_image` tokens for each image."""
    return len(prompt_text(body).split()) + per_image * len(image_data_urls(body))


DROPPED_IMAGES = "_images_dropped"  # marks a body whose images a text-only server dropped


def without_images(body: Body) -> Body:
    """`body` with its image parts dropped, as a text-only model's server does."""
    if not image_data_urls(body):
        return body
    messages = []
    for message in body.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            kept = [p for p in content if not (isinstance(p, dict) and "image_url" in p)]
            message = {**message, "content": kept}
        messages.append(message)
    return {**body, "messages": messages, DROPPED_IMAGES: True}


def description_for(body: Body) -> str:
    """A description of about the requested number of words, from the captions' words."""
    text = prompt_text(body)
    budget = re.search(r"\b(\d{2,3})\s+words\b", text)
    target = int(budget.group(1)) if budget else 70
    found = caption_words(text)
    words = itertools.cycle(found + [w for w in FALLBACK_WORDS if w not in found])
    templates = (
        "Both pictures share the {} and the {} in a similar arrangement.",
        "The target keeps the {} but places it beside a {} instead.",
        "Its {} looks brighter, while the {} stands closer to the viewer.",
        "A {} appears in the background and the {} changes its colour.",
        "Soft daylight falls on the {} from the left, leaving the {} in shade.",
        "Near the edge of the frame, a small {} rests against a wide {}.",
        "Seen from slightly higher up, the {} seems smaller than the {}.",
        "Overall the mood turns calmer, with the {} framed by a muted {}.",
    )
    sentences: list[str] = []
    count = 0
    for template in itertools.cycle(templates):
        if count >= target - 5:
            break
        sentence = template.format(next(words), next(words))
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


def instructions_for(body: Body) -> list[str]:
    """Three or four distinct search requests (4-20 words) that reuse the captions' words."""
    text = prompt_text(body)
    rng = random.Random(hashlib.sha256(text.encode()).hexdigest())
    words = caption_words(text)
    templates = [
        "find a {} like this one but placed next to a {}",
        "show me the same kind of {} with more {} around it",
        "I want a photo of this {} in a {} setting instead",
        "search for a {} that shares its style with a {}",
        "looking for a close view of a {} resting on a {}",
    ]
    rng.shuffle(templates)
    count = rng.choice((3, 4))
    return [t.format(rng.choice(words), rng.choice(words)) for t in templates[:count]]


def _parts(body: Body) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for message in body.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            parts.extend(p for p in content if isinstance(p, dict))
    return parts


def _content_words(text: str) -> list[str]:
    found = (w.lower() for w in re.findall(r"[A-Za-z]{3,}", text))
    return list(dict.fromkeys(w for w in found if w not in STOPWORDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- seconds on the latency")
    parser.add_argument("--error-rate", type=float, default=0.0, help="half 500s, half 429s")
    parser.add_argument("--retry-after", type=int, default=1, help="seconds, sent with 429")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faults = Faults(
        http_500=args.error_rate / 2,
        http_429=args.error_rate / 2,
        latency=args.latency,
        jitter=args.jitter,
        retry_after=args.retry_after,
        seed=args.seed,
    )
    server = ChatServer(faults, host=args.host, port=args.port)
    print(server.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
