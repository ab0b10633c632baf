"""A mock LLM upstream: Anthropic Messages and OpenAI chat completions over HTTP/1.1.

It is the fixture of every end-to-end test, the demo upstream and the far end
of the benchmark, so it must never be the bottleneck. That is why it is built
on trio sockets and ``h11`` rather than Quart/Hypercorn (whose per-request
machinery measured ~30x slower than a bare trio socket server, docs/ARCHITECTURE.md):
one task per connection, keep-alive, constant bytes encoded once, and an
unpaced reply leaves in a single socket write.

The file has two halves. ``MockCore`` is sans-IO: it turns a recorded request
into a ``Plan`` (status, headers, body or SSE events, delays, faults) with no
socket and no clock of its own (the ``rate_limit`` fault's window is fed the
shell's ``now``). ``MockUpstream`` is the trio shell that reads requests with
h11, carries out plans, and notices peers that leave mid-response.

Replies are a pure function of the request body (ids from the body's hash,
words from a generator seeded by the hash of ``messages``), so two identical
requests get byte-identical bodies — the cache and coalescing tests rely on it.
Per-request behaviour (faults, delays, reply length) is steered with
``x-mock-*`` headers; ``FAULTS`` lists the fault syntax (``weir mock-upstream
--help`` prints it).

What a real client needs to run its loops against it, on both APIs:

* **The tool rule.** A reply is a tool call when the request forces one
  (Anthropic ``tool_choice`` ``any``/``tool``, OpenAI ``required``/a named
  function), or — under ``auto`` or no ``tool_choice`` — when the
  conversation's *last* message is the user's and its text says ``use a
  tool`` (the first declared tool is called) or ``use the NAME tool`` for a
  declared NAME (that one is called; case is ignored). Tool results end the
  loop: an Anthropic ``tool_result`` block is not text, an OpenAI ``tool``
  message is not the user's, so the next reply is text. The input fits the
  tool's schema (``mock/schema.py``).
* **Structured output.** Anthropic ``output_config.format`` (or the beta's
  ``output_format``) and OpenAI ``response_format`` (``json_schema``, or
  ``json_object``) make the text a JSON document that fits the schema.
* **Thinking.** Anthropic ``thinking`` ``enabled`` or ``adaptive`` and OpenAI
  ``reasoning_effort`` add reasoning; ``display: "omitted"`` sends the
  thinking block with its signature and no text, as Anthropic does.
* **Models.** ``/v1/models/{id}`` answers for any id, as ``/v1/messages``
  accepts any model; the list holds a few well-known ones.
* **Message batches.** Anthropic's ``/v1/messages/batches`` API (create,
  retrieve, list, cancel, delete, JSONL results): a batch ends ``batch_ms``
  after its creation (``x-mock-batch-ms`` on the create), its requests
  answered by the same generator as ``/v1/messages``; ``results_url`` points
  at the mock itself (``_Batches``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import cachetools
import h11
import msgspec
import trio

from .schema import fit

from proxy.errors import error_body, error_event, type_for_status
from proxy.sse import encode_event

__all__ = [
    "FAULTS",
    "VOCABULARY",
    "Fault",
    "MockCore",
    "MockSettings",
    "MockUpstream",
    "Plan",
    "RecordedRequest",
    "add_arguments",
    "main",
    "parse_fault",
    "serve_forever",
    "settings_from_args",
]


class MockSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The mock's knobs, one definition for `weir mock-upstream`, `python -m mock` and
    the `[mock]` section Weir reads when it starts the mock for a quick start."""

    latency_ms: float = 0  # delay before the response head; 0 = a test's instant upstream
    ttft_ms: float = 0  # delay before the first content delta; 0 as above
    tokens_per_second: float = 0  # 0 = unpaced: the whole reply in one write (benchmark mode)
    output_tokens: int = 16  # words in a reply: enough to make several deltas, small enough to read
    fault: str = ""  # default fault for every request (header syntax); "" = healthy
    # A message batch ends this long after it was created (x-mock-batch-ms on
    # the create overrides it). Anthropic's take minutes to 24 h; a test's or
    # a demo's should take a moment.
    batch_ms: float = 1000
    workers: int = 1  # processes sharing the port via SO_REUSEPORT; 1 = this process only
    reuse_port: bool = False  # set on worker children (and implied by workers > 1)


class RecordedRequest(msgspec.Struct, frozen=True):
    """What arrived, exactly: tests assert the proxy forwarded bodies byte for byte."""

    method: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]  # h11 lowercases names
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


# ---------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------


class Fault(msgspec.Struct, frozen=True):
    status: int = 0  # 0 = answer normally
    retry_after: str = ""  # "" = no retry-after header
    hang: bool = False
    hang_after: int = -1  # -1 = off; else events (or, non-streamed: 0 = nothing, >0 = half the body)
    reset_after: int = -1  # as hang_after, but the connection is then reset
    slow_ms: float = 0
    malformed: bool = False
    error_event_after: int = -1
    unknown_event: bool = False
    fail_first: int = 0  # 0 = every request fails with ``status``
    # A provider's quota: at most this many requests in any ``rate_window``
    # seconds (a sliding window, the strictest way a provider can count);
    # past it, 429 rate_limit_error with retry-after. 0 = no quota.
    rate_limit: int = 0
    rate_window: float = 60.0


# Every fault, as `weir mock-upstream --help` prints it: (syntax, effect).
FAULTS: tuple[tuple[str, str], ...] = (
    ("status=N", "answer with HTTP status N and a proper error body in the API's shape"),
    ("retry_after=S", "with status: a retry-after header of S"),
    ("fail_first=N", "with status (default 500): fail only the first N identical requests, then answer"),
    ("hang", "never send the response head"),
    ("hang_after=N", "stall after N stream events (unstreamed: 0 = nothing, >0 = half the body)"),
    ("reset_after=N", "as hang_after, then reset the connection (a real RST)"),
    ("slow=MS", "wait MS milliseconds between any two stream events"),
    ("malformed", "put a broken event in the middle of the stream"),
    ("error_event_after=N", "end the stream with an error event after N events"),
    ("unknown_event", "add an event type clients must skip"),
    ("rate_limit=N", "a provider's quota: past N requests in the window, 429 with retry-after"),
    ("rate_window=S", "with rate_limit: the window in seconds (default 60)"),
)
_FLAG_FAULTS = {"hang", "malformed", "unknown_event"}
_INT_FAULTS = {"status", "hang_after", "reset_after", "error_event_after", "fail_first", "rate_limit"}
# fail_first without a status is a retry test against a generic upstream failure.
_DEFAULT_FAIL_STATUS = 500


def parse_fault(spec: str) -> Fault:
    """Parse ``status=429;retry_after=2,slow=50`` style specs.

    ``rate_limit=40`` (with an optional ``rate_window=60``, seconds) makes
    the mock a provider with a quota: the 41st request inside any window gets
    429 ``rate_limit_error`` and a ``retry-after`` saying when the window
    frees a place. The window is shared by every request carrying the fault.

    Commas separate faults and semicolons their parameters, but every key is
    distinct, so both separators simply split ``key[=value]`` items. Unknown
    keys raise ``ValueError``: a misspelt fault must fail loudly, not pass.
    """
    fields: dict[str, Any] = {}
    for item in re.split(r"[,;]", spec):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        value = value.strip()
        if key in _FLAG_FAULTS:
            fields[key] = value.lower() not in ("0", "false", "no") if sep else True
        elif key in _INT_FAULTS:
            fields[key] = int(value)
        elif key == "slow":
            fields["slow_ms"] = float(value)
        elif key == "rate_window":
            fields["rate_window"] = float(value)
        elif key == "retry_after":
            fields["retry_after"] = value
        else:
            raise ValueError(f"unknown fault {key!r}")
    if fields.get("fail_first") and not fields.get("status"):
        fields["status"] = _DEFAULT_FAIL_STATUS
    return Fault(**fields)


