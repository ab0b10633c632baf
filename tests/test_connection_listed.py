"""Headers a ``Connection`` header names are hop-by-hop (RFC 9110 §7.6.1): never forwarded."""

from __future__ import annotations

from proxy.headers import client_response_headers, upstream_request_headers

from .harness import body, weir_and_mock
from .test_target_path import raw_exchange


def test_request_headers_named_in_connection_are_dropped() -> None:
    out = upstream_request_headers(
        [(b"connection", b"keep-alive, X-Secret-Hop ,x-other"), (b"x-secret-hop", b"1"), (b"x-other", b"2"), (b"anthropic-beta", b"b")],
        forward_credentials=False,
    )
    names = [n for n, _ in out]
    assert b"x-secret-hop" not in names and b"x-other" not in names and b"connection" not in names
    assert (b"anthropic-beta", b"b") in out


def test_response_headers_named_in_connection_are_dropped() -> None:
    out = client_response_headers([(b"connection", b"x-upstream-hop"), (b"x-upstream-hop", b"1"), (b"request-id", b"r")])
    assert out == [(b"request-id", b"r")]


async def test_connection_listed_headers_never_reach_the_upstream() -> None:
    async with weir_and_mock() as (weir, mock):
        payload = body()
        req = (
            b"POST /v1/messages HTTP/1.1\r\nhost: weir\r\nx-api-key: sk-client\r\nanthropic-version: 2023-06-01\r\n"
            b"content-type: application/json\r\nconnection: keep-alive, x-smuggled\r\nx-smuggled: yes\r\nx-kept: yes\r\n"
            b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        status, _, _ = await raw_exchange(weir.url, req)
        assert status == 200
        seen = mock.requests[-1]
        assert seen.header(b"x-smuggled") is None and seen.header(b"x-kept") == b"yes"
