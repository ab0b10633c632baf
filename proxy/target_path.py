"""Request targets, checked before anything routes or forwards them.

Hypercorn hands the app ``scope["path"]`` percent-decoded: ``%2F`` is already
a ``/``, ``%3F`` a ``?``, ``%2E%2E`` a ``..``. Forwarding that string
upstream — with Weir's own key — turned ``/v1/models/..%2F..%2Fadmin`` into
``/v1/models/../../admin`` on the upstream, and ``%3F``/``%23`` into a real
query and fragment. So Weir reads the *raw* path (``scope["raw_path"]``),
checks every segment against a conservative alphabet, and what it forwards
is the path it checked, never the decoded one.

The rules, per segment of the raw path:

- not empty (no ``//``, no trailing ``/``), not ``.`` or ``..`` — raw or
  percent-encoded, since upstream servers and proxies in front of them
  decode before normalising;
- a percent escape is allowed only for a byte of the alphabet itself (some
  SDKs quote ``:`` in a model id): it is decoded, so the path forwarded
  carries no escapes at all. An escaped ``/``, ``?``, ``#``, ``%``, control
  byte, space or non-ASCII byte is refused, never forwarded;
- the alphabet: RFC 3986's unreserved characters plus ``:`` and ``@``
  (pchar without sub-delims). Every model and batch id the providers issue
  fits it: ``claude-sonnet-4-5-20250929``, ``claude-3-5-sonnet@20240620``
  (Vertex), ``ft:gpt-4o-mini:org::id`` (OpenAI fine-tunes),
  ``msgbatch_01…``; a model name with a slash (``Qwen/Qwen2.5-7B``) is two
  segments, as OpenAI-compatible servers route it.

The query string is the bytes the client sent after its first ``?`` and
nothing else: characters outside RFC 3986's query alphabet (a ``#``,
spaces, controls, quotes) and malformed escapes are refused; valid escapes
pass as sent, since the query is the upstream's to decode.

Pure functions over bytes, no I/O: the hypothesis tests feed them directly.
"""

from __future__ import annotations

import re

__all__ = ["BadTarget", "checked_path", "checked_query"]


class BadTarget(ValueError):
    """The request target is refused; the message says which part and why."""


_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:@"
# The common case, a path of plain segments, is one regex match; only a path
# with an escape or a dot-only segment takes the segment-by-segment walk.
_PLAIN = re.compile(rb"(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9\-._~:@]+)+")
_SEGMENT_BYTES = frozenset(_ALPHABET)
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 3986 §3.4: query = *( pchar / "/" / "?" ), pchar = unreserved / pct-encoded / sub-delims / ":" / "@".
_QUERY_BYTES = frozenset(_ALPHABET + b"!$&'()*+,;=/?%")
# A longer path is no API path; the bound keeps the walk below cheap.
MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 8192


def checked_path(raw: bytes) -> str:
    """The path to route on and forward, or ``BadTarget``.

    ``raw`` is ``scope["raw_path"]``: the path as the client sent it, before
    any decoding, without the query.
    """
    if len(raw) > MAX_PATH_BYTES:
        raise BadTarget(f"the request path is longer than {MAX_PATH_BYTES} bytes")
    if _PLAIN.fullmatch(raw) is not None:
        return raw.decode("ascii")
    if raw[:1] != b"/":
        raise BadTarget("the request path must start with '/'")
    out: list[str] = []
    for i, segment in enumerate(raw[1:].split(b"/")):
        out.append(_segment(segment, i))
    return "/" + "/".join(out)


def _segment(segment: bytes, index: int) -> str:
    if not segment:
        raise BadTarget("the request path has an empty segment ('//' or a trailing '/')")
    decoded = bytearray()
    i, n = 0, len(segment)
    while i < n:
        b = segment[i]
        if b == 0x25:  # "%"
            pair = segment[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadTarget("the request path has a malformed percent escape")
            b = int(pair, 16)
            if b not in _SEGMENT_BYTES:
                raise BadTarget(f"the request path has an escaped byte 0x{b:02x} that is not allowed in a path segment")
            i += 3
        else:
            if b not in _SEGMENT_BYTES:
                raise BadTarget(f"the request path has a byte 0x{b:02x} that is not allowed in a path segment")
            i += 1
        decoded.append(b)
    if decoded in (b".", b".."):
        raise BadTarget("the request path has a dot-segment ('.' or '..', raw or percent-encoded)")
    return decoded.decode("ascii")


def checked_query(raw: bytes) -> bytes:
    """The query string to forward — exactly the client's — or ``BadTarget``."""
    if not raw:
        return raw
    if len(raw) > MAX_QUERY_BYTES:
        raise BadTarget(f"the query string is longer than {MAX_QUERY_BYTES} bytes")
    if not _QUERY_BYTES.issuperset(raw):
        bad = next(b for b in raw if b not in _QUERY_BYTES)
        raise BadTarget(f"the query string has a byte 0x{bad:02x} that is not allowed in a query")
    at = raw.find(b"%")
    while at >= 0:
        pair = raw[at + 1 : at + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadTarget("the query string has a malformed percent escape")
        at = raw.find(b"%", at + 3)
    return raw
