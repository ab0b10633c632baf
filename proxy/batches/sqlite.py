"""Batches in the embedded ledger's SQLite file (WAL), shared by a host's workers.

Same file as the ledger (``ledger.db`` in the data directory), own tables
and own migration version (``batch_schema``), so the two evolve apart.
Every write is one ``BEGIN IMMEDIATE`` transaction: SQLite has one writer
at a time, so a claim's read-then-mark cannot interleave with another
worker's — that is what makes claims disjoint here (PostgreSQL needs
``FOR UPDATE SKIP LOCKED`` for the same).

Counts live on the batch row, changed in the same transaction as the items
they count, so ``get`` on a 100,000-item batch reads one row. Items waiting
or running are found through partial indexes (``WHERE state = 'pending'``,
``'running'``), which shrink as items end: a claim touches only what it
takes. An ended item's ``params`` are dropped — only its result is read again.

Connections: a small idle pool, one taken per call by whichever thread runs
it (proxy/sqlite_conns.py, shared with the ledger's store).
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any, Literal, Sequence

import msgspec

from ..ledger.store import DAY_US
from ..migrations import apply_migrations
from ..sqlite_conns import SQLitePool
from .model import Batch, Counts, Status, result_line
from .store import CHUNK, BatchUnavailable, Claim, DeleteResult, allot

__all__ = ["SQLiteBatchStore"]

# Versioned migrations: each runs once, in order, in one write transaction
# with the version it brings the file to.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    mode TEXT NOT NULL, target TEXT NOT NULL, upstream_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    ended_at INTEGER, cancel_initiated_at INTEGER, archived_at INTEGER,
    processing INTEGER NOT NULL, succeeded INTEGER NOT NULL, errored INTEGER NOT NULL,
    canceled INTEGER NOT NULL, expired INTEGER NOT NULL,
    claimed_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batches_tenant ON batches (tenant, seq);
CREATE INDEX batches_open ON batches (status, claimed_at) WHERE status <> 'ended';
CREATE TABLE batch_items (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, params BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempt INTEGER NOT NULL DEFAULT 0,
    lease TEXT NOT NULL DEFAULT '', owner TEXT NOT NULL DEFAULT '', lease_until INTEGER NOT NULL DEFAULT 0,
    not_before INTEGER NOT NULL DEFAULT 0, finished_at INTEGER, result BLOB,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX batch_items_pending ON batch_items (batch_id, idx) WHERE state = 'pending';
CREATE INDEX batch_items_running ON batch_items (batch_id, lease_until) WHERE state = 'running';
""",
    ),
]

BATCH_COLS = (
    "id, tenant, mode, target, upstream_id, status, created_at, expires_at, ended_at, cancel_initiated_at, archived_at,"
    " processing, succeeded, errored, canceled, expired"
)


def batch_from_row(t: Sequence[Any]) -> Batch:
    return Batch(
        id=t[0], tenant=t[1], mode=t[2], target=t[3], upstream_id=t[4], processing_status=t[5],
        created_at=t[6], expires_at=t[7], ended_at=t[8], cancel_initiated_at=t[9], archived_at=t[10],
        counts=Counts(t[11], t[12], t[13], t[14], t[15]),
    )  # fmt: skip


def batch_values(b: Batch) -> tuple:
    c = b.counts
    return (
        b.id, b.tenant, b.mode, b.target, b.upstream_id, b.processing_status, b.created_at, b.expires_at,
        b.ended_at, b.cancel_initiated_at, b.archived_at, c.processing, c.succeeded, c.errored, c.canceled, c.expired,
    )  # fmt: skip


