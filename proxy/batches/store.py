"""What both batch backends share: the interface, the claim, the one error.

A store is synchronous — sqlite3 and psycopg's pool both block — and the
trio shell (the runner and the HTTP handlers) calls it through
``trio.to_thread``, as the ledger's writer does (proxy/ledger/store.py):
the stores stay testable as plain functions, with threads standing in for
concurrent workers.

Every time is passed in (µs since the epoch, wall clock): the store never
reads a clock, so leases and expiry are tested by choosing ``now``.

Item states: ``pending`` → ``running`` (claimed: a lease token and a lease
expiry) → ``succeeded`` | ``errored`` | ``canceled`` | ``expired``. The
finishing write is conditional on the claim's lease still being the item's,
so however many workers ran an item, one result is stored.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

import msgspec

from .model import Batch, Counts, Status

__all__ = ["BatchStore", "Claim", "BatchUnavailable", "DONE", "PENDING", "RUNNING", "ITEM_STATES", "DeleteResult", "allot", "open_store"]

PENDING = "pending"
RUNNING = "running"
DONE = ("succeeded", "errored", "canceled", "expired")
ITEM_STATES = (PENDING, RUNNING, *DONE)

DeleteResult = Literal["deleted", "not_found", "not_ended"]

# Rows deleted per transaction when a whole batch goes (retention): a few ms
# of work, so other workers' claims and finishes wait at most that long.
CHUNK = 5000


class BatchUnavailable(Exception):
    """The database cannot take or answer a call right now (the caller retries or answers 503)."""


class Claim(msgspec.Struct, frozen=True):
    """One item a worker holds: run it, then ``finish`` or ``release`` it.

    ``lease`` is a fresh token per claim: a reclaim after the lease ran out
    gets a new one, and only the holder of the current one can finish.
    ``attempt`` counts claims of this item (1 on the first).
    """

    batch_id: str
    idx: int
    custom_id: str
    tenant: str
    params: bytes
    attempt: int
    lease: str


class BatchStore(Protocol):
    kind: str

    def migrate(self) -> int:
        """Bring the tables to the newest version; returns it. Idempotent, safe from many workers at once."""

    def create(self, batch: Batch, items: Sequence[tuple[str, bytes]]) -> None:
        """The batch and its items (idx 0..n-1) in one transaction. Passthrough batches have no items."""

    def get(self, tenant: str, batch_id: str) -> Batch | None:
        """Counts up to date (a row per batch, no scan); another tenant's batch is None."""

    def list(self, tenant: str, *, before_id: str | None = None, after_id: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
        """Newest first, and whether more lie beyond the page (newer for ``before_id``, older otherwise)."""

    def cancel(self, tenant: str, batch_id: str, now: int) -> Batch | None:
        """``in_progress`` → ``canceling``; unclaimed items are canceled at once, running ones finish or are
        canceled by ``sweep``. Any other state (and passthrough batches) is returned as it is."""

    def sync(
        self, tenant: str, batch_id: str, processing_status: Status, counts: Counts,
        ended_at: int | None, cancel_initiated_at: int | None, archived_at: int | None,
    ) -> None:  # fmt: skip
        """A passthrough row takes the state its upstream reported (it has no items here to count);
        weir batches are left alone — their state is their items'."""

    def delete(self, tenant: str, batch_id: str) -> DeleteResult:
        """Only an ended batch goes (with its items); a passthrough row goes whenever asked."""

    def claim(self, owner: str, now: int, lease_us: int, limit: int) -> list[Claim]:
        """Up to ``limit`` items of ``in_progress`` batches: pending ones due (``not_before`` passed) and
        running ones whose lease ran out. Shared round-robin across tenants, then their batches."""

    def renew(self, owner: str, claims: Sequence[Claim], now: int, lease_us: int) -> list[Claim]:
        """Extend leases still held; returns the claims that are no longer held (reclaimed, expired, canceled)."""

    def release(self, claim: Claim, not_before: int) -> bool:
        """Back to pending, due at ``not_before``, no result written (shed, overloaded, target lost).
        In a canceling batch the item is canceled instead. False if the lease is no longer held."""

    def finish(self, claim: Claim, result: Literal["succeeded", "errored"], payload: bytes, now: int) -> bool:
        """Write the item's result if this claim still holds its lease; False otherwise (written by someone
        else, reclaimed, expired): the result is written exactly once."""

    def sweep(self, now: int) -> list[str]:
        """Expire batches past ``expires_at``; end canceling batches with nothing running and batches with
        every item done. Returns the ids that ended."""

    def results(self, tenant: str, batch_id: str, after_idx: int, limit: int) -> list[tuple[int, bytes]]:
        """(idx, JSONL line) of ended items with idx > ``after_idx``, in idx order; page with the last idx."""

    def retain(self, now: int, results_days: int) -> int:
        """Delete batches (and items) ended more than ``results_days`` ago; returns how many."""

    def close(self) -> None: ...


def allot(candidates: Sequence[tuple[str, str]], limit: int) -> dict[str, int]:
    """Share ``limit`` claims among (batch id, tenant) candidates, round-robin
    over tenants and, within a tenant, over its batches — in the order given
    (the backends pass least recently claimed first, so the share rotates).

    One tenant's 100,000-item batch then cannot take every claim while
    another tenant's ten-item batch waits; between tenants the fair queue
    has the last word, this only keeps both in front of it.
    """
    by_tenant: dict[str, list[str]] = {}
    for batch_id, tenant in candidates:
        by_tenant.setdefault(tenant, []).append(batch_id)
    queues = [[bs, 0] for bs in by_tenant.values()]
    out: dict[str, int] = {}
    given = 0
    while given < limit and queues:
        for q in queues:
            if given == limit:
                break
            batches, turn = q
            b = batches[turn % len(batches)]
            q[1] = turn + 1
            out[b] = out.get(b, 0) + 1
            given += 1
    return out


def open_store(ledger_url: str, data_dir: str, *, pg_schema: str = "public", pg_max_connections: int = 4) -> BatchStore:
    """The batch store in the ledger's database, as ``proxy.ledger.service.open_store``
    picks the ledger's: a ``postgresql://`` URL is PostgreSQL (same schema);
    anything else — the embedded default ``""``, and ``"off"`` too, since
    batches need a home even without a ledger — is ``ledger.db`` in the data
    directory."""
    if ledger_url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresBatchStore

        return PostgresBatchStore(ledger_url, schema=pg_schema, max_connections=pg_max_connections)
    import os

    from .sqlite import SQLiteBatchStore

    return SQLiteBatchStore(os.path.join(data_dir, "ledger.db"))
