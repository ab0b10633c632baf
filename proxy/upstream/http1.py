"""HTTP/1.1 on the upstream leg, sans-IO: a request's bytes out, a response's parts in.

Why not h11 here. Timed in one process on this machine: h11 took ~61 µs to
serialize a 45 KB Claude Code request (it builds and validates an event
object per part) and ~66 µs to parse the mock's 1.7 KB reply, about one
tenth of Weir's CPU for a whole proxied request (the py-spy profile of
``loadtests/latency.py`` agreed: 11% of the worker's busy samples were h11
on the upstream side). Writing a request is a join; reading a response is
llhttp — Node's parser, in C — through httptools, the binding uvicorn uses:
~3 µs for the same reply. Hypercorn keeps h11 on the client side of Weir;
this module is only the upstream leg.

What h11 checked and this keeps checking before a byte is written: header
names are RFC 9110 tokens and no value holds a control character but HTAB
— CR, LF and NUL are the request-splitting cases. Most headers reach here from the client through
Hypercorn's h11, which already refused worse; the rest are Weir's own.
llhttp is strict by default: a response with both ``content-length`` and
``transfer-encoding``, two different lengths, or bad chunk framing is an
error, never a guess.
"""

from __future__ import annotations

import re

import httptools

__all__ = ["ProtocolError", "RefusedRequest", "ResponseParser", "request_bytes"]

# RFC 9110 §5.1 field-name = token; §5.5 field values: visible characters,
# obs-text, SP and HTAB — no other control character (CR, LF and NUL above all).
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR + rb"+")
# Every name at once: tokens joined by \x01, which is not a token character.
_NAMES = re.compile(rb"(?:" + _TCHAR + rb"+\x01)*" + _TCHAR + rb"+")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The request line's method and target: a token, and no whitespace or controls.
_TARGET = re.compile(rb"[\x21-\x7e]+")


class RefusedRequest(ValueError):
    """The request cannot be written as HTTP/1.1 (a bad header name or value)."""


class ProtocolError(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


def request_bytes(method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The whole request, head and body, as one buffer for one ``send_all``.

    ``host`` and ``content-length`` are written here, first; the caller's
    headers must not carry either (proxy/headers.py drops them).
    """
    names = b"\x01".join([n for n, _ in headers])
    values = b"\t".join([v for _, v in headers])  # HTAB: allowed inside a value, so the joiner never trips the check
    # One C call each for the whole set, not one per header.
    # (The count: a name with the joiner inside it must not pass as two names.)
    if headers and (_NAMES.fullmatch(names) is None or names.count(b"\x01") != len(headers) - 1):
        bad = next((n for n, _ in headers if _TOKEN.fullmatch(n) is None), b"")
        raise RefusedRequest(f"header name {bad!r} is not a token")
    if _FORBIDDEN_IN_VALUE.search(values) is not None or _FORBIDDEN_IN_VALUE.search(host) is not None:
        raise RefusedRequest("a header value holds a control character")
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        raise RefusedRequest(f"bad request line: {method!r} {target!r}")
    head = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\ncontent-length: %d\r\n" % len(body)]
    for n, v in headers:
        head += (n, b": ", v, b"\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


class ResponseParser:
    """One response, fed as it arrives; read ``status``/``headers`` once
    ``head_done``, take body bytes with ``take_body``, stop at ``done``.

    An informational head (100 Continue and friends) is skipped: the real
    head follows it. Bytes after the end of the message mean the upstream
    is out of step, so the connection is not reused (``reusable``).
    """

    __slots__ = ("_parser", "status", "headers", "head_done", "done", "_body", "_until_eof", "_eof", "_extra", "_informational", "_keep_alive")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self._body: list[bytes] = []
        self._until_eof = False  # no length and not chunked: the body ends when the connection does
        self._eof = False
        self._extra = False
        self._informational = False
        self._keep_alive = False  # llhttp's verdict, read as the message completes (it resets after)

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True
            return
        self.status = status
        self.head_done = True
        if status not in (204, 304):
            framed = False
            for n, v in self.headers:
                if n == b"content-length" or (n == b"transfer-encoding" and v.strip().lower() != b"identity"):
                    framed = True
                    break
            self._until_eof = not framed

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_begin(self) -> None:
        if self.done:
            self._extra = True

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self.headers = []
            return
        self.done = True
        self._keep_alive = self._parser.should_keep_alive()

    # -- the interface
    def feed(self, data: bytes) -> None:
        """Bytes from the socket; ``b""`` is the upstream closing its side."""
        if not data:
            if self.head_done and self._until_eof and not self.done:
                self.done = self._eof = True  # a close-delimited body ends here (RFC 9112 §6.3)
                return
            raise ProtocolError("the upstream closed the connection mid-response" if self.head_done else "the upstream closed the connection before a response")
        if self.done:
            self._extra = True
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise ProtocolError("the upstream switched protocols, which Weir never asked for") from None
        except httptools.HttpParserError as exc:
            raise ProtocolError(str(exc) or type(exc).__name__) from None

    def take_body(self) -> bytes:
        """The body bytes fed so far and not yet taken, as one buffer."""
        parts = self._body
        if not parts:
            return b""
        self._body = []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def reusable(self) -> bool:
        """Whether the connection can carry another request after this response."""
        return self.done and not (self._extra or self._eof or self._until_eof) and self._keep_alive
