"""Errors in Anthropic's shape.

Every failure a client sees — ours or an upstream's — is
``{"type":"error","error":{"type":…,"message":…}}`` with the status code
Anthropic uses for that type, so SDKs raise the exception class they would
raise against the real API.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["ProxyError", "error_body", "error_event", "STATUS_FOR_TYPE", "TYPE_FOR_STATUS"]

# From Anthropic's "Errors" reference page.
STATUS_FOR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "method_not_allowed_error": 405,  # not Anthropic's; it answers 405 with not_found_error
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "bad_gateway_error": 502,
    "timeout_error": 504,
    "overloaded_error": 529,
}

TYPE_FOR_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def type_for_status(status: int) -> str:
    if status in TYPE_FOR_STATUS:
        return TYPE_FOR_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


class _Inner(msgspec.Struct):
    type: str
    message: str


class _Error(msgspec.Struct, tag_field="type", tag="error"):
    error: _Inner


_encode = msgspec.json.Encoder().encode


def error_body(type_: str, message: str) -> bytes:
    return _encode(_Error(_Inner(type_, message)))


def error_event(type_: str, message: str) -> bytes:
    """The SSE ``error`` event Anthropic sends when a stream fails after it began."""
    return b"event: error\ndata: " + error_body(type_, message) + b"\n\n"


class ProxyError(Exception):
    """A failure to answer with an Anthropic-shaped error.

    Raised anywhere in the pipeline before the response head is sent; the
    handler turns it into a response. ``headers`` carry extras such as
    ``retry-after``.
    """

    # Who was tried, when the router gave up (a ``proxy.context.Served``): the
    # request's Outcome records it; the client is not told.
    served: Any = None

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_ or type_for_status(status)
        self.message = message
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.type, self.message)


def upstream_failure(exc: Any, target: str) -> ProxyError:
    """A failed upstream call (a ``proxy.upstream.UpstreamError``) as the client's answer."""
    if exc.kind == "connect":
        return ProxyError(502, f"upstream {target} is unreachable: {exc.message}", "api_error")
    if exc.kind == "timeout":
        return ProxyError(504, f"upstream {target} timed out: {exc.message}", "timeout_error")
    return ProxyError(502, f"upstream {target} failed: {exc.message}", "api_error")


class _ErrorShape(msgspec.Struct):
    type: str
    error: dict[str, Any]


_error_shape = msgspec.json.Decoder(_ErrorShape)


def is_anthropic_error(body: bytes) -> bool:
    try:
        shaped = _error_shape.decode(body)
    except msgspec.MsgspecError:
        return False
    return shaped.type == "error" and isinstance(shaped.error.get("type"), str) and isinstance(shaped.error.get("message"), str)
