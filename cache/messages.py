"""Anthropic Messages: a recorded stream answers a plain request, and back.

A streamed and a non-streamed request share one cache key (``cache.keys``),
so whichever form was recorded must be able to answer the other:
``assemble_message`` folds a stream's raw SSE events into the JSON body the
non-streamed API returns, ``split_message`` unfolds a body into the events
the streaming API would have sent. Both are pure functions over bytes.

Input events are taken already split (one complete ``event:``/``data:`` block
each, as ``Entry.events`` stores them); this module parses only what it
needs from each and must not import the proxy's SSE parser (``cache`` stands
alone).

Assembly follows Anthropic's SSE contract: ``message_start`` carries the
message with empty content; ``content_block_start`` opens block *index*;
deltas append (``text_delta``, ``thinking_delta``, ``signature_delta``,
``citations_delta``) or accumulate JSON text (``input_json_delta``, parsed
into ``input`` at ``content_block_stop``); ``message_delta`` merges
``delta`` into the message and ``usage`` into its usage; ``ping`` and unknown
events carry nothing for the body.
"""

from __future__ import annotations

import msgspec

__all__ = ["assemble_message", "split_message", "stream_is_complete"]

_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode

# Block types whose input arrives as input_json_delta text.
_JSON_INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def _parse(raw: bytes) -> tuple[str | None, bytes]:
    """(event name, data) of one raw SSE event, per the event-stream rules
    that matter here: any line ending, several data lines joined by ``\\n``,
    one optional space after the colon, comments ignored."""
    name: str | None = None
    data: list[bytes] = []
    for line in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            name = value.decode()
        elif field == b"data":
            data.append(value)
    return name, b"\n".join(data)


def _event_type(raw: bytes) -> tuple[str | None, dict | None]:
    name, data = _parse(raw)
    obj = None
    if data:
        try:
            obj = _json_decode(data)
        except msgspec.DecodeError:
            obj = None
    if name is None and isinstance(obj, dict):
        name = obj.get("type")
    return name, obj if isinstance(obj, dict) else None


def stream_is_complete(events: list[bytes]) -> bool:
    """Worth caching: a complete stream that keeps Anthropic's grammar.

    A stored stream is replayed to every later request with the same key,
    so one malformed event would be served again and again as a hit. The
    stream is kept only if it reads, event by event::

        message_start (block)* message_delta+ message_stop
        block = content_block_start content_block_delta* content_block_stop

    with ``ping`` anywhere before the end and event types this check does
    not know (Anthropic says clients must skip them) anywhere before
    ``message_stop``; blocks numbered from 0 without gaps, deltas and the
    stop naming the open block; every ``data`` a JSON object whose ``type``
    matches the event's name; no ``error`` event (an ``overloaded_error``
    mid-stream means a truncated reply), nothing after ``message_stop``.
    """
    state = "start"  # → "message" → "delta" → "stop"
    open_block: int | None = None
    next_index = 0
    for raw in events:
        name, data = _parse(raw)
        if not data:
            if name is None:
                continue  # a comment or keep-alive: nothing to read
            return False  # a named event without data
        try:
            obj = _json_decode(data)
        except msgspec.DecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        kind = obj.get("type")
        if name is None:
            name = kind
        elif kind is not None and kind != name:
            return False
        if state == "stop" or name == "error":
            return False
        if name == "ping":
            continue
        if name == "message_start":
            if state != "start" or not isinstance(obj.get("message"), dict):
                return False
            state = "message"
        elif name == "content_block_start":
            if state != "message" or open_block is not None or obj.get("index") != next_index or not isinstance(obj.get("content_block"), dict):
                return False
            open_block, next_index = next_index, next_index + 1
        elif name == "content_block_delta":
            if open_block is None or obj.get("index") != open_block or not isinstance(obj.get("delta"), dict):
                return False
        elif name == "content_block_stop":
            if open_block is None or obj.get("index") != open_block:
                return False
            open_block = None
        elif name == "message_delta":
            if state == "start" or open_block is not None or not isinstance(obj.get("delta"), dict):
                return False
            state = "delta"
        elif name == "message_stop":
            if state != "delta":
                return False
            state = "stop"
        elif state == "start":
            return False  # nothing but pings before message_start
    return state == "stop"


