"""Batches on PostgreSQL: many workers on many hosts share every batch.

psycopg's sync pool behind ``trio.to_thread`` (proxy/pg_conns.py, shared
with the ledger's store), in the ledger's database and schema, with its own
tables and migration version.

- **Claims** take items with ``FOR UPDATE SKIP LOCKED``: concurrent
  claimers skip each other's rows instead of queueing on them, and a row
  another claimer changed in the meantime is re-checked against the
  ``WHERE`` before it is taken, so no item is handed out twice. A claim
  writes item rows only — never the batch row the finishers update — and
  shares its items round-robin over the candidate batches in a random
  order (SQLite rotates by last claim; here that write would make every
  claimer queue on the batch rows).
- **Finish exactly once**: one conditional ``UPDATE … WHERE state =
  'running' AND lease = %s``, with the batch's counts in the same statement.
- **Lock order** is always item rows, then the batch row, and every
  transaction that ends items touches one batch: no cycle, no deadlock.
- ``create`` COPYs the items (100,000 in about a second), in the same
  transaction as the batch row.
"""

from __future__ import annotations

import random
import secrets
from typing import Any, Literal, Sequence

import msgspec
import psycopg
from psycopg import sql

from ..ledger.store import DAY_US
from ..migrations import apply_migrations
from ..pg_conns import PGPool
from .model import Batch, Counts, Status, result_line
from .sqlite import BATCH_COLS, batch_from_row, batch_values
from .store import CHUNK, BatchUnavailable, Claim, DeleteResult, allot

