"""The HTTP/1.1 server under the app: Hypercorn's trio worker, one connection guarded.

Hypercorn 0.18's trio connection (``hypercorn/trio/tcp_server.py``) has
faults a stranger can reach and lacks deadlines a gateway needs; each item
below is reproduced over raw sockets in ``tests/test_attack.py``.

1. **A remote crash (pgjones/hypercorn#203, open).** When h11 refuses bytes on a
   connection — data after a ``connection: close`` request, a second HTTP/1.0
   request, pipelining after close — the task reading the socket answers 400
   under the connection's send lock, while the app's task, finishing its own
   response, closes the connection: ``TCPServer._close`` calls ``send_eof()``
   *without* that lock. trio's conflict detector then makes the reader's
   ``send_all`` raise ``BusyResourceError``; ``protocol_send`` catches only
   ``BrokenResourceError``/``ClosedResourceError``, so it escapes the
   connection's task group into the listener's nursery and ends
   ``worker_serve``: the whole process exits. A send that finds the stream busy
   being shut down is a send on a closing connection, so here it is handled as
   one (``protocol_send`` below). That is the whole fix for the crash. The
   bytes that most often trigger it are also no longer an error: RFC 9112
   §9.6 says a server must not process anything after a request that closes
   the connection, so they are ignored (``_LastRequestH11``) and the response
   to that request completes instead of being cut by a 400.
2. **``Connection: close`` ignored by Quart-served routes.** Hypercorn closes a
   finished ``connection: close`` exchange inside the app's last ``send()``. It
   first delivers ``http.disconnect``, and Quart answers that by cancelling its
   own tasks — including the one inside ``send()`` — so ``_close()`` is
   cancelled between ``send_eof`` and ``aclose`` and the socket stays open until
   the client leaves. Closing is cleanup: ``_close`` is shielded here (a
   checkpoint and two syscalls, it cannot block).
3. **Protocol errors answered like every other error.** When h11 refuses a
   request Hypercorn answers with an empty body, and with 501 for a
   transfer-coding it does not know. Here: a 4xx with an Anthropic-shaped body
   (400 for the unknown coding too — RFC 9112 §6.1 says SHOULD 501, but a
   stranger's bytes never earn a 5xx from Weir), then close.
4. **HTTP/1.1 only, in cleartext.** Hypercorn switches a connection to HTTP/2
   on ``upgrade: h2c`` or on the HTTP/2 preface, and every guard here is
   HTTP/1.1's; LLM clients speak HTTP/1.1 to a plain-text gateway (HTTP/2 comes
   with TLS, terminated in front). Such requests are answered in HTTP/1.1.
5. **Containment.** Anything else that escapes one connection is logged with
   its traceback and closes that connection; it never reaches the listener's
   nursery, so one connection can no longer take the worker with it.
6. **Deadlines Hypercorn has no knob for.** Its ``read_timeout`` bounds every
   read, including the silence of a client waiting on a ten-minute stream, so it
   cannot be used. Here: the request head must arrive whole within
   ``header_timeout_s`` (from accept for the first request, from its first byte
   for the next ones on a kept-alive connection — Hypercorn's
   ``keep_alive_timeout`` covers the silence between requests), and a request
   body may go silent at most ``body_idle_s``. Expiry answers 408 with
   ``connection: close`` when nothing was answered yet, then closes.

7. **Keep-alive without a task per request.** Hypercorn restarts its idle
   timer on every request: a lock, a cancelled task and a ``nursery.start``
   (a new task and a scheduling round trip before the connection reads its
   next request). In the py-spy profile of ``loadtests/latency.py`` that was
   ~6% of a proxied request's CPU. Here each connection has one timer task
   for its life (``_KeepAlive``): a request only records when the connection
   went idle, and the task, waking at the earliest deadline that could
   apply, checks. The behaviour is Hypercorn's: an idle connection closes
   after ``keep_alive_timeout``, and at shutdown as soon as it is idle.

8. **One write for a whole reply.** Hypercorn writes a response's head, its
   body and h11's (empty) end of message separately: two ``send`` system
   calls and three trips through the event loop per reply. A head whose
   body has a ``content-length`` now waits in ``_LastRequestH11`` for the
   first body bytes and goes out with them, and empty writes are skipped.
   Chunked replies (Server-Sent Events) are not held: their head goes out
   at once, as before.

When it can go: items 1-4 when a Hypercorn release closes #203 and shields
``_close`` — run ``tests/test_attack.py`` against it without ``install()``;
``pyproject.toml`` pins the tested range, since this subclass relies on
``TCPServer``'s private members (``send_lock``, ``stream``, ``protocol``).

The ASGI side (``Guard``) refuses WebSocket upgrades with a 400: nothing in
Weir speaks WebSocket, and an app that simply returns makes Hypercorn answer a
bare 500. It also answers 400 for a ``Host`` that werkzeug cannot IDNA-encode
(an empty or over-long label, ``we..ir``) on the Quart-served routes: Quart
raises ``BadHost`` outside its error handling there, which became a 500
(found by loadtests/soak's fuzzer).
"""