def assemble_message(events: list[bytes]) -> bytes:
    """The non-streamed body for a complete stream. Raises ``ValueError`` for
    an error event, a missing ``message_start`` or malformed event data —
    check ``stream_is_complete`` before caching."""
    message: dict | None = None
    blocks: dict[int, dict] = {}
    partial_json: dict[int, list[str]] = {}
    for raw in events:
        name, obj = _event_type(raw)
        if name == "error":
            raise ValueError("stream carries an error event")
        if name in (None, "ping", "message_stop") or obj is None:
            continue
        if name == "message_start":
            message = dict(obj["message"])
            message["content"] = []
            message["usage"] = dict(message.get("usage") or {})
        elif name == "content_block_start":
            blocks[obj["index"]] = dict(obj["content_block"])
        elif name == "content_block_delta":
            index = obj["index"]
            block = blocks[index]
            delta = obj["delta"]
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif kind == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = block.get("signature", "") + delta["signature"]
            elif kind == "input_json_delta":
                partial_json.setdefault(index, []).append(delta["partial_json"])
            elif kind == "citations_delta":
                block["citations"] = [*(block.get("citations") or []), delta["citation"]]
        elif name == "content_block_stop":
            index = obj["index"]
            text = "".join(partial_json.pop(index, []))
            if text.strip():
                try:
                    blocks[index]["input"] = _json_decode(text)
                except msgspec.DecodeError as exc:
                    raise ValueError(f"block {index}: tool input is not JSON: {exc}") from exc
        elif name == "message_delta":
            if message is None:
                raise ValueError("message_delta before message_start")
            message.update(obj.get("delta") or {})
            message["usage"].update(obj.get("usage") or {})
    if message is None:
        raise ValueError("stream has no message_start")
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return _json_encode(message)


def _frame(name: str, obj: dict) -> bytes:
    # Anthropic's framing exactly: event line, data line, blank line.
    return b"event: " + name.encode() + b"\ndata: " + _json_encode(obj) + b"\n\n"


def split_message(body: bytes) -> list[bytes]:
    """The events Anthropic would have streamed for this message body."""
    message = _json_decode(body)
    if not isinstance(message, dict) or message.get("type") != "message":
        raise ValueError("body is not an Anthropic message")
    usage = dict(message.get("usage") or {})
    start = {k: v for k, v in message.items() if k not in ("content", "stop_reason", "stop_sequence", "usage")}
    start["content"] = []
    start["stop_reason"] = None
    start["stop_sequence"] = None
    # message_start carries the input side of usage; output_tokens arrives in
    # message_delta, as Anthropic streams it.
    start["usage"] = {**usage, "output_tokens": 0} if "output_tokens" in usage else usage
    events = [_frame("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        deltas: list[dict] = []
        if kind == "text":
            opening = {**block, "text": ""}
            if "citations" in block:
                opening["citations"] = []
                deltas += [{"type": "citations_delta", "citation": c} for c in block["citations"] or []]
            if block.get("text"):
                deltas.append({"type": "text_delta", "text": block["text"]})
        elif kind == "thinking":
            opening = {**block, "thinking": "", "signature": ""}
            if block.get("thinking"):
                deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
            if block.get("signature"):
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind in _JSON_INPUT_BLOCKS:
            opening = {**block, "input": {}}
            if block.get("input"):
                deltas.append({"type": "input_json_delta", "partial_json": _json_encode(block["input"]).decode()})
        else:
            # redacted_thinking, tool results and future types: whole in the start.
            opening = block
        events.append(_frame("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}))
        for delta in deltas:
            events.append(_frame("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(_frame("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(_frame("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
        "usage": {"output_tokens": usage["output_tokens"]} if "output_tokens" in usage else {},
    }))
    events.append(_frame("message_stop", {"type": "message_stop"}))
    return events
