"""Server-sent events, sans-IO.

The hot path forwards upstream bytes untouched; this parser exists for the
places that must *read* a stream — the cache recorder (is the stream complete?
what was the usage?), the coalescer and the OpenAI translator. It never copies
an event's bytes more than once: each ``Event`` keeps the exact ``raw`` bytes it
was cut from, so a recorded stream replays byte for byte.

Follows the WHATWG event-stream rules that matter for LLM APIs: events end at a
blank line, lines end in ``\\n``, ``\\r\\n`` or ``\\r``, ``:`` starts a comment,
several ``data:`` lines join with ``\\n``, and one leading space after the colon
is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Event", "SSEParser", "encode_event"]

# An event ends at the first blank line; all three line endings are legal.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")
_LINE_SPLIT = re.compile(rb"\r\n|\n|\r")

# One event larger than this is not an LLM event but a broken or hostile
# stream; the largest real ones (a whole tool input in one delta) are a few MiB.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEError(ValueError):
    """The stream is not well-formed server-sent events."""


@dataclass(slots=True)
class Event:
    event: str | None
    data: bytes
    raw: bytes

    @property
    def name(self) -> str:
        """The event type, defaulting to ``message`` as the spec says."""
        return self.event if self.event is not None else "message"


class SSEParser:
    """Feed bytes in, get complete events out; partial events are kept."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[Event] = []
        pos = 0
        while True:
            m = _EVENT_END.search(buf, pos)
            if m is None:
                break
            ev = _parse_block(buf[pos : m.start()], buf[pos : m.end()])
            pos = m.end()
            if ev is not None:
                events.append(ev)
        self._buf = buf[pos:]
        if len(self._buf) > MAX_EVENT_BYTES:
            raise SSEError("an event is larger than %d bytes" % MAX_EVENT_BYTES)
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated (a truncated stream leaves some)."""
        return self._buf

    def close(self) -> list[Event]:
        """End of stream: a final event without its blank line still counts."""
        rest, self._buf = self._buf, b""
        if not rest.strip():
            return []
        ev = _parse_block(rest, rest)
        return [ev] if ev is not None else []


def _parse_block(block: bytes, raw: bytes) -> Event | None:
    event: str | None = None
    data: list[bytes] = []
    for line in _LINE_SPLIT.split(block):
        if not line or line[:1] == b":":
            continue
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            event = value.decode("utf-8", "replace")
        # id and retry mean nothing to an LLM stream; they pass through in raw.
    if event is None and not data:
        return None  # comment-only block (keep-alives): nothing to read
    return Event(event=event, data=b"\n".join(data), raw=raw)


def encode_event(event: str | None, data: bytes) -> bytes:
    """One event in Anthropic's framing: ``event:`` line, ``data:`` line, blank line."""
    head = b"event: " + event.encode() + b"\n" if event is not None else b""
    lines = data.split(b"\n")
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