from __future__ import annotations

import logging
from math import inf
from wsgiref.handlers import format_date_time
from typing import Any

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from .errors import error_body

log = logging.getLogger("weir.server")

__all__ = ["GuardedTCPServer", "Guard", "install", "worker_serve", "DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_BODY_IDLE_S"]

# Defaults for a Hypercorn Config that Weir's settings did not configure
# (proxy/hypercorn_conf.py configures them); ServerSettings carries the same values and why.
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_IDLE_S = 60.0


def _timeout_response(what: str) -> bytes:
    body = error_body("timeout_error", f"{what}: the connection is closed")
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


# h11's status hint → what Weir answers (always with connection: close).
_PROTOCOL_ERRORS = {
    431: (431, "the request head is too large"),
    501: (400, "unsupported transfer-encoding: only chunked is accepted"),
}


def _protocol_error_sender(protocol: Any) -> Any:
    """A replacement for one H11Protocol's ``_send_error_response``."""

    async def send_error_response(status_hint: int) -> None:
        status, message = _PROTOCOL_ERRORS.get(status_hint, (400, "malformed HTTP/1.1 request"))
        body = error_body("invalid_request_error", message)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
        conn = protocol.connection
        try:
            # One synchronous run of h11 then one write: an app answering at the
            # same moment is refused by h11 instead of slipping bytes in between.
            data = b"".join(
                conn.send(event) or b""
                for event in (
                    h11.Response(status_code=status, headers=headers + protocol.config.response_headers("h11")),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )
            )
        except h11.LocalProtocolError:
            return  # the app's answer went first
        await protocol.send(RawData(data=data))

    return send_error_response


async def _stay_http11(request: h11.Request) -> None:
    """Replaces H11Protocol._check_protocol: no switch to HTTP/2 (h2c or preface)."""


class _LastRequestH11(h11.Connection):
    """h11 that ignores whatever follows the connection's last request.

    After a ``connection: close`` or HTTP/1.0 request h11 raises on any further
    byte, and Hypercorn then cuts the response in progress. RFC 9112 §9.6: the
    server closes after its response and must not process further requests.
    """

    def receive_data(self, data: bytes) -> None:
        if data and self.their_state is h11.MUST_CLOSE:
            return  # nothing after the last request is read (bounded: dropped)
        super().receive_data(data)

    def next_event(self) -> Any:
        if self.their_state is h11.MUST_CLOSE:
            return h11.NEED_DATA  # leftovers of the last request's segment stay unread
        return super().next_event()

    # A response with a content-length goes out head and body in one write
    # (item 8 above): the head's bytes wait here for the first body bytes.
    _head: bytes = b""

    def send(self, event: Any) -> bytes | None:
        data = super().send(event)
        # (The head's own bytes tell the framing; h11's Headers iterate slowly.)
        if type(event) is h11.Response and data and b"\r\ncontent-length:" in data.lower():
            self._head = data
            return b""
        if self._head:
            data, self._head = self._head + (data or b""), b""
        return data


