"""The ledger's service: ``serve_ledger`` runs the writer in the app's lifespan
nursery and hands back the ``Ledger`` the app and the admin API use."""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from .prices import PriceTable, load_prices
from .row import Bodies, DeadLetter, LedgerRow
from .store import GROUPS, LedgerUnavailable, Query, Store
from .writer import LedgerWriter

__all__ = ["Ledger", "LedgerRow", "Bodies", "DeadLetter", "Query", "LedgerUnavailable", "GROUPS", "serve_ledger", "open_store"]

log = logging.getLogger("weir.ledger")

# Admin reads wait at most this for the database; past it, a 503.
_READ_TIMEOUT_S = 10.0


def open_store(url: str, data_dir: str, *, pg_schema: str = "public", pg_max_connections: int = 4) -> Store:
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, schema=pg_schema, max_connections=pg_max_connections)
    from .sqlite import SQLiteStore

    return SQLiteStore(os.path.join(data_dir, "ledger.db"))


class Ledger:
    """What the app holds: ``put`` for the hot path, async reads for the admin API."""

    def __init__(self, store: Store, writer: LedgerWriter, prices: PriceTable, *, bodies: str = "off", body_limit: int = 256 * 1024) -> None:
        self.store = store
        self.writer = writer
        self.prices = prices
        self.bodies = bodies
        self.body_limit = body_limit
        self.put = writer.put

    async def read(self, fn: Any, *args: Any) -> Any:
        """A store call in a thread; ``LedgerUnavailable`` when it fails or takes too long."""
        with trio.move_on_after(_READ_TIMEOUT_S):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        raise LedgerUnavailable(f"the ledger database did not answer within {_READ_TIMEOUT_S:g} s")

    async def requests(self, q: Query) -> list[dict]:
        return await self.read(self.store.requests, q)

    async def request(self, request_id: str) -> dict | None:
        return await self.read(self.store.request, request_id)

    async def usage(self, group: str, since: int | None, until: int | None) -> list[dict]:
        return await self.read(self.store.usage, group, since, until)

    async def usage_by_batch(self, batch_id: str | None, since: int | None, until: int | None) -> list[dict]:
        return await self.read(self.store.usage_by_batch, batch_id, since, until)

    async def dlq_list(self, limit: int, since: int | None) -> list[dict]:
        return await self.read(self.store.dlq_list, limit, since)

    async def dlq_get(self, entry_id: str) -> dict | None:
        return await self.read(self.store.dlq_get, entry_id)

    async def dlq_mark(self, entry_id: str, request_id: str, status: int, at: int) -> None:
        await self.read(self.store.dlq_mark, entry_id, request_id, status, at)

    async def size(self) -> dict:
        return await self.read(self.store.size)

    def stats(self) -> dict:
        return {"backend": self.store.kind, "price_version": self.prices.version, "bodies": self.bodies, **self.writer.stats()}


async def serve_ledger(settings: Any, data_dir: str, *, task_status: trio.TaskStatus[Ledger | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the ledger until cancelled; start with the ``Ledger``, or None when off.

    ``settings`` is the ``[ledger]`` section. Cancelling flushes every
    buffered row to the database or the spool before this returns.
    """
    if settings.url == "off":
        task_status.started(None)
        return
    prices = load_prices(settings.prices_path, settings.prices)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    store = open_store(settings.url, data_dir, pg_schema=settings.pg_schema, pg_max_connections=settings.pg_max_connections)
    writer = LedgerWriter(
        store,
        os.path.join(data_dir, "ledger-spool"),
        flush_rows=settings.flush_rows,
        flush_interval_s=settings.flush_interval_ms / 1000.0,
        write_timeout_s=settings.write_timeout_s,
        max_buffer_rows=settings.max_buffer_rows,
        retention_days=settings.retention_days,
        bodies_retention_days=settings.bodies_retention_days,
        dlq_retention_days=settings.dlq_retention_days,
    )
    ledger = Ledger(store, writer, prices, bodies=settings.bodies, body_limit=settings.body_limit_bytes)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            task_status.started(ledger)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
