"""The Anthropic ingress: the small part of a Messages body Weir reads.

A Messages body can be megabytes of conversation; Weir needs a few fields of
it. msgspec decodes just those (``messages`` stays an array of undecoded
``Raw`` items), validates their types, and the original bytes go upstream
untouched — unknown fields included, in their original order and spelling.
"""

from __future__ import annotations

import json

import msgspec

from ..errors import ProxyError
from ..usage import CHARS_PER_TOKEN
from .structure import BadStructure, check_structure, duplicate_in, loads_object, top_level_members

__all__ = ["MessagesEnvelope", "CountTokensEnvelope", "decode_messages", "decode_count_tokens", "decode_envelope", "count_tokens_locally"]



class MessagesEnvelope(msgspec.Struct):
    model: str
    max_tokens: int
    messages: list[msgspec.Raw]
    stream: bool = False
    # Read for the cache policy: temperature 0 is the deterministic opt-in.
    temperature: float | None = None
    # Kept raw for the request-kind classifier (proxy/kinds.py): msgspec
    # scans past these fields anyway, so naming them costs nothing, and
    # nothing in them is decoded unless a cheap test says to look.
    system: msgspec.Raw = msgspec.Raw(b"")
    tools: msgspec.Raw = msgspec.Raw(b"")


class CountTokensEnvelope(msgspec.Struct):
    model: str
    messages: list[msgspec.Raw]


_messages_decoder = msgspec.json.Decoder(MessagesEnvelope)
_count_decoder = msgspec.json.Decoder(CountTokensEnvelope)


def _bad(message: str) -> ProxyError:
    return ProxyError(400, message, "invalid_request_error")


def decode_envelope(decoder: msgspec.json.Decoder, body: bytes):  # type: ignore[no-untyped-def]
    """Decode an envelope with a clear 400 for every way a body can be bad —
    the structure limits of ``structure.py`` included; both ingresses use
    it, so they refuse the same bytes the same way."""
    if not body:
        raise _bad("request body is empty; expected a JSON object")
    try:
        env = decoder.decode(body)
        # Reads every key, where the envelope skipped the unknown ones: it
        # is also what finds invalid UTF-8 in a key nobody asked for.
        check_structure(body)
    except BadStructure as exc:
        raise _bad(str(exc)) from None
    except msgspec.ValidationError as exc:
        # msgspec names the field and the JSON path; that is what a client needs.
        raise _bad(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        # msgspec lets invalid UTF-8 inside a string through as this (found by fuzzing).
        raise _bad("request body is not valid UTF-8") from None
    except RecursionError:
        # msgspec's own guard (see structure.py): a 400, not a traceback.
        raise _bad("request body is nested too deeply") from None
    return env


_str = msgspec.json.Decoder(str)
_int = msgspec.json.Decoder(int)
_bool = msgspec.json.Decoder(bool)
_temperature = msgspec.json.Decoder(float | None)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_NO_RAW = msgspec.Raw(b"")


def _messages_from(members: dict[str, msgspec.Raw]) -> MessagesEnvelope | None:
    """The envelope built from the members the duplicate check decoded anyway:
    only the few small values Weir reads are decoded again (and ``messages``
    split into items), instead of a second pass over the whole body. None
    when anything is off; the full decode then names the fault exactly."""
    try:
        stream = members.get("stream")
        temperature = members.get("temperature")
        return MessagesEnvelope(
            model=_str.decode(members["model"]),
            max_tokens=_int.decode(members["max_tokens"]),
            messages=_raw_list.decode(members["messages"]),
            stream=False if stream is None else _bool.decode(stream),
            temperature=None if temperature is None else _temperature.decode(temperature),
            system=members.get("system", _NO_RAW),
            tools=members.get("tools", _NO_RAW),
        )
    except (KeyError, msgspec.ValidationError, msgspec.DecodeError):
        return None


def _decode_messages_envelope(body: bytes) -> MessagesEnvelope:
    """The Messages envelope in one pass over the body, duplicate check included
    (measured in loadtests/bench_envelope.py against the two-pass decode)."""
    if not body:
        raise _bad("request body is empty; expected a JSON object")
    try:
        members = top_level_members(body)
        dup = duplicate_in(body, members)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return decode_envelope(_messages_decoder, body)  # not an object, or not JSON: the full path says which
    if dup is not None:
        raise _bad(f"request body has the top-level key {dup!r} more than once")
    env = _messages_from(members)
    if env is None:
        return decode_envelope(_messages_decoder, body)
    return env


def decode_messages(body: bytes) -> MessagesEnvelope:
    env = _decode_messages_envelope(body)
    if not env.model:
        raise _bad("model: must not be empty")
    if env.max_tokens < 1:
        raise _bad("max_tokens: must be at least 1")
    if not env.messages:
        raise _bad("messages: at least one message is required")
    for i, raw in enumerate(env.messages):
        # One byte tells an object from anything else without decoding it.
        if bytes(raw)[:1] != b"{":
            raise _bad(f"messages.{i}: expected an object")
    return env


def decode_count_tokens(body: bytes) -> CountTokensEnvelope:
    env: CountTokensEnvelope = decode_envelope(_count_decoder, body)
    if not env.model:
        raise _bad("model: must not be empty")
    return env


def count_tokens_locally(body: bytes) -> int:
    """A local stand-in for ``count_tokens`` where the upstream has none.

    OpenAI-compatible servers have no token-counting endpoint, and their
    tokenizers differ from Claude's anyway. Claude Code only uses the count
    to decide when to compact a conversation, so a stable over-estimate is
    safer than nothing: characters of every message, the system prompt and
    the tool definitions, divided by ``CHARS_PER_TOKEN``, rounded up.
    """
    try:
        doc = loads_object(body)
    except BadStructure as exc:
        raise _bad(str(exc)) from None
    chars = 0
    for key in ("system", "messages", "tools"):
        value = doc.get(key)
        if value:
            chars += len(value) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return max(1, -(-chars // CHARS_PER_TOKEN))
