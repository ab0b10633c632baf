"""The stream grammars clients rely on, as checkers (test code: nothing in Weir imports it).

Used by the translator's property tests and by end-to-end tests anywhere in
Weir: hand either function the bytes a client received and it raises
``MalformedStream`` at the first event a strict client would trip on, or
returns the message the stream assembles to, so a test can compare content
as well as shape.

Anthropic (Messages streaming)::

    ping* message_start (block)* message_delta message_stop
    block = content_block_start content_block_delta* content_block_stop

with ``ping`` allowed anywhere before the end and an ``error`` event ending
the stream at any point. Block indices count from 0 without gaps; each delta
fits its block's type; a tool_use block's ``partial_json`` pieces join to a
JSON object (or, only when ``stop_reason`` is ``max_tokens``, to a cut-off
prefix of one).

OpenAI (chat completions streaming)::

    data: chunk+ [data: usage-chunk] data: [DONE]

the first chunk carries ``role: assistant``; each tool call's first delta
carries its ``id``, ``type`` and ``function.name``, and indices start at 0
and grow by one; ``finish_reason`` comes once and nothing follows it but the
usage chunk (``choices: []``) and ``[DONE]``; an ``{"error": …}`` line must be
followed by ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from proxy.sse import SSEParser

__all__ = ["MalformedStream", "validate_anthropic_stream", "validate_openai_stream"]


class MalformedStream(AssertionError):
    """The stream breaks its API's grammar (an AssertionError so pytest shows it plainly)."""


_STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal", "model_context_window_exceeded"}
_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
_DELTA_FOR_BLOCK = {
    "text": {"text_delta", "citations_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "tool_use": {"input_json_delta"},
    "server_tool_use": {"input_json_delta"},
}


def _events(stream: bytes | Iterable[bytes]):
    parser = SSEParser()
    data = stream if isinstance(stream, (bytes, bytearray)) else b"".join(stream)
    return parser.feed(bytes(data)) + parser.close()


def _fail(i: int, message: str) -> None:
    raise MalformedStream(f"event {i}: {message}")


def validate_anthropic_stream(
    stream: bytes | Iterable[bytes], *, complete: bool = True, allow_unknown: bool = False
) -> dict[str, Any]:
    """Check an Anthropic SSE stream; return the assembled message.

    The result has the Messages response's fields plus ``error`` (the error
    event's ``error`` object, or ``None``). ``complete=False`` accepts a
    stream cut off mid-way (a recording of a prefix); ``allow_unknown``
    accepts event types this checker does not know, which Anthropic says
    clients must tolerate.
    """
    state = "START"
    message: dict[str, Any] = {"id": None, "model": None, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {}, "error": None}
    json_buf = ""
    unparsed_tool_input = False
    for i, ev in enumerate(_events(stream)):
        name = ev.event
        try:
            data = json.loads(ev.data)
        except ValueError:
            _fail(i, f"data is not JSON: {ev.data[:80]!r}")
        if not isinstance(data, dict) or data.get("type") != name:
            _fail(i, f"event name {name!r} and data type {data.get('type') if isinstance(data, dict) else data!r} differ")
        if state in ("STOPPED", "ERRORED"):
            _fail(i, f"{name} after the stream ended ({state})")
        if name == "ping":
            continue
        if name == "error":
            error = data.get("error")
            if not (isinstance(error, dict) and isinstance(error.get("type"), str) and isinstance(error.get("message"), str)):
                _fail(i, "error event without error.type and error.message")
            message["error"] = error
            state = "ERRORED"
            continue
        if name == "message_start":
            if state != "START":
                _fail(i, "message_start twice")
            m = data.get("message") or {}
            for key in ("id", "model"):
                if not isinstance(m.get(key), str):
                    _fail(i, f"message_start without message.{key}")
            if m.get("role") != "assistant" or m.get("content") != [] or not isinstance((m.get("usage") or {}).get("input_tokens"), int):
                _fail(i, "message_start needs role assistant, empty content and usage.input_tokens")
            message.update({**m, "content": [], "usage": dict(m["usage"])})
            state = "MESSAGE"
            continue
        if state == "START":
            _fail(i, f"{name} before message_start")
        if name == "content_block_start":
            if state != "MESSAGE":
                _fail(i, "content_block_start while a block is open" if state == "BLOCK" else f"content_block_start after {state}")
            block = data.get("content_block") or {}
            if data.get("index") != len(message["content"]):
                _fail(i, f"block index {data.get('index')} where {len(message['content'])} was due")
            kind = block.get("type")
            if kind == "text" and not isinstance(block.get("text"), str):
                _fail(i, "text block without text")
            elif kind == "thinking" and not (isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str)):
                _fail(i, "thinking block without thinking and signature")
            elif kind in ("tool_use", "server_tool_use"):
                if not (block.get("id") and block.get("name") and block.get("input") == {}):
                    _fail(i, "tool_use block needs an id, a name and input {}")
            message["content"].append(dict(block))
            json_buf = ""
            state = "BLOCK"
        elif name == "content_block_delta":
            if state != "BLOCK" or data.get("index") != len(message["content"]) - 1:
                _fail(i, f"delta for block {data.get('index')} which is not open")
            block = message["content"][-1]
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype not in _DELTA_FOR_BLOCK.get(block["type"], ()):
                _fail(i, f"{dtype} in a {block['type']} block")
            if dtype == "text_delta":
                block["text"] += delta["text"]
            elif dtype == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif dtype == "signature_delta":
                block["signature"] = delta["signature"]
            elif dtype == "input_json_delta":
                if not isinstance(delta.get("partial_json"), str):
                    _fail(i, "input_json_delta without partial_json")
                json_buf += delta["partial_json"]
        elif name == "content_block_stop":
            if state != "BLOCK" or data.get("index") != len(message["content"]) - 1:
                _fail(i, f"stop for block {data.get('index')} which is not open")
            block = message["content"][-1]
            if block["type"] in ("tool_use", "server_tool_use"):
                try:
                    block["input"] = json.loads(json_buf) if json_buf else {}
                except ValueError:
                    # Legal only if the turn was cut at max_tokens: checked at message_delta.
                    block["input"] = {"_partial_json": json_buf}
                    unparsed_tool_input = True
                if not isinstance(block["input"], dict):
                    _fail(i, "tool input is not a JSON object")
            state = "MESSAGE"
        elif name == "message_delta":
            if state != "MESSAGE":
                _fail(i, f"message_delta while {state}")
            delta, usage = data.get("delta") or {}, data.get("usage") or {}
            if delta.get("stop_reason") not in _STOP_REASONS:
                _fail(i, f"stop_reason {delta.get('stop_reason')!r}")
            if not isinstance(usage.get("output_tokens"), int) or usage["output_tokens"] < 0:
                _fail(i, "message_delta without usage.output_tokens")
            if unparsed_tool_input and delta["stop_reason"] != "max_tokens":
                _fail(i, f"a tool input is not JSON, yet stop_reason is {delta['stop_reason']}")
            message["stop_reason"] = delta["stop_reason"]
            message["stop_sequence"] = delta.get("stop_sequence")
            message["usage"].update({k: v for k, v in usage.items() if v is not None})
            state = "DELTA"
        elif name == "message_stop":
            if state != "DELTA":
                _fail(i, f"message_stop while {state}, not after message_delta")
            state = "STOPPED"
        elif not allow_unknown:
            _fail(i, f"unknown event {name!r}")
    if complete and state not in ("STOPPED", "ERRORED"):
        raise MalformedStream(f"stream ended in state {state}, without message_stop or error")
    return message