class _KeepAlive:
    """Hypercorn's idle timer (``TrioSingleTask``'s interface) as one task per connection.

    ``restart`` (the connection went idle) records a deadline of now plus
    ``keep_alive_timeout``; ``stop`` (a request began) records infinity. The
    one task sleeps until that deadline passes, or until the server stops
    while the connection is idle, then closes the connection as Hypercorn's
    ``_idle_timeout`` does.
    """

    __slots__ = ("_server", "_deadline", "_scope", "_terminated", "_started", "_done")

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._deadline = inf
        self._scope: trio.CancelScope | None = None
        self._terminated = False
        self._started = False
        self._done = False

    async def restart(self, task_group: Any, action: Any) -> None:
        self._deadline = deadline = trio.current_time() + self._server.config.keep_alive_timeout
        scope = self._scope
        if scope is not None and scope.deadline == inf:
            scope.deadline = deadline  # the timer was parked while the connection was busy
        # Otherwise the scope keeps its earlier deadline: when that passes,
        # the task finds the connection busy or the deadline moved, and
        # sleeps again — one wake-up per keep-alive period at most, where
        # moving a trio deadline on every request cost ~0.7% of one.
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._run)
        elif self._terminated and self._scope is not None:
            self._scope.cancel()  # the server is stopping and this connection just went idle

    async def stop(self) -> None:
        self._deadline = inf  # busy: read when the scope's deadline passes

    def close(self) -> None:
        """The connection is closing anyway: the timer task ends without acting,
        so the connection's task group can exit."""
        self._done = True
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self) -> None:
        while True:
            if self._done:
                return  # the connection closed on its own
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._scope = scope
                if self._terminated:
                    await trio.sleep_forever()
                else:
                    await self._server.context.terminated.wait()
                    self._terminated = True
            self._scope = None
            idle = self._deadline != inf
            if not self._done and idle and (self._terminated or trio.current_time() >= self._deadline):
                break
            # Otherwise: busy (the next scope waits with no deadline until
            # ``restart`` sets one), the deadline moved on, or a spurious wake.
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


