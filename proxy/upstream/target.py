"""A target: one upstream endpoint, its connection budget and its HTTP client.

The in-flight cap in front of httpx equals httpx's pool size, so a request
that gets past the cap always finds a connection and httpx never queues
waiters. ARCHITECTURE.md measured why: httpcore scans its pool per waiter,
and 64 requests queued on one client collapse to ~350 req/s with a 1.3 s
p99, where the same load capped at the pool holds ~1,000 req/s. The queue in
front of the cap is the scheduler's (fair, deadline-aware), never httpx's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from ..settings import DeadlineSettings, UpstreamSettings
from .base import UpstreamError, UpstreamRequest, UpstreamResponse

__all__ = ["Target", "HttpxResponse"]

# Idle pooled connections: Anthropic's edge closes idle keep-alives after
# about a minute; dropping ours a little earlier avoids racing its close.
_KEEPALIVE_EXPIRY_S = 50.0


class HttpxResponse:
    """An httpx streaming response seen through the upstream interface."""

    __slots__ = ("status", "headers", "_resp")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        # httpcore hands back the names as the server spelled them; ASGI wants lowercase.
        self.headers = [(n.lower(), v) for n, v in resp.headers.raw]

    async def aiter(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamError("timeout", f"upstream read timed out: {exc}") from None
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            raise UpstreamError("reset", f"upstream connection broke mid-response: {exc or type(exc).__name__}") from None

    async def read(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.aiter():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        return b"".join(parts)[:limit]

    async def aclose(self) -> None:
        await self._resp.aclose()


class Target:
    """One upstream endpoint. Owns its httpx client; the app's lifespan closes it."""

    def __init__(self, settings: UpstreamSettings, *, url: str, keys: list[str], deadlines: DeadlineSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.kind = settings.kind
        self.url = url.rstrip("/")
        self.keys = keys
        n = settings.max_connections
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=_KEEPALIVE_EXPIRY_S),
            # Only connect is httpx's to time: reads are bounded by the
            # request's trio cancel scopes (first byte, idle, total), and the
            # pool never waits because of the cap below.
            timeout=httpx.Timeout(connect=deadlines.connect_s, read=None, write=None, pool=None),
            follow_redirects=False,
            trust_env=False,
        )
        self.limiter = trio.CapacityLimiter(n)
        self._extra = [(k.lower().encode(), v.encode()) for k, v in settings.headers.items()]
        self.in_flight = 0

    def credentials(self, key: str) -> list[tuple[bytes, bytes]]:
        if self.kind == "openai":
            return [(b"authorization", b"Bearer " + key.encode())]
        return [(b"x-api-key", key.encode())]

    def upstream_url(self, path: str, query: bytes) -> str:
        # An Anthropic base URL has no /v1 (ANTHROPIC_BASE_URL convention);
        # an OpenAI base URL ends in /v1 (OPENAI_BASE_URL convention).
        url = self.url + path
        return url + "?" + query.decode("latin-1") if query else url

    @asynccontextmanager
    async def open(self, req: UpstreamRequest, *, credentials: list[tuple[bytes, bytes]]) -> AsyncIterator[UpstreamResponse]:
        """Send ``req`` and yield the response once its head arrived.

        The slot is held until the body is consumed or abandoned, because the
        connection is busy until then.
        """
        async with self.limiter:
            self.in_flight += 1
            try:
                request = httpx.Request(
                    req.method,
                    self.upstream_url(req.path, req.query),
                    headers=req.headers + credentials + self._extra,
                    content=req.body,
                )
                try:
                    resp = await self.client.send(request, stream=True)
                except httpx.ConnectTimeout as exc:
                    raise UpstreamError("connect", f"connecting to upstream {self.name} timed out") from exc
                except httpx.ConnectError as exc:
                    raise UpstreamError("connect", f"cannot connect to upstream {self.name}: {exc}") from exc
                except httpx.TimeoutException as exc:
                    raise UpstreamError("timeout", f"upstream {self.name} timed out: {exc}") from exc
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
                    raise UpstreamError("reset", f"upstream {self.name} closed the connection: {exc or type(exc).__name__}") from exc
                wrapped = HttpxResponse(resp)
                try:
                    yield wrapped
                finally:
                    with trio.CancelScope(shield=True):
                        await resp.aclose()
            finally:
                self.in_flight -= 1

    async def aclose(self) -> None:
        await self.client.aclose()
