"""Which headers cross the proxy, in each direction.

Everything a client sends goes upstream — ``anthropic-*`` headers, the SDK's
``x-stainless-*`` telemetry, headers that do not exist yet — except the
hop-by-hop ones (RFC 9110 §7.6.1: the fixed list, and whatever the client's
``Connection`` header names), the ones the upstream leg recomputes, and Weir's own
``x-weir-*`` controls. Credentials go upstream only in passthrough mode.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

__all__ = ["HOP_BY_HOP", "upstream_request_headers", "client_response_headers", "request_id"]

# RFC 9110 §7.6.1 plus the de-facto ones proxies strip (keep-alive, proxy-*).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Recomputed for the upstream leg: host and length by the pool (http1.py); encoding is
# fixed to identity so Weir can read what it must (cache, translation, usage)
# without inflating — LLM replies are small next to their latency.
_REQUEST_RECOMPUTED = frozenset({b"host", b"content-length", b"accept-encoding", b"expect"})
_CREDENTIALS = frozenset({b"x-api-key", b"authorization"})
_IDENTITY = (b"accept-encoding", b"identity")


def upstream_request_headers(client_headers: list[tuple[bytes, bytes]], *, forward_credentials: bool) -> list[tuple[bytes, bytes]]:
    """The client's headers for the upstream leg; the target adds its own credentials."""
    out = [_IDENTITY]
    listed = _connection_listed(client_headers)
    for name, value in client_headers:
        if name in HOP_BY_HOP or name in _REQUEST_RECOMPUTED or name[:7] == b"x-weir-":
            continue
        if listed and name in listed:
            continue
        if name in _CREDENTIALS and not forward_credentials:
            continue
        out.append((name, value))
    return out


def _connection_listed(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Names the ``Connection`` header lists: hop-by-hop for this connection
    only, so a proxy must not forward them (RFC 9110 §7.6.1) — a client could
    otherwise smuggle a header past the filter by naming it there."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names.update(t.strip().lower() for t in value.split(b","))
    names.discard(b"")
    return frozenset(names)


def client_response_headers(upstream_headers: list[tuple[bytes, bytes]], *, drop_ratelimit: bool = False) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client.

    With Weir's own rate limits on, the upstream's ``anthropic-ratelimit-*``
    describe Weir's key, not the client's budget: Weir reports its own instead.
    The upstream's own ``x-request-id`` (OpenAI-compatible servers send one)
    travels as ``x-upstream-request-id``: ``x-request-id`` is Weir's, and a
    response must not carry two. Headers the upstream's ``Connection`` names
    are hop-by-hop too.
    """
    drop = HOP_BY_HOP | listed if (listed := _connection_listed(upstream_headers)) else HOP_BY_HOP
    out = []
    for n, v in upstream_headers:
        if n in drop or (drop_ratelimit and n[:20] == b"anthropic-ratelimit-"):
            continue
        if n == b"x-request-id":
            n = b"x-upstream-request-id"
        out.append((n, v))
    return out


# A random per-process prefix and a counter: unique across workers and
# restarts, and no system call per request (``secrets.token_hex`` was ~1% of
# the hot path's CPU in the py-spy profile).
_ID_PREFIX = "req_weir_" + os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def request_id(headers: Mapping[bytes, bytes]) -> str:
    """The id on every response and log line of one request.

    A caller's own ``x-request-id`` is kept when it is sane, so one id follows
    a request across their systems and ours.
    """
    given = headers.get(b"x-request-id")
    if given and len(given) <= 128 and given.isascii() and given.replace(b"-", b"").replace(b"_", b"").isalnum():
        return given.decode()
    return "%s%08x" % (_ID_PREFIX, next(_ID_COUNTER))
