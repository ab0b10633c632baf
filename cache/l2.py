"""The L2 interface: what the tiered cache needs from a shared store.

L2 is shared by every worker process on a host (SQLite) or every host
(Redis), so it also carries the cross-worker singleflight lease: the worker
that wins ``claim`` fetches from upstream, the others ``wait_filled``.

Values are opaque bytes (``cache.entry.encode_entry``): a backend never
decodes, so a corrupt value is the tiered cache's to detect.

Every backend failure — locked database, Redis down, a timeout — surfaces as
``L2Unavailable`` and nothing else, so the tiered cache can degrade to L1 with
one except clause and never fail a request because its cache is sick.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["L2Backend", "L2Unavailable"]


class L2Unavailable(Exception):
    """The backend could not answer in time; treat as a miss and move on."""


@runtime_checkable
class L2Backend(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def purge(self, tenant_tag: str | None) -> int:
        """Delete every entry (``None``) or those whose key starts with
        ``tenant_tag + ":"``; returns how many were deleted."""
        ...

    async def claim(self, key: str, lease: float) -> bool:
        """True if this caller won the right to fill ``key`` for ``lease``
        seconds; an expired lease may be claimed again (its holder died)."""
        ...

    async def release(self, key: str) -> None: ...

    async def leased(self, key: str) -> bool:
        """Whether a live lease on ``key`` exists: a follower stops waiting
        once the leader released (filled or gave up) or its lease lapsed."""
        ...

    async def stats(self) -> dict: ...

    async def aclose(self) -> None: ...
