"""Request targets: what the client sent is checked raw, and what is checked is what goes upstream.

Hypercorn decodes ``%2F`` before the app sees ``scope["path"]``; these tests
send their request lines over raw sockets, so nothing between them and Weir
normalises the target first.
"""

from __future__ import annotations

import urllib.parse

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.target_path import BadTarget, checked_path, checked_query

from .harness import make_settings, running_mock, running_weir

AUTH = {"client_keys": [{"tenant": "t", "key": "sk-client"}]}
UPSTREAM_KEY = "sk-weir-own-upstream-key"


# ------------------------------------------------------------------ pure


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:@"
segments = st.text(alphabet=_ALPHABET, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=100, deadline=None)
@given(st.lists(segments, min_size=1, max_size=5))
def test_plain_paths_pass_unchanged(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    assert checked_path(path.encode()) == path


@settings(max_examples=100, deadline=None)
@given(st.lists(segments, min_size=1, max_size=5), st.data())
def test_escaped_alphabet_bytes_are_decoded_so_nothing_escaped_is_forwarded(parts: list[str], data: st.DataObject) -> None:
    # Quote some characters of some segments: the result is the unquoted path.
    quote = data.draw(st.lists(st.booleans(), min_size=60, max_size=60))
    flat = iter(quote * 2)
    raw = "/" + "/".join("".join(f"%{ord(c):02X}" if next(flat) else c for c in p) for p in parts)
    assert checked_path(raw.encode()) == "/" + "/".join(parts)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60))
def test_any_bytes_are_refused_or_forwarded_as_a_clean_path(raw: bytes) -> None:
    try:
        out = checked_path(raw)
    except BadTarget as exc:
        assert str(exc)
        return
    # What passes is plain: no escapes, no dot-segments, no empty segments,
    # nothing outside the alphabet — and it is what the client meant.
    assert out.startswith("/") and "%" not in out
    segs = out[1:].split("/")
    assert all(s and s not in (".", "..") and set(s) <= set(_ALPHABET) for s in segs)
    assert urllib.parse.unquote_to_bytes(raw) == out.encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/models/..%2F..%2Fadmin",
        b"/v1/models/../../admin",
        b"/v1/models/%2e%2e/admin",
        b"/v1/models/.%2E/admin",
        b"/v1/models/./x",
        b"/v1/models/x%00y",
        b"/v1/models/x%0d%0ay",
        b"/v1/models/x%20y",
        b"/v1/models/x%ffy",
        b"/v1/models/x%3Fy",
        b"/v1/models/x%23y",
        b"/v1/models/x%25y",
        b"/v1/models/x%2",
        b"/v1/models/x%zzy",
        b"/v1/models/x y",
        b"/v1//models",
        b"/v1/models/",
        b"/v1/models/x\\y",
        b"/v1/models/caf\xc3\xa9",
    ],
)
def test_hostile_paths_are_refused(raw: bytes) -> None:
    with pytest.raises(BadTarget):
        checked_path(raw)


@pytest.mark.parametrize("raw", [b"beta=true", b"limit=20&after_id=msgbatch_01%2Fx", b"a=b/c?d", b""])
def test_queries_pass_as_sent(raw: bytes) -> None:
    assert checked_query(raw) == raw


@pytest.mark.parametrize("raw", [b"a=b#frag", b"a=%zz", b"a=%2", b'a="x"', b"a=\x00", b"a=b c", b"a=\xff"])
def test_hostile_queries_are_refused(raw: bytes) -> None:
    with pytest.raises(BadTarget):
        checked_query(raw)


# ----------------------------------------------------------- raw sockets


async def raw_exchange(url: str, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send hand-written request bytes; read one response with a content-length."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        buf = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed before a response head: {buf!r}"
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
            length = int(headers[b"content-length"])
            while len(rest) < length:
                chunk = await stream.receive_some(65536)
                assert chunk
                rest += chunk
    return status, headers, rest[:length]


def _get(target: bytes, key: bytes = b"sk-client", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nhost: weir\r\nx-api-key: " + key + b"\r\nanthropic-version: 2023-06-01\r\n" + extra + b"\r\n"


TRAVERSALS = [
    b"/v1/models/..%2F..%2Fadmin",
    b"/v1/models/%2e%2e/%2e%2e/admin",
    b"/v1/models/../../admin",
    b"/v1/messages/batches/..%2f..%2fadmin",
    b"/v1/models/x%3Fy",
    b"/v1/models/x%23y",
    b"/v1/models/x%00y",
    b"/v1/models/x%0d%0ay",
    b"/v1/models/x%20y",
    b"/v1/models/x%ffy",
    b"/v1%2Fmodels",
]


async def _with_keyed_weir(fn) -> None:  # type: ignore[no-untyped-def]


    async with running_mock() as (mock, url):
        settings_ = make_settings(None, upstreams=[{"name": "primary", "url": url, "api_keys": [UPSTREAM_KEY]}], auth=AUTH)
        async with running_weir(settings_) as weir:
            await fn(weir, mock)


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_hostile_targets_get_400_in_anthropic_shape_and_never_reach_the_upstream(target: bytes) -> None:
    async def check(weir, mock) -> None:  # type: ignore[no-untyped-def]
        status, headers, body = await raw_exchange(weir.url, _get(target))
        assert status == 400, body
        doc = msgspec.json.decode(body)
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
        assert headers[b"x-request-id"]
        assert list(mock.requests) == []

    await _with_keyed_weir(check)


async def test_forwarded_target_is_exactly_the_checked_one() -> None:
    async def check(weir, mock) -> None:  # type: ignore[no-untyped-def]
        # An escaped alphabet byte is decoded; the query goes as sent.
        status, _, body = await raw_exchange(weir.url, _get(b"/v1/models/claude-sonnet-4-5%2D20250929?x=%2F1"))
        assert status in (200, 404), body
        seen = mock.requests[-1]
        assert seen.path == "/v1/models/claude-sonnet-4-5-20250929"
        assert seen.query == "x=%2F1"
        # Weir's own key went with it, to the path checked and nowhere else.
        assert seen.header(b"x-api-key") == UPSTREAM_KEY.encode()

    await _with_keyed_weir(check)


async def test_hostile_query_gets_400() -> None:
    async def check(weir, mock) -> None:  # type: ignore[no-untyped-def]
        status, _, body = await raw_exchange(weir.url, _get(b"/v1/models?a=b#c"))
        assert status == 400, body
        assert list(mock.requests) == []

    await _with_keyed_weir(check)


async def test_chat_ingress_refuses_bad_targets_in_openai_shape() -> None:
    async def check(weir, mock) -> None:  # type: ignore[no-untyped-def]
        req = b"POST /v1/chat/completions%2F.. HTTP/1.1\r\nhost: weir\r\nauthorization: Bearer sk-client\r\ncontent-length: 2\r\n\r\n{}"
        status, _, body = await raw_exchange(weir.url, req)
        assert status == 400
        err = msgspec.json.decode(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert list(mock.requests) == []

    await _with_keyed_weir(check)
