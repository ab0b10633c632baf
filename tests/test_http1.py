"""The upstream leg's HTTP/1.1 core (proxy/upstream/http1.py), sans-IO."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.upstream.http1 import ProtocolError, RefusedRequest, ResponseParser, request_bytes

REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 11\r\nx-a: 1\r\n\r\n{\"ok\":true}"
CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nevent\r\n3\r\n: x\r\n0\r\n\r\n"


def _parse(*pieces: bytes) -> tuple[ResponseParser, bytes]:
    p = ResponseParser()
    body = b""
    for piece in pieces:
        p.feed(piece)
        body += p.take_body()
    return p, body


def test_request_is_written_once_with_host_and_length_first() -> None:
    out = request_bytes(b"POST", b"/v1/messages?beta=true", b"up:8080", [(b"x-api-key", b"k"), (b"anthropic-beta", b"a,b")], b"{}")
    assert out == b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: up:8080\r\ncontent-length: 2\r\nx-api-key: k\r\nanthropic-beta: a,b\r\n\r\n{}"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"1\r\nx-injected: 1")],
        [(b"x-a", b"1\n")],
        [(b"x-a", b"\x00")],
        [(b"x-a", b"\x01")],
        [(b"x-a", b"a\x7fb")],
        [(b"bad name", b"1")],
        [(b"", b"1")],
        [(b"ok", b"1"), (b"x:y", b"2")],
        [(b"ok\x01x", b"1")],
    ],
)
def test_request_splitting_is_refused_before_a_byte_is_written(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(RefusedRequest):
        request_bytes(b"POST", b"/v1/messages", b"up", headers, b"")


def test_bad_request_line_is_refused() -> None:
    with pytest.raises(RefusedRequest):
        request_bytes(b"POST", b"/v1/messages HTTP/1.1\r\nx: y", b"up", [], b"")
    with pytest.raises(RefusedRequest):
        request_bytes(b"GET", b"/", b"up\r\nx: y", [], b"")


def test_reply_in_one_read() -> None:
    p, body = _parse(REPLY)
    assert (p.status, p.done, p.reusable, body) == (200, True, True, b'{"ok":true}')
    assert p.headers[1] == (b"content-length", b"11")  # names lowercased, values as sent


def test_reply_split_at_every_byte_gives_the_same_result() -> None:
    for cut in range(1, len(REPLY)):
        p, body = _parse(REPLY[:cut], REPLY[cut:])
        assert (p.status, p.done, p.reusable, body) == (200, True, True, b'{"ok":true}'), cut
    for cut in range(1, len(CHUNKED)):
        p, body = _parse(CHUNKED[:cut], CHUNKED[cut:])
        assert (p.done, p.reusable, body) == (True, True, b"event: x"), cut


def test_informational_heads_are_skipped() -> None:
    p, body = _parse(b"HTTP/1.1 100 Continue\r\n\r\n" + REPLY)
    assert (p.status, body, p.done) == (200, b'{"ok":true}', True)
    assert all(n != b"x-informational" for n, _ in p.headers)


def test_close_delimited_body_ends_at_eof_and_is_not_reused() -> None:
    p, body = _parse(b"HTTP/1.1 200 OK\r\n\r\nall of it", b" until close")
    assert not p.done
    p.feed(b"")
    assert (p.done, p.reusable, body) == (True, False, b"all of it until close")


def test_eof_mid_body_is_an_error() -> None:
    p, _ = _parse(REPLY[:-3])
    with pytest.raises(ProtocolError):
        p.feed(b"")
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"")


def test_bytes_after_the_response_mean_no_reuse() -> None:
    p, _ = _parse(REPLY + b"HTTP/1.1 200 OK\r\n")
    assert p.done and not p.reusable
    p, _ = _parse(REPLY, b"garbage")
    assert p.done and not p.reusable


def test_connection_close_is_not_reused() -> None:
    p, _ = _parse(REPLY.replace(b"x-a: 1", b"connection: close"))
    assert p.done and not p.reusable


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
    ],
)
def test_ambiguous_or_foreign_framing_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        _parse(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_any_bytes_parse_or_raise_protocol_error(data: bytes, cut: int) -> None:
    p = ResponseParser()
    try:
        p.feed(data[:cut] or b"x")
        p.feed(data[cut:] or b"")
    except ProtocolError:
        return
    assert isinstance(p.take_body(), bytes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=20)), max_size=6))
def test_whatever_request_bytes_writes_parses_back_as_the_same_headers(headers: list[tuple[bytes, bytes]]) -> None:
    import httptools

    try:
        raw = request_bytes(b"POST", b"/v1/messages", b"up", headers, b"body")
    except RefusedRequest:
        return
    seen: list[tuple[bytes, bytes]] = []

    class Proto:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name, value))

    httptools.HttpRequestParser(Proto()).feed_data(raw)
    # The only headers a parser finds are the ones we meant to write (values
    # compared stripped: a parser drops surrounding whitespace).
    assert seen[2:] == [(n, v.strip(b" \t")) for n, v in headers]
