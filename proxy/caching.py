"""cache: answer a repeated ``/v1/messages`` request from a stored reply.

Policy (the whole of it lives here; ``cache/`` holds the mechanisms):

- **What is cached.** ``POST /v1/messages`` only. By default
  (``cache.mode = "deterministic"``) a request is cacheable when it sets
  ``temperature: 0``, or opts in with ``x-weir-cache: on`` (the client accepts a
  replayed sample). ``x-weir-cache: off`` bypasses the cache for that request.
  ``cache.mode = "all"`` caches everything not opted out; ``"off"`` nothing.
- **Cache-Control on the request.** ``no-cache``: do not answer from the
  cache, but store the fresh reply. ``no-store``: do not store this reply.
  ``max-age=N``: accept only an entry younger than N seconds, and store the
  reply for at most N seconds.
- **Never stored.** Error statuses; a stream that is not complete and
  well-formed — did not reach ``message_stop``, carried an ``error`` event,
  or broke Anthropic's event grammar anywhere (``stream_is_complete``); a
  body that is not a complete message; anything over ``cache.max_entry_bytes``.
- **The key** is ``cache.keys.cache_key`` over the tenant, the route, the
  ``anthropic-version`` and ``anthropic-beta`` headers and the body minus
  ``stream``/``metadata``/``user``. The tenant is inside the digest: one
  tenant never receives another's entry. A streamed and a plain request
  share an entry; a recorded stream answers a plain request
  (``assemble_message``) and a recorded body a streamed one (``split_message``).
- **Every** ``/v1/messages`` response carries ``x-weir-cache``: ``hit``
  (from L1 or L2), ``miss`` (went upstream), ``coalesced`` (shared another
  request's upstream call, in this worker or — through the L2 lease — another
  one), or ``bypass`` (not cacheable).
- **Stored** per entry: status, the headers worth replaying (content-type,
  request-id, ``anthropic-*`` except ``anthropic-ratelimit-*``, which describe
  the quota at the time and would mislead), the body or the raw SSE events in
  order, and the usage. A hit is sent as one head and one body send.
- **Coalescing** (``cache.coalesce``): concurrent misses for one key and one
  delivery mode share one upstream call (``proxy/coalesce.py``). Across
  workers and hosts, the flight's leader first claims a lease on the key in
  L2; a worker that loses the claim polls L2 (``wait_filled``) every
  ``lease_poll_s`` for the winner's entry, bounded by its own deadline and
  the lease, and falls back to its own upstream call when the lease lapses
  or is released without an entry.
- **A sick L2** (down, slow, corrupt values) is a miss: requests are served
  from upstream and L1; ``cache.tiered`` logs it at most every 30 s.

Decoding a body costs time proportional to its size, so it is done only for
a request that could be cacheable: the ``x-weir-cache`` header and the mode
are checked first, then only ``temperature`` is read (msgspec skips the rest
without building it); the full decode for the key happens after that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from cache import (
    Entry,
    L1Cache,
    L2Backend,
    L2Unavailable,
    TieredCache,
    assemble_message,
    cache_key,
    is_cacheable_request,
    parse_cache_control,
    split_message,
    stream_is_complete,
    tenant_tag,
)

from .coalesce import Coalescer, Flight
from .context import RequestContext, Served
from .errors import ProxyError
from .settings import CacheSettings
from .sse import SSEParser
from .upstream import UpstreamRequest, UpstreamResponse
from .upstream.adapters import BufferedResponse
from .upstream.base import ERROR_BODY_LIMIT, Opener, read_up_to

__all__ = ["CacheLayer", "Lookup", "build_entry", "plan_lookup", "replay", "serve_cache"]

log = logging.getLogger("weir.cache")

CACHED_ROUTE = "/v1/messages"
_CT_JSON = b"application/json"
_CT_SSE = b"text/event-stream; charset=utf-8"


# --------------------------------------------------------------- sans-IO policy


class _Temperature(msgspec.Struct):
    # Any, not float: `"temperature": false` must reach is_cacheable_request
    # as the bool it is (malformed, not zero).
    temperature: Any = None


_temperature = msgspec.json.Decoder(_Temperature)


@dataclass(slots=True, frozen=True)
class Lookup:
    """What the cache may do for one request."""

    key: str
    read: bool  # answer from the cache (no ``no-cache``)
    write: bool  # store the reply (no ``no-store``)
    max_age: float | None  # accept only entries younger than this
    ttl: float  # lifetime of a stored reply


def plan_lookup(
    *, path: str, headers: Mapping[bytes, bytes], body: bytes, tenant: str, mode: str, default_ttl: float, temperature: Any = ...
) -> Lookup | None:
    """The cache decision for one request; ``None`` means bypass.

    ``temperature`` is what the handler's envelope decode already read; left
    as ``...`` it is read from the body here.
    """
    if path != CACHED_ROUTE or mode == "off":
        return None
    opt = headers.get(b"x-weir-cache")
    opt_s = opt.decode("latin-1") if opt is not None else None
    if opt_s is not None and opt_s.strip().lower() == "off":
        return None
    probe: dict[str, Any] = {}
    if mode != "all" and (opt_s or "").strip().lower() != "on":
        if temperature is not ...:
            probe["temperature"] = temperature
        else:
            try:
                probe["temperature"] = _temperature.decode(body).temperature
            except msgspec.DecodeError:
                return None
    if not is_cacheable_request(probe, opt_s, mode):
        return None
    try:
        key = cache_key(
            tenant=tenant,
            route=path,
            anthropic_version=headers.get(b"anthropic-version", b"").decode("latin-1"),
            anthropic_beta=headers.get(b"anthropic-beta", b"").decode("latin-1"),
            body=body,
        )
    except ValueError:
        return None
    cc_header = headers.get(b"cache-control")
    if cc_header is None:
        return Lookup(key, True, True, None, default_ttl)
    cc = parse_cache_control(cc_header.decode("latin-1"))
    ttl = default_ttl if cc.max_age is None else min(default_ttl, cc.max_age)
    # max-age=0 means "nothing stored is fresh enough" and a zero-lived entry:
    # do not store what nobody may read.
    return Lookup(key, not cc.no_cache, not cc.no_store and ttl > 0, cc.max_age, ttl)


def _replayable(name: bytes) -> bool:
    return name == b"request-id" or (name[:10] == b"anthropic-" and name[:20] != b"anthropic-ratelimit-")


def build_entry(
    status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes], *, now: float, ttl: float, max_bytes: int, model: str = ""
) -> Entry | None:
    """The entry to store for a finished reply, or ``None`` when it must not
    be cached (error, incomplete, too big, not a message)."""
    if status != 200:
        return None
    if sum(len(c) for c in chunks) > max_bytes:
        return None
    content_type = b""
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif _replayable(name):
            kept.append((name.decode("latin-1"), value.decode("latin-1")))
    body: bytes | None = None
    events: list[bytes] | None = None
    try:
        if content_type[:17] == b"text/event-stream":
            parser = SSEParser()
            events = [ev.raw for c in chunks for ev in parser.feed(c)]
            if parser.pending.strip() or not stream_is_complete(events):
                return None
            message = msgspec.json.decode(assemble_message(events))
        else:
            body = b"".join(chunks)
            message = msgspec.json.decode(body)
    except (ValueError, KeyError, TypeError) as exc:  # msgspec.DecodeError and SSEError are ValueErrors
        log.debug("cache: reply not stored: %s", exc)
        return None
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    usage = message.get("usage")
    return Entry(
        status=status, headers=kept, body=body, events=events,
        usage=usage if isinstance(usage, dict) else None,
        created_at=now, ttl=ttl, model=model or str(message.get("model", "")),
    )


def replay(entry: Entry, stream: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) answering a request in the form it asked for."""
    if stream:
        body = b"".join(entry.events) if entry.events is not None else b"".join(split_message(entry.body or b""))
        content_type = _CT_SSE
    else:
        body = entry.body if entry.body is not None else assemble_message(entry.events or [])
        content_type = _CT_JSON
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    headers += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in entry.headers]
    return entry.status, headers, body


