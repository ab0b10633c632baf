"""route: a requested model → the target that serves it.

This first version sends everything to the first upstream; model routes,
fallback chains, key pools, breakers, retries and the per-target scheduler
grow here, behind the same ``open`` interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .auth import Identity
from .relay import Deadlines, Exchange, upstream_failure
from .settings import Settings
from .upstream import Target, UpstreamError, UpstreamRequest, UpstreamResponse

__all__ = ["Router"]


class Router:
    def __init__(self, settings: Settings, targets: list[Target]) -> None:
        self.settings = settings
        self.targets = targets

    @asynccontextmanager
    async def open(self, req: UpstreamRequest, *, ident: Identity, ex: Exchange, deadlines: Deadlines) -> AsyncIterator[UpstreamResponse]:
        """Yield the upstream response once its head arrived (any status).

        Raises ``ProxyError`` when no target could produce a response head.
        Runs inside the caller's deadline scope.
        """
        target = self.targets[0]
        ex.target = target.name
        credentials = [] if ident.passthrough or not target.keys else target.credentials(target.keys[0])
        try:
            async with target.open(req, credentials=credentials) as resp:
                yield resp
        except UpstreamError as exc:
            if ex.head_sent:
                raise
            raise upstream_failure(exc, target.name) from None
