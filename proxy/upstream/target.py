"""A target: one upstream endpoint, its connection budget and its connection pool.

Requests reach the pool only through the router's per-target scheduler,
whose capacity is ``max_connections``, so no more are in flight than the
pool holds: the pool never queues, and never needs to. docs/ARCHITECTURE.md
has the figures: a client pool queueing 64 requests (httpx's) collapsed to
~350 req/s, and the side-by-side benchmark's profile is why the upstream leg
is its own HTTP/1.1 on trio (``pool.py``, ``http1.py``).
"""

from __future__ import annotations

from typing import Any

from ..settings import DeadlineSettings, UpstreamSettings
from .base import UpstreamRequest
from .pool import ConnectionPool, PooledResponse

__all__ = ["Target"]

# Idle pooled connections: Anthropic's edge closes idle keep-alives after
# about a minute; dropping ours a little earlier avoids racing its close.
_KEEPALIVE_EXPIRY_S = 50.0
# A model list is a few KiB; the probe only needs its status.
_PROBE_BODY_LIMIT = 256 * 1024
# The version every SDK sends by default; the probe needs one to be a valid request.
_ANTHROPIC_VERSION = (b"anthropic-version", b"2023-06-01")


class Target:
    """One upstream endpoint. Owns its pool; the app's lifespan closes it."""

    def __init__(self, settings: UpstreamSettings, *, url: str, keys: list[str], deadlines: DeadlineSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.kind = settings.kind
        self.url = url.rstrip("/")
        self.keys = keys
        self.pool = ConnectionPool(self.url, connect_timeout=deadlines.connect_s, keepalive_expiry=_KEEPALIVE_EXPIRY_S)
        self._extra = [(k.lower().encode(), v.encode()) for k, v in settings.headers.items()]

    def credentials(self, key: str) -> list[tuple[bytes, bytes]]:
        if self.kind == "openai":
            return [(b"authorization", b"Bearer " + key.encode())]
        return [(b"x-api-key", key.encode())]

    def open(self, req: UpstreamRequest, *, credentials: list[tuple[bytes, bytes]]) -> _Exchange:
        """Send ``req``; the context manager's value is the response once its head arrived.

        The slot is held until the body is consumed or abandoned, because the
        connection is busy until then. Raises ``UpstreamError`` when no head
        could be had.
        """
        return _Exchange(self.pool, req, req.headers + credentials + self._extra)

    async def probe_key(self, key: str) -> int:
        """The status of the cheapest authenticated request there is — the
        model list, with ``key`` — to tell a revoked key (401/403 here too)
        from a request the upstream refused for its own reasons.

        Anthropic: ``GET /v1/models?limit=1``; OpenAI-compatible: ``GET
        /models`` under the base URL (which ends in ``/v1``). Raises
        ``UpstreamError`` when no answer came.
        """
        if self.kind == "openai":
            target, headers = b"/models", [(b"authorization", b"Bearer " + key.encode())]
        else:
            target, headers = b"/v1/models?limit=1", [(b"x-api-key", key.encode()), _ANTHROPIC_VERSION]
        resp = await self.pool.request(b"GET", target, [(b"accept-encoding", b"identity"), *headers, *self._extra], b"")
        try:
            await resp.read(_PROBE_BODY_LIMIT)  # read to the end, so the connection goes back to the pool
        finally:
            self.pool.release(resp)
        return resp.status

    async def aclose(self) -> None:
        await self.pool.aclose()


class _Exchange:
    """One request on the target's pool; the connection goes back (or is
    closed, mid-message) when the block ends. A class, not
    ``@asynccontextmanager``, for the hot path (see ``Router.open``)."""

    __slots__ = ("_pool", "_req", "_headers", "_resp")

    def __init__(self, pool: ConnectionPool, req: UpstreamRequest, headers: list[tuple[bytes, bytes]]) -> None:
        self._pool, self._req, self._headers = pool, req, headers
        self._resp: PooledResponse | None = None

    async def __aenter__(self) -> PooledResponse:
        req = self._req
        target = req.path.encode() + (b"?" + req.query if req.query else b"")
        self._resp = await self._pool.request(req.method.encode(), target, self._headers, req.body)
        return self._resp

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if self._resp is not None:
            self._pool.release(self._resp)
        return False