def _hit(entry: Entry, stream: bool) -> BufferedResponse:
    """A stored reply as a response: one head, one body."""
    try:
        status, headers, body = replay(entry, stream)
    except (ValueError, KeyError, TypeError) as exc:
        # A stored entry that cannot be converted to the form asked for:
        # nothing a client can fix, and rare enough to be a bug report.
        raise ProxyError(500, f"cached entry could not be replayed: {exc}", "api_error") from None
    return BufferedResponse(status, headers, body, Served(cache="hit"))


class _Recording:
    """A response seen through the cache: every chunk kept for the store, and
    whether the body was read to its end (only a whole reply is stored)."""

    __slots__ = ("status", "headers", "served", "chunks", "whole", "_resp")

    def __init__(self, resp: UpstreamResponse) -> None:
        self.status = resp.status
        self.headers = resp.headers
        self.served = resp.served
        self.chunks: list[bytes] = []
        self.whole = False
        self._resp = resp

    async def aiter(self) -> AsyncIterator[bytes]:
        keep = self.chunks.append
        async for chunk in self._resp.aiter():
            keep(chunk)
            yield chunk
        self.whole = True

    async def read(self, limit: int) -> bytes:
        return await read_up_to(self.aiter(), limit)


# --------------------------------------------------------------- trio shell