class GuardedTCPServer(TCPServer):
    """Hypercorn's trio connection with the fixes and deadlines above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = _KeepAlive(self)  # type: ignore[assignment]

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as group:  # contained: this connection only
            log.error("connection failed; closing it", exc_info=group)

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not event.data:
                # h11's end of a content-length body, or a head held back
                # for its body (``_LastRequestH11.send``): nothing to write.
                return
            lock = self.send_lock
            try:
                # Uncontended (nearly always): taken without the yield to
                # trio's scheduler that ``async with lock`` makes even then.
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()
            try:
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    # Busy: another task is in send_eof(), closing this connection.
                    await self.protocol.handle(Closed())
            finally:
                lock.release()
        else:
            await super().protocol_send(event)

    async def _close(self) -> None:
        self.idle_task.close()  # type: ignore[attr-defined]
        with trio.CancelScope(shield=True):
            await super()._close()

    def _h11(self) -> h11.Connection | None:
        # ProtocolWrapper → H11Protocol → h11.Connection; None for HTTP/2 and
        # for a connection handed over to WebSocket.
        conn = getattr(getattr(self.protocol, "protocol", None), "connection", None)
        return conn if isinstance(conn, h11.Connection) else None

    async def _read_data(self) -> None:
        h11_protocol = getattr(self.protocol, "protocol", None)
        if isinstance(getattr(h11_protocol, "connection", None), h11.Connection):
            # Nothing was received yet: swap in the h11 that honours RFC 9112 §9.6.
            h11_protocol.connection = _LastRequestH11(h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size)
            h11_protocol._send_error_response = _protocol_error_sender(h11_protocol)
            h11_protocol._check_protocol = _stay_http11
        header_timeout = getattr(self.config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)
        body_idle = getattr(self.config, "body_idle_s", DEFAULT_BODY_IDLE_S)
        head_since: float | None = trio.current_time()  # the first head: from accept
        while True:
            conn = self._h11()
            state = conn.their_state if conn is not None else None
            if state is h11.IDLE:
                if head_since is None and conn is not None and conn.trailing_data[0]:
                    head_since = trio.current_time()  # pipelined bytes already wait
                deadline = inf if head_since is None else head_since + header_timeout
                what = f"request head not received within {header_timeout:g} s"
            elif state is h11.SEND_BODY:
                head_since = None
                deadline = trio.current_time() + body_idle
                what = f"request body silent for {body_idle:g} s"
            else:  # a request is being answered, or not HTTP/1.1 any more
                head_since = None
                deadline = inf
            try:
                if deadline == inf:
                    # Between requests (the keep-alive timer watches that) or
                    # while one is answered: no scope to enter and leave.
                    data = await self.stream.receive_some(MAX_RECV)
                else:
                    with trio.move_on_at(deadline) as scope:
                        data = await self.stream.receive_some(MAX_RECV)
                    if scope.cancelled_caught:
                        await self._expire(what)
                        break
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            received = trio.current_time()
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
            conn = self._h11()
            if head_since is None and conn is not None and conn.their_state is h11.IDLE:
                head_since = received  # the first bytes of the next head
        self.idle_task.close()  # type: ignore[attr-defined]
        await self.protocol.handle(Closed())

    async def _expire(self, what: str) -> None:
        """A deadline passed while the client owed us bytes: 408 if nothing was answered yet, then close."""
        async with self.send_lock:
            conn = self._h11()
            if conn is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(_timeout_response(what))
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass
            # Closed while holding the lock: an app send queued behind it finds
            # a closed stream (handled) instead of writing after our 408.
            await self._close()


def install() -> None:
    """Make Hypercorn's trio worker run connections as ``GuardedTCPServer``.

    ``worker_serve`` looks ``TCPServer`` up in its module on every call, and has
    no other hook for it. Idempotent; called by every way Weir is served
    (``worker_serve`` below for ``weir serve`` and the tests, ``proxy/asgi.py``
    for ``hypercorn proxy.asgi:app``).
    """
    import hypercorn.config
    import hypercorn.trio.run as run

    run.TCPServer = GuardedTCPServer  # type: ignore[misc]
    if not isinstance(hypercorn.config.format_date_time, _DatePerSecond):  # type: ignore[attr-defined]
        hypercorn.config.format_date_time = _DatePerSecond()  # type: ignore[attr-defined]


class _DatePerSecond:
    """Hypercorn's ``date`` header, formatted once per second — the header's
    resolution — instead of once per response (``Config.response_headers``
    calls wsgiref's ``format_date_time`` for each: ~1% of a proxied request
    in the py-spy profile)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, ts: float) -> str:
        second = int(ts)
        if second != self._second:
            self._second, self._text = second, format_date_time(second)
        return self._text


def _host_ok(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether werkzeug's URL map can bind this Host (it IDNA-encodes it, lowercased)."""
    for name, value in headers:
        if name == b"host":
            try:
                value.decode("latin-1").lower().encode("idna")
            except UnicodeError:
                return False
    return True


class Guard:
    """ASGI in front of the app: refuses WebSocket upgrades with a 400."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith("/v1/") or _host_ok(scope["headers"]):
                await self.app(scope, receive, send)
                return
            body = error_body("invalid_request_error", "malformed Host header")
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            body = error_body("invalid_request_error", "WebSocket is not supported: send plain HTTP requests")
            await send({
                "type": "websocket.http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
            })
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a server without the denial extension answers 403
            await send({"type": "websocket.close"})


async def worker_serve(app: Any, config: Any, **kwargs: Any) -> None:
    """``hypercorn.trio.worker_serve`` for the app, with the guarded connection and ``Guard``."""
    from hypercorn.trio import worker_serve as hypercorn_worker_serve

    install()
    await hypercorn_worker_serve(ASGIWrapper(Guard(app)), config, **kwargs)
