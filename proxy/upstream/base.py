"""The upstream interface: plain data in, a head and a byte stream out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["UpstreamRequest", "UpstreamResponse", "UpstreamError", "read_up_to"]


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
    # The client's own credentials (passthrough mode), forwarded as sent.
    client_credentials: list[tuple[bytes, bytes]] = field(default_factory=list)
    # The client's dialect: "anthropic" (Messages) or "openai" (chat
    # completions). "" derives it from the path, so the one ingress that
    # speaks OpenAI (/v1/chat/completions) needs no flag of its own.
    api: str = ""
    # Scheduler class from the client's x-weir-priority header; interactive
    # unless a client marks itself batch (see proxy/scheduler.py).
    priority: str = "interactive"
    # The request kind (proxy/kinds.py); routes may match on it.
    kind: str = "main"

    def __post_init__(self) -> None:
        if not self.api:
            self.api = "openai" if self.path == "/v1/chat/completions" else "anthropic"


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def aiter(self) -> AsyncIterator[bytes]:
        """Body bytes as the upstream delivers them, one item per read."""
        ...

    async def read(self, limit: int) -> bytes: ...


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
    not the format we expected).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
