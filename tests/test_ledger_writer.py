"""The writer: batches by rows or time, flushes on the way out, and keeps every
row through a database outage by spooling — with PostgreSQL made unreachable
by a TCP forwarder the test owns (the machine's service is never touched).

Real time, not MockClock: the writer waits on worker threads, and an
autojumping clock would fire its write timeouts while a thread works.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit, urlunsplit

import trio

from proxy.ledger.postgres import PostgresStore
from proxy.ledger.row import LedgerRow
from proxy.ledger.spool import Spool
from proxy.ledger.sqlite import SQLiteStore
from proxy.ledger.store import Query
from proxy.ledger.writer import LedgerWriter
from tests.tcpproxy import running_tcp_proxy

T0 = int(time.time() * 1e6)  # recent: the writer's retention runs at start


def row(i: int, **kw) -> LedgerRow:
    return LedgerRow(request_id=f"req_{i}", started_at=T0 + i, tenant=f"t{i % 2}", status=200, input_tokens=1, cost_micros=3, **kw)


async def until(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(pred):
            await trio.sleep(0.02)


def count(store) -> int:
    return sum(u["requests"] for u in store.usage("tenant", None, None))


async def test_a_full_batch_is_written_at_once(tmp_path):
    store = SQLiteStore(str(tmp_path / "l.db"))
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_rows=10, flush_interval_s=30.0)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        for i in range(10):
            w.put(row(i))
        await until(lambda: count(store) == 10, timeout=5)  # long before the 30 s interval
        assert w.flushes == 1
        n.cancel_scope.cancel()


async def test_a_partial_batch_is_written_within_the_interval(tmp_path):
    store = SQLiteStore(str(tmp_path / "l.db"))
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_rows=1000, flush_interval_s=0.05)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        for i in range(3):
            w.put(row(i))
        await until(lambda: count(store) == 3, timeout=5)
        n.cancel_scope.cancel()


async def test_cancelling_the_writer_flushes_every_buffered_row(tmp_path):
    store = SQLiteStore(str(tmp_path / "l.db"))
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_rows=100_000, flush_interval_s=60.0, max_buffer_rows=100_000)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        for i in range(5000):
            w.put(row(i))
        n.cancel_scope.cancel()
    assert count(store) == 5000


async def test_the_buffer_is_bounded_and_overflow_is_counted(tmp_path):
    store = SQLiteStore(str(tmp_path / "l.db"))
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_rows=10, max_buffer_rows=20)
    for i in range(25):  # the writer is not running: nothing drains the buffer
        w.put(row(i))
    assert w.dropped == 5 and len(w._buffer) == 20


async def test_rows_spooled_by_a_dead_worker_are_replayed_at_start(tmp_path):
    dead = Spool(str(tmp_path / "spool"))
    dead.append([row(i) for i in range(50)])
    dead.close_segment()  # what kill -9 leaves: a closed, unlocked segment
    store = SQLiteStore(str(tmp_path / "l.db"))
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_interval_s=0.05)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await until(lambda: count(store) == 50)
        await until(lambda: not os.listdir(tmp_path / "spool"))
        n.cancel_scope.cancel()
    assert w.replayed == 50


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = (parts.username + "@" if parts.username else "") + f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


async def test_outage_drill_every_row_arrives_once(database_url, pg_schema, tmp_path):
    """The database goes away for the middle third of the traffic: rows spool
    to disk, nothing blocks the producer, and every row arrives exactly once."""
    parts = urlsplit(database_url)
    async with running_tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as tcp:
        store = PostgresStore(_via(database_url, tcp.listen_port), schema=pg_schema, connect_timeout_s=1.0)
        w = LedgerWriter(store, str(tmp_path / "spool"), flush_rows=100, flush_interval_s=0.05, write_timeout_s=1.0)
        async with trio.open_nursery() as n:
            await n.start(w.run)
            total = 3000
            for i in range(total):
                if i == total // 3:
                    tcp.cut()
                if i == 2 * total // 3:
                    await until(lambda: w.spooled > 0)  # the outage was noticed: rows went to disk
                    tcp.restore()
                w.put(row(i))
                if i % 50 == 0:
                    await trio.sleep(0.01)
            await until(lambda: not w._spooling and not w._buffer, timeout=30)
            n.cancel_scope.cancel()
        assert w.dropped == 0
        # In a thread: the store's connections go through the forwarder, which runs in this trio run.
        assert await trio.to_thread.run_sync(count, store) == total  # rollups counted each row once
        assert len(await trio.to_thread.run_sync(store.requests, Query(limit=10_000))) == total
        await trio.to_thread.run_sync(store.close)


async def test_the_database_may_be_away_at_start(database_url, pg_schema, tmp_path):
    parts = urlsplit(database_url)
    async with running_tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as tcp:
        tcp.cut()
        store = PostgresStore(_via(database_url, tcp.listen_port), schema=pg_schema, connect_timeout_s=1.0)
        w = LedgerWriter(store, str(tmp_path / "spool"), flush_interval_s=0.05, write_timeout_s=1.0)
        async with trio.open_nursery() as n:
            await n.start(w.run)  # starts anyway
            for i in range(20):
                w.put(row(i))
            await until(lambda: w.spooled == 20)
            tcp.restore()
            await until(lambda: not w._spooling, timeout=30)
            n.cancel_scope.cancel()
        assert await trio.to_thread.run_sync(count, store) == 20
        await trio.to_thread.run_sync(store.close)


async def test_a_row_the_database_refuses_costs_only_itself(database_url, pg_schema, tmp_path):
    store = PostgresStore(database_url, schema=pg_schema)
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_interval_s=0.05)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        w.put(row(1))
        w.put(row(2, model="nul\x00byte"))  # PostgreSQL text cannot hold NUL
        w.put(row(3))
        await until(lambda: w.rejected == 1 and count(store) == 2)
        n.cancel_scope.cancel()
    assert not w._spooling
    store.close()


async def test_rows_spilled_during_a_replay_are_replayed_too(tmp_path):
    """Traffic that arrives while the spool is being replayed joins the spool's
    tail; the writer keeps replaying until that tail is in the database too."""
    spool = Spool(str(tmp_path / "spool"))
    spool.append([row(i) for i in range(12_000)])  # several replay slices
    spool.close_segment()
    store = SQLiteStore(str(tmp_path / "l.db"))
    w = LedgerWriter(store, str(tmp_path / "spool"), flush_rows=10, flush_interval_s=0.01)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        for i in range(12_000, 12_400):
            w.put(row(i))
            if i % 20 == 0:
                await trio.sleep(0)
        await until(lambda: count(store) == 12_400, timeout=30)
        await until(lambda: not w._spooling)
        n.cancel_scope.cancel()
    assert not os.listdir(tmp_path / "spool")
