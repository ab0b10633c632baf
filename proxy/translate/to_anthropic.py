"""OpenAI client → Anthropic upstream, sans-IO (the ``/v1/chat/completions`` ingress).

The reverse of ``to_openai``: an OpenAI SDK user gets Claude behind an
OpenAI-shaped API. What does not cross, and why:

* System and developer messages all gather into Anthropic's one top-level
  ``system``, in order — Anthropic has no mid-conversation system turn.
* Prior ``reasoning_content`` on assistant turns is dropped: Anthropic only
  takes thinking blocks back with the signature it issued.
* ``n`` > 1 raises ``TranslationError``: Anthropic returns one message.
* ``temperature`` above 1 is clamped to 1 (OpenAI's range is 0–2,
  Anthropic's 0–1). With thinking on, ``temperature`` and ``top_p`` are
  dropped: Anthropic rejects sampling changes alongside extended thinking.
* ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``,
  ``seed``, ``response_format``, ``strict`` on tools, and the legacy
  ``functions``/``function_call`` fields are dropped: Messages has no such
  knobs.
"""

from __future__ import annotations

from typing import Any

from ._common import MIN_THINKING_BUDGET, TranslationError, effort_to_budget, encode_json, parse_arguments

__all__ = [
    "openai_request_to_anthropic",
    "anthropic_response_to_openai",
    "AnthropicStreamToOpenAI",
    "map_stop_reason",
    "DEFAULT_MAX_TOKENS",
]

# OpenAI makes max_tokens optional, Anthropic requires it. 4096 is the
# largest output every current Claude model accepts (Claude 3 Haiku's cap).
DEFAULT_MAX_TOKENS = 4096

_STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def map_stop_reason(stop_reason: str | None) -> str:
    """Anthropic ``stop_reason`` → OpenAI ``finish_reason`` (unknown ones read as a normal stop)."""
    return _STOP_TO_FINISH.get(stop_reason or "end_turn", "stop")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise TranslationError(message)