def validate_openai_stream(stream: bytes | Iterable[bytes], *, complete: bool = True) -> dict[str, Any]:
    """Check an OpenAI chat-completions stream; return what it assembles to.

    Result keys: ``id``, ``content``, ``reasoning_content``, ``tool_calls``
    (``id``, ``name``, ``arguments`` string), ``finish_reason``, ``usage``,
    ``error``.
    """
    out: dict[str, Any] = {
        "id": None,
        "content": "",
        "reasoning_content": "",
        "tool_calls": [],
        "finish_reason": None,
        "usage": None,
        "error": None,
    }
    done = False
    seen_role = False
    for i, ev in enumerate(_events(stream)):
        if done:
            _fail(i, "data after [DONE]")
        if ev.event not in (None, "message"):
            _fail(i, f"OpenAI streams carry no event names, got {ev.event!r}")
        if ev.data == b"[DONE]":
            done = True
            continue
        if out["error"] is not None:
            _fail(i, "a chunk after an error line; only [DONE] may follow")
        try:
            chunk = json.loads(ev.data)
        except ValueError:
            _fail(i, f"data is not JSON: {ev.data[:80]!r}")
        if "error" in chunk:
            if not isinstance(chunk["error"], dict) or not isinstance(chunk["error"].get("message"), str):
                _fail(i, "error line without error.message")
            out["error"] = chunk["error"]
            continue
        if chunk.get("object") != "chat.completion.chunk" or not isinstance(chunk.get("id"), str):
            _fail(i, "not a chat.completion.chunk with an id")
        if out["id"] is None:
            out["id"] = chunk["id"]
        elif chunk["id"] != out["id"]:
            _fail(i, "chunk id changed mid-stream")
        if out["usage"] is not None:
            _fail(i, "a chunk after the usage chunk")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            _fail(i, "choices is not a list")
        if not choices:
            usage = chunk.get("usage") or {}
            if not all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens")):
                _fail(i, "a chunk with no choices must carry usage")
            if out["finish_reason"] is None:
                _fail(i, "usage chunk before finish_reason")
            out["usage"] = usage
            continue
        for choice in choices:
            if choice.get("index") != 0:
                _fail(i, "choice index other than 0")
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                _fail(i, "choice without a delta")
            if out["finish_reason"] is not None:
                _fail(i, "a choice after finish_reason")
            if not seen_role:
                if delta.get("role") != "assistant":
                    _fail(i, "first delta without role assistant")
                seen_role = True
            if delta.get("content") is not None:
                out["content"] += delta["content"]
            if delta.get("reasoning_content") is not None:
                out["reasoning_content"] += delta["reasoning_content"]
            for call in delta.get("tool_calls") or ():
                index = call.get("index")
                function = call.get("function") or {}
                if index == len(out["tool_calls"]):
                    if not (call.get("id") and call.get("type") == "function" and function.get("name")):
                        _fail(i, f"tool call {index} starts without id, type and name")
                    out["tool_calls"].append({"id": call["id"], "name": function["name"], "arguments": ""})
                elif not (isinstance(index, int) and 0 <= index < len(out["tool_calls"])):
                    _fail(i, f"tool call index {index} out of order")
                out["tool_calls"][index]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason") is not None:
                if choice["finish_reason"] not in _FINISH_REASONS:
                    _fail(i, f"finish_reason {choice['finish_reason']!r}")
                out["finish_reason"] = choice["finish_reason"]
    if complete:
        if not done:
            raise MalformedStream("stream ended without [DONE]")
        if out["finish_reason"] is None and out["error"] is None:
            raise MalformedStream("stream ended without finish_reason or error")
    return out
