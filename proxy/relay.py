"""respond: carry one response back to the client, and record what was sent.

Every ASGI send of a ``/v1`` request goes through one ``Relay``. It writes
what the client got into the request's ``Outcome`` — status, error type,
bytes out, the first byte's time — so the record is right for every kind of
answer alike: relayed, replayed from the cache, or refused by Weir.

The deadline is one trio cancel scope (the app's) whose deadline moves
through the phases of the exchange — first byte, then idle-between-reads —
and never past the request's total deadline. Whichever fires, the scope
knows which phase it cut, so the client gets the right answer: a 504 before
the head was sent, an SSE ``error`` event after it.

Bytes are forwarded as each upstream read delivered them: one ASGI ``send``
per read, never one per event (docs/ARCHITECTURE.md: per-event sends cap
Hypercorn's trio worker near 8,000 events/s; per-read sends batch by
themselves under load).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import trio

from .context import Deadlines, Outcome, Served
from .errors import ProxyError, error_body, error_event, is_anthropic_error, type_for_status
from .headers import client_response_headers
from .upstream.base import ERROR_BODY_LIMIT, UpstreamError, UpstreamResponse
from .usage import UsageMeter

__all__ = ["Relay"]

Send = Callable[[dict[str, Any]], Awaitable[None]]

_CT_EVENT_STREAM = b"text/event-stream"
# How a stream says it failed: Anthropic's error event, or an OpenAI error
# chunk (what the chat ingress's clients get). Checked per chunk with a
# substring search; decoded only when found.
_ERROR_EVENT = b"event: error"
_OPENAI_ERROR = b'data: {"error"'


class Relay:
    """One response on its way to the client."""

    __slots__ = ("_send", "_raw_send", "_count_here", "out", "head_sent", "complete", "is_sse", "tail", "own_ratelimit", "extra_headers", "metered", "meter")

    def __init__(self, send: Send, out: Outcome, reshape: Callable[[Send], Send] | None = None) -> None:
        # ``reshape`` rewrites what is sent (the OpenAI ingress's error shape):
        # bytes are then counted below it, as the client receives them.
        self._raw_send = send
        self._count_here = reshape is None
        self._send = send if reshape is None else reshape(self._counted)
        self.out = out
        self.head_sent = False
        # The final body message is (being) sent. Hypercorn reports
        # http.disconnect as soon as a response is complete (as ASGI says it
        # should): the disconnect watcher reads this to tell that from a hang-up.
        self.complete = False
        self.is_sse = False
        # The last bytes forwarded: tells whether a cut came inside an SSE event.
        self.tail = b"\n\n"
        # Weir's own rate limits are on: report its anthropic-ratelimit-*, not the upstream's.
        self.own_ratelimit = False
        self.extra_headers: list[tuple[bytes, bytes]] = []
        # Read the reply's usage as it passes (the rate limiter settles on it,
        # and the Outcome reports it); ``meter`` exists once a body is relayed.
        self.metered = False
        self.meter: UsageMeter | None = None

    # ------------------------------------------------------------ sending

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.out.status = status
        self.head_sent = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, chunk: bytes, more: bool) -> None:
        out = self.out
        if chunk:
            if out.first_byte_s is None:
                out.first_byte_s = time.perf_counter() - out.received
            if self._count_here:
                out.bytes_out += len(chunk)
            self.tail = chunk
        if not more:
            self.complete = True
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def _counted(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.out.bytes_out += len(message.get("body", b""))
        await self._raw_send(message)

    def weir_headers(self, served: Served | None = None) -> list[tuple[bytes, bytes]]:
        out = self.out
        overhead = time.perf_counter() - out.received - out.upstream_head_s
        out.overhead_s = overhead
        headers = [(b"x-request-id", out.request_id.encode()), (b"x-weir-overhead-ms", b"%.3f" % (overhead * 1000.0)), *self.extra_headers]
        if served is not None:
            if served.target:
                headers.append((b"x-weir-target", served.target.encode()))
            if served.cache is not None:
                headers.append((b"x-weir-cache", served.cache.encode()))
            if served.dropped:  # what the translation for this target could not carry: said, never silent
                headers.append((b"x-weir-dropped", ",".join(served.dropped).encode()))
        return headers

    # ------------------------------------------------------------ answers

    async def send_error(self, err: ProxyError, served: Served | None = None) -> None:
        """Weir's own error answer, in Anthropic's shape."""
        body = err.body()
        self.out.error = err.type
        if self.out.result == "ok":
            self.out.result = "error"
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *err.headers,
            *self.weir_headers(served),
        ]
        await self._start(err.status, headers)
        await self._body(body, False)

    async def send_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, served: Served | None = None) -> None:
        """A reply Weir holds whole (answered locally)."""
        await self._start(status, headers + self.weir_headers(served))
        await self._body(body, False)

    async def send_stream(self, status: int, headers: list[tuple[bytes, bytes]], chunks: AsyncIterator[bytes]) -> None:
        """A body Weir produces in pieces (a batch's results, a page of lines
        per send). An exception from ``chunks`` leaves the body unfinished, so
        the client sees a cut response, never a short one."""
        await self._start(status, headers + self.weir_headers())
        async for chunk in chunks:
            if chunk:
                await self._body(chunk, True)
        await self._body(b"", False)

    async def error_response(self, resp: UpstreamResponse) -> None:
        """An upstream error: Anthropic-shaped bodies pass through, others are wrapped."""
        body = await resp.read(ERROR_BODY_LIMIT)
        self._read_head(resp)
        headers = client_response_headers(resp.headers, drop_ratelimit=self.own_ratelimit)
        if not is_anthropic_error(body):
            snippet = body[:200].decode("utf-8", "replace").strip()
            body = error_body(type_for_status(resp.status), f"upstream returned HTTP {resp.status}: {snippet}" if snippet else f"upstream returned HTTP {resp.status}")
            headers = [(n, v) for n, v in headers if n not in (b"content-type", b"content-length", b"content-encoding")]
            headers.append((b"content-type", b"application/json"))
        else:
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        self.out.result = "error"
        self.out.error = _error_type(body) or type_for_status(resp.status)
        await self._start(resp.status, headers + self.weir_headers(resp.served))
        await self._body(body, False)

    def _read_head(self, resp: UpstreamResponse) -> None:
        for name, value in resp.headers:
            if name == b"content-type":
                if value[:17] == _CT_EVENT_STREAM:
                    self.is_sse = True
            elif name == b"request-id" or name == b"x-request-id":
                self.out.upstream_request_id = value.decode("latin-1")

    async def response(self, resp: UpstreamResponse, scope: trio.CancelScope, deadlines: Deadlines) -> bool:
        """Stream a successful response to the client; True when the body completed.

        ``scope`` is the request's deadline scope: its deadline is pushed
        forward on every read, up to the total.
        """
        self._read_head(resp)
        meter = None
        if self.metered:
            meter = self.meter = UsageMeter(self.is_sse)
        headers = client_response_headers(resp.headers, drop_ratelimit=self.own_ratelimit)
        await self._start(resp.status, headers + self.weir_headers(resp.served))
        idle = deadlines.idle_s
        total = deadlines.total
        now = trio.current_time
        sse = self.is_sse
        # A plain body is sent one read behind, so its last bytes carry the
        # end of the message: one ASGI send (and one pass through Hypercorn)
        # fewer per reply, where most replies arrive in a single read. A
        # stream's events go out as they arrive.
        held = b""
        try:
            async for chunk in resp.aiter():
                deadline = now() + idle
                scope.deadline = deadline if deadline < total else total
                if not chunk:
                    continue
                if meter is not None:
                    meter.feed(chunk)
                if sse:
                    if _ERROR_EVENT in chunk or _OPENAI_ERROR in chunk:
                        self._stream_error(chunk)
                    await self._body(chunk, True)
                else:
                    if held:
                        await self._body(held, True)
                    held = chunk
        except UpstreamError as exc:
            self.out.result = "error"
            self.out.error = "upstream_" + exc.kind
            if self.is_sse:
                await self.end_stream_with_error("api_error", f"upstream stream broke: {exc.message}")
            # A plain body cut short cannot be completed honestly: returning
            # without the final message makes Hypercorn drop the connection, so
            # the client sees a truncated response rather than a short one.
            return False
        await self._body(held, False)
        return True

    def _stream_error(self, chunk: bytes) -> None:
        """The stream carried an error event: the request failed, whatever the status said."""
        at = chunk.find(_ERROR_EVENT)
        at = chunk.find(b"data:", at) if at >= 0 else chunk.find(_OPENAI_ERROR) + 1
        end = chunk.find(b"\n", at)
        self.out.result = "error"
        self.out.error = _error_type(chunk[at + 5 : end if end >= 0 else len(chunk)]) or "api_error"

    async def end_stream_with_error(self, type_: str, message: str) -> None:
        """End an SSE response that already began with Anthropic's ``error`` event.

        If the cut came inside an event, that event is closed first so the error
        parses as an event of its own. Shielded and bounded: it runs after a
        cancellation, and a client that stopped reading must not hold the worker.
        """
        prefix = b"" if self.tail.endswith((b"\n\n", b"\r\n\r\n")) else b"\n\n"
        if self.out.error is None:
            self.out.error = type_
        if self.out.result == "ok":
            self.out.result = "error"
        with trio.move_on_after(1.0) as cs:
            cs.shield = True
            await self._body(prefix + error_event(type_, message), False)


class _AnyError(msgspec.Struct):
    error: Any = None


_any_error = msgspec.json.Decoder(_AnyError)


def _error_type(data: bytes) -> str | None:
    """``error.type`` of an error body or event payload, in either dialect."""
    try:
        err = _any_error.decode(data.strip()).error
    except msgspec.MsgspecError:
        return None
    if isinstance(err, dict) and isinstance(err.get("type"), str):
        return err["type"]
    return None