class _Bypass:
    """The inner response, marked ``bypass``: a Messages call the policy kept out of the cache."""

    __slots__ = ("_inner",)

    def __init__(self, inner: AbstractAsyncContextManager[UpstreamResponse]) -> None:
        self._inner = inner

    async def __aenter__(self) -> UpstreamResponse:
        resp = await self._inner.__aenter__()
        resp.served.cache = "bypass"
        return resp

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool | None:
        return await self._inner.__aexit__(exc_type, exc, tb)


class CacheLayer:
    """The cache and coalesce stages: an opener over the router.

    ``hit(ctx)`` answers from the cache when it may: a buffered response.
    Otherwise ``open(req, ctx)`` joins or starts the key's coalesced flight
    when coalescing is on (``proxy/coalesce.py``; the flight calls the
    router), or calls the router directly and stores what came back. Every
    ``/v1/messages`` response is tagged with its cache outcome (``served.cache``).
    """

    def __init__(
        self,
        settings: CacheSettings,
        tiered: TieredCache,
        *,
        inner: Opener,
        nursery: trio.Nursery,
        has_l2: bool,
        # Wall clock: entries are stamped for other processes and hosts (L2).
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.tiered = tiered
        self.inner = inner
        self._has_l2 = has_l2
        self._wall = wall_clock
        self.coalescer = Coalescer(nursery) if settings.coalesce else None
        self.counts = {"hits": 0, "misses": 0, "coalesced": 0, "bypass": 0, "stored": 0, "not_stored": 0, "lease_waits": 0, "lease_fills": 0}

    def plan(self, path: str, headers: Mapping[bytes, bytes], body: bytes, tenant: str, temperature: Any = ...) -> Lookup | None:
        """The cache's decision for a request, made once, when its context is built."""
        if path != CACHED_ROUTE:
            return None
        s = self.settings
        lk = plan_lookup(path=path, headers=headers, body=body, tenant=tenant, mode=s.mode, default_ttl=s.ttl_s, temperature=temperature)
        if lk is None:
            self.counts["bypass"] += 1
        return lk

    async def hit(self, ctx: RequestContext) -> BufferedResponse | None:
        """The stored reply for this request, if it may be answered from the cache.

        The app asks this before ``open`` and before it starts the request's
        disconnect watcher: a hit never waits on an upstream, so it needs
        none, and skipping that task took L1 hits from 0.75x to 0.84x of the
        server floor (docs/ARCHITECTURE.md).
        """
        lk: Lookup | None = ctx.lookup
        if lk is None or not lk.read:
            return None
        found = await self.tiered.get(lk.key)
        if found is None or (lk.max_age is not None and self._wall() - found[0].created_at > lk.max_age):
            return None
        self.counts["hits"] += 1
        return _hit(found[0], ctx.stream)

    def open(self, req: UpstreamRequest, ctx: RequestContext) -> AbstractAsyncContextManager[UpstreamResponse]:
        """The response for a request the cache could not answer (``hit`` came first).

        A request the cache does not cover is the router's own context
        manager, with no layer of ours around it (most traffic: one less
        generator per request).
        """
        lk: Lookup | None = ctx.lookup
        if lk is None:
            if ctx.path == CACHED_ROUTE:
                return _Bypass(self.inner.open(req, ctx))
            return self.inner.open(req, ctx)
        return self._open(lk, req, ctx)

    @asynccontextmanager
    async def _open(self, lk: Lookup, req: UpstreamRequest, ctx: RequestContext) -> AsyncIterator[UpstreamResponse]:
        if self.coalescer is not None:
            async with self._join(lk, req, ctx) as resp:
                yield resp
            return
        self.counts["misses"] += 1
        async with self.inner.open(req, ctx) as resp:
            resp.served.cache = "miss"
            recorder = _Recording(resp)
            yield recorder
        if recorder.whole and lk.write:
            self._store(lk, resp.status, resp.headers, recorder.chunks, ctx.model)

    def _store(self, lk: Lookup, status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes], model: str, ttl: float | None = None) -> bool:
        entry = build_entry(status, headers, chunks, now=self._wall(), ttl=lk.ttl if ttl is None else ttl,
                            max_bytes=self.settings.max_entry_bytes, model=model)
        if entry is None:
            self.counts["not_stored"] += 1
            return False
        self.tiered.set(lk.key, entry)
        self.counts["stored"] += 1
        return True

    # -- coalescing ------------------------------------------------------

    @asynccontextmanager
    async def _join(self, lk: Lookup, req: UpstreamRequest, ctx: RequestContext) -> AsyncIterator[UpstreamResponse]:
        """Subscribe to the key's flight, starting it if none is up.

        A request that may not read the cache (``no-cache``) only shares a
        flight with others like it: every flight of that key goes upstream,
        never to another worker's stored entry.
        """
        fkey = lk.key + (":s" if req.stream else ":j") + ("" if lk.read else ":fresh")

        async def fetch(flight: Flight) -> None:
            await self._fly(flight, lk, req, ctx)

        assert self.coalescer is not None
        async with self.coalescer.subscribe(fkey, fetch, deadline=ctx.deadlines.total, limit=self.settings.max_entry_bytes) as (resp, flight, leader):
            # Any subscriber that wants the reply stored gets it stored, for
            # the shortest lifetime any of them asked for.
            if lk.write:
                flight.ttl = lk.ttl if not flight.write else min(flight.ttl, lk.ttl)
                flight.write = True
            span = ctx.span
            if span is not None:
                if leader:
                    flight.span = span
                elif flight.span is not None:
                    span.add_link(flight.span.get_span_context(), {"weir.link": "coalesced_leader"})
            await resp.wait_head()
            if flight.from_cache or not leader:
                resp.served.cache = "coalesced"
                self.counts["coalesced"] += 1
            else:
                resp.served.cache = "miss"
                self.counts["misses"] += 1
            yield resp

    async def _fly(self, flight: Flight, lk: Lookup, req: UpstreamRequest, ctx: RequestContext) -> None:
        """The body of a flight: claim the key across workers, or wait for the
        worker that holds it; else call upstream, record, store.

        ``ctx`` is the leader's: the flight's router call is judged by its
        deadlines, whoever is still reading.
        """
        s = self.settings
        claimed = True
        stored = False
        if self._has_l2:
            claimed = await self.tiered.claim(lk.key, s.lease_s)
        try:
            if not claimed and lk.read:
                self.counts["lease_waits"] += 1
                remaining = ctx.deadlines.total - trio.current_time()
                entry = await self.tiered.wait_filled(lk.key, poll=s.lease_poll_s, timeout=max(0.0, min(s.lease_s, remaining)))
                if entry is not None:
                    self.counts["lease_fills"] += 1
                    status, headers, body = replay(entry, req.stream)
                    flight.from_cache = True
                    flight.start(status, headers)
                    flight.push(body)
                    flight.finish()
                    return
            async with self.inner.open(req, ctx) as resp:
                flight.start(resp.status, resp.headers, resp.served)
                if resp.status >= 400:
                    flight.push(await resp.read(ERROR_BODY_LIMIT))
                else:
                    async for chunk in resp.aiter():
                        flight.push(chunk)
            flight.finish()
            if flight.write and flight.status == 200:
                if flight.size > s.max_entry_bytes:
                    self.counts["not_stored"] += 1
                else:
                    stored = self._store(lk, flight.status, flight.headers, flight.chunks, req.model, flight.ttl)
        finally:
            # After a successful store the lease is left to lapse: the L2 write
            # is still in flight (TieredCache.set schedules it), and a release
            # now would send waiting workers upstream a moment before the
            # entry lands. They find the entry on their next poll instead.
            if claimed and self._has_l2 and not stored:
                with trio.move_on_after(1.0) as cs:
                    cs.shield = True
                    await self.tiered.release(lk.key)

    # -- admin -----------------------------------------------------------

    async def stats(self) -> dict:
        levels = await self.tiered.stats()
        return {
            "mode": self.settings.mode,
            "coalesce": self.coalescer is not None,
            "requests": dict(self.counts),
            "flights": self.coalescer.flights_started if self.coalescer is not None else 0,
            "l2_backend": self.settings.l2 if self._has_l2 else "none",
            **levels,
        }

    async def purge(self, tenant: str | None) -> int:
        """Raises ``L2Unavailable`` when the shared level could not be purged."""
        return await self.tiered.purge(None if tenant is None else tenant_tag(tenant))




