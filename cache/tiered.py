"""The tiered cache: L1 in the process, L2 shared, one face for the proxy.

Reads go L1 then L2; an L2 hit is promoted into L1 for the rest of its life.
Writes land in L1 at once and reach L2 in the background: a response must
never wait on, or fail because of, a shared store. So:

- ``L2Unavailable`` is a miss, counted in ``l2_errors`` and logged at most
  once per ``error_log_interval`` (a dead Redis would otherwise log once per
  request and drown the log it is trying to warn through).
- A corrupt L2 value is a miss, logged, and deleted in the background so the
  next reader does not trip on it again.
- L2 writes run as tasks in the nursery the owner passes in (the app's
  lifespan nursery); at most ``max_pending_writes`` at once, beyond that a
  write is dropped and counted — if L2 is that slow, queueing more only adds
  memory and staleness.

Entries carry wall-clock ``created_at`` (L2 is shared across processes), so
this layer needs a wall clock to compute an entry's remaining life on
promotion; L1's own timer (``trio.current_time`` in the app) then takes over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from cache.entry import CorruptEntry, Entry, decode_entry, encode_entry
from cache.l1 import L1Cache
from cache.l2 import L2Backend, L2Unavailable

__all__ = ["TieredCache"]


class TieredCache:
    def __init__(
        self,
        l1: L1Cache,
        l2: L2Backend | None,
        *,
        nursery: trio.Nursery,
        log: logging.Logger | None,
        # A few hundred in-flight writes is seconds of fill traffic at our
        # measured request rates (~1k req/s per worker); more means L2 is
        # stalled, and waiting writes would only pile up memory.
        max_pending_writes: int = 256,
        # One warning per 30 s is enough to notice a dead L2 in the logs
        # without a log line per request while it stays dead.
        error_log_interval: float = 30.0,
        # Wall clock for entry ages (see module docstring).
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._l1 = l1
        self._l2 = l2
        self._nursery = nursery
        self._log = log
        self._max_pending = max_pending_writes
        self._error_log_interval = error_log_interval
        self._wall = wall_clock
        self._pending = 0
        self._l2_hits = 0
        self._l2_misses = 0
        self._l2_errors = 0
        self._l2_corrupt = 0
        self._dropped_writes = 0
        self._last_error_log: float | None = None

    # -- reads -------------------------------------------------------------

    async def get(self, key: str) -> tuple[Entry, str] | None:
        entry = self._l1.get(key)
        if entry is not None:
            return entry, "l1"
        if self._l2 is None:
            return None
        entry = await self._get_l2(key)
        return (entry, "l2") if entry is not None else None

    async def _get_l2(self, key: str) -> Entry | None:
        try:
            blob = await self._l2.get(key)
        except L2Unavailable as exc:
            self._l2_unavailable("get", exc)
            return None
        if blob is None:
            self._l2_misses += 1
            return None
        try:
            entry = decode_entry(blob)
        except CorruptEntry as exc:
            self._l2_corrupt += 1
            self._l2_misses += 1
            if self._log is not None:
                self._log.warning("cache: corrupt L2 entry %s deleted (%s)", key, exc)
            self._nursery.start_soon(self._delete_l2, key)
            return None
        remaining = entry.created_at + entry.ttl - self._wall()
        if remaining <= 0:
            # L2's expiry and ours disagree by clock skew between hosts.
            self._l2_misses += 1
            return None
        self._l2_hits += 1
        self._l1.set_encoded(key, blob, remaining)
        return entry

    async def wait_filled(self, key: str, *, poll: float, timeout: float) -> Entry | None:
        """Cross-worker singleflight, follower side: another worker holds the
        lease on ``key`` and is fetching it. Poll until the entry shows up
        (return it), the lease is gone without an entry (the leader failed or
        the reply was not cacheable: return None, go upstream yourself), or
        ``timeout`` passes (None)."""
        if self._l2 is None:
            return None
        with trio.move_on_after(timeout):
            while True:
                found = await self.get(key)
                if found is not None:
                    return found[0]
                try:
                    held = await self._l2.leased(key)
                except L2Unavailable as exc:
                    self._l2_unavailable("leased", exc)
                    return None
                if not held:
                    # The leader may have written and released between our
                    # get and this check: look once more before giving up.
                    found = await self.get(key)
                    return found[0] if found is not None else None
                await trio.sleep(poll)
        return None

    # -- writes ------------------------------------------------------------

    def set(self, key: str, entry: Entry) -> None:
        """Store now in L1, schedule the L2 write, return at once."""
        blob = encode_entry(entry)
        self._l1.set_encoded(key, blob, entry.ttl)
        if self._l2 is None:
            return
        if self._pending >= self._max_pending:
            self._dropped_writes += 1
            return
        self._pending += 1
        self._nursery.start_soon(self._write_l2, key, blob, entry.ttl)

    async def _write_l2(self, key: str, blob: bytes, ttl: float) -> None:
        try:
            await self._l2.set(key, blob, ttl)
        except L2Unavailable as exc:
            self._l2_unavailable("set", exc)
        finally:
            self._pending -= 1

    async def _delete_l2(self, key: str) -> None:
        try:
            await self._l2.delete(key)
        except L2Unavailable as exc:
            self._l2_unavailable("delete", exc)

    async def delete(self, key: str) -> None:
        self._l1.delete(key)
        if self._l2 is not None:
            await self._delete_l2(key)

    async def purge(self, tenant_tag: str | None) -> int:
        """Returns the number of entries removed from L2 (the shared truth),
        or from L1 when there is no L2. Raises ``L2Unavailable``: an operator
        asking for a purge must learn that it did not happen."""
        dropped = self._l1.purge(tenant_tag)
        if self._l2 is None:
            return dropped
        return await self._l2.purge(tenant_tag)

    # -- singleflight passthroughs -------------------------------------------

    async def claim(self, key: str, lease: float) -> bool:
        """True when this worker should fill ``key``. With no L2, or L2 down,
        every worker fills for itself (the in-process coalescer still merges
        a worker's own duplicates): a sick L2 must not stall requests."""
        if self._l2 is None:
            return True
        try:
            return await self._l2.claim(key, lease)
        except L2Unavailable as exc:
            self._l2_unavailable("claim", exc)
            return True

    async def release(self, key: str) -> None:
        if self._l2 is None:
            return
        try:
            await self._l2.release(key)
        except L2Unavailable as exc:
            # The lease lapses on its own; followers wait at most that long.
            self._l2_unavailable("release", exc)

    # -- observability -------------------------------------------------------

    def _l2_unavailable(self, op: str, exc: L2Unavailable) -> None:
        self._l2_errors += 1
        if self._log is None:
            return
        now = trio.current_time()
        if self._last_error_log is None or now - self._last_error_log >= self._error_log_interval:
            self._last_error_log = now
            self._log.warning("cache: L2 unavailable on %s, serving from L1 only (%s errors so far): %s",
                              op, self._l2_errors, exc)

    async def stats(self) -> dict:
        l2: dict = {
            "hits": self._l2_hits,
            "misses": self._l2_misses,
            "l2_errors": self._l2_errors,
            "corrupt": self._l2_corrupt,
            "dropped_writes": self._dropped_writes,
            "pending_writes": self._pending,
        }
        if self._l2 is not None:
            try:
                backend = await self._l2.stats()
            except L2Unavailable as exc:
                self._l2_unavailable("stats", exc)
            else:
                for name in ("entries", "bytes", "max_bytes", "evictions"):
                    if name in backend:
                        l2[name] = backend[name]
        return {"l1": self._l1.stats(), "l2": l2}
