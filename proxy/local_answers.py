"""Answers Weir gives itself, for side calls an operator chose not to pay for.

``[claude_code] answer_locally`` lists request kinds (proxy/kinds.py) that
never reach an upstream. Each gets the answer that makes Claude Code carry on
as if the call had succeeded and found nothing to do — never an answer that
widens what the client will do unasked (the Bash prefix check answers
``none``, so every command still asks for permission). Usage is zero: no
model ran, and a ledger must not bill for it.

The reply comes in the delivery mode the client asked for: a message, or a
complete, valid Anthropic event stream (``message_start`` … ``message_stop``)
that the SDKs' stream helpers accumulate like any other.
"""

from __future__ import annotations

import secrets

import msgspec

from .kinds import BASH_PREFIX, FILEPATH, QUOTA_PROBE, SUGGESTION, TITLE

__all__ = ["ANSWERABLE", "local_answer"]

# kind -> the text of the reply ("" = no content block at all).
_TEXT = {
    # The probe only checks that the key works; any one-token answer will do.
    QUOTA_PROBE: "ok",
    # Claude Code 1.x reads isNewTopic (false: keep the current title); 2.x
    # reads title. Neither renames a session to something wrong.
    TITLE: '{"isNewTopic": false, "title": "Claude Code session"}',
    # "No prefix": nothing is pre-approved, the user is asked as before.
    BASH_PREFIX: "none",
    # No files read or changed: nothing to track.
    FILEPATH: "<filepaths>\n</filepaths>",
    # The suggestion prompt itself says "or nothing": stay silent.
    SUGGESTION: "",
}
ANSWERABLE = frozenset(_TEXT)

_ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
_encode = msgspec.json.encode


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def local_answer(kind: str, model: str, stream: bool) -> tuple[bytes, bytes]:
    """(content type, body) of Weir's own answer to a request of ``kind``."""
    text = _TEXT[kind]
    msg_id = "msg_weir_" + secrets.token_hex(12)
    content = [{"type": "text", "text": text}] if text else []
    if not stream:
        message = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": _ZERO_USAGE,
        }
        return b"application/json", _encode(message)
    start = {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": _ZERO_USAGE}
    events = [_event("message_start", {"type": "message_start", "message": start})]
    if text:
        events += [
            _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
    events += [
        _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 0}}),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return b"text/event-stream", b"".join(events)
