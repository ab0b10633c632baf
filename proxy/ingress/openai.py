"""The OpenAI ingress: ``/v1/chat/completions``, for OpenAI clients.

Weir reads ``model`` and ``stream`` and types every field the translator
reads (``ChatEnvelope``); the body itself stays the client's bytes. Every
stage below speaks Anthropic's error shape, so this module is also the one
edge where errors are reshaped for an OpenAI client (``openai_error_send``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ..errors import ProxyError, type_for_status
from .anthropic import decode_envelope

__all__ = ["ChatEnvelope", "decode_chat", "openai_error_body", "openai_error_send"]

Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


# Every field the OpenAI → Anthropic translator reads, with OpenAI's types
# ("Create chat completion" in OpenAI's API reference): a wrong type is a
# 400 naming its JSON path here, not a TypeError in the translator. Fields
# nobody reads stay unknown to msgspec and go upstream as sent.


class _ImageURL(msgspec.Struct):
    url: str


class _Part(msgspec.Struct):
    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: str | _ImageURL | None = None


class _CallFunction(msgspec.Struct):
    name: str
    # OpenAI sends a JSON string; some clients send the object itself.
    arguments: str | dict[str, Any] | None = None


class _ToolCall(msgspec.Struct):
    # Optional: OpenAI has tool kinds besides functions ("custom"); the
    # translator refuses those itself, an OpenAI target takes them.
    function: _CallFunction | None = None
    id: str | None = None
    type: str = "function"


class _ChatMessage(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class _Function(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct):
    function: _Function | None = None
    type: str = "function"


class _NamedFunction(msgspec.Struct):
    name: str


class _ToolChoice(msgspec.Struct):
    function: _NamedFunction | None = None
    type: str = "function"


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ChatEnvelope(msgspec.Struct):
    """The part of a chat.completions body the ingress and the translator read; the rest stays bytes."""

    model: str
    messages: list[_ChatMessage]
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    stream_options: _StreamOptions | None = None
    user: str | None = None


_chat_decoder = msgspec.json.Decoder(ChatEnvelope)


def decode_chat(body: bytes) -> ChatEnvelope:
    env: ChatEnvelope = decode_envelope(_chat_decoder, body)
    if not env.model:
        raise ProxyError(400, "model: must not be empty", "invalid_request_error")
    if not env.messages:
        raise ProxyError(400, "messages: at least one message is required", "invalid_request_error")
    return env


def openai_error_body(anthropic_body: bytes, status: int) -> bytes:
    """Anthropic's error shape → OpenAI's ``{"error": {"message", "type", "code"}}``.

    ``type`` keeps Anthropic's word (``rate_limit_error``,
    ``invalid_request_error`` …) — the openai SDK picks its exception class
    from the status, and the word tells an operator which layer answered.
    ``code`` is the status as a string, since OpenAI-compatible servers
    disagree on its vocabulary and a number is unambiguous.
    """
    try:
        doc = json.loads(anthropic_body)
        err = doc["error"]
        type_, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        type_ = type_for_status(status)
        message = anthropic_body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": str(status)}}, ensure_ascii=False, separators=(",", ":")).encode()


_ERROR_EVENT = b"event: error\ndata: "


def openai_error_send(send: Send) -> Send:
    """Wrap an ASGI ``send`` so every error an OpenAI client gets is OpenAI-shaped.

    The pipeline below speaks Anthropic's error shape (``send_error``,
    ``relay_error_response``, ``end_stream_with_error``); reshaping at this
    one edge keeps every stage dialect-blind. An error response is one start
    message and one body message, so the start is held until its body comes.
    """
    held: dict[str, Any] | None = None

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal held
        kind = message["type"]
        if kind == "http.response.start" and message["status"] >= 400:
            held = message
            return
        if kind == "http.response.body" and held is not None:
            start, held = held, None
            body = openai_error_body(message.get("body", b""), start["status"])
            headers = [(n, v) for n, v in start["headers"] if n not in (b"content-length", b"content-type")]
            headers += [_JSON, (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if kind == "http.response.body":
            chunk = message.get("body", b"")
            at = chunk.find(_ERROR_EVENT)
            if at >= 0:
                # relay.end_stream_with_error: Anthropic's error event, cut in an OpenAI stream.
                end = chunk.find(b"\n\n", at)
                payload = chunk[at + len(_ERROR_EVENT) : end if end >= 0 else len(chunk)]
                reshaped = b"data: " + openai_error_body(payload, 500) + b"\n\ndata: [DONE]\n\n"
                message = {**message, "body": chunk[:at] + reshaped}
        await send(message)

    return wrapped
