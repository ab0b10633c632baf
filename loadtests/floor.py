"""The server floor: the cheapest HTTP reply Hypercorn's trio worker can give.

Run: ``.venv/bin/hypercorn -c python:proxy.hypercorn_conf.config --bind 127.0.0.1:8090 loadtests.floor:app``
(``loadtests/bench`` does this for you, pinned to the same core as Weir).

Weir's hot path runs inside Hypercorn, so no Weir change can make it faster
than Hypercorn answering the same request with nothing in between. This app
is that nothing: it reads the whole body (Claude Code sends 30-200 KiB, and
receiving it is part of the server's cost), then sends a constant reply of
the size and shape of a short Messages reply in one ``send``. Weir's
throughput as a fraction of this app's, on the same body, is the number the
benchmark tracks. It is a raw ASGI callable, not Quart: Quart costs ~30% on
its own (docs/ARCHITECTURE.md) and is not on Weir's hot path either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["REPLY", "app"]

# A short non-streamed Messages reply (~400 bytes), constant so the floor
# spends nothing on encoding; Weir relays upstream bytes without re-encoding
# too, so the comparison is like for like.
REPLY = (
    b'{"id":"msg_01FloorFloorFloorFloorFloor0","type":"message","role":"assistant",'
    b'"model":"claude-sonnet-4-20250514","content":[{"type":"text","text":"alpha brook '
    b"cedar delta ember fjord grove harbor island jasper kettle lantern meadow nectar "
    b'orchid pebble quartz river saffron thistle umber velvet willow"}],'
    b'"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12000,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":24,'
    b'"service_tier":"standard"}}'
)
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(REPLY)),
    (b"request-id", b"req_floor"),
]
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
_BODY = {"type": "http.response.body", "body": REPLY, "more_body": False}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    kind = scope["type"]
    if kind == "http":
        # Drain the body: a server that skipped it would look faster than any
        # proxy can be, which is not the floor we want to measure against.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                break
        if message["type"] == "http.disconnect":
            return
        await send(_START)
        await send(_BODY)
    elif kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
