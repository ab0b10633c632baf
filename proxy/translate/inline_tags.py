"""Reasoning and tool calls that a model writes *into its text*, as tags.

Many models served through OpenAI-compatible servers have no reasoning or
tool-call parser configured on the server, so what should have been separate
fields arrives inside ``content``:

* ``<think>…</think>`` — DeepSeek-R1, Qwen3, QwQ and many NIM models open
  their answer with their reasoning in these tags;
* ``<tool_call>{"name": …, "arguments": …}</tool_call>`` — the Hermes format
  Qwen, NousResearch and most open tool-tuned models are trained on.

``InlineTagParser`` turns that text back into what it stands for: ``text``,
``thinking`` and ``tool_use`` segments. It is a sans-IO state machine fed
text as it arrives, so one code path serves whole responses (one ``feed``)
and streams (one ``feed`` per delta) — and a tag split across deltas at any
character is recognised all the same: the parser holds back only the tail
that could still become a tag.

States: ``LEAD`` (nothing but whitespace seen) → ``THINK`` or ``TEXT``;
``TEXT`` ⇄ ``TOOL``. Two choices keep ordinary text safe:

* ``<think>`` counts only at the very start of the content (after
  whitespace), where these models put it; an answer that *mentions* the tag
  later stays text.
* ``<tool_call>`` counts only when the request declared tools, and becomes
  ``tool_use`` only when its body is a JSON object naming one of them with
  object (or JSON-string) arguments; anything else is passed on as the text
  it was, tags and whitespace included, so nothing the model wrote is lost.

Whitespace next to a tag (the newlines models put around them) is dropped,
so a turn with a tool call does not also carry a blank text block; content
without tags comes out exactly as it went in.

Not handled: a template that puts the opening ``<think>`` into the *prompt*
(the model's output then starts inside the reasoning and only ``</think>``
appears). A stream cannot take back text it has sent; such servers need
their own reasoning parser (vLLM's ``--reasoning-parser``), which moves the
reasoning into ``reasoning_content`` where the translator reads it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["InlineTagParser", "Segment"]

# ("text", str) | ("thinking", str) | ("tool_use", {"name": str, "input": dict})
Segment = tuple[str, Any]

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_TOOL_OPEN, _TOOL_CLOSE = "<tool_call>", "</tool_call>"


def _partial_tag_at_end(buf: str, tag: str) -> int:
    """Length of the longest tail of ``buf`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:n]):
            return n
    return 0


def _tool_use(body: str, tool_names: frozenset[str]) -> dict[str, Any] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in tool_names:
        return None
    # "arguments" is the Hermes word; some fine-tunes write "parameters".
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return {"name": call["name"], "input": args}


class InlineTagParser:
    """Text in, ``text`` / ``thinking`` / ``tool_use`` segments out.

    ``tool_names``: the request's tool names; empty means ``<tool_call>`` is
    never special. ``feed`` returns the segments the text so far settles;
    ``finish`` (at the end of the content) flushes what was held back: an
    unclosed ``<think>`` is thinking (a reply cut at ``max_tokens``), an
    unclosed ``<tool_call>`` is the text it was.
    """

    LEAD, TEXT, THINK, TOOL, DONE = "LEAD", "TEXT", "THINK", "TOOL", "DONE"

    def __init__(self, tool_names: frozenset[str] = frozenset()) -> None:
        self.state = self.LEAD
        self._tool_names = tool_names
        self._buf = ""  # text not yet settled: a possible tag prefix, trailing whitespace, a tool call's body
        self._trim = False  # drop leading whitespace: set right after a tag
        self._gap = ""  # the whitespace before an open <tool_call>, given back if it proves to be text

    def feed(self, text: str) -> list[Segment]:
        if self.state == self.DONE or not text:
            return []
        self._buf += text
        out: list[Segment] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Segment]:
        if self.state == self.DONE:
            return []
        out: list[Segment] = []
        buf, state = self._buf, self.state
        self._buf, self.state = "", self.DONE
        if state == self.TOOL:
            self._trim = False
            self._emit(out, "text", self._gap + _TOOL_OPEN + buf)
        else:
            self._emit(out, "thinking" if state == self.THINK else "text", buf)
        return out

    # -- internals

    def _emit(self, out: list[Segment], kind: str, text: str) -> None:
        if self._trim:
            text = text.lstrip()
        if text:
            self._trim = False
            out.append((kind, text))

    def _settle(self, out: list[Segment], kind: str, closing: str) -> None:
        """Emit the buffer but what could still be ``closing`` or the whitespace before it."""
        buf = self._buf
        if not closing:  # no tag can follow: nothing to hold back
            self._emit(out, kind, buf)
            self._buf = ""
            return
        keep = _partial_tag_at_end(buf, closing)
        body = buf[: len(buf) - keep].rstrip()
        self._emit(out, kind, body)
        self._buf = buf[len(body) :]

    def _step(self, out: list[Segment]) -> bool:
        """Advance by at most one tag; True when another step may make progress."""
        buf = self._buf
        if self.state == self.LEAD:
            lead = buf.lstrip()
            if lead.startswith(_THINK_OPEN):
                self._buf = lead[len(_THINK_OPEN) :]
                self.state, self._trim = self.THINK, True
                return True
            if _THINK_OPEN.startswith(lead):
                return False  # "", "<", "<thi"…: wait for more
            self.state = self.TEXT
            return True
        if self.state == self.THINK:
            at = buf.find(_THINK_CLOSE)
            if at < 0:
                self._settle(out, "thinking", _THINK_CLOSE)
                return False
            self._emit(out, "thinking", buf[:at].rstrip())
            self._buf = buf[at + len(_THINK_CLOSE) :]
            self.state, self._trim = self.TEXT, True
            return True
        if self.state == self.TEXT:
            at = buf.find(_TOOL_OPEN) if self._tool_names else -1
            if at < 0:
                self._settle(out, "text", _TOOL_OPEN if self._tool_names else "")
                return False
            text = buf[:at].rstrip()
            self._emit(out, "text", text)
            self._gap = buf[len(text) : at]
            self._buf = buf[at + len(_TOOL_OPEN) :]
            self.state = self.TOOL
            return True
        # TOOL: the body is held whole, it is parsed only once closed.
        at = buf.find(_TOOL_CLOSE)
        if at < 0:
            return False
        body = buf[:at]
        self._buf = buf[at + len(_TOOL_CLOSE) :]
        self.state = self.TEXT
        call = _tool_use(body, self._tool_names)
        if call is None:
            # Text after all: it and what follows read on as text.
            self._trim = False
            self._emit(out, "text", self._gap + _TOOL_OPEN + body + _TOOL_CLOSE)
        else:
            out.append(("tool_use", call))
            self._trim = True
        return True
