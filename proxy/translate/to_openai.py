"""Anthropic client → OpenAI-compatible upstream, sans-IO.

Claude Code and the anthropic SDK speak the Messages API; NVIDIA NIM, vLLM,
OpenRouter and Ollama speak chat completions. This module turns the request
one way and the response (whole or streamed) the other. It owns no socket and
no clock: the upstream adapter feeds it decoded JSON and writes out what it
returns.

What does not cross, and why (everything else maps one to one):

* Fields with no chat-completions meaning are dropped *and reported*: the
  translation returns their dotted names (``OpenAIRequest.dropped``), which
  the client sees in ``x-weir-dropped`` and the access log records. That
  covers ``context_management``, ``top_k`` (not in OpenAI's schema;
  api.openai.com rejects it), ``service_tier``, ``container``,
  ``mcp_servers``, any top-level field this module does not know,
  ``metadata`` keys other than ``user_id``, ``output_config`` keys other than
  ``effort`` and ``format``, tool fields other than ``strict``, and server
  tools (``web_search_…``, ``code_execution_…``: a ``type`` other than
  ``custom`` and no ``input_schema``) — only Anthropic can run those.
* Left behind without a report, because they cannot cross by nature and
  every Claude Code turn carries them: ``cache_control`` markers (the
  OpenAI-compatible servers we target cache prompt prefixes on their own),
  assistant ``thinking`` / ``redacted_thinking`` blocks in the history
  (chat completions has no input field for prior reasoning, and the
  Anthropic signature means nothing to another model), and ``is_error`` on
  a ``tool_result`` (OpenAI's tool message has no such flag; Claude Code
  already words the failure in the content).
* ``role: "system"`` items inside ``messages`` (Claude Code 2.x sends its
  environment notes so) become system messages at the same place;
  ``clear_at`` and their per-turn ``output_config.effort`` are honoured.
* ``thinking`` and ``output_config.effort`` become ``reasoning_effort``: a
  ``budget_tokens`` by its size, otherwise the newest effort word, with
  adaptive thinking's default (``high``) when none is given.
  ``display: "omitted"`` is honoured on the way back: no thinking blocks.
* ``output_config.format`` (and the beta's ``output_format``) becomes
  ``response_format: json_schema``.
* ``max_tokens`` is sent as ``max_tokens`` only, not ``max_completion_tokens``:
  vLLM, NIM, Ollama and OpenRouter all honour ``max_tokens``, while several of
  them reject or ignore the newer name.

On the way back, ``<think>`` and ``<tool_call>`` tags a model wrote into its
text become thinking and ``tool_use`` blocks (``inline_tags``).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from ..errors import error_event
from ..sse import encode_event
from ..usage import CHARS_PER_TOKEN
from ._common import TranslationError, budget_to_effort, encode_json, parse_arguments
from .inline_tags import InlineTagParser, Segment

__all__ = [
    "OpenAIRequest",
    "anthropic_request_to_openai",
    "openai_response_to_anthropic",
    "OpenAIStreamToAnthropic",
    "map_finish_reason",
]

_FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    # Anthropic's own name for "the model declined": clients show it as such
    # instead of as a normal end of turn with a truncated answer.
    "content_filter": "refusal",
}


def map_finish_reason(finish_reason: str | None, *, has_tool_use: bool = False, matched_stop: Any = None) -> str:
    """OpenAI ``finish_reason`` → Anthropic ``stop_reason``.

    Ollama and some NIM models report ``stop`` even when the turn ends in tool
    calls; agent loops (Claude Code's included) only run tools on
    ``tool_use``, so tool calls win over ``stop``. ``matched_stop`` is vLLM's
    ``stop_reason`` extension: the stop string that ended generation, the only
    way to tell a stop sequence from a natural end.
    """
    if has_tool_use and finish_reason in (None, "stop", "tool_calls", "function_call"):
        return "tool_use"
    if finish_reason == "stop" and isinstance(matched_stop, str):
        return "stop_sequence"
    if finish_reason is None:
        return "end_turn"
    return _FINISH_TO_STOP.get(finish_reason, "end_turn")


# ---------------------------------------------------------------- request


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise TranslationError(message)


def _text_of(blocks: Any, where: str) -> str:
    """A string, or text blocks joined — the two shapes ``system`` and tool results take."""
    if isinstance(blocks, str):
        return blocks
    _require(isinstance(blocks, list), f"{where} must be a string or a list of content blocks")
    parts = []
    for block in blocks:
        _require(isinstance(block, dict) and block.get("type") == "text", f"{where} may only hold text blocks")
        parts.append(block.get("text", ""))
    # Blank line between blocks: Claude Code's system blocks are separate
    # paragraphs (identity line, then the long prompt).
    return "\n\n".join(parts)


def _image_part(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    _require(isinstance(source, dict), "image block without a source")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        raise TranslationError(f"image source type {source.get('type')!r} has no OpenAI equivalent")
    return {"type": "image_url", "image_url": {"url": url}}


def _document_part(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "text":
        return {"type": "text", "text": source.get("data", "")}
    if source.get("type") == "base64":
        media = source.get("media_type", "application/pdf")
        return {
            "type": "file",
            "file": {"file_data": f"data:{media};base64,{source.get('data', '')}", "filename": block.get("title") or "document"},
        }
    raise TranslationError(f"document source type {source.get('type')!r} has no OpenAI equivalent")


def _user_parts_content(parts: list[dict[str, Any]]) -> Any:
    # One text part goes as a plain string: the most widely accepted shape
    # (some chat templates, older Ollama, choke on part lists).
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _user_message(content: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    parts: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []
    for block in content:
        _require(isinstance(block, dict), "content blocks must be objects")
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind == "document":
            parts.append(_document_part(block))
        elif kind == "tool_result":
            _require(isinstance(block.get("tool_use_id"), str), "tool_result without a tool_use_id")
            inner = block.get("content", "")
            texts: list[str] = []
            if isinstance(inner, str):
                texts.append(inner)
            else:
                _require(isinstance(inner, list), "tool_result content must be a string or a list")
                for item in inner:
                    _require(isinstance(item, dict), "content blocks must be objects")
                    if item.get("type") == "text":
                        texts.append(item.get("text", ""))
                    elif item.get("type") == "image":
                        # A tool message carries text only; the image rides in
                        # the user message that follows the tool messages.
                        tool_images.append(_image_part(item))
                    else:
                        raise TranslationError(f"tool_result block type {item.get('type')!r} has no OpenAI equivalent")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": "\n".join(texts)})
        else:
            raise TranslationError(f"user content block type {kind!r} has no OpenAI equivalent")
    parts = tool_images + parts
    if parts:
        out.append({"role": "user", "content": _user_parts_content(parts)})


def _assistant_message(content: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(content, str):
        out.append({"role": "assistant", "content": content})
        return
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        _require(isinstance(block, dict), "content blocks must be objects")
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            _require(isinstance(block.get("name"), str), "tool_use without a name")
            calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block["name"], "arguments": encode_json(block.get("input", {})).decode()},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # see the module docstring
        else:
            raise TranslationError(f"assistant content block type {kind!r} has no OpenAI equivalent")
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        return  # only thinking: nothing an OpenAI server can take
    out.append(message)


class _Dropped:
    """What the client asked for that the OpenAI request cannot carry, named once each, in order."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: dict[str, None] = {}

    def add(self, name: str) -> None:
        self.names[name] = None


# Tool fields that cross; ``cache_control`` is left behind knowingly (see the
# module docstring), anything else a tool carries is reported as dropped.
_TOOL_FIELDS = frozenset({"name", "description", "input_schema", "type", "cache_control", "strict"})


def _tool(tool: Any, dropped: _Dropped) -> dict[str, Any] | None:
    _require(isinstance(tool, dict) and isinstance(tool.get("name"), str), "each tool needs a name")
    if "input_schema" not in tool and tool.get("type") not in (None, "custom"):
        dropped.add(f"tools.{tool['type']}")  # a server tool: see the module docstring
        return None
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    for key in tool.keys() - _TOOL_FIELDS:
        dropped.add(f"tools.{key}")
    return {"type": "function", "function": function}


def _system_message(message: dict[str, Any], later_user: bool, out: list[dict[str, Any]], dropped: _Dropped) -> str | None:
    """A ``role: "system"`` item of ``messages``; returns its per-turn effort, if any.

    ``clear_at: "next_user_message"`` is honoured as Anthropic defines it:
    the text is shown only until a later user message exists.
    """
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for block in content:
            _require(isinstance(block, dict), "content blocks must be objects")
            if block.get("type") == "text":
                texts.append(block.get("text", ""))
            else:
                # Tool additions and removals mid-conversation: chat
                # completions has one tool list per request.
                dropped.add(f"messages.system.{block.get('type')}")
        text = "\n\n".join(texts)
    else:
        _require(isinstance(content, str) or content is None, "message content must be a string or a list of blocks")
        text = content or ""
    for key in message.keys() - {"role", "content", "clear_at", "output_config"}:
        dropped.add(f"messages.system.{key}")
    if text and not (message.get("clear_at") == "next_user_message" and later_user):
        out.append({"role": "system", "content": text})
    config = message.get("output_config")
    if not isinstance(config, dict):
        return None
    for key in config.keys() - {"effort"}:
        dropped.add(f"messages.system.output_config.{key}")
    effort = config.get("effort")
    return effort if isinstance(effort, str) else None


# Anthropic's effort words are OpenAI's reasoning_effort words, plus two above
# "high" that OpenAI-compatible servers do not take.
_EFFORT_TO_OPENAI = {"xhigh": "high", "max": "high"}
# Anthropic's documented default effort when adaptive thinking names none.
_ADAPTIVE_DEFAULT_EFFORT = "high"
# Top-level request fields this translator maps (or, for ``cache_control``,
# leaves to the server's own prefix caching); every other field is reported.
_MAPPED = frozenset(
    {
        "model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences", "stream",
        "tools", "tool_choice", "thinking", "metadata", "output_config", "output_format", "cache_control",
    }
)  # fmt: skip


def _reasoning_effort(req: dict[str, Any], turn_effort: str | None, dropped: _Dropped) -> str | None:
    """``thinking`` and ``output_config.effort`` → OpenAI's ``reasoning_effort`` (None: send none).

    A budget keeps its token mapping (``budget_to_effort``); otherwise the
    newest effort wins: a system message's per-turn one, then the request's.
    Adaptive thinking without any effort gets Anthropic's default.
    """
    thinking = req.get("thinking")
    config = req.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if isinstance(thinking, dict):
        for key in thinking.keys() - {"type", "budget_tokens", "display"}:
            dropped.add(f"thinking.{key}")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")  # type: ignore[union-attr]
        return budget_to_effort(budget if isinstance(budget, int) else 0)
    if kind == "disabled":
        if effort or turn_effort:
            dropped.add("output_config.effort")
        return None
    if thinking is not None and kind not in ("adaptive", None):
        dropped.add("thinking")
    chosen = turn_effort or effort
    if isinstance(chosen, str):
        return _EFFORT_TO_OPENAI.get(chosen, chosen)
    return _ADAPTIVE_DEFAULT_EFFORT if kind == "adaptive" else None


def _response_format(req: dict[str, Any], dropped: _Dropped) -> dict[str, Any] | None:
    """Structured output: ``output_config.format`` (or the beta's top-level ``output_format``) → ``response_format``.

    ``strict`` because Anthropic guarantees the schema; servers without
    strict mode (vLLM, Ollama) constrain decoding to the schema anyway.
    """
    config = req.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    fmt = fmt or req.get("output_format")
    if fmt is None:
        return None
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
        dropped.add("output_config.format")
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


class OpenAIRequest(NamedTuple):
    """A translated request, and what its reply's translation needs to know.

    ``dropped``: the client's fields that had no OpenAI meaning, as dotted
    names (``context_management``, ``tools.web_search_20250305``); the
    adapter reports them in ``x-weir-dropped`` and the access log.
    ``tool_names``: the tools the request declared, for ``<tool_call>`` text.
    ``omit_thinking``: the client asked for ``display: "omitted"``.
    """

    body: dict[str, Any]
    dropped: tuple[str, ...]
    tool_names: frozenset[str]
    omit_thinking: bool


def anthropic_request_to_openai(req: dict[str, Any], *, model: str | None = None) -> OpenAIRequest:
    """A Messages request → a chat.completions request for ``model`` (default: the request's)."""
    _require(isinstance(req, dict), "the request body must be a JSON object")
    messages_in = req.get("messages")
    _require(isinstance(messages_in, list), "messages must be a list")
    dropped = _Dropped()
    messages: list[dict[str, Any]] = []
    if req.get("system"):
        messages.append({"role": "system", "content": _text_of(req["system"], "system")})
    last_user = max((i for i, m in enumerate(messages_in) if isinstance(m, dict) and m.get("role") == "user"), default=-1)
    turn_effort: str | None = None
    for i, message in enumerate(messages_in):
        _require(isinstance(message, dict), "each message must be an object")
        role, content = message.get("role"), message.get("content")
        if role == "system":
            # Claude Code 2.x puts its environment notes here, after the first
            # user turn: a system message at the same place.
            turn_effort = _system_message(message, i < last_user, messages, dropped) or turn_effort
            continue
        _require(isinstance(content, (str, list)), "message content must be a string or a list of blocks")
        if role == "user":
            _user_message(content, messages)
        elif role == "assistant":
            _assistant_message(content, messages)
        else:
            raise TranslationError(f"message role {role!r} is not user, assistant or system")

    out: dict[str, Any] = {"model": model or req.get("model"), "messages": messages}
    if "max_tokens" in req:
        out["max_tokens"] = req["max_tokens"]
    for key in ("temperature", "top_p"):
        if req.get(key) is not None:
            out[key] = req[key]
    if req.get("stop_sequences"):
        out["stop"] = list(req["stop_sequences"])
    if req.get("stream"):
        out["stream"] = True
        # Without it OpenAI servers send no usage at all on a stream, and the
        # Anthropic message_delta would have to guess output_tokens.
        out["stream_options"] = {"include_usage": True}

    tools = [t for t in (_tool(t, dropped) for t in req.get("tools") or []) if t is not None]
    if tools:
        out["tools"] = tools
        choice = req.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "auto":
                out["tool_choice"] = "auto"
            elif kind == "any":
                out["tool_choice"] = "required"
            elif kind == "none":
                out["tool_choice"] = "none"
            elif kind == "tool":
                out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
            else:
                raise TranslationError(f"tool_choice type {kind!r} is unknown")
            if choice.get("disable_parallel_tool_use") and kind != "none":
                out["parallel_tool_calls"] = False

    effort = _reasoning_effort(req, turn_effort, dropped)
    if effort is not None:
        out["reasoning_effort"] = effort
    response_format = _response_format(req, dropped)
    if response_format is not None:
        out["response_format"] = response_format
    config = req.get("output_config")
    if isinstance(config, dict):
        for key in config.keys() - {"effort", "format"}:
            dropped.add(f"output_config.{key}")

    metadata = req.get("metadata")
    if isinstance(metadata, dict):
        if metadata.get("user_id"):
            out["user"] = metadata["user_id"]
        for key in metadata.keys() - {"user_id"}:
            dropped.add(f"metadata.{key}")
    for key in req:
        if key not in _MAPPED:
            dropped.add(key)
    thinking = req.get("thinking")
    return OpenAIRequest(
        body=out,
        dropped=tuple(dropped.names),
        tool_names=frozenset(t["function"]["name"] for t in tools),
        omit_thinking=isinstance(thinking, dict) and thinking.get("display") == "omitted",
    )


# ---------------------------------------------------------------- response


def _usage_to_anthropic(usage: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI counts cached prompt tokens inside ``prompt_tokens``; Anthropic counts them apart."""
    usage = usage or {}
    prompt = usage.get("prompt_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _reasoning_of(obj: dict[str, Any]) -> str | None:
    # vLLM and NIM call it reasoning_content; OpenRouter and Ollama, reasoning.
    return obj.get("reasoning_content") or obj.get("reasoning") or None


def openai_response_to_anthropic(
    resp: dict[str, Any], *, model: str, tool_names: frozenset[str] = frozenset(), omit_thinking: bool = False
) -> dict[str, Any]:
    """A chat.completion → a Messages response naming ``model`` (the one the client asked for).

    Only ``choices[0]`` is read: Anthropic has no ``n``, and we never ask for
    more. ``tool_names`` and ``omit_thinking`` come from the request
    (``OpenAIRequest``): which ``<tool_call>`` texts are real tool calls, and
    whether the client wants its thinking shown.
    """
    choices = resp.get("choices") or []
    _require(bool(choices) and isinstance(choices[0], dict), "the upstream response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = _reasoning_of(message)
    if reasoning and not omit_thinking:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):  # a few servers answer with parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        parser = InlineTagParser(tool_names)
        for kind, value in parser.feed(text) + parser.finish():
            if kind == "tool_use":
                content.append({"type": "tool_use", "id": f"toolu_{resp.get('id', '')}_t{len(content)}", **value})
            elif kind == "thinking" and omit_thinking:
                continue
            elif content and content[-1]["type"] == kind:
                content[-1][kind] += value  # text or thinking: the block's text key is its type
            else:
                content.append({"type": kind, kind: value, **({"signature": ""} if kind == "thinking" else {})})
    if message.get("refusal"):
        content.append({"type": "text", "text": message["refusal"]})
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{resp.get('id', '')}_{i}",
                "name": function.get("name", ""),
                "input": parse_arguments(function.get("arguments")),
            }
        )
    matched = choice.get("stop_reason")
    stop_reason = map_finish_reason(
        choice.get("finish_reason"),
        has_tool_use=any(b["type"] == "tool_use" for b in content),
        matched_stop=matched,
    )
    if message.get("refusal") and stop_reason == "end_turn":
        stop_reason = "refusal"
    return {
        "id": "msg_" + str(resp.get("id", "")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": matched if stop_reason == "stop_sequence" else None,
        "usage": _usage_to_anthropic(resp.get("usage")),
    }


# ---------------------------------------------------------------- stream

# Output-token estimate when the upstream sent no usage chunk (proxy/usage.py's
# CHARS_PER_TOKEN): a guess, but a closer one than 0 for rate limits and
# budgets that read it.


def _is_json_object(text: str) -> bool:
    if not text.strip():
        return True  # a tool without parameters: the input is {}
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return encode_event(name, encode_json(payload))


class OpenAIStreamToAnthropic:
    """Chat-completion chunks in, Anthropic SSE events out.

    States (``self.state``): ``IDLE`` (nothing sent) → ``MESSAGE`` (no block
    open) ⇄ ``BLOCK`` (one content block open, kind in ``self._block_kind``)
    → ``DONE`` (after ``message_stop``) or ``ERROR`` (after an ``error``
    event). Any call in ``DONE``/``ERROR`` returns ``[]``: a stream that has
    ended stays ended.

    Every output sequence is a well-formed Anthropic stream — the grammar in
    ``tests/validate.py``. Anthropic blocks are strictly sequential
    while OpenAI addresses tool calls by index, so each switch of kind (or of
    tool index) closes the open block and opens the next. Every real server
    streams tool calls one after another; for an upstream that goes *back* to
    a tool call whose block is closed, there is no lossless way to stream it:
    with ``buffer_tool_calls=False`` (default, lowest latency) the stream ends
    with an ``api_error`` event rather than hand the client a truncated tool
    input; with ``buffer_tool_calls=True`` tool calls are held and sent whole
    at the end, which is lossless for any interleaving.

    Thinking blocks end with a ``signature_delta`` carrying ``""``: that is
    the sequence Anthropic itself sends, and clients that wait for the
    signature before treating the thinking as complete see it.
    """

    IDLE, MESSAGE, BLOCK, DONE, ERROR = "IDLE", "MESSAGE", "BLOCK", "DONE", "ERROR"

    def __init__(
        self,
        *,
        model: str,
        message_id: str | None = None,
        input_tokens_estimate: int = 0,
        buffer_tool_calls: bool = False,
        tool_names: frozenset[str] = frozenset(),
        omit_thinking: bool = False,
    ) -> None:
        # message_id: None → "msg_" + the upstream chunk id, as the whole-response path does.
        # input_tokens_estimate: 0 unless the caller counted the prompt; OpenAI servers
        #   report prompt tokens only at the end, and message_delta then carries the real count.
        # buffer_tool_calls: False, because every server we target streams tool calls in
        #   order, and buffering would hold a large Write/Edit input back until the end.
        # tool_names, omit_thinking: from the request (OpenAIRequest), as for whole responses.
        self.state = self.IDLE
        self._model = model
        self._message_id = message_id
        self._input_estimate = input_tokens_estimate
        self._buffer_tools = buffer_tool_calls
        self._index = -1  # Anthropic index of the open (or last) block
        self._block_kind: str | None = None  # "text" | "thinking" | "tool_use"
        self._tool_index: int | None = None  # OpenAI index of the open tool block
        self._closed_tools: set[int] = set()
        self._tool_args: dict[int, str] = {}  # live mode: every call's arguments so far, checked at finish
        self._buffered: dict[int, dict[str, Any]] = {}  # buffer_tool_calls: index → id/name/args
        self._has_tool_use = False
        self._finish_reason: str | None = None
        self._matched_stop: Any = None
        self._usage: dict[str, Any] | None = None
        self._chars = 0
        self._tags = InlineTagParser(tool_names)
        self._omit_thinking = omit_thinking
        self._text_tools = 0  # tool calls written as <tool_call> text so far

    # -- public

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """One decoded ``chat.completion.chunk`` → zero or more Anthropic events."""
        if self.state in (self.DONE, self.ERROR):
            return []
        out: list[bytes] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if self.state == self.IDLE:
            self._start(chunk, out)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n > 1 is never requested; see openai_response_to_anthropic
            delta = choice.get("delta") or {}
            reasoning = _reasoning_of(delta)
            if reasoning and not self._omit_thinking:
                self._append("thinking", reasoning, out)
            if isinstance(delta.get("content"), str):
                self._segments(self._tags.feed(delta["content"]), out)
            if delta.get("refusal"):
                self._append("text", delta["refusal"], out)
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call, chunk, out)
                if self.state == self.ERROR:
                    return out
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                self._matched_stop = choice.get("stop_reason")
        return out

    def finish(self) -> list[bytes]:
        """The upstream sent ``[DONE]`` (or simply ended): close and end the message.

        A stream that ends without a ``finish_reason`` gets ``tool_use`` when
        it made tool calls and ``end_turn`` otherwise; a connection that
        *broke* is the caller's to report with ``error``.
        """
        if self.state in (self.DONE, self.ERROR):
            return []
        out: list[bytes] = []
        if self.state == self.IDLE:
            self._start({}, out)
        self._segments(self._tags.finish(), out)
        if self._finish_reason != "length" and not all(
            _is_json_object(a) for a in [*self._tool_args.values(), *(c["args"] for c in self._buffered.values())]
        ):
            # The client has already been sent pieces that will never parse;
            # only a cut at max_tokens makes that legal (Anthropic sends the
            # partial input then too). Otherwise the stream was cut or the
            # model wrote garbage: say so rather than end normally.
            return self.error("api_error", "the upstream ended a tool call whose arguments are not a JSON object")
        self._close(out)
        for index in sorted(self._buffered):
            call = self._buffered[index]
            self._open("tool_use", out, tool=call)
            if call["args"]:
                out.append(self._delta({"type": "input_json_delta", "partial_json": call["args"]}))
            self._close(out)
        stop_reason = map_finish_reason(self._finish_reason, has_tool_use=self._has_tool_use, matched_stop=self._matched_stop)
        if self._usage:
            usage = _usage_to_anthropic(self._usage)
        else:
            usage = {"output_tokens": -(-self._chars // CHARS_PER_TOKEN)}
        out.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": stop_reason,
                        "stop_sequence": self._matched_stop if stop_reason == "stop_sequence" else None,
                    },
                    "usage": usage,
                },
            )
        )
        out.append(_event("message_stop", {"type": "message_stop"}))
        self.state = self.DONE
        return out

    def error(self, type_: str, message: str) -> list[bytes]:
        """The upstream failed mid-stream: Anthropic's ``error`` event, nothing closed.

        Never a made-up text block: an SDK raises on ``error``, so the client
        knows the answer is incomplete.
        """
        if self.state in (self.DONE, self.ERROR):
            return []
        self.state = self.ERROR
        return [error_event(type_, message)]

    # -- internals

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        message_id = self._message_id or "msg_" + str(chunk.get("id") or "weir")
        usage = _usage_to_anthropic(self._usage) if self._usage else None
        out.append(
            _event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": message_id,
                        "type": "message",
                        "role": "assistant",
                        "model": self._model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": usage["input_tokens"] if usage else self._input_estimate,
                            "output_tokens": 0,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": usage["cache_read_input_tokens"] if usage else 0,
                        },
                    },
                },
            )
        )
        out.append(_event("ping", {"type": "ping"}))
        self._message_id = message_id
        self.state = self.MESSAGE

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def _open(self, kind: str, out: list[bytes], *, tool: dict[str, Any] | None = None) -> None:
        self._index += 1
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": ""}
        elif kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            assert tool is not None
            block = {"type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}
            self._has_tool_use = True
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self._index, "content_block": block}))
        self._block_kind = kind
        self.state = self.BLOCK

    def _close(self, out: list[bytes]) -> None:
        if self.state != self.BLOCK:
            return
        if self._block_kind == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        if self._block_kind == "tool_use" and self._tool_index is not None:
            self._closed_tools.add(self._tool_index)
            self._tool_index = None
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._block_kind = None
        self.state = self.MESSAGE

    def _append(self, kind: str, text: str, out: list[bytes]) -> None:
        self._chars += len(text)
        if self._block_kind != kind:
            self._close(out)
            self._open(kind, out)
        key = "text" if kind == "text" else "thinking"
        out.append(self._delta({"type": f"{key}_delta", key: text}))

    def _segments(self, segments: list[Segment], out: list[bytes]) -> None:
        """Content text, parsed for inline tags: each settled piece as its block."""
        for kind, value in segments:
            if kind == "tool_use":
                # Whole: the parser only yields a tool call once its JSON closed.
                self._close(out)
                self._open("tool_use", out, tool={"id": f"toolu_{self._message_id}_t{self._text_tools}", "name": value["name"]})
                self._text_tools += 1
                args = encode_json(value["input"]).decode()
                self._chars += len(args)
                out.append(self._delta({"type": "input_json_delta", "partial_json": args}))
                self._close(out)
            elif kind == "text" or not self._omit_thinking:
                self._append(kind, value, out)

    def _tool_delta(self, call: dict[str, Any], chunk: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        function = call.get("function") or {}
        args = function.get("arguments") or ""
        self._chars += len(args)
        if self._buffer_tools:
            entry = self._buffered.setdefault(index, {"id": None, "name": "", "args": ""})
            entry["id"] = entry["id"] or call.get("id")
            entry["name"] = entry["name"] or function.get("name") or ""
            entry["args"] += args
            if entry["id"] is None:
                entry["id"] = f"toolu_{self._message_id}_{index}"
            self._has_tool_use = True
            return
        if index in self._tool_args:
            self._tool_args[index] += args
        if self._block_kind == "tool_use" and self._tool_index == index:
            if args:
                out.append(self._delta({"type": "input_json_delta", "partial_json": args}))
            return
        if index in self._closed_tools:
            out.extend(
                self.error(
                    "api_error",
                    f"upstream interleaved tool call {index} after its block ended; enable buffer_tool_calls for this upstream",
                )
            )
            return
        self._close(out)
        # Ids are optional on some servers (older Ollama); Anthropic needs one.
        tool = {"id": call.get("id") or f"toolu_{self._message_id}_{index}", "name": function.get("name") or ""}
        self._open("tool_use", out, tool=tool)
        self._tool_index = index
        self._tool_args[index] = args
        if args:
            out.append(self._delta({"type": "input_json_delta", "partial_json": args}))
