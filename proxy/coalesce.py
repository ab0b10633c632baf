"""coalesce: identical requests in flight at once share one upstream call.

Singleflight, per worker process. The first request for a key (the leader)
starts a *flight*: one task in the app's lifespan nursery that makes the
upstream call and records its head and every chunk. Every request for the
same key while the flight lives — the leader included — is a *subscriber*:
it waits for the head, then reads the recorded chunks from index 0 and then
live, through the same ``UpstreamResponse`` interface an upstream call
offers, so ``relay_response`` sends it without knowing the difference.

Why the flight lives in the lifespan nursery and not in the leader's
request: the leader is just the first to ask. If it hangs up, its request
scope is cancelled, and a call owned by it would die under the followers.
The coalescer owns the call instead, and counts subscribers: when the last
one leaves (hung up, or its deadline fired), nobody wants the answer and the
flight is cancelled, which closes the upstream connection.

What subscribers see mirrors a direct call:

- a ``ProxyError`` before the head (no target answered) is raised to each;
- an error status is a head like any other: each reads the same error body;
- an ``UpstreamError`` after the head is raised by ``aiter`` to each, after
  the chunks that did arrive, so each ends its stream the way a direct relay
  would.

A subscriber that joins late, or falls behind, gets everything it has not
seen yet joined into one chunk: one ASGI send instead of one per upstream
read (docs/ARCHITECTURE.md: each send costs ~0.1 ms on Hypercorn's trio worker).

A flight keeps every chunk, because a subscriber may join at any time and
must start from byte 0 — up to ``limit`` bytes (the largest reply the cache
would store). Past it the flight is *sealed*: newcomers start a flight of
their own, and chunks every current subscriber has read are dropped, so a
long stream costs what its slowest reader lags behind, not its whole size.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
import trio

from .context import Served
from .errors import ProxyError
from .upstream.base import UpstreamError, read_up_to

__all__ = ["Coalescer", "Flight", "FlightResponse"]

log = logging.getLogger("weir.coalesce")


class Flight:
    """One shared upstream call and everything it produced so far.

    ``fetch`` (the coalescer's caller) drives it with ``start``/``push``/
    ``finish``; subscribers only read. State moves one way: waiting →
    head (``status`` set) → done, or waiting → done with ``error``.
    """

    __slots__ = (
        "key", "status", "headers", "chunks", "base", "size", "limit", "sealed", "readers", "done", "complete",
        "error", "failure", "subscribers", "scope", "served", "from_cache", "write", "ttl", "_changed", "span",
    )

    def __init__(self, key: str, deadline: float, limit: int | None = None) -> None:
        self.key = key
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.base = 0  # absolute index of chunks[0]: chunks before it were read by all and dropped
        self.size = 0
        self.limit = limit
        self.sealed = False  # over the limit: no new subscribers, read chunks are dropped
        self.readers: list[FlightResponse] = []
        self.done = False
        self.complete = False  # the body ended normally (not cut, not failed)
        self.error: ProxyError | None = None  # failed before the head
        self.failure: UpstreamError | None = None  # broke after the head
        self.subscribers = 0
        # The flight's own bound: the leader's total deadline. Subscribers
        # enforce their own deadlines on top; this one only stops a flight
        # nobody cancelled from outliving every request that could want it.
        self.scope = trio.CancelScope(deadline=deadline)
        self.served = Served()  # who answered the shared call (its router's record)
        self.from_cache = False  # answered by another worker's entry (L2 lease)
        # Cache intentions merged over subscribers (see caching.CacheLayer).
        self.write = False
        self.ttl = 0.0
        self._changed = trio.Event()
        self.span = None  # the leader's trace span (proxy/tracing.py), which followers link to

    # -- producer side ---------------------------------------------------

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def start(self, status: int, headers: list[tuple[bytes, bytes]], served: Served | None = None) -> None:
        self.status, self.headers = status, headers
        if served is not None:
            self.served = served
        self._wake()

    def push(self, chunk: bytes) -> None:
        if chunk:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if not self.sealed and self.limit is not None and self.size > self.limit:
                self.sealed = True
            if self.sealed:
                self._trim()
            self._wake()

    def _trim(self) -> None:
        low = min((r.seen for r in self.readers), default=self.base + len(self.chunks))
        drop = low - self.base
        if drop > 0:
            del self.chunks[:drop]
            self.base = low

    def finish(self) -> None:
        self.complete = True
        self._end()

    def fail(self, err: ProxyError) -> None:
        self.error = err
        self._end()

    def broke(self, exc: UpstreamError) -> None:
        self.failure = exc
        self._end()

    def _end(self) -> None:
        self.done = True
        self._wake()

    # -- subscriber side -------------------------------------------------

    async def changed(self) -> None:
        await self._changed.wait()


class FlightResponse:
    """A subscriber's view of a flight, shaped like ``UpstreamResponse``."""

    __slots__ = ("_flight", "status", "headers", "_served", "seen")

    def __init__(self, flight: Flight) -> None:
        self._flight = flight
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._served = Served()  # a copy of the flight's, once the head is known
        self.seen = 0  # absolute chunk index this reader has reached

        flight.readers.append(self)

    @property
    def served(self) -> Served:
        """The flight's record, with this subscriber's cache outcome; the
        breaker's verdict is the shared call's, once it closed."""
        self._served.verdict = self._flight.served.verdict
        return self._served

    async def wait_head(self) -> None:
        f = self._flight
        while f.status is None:
            if f.error is not None:
                raise f.error
            if f.done:
                raise ProxyError(502, "the shared upstream call ended without a response", "api_error")
            await f.changed()
        self.status, self.headers = f.status, f.headers
        self._served = msgspec.structs.replace(f.served)

    async def aiter(self) -> AsyncIterator[bytes]:
        f = self._flight
        while True:
            have = f.base + len(f.chunks)
            if self.seen < have:
                start = self.seen - f.base  # never negative: trimming waits for the slowest reader
                chunk = f.chunks[start] if have - self.seen == 1 else b"".join(f.chunks[start:])
                self.seen = have
                yield chunk
                continue
            if f.done:
                if f.failure is not None:
                    raise UpstreamError(f.failure.kind, f.failure.message)
                if not f.complete:
                    raise UpstreamError("reset", "the shared upstream call was cut short")
                return
            await f.changed()

    async def read(self, limit: int) -> bytes:
        return await read_up_to(self.aiter(), limit)


Fetch = Callable[[Flight], Awaitable[None]]


class Coalescer:
    def __init__(self, nursery: trio.Nursery) -> None:
        """``nursery`` is the app's lifespan nursery: flights live there."""
        self._nursery = nursery
        self._flights: dict[str, Flight] = {}
        self.flights_started = 0

    @asynccontextmanager
    async def subscribe(
        self, key: str, fetch: Fetch, *, deadline: float, limit: int | None = None
    ) -> AsyncIterator[tuple[FlightResponse, Flight, bool]]:
        """Join the flight for ``key``, starting it with ``fetch`` if none is
        up (or the one up is sealed); yields (response, flight, is_leader).
        Leaving the block unsubscribes; the last subscriber out cancels an
        unfinished flight. ``limit``: see the module docstring."""
        flight = self._flights.get(key)
        leader = flight is None or flight.sealed
        if leader:
            flight = self._flights[key] = Flight(key, deadline, limit)
            self.flights_started += 1
            self._nursery.start_soon(self._run, flight, fetch)
        assert flight is not None
        flight.subscribers += 1
        reader = FlightResponse(flight)
        try:
            yield reader, flight, leader
        finally:
            flight.readers.remove(reader)
            flight.subscribers -= 1
            if flight.subscribers == 0 and not flight.done:
                flight.scope.cancel()
                self._forget(flight)

    def _forget(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    async def _run(self, flight: Flight, fetch: Fetch) -> None:
        try:
            with flight.scope:
                await fetch(flight)
        except ProxyError as err:
            flight.fail(err)
        except UpstreamError as exc:
            if flight.status is None:
                flight.fail(ProxyError(502, f"upstream failed: {exc.message}", "api_error"))
            else:
                flight.broke(exc)
        except Exception as exc:  # a bug in one flight must not take down the lifespan nursery and the worker with it
            log.exception("coalesced upstream call failed")
            flight.fail(ProxyError(500, f"internal error in the shared upstream call: {type(exc).__name__}", "api_error"))
        finally:
            self._forget(flight)
            if not flight.done:
                # Cancelled: every subscriber left, or the flight's deadline fired.
                if flight.status is None:
                    flight.fail(ProxyError(504, "the shared upstream call did not answer within the deadline", "timeout_error"))
                else:
                    flight.broke(UpstreamError("timeout", "the shared upstream call hit its deadline"))
