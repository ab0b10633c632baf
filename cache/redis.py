"""Redis L2: the cluster-wide cache when Weir runs on many hosts.

Entries are plain string keys ``prefix + cache_key`` with a millisecond TTL
(``SET ... PX``), so Redis expires them itself and its own ``maxmemory``
policy (configure ``allkeys-lru`` or ``volatile-lru``) bounds the size; no
bookkeeping of ours can drift from it. Leases are ``prefix + "lease:" + key``
set with ``NX PX``: atomic, and they lapse on their own if the holder dies.

Purge scans ``prefix + tenant_tag + ":*"`` and ``UNLINK``s in batches:
``UNLINK`` frees memory off Redis's main thread and ``SCAN`` never blocks it
the way ``KEYS`` would.

coredis (anyio) runs natively on trio. Since coredis 6 a client must be
entered as an async context manager (its pool runs a task group), so this
backend is one too: enter it in the task that owns the app's lifespan
nursery, before spawning the tasks that share it, and leave it there.
"""

from __future__ import annotations

import math

import coredis
import coredis.exceptions
import trio

from cache.l2 import L2Unavailable

__all__ = ["RedisL2"]

# Everything a sick Redis can throw at us: coredis' own errors (connection
# refused, reset, protocol, busy loading...) and the stdlib ones its transport
# may let through.
_FAILURES = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.TooSlowError)

_SCAN_BATCH = 500  # keys per SCAN/UNLINK round trip: large enough to be quick, small enough not to stall Redis


class RedisL2:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "weir:cache:",
        # A hung Redis (network partition, a blocked main thread) must not
        # hang a request: one round trip on loopback or a LAN is well under
        # 10 ms, so 0.25 s means something is wrong and a miss is cheaper.
        op_timeout: float = 0.25,
        # Connecting is rarer and may involve TLS; still far below any
        # request deadline.
        connect_timeout: float = 1.0,
    ) -> None:
        self._prefix = prefix
        self._lease_prefix = prefix + "lease:"
        self._op_timeout = op_timeout
        # stream_timeout bounds a single socket read inside coredis; the
        # trio.fail_after around each call (op_timeout) bounds the whole
        # operation, retries included. coredis' default retry policy retries
        # connection errors twice, which fits inside op_timeout on loopback.
        self._client = coredis.Redis.from_url(
            url, stream_timeout=op_timeout, connect_timeout=connect_timeout, decode_responses=False
        )
        self._entered = False
        self._hits = 0
        self._misses = 0
        self._errors = 0

    async def __aenter__(self) -> RedisL2:
        await self._client.__aenter__()
        self._entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Must run in the task that entered (coredis' task group rule)."""
        if self._entered:
            self._entered = False
            await self._client.__aexit__(None, None, None)

    async def _call(self, coro_fn, *args, **kwargs):
        if not self._entered:
            raise L2Unavailable("redis L2 is not open (use `async with RedisL2(...)`)")
        try:
            with trio.fail_after(self._op_timeout):
                return await coro_fn(*args, **kwargs)
        except _FAILURES as exc:
            self._errors += 1
            raise L2Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        value = await self._call(self._client.get, self._prefix + key)
        if value is None:
            self._misses += 1
        else:
            self._hits += 1
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        # PX needs a positive integer; round up so a sub-millisecond TTL
        # still stores (and lapses at once) instead of erroring.
        await self._call(self._client.set, self._prefix + key, value, px=max(1, math.ceil(ttl * 1000)))

    async def delete(self, key: str) -> None:
        await self._call(self._client.unlink, [self._prefix + key])

    async def purge(self, tenant_tag: str | None) -> int:
        pattern = self._prefix + (f"{tenant_tag}:*" if tenant_tag is not None else "*")
        deleted = 0
        cursor = None
        while cursor != 0:
            cursor, keys = await self._call(self._client.scan, cursor or 0, match=pattern, count=_SCAN_BATCH)
            # The lease namespace sits under the prefix too; purging entries
            # must not break singleflight in flight.
            keys = [k for k in keys if not k.startswith(self._lease_prefix.encode())]
            if keys:
                deleted += await self._call(self._client.unlink, keys)
        return deleted

    async def claim(self, key: str, lease: float) -> bool:
        won = await self._call(
            self._client.set,
            self._lease_prefix + key,
            b"1",
            condition=coredis.PureToken.NX,
            px=max(1, math.ceil(lease * 1000)),
        )
        return bool(won)

    async def leased(self, key: str) -> bool:
        return bool(await self._call(self._client.exists, [self._lease_prefix + key]))

    async def release(self, key: str) -> None:
        await self._call(self._client.unlink, [self._lease_prefix + key])

    async def stats(self) -> dict:
        # Size and evictions are Redis's own (INFO memory/stats), shared by
        # every user of the server; report only what this worker saw.
        return {"hits": self._hits, "misses": self._misses, "errors": self._errors}
