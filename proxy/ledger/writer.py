"""The ledger's trio shell: one writer per worker, off the hot path.

A finished request calls ``put`` — an append to a list, nothing else; it
never awaits, never blocks and never fails the request. The writer task
(started in the app's lifespan nursery) takes the buffer every
``flush_rows`` rows or ``flush_interval_s``, whichever comes first, and
hands the batch to the store in a worker thread.

When the store is unreachable or slower than ``write_timeout_s``, the batch
is appended to the spool (``proxy.ledger.spool``) instead, and so is every
batch after it until the spool has been replayed — oldest first, with a
backoff between attempts — so rows reach the database in the order they
were written. A write abandoned at its timeout may still commit later;
rows are idempotent by (request id, start time), so its replay is a no-op.

What can be lost, and only this:
- ``kill -9``: the rows buffered since the last flush (≤ ``flush_interval_s``
  of traffic), and the batch in flight to the database if it had not
  committed. SIGTERM flushes everything first.
- a full disk while the database is away: the batch the spool refused,
  counted in ``dropped`` and logged.
- a stalled disk: past ``max_buffer_rows`` new rows are refused, counted
  and logged, so memory stays bounded.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import trio

from .row import LedgerRow
from .spool import Spool, SpoolFull
from .store import LedgerUnavailable, Store

__all__ = ["LedgerWriter"]

log = logging.getLogger("weir.ledger")

# Rows per database write at most (live batches and spool replay alike):
# large batches are what COPY is good at; small enough that one write stays
# well inside write_timeout_s on a busy database and a failed attempt is
# cheap to redo.
_WRITE_BATCH = 5000
_REPLAY_BATCH = _WRITE_BATCH
# Between replay attempts while the database is away: start at a second,
# double to half a minute, so an outage costs a handful of connection
# attempts a minute per worker rather than one per batch.
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
# Retention runs at start and then hourly: daily partitions make finer pointless.
_RETENTION_EVERY_S = 3600.0
# One warning per this many seconds per kind of trouble, not one per batch.
_LOG_EVERY_S = 30.0


class LedgerWriter:
    def __init__(
        self,
        store: Store,
        spool_dir: str,
        *,
        flush_rows: int = 1000,
        flush_interval_s: float = 0.2,
        write_timeout_s: float = 2.0,
        max_buffer_rows: int = 50_000,
        retention_days: int = 30,
        bodies_retention_days: int = 7,
        dlq_retention_days: int = 7,
        clock: Any = time.time,
    ) -> None:
        self.store = store
        self.spool = Spool(spool_dir)
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.write_timeout_s = write_timeout_s
        self.max_buffer_rows = max_buffer_rows
        self.retention = (retention_days, bodies_retention_days, dlq_retention_days)
        self._clock = clock
        self._buffer: list[LedgerRow] = []
        self._full = trio.Event()
        # True while rows go to the spool: the database failed, or the spool
        # still holds rows it has not taken (order matters more than speed).
        self._spooling = False
        self._migrated = False
        self._next_replay = -math.inf
        self._backoff = _BACKOFF_MIN_S
        self._next_retention = -math.inf
        self._logged: dict[str, float] = {}
        # Figures for the admin API and the tests.
        self.written = 0  # rows the database took (new ones)
        self.spooled = 0  # rows appended to the spool
        self.replayed = 0  # rows moved from the spool to the database
        self.dropped = 0  # rows lost: full disk, or the buffer bound
        self.rejected = 0  # rows the database refused on their own (logged by request id)
        self.flushes = 0

    # -- the hot path ------------------------------------------------------------

    def put(self, row: LedgerRow) -> None:
        buf = self._buffer
        if len(buf) >= self.max_buffer_rows:
            self.dropped += 1
            self._warn("buffer", "ledger buffer full (%d rows): the writer is stalled; rows are being dropped", self.max_buffer_rows)
            return
        buf.append(row)
        if len(buf) >= self.flush_rows:
            self._full.set()

    # -- the task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Migrate, then flush until cancelled; on the way out, flush everything."""
        self._spooling = await trio.to_thread.run_sync(self.spool.pending)
        if not await self._migrate():
            # The database is away at start: Weir starts anyway and spools;
            # the schema is brought up to date before the first replay.
            self._spooling = True
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.flush_interval_s):
                    await self._full.wait()
                await self.flush_once()
        finally:
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + max(5.0, 2 * self.write_timeout_s)
                await self._deliver_all()
                await trio.to_thread.run_sync(self.spool.close)

    async def flush_once(self) -> None:
        self._full = trio.Event()
        batch, self._buffer = self._buffer, []
        if batch:
            self.flushes += 1
            await self._deliver(batch)
        now = trio.current_time()
        if self._spooling and now >= self._next_replay:
            await self._replay()
        if now >= self._next_retention and self._migrated:
            self._next_retention = now + _RETENTION_EVERY_S
            await self._retain()

    async def _deliver_all(self) -> None:
        """Shutdown: everything buffered reaches the database or the spool."""
        while self._buffer:
            batch, self._buffer = self._buffer, []
            await self._deliver(batch)

    async def _deliver(self, batch: list[LedgerRow]) -> None:
        # A buffer that grew while a write was in flight goes out in slices:
        # one huge COPY would outlast write_timeout_s and be taken for an outage.
        for i in range(0, len(batch), _WRITE_BATCH):
            chunk = batch[i : i + _WRITE_BATCH]
            if not self._spooling:
                if await self._write(chunk):
                    continue
                self._spooling = True
                self._next_replay = trio.current_time() + self._backoff
            await self._spill(chunk)

    async def _write(self, batch: list[LedgerRow]) -> bool:
        """One database write; False (rows not taken) on an outage or a timeout."""
        with trio.move_on_after(self.write_timeout_s):
            try:
                # Abandoned on timeout: the thread may still commit, and the
                # spool's copy of the batch is then skipped as a duplicate.
                self.written += await trio.to_thread.run_sync(self.store.write, batch, abandon_on_cancel=True)
                return True
            except LedgerUnavailable as exc:
                self._warn("unavailable", "ledger database unavailable, spooling rows to disk: %s", exc)
                return False
            except Exception:
                # Not an outage: something in the batch the database refuses.
                # One row at a time, so one bad row costs only itself.
                log.exception("ledger batch refused; retrying its %d rows one by one", len(batch))
                return await self._write_singly(batch)
        self._warn("timeout", "ledger database slower than %.1f s, spooling rows to disk", self.write_timeout_s)
        return False

    async def _write_singly(self, batch: list[LedgerRow]) -> bool:
        for row in batch:
            try:
                self.written += await trio.to_thread.run_sync(self.store.write, [row])
            except LedgerUnavailable:
                return False  # went away meanwhile: the whole batch is spooled (idempotent)
            except Exception as exc:
                self.rejected += 1
                log.error("ledger row refused by the database, dropped: %s", exc, extra={"request_id": row.request_id})
        return True

    async def _spill(self, batch: list[LedgerRow]) -> None:
        try:
            await trio.to_thread.run_sync(self.spool.append, batch)
            self.spooled += len(batch)
        except (SpoolFull, OSError) as exc:
            self.dropped += len(batch)
            self._warn("spool", "ledger spool cannot take rows (%s): %d rows dropped so far", exc, self.dropped)

    async def _migrate(self) -> bool:
        with trio.move_on_after(max(self.write_timeout_s, 10.0)):
            try:
                await trio.to_thread.run_sync(self.store.migrate, abandon_on_cancel=True)
                self._migrated = True
                return True
            except LedgerUnavailable as exc:
                self._warn("unavailable", "ledger database unavailable at start, spooling rows to disk: %s", exc)
        return False

    async def _replay(self) -> None:
        """Move the spool into the database, oldest segment first."""
        spool = self.spool
        if not self._migrated and not await self._migrate():
            self._next_replay = trio.current_time() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            return
        await trio.to_thread.run_sync(spool.close_segment)
        for name in await trio.to_thread.run_sync(spool.segments):
            seg = await trio.to_thread.run_sync(spool.take, name)
            if seg is None:
                continue  # another worker holds it (appending or replaying)
            try:
                batches = await trio.to_thread.run_sync(lambda: list(seg.batches()))
                rows = [r for b in batches for r in b]
                for i in range(0, len(rows), _REPLAY_BATCH):
                    chunk = rows[i : i + _REPLAY_BATCH]
                    if not await self._write(chunk):
                        self._next_replay = trio.current_time() + self._backoff
                        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
                        return
                    self.replayed += len(chunk)
                    if len(self._buffer) >= self.flush_rows:
                        # Traffic kept coming while we replayed: it joins the spool's tail.
                        batch, self._buffer = self._buffer, []
                        await self._spill(batch)
                await trio.to_thread.run_sync(seg.done)
            finally:
                seg.release()
        if spool.open_rows():
            return  # rows spilled while we replayed: another round, at the next flush
        if self.spooled:
            log.info("ledger spool replayed", extra={"rows": self.replayed})
        self._spooling = False
        self._backoff = _BACKOFF_MIN_S

    async def _retain(self) -> None:
        days, bodies, dlq = self.retention
        now_us = int(self._clock() * 1e6)
        try:
            with trio.move_on_after(60):
                done = await trio.to_thread.run_sync(self.store.retain, now_us, days, bodies, dlq, abandon_on_cancel=True)
                if any(done.values()):
                    log.info("ledger retention", extra={"removed": done})
        except LedgerUnavailable:
            self._next_retention = trio.current_time() + 60.0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def spool_pending(self) -> int:
        """Rows this worker spooled that no one has replayed yet (as far as it knows)."""
        return max(0, self.spooled - self.replayed) if self._spooling else 0

    def stats(self) -> dict:
        return {
            "buffered": len(self._buffer),
            "spooling": self._spooling,
            "written": self.written,
            "spooled": self.spooled,
            "replayed": self.replayed,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "torn_spool_records": self.spool.torn,
        }

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(kind, -math.inf) >= _LOG_EVERY_S:
            self._logged[kind] = now
            log.warning(msg, *args)


