"""Several servers of one annotation role: which one gets the next request, which are out.

A `ServerPool` holds the servers (base URLs) of one role of the `openai` backend. Each
attempt of a request picks a server (`pick`) and hands it back with its outcome (`done`);
a retry is a new attempt, so it picks again.

- Choice: the server with the fewest attempts in flight, ties broken round-robin. Fewest in
  flight is what a load balancer's least-connections rule does: a slower or more loaded
  server holds more requests in flight and gets fewer new ones, while equal servers are
  used in turn.
- Health: an attempt that ends in a transport-level failure (`HEALTH_FAILURES`: timeout,
  connection error, HTTP 5xx) takes its server out for a cool-down of `cooldown` seconds,
  doubled each time it fails again after coming back (capped at `cooldown_max`); other
  outcomes (an answer, a 4xx, a 429, a malformed body) mean the server answers. When its
  cool-down has passed the server is on probation: while others are in service it gets
  one attempt at a time; the first answer puts it back in service, a failure takes it out
  again. An answer of an attempt sent before the take-out puts it back too.
- All out: `wait` returns when the earliest cool-down ends (or a server answers again), so
  a request waits rather than fails; every attempt still counts against the retry budget.
- One server: never taken out (there is nowhere else to send), as with a single URL before.
Times are monotonic. The pool is used by one event loop at a time (successive loops are
fine); the state of the servers outlives a loop, so a dead server stays out across parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Failure reasons of an attempt that say the server, not the request, is in trouble.
HEALTH_FAILURES = frozenset({"timeout", "connection_error", "server_error"})
MAX_DOUBLINGS = 32  # 2**32 cool-downs is past any cap; keeps the arithmetic finite


@dataclass(frozen=True)
class ServerStats:
    """What one server of a role did; `url` carries no credentials."""

    url: str
    requests: int  # attempts sent to it
    failures: int  # of those, transport-level failures
    taken_out: int  # times taken out (at the readiness check or after a failure)
    in_service: bool  # False while it sits out a cool-down or has not answered since


@dataclass
class Server:
    """One base URL and its health; `url` may hold credentials, `label` does not."""

    url: str
    label: str
    index: int
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    taken_out: int = 0
    relapses: int = 0  # take-outs since it last answered: the cool-down's exponent
    out_until: float | None = None  # when its cool-down ends; None: in service

    def cooling(self, now: float) -> bool:
        return self.out_until is not None and now < self.out_until

    def on_probation(self, now: float) -> bool:
        return self.out_until is not None and now >= self.out_until

    def stats(self) -> ServerStats:
        in_service = self.out_until is None
        return ServerStats(self.label, self.requests, self.failures, self.taken_out, in_service)


class ServerPool:
    """The servers of one role (`name`, e.g. "annotate.describer"), in config order."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        *,
        cooldown: float = 5.0,
        cooldown_max: float = 300.0,
        label: Callable[[str], str] = str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError(f"{name}: no server URL")
        self.name = name
        self.servers = [Server(url, label(url), i) for i, url in enumerate(urls)]
        self.cooldown = cooldown
        self.cooldown_max = cooldown_max
        self._clock = clock
        self._turn = 0  # round-robin start among equally loaded servers
        self._waking: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def pick(self) -> Server | None:
        """A server for one attempt (counted in flight until `done`); None when all are out."""
        now = self._clock()
        healthy = [s for s in self.servers if s.out_until is None]
        back = [s for s in self.servers if s.on_probation(now)]
        # beside servers in service, one on probation gets one attempt at a time
        candidates = healthy + [s for s in back if s.in_flight == 0] if healthy else back
        if not candidates:
            return None
        count = len(self.servers)
        server = min(candidates, key=lambda s: (s.in_flight, (s.index - self._turn) % count))
        self._turn = server.index + 1
        server.in_flight += 1
        server.requests += 1
        return server

    def done(self, server: Server, failure: str | None) -> None:
        """Hand back `server` after an attempt that ended with `failure` (None: answered)."""
        self.release(server)
        if failure in HEALTH_FAILURES:
            server.failures += 1
            if len(self.servers) > 1 and not server.cooling(self._clock()):
                self.take_out(server, failure)
        elif server.out_until is not None:
            server.out_until, server.relapses = None, 0
            logger.warning("%s: server %s answers again; back in service", self.name, server.label)
            self._wake()

    def release(self, server: Server) -> None:
        """Hand back `server` after an attempt without an outcome (cancelled)."""
        server.in_flight -= 1

    def take_out(self, server: Server, why: str) -> None:
        """Take `server` out for its next cool-down; it is tried again after it."""
        seconds = self.cooldown * 2 ** min(server.relapses, MAX_DOUBLINGS)
        seconds = min(seconds, self.cooldown_max)
        server.out_until = self._clock() + seconds
        server.relapses += 1
        server.taken_out += 1
        serving = sum(s.out_until is None for s in self.servers)
        logger.warning(
            "%s: server %s taken out for %.3g s after %s (%d of %d in service)",
            self.name,
            server.label,
            seconds,
            why,
            serving,
            len(self.servers),
        )

    async def wait(self) -> None:
        """Return once a server may be picked: at once unless every server is cooling down."""
        while True:
            now = self._clock()
            if not all(s.cooling(now) for s in self.servers):
                return
            soonest = min(s.out_until or now for s in self.servers)
            try:
                async with asyncio.timeout(soonest - now):
                    await self._event().wait()
            except TimeoutError:
                pass

    def stats(self) -> list[ServerStats]:
        return [server.stats() for server in self.servers]

    def _event(self) -> asyncio.Event:
        """The event the running loop's waiters wait on; set when a server comes back."""
        loop = asyncio.get_running_loop()
        if self._waking is None or self._waking[0] is not loop:
            self._waking = (loop, asyncio.Event())
        return self._waking[1]

    def _wake(self) -> None:
        if self._waking is not None:
            self._waking[1].set()
            self._waking = None
