"""Request kinds: which of Claude Code's calls a ``/v1/messages`` request is.

Besides the conversation itself (``main``), Claude Code makes small side calls
on every session and nearly every turn. They cost a provider request each —
on a 40-requests-a-minute free tier, a third of the budget — and none of them
needs the expensive model. Naming them lets a route send them to a cheap
target (``[[routes]] kind = "title"``) and ``[claude_code] answer_locally``
answer them without an upstream call.

The rules, checked in this order (the first that holds wins):

``quota_probe``
    ``max_tokens`` is 1, the conversation is one user turn, and that turn's
    text contains ``quota`` (any case). Claude Code sends it at start-up to
    check the key works.
``suggestion``
    The last message contains ``[SUGGESTION MODE:`` in its first or last
    4 KiB — the prompt suggestion Claude Code asks for after a turn, a short
    user message appended to the whole conversation.

The remaining side calls are one user turn with no tools (``tools`` absent,
``null`` or ``[]``):

``bash_prefix``
    The turn contains ``<policy_spec>`` and ``Command:`` (the shell-command
    prefix check behind Bash permissions).
``filepath``
    The turn contains ``Command:`` and ``Output:`` and the system prompt
    asks for ``file paths`` (the file-path extraction after a Bash command).
``title``
    The system prompt asks for a title: it contains ``new conversation topic``
    (Claude Code 1.x's topic detector) or ``sentence-case title`` (2.x's
    session title).

Anything else is ``main``. "One user turn" ignores ``system``-role items
inside ``messages`` (Claude Code 2.1 puts its environment block there).

Why it is cheap: the envelope (proxy/ingress/anthropic.py) has already split the body
into fields, with ``messages``, ``system`` and ``tools`` left as undecoded
``msgspec.Raw`` slices. A main call mid-session fails the first cheap test
(``max_tokens`` ≠ 1, more than one turn), so the only text searched is the
two ends of the last message for the suggestion marker: a constant cost,
however large a tool result that message carries (a whole 500 KB file read
would otherwise be copied and scanned on every turn). Markers are matched as raw bytes of
the JSON text: none of them contains a character JSON escapes (``<`` and
``>`` pass unescaped through JavaScript's ``JSON.stringify``, which is how
Claude Code writes its bodies).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

__all__ = [
    "KINDS",
    "MAIN",
    "QUOTA_PROBE",
    "TITLE",
    "BASH_PREFIX",
    "SUGGESTION",
    "FILEPATH",
    "classify",
]

MAIN = "main"
QUOTA_PROBE = "quota_probe"
TITLE = "title"
BASH_PREFIX = "bash_prefix"
SUGGESTION = "suggestion"
FILEPATH = "filepath"
KINDS = (MAIN, QUOTA_PROBE, TITLE, BASH_PREFIX, SUGGESTION, FILEPATH)

_SUGGESTION = b"[SUGGESTION MODE:"
_POLICY_SPEC = b"<policy_spec>"
_COMMAND = b"Command:"
_OUTPUT = b"Output:"
_FILE_PATHS = b"file paths"
_TITLE_MARKERS = (b"new conversation topic", b"sentence-case title")
_NO_TOOLS = (b"", b"null", b"[]")
# The suggestion prompt is ~1.5 KB; 4 KiB at each end of the last message
# finds it whether it is that message's first block or its last.
_PEEK = 4096
_USER = b'"user"'
_SYSTEM = b'"system"'
# A side call's conversation is one user turn; with Claude Code 2.1's system
# items beside it, a few entries at most. Past this, don't look at roles.
_MAX_SIDE_ENTRIES = 3


class Envelope(Protocol):
    """What the classifier reads: the fields proxy/ingress/anthropic.py decodes."""

    max_tokens: int
    messages: list[msgspec.Raw]
    system: msgspec.Raw
    tools: msgspec.Raw


class _Role(msgspec.Struct):
    # The role stays raw JSON too: msgspec only finds where it ends, and a
    # role of the wrong type is simply not a user turn (the classifier never
    # refuses a request; judging bodies is the envelope's job).
    role: msgspec.Raw = msgspec.Raw(b"")


_role = msgspec.json.Decoder(_Role).decode


def _one_user_turn(messages: list[msgspec.Raw]) -> bytes | None:
    """The only non-system entry of ``messages`` if it is a user turn, else None.

    Roles are read through views of the raw slices; only the turn found is copied.
    """
    if len(messages) > _MAX_SIDE_ENTRIES:
        return None
    turn: msgspec.Raw | None = None
    for item in messages:
        role = bytes(_role(memoryview(item)).role)
        if role == _SYSTEM:
            continue
        if role != _USER or turn is not None:
            return None
        turn = item
    return None if turn is None else bytes(turn)


def _ends(raw: msgspec.Raw) -> bytes:
    """The first and last ``_PEEK`` bytes of ``raw``, copied without the middle.

    Joined by a NUL, which raw JSON text never contains, so no match can span the cut.
    """
    view = memoryview(raw)
    if len(view) <= 2 * _PEEK:
        return bytes(view)
    return b"%b\0%b" % (view[:_PEEK], view[-_PEEK:])


def classify(env: Envelope) -> str:
    """The kind of a decoded ``/v1/messages`` request (one of :data:`KINDS`)."""
    messages = env.messages
    if env.max_tokens == 1:
        turn = _one_user_turn(messages)
        if turn is not None and b"quota" in turn.lower():
            return QUOTA_PROBE
    if _SUGGESTION in _ends(messages[-1]):
        return SUGGESTION
    if len(messages) > _MAX_SIDE_ENTRIES or bytes(env.tools) not in _NO_TOOLS:
        return MAIN
    turn = _one_user_turn(messages)
    if turn is None:
        return MAIN
    if _COMMAND in turn:
        if _POLICY_SPEC in turn:
            return BASH_PREFIX
        if _OUTPUT in turn and _FILE_PATHS in bytes(env.system).lower():
            return FILEPATH
    system = bytes(env.system)
    if system and any(m in system for m in _TITLE_MARKERS):
        return TITLE
    return MAIN
