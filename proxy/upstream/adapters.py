"""upstream adapters: the client's dialect → the target's, and back.

Two dialects (``UpstreamRequest.api``: Anthropic Messages or OpenAI chat
completions) times two kinds of target make four legs. Same dialect on both
ends is a byte passthrough — the only rewrite is the ``model`` field when a
route or the upstream names a model of its own. Crossing dialects runs the
sans-IO translators of ``proxy.translate`` over the body, and over the
response: whole bodies once, streams per upstream read.

Why per read: docs/ARCHITECTURE.md gives one ASGI ``send`` per SSE event at
~8,000 events/s per core against ~45,000 at ten events a send. A translated
stream therefore yields one item per upstream read — every event that read
completed, translated and joined — never one per event.

Errors: inside Weir every error body is Anthropic-shaped, whatever the target
spoke; ``relay_error_response`` passes those through and the
``/v1/chat/completions`` ingress reshapes them for OpenAI clients at the very
end (``proxy.ingress.openai.openai_error_send``). So an OpenAI target's ``{"error": {...}}`` is
rewritten here to Anthropic's shape with the same status and message.

The adapter is the layer below routing (httpcore's layering, docs/ARCHITECTURE.md): the
router calls ``prepare`` and ``wrap`` around ``Target.open`` and never looks
inside a body.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ProxyError, error_body, type_for_status
from ..ingress.structure import BadStructure, loads_object
from ..sse import Event, SSEError, SSEParser
from ..translate import (
    AnthropicStreamToOpenAI,
    OpenAIStreamToAnthropic,
    TranslationError,
    anthropic_request_to_openai,
    anthropic_response_to_openai,
    openai_request_to_anthropic,
    openai_response_to_anthropic,
)
from ..context import Served
from ..ingress.anthropic import count_tokens_locally
from .base import ERROR_BODY_LIMIT, UpstreamError, UpstreamRequest, UpstreamResponse, read_up_to

__all__ = [
    "Leg",
    "BufferedResponse",
    "prepare",
    "wrap",
]

# A whole (non-streamed) reply is read before translation. Anthropic caps
# output at 128k tokens (~0.5 MB of text); 64 MiB leaves room for tool inputs
# and base64 images while bounding a misbehaving upstream.
_BODY_LIMIT = 64 * 1024 * 1024
# Anthropic's API version header is required; the oldest still-served
# version is what every SDK sends by default.
_ANTHROPIC_VERSION = (b"anthropic-version", b"2023-06-01")
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream; charset=utf-8")
# Response headers that describe bytes we rewrite.
_BODY_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding", b"transfer-encoding"})


@dataclass(slots=True)
class Leg:
    """One request as one target must receive it, and how to read the answer.

    ``mode``: ``pass`` (same dialect), ``a2o`` (Anthropic client, OpenAI
    target), ``o2a`` (OpenAI client, Anthropic target), ``models`` (an
    OpenAI model list read by an Anthropic client). ``dropped``: the
    client's fields the translation could not carry (reported to the client
    in ``x-weir-dropped`` and in the access log); ``tool_names`` and
    ``omit_thinking`` steer the reply's translation (``OpenAIRequest``).
    ``local``: the answer itself, when the target has no equivalent Weir can
    stand in for (``count_tokens`` on an OpenAI-compatible target); nothing
    is sent.
    """

    request: UpstreamRequest
    mode: Literal["pass", "a2o", "o2a", "models"]
    target_kind: str
    client_model: str
    include_usage: bool = False
    dropped: tuple[str, ...] = ()
    tool_names: frozenset[str] = frozenset()
    omit_thinking: bool = False
    local: BufferedResponse | None = None


class BufferedResponse:
    """A response whose body Weir already holds (translated, reshaped, or from the cache)."""

    __slots__ = ("status", "headers", "served", "_body")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, served: Served | None = None) -> None:
        self.status = status
        self.headers = headers
        self.served = served if served is not None else Served()
        self._body = body

    async def aiter(self) -> AsyncIterator[bytes]:
        yield self._body

    async def read(self, limit: int) -> bytes:
        return self._body[:limit]


class _TranslatedStream:
    """An upstream SSE stream seen through a translator, one item per upstream read."""

    __slots__ = ("status", "headers", "_raw", "_on_event", "_finish", "_error")

    def __init__(
        self,
        raw: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        on_event: Callable[[Event], list[bytes]],
        finish: Callable[[], list[bytes]],
        error: Callable[[str, str], list[bytes]],
    ) -> None:
        self.status = raw.status
        self.headers = headers
        self._raw = raw
        self._on_event = on_event
        self._finish = finish
        self._error = error

    async def aiter(self) -> AsyncIterator[bytes]:
        parser = SSEParser()
        try:
            async for chunk in self._raw.aiter():
                out: list[bytes] = []
                for ev in parser.feed(chunk):
                    out.extend(self._on_event(ev))
                # An empty item still tells relay_response the upstream is alive
                # (it moves the idle deadline) without sending anything.
                yield b"".join(out)
            out = []
            for ev in parser.close():
                out.extend(self._on_event(ev))
            out.extend(self._finish())
        except UpstreamError as exc:
            # The translator's own error event: it knows which dialect to speak
            # and leaves the stream in a state where nothing follows it.
            out = self._error("api_error", f"upstream stream broke: {exc.message}")
        except (SSEError, ValueError) as exc:
            out = self._error("api_error", f"upstream sent a malformed stream: {exc}")
        if out:
            yield b"".join(out)

    async def read(self, limit: int) -> bytes:
        return await read_up_to(self.aiter(), limit)


# ------------------------------------------------------------------ requests


def _loads(body: bytes) -> dict[str, Any]:
    try:
        return loads_object(body)
    except BadStructure as exc:
        raise ProxyError(400, str(exc), "invalid_request_error") from None


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _with_model(body: bytes, model: str) -> bytes:
    """The same request for another model.

    Only ``model`` changes, but the body is re-serialised: every other field
    keeps its value and order, not its original spacing. A same-dialect
    request without an override never comes here and keeps its bytes.
    """
    doc = _loads(body)
    doc["model"] = model
    return _dumps(doc)


def _swap_credentials(headers: list[tuple[bytes, bytes]], to_kind: str) -> list[tuple[bytes, bytes]]:
    """Passthrough mode across dialects: the client's key, in the target's header."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b"x-api-key" and to_kind == "openai":
            out.append((b"authorization", b"Bearer " + value))
        elif name == b"authorization" and to_kind == "anthropic" and value[:7].lower() == b"bearer ":
            out.append((b"x-api-key", value[7:].strip()))
        else:
            out.append((name, value))
    return out