async def serve_cache(
    settings: CacheSettings,
    inner: Opener,
    sqlite_path: str,
    *,
    task_status: trio.TaskStatus[CacheLayer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own the cache's L2 connection and background work for the app's lifetime.

    Started in the lifespan nursery. It opens the L2 backend, then a nursery
    of its own for everything that uses it — flights and L2 writes — and
    hands the stage back through ``task_status``. When the lifespan ends,
    that inner nursery drains first (an SQLite call in a worker thread
    cannot be abandoned: closing its connection under it crashes the
    process), and only then is L2 closed. One task enters and leaves L2,
    which coredis requires (its pool runs a task group). That task group is
    a cancel scope, and scopes must close in the order they opened, so the
    scope that bounds closing L2 is opened before L2 is, not around the close.
    """
    stack = AsyncExitStack()
    with trio.CancelScope() as closing:
        try:
            l2: L2Backend | None = None
            if settings.mode != "off":
                l2 = await _open_l2(settings, sqlite_path, stack)
            async with trio.open_nursery() as nursery:
                l1 = L1Cache(max_bytes=settings.l1_max_bytes, default_ttl=settings.ttl_s, timer=trio.current_time)
                tiered = TieredCache(l1, l2, nursery=nursery, log=log)
                stage = CacheLayer(settings, tiered, inner=inner, nursery=nursery, has_l2=l2 is not None)
                task_status.started(stage)
                await trio.sleep_forever()
        finally:
            closing.shield = True
            closing.deadline = trio.current_time() + 5.0  # closing a sick L2 must not hold up shutdown
            await stack.aclose()


async def _open_l2(settings: CacheSettings, sqlite_path: str, stack: AsyncExitStack) -> L2Backend | None:
    if settings.l2 == "sqlite":
        from cache.sqlite import SQLiteL2

        return await stack.enter_async_context(SQLiteL2(sqlite_path, max_bytes=settings.sqlite_max_bytes))
    if settings.l2 == "redis":
        from cache.redis import RedisL2

        try:
            return await stack.enter_async_context(RedisL2(settings.redis_url))
        except (L2Unavailable, OSError) as exc:
            # Redis down at start-up: serve from L1 rather than refuse to start.
            log.warning("cache: redis L2 at %s unavailable at start-up, serving from L1 only: %s", settings.redis_url, exc)
            return None
    return None

