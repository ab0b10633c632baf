"""Limits on a request body's shape.

- **No top-level key twice**, checked by both ingresses on every body.
  msgspec keeps the last ``model``, other JSON readers (an upstream among
  them) may keep the first: a body with two would be routed, rate-limited
  and cached as one model and served as another. RFC 8259 leaves
  duplicates to the implementation, so refusing them is the one reading
  every party agrees on. The check reuses msgspec's C parser and costs one
  more envelope-sized decode.
- **Nesting.** JSON nested 100,000 deep reached msgspec's recursion guard
  as a ``RecursionError``: a 500 with a traceback, every time. The
  ingresses now answer that guard (near 1,000 levels, less the stack in
  use) with a 400, which is all the hot path needs: it reads the envelope
  and forwards bytes. The stages that read the body *whole* — translation,
  a model rewrite, the local token count — go through ``loads_object``,
  which refuses anything past ``MAX_DEPTH`` first, so no body reaches a
  recursion limit of theirs. That depth scan is pure-Python bytes work and
  costs several envelope decodes on a 45 KB body: it runs only where a full
  ``json.loads`` (which costs more still) follows anyway.

Pure functions over bytes; ``loadtests/bench_envelope.py`` measures them.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import msgspec

__all__ = ["MAX_DEPTH", "BadStructure", "check_structure", "duplicate_in", "duplicate_top_level_key", "loads_object", "nesting_depth", "top_level_members"]

# serde_json's default recursion limit, the strictest of the common JSON
# readers (Python's json and msgspec stop near 1,000 frames, simdjson at
# 1,024), so whatever Weir sends on parses everywhere. Real bodies stay far
# below it: the deepest part of a Claude Code turn is a tool's JSON schema,
# about ten levels.
MAX_DEPTH = 128


class BadStructure(ValueError):
    """The body breaks a limit; the message says which."""


# Everything but the bytes that open and close strings, arrays and objects.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
_STRING = re.compile(rb'"[^"]*"')
# A top-level key and its colon, anchored where the previous member ended.
_KEY = re.compile(rb'[ \t\r\n]*"((?:[^"\\]|\\.)*)"[ \t\r\n]*:[ \t\r\n]*', re.DOTALL)
_AFTER_VALUE = re.compile(rb"[ \t\r\n]*([,}])")
_members_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_TOO_DEEP = object()


def check_structure(body: bytes) -> None:
    """``BadStructure`` when a well-formed JSON object repeats a top-level key.

    msgspec's errors (invalid UTF-8 in a key the envelope skipped, say)
    pass through for the caller's decoder error handling.
    """
    dup = duplicate_top_level_key(body)
    if dup is not None:
        raise BadStructure(f"request body has the top-level key {dup!r} more than once")


def loads_object(body: bytes) -> dict[str, Any]:
    """The whole body as a dict, for the stages that read it whole; ``BadStructure`` if it is not one."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise BadStructure(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        doc = _TOO_DEEP  # past json's own guard, so certainly past MAX_DEPTH
    # Scanned after the parse: a body that parses is well-formed, which the scan assumes.
    if doc is _TOO_DEEP or body.count(b"[") + body.count(b"{") > MAX_DEPTH and nesting_depth(body) > MAX_DEPTH:
        raise BadStructure(f"request body is nested deeper than {MAX_DEPTH} levels")
    if not isinstance(doc, dict):
        raise BadStructure("the request body must be a JSON object")
    return doc


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a well-formed JSON document.

    Brackets inside strings do not count, so strings must go: escaped
    backslashes and quotes are dropped first (in that order, which is how a
    JSON reader pairs them), then everything but quotes and brackets. What
    is left is mostly ``""`` pairs with the structure between them; a
    bracket that was inside a string leaves an unpaired quote behind (it
    has an odd number of quotes before it), and only then does a regex cut
    the strings out properly. The depth is the highest running sum over the
    brackets: C everywhere but that sum, whose length is the number of
    brackets, not of bytes.
    """
    if b'\\"' in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _NOT_STRUCTURE)
    brackets = skeleton.replace(b'""', b"")
    if b'"' in brackets:
        brackets = _STRING.sub(b"", skeleton)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def duplicate_top_level_key(body: bytes) -> str | None:
    """A key a well-formed JSON object's top level holds twice, or None.

    msgspec keeps each key's *last* value, as its exact bytes. Walking the
    members in order, each value must be exactly the one kept for its key:
    a key seen before, or a value other than the kept one, means the key
    comes again. Each step is a C call (an anchored regex, a prefix
    comparison), one per top-level key.
    """
    return duplicate_in(body, _members_decoder.decode(body))


def top_level_members(body: bytes) -> dict[str, msgspec.Raw]:
    """The body's top-level members, values undecoded (msgspec keeps each key's last)."""
    return _members_decoder.decode(body)


def duplicate_in(body: bytes, members: dict[str, msgspec.Raw]) -> str | None:
    """``duplicate_top_level_key`` given the members already decoded from ``body``.

    First a length count, which settles compact JSON (what Claude Code and
    the JS SDK send) without walking: the body can be no shorter than its
    braces, commas, colons, the kept values (their exact bytes) and each
    key at its shortest spelling (its UTF-8 between quotes). A repeated key
    adds at least ``"k":v,`` — five bytes — on top, so a body exactly that
    long repeats nothing. Any whitespace or escaped key makes it longer and
    the walk below decides.
    """
    n = len(members)
    if n and len(body) == 1 + 3 * n + sum([len(k.encode()) for k in members]) + sum([len(v) for v in members.values()]) + n:
        return None
    seen: set[str] = set()
    pos = body.index(b"{") + 1
    while True:
        m = _KEY.match(body, pos)
        if m is None:
            return None  # "{}"
        raw_key = m.group(1)
        key = raw_key.decode() if b"\\" not in raw_key else msgspec.json.decode(b'"' + raw_key + b'"')
        value = members.get(key)
        if key in seen or value is None:
            return key
        seen.add(key)
        value_bytes = bytes(value)
        if not body.startswith(value_bytes, m.end()):
            return key
        after = _AFTER_VALUE.match(body, m.end() + len(value_bytes))
        if after is None:
            return key  # the kept value is only a prefix of this one: a later copy won
        if after.group(1) == b"}":
            return None
        pos = after.end()