def prepare(req: UpstreamRequest, *, kind: str, model: str) -> Leg:
    """The request ``req`` as a target of ``kind`` must see it.

    ``model`` is the name to send ("" keeps the client's). Raises
    ``ProxyError`` (400) when the body cannot be translated: every target
    would refuse it alike, so there is nothing to fail over to.
    """
    api = req.api
    path = req.path
    if kind == "anthropic" and api == "anthropic":
        if model and model != req.model and req.method == "POST":
            return Leg(_replace(req, body=_with_model(req.body, model)), "pass", kind, req.model)
        # The hot path: the request goes as it came, no copy.
        return Leg(req, "pass", kind, req.model)
    if kind == "openai" and api == "openai":
        body = _with_model(req.body, model) if model and model != req.model else req.body
        return Leg(_replace(req, path="/chat/completions", query=b"", body=body), "pass", kind, req.model)
    if kind == "openai":  # an Anthropic client
        headers = [(n, v) for n, v in _swap_credentials(req.headers, "openai") if n[:10] != b"anthropic-"]
        if path == "/v1/messages":
            doc = _loads(req.body)
            try:
                out = anthropic_request_to_openai(doc, model=model or req.model)
            except TranslationError as exc:
                raise ProxyError(400, f"cannot translate the request for an OpenAI-compatible upstream: {exc}", "invalid_request_error") from None
            return Leg(
                _replace(req, path="/chat/completions", query=b"", headers=headers, body=_dumps(out.body)),
                "a2o",
                kind,
                req.model,
                dropped=out.dropped,
                tool_names=out.tool_names,
                omit_thinking=out.omit_thinking,
            )
        if path == "/v1/messages/count_tokens":
            # OpenAI-compatible servers have no token counter: estimate locally.
            counted = b'{"input_tokens":%d}' % count_tokens_locally(req.body)
            local = BufferedResponse(200, [_JSON, (b"content-length", b"%d" % len(counted)), (b"x-weir-token-count", b"estimate")], counted)
            return Leg(req, "pass", kind, req.model, local=local)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            return Leg(_replace(req, path=path[3:], query=b"", headers=headers), "models", kind, req.model)
        raise ProxyError(404, f"{req.method} {path} has no equivalent on an OpenAI-compatible upstream", "not_found_error")
    # An OpenAI client, an Anthropic target.
    doc = _loads(req.body)
    try:
        out = openai_request_to_anthropic(doc)
    except TranslationError as exc:
        raise ProxyError(400, f"cannot translate the request for an Anthropic upstream: {exc}", "invalid_request_error") from None
    if model:
        out["model"] = model
    headers = _swap_credentials(req.headers, "anthropic")
    if not any(n == b"anthropic-version" for n, _ in headers):
        headers.append(_ANTHROPIC_VERSION)
    opts = doc.get("stream_options")
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return Leg(
        _replace(req, path="/v1/messages", query=b"", headers=headers, body=_dumps(out)),
        "o2a",
        kind,
        req.model,
        include_usage,
    )


