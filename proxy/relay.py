"""respond: carry one upstream exchange back to the client.

The deadline is one trio cancel scope whose deadline moves through the
phases of the exchange — first byte, then idle-between-reads — and never
past the request's total deadline. Whichever fires, the scope knows which
phase it cut, so the client gets the right answer: a 504 before the head was
sent, an SSE ``error`` event after it.

Bytes are forwarded as each upstream read delivered them: one ASGI ``send``
per read, never one per event (ARCHITECTURE.md: per-event sends cap
Hypercorn's trio worker near 8,000 events/s; per-read sends batch by
themselves under load).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from .errors import ProxyError, error_body, error_event, type_for_status
from .headers import client_response_headers
from .upstream.base import UpstreamError, UpstreamResponse
from .usage import UsageMeter

__all__ = ["Exchange", "Deadlines", "send_error", "relay_response", "upstream_failure"]

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Error bodies are read whole to check their shape; a real one is < 1 KiB.
_ERROR_BODY_LIMIT = 64 * 1024
_CT_EVENT_STREAM = b"text/event-stream"

log = logging.getLogger("weir.relay")


@dataclass(slots=True)
class Deadlines:
    """Absolute trio times for one request."""

    total: float
    first_byte_s: float
    idle_s: float


@dataclass(slots=True)
class Exchange:
    """What the access log and the response headers need to know about one request."""

    request_id: str
    started: float  # perf_counter at arrival
    method: str = ""
    path: str = ""
    tenant: str = ""
    model: str = ""
    # The request kind (proxy/kinds.py) of a /v1/messages request; "" elsewhere.
    kind: str = ""
    stream: bool = False
    status: int = 0
    target: str = ""
    upstream_s: float = 0.0  # time spent waiting on the upstream for the head
    first_byte: float = 0.0  # perf_counter when the first body byte was sent (time to first token)
    # The request's OpenTelemetry span (None: tracing off) and the trace id
    # the access log and the ledger record: Weir's own trace when tracing is
    # on, else the client's traceparent's, else "".
    span: Any = None
    trace_id: str = ""
    head_sent: bool = False
    complete: bool = False  # the final body message is (being) sent
    is_sse: bool = False
    # The last bytes forwarded: tells whether a cut came inside an SSE event.
    tail: bytes = b"\n\n"
    bytes_out: int = 0
    error: str = ""
    outcome: str = ""
    # Request fields the target's translation dropped (proxy/translate/to_openai.py).
    dropped: tuple[str, ...] = ()
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Set by the rate limiter: read the reply's usage to settle the estimate,
    # and report Weir's anthropic-ratelimit-* headers instead of the upstream's.
    # The request's deadline scope (first byte, then idle-per-read, capped at
    # total): a cancellation at or past its deadline is a stall, not a hang-up.
    deadline_scope: trio.CancelScope | None = None
    # The envelope's temperature, for the cache policy; ``...`` = not read.
    temperature: Any = ...
    # The cache's plan for this request (a ``proxy.caching.Lookup``), or None: bypass.
    cache_plan: Any = None
    metered: bool = False
    meter: UsageMeter | None = None
    own_ratelimit: bool = False

    def weir_headers(self) -> list[tuple[bytes, bytes]]:
        overhead_ms = (time.perf_counter() - self.started - self.upstream_s) * 1000.0
        return [
            (b"x-request-id", self.request_id.encode()),
            (b"x-weir-overhead-ms", b"%.3f" % overhead_ms),
            *self.extra_headers,
        ]


async def send_error(send: Send, ex: Exchange, err: ProxyError) -> None:
    body = err.body()
    ex.status = err.status
    ex.error = err.type
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *err.headers,
        *ex.weir_headers(),
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    ex.head_sent = True


def upstream_failure(exc: UpstreamError, target: str) -> ProxyError:
    if exc.kind == "connect":
        return ProxyError(502, f"upstream {target} is unreachable: {exc.message}", "api_error")
    if exc.kind == "timeout":
        return ProxyError(504, f"upstream {target} timed out: {exc.message}", "timeout_error")
    return ProxyError(502, f"upstream {target} failed: {exc.message}", "api_error")


class _ErrorShape(msgspec.Struct):
    type: str
    error: dict[str, Any]


_error_shape = msgspec.json.Decoder(_ErrorShape)


def is_anthropic_error(body: bytes) -> bool:
    try:
        shaped = _error_shape.decode(body)
    except msgspec.MsgspecError:
        return False
    return shaped.type == "error" and isinstance(shaped.error.get("type"), str) and isinstance(shaped.error.get("message"), str)


async def relay_error_response(send: Send, ex: Exchange, resp: UpstreamResponse) -> None:
    """An upstream error: Anthropic-shaped bodies pass through, others are wrapped."""
    body = await resp.read(_ERROR_BODY_LIMIT)
    headers = client_response_headers(resp.headers, drop_ratelimit=ex.own_ratelimit)
    if not is_anthropic_error(body):
        snippet = body[:200].decode("utf-8", "replace").strip()
        body = error_body(type_for_status(resp.status), f"upstream returned HTTP {resp.status}: {snippet}" if snippet else f"upstream returned HTTP {resp.status}")
        headers = [(n, v) for n, v in headers if n not in (b"content-type", b"content-length", b"content-encoding")]
        headers.append((b"content-type", b"application/json"))
    else:
        headers = [(n, v) for n, v in headers if n != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    ex.status = resp.status
    ex.error = "upstream"
    await send({"type": "http.response.start", "status": resp.status, "headers": headers + ex.weir_headers()})
    ex.head_sent = True
    await send({"type": "http.response.body", "body": body})


async def relay_response(
    send: Send,
    ex: Exchange,
    resp: UpstreamResponse,
    scope: trio.CancelScope,
    deadlines: Deadlines,
    tee: Callable[[bytes], None] | None = None,
) -> bool:
    """Stream a successful upstream response to the client.

    Returns True when the body completed. ``scope`` is the request's deadline
    scope: its deadline is pushed forward on every read, up to the total.
    ``tee`` sees every chunk (cache recorder) without delaying it.
    """
    ex.status = resp.status
    for name, value in resp.headers:
        if name == b"content-type" and value[:17] == _CT_EVENT_STREAM:
            ex.is_sse = True
            break
    headers = client_response_headers(resp.headers, drop_ratelimit=ex.own_ratelimit)
    await send({"type": "http.response.start", "status": resp.status, "headers": headers + ex.weir_headers()})
    ex.head_sent = True
    meter = None
    if ex.metered:
        meter = ex.meter = UsageMeter(ex.is_sse)
    idle = deadlines.idle_s
    total = deadlines.total
    now = trio.current_time
    try:
        async for chunk in resp.aiter():
            deadline = now() + idle
            scope.deadline = deadline if deadline < total else total
            if not chunk:
                continue
            if tee is not None:
                tee(chunk)
            if meter is not None:
                meter.feed(chunk)
            if not ex.bytes_out:
                ex.first_byte = time.perf_counter()
            ex.bytes_out += len(chunk)
            ex.tail = chunk
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamError as exc:
        ex.error = "upstream_" + exc.kind
        if ex.is_sse:
            await end_stream_with_error(send, ex, "api_error", f"upstream stream broke: {exc.message}")
        # A plain body cut short cannot be completed honestly: returning
        # without the final message makes Hypercorn drop the connection, so
        # the client sees a truncated response rather than a short one.
        return False
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return True


async def end_stream_with_error(send: Send, ex: Exchange, type_: str, message: str) -> None:
    """End an SSE response that already began with Anthropic's ``error`` event.

    If the cut came inside an event, that event is closed first so the error
    parses as an event of its own. Shielded and bounded: it runs after a
    cancellation, and a client that stopped reading must not hold the worker.
    """
    prefix = b"" if ex.tail.endswith((b"\n\n", b"\r\n\r\n")) else b"\n\n"
    with trio.move_on_after(1.0) as cs:
        cs.shield = True
        await send({"type": "http.response.body", "body": prefix + error_event(type_, message), "more_body": False})
