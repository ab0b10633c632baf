"""The embedded ledger: one SQLite file per host, shared by its workers.

WAL lets the admin API read while a writer commits, and each worker's writer
commits one batch per transaction (every ≤ 200 ms), so N workers contend for
the write lock a few times a second, not per request. ``busy_timeout`` is
generous because nothing waits on it but the writer, off the hot path.

Connections: a small idle pool, one taken per call by whichever thread runs
it (proxy/sqlite_conns.py, shared with the batch store).

Size stays bounded: retention deletes in chunks of a few thousand rows, each
its own short transaction so other workers' batches interleave, then returns
free pages to the file system (``auto_vacuum = INCREMENTAL``, set when the
file is created). Bifrost's ``logs.db`` grew to 923 MB in five days for lack
of exactly this.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..migrations import apply_migrations
from ..sqlite_conns import SQLitePool
from .row import COLUMNS, V1_COLUMNS, LedgerRow
from .store import DAY_US, GROUPS, MAX_REQUEST_US, COUNTERS, LedgerUnavailable, Query, dlq_id, rollup, usage_out

__all__ = ["SQLiteStore"]

_TYPES = {int: "INTEGER", str: "TEXT", bool: "INTEGER"}


def _requests_ddl() -> str:
    cols = []
    for name in V1_COLUMNS:
        t = LedgerRow.__annotations__[name]
        sql = "INTEGER" if t in ("int", "bool") else "TEXT"
        cols.append(f"{name} {sql} NOT NULL")
    return "CREATE TABLE ledger_requests (" + ", ".join(cols) + ")"


# Versioned migrations: each runs once, in order, inside one write
# transaction together with the version it brings the file to.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        _requests_ddl()
        + """;