# ---------------------------------------------------------------- request


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    _require(isinstance(url, str), "image_url without a url")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        _require(bool(sep) and head.endswith(";base64"), "only base64 data URLs are supported for images")
        return {"type": "image", "source": {"type": "base64", "media_type": head[5:-7], "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any, where: str, *, images: bool) -> list[dict[str, Any]]:
    """OpenAI content (string, parts or null) → Anthropic blocks, empty text left out.

    Anthropic rejects empty text blocks; OpenAI clients send ``""`` freely
    (an assistant turn that only calls tools, for one).
    """
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    _require(isinstance(content, list), f"{where} content must be a string, a list of parts or null")
    blocks = []
    for part in content:
        _require(isinstance(part, dict), "content parts must be objects")
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and images:
            blocks.append(_image_block(part))
        elif kind == "refusal":
            if part.get("refusal"):
                blocks.append({"type": "text", "text": part["refusal"]})
        else:
            raise TranslationError(f"{where} content part type {kind!r} has no Anthropic equivalent")
    return blocks


def _text(content: Any, where: str) -> str:
    return "\n\n".join(b["text"] for b in _blocks(content, where, images=False))


def _push(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append to the conversation, merging into the last turn if it has the same role.

    Anthropic requires user and assistant to alternate; OpenAI allows runs
    (tool messages in particular come one per call, then maybe a user turn).
    """
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def openai_request_to_anthropic(req: dict[str, Any]) -> dict[str, Any]:
    """A chat.completions request → a Messages request."""
    _require(isinstance(req, dict), "the request body must be a JSON object")
    messages = req.get("messages")
    _require(isinstance(messages, list), "messages must be a list")
    _require((req.get("n") or 1) == 1, "n > 1 is not supported: Anthropic returns one message")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        _require(isinstance(message, dict), "each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text(message.get("content"), role)
            if text:
                system.append(text)
        elif role == "user":
            _push(turns, "user", _blocks(message.get("content"), "user", images=True))
        elif role == "assistant":
            blocks = _blocks(message.get("content"), "assistant", images=False)
            for call in message.get("tool_calls") or ():
                _require(isinstance(call, dict), "tool calls must be objects")
                function = call.get("function") or {}
                _require(isinstance(function.get("name"), str), "a tool call needs a function name")
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id") or "",
                        "name": function["name"],
                        "input": parse_arguments(function.get("arguments")),
                    }
                )
            _push(turns, "assistant", blocks)
        elif role == "tool":
            _require(isinstance(message.get("tool_call_id"), str), "a tool message needs a tool_call_id")
            result = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": _text(message.get("content"), "tool")}
            # tool_result blocks must lead the user turn that answers the
            # tool_use: put them before any user text already merged there.
            if turns and turns[-1]["role"] == "user":
                content = turns[-1]["content"]
                at = next((i for i, b in enumerate(content) if b["type"] != "tool_result"), len(content))
                content.insert(at, result)
            else:
                _push(turns, "user", [result])
        else:
            raise TranslationError(f"message role {role!r} is unknown")

    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": req.get("model"), "messages": turns, "max_tokens": max_tokens}
    if system:
        out["system"] = "\n\n".join(system)

    thinking_budget = None
    effort = req.get("reasoning_effort")
    if isinstance(effort, str):
        budget = effort_to_budget(effort)
        if budget is not None:
            # Anthropic counts thinking inside max_tokens and wants the budget
            # strictly below it, as OpenAI counts reasoning inside
            # max_completion_tokens: shrink the budget, never grow the cap.
            budget = min(budget, max_tokens - 1)
            if budget >= MIN_THINKING_BUDGET:
                thinking_budget = budget
    if thinking_budget is not None:
        out["thinking"] = {"type": "enabled", "budget_tokens": thinking_budget}
    else:
        if req.get("temperature") is not None:
            out["temperature"] = min(float(req["temperature"]), 1.0)
        if req.get("top_p") is not None:
            out["top_p"] = req["top_p"]

    stop = req.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    if req.get("stream"):
        out["stream"] = True

    tools = []
    for tool in req.get("tools") or ():
        _require(isinstance(tool, dict) and tool.get("type", "function") == "function", "only function tools are supported")
        function = tool.get("function") or {}
        _require(isinstance(function.get("name"), str), "each tool needs a function name")
        entry: dict[str, Any] = {"name": function["name"]}
        if function.get("description") is not None:
            entry["description"] = function["description"]
        entry["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
        tools.append(entry)
    if tools:
        out["tools"] = tools
        choice = req.get("tool_choice")
        tool_choice: dict[str, Any] | None = None
        if choice == "auto":
            tool_choice = {"type": "auto"}
        elif choice == "required":
            tool_choice = {"type": "any"}
        elif choice == "none":
            tool_choice = {"type": "none"}
        elif isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            _require(isinstance(name, str), "tool_choice names no function")
            tool_choice = {"type": "tool", "name": name}
        elif choice is not None:
            raise TranslationError(f"tool_choice {choice!r} is unknown")
        if req.get("parallel_tool_calls") is False and (tool_choice or {}).get("type") != "none":
            tool_choice = tool_choice or {"type": "auto"}
            tool_choice["disable_parallel_tool_use"] = True
        if tool_choice is not None:
            out["tool_choice"] = tool_choice

    if req.get("user"):
        out["metadata"] = {"user_id": req["user"]}
    return out


# ---------------------------------------------------------------- response


def _usage_to_openai(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic counts cache reads and writes apart from ``input_tokens``; OpenAI's ``prompt_tokens`` holds them all."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def anthropic_response_to_openai(resp: dict[str, Any], *, model: str | None = None, created: int = 0) -> dict[str, Any]:
    """A Messages response → a chat.completion.

    ``created`` is the caller's Unix time (we keep no clock; the 0 default is
    for tests only); ``model`` (default: the upstream's name) overrides it,
    for clients that expect theirs echoed.
    """
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in resp.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            reasoning.append(block.get("thinking", ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": encode_json(block.get("input", {})).decode()},
                }
            )
        # redacted_thinking and server-tool blocks have no OpenAI field.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-" + str(resp.get("id", "")),
        "object": "chat.completion",
        "created": created,
        "model": model or resp.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": map_stop_reason(resp.get("stop_reason"))}],
        "usage": _usage_to_openai(resp.get("usage") or {}),
    }


# ---------------------------------------------------------------- stream

_DONE = b"data: [DONE]\n\n"


class AnthropicStreamToOpenAI:
    """Anthropic stream events in, ``data: {chunk}`` lines out.

    States (``self.state``): ``IDLE`` (before ``message_start``) →
    ``MESSAGE`` → ``STOPPED`` (finish_reason sent) → ``ENDED``
    (``message_stop`` seen, usage chunk sent) → ``DONE`` (``[DONE]`` sent by
    ``finish``). ``feed`` takes the event name and its decoded data, as the SSE
    parser yields them; the caller owns the socket.

    An Anthropic ``error`` event becomes ``data: {"error": {...}}`` — the
    shape OpenAI itself sends mid-stream, on which the openai SDK raises
    ``APIError`` — followed at once by ``[DONE]``: the stream is over, and a
    client that reads to ``[DONE]`` should not hang. ``finish`` before
    ``message_stop`` means the upstream stream broke off; that, too, is
    reported as an error line rather than passed off as a normal end.
    """

    IDLE, MESSAGE, STOPPED, ENDED, DONE = "IDLE", "MESSAGE", "STOPPED", "ENDED", "DONE"

    def __init__(self, *, model: str | None = None, include_usage: bool = False, created: int = 0) -> None:
        # model: None → echo the upstream's name from message_start.
        # include_usage: False, OpenAI's own default; pass the client's stream_options.include_usage.
        # created: 0 only for callers with no time to give; the ingress passes int(time.time()).
        self.state = self.IDLE
        self._model = model
        self._include_usage = include_usage
        self._created = created  # the caller's Unix time: no clock here
        self._id = "chatcmpl-weir"
        self._tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self._usage: dict[str, Any] = {}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model or "",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        return b"data: " + encode_json(chunk) + b"\n\n"

    def feed(self, event_name: str, data: dict[str, Any]) -> list[bytes]:
        if self.state in (self.ENDED, self.DONE):
            return []
        kind = data.get("type", event_name) if isinstance(data, dict) else event_name
        if kind == "error" or event_name == "error":
            error = data.get("error") if isinstance(data, dict) else None
            error = error if isinstance(error, dict) else {}
            return self.error(error.get("type", "api_error"), error.get("message", "upstream error"))
        if kind == "message_start":
            message = data.get("message") or {}
            self._id = "chatcmpl-" + str(message.get("id", "weir"))
            self._model = self._model or message.get("model", "")
            self._usage.update(message.get("usage") or {})
            if self.state == self.IDLE:
                self.state = self.MESSAGE
                return [self._chunk({"role": "assistant", "content": ""})]
            return []
        if self.state == self.IDLE:
            return []  # nothing to say before the message exists (a stray ping)
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[data.get("index", 0)] = index
                call = {"index": index, "id": block.get("id", ""), "type": "function", "function": {"name": block.get("name", ""), "arguments": ""}}
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            if dtype == "thinking_delta" and delta.get("thinking"):
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            if dtype == "input_json_delta" and delta.get("partial_json"):
                index = self._tool_index.get(data.get("index", 0))
                if index is not None:
                    return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})]
            return []  # signature and citation deltas have no OpenAI field
        if kind == "message_delta":
            self._usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
            if self.state == self.MESSAGE:
                self.state = self.STOPPED
                stop_reason = (data.get("delta") or {}).get("stop_reason")
                return [self._chunk({}, map_stop_reason(stop_reason))]
            return []
        if kind == "message_stop":
            out = []
            if self.state == self.MESSAGE:  # no message_delta came: still end the choice
                out.append(self._chunk({}, "stop"))
            if self._include_usage:
                out.append(
                    b"data: "
                    + encode_json(
                        {
                            "id": self._id,
                            "object": "chat.completion.chunk",
                            "created": self._created,
                            "model": self._model or "",
                            "choices": [],
                            "usage": _usage_to_openai(self._usage),
                        }
                    )
                    + b"\n\n"
                )
            self.state = self.ENDED
            return out
        return []  # ping, content_block_stop, and event types we don't know

    def finish(self) -> list[bytes]:
        """The upstream stream ended: ``[DONE]`` if it ended properly, an error line first if not."""
        if self.state == self.DONE:
            return []
        if self.state == self.ENDED:
            self.state = self.DONE
            return [_DONE]
        return self.error("api_error", "the upstream stream ended before message_stop")

    def error(self, type_: str, message: str) -> list[bytes]:
        if self.state == self.DONE:
            return []
        self.state = self.DONE
        body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
        return [b"data: " + encode_json(body) + b"\n\n", _DONE]
