"""The upstream connection pool: HTTP/1.1 on trio streams, nothing in between.

Why not httpx here. The side-by-side benchmark's py-spy profile put ~42% of
Weir's CPU in httpx/httpcore, and the single hottest function in the process
was trio's ``is_readable``: on every request httpcore's pool calls
``has_expired`` on *every* pooled connection, one ``select`` system call
each, so the cost grows with the pool (docs/ARCHITECTURE.md: 64 in flight on
one httpx client, ~350 req/s). Weir's scheduler already guarantees that
no more requests are in flight than the pool holds, so the pool needs no
waiter queue, no request routing and no per-request model objects: a stack
of idle connections, a readability check on the one connection we take, and
``http1.py`` for the protocol (llhttp through httptools; why not h11 is
there).

Idle connections are closed after ``keepalive_expiry``. Taking one only
looks at the warm end of the stack, so after a burst the cold end (2,000
sockets once) would stay open for ever with traffic and without it; the
stack is ordered by the time each went idle, so ``reap_idle``, a task in the
app's lifespan nursery, sleeps until exactly the oldest expires.

Reuse and staleness: an upstream may close an idle keep-alive connection at
any time. The connection taken from the stack is checked once (readable
while idle means EOF or garbage: discard it); if a request on a *reused*
connection still fails before a single response byte arrived, it is retried
once on a fresh connection — the server never read it, which is the case
every HTTP client retries (RFC 9110 §9.2.2 leaves non-idempotent retries to
the client's judgement; a closed-before-response connection is the one case
where the request provably did not run to a response).
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import trio

from .base import UpstreamError, read_up_to
from .http1 import ProtocolError, RefusedRequest, ResponseParser, request_bytes

__all__ = ["ConnectionPool", "PooledResponse"]

# One receive per upstream read; 64 KiB holds a whole non-streamed reply or
# a burst of SSE events, and matches what Hypercorn reads per receive.
_RECV = 65536


def _ssl_context() -> ssl.SSLContext:
    import certifi  # the CA bundle httpx and the official SDKs use

    return ssl.create_default_context(cafile=certifi.where())


class _Conn:
    __slots__ = ("stream", "sock", "idle_since", "reused")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.idle_since = 0.0
        self.reused = False


class PooledResponse:
    """The head of a response, and its body as the upstream delivers it."""

    __slots__ = ("status", "headers", "_conn", "_parser", "_pending")

    def __init__(self, conn: _Conn, parser: ResponseParser, pending: bytes) -> None:
        self._conn = conn
        self._parser = parser
        self.status = parser.status
        self.headers = parser.headers
        self._pending = pending

    async def aiter(self) -> AsyncIterator[bytes]:
        parser = self._parser
        if self._pending:
            data, self._pending = self._pending, b""
            yield data
        stream = self._conn.stream
        while not parser.done:
            try:
                raw = await stream.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamError("reset", f"upstream connection broke mid-response: {exc!r}") from None
            try:
                parser.feed(raw)
            except ProtocolError as exc:
                raise UpstreamError("reset" if not raw else "protocol", f"upstream response broke off: {exc}") from None
            # Everything one read delivered goes out as one item: one ASGI
            # send per upstream read, never one per chunk or event.
            data = parser.take_body()
            if data:
                yield data

    async def read(self, limit: int) -> bytes:
        return await read_up_to(self.aiter(), limit)


class ConnectionPool:
    """Keep-alive connections to one origin. Callers cap concurrency; the pool does not queue."""

    def __init__(self, url: str, *, connect_timeout: float, keepalive_expiry: float, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default_port = 443 if self.tls else 80
        self.host_header = (parts.hostname if self.port == default_port else f"{parts.hostname}:{self.port}").encode()
        if ":" in self.host and not self.host_header.startswith(b"["):  # IPv6 literal
            self.host_header = (f"[{self.host}]" if self.port == default_port else f"[{self.host}]:{self.port}").encode()
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.keepalive_expiry = keepalive_expiry
        self._ssl = (ssl_context or _ssl_context()) if self.tls else None
        # Oldest idle at the left, warmest at the right (see reap_idle).
        self._idle: deque[_Conn] = deque()
        self._became_idle = trio.Event()
        self.opened = 0  # connections opened over the pool's life (tests, stats)
        self.closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _connect(self) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
                sock = stream.socket  # type: ignore[attr-defined]
                if self._ssl is not None:
                    tls = trio.SSLStream(stream, self._ssl, server_hostname=self.host, https_compatible=True)
                    await tls.do_handshake()
                    stream = tls
        except trio.TooSlowError:
            raise UpstreamError("connect", f"connecting to {self.host}:{self.port} timed out after {self.connect_timeout:g}s") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise UpstreamError("connect", f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self.opened += 1
        return _Conn(stream, sock)

    def _take_idle(self) -> _Conn | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()  # LIFO: the warmest connection, the least likely closed
            if self._expired(conn, now) or conn.sock.fileno() < 0 or _readable(conn.sock):
                _close_now(conn)
                continue
            conn.reused = True
            return conn
        return None

    def _expired(self, conn: _Conn, now: float) -> bool:
        return now - conn.idle_since >= self.keepalive_expiry

    async def reap_idle(self) -> None:
        """Close each idle connection when it passes ``keepalive_expiry``; runs
        for the pool's life in the app's lifespan nursery."""
        while not self.closed:
            if not self._idle:
                await self._became_idle.wait()
                self._became_idle = trio.Event()
                continue
            await trio.sleep_until(self._idle[0].idle_since + self.keepalive_expiry)
            now = trio.current_time()
            while self._idle and self._expired(self._idle[0], now):
                _close_now(self._idle.popleft())

    async def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> PooledResponse:
        """Send one request and return once the response head arrived."""
        conn = self._take_idle()
        fresh = conn is None
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, method, target, headers, body)
        except _StaleConnection:
            if fresh:
                raise UpstreamError("reset", "upstream closed the connection before answering") from None
        # The reused connection had been closed by the upstream: once more, fresh.
        conn = await self._connect()
        try:
            return await self._exchange(conn, method, target, headers, body)
        except _StaleConnection:
            raise UpstreamError("reset", "upstream closed the connection before answering") from None

    async def _exchange(self, conn: _Conn, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> PooledResponse:
        ok = False
        try:
            try:
                out = request_bytes(method, self.base_path.encode() + target, self.host_header, headers, body)
            except RefusedRequest as exc:
                # Our own client refuses the request: nothing reached the target.
                raise UpstreamError("refused", f"request cannot be sent upstream: {exc}") from None
            parser = ResponseParser()
            received_any = False
            try:
                await conn.stream.send_all(out)
                while not parser.head_done:
                    raw = await conn.stream.receive_some(_RECV)
                    if not raw and not received_any:
                        raise _StaleConnection()
                    received_any = True
                    parser.feed(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if not received_any and conn.reused:
                    raise _StaleConnection() from None
                raise UpstreamError("reset", f"upstream connection broke before the response: {exc!r}") from None
            except ProtocolError as exc:
                raise UpstreamError("protocol", f"upstream sent no valid HTTP response: {exc}") from None
            # Body bytes that arrived with the head go out first, before the socket is read again.
            resp = PooledResponse(conn, parser, parser.take_body())
            ok = True
            return resp
        finally:
            if not ok:
                _close_now(conn)

    def release(self, resp: PooledResponse) -> None:
        """Return the connection if the exchange completed cleanly; close it otherwise."""
        conn = resp._conn
        if resp._parser.reusable and not self.closed:
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
            self._became_idle.set()
        else:
            # Abandoned mid-body (client gone, deadline, error): the connection
            # is mid-message and cannot be reused. Closing it is also how the
            # upstream learns the call was cancelled.
            _close_now(conn)

    async def aclose(self) -> None:
        self.closed = True
        self._became_idle.set()  # reap_idle returns
        while self._idle:
            _close_now(self._idle.pop())


class _StaleConnection(Exception):
    """A reused connection turned out closed before any response byte."""


def _readable(sock: trio.socket.SocketType) -> bool:
    try:
        return sock.is_readable()
    except (OSError, ValueError):
        return True


def _close_now(conn: _Conn) -> None:
    # Synchronous close: no await, so it is safe in cancelled code and in
    # finally blocks. For TLS this skips close_notify, which HTTP/1.1 with
    # explicit framing does not need (RFC 8446 §6.1 allows it).
    try:
        conn.sock.close()
    except OSError:
        pass