def _replace(req: UpstreamRequest, **changes: Any) -> UpstreamRequest:
    return dataclasses.replace(req, **changes)


# ----------------------------------------------------------------- responses


def _plain_headers(raw: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in raw.headers if n not in _BODY_HEADERS]


def _buffered(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> BufferedResponse:
    return BufferedResponse(status, headers + [_JSON, (b"content-length", str(len(body)).encode())], body)


def _anthropic_error_from_openai(status: int, body: bytes) -> bytes:
    """OpenAI's ``{"error": {"message", "type", "code"}}`` → Anthropic's shape, same message."""
    message = ""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
        elif isinstance(doc.get("message"), str):  # vLLM/FastAPI-style {"message": ...} or {"detail": ...}
            message = doc["message"]
        elif isinstance(doc.get("detail"), str):
            message = doc["detail"]
    if not message:
        snippet = body[:200].decode("utf-8", "replace").strip()
        message = f"upstream returned HTTP {status}: {snippet}" if snippet else f"upstream returned HTTP {status}"
    return error_body(type_for_status(status), message)


def _json_of(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise UpstreamError("protocol", f"upstream sent a body that is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UpstreamError("protocol", "upstream sent a JSON body that is not an object")
    return doc


def _models_to_anthropic(doc: dict[str, Any]) -> dict[str, Any]:
    def one(m: dict[str, Any]) -> dict[str, Any]:
        created = m.get("created")
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)) if isinstance(created, (int, float)) else "1970-01-01T00:00:00Z"
        return {"type": "model", "id": m.get("id", ""), "display_name": m.get("id", ""), "created_at": at}

    if "data" not in doc:  # a single model
        return one(doc)
    data = [one(m) for m in doc.get("data") or () if isinstance(m, dict)]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


async def wrap(leg: Leg, raw: UpstreamResponse) -> UpstreamResponse:
    """The target's response, in the client's dialect.

    Reads whole bodies (errors, non-streamed translations) before returning,
    so the router has the final status and headers before it commits; a
    stream is translated lazily, read by read.
    """
    if raw.status >= 400:
        if leg.target_kind == "openai":
            body = await raw.read(ERROR_BODY_LIMIT)
            return _buffered(raw.status, _plain_headers(raw), _anthropic_error_from_openai(raw.status, body))
        return raw
    if leg.mode == "pass":
        return raw
    is_sse = any(n == b"content-type" and v[:17] == b"text/event-stream" for n, v in raw.headers)
    if leg.mode == "models":
        doc = _json_of(await raw.read(_BODY_LIMIT))
        return _buffered(raw.status, _plain_headers(raw), _dumps(_models_to_anthropic(doc)))
    if leg.mode == "a2o":
        if not is_sse:
            doc = _json_of(await raw.read(_BODY_LIMIT))
            try:
                out = openai_response_to_anthropic(doc, model=leg.client_model, tool_names=leg.tool_names, omit_thinking=leg.omit_thinking)
            except TranslationError as exc:
                raise UpstreamError("protocol", f"cannot translate the upstream's reply: {exc}") from None
            return _buffered(raw.status, _plain_headers(raw), _dumps(out))
        a = OpenAIStreamToAnthropic(model=leg.client_model, tool_names=leg.tool_names, omit_thinking=leg.omit_thinking)

        def on_openai(ev: Event) -> list[bytes]:
            data = ev.data.strip()
            if not data:
                return []
            if data == b"[DONE]":
                return a.finish()
            chunk = json.loads(data)
            if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                err = chunk["error"]
                return a.error("api_error", str(err.get("message") or "upstream error"))
            return a.feed(chunk)

        return _TranslatedStream(raw, _plain_headers(raw) + [_SSE], on_openai, a.finish, a.error)
    # o2a
    created = int(time.time())
    if not is_sse:
        doc = _json_of(await raw.read(_BODY_LIMIT))
        out = anthropic_response_to_openai(doc, model=leg.client_model or None, created=created)
        return _buffered(raw.status, _plain_headers(raw), _dumps(out))
    o = AnthropicStreamToOpenAI(model=leg.client_model or None, include_usage=leg.include_usage, created=created)

    def on_anthropic(ev: Event) -> list[bytes]:
        if not ev.data.strip():
            return []
        return o.feed(ev.name, json.loads(ev.data))

    return _TranslatedStream(raw, _plain_headers(raw) + [_SSE], on_anthropic, o.finish, o.error)