CREATE UNIQUE INDEX ledger_requests_id ON ledger_requests (request_id, started_at);
CREATE INDEX ledger_requests_started ON ledger_requests (started_at);
CREATE TABLE ledger_bodies (
    request_id TEXT NOT NULL, started_at INTEGER NOT NULL,
    request BLOB NOT NULL, response BLOB NOT NULL,
    PRIMARY KEY (request_id, started_at)
) WITHOUT ROWID;
CREATE INDEX ledger_bodies_started ON ledger_bodies (started_at);
CREATE TABLE ledger_dlq (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL, started_at INTEGER NOT NULL,
    tenant TEXT NOT NULL, model TEXT NOT NULL, status INTEGER NOT NULL, error_type TEXT NOT NULL,
    method TEXT NOT NULL, path TEXT NOT NULL, query TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
    replayed_request_id TEXT NOT NULL DEFAULT '', replayed_status INTEGER NOT NULL DEFAULT 0, replayed_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX ledger_dlq_started ON ledger_dlq (started_at);
CREATE TABLE ledger_usage_hourly (
    hour INTEGER NOT NULL, tenant TEXT NOT NULL, project TEXT NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL, target TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL, cost_micros INTEGER NOT NULL,
    PRIMARY KEY (hour, tenant, project, model, kind, target)
) WITHOUT ROWID;
""",
    ),
    (
        # Batch items' rows carry their batch (proxy/batches/). The index is
        # partial: the rows of ordinary requests ('') pay nothing for it.
        2,
        """
ALTER TABLE ledger_requests ADD COLUMN batch_id TEXT NOT NULL DEFAULT '';
CREATE INDEX ledger_requests_batch ON ledger_requests (batch_id) WHERE batch_id <> '';
""",
    ),
]

# Rows deleted per retention transaction: a few ms of work, so another
# worker's batch waits at most that long for the write lock.
_CHUNK = 5000
# Usage rollups are tiny (one row per hour × tenant × model × …) and answer
# "what did we spend last year": they outlive the raw rows.
ROLLUP_RETENTION_DAYS = 400

_INSERT = f"INSERT OR IGNORE INTO ledger_requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_UPSERT = (
    "INSERT INTO ledger_usage_hourly VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (hour, tenant, project, model, kind, target) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
)
_N = len(COLUMNS)
# A batch's usage, summed from its rows as the rollups count them.
_BATCH_SUMS = "count(*), sum(status >= 400 OR status = 0), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_creation_tokens), sum(cost_micros)"


class SQLiteStore:
    kind = "sqlite"

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self._pool = SQLitePool(path, busy_timeout_ms, LedgerUnavailable)

    def _call(self, fn: Any, *args: Any) -> Any:
        return self._pool.call(fn, *args)

    # -- schema ------------------------------------------------------------------

    def migrate(self) -> int:
        return self._call(self._migrate)

    def _migrate(self, conn: sqlite3.Connection) -> int:
        # Must precede the first table: SQLite fixes auto_vacuum at creation.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("BEGIN IMMEDIATE")  # one worker migrates; the rest wait, then find it done
        try:
            have = apply_migrations(conn, "sqlite", "ledger_schema", MIGRATIONS)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return have

    # -- writing -----------------------------------------------------------------

    def write(self, rows: list[LedgerRow]) -> int:
        return self._call(self._write, rows)

    def _write(self, conn: sqlite3.Connection, rows: list[LedgerRow]) -> int:
        conn.execute("BEGIN IMMEDIATE")
        inserted = []
        cur = conn.cursor()
        for r in rows:
            cur.execute(_INSERT, _values(r))
            if cur.rowcount == 1:  # 0: this request id is already stored (a replayed batch)
                inserted.append(r)
        for r in inserted:
            if r.bodies is not None:
                cur.execute("INSERT OR IGNORE INTO ledger_bodies VALUES (?,?,?,?)", (r.request_id, r.started_at, r.bodies.request, r.bodies.response))
            d = r.dead_letter
            if d is not None:
                cur.execute(
                    "INSERT OR IGNORE INTO ledger_dlq (id, request_id, started_at, tenant, model, status, error_type, method, path, query, headers, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (dlq_id(r), r.request_id, r.started_at, r.tenant, r.model, r.status, r.error_type, d.method, d.path, d.query, _headers_json(d.headers), d.body),
                )
        cur.executemany(_UPSERT, rollup(inserted))
        conn.execute("COMMIT")
        return len(inserted)

    # -- reading -----------------------------------------------------------------

    def requests(self, q: Query) -> list[dict]:
        return self._call(self._requests, q)

    def _requests(self, conn: sqlite3.Connection, q: Query) -> list[dict]:
        where, args = _where(q)
        sql = f"SELECT {', '.join(COLUMNS)} FROM ledger_requests{where} ORDER BY started_at DESC LIMIT ?"
        return [_row_dict(t) for t in conn.execute(sql, (*args, q.limit))]

    def request(self, request_id: str) -> dict | None:
        return self._call(self._request, request_id)

    def _request(self, conn: sqlite3.Connection, request_id: str) -> dict | None:
        t = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM ledger_requests WHERE request_id = ? ORDER BY started_at DESC LIMIT 1", (request_id,)).fetchone()
        if t is None:
            return None
        out = _row_dict(t)
        b = conn.execute("SELECT request, response FROM ledger_bodies WHERE request_id = ? AND started_at = ?", (request_id, out["started_at"])).fetchone()
        if b is not None:
            out["bodies"] = {"request": _text(b[0]), "response": _text(b[1])}
        return out

    def usage(self, group: str, since: int | None, until: int | None) -> list[dict]:
        assert group in GROUPS
        return self._call(self._usage, group, since, until)

    def _usage(self, conn: sqlite3.Connection, group: str, since: int | None, until: int | None) -> list[dict]:
        sums = ", ".join(f"sum({c})" for c in COUNTERS)
        where, args = _range("hour", since, until, floor=True)
        rows = conn.execute(f"SELECT {group}, {sums} FROM ledger_usage_hourly{where} GROUP BY {group} ORDER BY sum(cost_micros) DESC, {group}", args).fetchall()
        return usage_out(group, rows)

    def usage_by_batch(self, batch_id: str | None, since: int | None, until: int | None) -> list[dict]:
        return self._call(self._usage_by_batch, batch_id, since, until)

    def _usage_by_batch(self, conn: sqlite3.Connection, batch_id: str | None, since: int | None, until: int | None) -> list[dict]:
        # From the rows themselves, through the partial index: a batch's rows
        # are a small part of the table, and the hourly rollups have no batch.
        conds, args = (["batch_id = ?"], [batch_id]) if batch_id else (["batch_id <> ''"], [])
        where, more = _range("started_at", since, until)
        if more:
            conds.append(where[len(" WHERE ") :])
            args += more
        sql = f"SELECT batch_id, {_BATCH_SUMS} FROM ledger_requests WHERE {' AND '.join(conds)} GROUP BY batch_id ORDER BY sum(cost_micros) DESC, batch_id"
        return usage_out("batch", conn.execute(sql, args).fetchall())

    def dlq_list(self, limit: int, since: int | None) -> list[dict]:
        return self._call(self._dlq_list, limit, since)

    def _dlq_list(self, conn: sqlite3.Connection, limit: int, since: int | None) -> list[dict]:
        where, args = _range("started_at", since, None)
        cur = conn.execute(f"SELECT {_DLQ_SUMMARY} FROM ledger_dlq{where} ORDER BY started_at DESC LIMIT ?", (*args, limit))
        return [dict(zip(_DLQ_SUMMARY_COLS, t)) for t in cur]

    def dlq_get(self, entry_id: str) -> dict | None:
        return self._call(self._dlq_get, entry_id)

    def _dlq_get(self, conn: sqlite3.Connection, entry_id: str) -> dict | None:
        t = conn.execute(f"SELECT {_DLQ_SUMMARY}, method, path, query, headers, body FROM ledger_dlq WHERE id = ?", (entry_id,)).fetchone()
        return None if t is None else _dlq_full(t)

    def dlq_mark(self, entry_id: str, request_id: str, status: int, at: int) -> None:
        self._call(self._dlq_mark, entry_id, request_id, status, at)

    def _dlq_mark(self, conn: sqlite3.Connection, entry_id: str, request_id: str, status: int, at: int) -> None:
        conn.execute("UPDATE ledger_dlq SET replayed_request_id = ?, replayed_status = ?, replayed_at = ? WHERE id = ?", (request_id, status, at, entry_id))

    # -- retention and size ------------------------------------------------------

    def retain(self, now: int, days: int, bodies_days: int, dlq_days: int) -> dict:
        return self._call(self._retain, now, days, bodies_days, dlq_days)

    def _retain(self, conn: sqlite3.Connection, now: int, days: int, bodies_days: int, dlq_days: int) -> dict:
        done = {}
        for table, keep, col in (
            ("ledger_requests", days, "started_at"),
            ("ledger_bodies", bodies_days, "started_at"),
            ("ledger_dlq", dlq_days, "started_at"),
            ("ledger_usage_hourly", max(days, ROLLUP_RETENTION_DAYS), "hour"),
        ):
            cutoff = now - keep * DAY_US
            total = 0
            while True:
                key = "rowid" if table in ("ledger_requests", "ledger_dlq") else "(" + ("request_id, started_at" if table == "ledger_bodies" else "hour, tenant, project, model, kind, target") + ")"
                n = conn.execute(f"DELETE FROM {table} WHERE {key} IN (SELECT {key.strip('()')} FROM {table} WHERE {col} < ? LIMIT {_CHUNK})", (cutoff,)).rowcount
                total += n
                if n < _CHUNK:
                    break
            done[table] = total
        if any(done.values()):
            conn.execute("PRAGMA incremental_vacuum")
        return done

    def size(self) -> dict:
        return self._call(self._size)

    def _size(self, conn: sqlite3.Connection) -> dict:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM ledger_requests").fetchone()[0]
        dlq = conn.execute("SELECT count(*) FROM ledger_dlq").fetchone()[0]
        return {"backend": "sqlite", "path": self.path, "bytes": (pages - free) * page, "file_bytes": pages * page, "rows": rows, "dlq_entries": dlq}

    def close(self) -> None:
        """Idle connections now, one still running a call as it returns (see SQLitePool.close)."""
        self._pool.close()


def _values(r: LedgerRow) -> tuple:
    return (
        r.request_id, r.started_at, r.ended_at, r.tenant, r.project, r.ingress, r.kind, r.method, r.path, r.model, r.target,
        r.served_model, r.key_id, r.status, r.outcome, r.error_type, r.cache, r.attempts, r.failover, r.stream,
        r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_creation_tokens, r.cost_micros, r.price_version,
        r.queue_us, r.upstream_head_us, r.first_token_us, r.total_us, r.overhead_us, r.bytes_in, r.bytes_out, r.client, r.replay_of,
        r.batch_id,
    )  # fmt: skip


assert _values(LedgerRow(request_id="x", started_at=0)) and len(_values(LedgerRow(request_id="x", started_at=0))) == _N


def _row_dict(t: tuple) -> dict:
    d = dict(zip(COLUMNS, t))
    d["stream"] = bool(d["stream"])
    return d


def _where(q: Query) -> tuple[str, list]:
    conds: list[str] = []
    args: list[Any] = []
    for col in ("tenant", "model", "status", "outcome", "batch_id"):
        v = getattr(q, col)
        if v is not None:
            conds.append(f"{col} = ?")
            args.append(v)
    if q.since is not None:
        conds.append("started_at >= ?")
        args.append(q.since)
    if q.until is not None:
        conds.append("started_at < ?")
        args.append(q.until)
    if q.ended_since is not None:
        conds.append("started_at >= ? AND ended_at >= ?")
        args.extend((q.ended_since - MAX_REQUEST_US, q.ended_since))
    return (" WHERE " + " AND ".join(conds) if conds else ""), args


def _range(col: str, since: int | None, until: int | None, floor: bool = False) -> tuple[str, list]:
    conds, args = [], []
    if since is not None:
        conds.append(f"{col} >= ?")
        args.append(since - since % 3_600_000_000 if floor else since)
    if until is not None:
        conds.append(f"{col} < ?")
        args.append(until)
    return (" WHERE " + " AND ".join(conds) if conds else ""), args


_DLQ_SUMMARY_COLS = ("id", "request_id", "started_at", "tenant", "model", "status", "error_type", "replayed_request_id", "replayed_status", "replayed_at")
_DLQ_SUMMARY = ", ".join(_DLQ_SUMMARY_COLS)


def _dlq_full(t: tuple) -> dict:
    import json

    n = len(_DLQ_SUMMARY_COLS)
    d = dict(zip(_DLQ_SUMMARY_COLS, t[:n]))
    method, path, query, headers, body = t[n:]
    d.update(method=method, path=path, query=query, headers=[tuple(h) for h in json.loads(headers)], body=bytes(body))
    return d


def _headers_json(headers: list[tuple[str, str]]) -> str:
    import json

    return json.dumps(headers)


def _text(b: bytes) -> str:
    return bytes(b).decode("utf-8", "replace")