class SQLiteBatchStore:
    kind = "sqlite"

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self._pool = SQLitePool(path, busy_timeout_ms, BatchUnavailable)

    def _call(self, fn: Any, *args: Any, write: bool = True) -> Any:
        """``fn(conn, *args)`` on a pooled connection; inside one ``BEGIN IMMEDIATE`` transaction when ``write``."""
        return self._pool.call(fn, *args, immediate=write)

    # -- schema ----------------------------------------------------------------

    def migrate(self) -> int:
        # As the ledger does, before any table exists: whichever of the two
        # creates the file, retention can hand pages back.
        self._call(lambda conn: conn.execute("PRAGMA auto_vacuum = INCREMENTAL"), write=False)
        return self._call(self._migrate)

    def _migrate(self, conn: sqlite3.Connection) -> int:
        return apply_migrations(conn, "sqlite", "batch_schema", MIGRATIONS)

    # -- batches ---------------------------------------------------------------

    def create(self, batch: Batch, items: Sequence[tuple[str, bytes]]) -> None:
        self._call(self._create, batch, items)

    def _create(self, conn: sqlite3.Connection, batch: Batch, items: Sequence[tuple[str, bytes]]) -> None:
        b = batch
        if b.mode == "weir":
            b = msgspec.structs.replace(batch, counts=Counts(processing=len(items)))
        conn.execute(f"INSERT INTO batches ({BATCH_COLS}) VALUES ({', '.join('?' * 16)})", batch_values(b))
        # One executemany: the whole batch is one statement prepared once
        # (100,000 items in well under a few seconds).
        conn.executemany(
            "INSERT INTO batch_items (batch_id, idx, custom_id, params) VALUES (?, ?, ?, ?)",
            ((b.id, i, cid, params) for i, (cid, params) in enumerate(items)),
        )

    def get(self, tenant: str, batch_id: str) -> Batch | None:
        return self._call(_get, tenant, batch_id, write=False)

    def list(self, tenant: str, *, before_id: str | None = None, after_id: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
        return self._call(self._list, tenant, before_id, after_id, limit, write=False)

    def _list(self, conn: sqlite3.Connection, tenant: str, before_id: str | None, after_id: str | None, limit: int) -> tuple[list[Batch], bool]:
        cursor = before_id or after_id
        if cursor is not None:
            got = conn.execute("SELECT seq FROM batches WHERE id = ? AND tenant = ?", (cursor, tenant)).fetchone()
            if got is None:
                return [], False
            op, order = ("> ?", "ASC") if before_id else ("< ?", "DESC")
            rows = conn.execute(f"SELECT {BATCH_COLS} FROM batches WHERE tenant = ? AND seq {op} ORDER BY seq {order} LIMIT ?", (tenant, got[0], limit + 1)).fetchall()
        else:
            rows = conn.execute(f"SELECT {BATCH_COLS} FROM batches WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if before_id:
            rows.reverse()  # fetched oldest-first from the cursor; pages are newest first
        return [batch_from_row(t) for t in rows], more

    def cancel(self, tenant: str, batch_id: str, now: int) -> Batch | None:
        return self._call(self._cancel, tenant, batch_id, now)

    def _cancel(self, conn: sqlite3.Connection, tenant: str, batch_id: str, now: int) -> Batch | None:
        b = _get(conn, tenant, batch_id)
        if b is None or b.mode != "weir" or b.processing_status != "in_progress":
            return b
        n = _end_items(conn, batch_id, "canceled", ("pending",), now)
        conn.execute(
            "UPDATE batches SET status = 'canceling', cancel_initiated_at = ?, processing = processing - ?, canceled = canceled + ? WHERE id = ?",
            (now, n, n, batch_id),
        )
        return _get(conn, tenant, batch_id)

    def sync(
        self, tenant: str, batch_id: str, processing_status: Status, counts: Counts,
        ended_at: int | None, cancel_initiated_at: int | None, archived_at: int | None,
    ) -> None:  # fmt: skip
        c = counts
        self._call(
            lambda conn: conn.execute(
                "UPDATE batches SET status = ?, processing = ?, succeeded = ?, errored = ?, canceled = ?, expired = ?,"
                " ended_at = ?, cancel_initiated_at = ?, archived_at = ? WHERE id = ? AND tenant = ? AND mode = 'passthrough'",
                (processing_status, c.processing, c.succeeded, c.errored, c.canceled, c.expired, ended_at, cancel_initiated_at, archived_at, batch_id, tenant),
            )
        )

    def delete(self, tenant: str, batch_id: str) -> DeleteResult:
        return self._call(self._delete, tenant, batch_id)

    def _delete(self, conn: sqlite3.Connection, tenant: str, batch_id: str) -> DeleteResult:
        b = _get(conn, tenant, batch_id)
        if b is None:
            return "not_found"
        if b.mode == "weir" and b.processing_status != "ended":
            return "not_ended"
        conn.execute("DELETE FROM batch_items WHERE batch_id = ?", (batch_id,))
        conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        return "deleted"

    # -- items -----------------------------------------------------------------

    def claim(self, owner: str, now: int, lease_us: int, limit: int) -> list[Claim]:
        if limit < 1:
            return []
        return self._call(self._claim, owner, now, lease_us, limit)

    def _claim(self, conn: sqlite3.Connection, owner: str, now: int, lease_us: int, limit: int) -> list[Claim]:
        cands = conn.execute(
            "SELECT id, tenant FROM batches WHERE status = 'in_progress' AND mode = 'weir' AND processing > 0 AND expires_at > ?"
            " ORDER BY claimed_at, seq",
            (now,),
        ).fetchall()
        lease = secrets.token_hex(8)
        until = now + lease_us
        tenants = dict(cands)
        out: list[Claim] = []
        want = allot(cands, limit)
        while want:
            full = []
            for batch_id, k in want.items():
                rows = conn.execute(
                    "SELECT idx, custom_id, params, attempt FROM batch_items WHERE batch_id = ? AND state = 'running' AND lease_until <= ? LIMIT ?",
                    (batch_id, now, k),
                ).fetchall()
                if len(rows) < k:
                    rows += conn.execute(
                        "SELECT idx, custom_id, params, attempt FROM batch_items WHERE batch_id = ? AND state = 'pending' AND not_before <= ? ORDER BY idx LIMIT ?",
                        (batch_id, now, k - len(rows)),
                    ).fetchall()
                if not rows:
                    continue
                conn.executemany(
                    "UPDATE batch_items SET state = 'running', lease = ?, owner = ?, lease_until = ?, attempt = attempt + 1 WHERE batch_id = ? AND idx = ?",
                    [(lease, owner, until, batch_id, r[0]) for r in rows],
                )
                conn.execute("UPDATE batches SET claimed_at = ? WHERE id = ?", (now, batch_id))
                out += [Claim(batch_id, idx, cid, tenants[batch_id], bytes(params), attempt + 1, lease) for idx, cid, params, attempt in rows]
                if len(rows) == k:
                    full.append((batch_id, tenants[batch_id]))
            # What a batch could not use goes to the batches that may have more.
            want = allot(full, limit - len(out)) if len(out) < limit else {}
        return out

    def renew(self, owner: str, claims: Sequence[Claim], now: int, lease_us: int) -> list[Claim]:
        if not claims:
            return []
        return self._call(self._renew, owner, claims, now + lease_us)

    def _renew(self, conn: sqlite3.Connection, owner: str, claims: Sequence[Claim], until: int) -> list[Claim]:
        lost = []
        for c in claims:
            n = conn.execute(
                "UPDATE batch_items SET lease_until = ? WHERE batch_id = ? AND idx = ? AND state = 'running' AND lease = ? AND owner = ?",
                (until, c.batch_id, c.idx, c.lease, owner),
            ).rowcount
            if n == 0:
                lost.append(c)
        return lost

    def release(self, claim: Claim, not_before: int) -> bool:
        return self._call(self._release, claim, not_before)

    def _release(self, conn: sqlite3.Connection, claim: Claim, not_before: int) -> bool:
        # A canceling batch's released item is canceled by the next sweep.
        n = conn.execute(
            "UPDATE batch_items SET state = 'pending', lease = '', owner = '', lease_until = 0, not_before = ? WHERE batch_id = ? AND idx = ? AND state = 'running' AND lease = ?",
            (not_before, claim.batch_id, claim.idx, claim.lease),
        ).rowcount
        return n == 1

    def finish(self, claim: Claim, result: Literal["succeeded", "errored"], payload: bytes, now: int) -> bool:
        assert result in ("succeeded", "errored"), result
        return self._call(self._finish, claim, result, payload, now)

    def _finish(self, conn: sqlite3.Connection, claim: Claim, result: str, payload: bytes, now: int) -> bool:
        n = conn.execute(
            "UPDATE batch_items SET state = ?, result = ?, params = x'', finished_at = ? WHERE batch_id = ? AND idx = ? AND state = 'running' AND lease = ?",
            (result, payload, now, claim.batch_id, claim.idx, claim.lease),
        ).rowcount
        if n == 1:
            conn.execute(f"UPDATE batches SET processing = processing - 1, {result} = {result} + 1 WHERE id = ?", (claim.batch_id,))
        return n == 1

    # -- housekeeping ----------------------------------------------------------

    def sweep(self, now: int) -> list[str]:
        return self._call(self._sweep, now)

    def _sweep(self, conn: sqlite3.Connection, now: int) -> list[str]:
        ended = []
        for (batch_id,) in conn.execute("SELECT id FROM batches WHERE status <> 'ended' AND mode = 'weir' AND expires_at <= ?", (now,)).fetchall():
            n = _end_items(conn, batch_id, "expired", ("pending", "running"), now)
            conn.execute(
                "UPDATE batches SET status = 'ended', ended_at = ?, processing = processing - ?, expired = expired + ? WHERE id = ?", (now, n, n, batch_id)
            )
            ended.append(batch_id)
        for (batch_id,) in conn.execute("SELECT id FROM batches WHERE status = 'canceling' AND mode = 'weir'").fetchall():
            # Items released since the cancel, and items whose worker died
            # (lease run out: nobody reclaims in a canceling batch).
            n = conn.execute(
                "UPDATE batch_items SET state = 'canceled', params = x'', finished_at = ? WHERE batch_id = ?"
                " AND (state = 'pending' OR (state = 'running' AND lease_until <= ?))",
                (now, batch_id, now),
            ).rowcount
            conn.execute("UPDATE batches SET processing = processing - ?, canceled = canceled + ? WHERE id = ?", (n, n, batch_id))
            if conn.execute("SELECT 1 FROM batch_items WHERE batch_id = ? AND state = 'running' LIMIT 1", (batch_id,)).fetchone() is None:
                conn.execute("UPDATE batches SET status = 'ended', ended_at = ? WHERE id = ?", (now, batch_id))
                ended.append(batch_id)
        for (batch_id,) in conn.execute("SELECT id FROM batches WHERE status = 'in_progress' AND mode = 'weir' AND processing = 0").fetchall():
            conn.execute("UPDATE batches SET status = 'ended', ended_at = ? WHERE id = ?", (now, batch_id))
            ended.append(batch_id)
        return ended

    def results(self, tenant: str, batch_id: str, after_idx: int, limit: int) -> list[tuple[int, bytes]]:
        return self._call(self._results, tenant, batch_id, after_idx, limit, write=False)

    def _results(self, conn: sqlite3.Connection, tenant: str, batch_id: str, after_idx: int, limit: int) -> list[tuple[int, bytes]]:
        if conn.execute("SELECT 1 FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)).fetchone() is None:
            return []
        rows = conn.execute(
            "SELECT idx, custom_id, state, result FROM batch_items WHERE batch_id = ? AND idx > ?"
            " AND state IN ('succeeded', 'errored', 'canceled', 'expired') ORDER BY idx LIMIT ?",
            (batch_id, after_idx, limit),
        ).fetchall()
        return [(idx, result_line(cid, state, bytes(res) if res is not None else b"")) for idx, cid, state, res in rows]

    def retain(self, now: int, results_days: int) -> int:
        cutoff = now - results_days * DAY_US
        # A passthrough row never told it ended (``sync``) goes as if it
        # ended at its expiry, the latest its upstream can end it.
        gone = self._call(
            lambda conn: conn.execute(
                "SELECT id FROM batches WHERE ended_at < ? OR (mode = 'passthrough' AND ended_at IS NULL AND expires_at < ?)", (cutoff, cutoff)
            ).fetchall(),
            write=False,
        )
        for (batch_id,) in gone:
            # Chunks, each its own short transaction, so other workers' claims
            # and finishes interleave; the batch row goes last, so a crash
            # midway leaves it to be found again.
            while self._call(
                lambda conn: conn.execute(
                    f"DELETE FROM batch_items WHERE rowid IN (SELECT rowid FROM batch_items WHERE batch_id = ? LIMIT {CHUNK})", (batch_id,)
                ).rowcount
            ) == CHUNK:
                pass
            self._call(lambda conn: conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,)))
        if gone:
            self._call(lambda conn: conn.execute("PRAGMA incremental_vacuum"), write=False)
        return len(gone)

    def close(self) -> None:
        """Idle connections now, one still running a call as it returns (see SQLitePool.close)."""
        self._pool.close()


def _get(conn: sqlite3.Connection, tenant: str, batch_id: str) -> Batch | None:
    t = conn.execute(f"SELECT {BATCH_COLS} FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)).fetchone()
    return None if t is None else batch_from_row(t)


def _end_items(conn: sqlite3.Connection, batch_id: str, state: str, from_states: tuple[str, ...], now: int) -> int:
    marks = ", ".join("?" * len(from_states))
    return conn.execute(
        f"UPDATE batch_items SET state = ?, params = x'', finished_at = ? WHERE batch_id = ? AND state IN ({marks})",
        (state, now, batch_id, *from_states),
    ).rowcount
