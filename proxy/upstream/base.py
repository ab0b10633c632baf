"""The upstream interface: plain data in, a head and a byte stream out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..context import RequestContext, Served

__all__ = ["UpstreamRequest", "UpstreamResponse", "Opener", "UpstreamError", "read_up_to", "ERROR_BODY_LIMIT"]

# Error bodies are read whole (to check or convert their shape); a real one is
# under 1 KiB, and this bounds what a misbehaving upstream can make Weir hold.
ERROR_BODY_LIMIT = 64 * 1024


@dataclass(slots=True)
class UpstreamRequest:
    """A request as the client sent it, in the client's dialect (``api``).

    ``path`` is the API path (``/v1/messages``); ``query`` the raw query
    string (Claude Code sends ``beta=true``). ``headers`` are already filtered
    for the upstream leg, minus credentials, which the target adds.
    """

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stream: bool = False
    model: str = ""
    # The client's dialect: "anthropic" (Messages) or "openai" (chat
    # completions). "" derives it from the path, so the one ingress that
    # speaks OpenAI (/v1/chat/completions) needs no flag of its own.
    api: str = ""
    # An upstream name pins the request to that target alone: a passthrough
    # batch lives at one upstream, which alone knows its id. "" = routed.
    target: str = ""

    def __post_init__(self) -> None:
        if not self.api:
            self.api = "openai" if self.path == "/v1/chat/completions" else "anthropic"


class UpstreamResponse(Protocol):
    """A response head and its body, from whichever layer produced it.

    ``served`` says who answered (target, key, attempts, cache outcome) and,
    once the response closed, the breaker's verdict on the target.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    served: Served

    def aiter(self) -> AsyncIterator[bytes]:
        """Body bytes as the upstream delivers them, one item per read."""
        ...

    async def read(self, limit: int) -> bytes: ...


class Opener(Protocol):
    """The one shape of every layer of the request path, as httpcore layers
    its pool, connection and protocol: the router at the bottom, the cache
    (and the coalescer it drives) above it.

    ``open`` yields the response once its head is known and closes it —
    releasing whatever it held, telling the breaker — when the block ends.
    """

    def open(self, req: UpstreamRequest, ctx: RequestContext) -> AbstractAsyncContextManager[UpstreamResponse]: ...


async def read_up_to(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes of a body, reading no further than needed.

    Every response kind's ``read`` is this over its own ``aiter``: error
    bodies and whole replies are read whole, but never without a bound.
    """
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


class UpstreamError(Exception):
    """The upstream call failed without a usable HTTP response.

    ``kind`` drives the retry policy: ``connect`` (nothing was sent),
    ``timeout``, ``reset`` (connection dropped), ``protocol`` (not HTTP or
    not the format we expected), ``refused`` (Weir's own HTTP client would
    not send the request: the request's fault, never the target's).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
