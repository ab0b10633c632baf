"""The ledger's own benchmarks, each short; figures go to loadtests/results/.

* ``writer`` — rows/s into PostgreSQL through ``PostgresStore.write`` (COPY,
  idempotent move, rollup upsert) in the writer's batch size, and into
  SQLite; then bytes per row on disk, without bodies, for both.
* ``outage`` — N requests through a real Weir whose ledger reaches
  PostgreSQL through a TCP forwarder this process owns; the forwarder is cut
  for the middle third of the requests. Counts client errors and the rows
  stored once the spool has drained.
* ``kill9`` — a real ``weir serve`` (SQLite ledger) under steady load,
  ``kill -9``ed; counts the rows lost against one flush interval's worth.

Run: ``.venv/bin/python -m loadtests.bench_ledger writer|outage|kill9|all``.
PostgreSQL from ``WEIR_TEST_DATABASE_URL`` (default the local one); every
run uses a schema of its own and drops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import trio

from proxy.ledger.postgres import PostgresStore
from proxy.ledger.row import LedgerRow
from proxy.ledger.sqlite import SQLiteStore

from loadtests.procs import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get("WEIR_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQ = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'


def _row(i: int, now: int) -> LedgerRow:
    # A typical served row: every field filled as a real request fills it.
    return LedgerRow(
        request_id=f"req_weir_5f2c9a1b7e3d{i:08x}", started_at=now + i, ended_at=now + i + 812_345, tenant=f"team-{i % 20}",
        project="checkout-service", ingress="anthropic", kind="agent", method="POST", path="/v1/messages",
        model="claude-sonnet-4-5-20250929", target="anthropic", served_model="claude-sonnet-4-5-20250929", key_id="anthropic#1:3fa2b9c1",
        status=200, outcome="served", cache="miss", attempts=1, stream=True, input_tokens=1834, output_tokens=412,
        cache_read_tokens=12034, cache_creation_tokens=0, cost_micros=15287, price_version="2026-12-01", queue_us=120,
        upstream_head_us=420_000, first_token_us=431_000, total_us=812_345, overhead_us=640, bytes_in=48213, bytes_out=9121, client="claude-cli",
    )  # fmt: skip


def _drop(schema: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def bench_writer(rows: int, batch: int) -> dict:
    now = int(time.time() * 1e6)
    data = [_row(i, now) for i in range(rows)]
    out: dict = {"rows": rows, "batch": batch}
    schema = f"weir_bench_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(DATABASE_URL, schema=schema)
    try:
        store.migrate()
        store.write(data[:batch])  # warm: partitions, staging table, plans
        t = time.perf_counter()
        for i in range(batch, rows, batch):
            store.write(data[i : i + batch])
        dt = time.perf_counter() - t
        out["postgresql_store_rows_per_s"] = round((rows - batch) / dt)
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(f'VACUUM ANALYZE "{schema}".ledger_requests')
            size = conn.execute(
                "SELECT sum(pg_total_relation_size(c.oid)), sum(pg_relation_size(c.oid)) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace WHERE p.relname = 'ledger_requests' AND n.nspname = %s",
                (schema,),
            ).fetchone()
        out["postgresql_bytes_per_row"] = round(int(size[0]) / rows, 1)  # heap + indexes + TOAST
        out["postgresql_heap_bytes_per_row"] = round(int(size[1]) / rows, 1)
    finally:
        store.close()
        _drop(schema)
    out["postgresql_writer_rows_per_s"] = trio.run(_through_writer, data)
    with tempfile.TemporaryDirectory() as d:
        s = SQLiteStore(os.path.join(d, "ledger.db"))
        s.migrate()
        t = time.perf_counter()
        for i in range(0, rows, batch):
            s.write(data[i : i + batch])
        out["sqlite_rows_per_s"] = round(rows / (time.perf_counter() - t))
        with sqlite3.connect(os.path.join(d, "ledger.db")) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name IN ('ledger_requests', 'ledger_requests_id', 'ledger_requests_started')").fetchone()[0]
        out["sqlite_bytes_per_row"] = round(pages / rows, 1)
        s.close()
    return out


async def _through_writer(data: list[LedgerRow]) -> int:
    """The whole writer (put → batch → thread → COPY) fed as fast as this
    process can: batches grow while a write is in flight, as under real load."""
    from proxy.ledger.writer import LedgerWriter

    schema = f"weir_bench_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(DATABASE_URL, schema=schema)
    with tempfile.TemporaryDirectory() as d:
        w = LedgerWriter(store, d, max_buffer_rows=len(data))
        try:
            async with trio.open_nursery() as n:
                await n.start(w.run)
                t = time.perf_counter()
                for i in range(0, len(data), 500):
                    for r in data[i : i + 500]:
                        w.put(r)
                    await trio.sleep(0)
                while w.written < len(data):
                    await trio.sleep(0.005)
                dt = time.perf_counter() - t
                n.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(store.close)
            await trio.to_thread.run_sync(_drop, schema)
    assert w.spooled == 0 and w.dropped == 0
    return round(len(data) / dt)


def _via(url: str, port: int) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, (p.username + "@" if p.username else "") + f"127.0.0.1:{port}", p.path, p.query, ""))


async def bench_outage(requests: int, concurrency: int) -> dict:
    from tests.harness import weir_and_mock
    from tests.tcpproxy import running_tcp_proxy

    schema = f"weir_bench_{uuid.uuid4().hex[:8]}"
    p = urlsplit(DATABASE_URL)
    errors = 0
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    try:
        async with running_tcp_proxy(p.hostname or "127.0.0.1", p.port or 5432) as tcp:
            with tempfile.TemporaryDirectory() as d:
                sections = dict(
                    server={"data_dir": d},
                    cache={"mode": "off"},
                    ledger={"url": _via(DATABASE_URL, tcp.listen_port), "pg_schema": schema, "write_timeout_s": 1.0},
                )
                async with weir_and_mock(**sections) as (weir, _mock):
                    ledger = weir.app.ledger
                    sent = 0
                    lock = trio.Lock()
                    cut_at, restore_at = requests // 3, 2 * requests // 3

                    async def client() -> None:
                        nonlocal sent, errors
                        async with httpx.AsyncClient(base_url=weir.url, timeout=30) as c:
                            while True:
                                async with lock:
                                    if sent >= requests:
                                        return
                                    sent += 1
                                    n = sent
                                    if n == cut_at:
                                        tcp.cut()
                                    elif n == restore_at:
                                        tcp.restore()
                                try:
                                    r = await c.post("/v1/messages", content=REQ, headers={"x-api-key": "k"})
                                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                                    if r.status_code != 200:
                                        errors += 1
                                except httpx.HTTPError:
                                    errors += 1

                    async with trio.open_nursery() as n:
                        for _ in range(concurrency):
                            n.start_soon(client)
                    traffic_s = time.perf_counter() - t0
                    with trio.fail_after(120):
                        while ledger.writer._spooling or ledger.writer._buffer:
                            await trio.sleep(0.1)
                    drained_s = time.perf_counter() - t0
                    stats = ledger.writer.stats()
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            stored = conn.execute(f'SELECT count(*) FROM "{schema}".ledger_requests').fetchone()[0]
            counted = conn.execute(f'SELECT coalesce(sum(requests), 0) FROM "{schema}".ledger_usage_hourly').fetchone()[0]
    finally:
        await trio.to_thread.run_sync(_drop, schema)
    return {
        "requests": requests, "concurrency": concurrency, "client_errors": errors, "statuses": statuses, "rows_stored": stored,
        "rows_in_rollups": int(counted), "spooled": stats["spooled"], "replayed": stats["replayed"], "dropped": stats["dropped"],
        "traffic_s": round(traffic_s, 2), "all_rows_stored_after_s": round(drained_s, 2),
    }  # fmt: skip


def bench_kill9(seconds: float, clients: int) -> dict:

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "weir.toml"
        cfg.write_text(f'[server]\naccess_log = false\ndata_dir = "{d}/data"\n[cache]\nmode = "off"\n[ledger]\nflush_interval_ms = 200\n')
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(cfg)], cwd=d, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(url, proc):
                raise RuntimeError("weir serve did not become ready")
            done: list[tuple[str, float]] = []

            async def load() -> None:
                end = time.monotonic() + seconds

                async def one() -> None:
                    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
                        while time.monotonic() < end:
                            r = await c.post("/v1/messages", content=REQ, headers={"x-api-key": "k"})
                            done.append((r.headers["x-request-id"], time.monotonic()))

                async with trio.open_nursery() as n:
                    for _ in range(clients):
                        n.start_soon(one)

            trio.run(load)
            killed = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        with sqlite3.connect(f"{d}/data/ledger.db") as conn:
            stored = {r for (r,) in conn.execute("SELECT request_id FROM ledger_requests")}
    lost = [t for rid, t in done if rid not in stored]
    rate = len(done) / seconds
    return {
        "requests": len(done), "req_per_s": round(rate), "rows_lost": len(lost), "one_flush_interval_rows": round(rate * 0.2),
        "oldest_lost_ms_before_kill": round((killed - min(lost)) * 1000) if lost else 0,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["writer", "outage", "kill9", "all"])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ns = ap.parse_args(argv)
    report: dict = {}
    if ns.what in ("writer", "all"):
        report["writer"] = bench_writer(ns.rows, ns.batch)
        print(json.dumps(report["writer"]), flush=True)
    if ns.what in ("outage", "all"):
        report["outage"] = trio.run(bench_outage, ns.requests, ns.concurrency)
        print(json.dumps(report["outage"]), flush=True)
    if ns.what in ("kill9", "all"):
        report["kill9"] = bench_kill9(ns.seconds, 8)
        print(json.dumps(report["kill9"]), flush=True)
    out = ROOT / "loadtests" / "results" / f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