__all__ = ["PostgresBatchStore"]

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE batches (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE, tenant text NOT NULL,
    mode text NOT NULL, target text NOT NULL, upstream_id text NOT NULL, status text NOT NULL,
    created_at bigint NOT NULL, expires_at bigint NOT NULL,
    ended_at bigint, cancel_initiated_at bigint, archived_at bigint,
    processing integer NOT NULL, succeeded integer NOT NULL, errored integer NOT NULL,
    canceled integer NOT NULL, expired integer NOT NULL,
    claimed_at bigint NOT NULL DEFAULT 0
);
CREATE INDEX batches_tenant ON batches (tenant, seq);
CREATE INDEX batches_open ON batches (status) WHERE status <> 'ended';
CREATE TABLE batch_items (
    batch_id text NOT NULL, idx integer NOT NULL, custom_id text NOT NULL, params bytea NOT NULL,
    state text NOT NULL DEFAULT 'pending', attempt integer NOT NULL DEFAULT 0,
    lease text NOT NULL DEFAULT '', owner text NOT NULL DEFAULT '', lease_until bigint NOT NULL DEFAULT 0,
    not_before bigint NOT NULL DEFAULT 0, finished_at bigint, result bytea,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX batch_items_pending ON batch_items (batch_id, idx) WHERE state = 'pending';
CREATE INDEX batch_items_running ON batch_items (batch_id, lease_until) WHERE state = 'running';
""",
    ),
]

# Serialises migrations across every worker on every host; not the ledger's key.
_LOCK_KEY = 0x5745_4942  # "WEIB"

# The locking SELECT is a materialized CTE: as a subquery in FROM the planner
# may rescan it per outer row, and each rescan takes LIMIT more rows (seen
# here: a claim of 2 took 3).
_TAKE = """
WITH c AS MATERIALIZED (SELECT idx FROM batch_items WHERE batch_id = %(b)s AND {where} {order} LIMIT %(k)s FOR UPDATE SKIP LOCKED)
UPDATE batch_items i SET state = 'running', lease = %(lease)s, owner = %(owner)s, lease_until = %(until)s, attempt = i.attempt + 1
FROM c WHERE i.batch_id = %(b)s AND i.idx = c.idx
RETURNING i.idx, i.custom_id, i.params, i.attempt
"""
_TAKE_EXPIRED = _TAKE.format(where="state = 'running' AND lease_until <= %(now)s", order="")
_TAKE_PENDING = _TAKE.format(where="state = 'pending' AND not_before <= %(now)s", order="ORDER BY idx")


class PostgresBatchStore:
    kind = "postgresql"

    def __init__(self, url: str, *, schema: str = "public", max_connections: int = 4, connect_timeout_s: float = 3.0) -> None:
        self.url = url
        self.schema = schema
        self._pool = PGPool(
            url, schema=schema, max_connections=max_connections, connect_timeout_s=connect_timeout_s, name="weir-batches", unavailable=BatchUnavailable
        )

    def _call(self, fn: Any, *args: Any, tx: bool = True) -> Any:
        """``fn(conn, *args)`` on a pooled connection, in one transaction when ``tx``."""
        self._pool.open()
        return self._pool.call(fn, *args, tx=tx)

    # -- schema ----------------------------------------------------------------

    def migrate(self) -> int:
        return self._call(self._migrate)

    def _migrate(self, conn: psycopg.Connection) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        return apply_migrations(conn, "postgresql", "batch_schema", MIGRATIONS)

    # -- batches ---------------------------------------------------------------

    def create(self, batch: Batch, items: Sequence[tuple[str, bytes]]) -> None:
        self._call(self._create, batch, items)

    def _create(self, conn: psycopg.Connection, batch: Batch, items: Sequence[tuple[str, bytes]]) -> None:
        b = msgspec.structs.replace(batch, counts=Counts(processing=len(items))) if batch.mode == "weir" else batch
        conn.execute(f"INSERT INTO batches ({BATCH_COLS}) VALUES ({', '.join(['%s'] * 16)})", batch_values(b))
        if items:
            with conn.cursor() as cur, cur.copy("COPY batch_items (batch_id, idx, custom_id, params) FROM STDIN") as copy:
                for i, (cid, params) in enumerate(items):
                    copy.write_row((b.id, i, cid, params))

    def get(self, tenant: str, batch_id: str) -> Batch | None:
        return self._call(_get, tenant, batch_id, tx=False)

    def list(self, tenant: str, *, before_id: str | None = None, after_id: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
        return self._call(self._list, tenant, before_id, after_id, limit, tx=False)

    def _list(self, conn: psycopg.Connection, tenant: str, before_id: str | None, after_id: str | None, limit: int) -> tuple[list[Batch], bool]:
        cursor = before_id or after_id
        if cursor is not None:
            got = conn.execute("SELECT seq FROM batches WHERE id = %s AND tenant = %s", (cursor, tenant)).fetchone()
            if got is None:
                return [], False
            op, order = (">", "ASC") if before_id else ("<", "DESC")
            rows = conn.execute(
                f"SELECT {BATCH_COLS} FROM batches WHERE tenant = %s AND seq {op} %s ORDER BY seq {order} LIMIT %s", (tenant, got[0], limit + 1)
            ).fetchall()
        else:
            rows = conn.execute(f"SELECT {BATCH_COLS} FROM batches WHERE tenant = %s ORDER BY seq DESC LIMIT %s", (tenant, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if before_id:
            rows.reverse()
        return [batch_from_row(t) for t in rows], more

    def cancel(self, tenant: str, batch_id: str, now: int) -> Batch | None:
        return self._call(self._cancel, tenant, batch_id, now)

    def _cancel(self, conn: psycopg.Connection, tenant: str, batch_id: str, now: int) -> Batch | None:
        b = _get(conn, tenant, batch_id)
        if b is None or b.mode != "weir" or b.processing_status != "in_progress":
            return b
        conn.execute(
            "WITH c AS (UPDATE batch_items SET state = 'canceled', params = '', finished_at = %(now)s"
            "           WHERE batch_id = %(b)s AND state = 'pending' RETURNING 1),"
            " n AS (SELECT count(*) AS n FROM c)"
            " UPDATE batches SET processing = processing - n.n, canceled = canceled + n.n,"
            " status = CASE WHEN status = 'in_progress' THEN 'canceling' ELSE status END,"
            " cancel_initiated_at = coalesce(cancel_initiated_at, %(now)s) FROM n WHERE id = %(b)s",
            {"now": now, "b": batch_id},
        )
        return _get(conn, tenant, batch_id)

    def sync(
        self, tenant: str, batch_id: str, processing_status: Status, counts: Counts,
        ended_at: int | None, cancel_initiated_at: int | None, archived_at: int | None,
    ) -> None:  # fmt: skip
        c = counts
        self._call(
            lambda conn: conn.execute(
                "UPDATE batches SET status = %s, processing = %s, succeeded = %s, errored = %s, canceled = %s, expired = %s,"
                " ended_at = %s, cancel_initiated_at = %s, archived_at = %s WHERE id = %s AND tenant = %s AND mode = 'passthrough'",
                (processing_status, c.processing, c.succeeded, c.errored, c.canceled, c.expired, ended_at, cancel_initiated_at, archived_at, batch_id, tenant),
            ),
            tx=False,
        )

    def delete(self, tenant: str, batch_id: str) -> DeleteResult:
        return self._call(self._delete, tenant, batch_id)

    def _delete(self, conn: psycopg.Connection, tenant: str, batch_id: str) -> DeleteResult:
        b = _get(conn, tenant, batch_id)
        if b is None:
            return "not_found"
        if b.mode == "weir" and b.processing_status != "ended":
            return "not_ended"
        conn.execute("DELETE FROM batch_items WHERE batch_id = %s", (batch_id,))
        conn.execute("DELETE FROM batches WHERE id = %s", (batch_id,))
        return "deleted"

    # -- items -----------------------------------------------------------------

    def claim(self, owner: str, now: int, lease_us: int, limit: int) -> list[Claim]:
        if limit < 1:
            return []
        return self._call(self._claim, owner, now, lease_us, limit)

    def _claim(self, conn: psycopg.Connection, owner: str, now: int, lease_us: int, limit: int) -> list[Claim]:
        cands = conn.execute(
            "SELECT id, tenant FROM batches WHERE status = 'in_progress' AND mode = 'weir' AND processing > 0 AND expires_at > %s", (now,)
        ).fetchall()
        random.shuffle(cands)
        tenants = dict(cands)
        args = {"lease": secrets.token_hex(8), "owner": owner, "until": now + lease_us, "now": now}
        out: list[Claim] = []
        want = allot(cands, limit)
        while want:
            full = []
            for batch_id, k in want.items():
                rows = conn.execute(_TAKE_EXPIRED, {**args, "b": batch_id, "k": k}).fetchall()
                if len(rows) < k:
                    rows += conn.execute(_TAKE_PENDING, {**args, "b": batch_id, "k": k - len(rows)}).fetchall()
                out += [Claim(batch_id, idx, cid, tenants[batch_id], bytes(params), attempt, args["lease"]) for idx, cid, params, attempt in rows]
                if len(rows) == k:
                    full.append((batch_id, tenants[batch_id]))
            want = allot(full, limit - len(out)) if len(out) < limit else {}
        return out

    def renew(self, owner: str, claims: Sequence[Claim], now: int, lease_us: int) -> list[Claim]:
        if not claims:
            return []
        held = self._call(
            lambda conn: conn.execute(
                "UPDATE batch_items i SET lease_until = %s FROM unnest(%s::text[], %s::integer[], %s::text[]) AS c(batch_id, idx, lease)"
                " WHERE i.batch_id = c.batch_id AND i.idx = c.idx AND i.lease = c.lease AND i.state = 'running' AND i.owner = %s"
                " RETURNING i.batch_id, i.idx",
                (now + lease_us, [c.batch_id for c in claims], [c.idx for c in claims], [c.lease for c in claims], owner),
            ).fetchall(),
            tx=False,
        )
        kept = set(map(tuple, held))
        return [c for c in claims if (c.batch_id, c.idx) not in kept]

    def release(self, claim: Claim, not_before: int) -> bool:
        n = self._call(
            lambda conn: conn.execute(
                "UPDATE batch_items SET state = 'pending', lease = '', owner = '', lease_until = 0, not_before = %s"
                " WHERE batch_id = %s AND idx = %s AND state = 'running' AND lease = %s",
                (not_before, claim.batch_id, claim.idx, claim.lease),
            ).rowcount,
            tx=False,
        )
        return n == 1

    def finish(self, claim: Claim, result: Literal["succeeded", "errored"], payload: bytes, now: int) -> bool:
        assert result in ("succeeded", "errored"), result
        # One statement, so one round trip and atomic without a transaction block.
        got = self._call(
            lambda conn: conn.execute(
                "WITH f AS (UPDATE batch_items SET state = %(r)s, result = %(p)s, params = '', finished_at = %(now)s"
                "           WHERE batch_id = %(b)s AND idx = %(i)s AND state = 'running' AND lease = %(lease)s RETURNING batch_id)"
                f" UPDATE batches SET processing = processing - 1, {result} = {result} + 1 FROM f WHERE batches.id = f.batch_id RETURNING 1",
                {"r": result, "p": payload, "now": now, "b": claim.batch_id, "i": claim.idx, "lease": claim.lease},
            ).fetchone(),
            tx=False,
        )
        return got is not None

    # -- housekeeping ----------------------------------------------------------

    def sweep(self, now: int) -> list[str]:
        # Each batch in its own transaction (see the module's lock order).
        ended: list[str] = []
        expired = self._call(
            lambda conn: conn.execute("SELECT id FROM batches WHERE status <> 'ended' AND mode = 'weir' AND expires_at <= %s", (now,)).fetchall(), tx=False
        )
        for (batch_id,) in expired:
            ended += self._call(self._expire, batch_id, now)
        canceling = self._call(lambda conn: conn.execute("SELECT id FROM batches WHERE status = 'canceling' AND mode = 'weir'").fetchall(), tx=False)
        for (batch_id,) in canceling:
            ended += self._call(self._end_canceling, batch_id, now)
        done = self._call(
            lambda conn: conn.execute(
                "UPDATE batches SET status = 'ended', ended_at = %s WHERE status = 'in_progress' AND mode = 'weir' AND processing = 0 RETURNING id", (now,)
            ).fetchall(),
            tx=False,
        )
        return ended + [i for (i,) in done]

    def _expire(self, conn: psycopg.Connection, batch_id: str, now: int) -> list[str]:
        rows = conn.execute(
            "WITH e AS (UPDATE batch_items SET state = 'expired', params = '', finished_at = %(now)s"
            "           WHERE batch_id = %(b)s AND state IN ('pending', 'running') RETURNING 1),"
            " n AS (SELECT count(*) AS n FROM e)"
            " UPDATE batches SET status = 'ended', ended_at = %(now)s, processing = processing - n.n, expired = expired + n.n"
            " FROM n WHERE id = %(b)s AND status <> 'ended' RETURNING id",
            {"now": now, "b": batch_id},
        ).fetchall()
        return [i for (i,) in rows]

    def _end_canceling(self, conn: psycopg.Connection, batch_id: str, now: int) -> list[str]:
        # Items released since the cancel, and items whose worker died (lease
        # run out: nobody reclaims in a canceling batch), are canceled.
        conn.execute(
            "WITH c AS (UPDATE batch_items SET state = 'canceled', params = '', finished_at = %(now)s"
            "           WHERE batch_id = %(b)s AND (state = 'pending' OR (state = 'running' AND lease_until <= %(now)s)) RETURNING 1),"
            " n AS (SELECT count(*) AS n FROM c)"
            " UPDATE batches SET processing = processing - n.n, canceled = canceled + n.n FROM n WHERE id = %(b)s",
            {"now": now, "b": batch_id},
        )
        rows = conn.execute(
            "UPDATE batches SET status = 'ended', ended_at = %(now)s WHERE id = %(b)s AND status = 'canceling'"
            " AND NOT EXISTS (SELECT 1 FROM batch_items WHERE batch_id = %(b)s AND state = 'running') RETURNING id",
            {"now": now, "b": batch_id},
        ).fetchall()
        return [i for (i,) in rows]

    def results(self, tenant: str, batch_id: str, after_idx: int, limit: int) -> list[tuple[int, bytes]]:
        rows = self._call(
            lambda conn: conn.execute(
                "SELECT i.idx, i.custom_id, i.state, i.result FROM batch_items i JOIN batches b ON b.id = i.batch_id"
                " WHERE b.id = %s AND b.tenant = %s AND i.batch_id = %s AND i.idx > %s"
                " AND i.state IN ('succeeded', 'errored', 'canceled', 'expired') ORDER BY i.idx LIMIT %s",
                (batch_id, tenant, batch_id, after_idx, limit),
            ).fetchall(),
            tx=False,
        )
        return [(idx, result_line(cid, state, bytes(res) if res is not None else b"")) for idx, cid, state, res in rows]

    def retain(self, now: int, results_days: int) -> int:
        cutoff = now - results_days * DAY_US
        gone = self._call(
            lambda conn: conn.execute(
                "SELECT id FROM batches WHERE ended_at < %s OR (mode = 'passthrough' AND ended_at IS NULL AND expires_at < %s)", (cutoff, cutoff)
            ).fetchall(),
            tx=False,
        )
        for (batch_id,) in gone:
            # Chunks, each its own transaction: no long lock, no huge one-off
            # WAL burst; the batch row goes last, so a crash midway is redone.
            while (
                self._call(
                    lambda conn: conn.execute(
                        f"DELETE FROM batch_items WHERE batch_id = %s AND idx IN (SELECT idx FROM batch_items WHERE batch_id = %s LIMIT {CHUNK})",
                        (batch_id, batch_id),
                    ).rowcount,
                    tx=False,
                )
                == CHUNK
            ):
                pass
            self._call(lambda conn: conn.execute("DELETE FROM batches WHERE id = %s", (batch_id,)), tx=False)
        return len(gone)

    def close(self) -> None:
        self._pool.close()


def _get(conn: psycopg.Connection, tenant: str, batch_id: str) -> Batch | None:
    t = conn.execute(f"SELECT {BATCH_COLS} FROM batches WHERE id = %s AND tenant = %s", (batch_id, tenant)).fetchone()
    return None if t is None else batch_from_row(t)
