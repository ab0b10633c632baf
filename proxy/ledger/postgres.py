"""The ledger on PostgreSQL: many workers on many hosts, one database.

psycopg 3's sync pool called from trio through ``trio.to_thread`` (the
writer's shell; proxy/pg_conns.py, shared with the batch store). A batch is
one transaction:

1. ``COPY`` the batch straight into the partitioned table — COPY is the
   fastest way into PostgreSQL and needs no per-row round trip — and add it
   to the hourly usage rollup with ``INSERT … ON CONFLICT DO UPDATE``;
2. if any row is already stored (a replayed spool batch, a write abandoned
   at its timeout that committed after all, two workers replaying one
   orphaned segment), the unique key refuses the COPY and the batch takes
   the slow path: COPY into a temporary staging table, then ``INSERT …
   SELECT … ON CONFLICT DO NOTHING RETURNING``, so only the rows that were
   new are stored and counted — replays never double the usage.

Rollup rows are upserted *sorted by key*: N writers updating the same rollup
rows take their row locks in the same order, so they queue instead of
deadlocking (LiteLLM's 10-instance spend-update deadlock).

Rows and bodies are partitioned by UTC day on ``started_at``: retention drops
whole partitions (instant, no dead tuples, no index bloat — the failure mode
of retention by ``DELETE`` on a big table). The dead-letter queue is small
and deletes in chunks.
"""

from __future__ import annotations

import json
import operator
import time
from datetime import datetime, timezone
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from ..migrations import apply_migrations
from ..pg_conns import PGPool
from .row import COLUMNS, V1_COLUMNS, LedgerRow
from .store import COUNTERS, DAY_US, GROUPS, HOUR_US, MAX_REQUEST_US, LedgerUnavailable, Query, dlq_id, rollup, usage_out

__all__ = ["PostgresStore"]


# Column types and order for PostgreSQL: widest first, so no byte is lost to
# alignment padding, and each as narrow as its values allow (durations in µs
# fit int4 up to 35 minutes; values past a type's range are clamped when the
# row is built, in proxy/ledger/capture.py). A row without bodies is ~330
# bytes of heap; narrowing and ordering saved ~80 bytes a row over bigints.
_BIGINT = ("started_at", "ended_at", "cost_micros")
_INT4 = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "queue_us", "upstream_head_us", "first_token_us", "total_us", "overhead_us", "bytes_in", "bytes_out")
_INT2 = ("status", "attempts", "failover")
_BOOL = ("stream",)
TABLE_COLUMNS: tuple[str, ...] = _BIGINT + _INT4 + _INT2 + _BOOL + tuple(c for c in COLUMNS if c not in (*_BIGINT, *_INT4, *_INT2, *_BOOL))


def _requests_ddl() -> str:
    def typ(c: str) -> str:
        return "bigint" if c in _BIGINT else "integer" if c in _INT4 else "smallint" if c in _INT2 else "boolean" if c in _BOOL else "text"

    # Migration 1's table, as it was: later migrations append their columns.
    cols = ", ".join(f"{c} {typ(c)} NOT NULL" for c in TABLE_COLUMNS if c in V1_COLUMNS)
    return f"CREATE TABLE ledger_requests ({cols}, PRIMARY KEY (request_id, started_at)) PARTITION BY RANGE (started_at)"


MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        _requests_ddl()
        + """;
CREATE INDEX ledger_requests_started ON ledger_requests USING brin (started_at);
CREATE TABLE ledger_bodies (
    request_id text NOT NULL, started_at bigint NOT NULL, request bytea NOT NULL, response bytea NOT NULL,
    PRIMARY KEY (request_id, started_at)
) PARTITION BY RANGE (started_at);
CREATE TABLE ledger_dlq (
    id text PRIMARY KEY, request_id text NOT NULL, started_at bigint NOT NULL,
    tenant text NOT NULL, model text NOT NULL, status integer NOT NULL, error_type text NOT NULL,
    method text NOT NULL, path text NOT NULL, query text NOT NULL, headers text NOT NULL, body bytea NOT NULL,
    replayed_request_id text NOT NULL DEFAULT '', replayed_status integer NOT NULL DEFAULT 0, replayed_at bigint NOT NULL DEFAULT 0
);
CREATE INDEX ledger_dlq_started ON ledger_dlq (started_at);
CREATE TABLE ledger_usage_hourly (
    hour bigint NOT NULL, tenant text NOT NULL, project text NOT NULL, model text NOT NULL, kind text NOT NULL, target text NOT NULL,
    requests bigint NOT NULL, errors bigint NOT NULL, input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,
    cache_read_tokens bigint NOT NULL, cache_creation_tokens bigint NOT NULL, cost_micros bigint NOT NULL,
    PRIMARY KEY (hour, tenant, project, model, kind, target)
);
""",
    ),
    (
        # Batch items' rows carry their batch (proxy/batches/): a text column
        # with a constant default is added without rewriting a partition, and
        # the partial index costs the rows of ordinary requests ('') nothing.
        2,
        """
ALTER TABLE ledger_requests ADD COLUMN batch_id text NOT NULL DEFAULT '';
CREATE INDEX ledger_requests_batch ON ledger_requests (batch_id) WHERE batch_id <> '';
""",
    ),
]

ROLLUP_RETENTION_DAYS = 400
# /admin/requests without ``since`` lists the last week.
_DEFAULT_WINDOW_US = 7 * DAY_US
_DLQ_CHUNK = 5000
# A stable key for the advisory lock that serialises migrations and
# partition creation across every writer on every host.
_LOCK_KEY = 0x5745_4952  # "WEIR"

_COLS = ", ".join(TABLE_COLUMNS)
_OUT_COLS = ", ".join(COLUMNS)
_ROLLUP_KEY = f"started_at - started_at % {HOUR_US}, tenant, project, CASE WHEN served_model <> '' THEN served_model ELSE model END, kind, split_part(target, ':', 1)"
_UPSERT = (
    "INSERT INTO ledger_usage_hourly VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
    " ON CONFLICT (hour, tenant, project, model, kind, target) DO UPDATE SET "
    + ", ".join(f"{c} = ledger_usage_hourly.{c} + excluded.{c}" for c in COUNTERS)
)
_MOVE = f"""
WITH ins AS (
    INSERT INTO ledger_requests ({_COLS}) SELECT {_COLS} FROM ledger_stage
    ON CONFLICT DO NOTHING
    RETURNING started_at, tenant, project, model, served_model, kind, target, status,
              input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens, cost_micros, request_id
), up AS (
    INSERT INTO ledger_usage_hourly
    SELECT {_ROLLUP_KEY}, count(*), count(*) FILTER (WHERE status >= 400 OR status = 0),
           sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_creation_tokens), sum(cost_micros)
    FROM ins GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (hour, tenant, project, model, kind, target) DO UPDATE SET
    {", ".join(f"{c} = ledger_usage_hourly.{c} + excluded.{c}" for c in COUNTERS)}
)
SELECT request_id, started_at FROM ins
"""