# ---------------------------------------------------------------------------
# Wire envelopes: decode only what shapes the reply (msgspec Structs drop what they do not name)
# ---------------------------------------------------------------------------


class _Block(msgspec.Struct):
    type: str = ""
    text: Any = ""  # only text blocks have a string here


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[_Block] | None = None


class _AnthropicTool(msgspec.Struct):
    name: str = ""
    input_schema: dict[str, Any] | None = None


class _AnthropicRequest(msgspec.Struct):
    model: str
    max_tokens: int
    messages: list[msgspec.Raw]
    stream: bool = False
    thinking: dict[str, Any] | None = None
    tools: list[_AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None


class _CountTokensRequest(msgspec.Struct):
    model: str
    messages: list[msgspec.Raw]


class _Function(msgspec.Struct):
    name: str = ""
    parameters: dict[str, Any] | None = None


class _OpenAITool(msgspec.Struct):
    type: str = "function"
    function: _Function | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _OpenAIRequest(msgspec.Struct):
    model: str
    messages: list[msgspec.Raw]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[_OpenAITool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None


_decode_anthropic = msgspec.json.Decoder(_AnthropicRequest).decode
_decode_count = msgspec.json.Decoder(_CountTokensRequest).decode
_decode_openai = msgspec.json.Decoder(_OpenAIRequest).decode
_decode_message = msgspec.json.Decoder(_Message).decode
_encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------------------
# Reply composition (shared by both APIs)
# ---------------------------------------------------------------------------

# 64 plain words: small enough that a stop-sequence test finds a hit quickly,
# large enough that different bodies visibly get different replies.
VOCABULARY: tuple[str, ...] = tuple(
    """alpha brook cedar delta ember fjord grove harbor island jasper kettle lantern
    meadow nectar orchid pebble quartz river saffron thistle umber velvet willow
    xenon yarrow zephyr amber basalt copper dune echo fern glacier hazel iris
    juniper kelp lotus maple nickel opal pine quill rain sage tide upland vale
    wren yew zinc acorn birch clover dew elm flint garnet heath ivy jade koi lark moss""".split()
)
assert len(VOCABULARY) == 64

# OpenAI objects carry a creation time; a fixed one keeps replies byte-identical.
_CREATED = 1_700_000_000
# Tool input is streamed in pieces this long, close to what Anthropic sends.
_JSON_PIECE = 8


class _Reply:
    """The content of one reply, before either API's framing."""

    __slots__ = (
        "hexid",
        "model",
        "thinking",
        "signature",
        "text",
        "tool",
        "stop_reason",
        "stop_sequence",
        "input_tokens",
        "output_tokens",
    )

    hexid: str
    model: str
    thinking: list[str] | None
    signature: str
    text: list[str]  # deltas: "word", " word", ...
    tool: tuple[str, str, str] | None  # (id suffix, name, input JSON)
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int


def _input_tokens(body: bytes) -> int:
    # ~4 bytes a token is the usual rule of thumb for English JSON.
    return max(1, len(body) // 4)


def _compose(
    body: bytes,
    messages: list[msgspec.Raw],
    model: str,
    n: int,
    limit: int | None,
    thinking_budget: int | None,
    tool: tuple[str, dict[str, Any] | None] | None,
    stops: list[str] | None,
    schema: dict[str, Any] | None = None,
    show_thinking: bool = True,
) -> _Reply:
    # Ids come from the whole body, so identical requests get identical bytes.
    # Words come from the conversation alone, so the streamed and unstreamed
    # forms of a request (or two max_tokens) tell the same story.
    convo = hashlib.blake2b(digest_size=16)
    for raw in messages:
        convo.update(raw)
    rng = random.Random(convo.digest())
    r = _Reply()
    r.hexid = hashlib.blake2b(body, digest_size=16).hexdigest()
    r.model = model
    r.input_tokens = _input_tokens(body)
    r.stop_sequence = None
    r.stop_reason = "end_turn"
    r.tool = None
    r.thinking = None
    r.signature = ""
    budget = limit if limit is not None else sys.maxsize
    used = 0
    if thinking_budget is not None:
        k = max(1, min(n // 2, thinking_budget, budget))
        words = rng.choices(VOCABULARY, k=k)
        r.thinking = [words[0]] + [" " + w for w in words[1:]] if show_thinking else []
        r.signature = "mock_sig_" + r.hexid
        used = k
    text: list[str] = []
    if tool is not None:
        name, input_schema = tool
        r.tool = ("mock_" + r.hexid[:24], name, _encode(fit(input_schema, rng, VOCABULARY)).decode())
        r.stop_reason = "tool_use"
        used += -(-len(r.tool[2]) // _JSON_PIECE)
    elif used >= budget:
        r.stop_reason = "max_tokens"
    elif schema is not None:
        # Structured output: the document in pieces, one a token; cut at the
        # budget as a real model's would be (then it does not parse).
        pieces = _pieces(_encode(fit(schema, rng, VOCABULARY)).decode())
        room = budget - used
        if len(pieces) > room:
            pieces, r.stop_reason = pieces[:room], "max_tokens"
        text = pieces
        used += len(pieces)
    else:
        stopset = set(stops) if stops else None
        for word in rng.choices(VOCABULARY, k=n):
            if stopset is not None and word in stopset:
                r.stop_reason, r.stop_sequence = "stop_sequence", word
                break
            if used >= budget:
                r.stop_reason = "max_tokens"
                break
            text.append(" " + word if text else word)
            used += 1
    r.text = text
    r.output_tokens = max(1, used)
    return r


def _final_user_text(messages: list[msgspec.Raw]) -> str:
    """The text of the conversation's last message if the user wrote it, else ""."""
    try:
        msg = _decode_message(messages[-1])
    except (msgspec.ValidationError, IndexError):
        return ""
    if msg.role != "user":
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return " ".join(b.text for b in msg.content or () if b.type == "text" and isinstance(b.text, str))


def _requested_tool(messages: list[msgspec.Raw], names: list[str]) -> int | None:
    """The tool rule (module docstring): which declared tool the last user message asks for, if any."""
    text = " ".join(_final_user_text(messages).lower().split())
    if not text:
        return None
    for i, name in enumerate(names):
        if f"use the {name.lower()} tool" in text:
            return i
    return 0 if "use a tool" in text else None


def _format_schema(fmt: Any, where: str) -> dict[str, Any] | None:
    """A structured-output request's schema (None: plain text); a malformed one is the client's 400."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _Bad(400, f"{where}: must be an object")
    kind = fmt.get("type")
    if kind == "json_schema":
        schema = fmt.get("schema")
        if schema is None and isinstance(fmt.get("json_schema"), dict):  # OpenAI nests it one level down
            schema = fmt["json_schema"].get("schema")
        if not isinstance(schema, dict):
            raise _Bad(400, f"{where}.schema: a JSON schema object is required")
        return schema
    if kind == "json_object":
        return _JSON_OBJECT
    if kind == "text":
        return None
    raise _Bad(400, f"{where}.type: {kind!r} is not a known format")


# What OpenAI's json_object mode promises is only "an object": one with an answer.
_JSON_OBJECT: dict[str, Any] = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def _pieces(s: str) -> list[str]:
    return [s[i : i + _JSON_PIECE] for i in range(0, len(s), _JSON_PIECE)] or [""]


# ---------------------------------------------------------------------------
# Anthropic framing
# ---------------------------------------------------------------------------

# Every ``anthropic-ratelimit-*`` header a client may read; constant values so
# that responses stay identical, generous so that no client throttles itself.
_ANTHROPIC_HEADERS = [
    (b"anthropic-ratelimit-requests-limit", b"4000"),
    (b"anthropic-ratelimit-requests-remaining", b"3999"),
    (b"anthropic-ratelimit-requests-reset", b"2099-01-01T00:00:00Z"),
    (b"anthropic-ratelimit-tokens-limit", b"2000000"),
    (b"anthropic-ratelimit-tokens-remaining", b"1999000"),
    (b"anthropic-ratelimit-tokens-reset", b"2099-01-01T00:00:00Z"),
]
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

# Event kinds in a plan: only content deltas are paced by tokens_per_second.
_FRAME, _DELTA = 0, 1

_PING = encode_event("ping", b'{"type":"ping"}')
_MESSAGE_STOP = encode_event("message_stop", b'{"type":"message_stop"}')
_DELTA_HEAD = [
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":' % i for i in range(4)
]


def _delta(index: int, kind: bytes, field: bytes, value: str) -> bytes:
    return (
        _DELTA_HEAD[index] + b'{"type":"' + kind + b'","' + field + b'":' + _encode(value) + b"}}\n\n"
    )


def _block_event(name: str, payload: dict[str, Any]) -> bytes:
    return encode_event(name, _encode(payload))


def _anthropic_usage(r: _Reply, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": r.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _anthropic_message(r: _Reply) -> bytes:
    content: list[dict[str, Any]] = []
    if r.thinking is not None:
        content.append({"type": "thinking", "thinking": "".join(r.thinking), "signature": r.signature})
    if r.tool is not None:
        content.append(
            {"type": "tool_use", "id": "toolu_" + r.tool[0], "name": r.tool[1], "input": msgspec.json.decode(r.tool[2])}
        )
    elif r.text:
        content.append({"type": "text", "text": "".join(r.text)})
    return _encode(
        {
            "id": "msg_mock_" + r.hexid[:24],
            "type": "message",
            "role": "assistant",
            "model": r.model,
            "content": content,
            "stop_reason": r.stop_reason,
            "stop_sequence": r.stop_sequence,
            "usage": _anthropic_usage(r, r.output_tokens),
        }
    )


def _anthropic_events(r: _Reply, fault: Fault) -> list[tuple[bytes, int]]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_mock_" + r.hexid[:24],
            "type": "message",
            "role": "assistant",
            "model": r.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _anthropic_usage(r, 1),
        },
    }
    events: list[tuple[bytes, int]] = [(_block_event("message_start", start), _FRAME)]
    index = 0

    def block(content_block: dict[str, Any], deltas: list[bytes]) -> None:
        nonlocal index
        events.append(
            (_block_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": content_block}), _FRAME)
        )
        if index == 0:
            events.append((_PING, _FRAME))
        events.extend((d, _DELTA) for d in deltas)
        events.append((_block_event("content_block_stop", {"type": "content_block_stop", "index": index}), _FRAME))
        index += 1

    if r.thinking is not None:
        deltas = [_delta(index, b"thinking_delta", b"thinking", w) for w in r.thinking]
        deltas.append(_delta(index, b"signature_delta", b"signature", r.signature))
        block({"type": "thinking", "thinking": "", "signature": ""}, deltas)
    if r.tool is not None:
        deltas = [_delta(index, b"input_json_delta", b"partial_json", p) for p in [""] + _pieces(r.tool[2])]
        block({"type": "tool_use", "id": "toolu_" + r.tool[0], "name": r.tool[1], "input": {}}, deltas)
    elif r.text or index == 0:
        block({"type": "text", "text": ""}, [_delta(index, b"text_delta", b"text", w) for w in r.text])
    events.append(
        (
            _block_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": r.stop_reason, "stop_sequence": r.stop_sequence},
                    "usage": {"output_tokens": r.output_tokens},
                },
            ),
            _FRAME,
        )
    )
    events.append((_MESSAGE_STOP, _FRAME))

    if fault.unknown_event:
        # Right after the ping: a type Anthropic may add later, which clients must skip.
        events.insert(3, (encode_event("future_event", b'{"type":"future_event","detail":"mock"}'), _FRAME))
    if fault.malformed:
        bad = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":\n\n'
        events.insert(len(events) // 2, (bad, _FRAME))
    if fault.error_event_after >= 0:
        events = events[: fault.error_event_after]
        events.append((error_event("overloaded_error", "Overloaded (mock fault)"), _FRAME))
    return events


# ---------------------------------------------------------------------------
# OpenAI framing
# ---------------------------------------------------------------------------

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
_DONE_LINE = b"data: [DONE]\n\n"


def _openai_usage(r: _Reply) -> dict[str, int]:
    return {
        "prompt_tokens": r.input_tokens,
        "completion_tokens": r.output_tokens,
        "total_tokens": r.input_tokens + r.output_tokens,
    }


def _openai_completion(r: _Reply) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": None if r.tool else "".join(r.text)}
    if r.thinking is not None:
        message["reasoning_content"] = "".join(r.thinking)
    if r.tool is not None:
        message["tool_calls"] = [
            {"id": "call_" + r.tool[0], "type": "function", "function": {"name": r.tool[1], "arguments": r.tool[2]}}
        ]
    return _encode(
        {
            "id": "chatcmpl-mock-" + r.hexid[:24],
            "object": "chat.completion",
            "created": _CREATED,
            "model": r.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _FINISH[r.stop_reason]}],
            "usage": _openai_usage(r),
        }
    )


def _openai_events(r: _Reply, fault: Fault, include_usage: bool) -> list[tuple[bytes, int]]:
    # Constant prefix of every chunk, encoded once per reply.
    head = (
        b'data: {"id":"chatcmpl-mock-' + r.hexid[:24].encode() + b'","object":"chat.completion.chunk","created":%d,"model":'
        % _CREATED
        + _encode(r.model)
        + b',"choices":'
    )
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return head + _encode([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]) + tail

    events: list[tuple[bytes, int]] = [(chunk({"role": "assistant", "content": ""}), _FRAME)]
    if r.thinking is not None:
        events.extend((chunk({"reasoning_content": w}), _DELTA) for w in r.thinking)
    if r.tool is not None:
        call_id, name, args = r.tool
        events.append(
            (
                chunk({"tool_calls": [{"index": 0, "id": "call_" + call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                _DELTA,
            )
        )
        events.extend((chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}), _DELTA) for p in _pieces(args))
    else:
        events.extend((chunk({"content": w}), _DELTA) for w in r.text)
    events.append((chunk({}, _FINISH[r.stop_reason]), _FRAME))
    if include_usage:
        events.append((head + b'[],"usage":' + _encode(_openai_usage(r)) + b"}\n\n", _FRAME))
    events.append((_DONE_LINE, _FRAME))

    if fault.malformed:
        events.insert(len(events) // 2, (b'data: {"id":"chatcmpl-mock","choices":[{\n\n', _FRAME))
    if fault.error_event_after >= 0:
        events = events[: fault.error_event_after]
        events.append((b"data: " + _openai_error("Overloaded (mock fault)", 503) + b"\n\n", _FRAME))
    return events


# OpenAI's (type, code) for the statuses tests use; anything else is a 4xx or 5xx default.
_OPENAI_ERRORS = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def _openai_error(message: str, status: int) -> bytes:
    type_, code = _OPENAI_ERRORS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return _encode({"error": {"message": message, "type": type_, "param": None, "code": code}})


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

_MODELS = (
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z", 1754352000),
    ("claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z", 1747872000),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z", 1747872000),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z", 1729555200),
)
_ANTHROPIC_MODEL = {
    m[0]: _encode({"type": "model", "id": m[0], "display_name": m[1], "created_at": m[2]}) for m in _MODELS
}
_ANTHROPIC_MODELS = _encode(
    {
        "data": [msgspec.json.decode(v) for v in _ANTHROPIC_MODEL.values()],
        "has_more": False,
        "first_id": _MODELS[0][0],
        "last_id": _MODELS[-1][0],
    }
)
# When a model the list does not hold was "released": a fixed date, so bodies stay identical.
_MOCK_MODEL_CREATED = "2025-01-01T00:00:00Z"
_OPENAI_MODEL = {m[0]: _encode({"id": m[0], "object": "model", "created": m[3], "owned_by": "anthropic"}) for m in _MODELS}
_OPENAI_MODELS = _encode({"object": "list", "data": [msgspec.json.decode(v) for v in _OPENAI_MODEL.values()]})


# ---------------------------------------------------------------------------
# The sans-IO core
# ---------------------------------------------------------------------------


class Plan:
    """What the shell must do for one request: bytes to send and when."""

    __slots__ = (
        "status",
        "headers",
        "body",
        "events",
        "latency",
        "ttft",
        "interval",
        "slow",
        "hang",
        "hang_after",
        "reset_after",
    )

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.events: list[tuple[bytes, int]] | None = None  # None = not streamed
        self.latency = 0.0  # seconds before the head
        self.ttft = 0.0  # seconds before the first content delta
        self.interval = 0.0  # seconds between content deltas
        self.slow = 0.0  # seconds between any two events
        self.hang = False
        self.hang_after = -1
        self.reset_after = -1

    @property
    def delayed(self) -> bool:
        """Whether the response spends time waiting, so the peer may leave meanwhile."""
        return bool(
            self.latency
            or self.hang
            or self.hang_after >= 0
            or (self.events is not None and (self.ttft or self.interval or self.slow))
        )


class _Bad(Exception):
    """A request the mock refuses with a 4xx, in the API's own error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_OVERRIDES = (b"x-mock-latency-ms", b"x-mock-ttft-ms", b"x-mock-tokens-per-second", b"x-mock-output-tokens", b"x-mock-batch-ms")
# Identical failing requests remembered for fail_first; a retry test needs a handful.
_FAIL_KEYS = 10_000
# Parsed fault specs kept; a test suite uses a few dozen distinct ones.
_FAULT_CACHE = 256


class MockCore:
    """Request in, ``Plan`` out: every decision the mock makes, without I/O or a clock.

    The only state is the ``fail_first`` tally (which identical request is
    this?), kept in a bounded LRU so a long benchmark cannot grow it, and the
    ``rate_limit`` fault's window of accepted requests (at most its limit of
    timestamps); the caller passes ``now``.
    """

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self._fail_counts: cachetools.LRUCache[tuple[str, bytes], int] = cachetools.LRUCache(maxsize=_FAIL_KEYS)
        self._faults: dict[str, Fault] = {}
        self._default_fault = parse_fault(settings.fault)  # a bad --fault fails at start-up
        self._window: collections.deque[float] = collections.deque()
        self.rate_limited = 0  # requests refused by the rate_limit fault
        self.batches = _Batches(self)

    def _fault(self, spec: str) -> Fault:
        fault = self._faults.get(spec)
        if fault is None:
            if len(self._faults) >= _FAULT_CACHE:
                self._faults.clear()
            fault = self._faults[spec] = parse_fault(spec)
        return fault

    def respond(self, req: RecordedRequest, now: float = 0.0, wall: float = 0.0) -> Plan:
        """``now`` is the shell's monotonic clock (faults' windows, when a batch
        ends); ``wall`` the epoch seconds a batch object's timestamps show."""
        openai = _speaks_openai(req)
        try:
            return self._respond(req, openai, now, wall)
        except _Bad as exc:
            return _error_plan(exc.status, str(exc), openai)

    def _respond(self, req: RecordedRequest, openai: bool, now: float, wall: float) -> Plan:
        s = self.settings
        fault_spec: str | None = None
        overrides: dict[bytes, bytes] = {}
        for name, value in req.headers:
            if name == b"x-api-key" or name == b"authorization":
                if value == b"invalid" or value == b"Bearer invalid":
                    raise _Bad(401, "invalid x-api-key")
            elif name[:7] == b"x-mock-":
                if name == b"x-mock-fault":
                    fault_spec = value.decode("latin-1")
                elif name in _OVERRIDES:
                    overrides[name] = value
        try:
            fault = self._default_fault if fault_spec is None else self._fault(fault_spec)
            latency = float(overrides.get(b"x-mock-latency-ms", s.latency_ms)) / 1000
            ttft = float(overrides.get(b"x-mock-ttft-ms", s.ttft_ms)) / 1000
            tps = float(overrides.get(b"x-mock-tokens-per-second", s.tokens_per_second))
            n = int(overrides.get(b"x-mock-output-tokens", s.output_tokens))
            batch_s = float(overrides.get(b"x-mock-batch-ms", s.batch_ms)) / 1000
        except ValueError as exc:
            raise _Bad(400, f"bad x-mock-* header: {exc}") from None

        if fault.rate_limit:
            window = self._window
            while window and window[0] <= now - fault.rate_window:
                window.popleft()
            if len(window) >= fault.rate_limit:
                self.rate_limited += 1
                plan = _error_plan(429, f"mock fault: more than {fault.rate_limit} requests in {fault.rate_window:g} s", openai)
                wait = max(1, math.ceil(window[0] + fault.rate_window - now))
                plan.headers.append((b"retry-after", b"%d" % wait))
                plan.latency = latency
                return plan
            window.append(now)
        if fault.hang:
            plan = Plan(200, [])
            plan.latency, plan.hang = latency, True
            return plan
        if fault.status:
            failing = True
            if fault.fail_first:
                key = (req.path, hashlib.blake2b(req.body, digest_size=16).digest())
                seen = self._fail_counts[key] = self._fail_counts.get(key, 0) + 1
                failing = seen <= fault.fail_first
            if failing:
                plan = _error_plan(fault.status, f"mock fault: status {fault.status}", openai)
                if fault.retry_after:
                    plan.headers.append((b"retry-after", fault.retry_after.encode()))
                plan.latency = latency
                return plan

        if req.path.startswith(_BATCHES):
            plan = self.batches.respond(req, now, wall, batch_s, n)
            plan.latency = latency
            return plan
        plan = self._route(req, openai, fault, n)
        plan.latency = latency
        if plan.events is not None:
            plan.ttft = ttft
            plan.interval = 1 / tps if tps > 0 else 0.0
            plan.slow = fault.slow_ms / 1000
        elif plan.status == 200 and req.method == "POST":
            # Unstreamed: the client waits for the whole generation before the head.
            plan.latency += ttft + (n / tps if tps > 0 else 0.0)
        plan.hang_after, plan.reset_after = fault.hang_after, fault.reset_after
        return plan

    def _route(self, req: RecordedRequest, openai: bool, fault: Fault, n: int) -> Plan:
        path, method = req.path, req.method
        if path == "/v1/messages":
            _need(method, "POST")
            return self._messages(req, fault, n)
        if path == "/v1/chat/completions":
            _need(method, "POST")
            return self._chat(req, fault, n)
        if path == "/v1/messages/count_tokens":
            _need(method, "POST")
            try:
                _decode_count(req.body)
            except msgspec.DecodeError as exc:
                raise _Bad(400, str(exc)) from None
            return Plan(200, [_JSON], b'{"input_tokens":%d}' % _input_tokens(req.body))
        if path == "/v1/models":
            _need(method, "GET")
            return Plan(200, [_JSON], _OPENAI_MODELS if openai else _ANTHROPIC_MODELS)
        if path.startswith("/v1/models/"):
            _need(method, "GET")
            model = path[len("/v1/models/") :]
            if not model:
                raise _Bad(404, "model: an id is required")
            body = (_OPENAI_MODEL if openai else _ANTHROPIC_MODEL).get(model)
            if body is None:
                # Every model /v1/messages accepts (any) has an entry.
                if openai:
                    body = _encode({"id": model, "object": "model", "created": _CREATED, "owned_by": "mock"})
                else:
                    body = _encode({"type": "model", "id": model, "display_name": model, "created_at": _MOCK_MODEL_CREATED})
            return Plan(200, [_JSON], body)
        raise _Bad(404, f"no route for {method} {path}")

    def _messages(self, req: RecordedRequest, fault: Fault, n: int) -> Plan:
        try:
            env = _decode_anthropic(req.body)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise _Bad(400, str(exc)) from None
        if env.max_tokens < 1:
            raise _Bad(400, "max_tokens: must be at least 1")
        if not env.messages:
            raise _Bad(400, "messages: at least one message is required")
        thinking = None
        kind = env.thinking.get("type") if env.thinking else None
        if kind == "enabled":
            budget = env.thinking.get("budget_tokens")  # type: ignore[union-attr]
            thinking = budget if isinstance(budget, int) else n
        elif kind == "adaptive":
            thinking = n  # the model decides how much: the mock always thinks a little
        shown = not (env.thinking and env.thinking.get("display") == "omitted")
        tool = None
        if env.tools:
            choice = env.tool_choice or {}
            kind = choice.get("type")
            chosen = None
            if kind == "tool":
                chosen = next((t for t in env.tools if t.name == choice.get("name")), None)
                if chosen is None:
                    raise _Bad(400, f"tool_choice: no tool named {choice.get('name')!r}")
            elif kind == "any":
                chosen = env.tools[0]
            elif kind != "none":
                asked = _requested_tool(env.messages, [t.name for t in env.tools])
                chosen = None if asked is None else env.tools[asked]
            if chosen is not None:
                tool = (chosen.name, chosen.input_schema)
        config = env.output_config or {}
        schema = _format_schema(config.get("format") or env.output_format, "output_config.format")
        reply = _compose(req.body, env.messages, env.model, n, env.max_tokens, thinking, tool, env.stop_sequences, schema, shown)
        headers = [(b"request-id", b"req_mock_" + reply.hexid[:24].encode())] + _ANTHROPIC_HEADERS
        if env.stream:
            plan = Plan(200, headers + _SSE)
            plan.events = _anthropic_events(reply, fault)
            return plan
        return Plan(200, headers + [_JSON], _anthropic_message(reply))

    def _chat(self, req: RecordedRequest, fault: Fault, n: int) -> Plan:
        try:
            env = _decode_openai(req.body)
        except msgspec.DecodeError as exc:
            raise _Bad(400, str(exc)) from None
        if not env.messages:
            raise _Bad(400, "messages: at least one message is required")
        tool = None
        funcs = [t.function for t in env.tools or () if t.function is not None]
        if funcs:
            choice = env.tool_choice
            chosen = None
            if isinstance(choice, dict):
                function = choice.get("function")
                want = function.get("name") if isinstance(function, dict) else None
                chosen = next((f for f in funcs if f.name == want), None)
                if chosen is None:
                    raise _Bad(400, f"tool_choice: no function named {want!r}")
            elif choice == "required":
                chosen = funcs[0]
            elif choice != "none":
                asked = _requested_tool(env.messages, [f.name for f in funcs])
                chosen = None if asked is None else funcs[asked]
            if chosen is not None:
                tool = (chosen.name, chosen.parameters)
        limit = env.max_completion_tokens if env.max_completion_tokens is not None else env.max_tokens
        stops = [env.stop] if isinstance(env.stop, str) else env.stop
        thinking = n if env.reasoning_effort is not None else None
        schema = _format_schema(env.response_format, "response_format")
        reply = _compose(req.body, env.messages, env.model, n, limit, thinking, tool, stops, schema)
        headers = [(b"x-request-id", b"req_mock_" + reply.hexid[:24].encode())]
        if env.stream:
            plan = Plan(200, headers + _SSE)
            include = env.stream_options is not None and env.stream_options.include_usage
            plan.events = _openai_events(reply, fault, include)
            return plan
        return Plan(200, headers + [_JSON], _openai_completion(reply))


# ---------------------------------------------------------------------------
# Message batches (Anthropic's API; sans-IO like the rest of the core)
# ---------------------------------------------------------------------------

_BATCHES = "/v1/messages/batches"
# Anthropic's contract: custom_id's pattern, at most 100,000 requests, results
# kept 24 h past creation at the latest (expires_at), list pages of 1..1000 (20 by default).
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_BATCH_MAX_REQUESTS = 100_000
_BATCH_EXPIRY_S = 86_400
_LIST_DEFAULT, _LIST_MAX = 20, 1000
# Batches remembered; past this the oldest is forgotten, so a long run cannot grow memory.
_KEEP_BATCHES = 1_000
# What the SDK's batches.results() asks for (Accept) and gets.
_JSONL = (b"content-type", b"application/binary")


class _BatchRequest(msgspec.Struct):
    custom_id: Any = None
    params: msgspec.Raw = msgspec.Raw(b"")


class _BatchCreate(msgspec.Struct):
    requests: list[msgspec.Raw] = []  # each kept as bytes, so its params are forwarded as sent


_decode_batch_create = msgspec.json.Decoder(_BatchCreate).decode
_decode_batch_request = msgspec.json.Decoder(_BatchRequest).decode


class _Batch:
    """One batch: its requests (custom_id, params bytes) and its clock.

    ``due`` is on the shell's monotonic clock (when it ends); ``created`` and
    ``canceled`` are wall seconds, for the timestamps a client reads.
    """

    __slots__ = ("id", "items", "created", "due", "span", "canceled", "counts")

    def __init__(self, id: str, items: list[tuple[str, bytes]], created: float, due: float, span: float) -> None:
        self.id = id
        self.items = items
        self.created = created
        self.due = due
        self.span = span
        self.canceled: float | None = None
        self.counts: dict[str, int] | None = None  # tallied once, when it has ended


def _rfc3339(wall: float) -> str:
    """Anthropic's timestamps: RFC 3339, UTC, microseconds, ``Z``."""
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Batches:
    """Anthropic's Message Batches API: create, retrieve, list, cancel, delete, results.

    A batch does nothing until ``batch_ms`` has passed; then it has ended and
    every request is answered by the core's own message generator, so a
    result is the byte-identical body ``/v1/messages`` would give, computed
    when the results are read (nothing but the requests is kept). A request
    whose params ``/v1/messages`` would refuse is ``errored`` with that error;
    a batch canceled before it ended has every request ``canceled``.
    ``results_url`` points at the mock itself (its Host), as Anthropic's
    points at api.anthropic.com. Batches live in the process that created
    them: with ``--workers`` above 1 another process answers 404 for them.
    """

    def __init__(self, core: MockCore) -> None:
        self._core = core
        self._by_id: dict[str, _Batch] = {}  # creation order: the list is this, newest first
        self._seq = 0

    def respond(self, req: RecordedRequest, now: float, wall: float, span: float, n: int) -> Plan:
        rest = req.path[len(_BATCHES) :]
        method = req.method
        if not rest:
            if method == "POST":
                return self._create(req, now, wall, span)
            _need(method, "GET")
            return self._list(req, now)
        parts = rest.split("/")
        if parts[0] or len(parts) > 3 or not parts[1]:
            raise _Bad(404, f"no route for {method} {req.path}")
        batch = self._by_id.get(parts[1])
        if batch is None:
            raise _Bad(404, f"message batch {parts[1]!r} not found")
        base = "http://" + (req.header(b"host") or b"localhost").decode("latin-1")
        if len(parts) == 2:
            if method == "DELETE":
                if now < batch.due:
                    raise _Bad(400, f"message batch {batch.id} is still processing; cancel it and wait for it to end before deleting it")
                del self._by_id[batch.id]
                return Plan(200, [_JSON], _encode({"id": batch.id, "type": "message_batch_deleted"}))
            _need(method, "GET")
            return self._object_plan(batch, now, base)
        if parts[2] == "cancel":
            _need(method, "POST")
            if batch.canceled is None and now < batch.due:
                batch.canceled = wall
            return self._object_plan(batch, now, base)
        if parts[2] == "results":
            _need(method, "GET")
            if now < batch.due:
                raise _Bad(404, f"message batch {batch.id} has no results yet: it is still processing")
            return Plan(200, [_JSONL], b"".join(self._lines(batch, n)))
        raise _Bad(404, f"no route for {method} {req.path}")

    def _create(self, req: RecordedRequest, now: float, wall: float, span: float) -> Plan:
        try:
            doc = _decode_batch_create(req.body)
        except msgspec.DecodeError as exc:
            raise _Bad(400, str(exc)) from None
        raw = doc.requests
        if not raw:
            raise _Bad(400, "requests: a list of at least one request is required")
        if len(raw) > _BATCH_MAX_REQUESTS:
            raise _Bad(400, f"requests: at most {_BATCH_MAX_REQUESTS} requests in a batch, got {len(raw)}")
        items: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for i, one in enumerate(raw):
            try:
                r = _decode_batch_request(one)
            except msgspec.DecodeError as exc:
                raise _Bad(400, f"requests.{i}: {exc}") from None
            cid = r.custom_id
            if not isinstance(cid, str) or not _CUSTOM_ID.fullmatch(cid):
                raise _Bad(400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if cid in seen:
                raise _Bad(400, f"requests.{i}.custom_id: {cid!r} is used twice; custom_id must be unique within the batch")
            seen.add(cid)
            params = bytes(r.params)
            if params[:1] != b"{":
                raise _Bad(400, f"requests.{i}.params: an object is required")
            items.append((cid, params))
        self._seq += 1
        bid = "msgbatch_" + hashlib.blake2b(b"%d:" % self._seq + req.body, digest_size=12).hexdigest()
        self._by_id[bid] = batch = _Batch(bid, items, wall, now + span, span)
        while len(self._by_id) > _KEEP_BATCHES:
            del self._by_id[next(iter(self._by_id))]
        base = "http://" + (req.header(b"host") or b"localhost").decode("latin-1")
        return self._object_plan(batch, now, base)

    def _list(self, req: RecordedRequest, now: float) -> Plan:
        q = dict(p.partition("=")[::2] for p in req.query.split("&") if p)
        try:
            limit = int(q.get("limit", _LIST_DEFAULT))
        except ValueError:
            raise _Bad(400, "limit: must be an integer") from None
        if not 1 <= limit <= _LIST_MAX:
            raise _Bad(400, f"limit: must be between 1 and {_LIST_MAX}")
        ids = list(reversed(self._by_id))  # newest first
        before, after = q.get("before_id"), q.get("after_id")
        if after:
            at = ids.index(after) + 1 if after in ids else len(ids)
            page, more = ids[at : at + limit], at + limit < len(ids)
        elif before:
            at = ids.index(before) if before in ids else 0
            page, more = ids[max(0, at - limit) : at], at - limit > 0
        else:
            page, more = ids[:limit], limit < len(ids)
        base = "http://" + (req.header(b"host") or b"localhost").decode("latin-1")
        data = [self._object(self._by_id[i], now, base) for i in page]
        body = {"data": data, "has_more": more, "first_id": page[0] if page else None, "last_id": page[-1] if page else None}
        return Plan(200, [_JSON], _encode(body))

    def _object_plan(self, batch: _Batch, now: float, base: str) -> Plan:
        return Plan(200, [_JSON, (b"request-id", b"req_mock_" + batch.id[9:].encode())], _encode(self._object(batch, now, base)))

    def _object(self, b: _Batch, now: float, base: str) -> dict[str, Any]:
        ended = now >= b.due
        if ended:
            if b.counts is None:
                b.counts = self._tally(b)
            counts = b.counts
            status = "ended"
        else:
            counts = {"processing": len(b.items), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            status = "in_progress" if b.canceled is None else "canceling"
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _rfc3339(b.created + b.span) if ended else None,
            "created_at": _rfc3339(b.created),
            "expires_at": _rfc3339(b.created + _BATCH_EXPIRY_S),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(b.canceled) if b.canceled is not None else None,
            "results_url": f"{base}{_BATCHES}/{b.id}/results" if ended else None,
        }

    def _tally(self, b: _Batch) -> dict[str, int]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if b.canceled is not None:
            counts["canceled"] = len(b.items)
            return counts
        for _, params in b.items:
            counts["succeeded" if self._answer(params, self._core.settings.output_tokens)[0] else "errored"] += 1
        return counts

    def _answer(self, params: bytes, n: int) -> tuple[bool, bytes]:
        """(succeeded, the message or the error body) for one request's params."""
        try:
            env = _decode_anthropic(params)
            if env.stream:
                raise _Bad(400, "stream: streaming is not supported inside a message batch")
            plan = self._core._messages(RecordedRequest("POST", "/v1/messages", "", [], params), Fault(), n)
        except msgspec.DecodeError as exc:
            return False, error_body("invalid_request_error", str(exc))
        except _Bad as exc:
            return False, error_body(type_for_status(exc.status), str(exc))
        return True, plan.body

    def _lines(self, b: _Batch, n: int) -> list[bytes]:
        lines = []
        for cid, params in b.items:
            head = b'{"custom_id":' + _encode(cid) + b',"result":'
            if b.canceled is not None:
                lines.append(head + b'{"type":"canceled"}}\n')
                continue
            ok, body = self._answer(params, n)
            kind = b"succeeded" if ok else b"errored"
            field = b"message" if ok else b"error"
            lines.append(head + b'{"type":"' + kind + b'","' + field + b'":' + body + b"}}\n")
        return lines


def _need(method: str, want: str) -> None:
    if method != want:
        raise _Bad(405, f"method {method} not allowed")


def _speaks_openai(req: RecordedRequest) -> bool:
    """OpenAI's error and model-list shapes, or Anthropic's?

    The chat path is OpenAI's alone. ``/v1/models`` is shared, so a Bearer
    token without ``anthropic-version`` (what the OpenAI SDK sends) decides.
    """
    if req.path == "/v1/chat/completions":
        return True
    if not req.path.startswith("/v1/models"):
        return False
    bearer = False
    for name, value in req.headers:
        if name == b"anthropic-version":
            return False
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = True
    return bearer


def _error_plan(status: int, message: str, openai: bool) -> Plan:
    if openai:
        return Plan(status, [_JSON], _openai_error(message, status))
    return Plan(status, [_JSON, (b"request-id", b"req_mock_error")], error_body(type_for_status(status), message))


# ---------------------------------------------------------------------------
# The trio shell
# ---------------------------------------------------------------------------

# One receive per request in the common case: Claude Code bodies reach ~200 KiB,
# a benchmark request is < 1 KiB; 64 KiB is trio's own default chunk size.
_RECV_BYTES = 65536
# Matches common kernels' somaxconn ceiling; the benchmark opens hundreds at once.
_BACKLOG = 4096
# Requests remembered for tests; bounded so a benchmark run cannot grow memory.
_KEEP_REQUESTS = 10_000
# ...and by body bytes too: 10,000 Claude Code requests (~50 KiB each) would be 500 MB.
_KEEP_BYTES = 64 * 1024 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _Outcome:
    DONE, GONE, RESET = "done", "gone", "reset"


class MockUpstream:
    """The HTTP/1.1 server around ``MockCore``.

    ``requests`` keeps the most recent requests (bounded), ``calls`` counts
    all of them, ``disconnects`` counts peers that left while a response was
    still being sent, delayed or hung; ``wait_disconnect`` blocks until it
    reaches a number, so a test can assert the proxy really hung up upstream.
    Paths under ``/_mock/`` are neither recorded nor counted.
    """

    def __init__(
        self,
        settings: MockSettings | None = None,
        *,
        keep_requests: int = _KEEP_REQUESTS,
        keep_bytes: int = _KEEP_BYTES,
    ) -> None:
        self.settings = settings or MockSettings()
        self.core = MockCore(self.settings)
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=keep_requests)
        # When each recorded request arrived (trio time), for tests of pacing.
        self.arrived: collections.deque[float] = collections.deque(maxlen=keep_requests)
        self._keep_bytes = keep_bytes
        self._kept_bytes = 0
        self.calls = 0
        self.connections = 0  # accepted; lets a test see whether a client kept its connection alive
        self.disconnects = 0
        self._disconnected = trio.Event()

    async def wait_disconnect(self, count: int | None = None) -> None:
        """Wait until ``disconnects`` reaches ``count`` (default: one more than now)."""
        target = self.disconnects + 1 if count is None else count
        while self.disconnects < target:
            await self._disconnected.wait()

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self._disconnected.set()
        self._disconnected = trio.Event()

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        family, type_, proto, _, addr = (
            await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        )[0]
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.reuse_port or s.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(addr)
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        actual = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            for _ in range(s.workers - 1):
                nursery.start_soon(partial(_run_worker, s, host, actual))
            task_status.started(actual)
            await trio.serve_listeners(self._connection, [listener], handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(stream, conn)
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed: the client is done with us
                chunks = []
                while True:
                    part = await _next_event(stream, conn)
                    if type(part) is h11.Data:
                        chunks.append(part.data)
                    elif type(part) is h11.EndOfMessage:
                        break
                    else:
                        return  # closed mid-body
                target = event.target.decode("latin-1")
                path, _, query = target.partition("?")
                req = RecordedRequest(event.method.decode("latin-1"), path, query, list(event.headers), b"".join(chunks))
                if path.startswith("/_mock/"):
                    plan = self._mock_route(req)
                else:
                    self.calls += 1
                    self.arrived.append(trio.current_time())
                    self._record(req)
                    try:
                        plan = self.core.respond(req, trio.current_time(), time.time())
                    except Exception as exc:  # noqa: BLE001 - pure code: no Cancelled can come out of it
                        # An input shape the core did not foresee must become a
                        # 500 the test can see, not kill every other connection.
                        plan = _error_plan(500, f"mock upstream bug: {exc!r}", _speaks_openai(req))
                if not await self._respond(stream, conn, plan):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # Connection: close, or HTTP/1.0
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with trio.move_on_after(1):  # a courtesy 400, not worth waiting for
                    body = error_body("invalid_request_error", str(exc))
                    try:
                        await stream.send_all(
                            conn.send(h11.Response(status_code=exc.error_status_hint, headers=[_JSON, (b"content-length", b"%d" % len(body))]))
                            + conn.send(h11.Data(data=body))
                            + conn.send(h11.EndOfMessage())
                        )
                    except (trio.BrokenResourceError, h11.LocalProtocolError):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    def _record(self, req: RecordedRequest) -> None:
        kept = self.requests
        if kept.maxlen == 0:
            return
        if len(kept) == kept.maxlen:
            self._kept_bytes -= len(kept[0].body)
        kept.append(req)
        self._kept_bytes += len(req.body)
        while self._kept_bytes > self._keep_bytes and len(kept) > 1:
            self._kept_bytes -= len(kept.popleft().body)

    def _mock_route(self, req: RecordedRequest) -> Plan:
        if req.path == "/_mock/stats":
            stats = {"calls": self.calls, "connections": self.connections, "disconnects": self.disconnects, "pid": os.getpid()}
            return Plan(200, [_JSON], _encode(stats))
        return _error_plan(404, f"no route for {req.method} {req.path}", False)

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection, plan: Plan) -> bool:
        """Carry out a plan; False when the connection cannot be reused."""
        try:
            if plan.delayed:
                outcome = _Outcome.GONE
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_peer, stream, conn, nursery.cancel_scope)
                    outcome = await _send(stream, conn, plan)
                    nursery.cancel_scope.cancel()
            else:
                outcome = await _send(stream, conn, plan)
        except trio.BrokenResourceError:
            outcome = _Outcome.GONE
        if outcome is _Outcome.GONE:
            self._note_disconnect()
            return False
        if outcome is _Outcome.RESET:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            await stream.aclose()
            return False
        return True


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        conn.receive_data(await stream.receive_some(_RECV_BYTES))


async def _watch_peer(stream: trio.SocketStream, conn: h11.Connection, scope: trio.CancelScope) -> None:
    """Read while a response waits: EOF or a reset means the peer has gone."""
    try:
        while True:
            data = await stream.receive_some(_RECV_BYTES)
            if not data:
                break
            conn.receive_data(data)  # a pipelined request, kept for the next cycle
    except trio.BrokenResourceError:
        pass
    scope.cancel()


async def _send(stream: trio.SocketStream, conn: h11.Connection, plan: Plan) -> str:
    if plan.latency > 0:
        await trio.sleep(plan.latency)
    if plan.hang:
        await trio.sleep_forever()
    headers = plan.headers
    if plan.events is None:
        headers = headers + [(b"content-length", b"%d" % len(plan.body))]
    head = conn.send(h11.Response(status_code=plan.status, headers=headers))
    if plan.events is None:
        cut = plan.hang_after if plan.hang_after >= 0 else plan.reset_after
        if cut < 0:
            await stream.send_all(head + conn.send(h11.Data(data=plan.body)) + conn.send(h11.EndOfMessage()))
            return _Outcome.DONE
        if cut > 0:  # the head and half the body, then the fault
            await stream.send_all(head + conn.send(h11.Data(data=plan.body[: len(plan.body) // 2])))
    elif not await _send_events(stream, conn, plan, head):
        return _Outcome.DONE
    if plan.hang_after >= 0:
        await trio.sleep_forever()
    return _Outcome.RESET


async def _send_events(stream: trio.SocketStream, conn: h11.Connection, plan: Plan, head: bytes) -> bool:
    """Write SSE events; True when a hang/reset fault cut the stream short.

    Unpaced, the whole stream leaves in one write (docs/ARCHITECTURE.md: every
    write costs the reader a receive). Paced, each event is its own write, as
    a real upstream's would be. Delays run against absolute deadlines: a
    relative sleep per event drifts (epoll rounds up to whole milliseconds), and
    a stream that falls behind under load writes the events already due in one
    go, as a real server's TCP stack would, instead of falling further behind.
    """
    events = plan.events
    assert events is not None
    stop = len(events)
    faulted = plan.hang_after >= 0 or plan.reset_after >= 0
    if faulted:
        stop = min(stop, plan.hang_after if plan.hang_after >= 0 else plan.reset_after)
    first = next((i for i, (_, kind) in enumerate(events) if kind == _DELTA), -1)
    out = [head]
    batch: list[bytes] = []
    due = trio.current_time()
    for i in range(stop):
        data, kind = events[i]
        delay = plan.slow if i else 0.0
        if i == first:
            delay += plan.ttft
        elif kind == _DELTA and i > first:
            delay += plan.interval
        if delay > 0:
            due += delay
            if trio.current_time() < due:
                if batch:
                    out.append(conn.send(h11.Data(data=b"".join(batch))))
                    batch.clear()
                if out:
                    await stream.send_all(b"".join(out))
                    out.clear()
                await trio.sleep_until(due)
        batch.append(data)
    if batch:
        out.append(conn.send(h11.Data(data=b"".join(batch))))
    if not faulted:
        out.append(conn.send(h11.EndOfMessage()))
    if out:
        await stream.send_all(b"".join(out))
    return faulted


async def _run_worker(s: MockSettings, host: str, port: int) -> None:
    """One extra process on the same port; cancelling this kills it."""
    argv = [sys.executable, "-m", "mock", *_settings_argv(s), "--host", host, "--port", str(port)]
    env = dict(os.environ)
    # The child must import this package even when it is not installed.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    await trio.run_process(argv, stdout=subprocess.DEVNULL, env=env)


def _settings_argv(s: MockSettings) -> list[str]:
    return [
        "--latency-ms", str(s.latency_ms),
        "--ttft-ms", str(s.ttft_ms),
        "--tokens-per-second", str(s.tokens_per_second),
        "--output-tokens", str(s.output_tokens),
        "--fault", s.fault,
        "--batch-ms", str(s.batch_ms),
        "--workers", "1",
        "--reuse-port",
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def help_epilog() -> str:
    """The fault syntax and the request headers, for ``--help`` (``weir mock-upstream`` and ``python -m mock``)."""
    width = max(len(syntax) for syntax, _ in FAULTS)
    lines = [
        "faults: x-mock-fault request header (or --fault for every request), items split by ',' or ';'",
        "  e.g. x-mock-fault: status=429;retry_after=2   or   --fault hang_after=3,slow=50",
    ]
    lines += [f"  {syntax:<{width}}  {effect}" for syntax, effect in FAULTS]
    lines += [
        "per-request overrides: x-mock-latency-ms, x-mock-ttft-ms, x-mock-tokens-per-second, x-mock-output-tokens,",
        "  x-mock-batch-ms (on a batch's create: when it ends)",
        "tools: under tool_choice auto, a last user message saying 'use a tool' (first tool) or",
        "  'use the NAME tool' gets a tool call whose input fits the tool's schema",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_epilog()
    d = MockSettings()
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default: a mock is never public")
    parser.add_argument("--port", type=int, default=8081, help="8081: next to the proxy's 8080; 0 = ephemeral")
    parser.add_argument("--latency-ms", type=float, default=d.latency_ms, help="delay before the response head")
    parser.add_argument("--ttft-ms", type=float, default=d.ttft_ms, help="delay before the first content delta")
    parser.add_argument("--tokens-per-second", type=float, default=d.tokens_per_second, help="0 = unpaced")
    parser.add_argument("--output-tokens", type=int, default=d.output_tokens, help="words in a reply")
    parser.add_argument("--fault", default=d.fault, help="default x-mock-fault for every request")
    parser.add_argument("--batch-ms", type=float, default=d.batch_ms, help="a message batch ends this long after its creation")
    parser.add_argument("--workers", type=int, default=d.workers, help="processes sharing the port")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)


def settings_from_args(ns: argparse.Namespace) -> MockSettings:
    return MockSettings(
        latency_ms=ns.latency_ms,
        ttft_ms=ns.ttft_ms,
        tokens_per_second=ns.tokens_per_second,
        output_tokens=ns.output_tokens,
        fault=ns.fault,
        batch_ms=ns.batch_ms,
        workers=max(1, ns.workers),
        reuse_port=ns.reuse_port,
    )


async def serve_forever(mock: MockUpstream, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly.

    SIGTERM is what ``trio.run_process`` (and most supervisors) send; turning it
    into a cancellation lets a parent with ``workers > 1`` reap its children
    instead of dying and leaving them orphaned on the port.
    """
    async with trio.open_nursery() as nursery:
        actual = await nursery.start(mock.serve, host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{actual}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mock", description=__doc__.split("\n")[0])
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        mock = MockUpstream(settings_from_args(ns))
    except ValueError as exc:
        parser.error(f"--fault: {exc}")
    from proxy.cli import port_is_free  # the check `weir mock-upstream` makes: one line, not a traceback

    # A worker child (--reuse-port) joins its parent's port: busy by design.
    if not ns.reuse_port and not port_is_free(ns.host, ns.port, parser.prog):
        return 1
    try:
        trio.run(serve_forever, mock, ns.host, ns.port)
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