class PostgresStore:
    kind = "postgresql"

    def __init__(self, url: str, *, schema: str = "public", max_connections: int = 4, connect_timeout_s: float = 3.0) -> None:
        self.url = url
        self.schema = schema
        self._partitions: set[tuple[str, int]] = set()
        self._pool = PGPool(
            url, schema=schema, max_connections=max_connections, connect_timeout_s=connect_timeout_s, name="weir-ledger", unavailable=LedgerUnavailable
        )

    def _call(self, fn: Any, *args: Any) -> Any:
        return self._pool.call(fn, *args)

    def open(self) -> None:
        self._pool.open()

    # -- schema ------------------------------------------------------------------

    def migrate(self) -> int:
        self.open()
        return self._call(self._migrate)

    def _migrate(self, conn: psycopg.Connection) -> int:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            have = apply_migrations(conn, "postgresql", "ledger_schema", MIGRATIONS)
        now = int(time.time() * 1e6)
        self._ensure_partitions(conn, {now // DAY_US, now // DAY_US + 1})
        return have

    def _ensure_partitions(self, conn: psycopg.Connection, days: set[int]) -> None:
        missing = [(t, d) for d in sorted(days) for t in ("ledger_requests", "ledger_bodies") if (t, d) not in self._partitions]
        if not missing:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            for table, day in missing:
                conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(_partition_name(table, day)), sql.Identifier(table), sql.Literal(day * DAY_US), sql.Literal((day + 1) * DAY_US)
                    )
                )
        self._partitions.update(missing)

    # -- writing -----------------------------------------------------------------

    def write(self, rows: list[LedgerRow]) -> int:
        try:
            return self._call(self._write, rows)
        except psycopg.errors.CheckViolation:
            # "no partition for row": another writer's retention dropped a day
            # this process still had cached. Forget the cache, try once more.
            self._partitions.clear()
            return self._call(self._write, rows)

    def _write(self, conn: psycopg.Connection, rows: list[LedgerRow]) -> int:
        self._ensure_partitions(conn, {r.started_at // DAY_US for r in rows})
        try:
            # The common case — rows never seen before — is COPY straight into
            # the table and the rollup upsert from the batch itself.
            with conn.transaction():
                with conn.cursor() as cur:
                    with cur.copy(f"COPY ledger_requests ({_COLS}) FROM STDIN") as copy:
                        for r in rows:
                            copy.write_row(_values(r))
                    cur.executemany(_UPSERT, rollup(rows))
                    self._extras(cur, rows)
            return len(rows)
        except psycopg.errors.UniqueViolation:
            pass  # some rows are stored already (a replayed batch): skip those, count the rest
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS ledger_stage (LIKE ledger_requests) ON COMMIT DELETE ROWS")
            with conn.cursor() as cur:
                with cur.copy(f"COPY ledger_stage ({_COLS}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(_values(r))
                new = {(rid, st) for rid, st in cur.execute(_MOVE).fetchall()}
                self._extras(cur, [r for r in rows if (r.request_id, r.started_at) in new])
        return len(new)

    def _extras(self, cur: psycopg.Cursor, rows: list[LedgerRow]) -> None:
        """Bodies and dead letters of rows just stored."""
        bodies = [(r.request_id, r.started_at, r.bodies.request, r.bodies.response) for r in rows if r.bodies is not None]
        if bodies:
            cur.executemany("INSERT INTO ledger_bodies VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", bodies)
        dlq = [
            (dlq_id(r), r.request_id, r.started_at, r.tenant, r.model, r.status, r.error_type, d.method, d.path, d.query, json.dumps(d.headers), d.body)
            for r in rows
            if (d := r.dead_letter) is not None
        ]
        if dlq:
            cur.executemany(
                "INSERT INTO ledger_dlq (id, request_id, started_at, tenant, model, status, error_type, method, path, query, headers, body)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                dlq,
            )

    # -- reading -----------------------------------------------------------------

    def requests(self, q: Query) -> list[dict]:
        return self._call(self._requests, q)

    def _requests(self, conn: psycopg.Connection, q: Query) -> list[dict]:
        conds: list[str] = []
        args: list[Any] = []
        for col in ("tenant", "model", "status", "outcome", "batch_id"):
            v = getattr(q, col)
            if v is not None:
                conds.append(f"{col} = %s")
                args.append(v)
        since = q.since
        if since is None and q.ended_since is None and q.batch_id is None:
            # started_at has a BRIN index (rows arrive nearly in time order; a
            # B-tree cost ~25 bytes a row): bound an open-ended listing.
            since = int(time.time() * 1e6) - _DEFAULT_WINDOW_US
        if since is not None:
            conds.append("started_at >= %s")
            args.append(since)
        if q.until is not None:
            conds.append("started_at < %s")
            args.append(q.until)
        if q.ended_since is not None:
            conds.append("started_at >= %s AND ended_at >= %s")
            args.extend((q.ended_since - MAX_REQUEST_US, q.ended_since))
        where = " WHERE " + " AND ".join(conds) if conds else ""
        cur = conn.execute(f"SELECT {_OUT_COLS} FROM ledger_requests{where} ORDER BY started_at DESC LIMIT %s", (*args, q.limit))
        return [dict(zip(COLUMNS, t)) for t in cur.fetchall()]

    def request(self, request_id: str) -> dict | None:
        return self._call(self._request, request_id)

    def _request(self, conn: psycopg.Connection, request_id: str) -> dict | None:
        t = conn.execute(f"SELECT {_OUT_COLS} FROM ledger_requests WHERE request_id = %s ORDER BY started_at DESC LIMIT 1", (request_id,)).fetchone()
        if t is None:
            return None
        out = dict(zip(COLUMNS, t))
        b = conn.execute("SELECT request, response FROM ledger_bodies WHERE request_id = %s AND started_at = %s", (request_id, out["started_at"])).fetchone()
        if b is not None:
            out["bodies"] = {"request": bytes(b[0]).decode("utf-8", "replace"), "response": bytes(b[1]).decode("utf-8", "replace")}
        return out

    def usage(self, group: str, since: int | None, until: int | None) -> list[dict]:
        assert group in GROUPS
        return self._call(self._usage, group, since, until)

    def _usage(self, conn: psycopg.Connection, group: str, since: int | None, until: int | None) -> list[dict]:
        conds, args = [], []
        if since is not None:
            conds.append("hour >= %s")
            args.append(since - since % HOUR_US)
        if until is not None:
            conds.append("hour < %s")
            args.append(until)
        where = " WHERE " + " AND ".join(conds) if conds else ""
        sums = ", ".join(f"sum({c})" for c in COUNTERS)
        cur = conn.execute(f"SELECT {group}, {sums} FROM ledger_usage_hourly{where} GROUP BY {group} ORDER BY sum(cost_micros) DESC, {group}", args)
        return usage_out(group, cur.fetchall())

    def usage_by_batch(self, batch_id: str | None, since: int | None, until: int | None) -> list[dict]:
        return self._call(self._usage_by_batch, batch_id, since, until)

    def _usage_by_batch(self, conn: psycopg.Connection, batch_id: str | None, since: int | None, until: int | None) -> list[dict]:
        # From the rows themselves, through each partition's partial index:
        # the hourly rollups have no batch.
        conds, args = (["batch_id = %s"], [batch_id]) if batch_id else (["batch_id <> ''"], [])
        if since is not None:
            conds.append("started_at >= %s")
            args.append(since)
        if until is not None:
            conds.append("started_at < %s")
            args.append(until)
        cur = conn.execute(
            "SELECT batch_id, count(*), count(*) FILTER (WHERE status >= 400 OR status = 0), sum(input_tokens), sum(output_tokens),"
            f" sum(cache_read_tokens), sum(cache_creation_tokens), sum(cost_micros) FROM ledger_requests WHERE {' AND '.join(conds)}"
            " GROUP BY batch_id ORDER BY sum(cost_micros) DESC, batch_id",
            args,
        )
        return usage_out("batch", cur.fetchall())

    def dlq_list(self, limit: int, since: int | None) -> list[dict]:
        return self._call(self._dlq_list, limit, since)

    def _dlq_list(self, conn: psycopg.Connection, limit: int, since: int | None) -> list[dict]:
        where, args = ("WHERE started_at >= %s", [since]) if since is not None else ("", [])
        cur = conn.execute(f"SELECT {_DLQ_SUMMARY} FROM ledger_dlq {where} ORDER BY started_at DESC LIMIT %s", (*args, limit))
        return [dict(zip(_DLQ_SUMMARY_COLS, t)) for t in cur.fetchall()]

    def dlq_get(self, entry_id: str) -> dict | None:
        return self._call(self._dlq_get, entry_id)

    def _dlq_get(self, conn: psycopg.Connection, entry_id: str) -> dict | None:
        t = conn.execute(f"SELECT {_DLQ_SUMMARY}, method, path, query, headers, body FROM ledger_dlq WHERE id = %s", (entry_id,)).fetchone()
        if t is None:
            return None
        n = len(_DLQ_SUMMARY_COLS)
        d = dict(zip(_DLQ_SUMMARY_COLS, t[:n]))
        method, path, query, headers, body = t[n:]
        d.update(method=method, path=path, query=query, headers=[tuple(h) for h in json.loads(headers)], body=bytes(body))
        return d

    def dlq_mark(self, entry_id: str, request_id: str, status: int, at: int) -> None:
        self._call(lambda conn: conn.execute("UPDATE ledger_dlq SET replayed_request_id = %s, replayed_status = %s, replayed_at = %s WHERE id = %s", (request_id, status, at, entry_id)))

    # -- retention and size ------------------------------------------------------

    def retain(self, now: int, days: int, bodies_days: int, dlq_days: int) -> dict:
        return self._call(self._retain, now, days, bodies_days, dlq_days)

    def _retain(self, conn: psycopg.Connection, now: int, days: int, bodies_days: int, dlq_days: int) -> dict:
        dropped: dict[str, Any] = {"ledger_requests": [], "ledger_bodies": []}
        for table, keep in (("ledger_requests", days), ("ledger_bodies", bodies_days)):
            cutoff_day = (now - keep * DAY_US) // DAY_US
            for (name,) in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
                " JOIN pg_namespace n ON n.oid = p.relnamespace WHERE p.relname = %s AND n.nspname = %s",
                (table, self.schema),
            ).fetchall():
                day = _partition_day(name)
                if day is not None and day < cutoff_day:
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
                    self._partitions.discard((table, day))
                    dropped[table].append(name)
        total = 0
        while True:
            n = conn.execute(
                f"DELETE FROM ledger_dlq WHERE id IN (SELECT id FROM ledger_dlq WHERE started_at < %s LIMIT {_DLQ_CHUNK})", (now - dlq_days * DAY_US,)
            ).rowcount
            total += n
            if n < _DLQ_CHUNK:
                break
        dropped["ledger_dlq"] = total
        dropped["ledger_usage_hourly"] = conn.execute(
            "DELETE FROM ledger_usage_hourly WHERE hour < %s", (now - max(days, ROLLUP_RETENTION_DAYS) * DAY_US,)
        ).rowcount
        return dropped

    def size(self) -> dict:
        return self._call(self._size)

    def _size(self, conn: psycopg.Connection) -> dict:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0), coalesce(sum(c.reltuples) FILTER (WHERE c.reltuples > 0), 0)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'r' AND c.relname LIKE 'ledger\\_%%'",
            (self.schema,),
        ).fetchone()
        dlq = conn.execute("SELECT count(*) FROM ledger_dlq").fetchone()[0]
        return {"backend": "postgresql", "schema": self.schema, "bytes": int(row[0]), "rows_estimate": int(row[1]), "dlq_entries": dlq}

    def close(self) -> None:
        self._pool.close()


# Row → COPY tuple in table order: two C calls, no Python loop per field
# (this was the writer's largest CPU cost). Values past a column's range
# are clamped by the row's builder (proxy/ledger/capture.py).
_REORDER = operator.itemgetter(*(COLUMNS.index(c) for c in TABLE_COLUMNS))
_astuple = msgspec.structs.astuple


def _values(r: LedgerRow) -> tuple:
    return _REORDER(_astuple(r))


def _partition_name(table: str, day: int) -> str:
    return f"{table}_p{datetime.fromtimestamp(day * 86400, timezone.utc):%Y%m%d}"


def _partition_day(name: str) -> int | None:
    tail = name.rsplit("_p", 1)[-1]
    try:
        return int(datetime.strptime(tail, "%Y%m%d").replace(tzinfo=timezone.utc).timestamp()) // 86400
    except ValueError:
        return None


_DLQ_SUMMARY_COLS = ("id", "request_id", "started_at", "tenant", "model", "status", "error_type", "replayed_request_id", "replayed_status", "replayed_at")
_DLQ_SUMMARY = ", ".join(_DLQ_SUMMARY_COLS)
