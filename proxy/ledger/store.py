"""What both backends share: the store interface, rollup keys, query shapes.

A store is synchronous — sqlite3 and psycopg's pool both block — and the
trio shell (``proxy.ledger.writer``) calls it through ``trio.to_thread``.
Keeping the stores free of trio makes them testable as plain functions and
leaves one place that decides what runs in a thread.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Protocol

import msgspec

from .row import LedgerRow

__all__ = ["Store", "LedgerUnavailable", "Query", "GROUPS", "HOUR_US", "DAY_US", "dlq_id", "rollup_key", "usage_out"]

HOUR_US = 3600 * 1_000_000
DAY_US = 24 * HOUR_US
# The longest a request can run (deadlines.total_s defaults to 600 s): a row
# ended after T started after T minus this, which lets "ended since" queries
# use the started_at index.
MAX_REQUEST_US = 3600 * 1_000_000

Group = Literal["tenant", "model", "project", "kind", "target"]
GROUPS: tuple[str, ...] = ("tenant", "model", "project", "kind", "target")

# Rollup counters, in table order.
COUNTERS = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_micros")


class LedgerUnavailable(Exception):
    """The database cannot take or answer a call right now (the writer spools)."""


class Query(msgspec.Struct, kw_only=True):
    tenant: str | None = None
    model: str | None = None
    status: int | None = None
    outcome: str | None = None
    batch_id: str | None = None  # a Message Batch's items (proxy/batches/)
    since: int | None = None  # µs, started at or after
    until: int | None = None  # µs, started before
    ended_since: int | None = None  # µs, for tailing
    limit: int = 100


def dlq_id(row: LedgerRow) -> str:
    """Deterministic, so a replayed spool batch finds its entry already there."""
    return "dlq_" + hashlib.sha256(f"{row.request_id}|{row.started_at}".encode()).hexdigest()[:20]


def rollup_key(row: LedgerRow) -> tuple:
    # Usage by model is by the model that served (what was billed), falling
    # back to the one asked for when nothing served it.
    return (row.started_at - row.started_at % HOUR_US, row.tenant, row.project, row.served_model or row.model, row.kind, row.target.split(":", 1)[0])


def rollup(rows: list[LedgerRow]) -> list[tuple]:
    """Per (hour, tenant, project, model, kind, target): the counters, sorted by
    key so every writer takes row locks in the same order (no deadlocks between
    writers upserting the same rollup rows — LiteLLM's spend-update deadlock)."""
    acc: dict[tuple, list[int]] = {}
    for r in rows:
        k = rollup_key(r)
        c = acc.get(k)
        if c is None:
            c = acc[k] = [0, 0, 0, 0, 0, 0, 0]
        c[0] += 1
        c[1] += r.status >= 400 or r.status == 0
        c[2] += r.input_tokens
        c[3] += r.output_tokens
        c[4] += r.cache_read_tokens
        c[5] += r.cache_creation_tokens
        c[6] += r.cost_micros
    return [(*k, *c) for k, c in sorted(acc.items())]


def usage_out(group: str, rows: list[tuple]) -> list[dict]:
    out = []
    for g, requests, errors, inp, outp, cread, cwrite, micros in rows:
        out.append(
            {
                group: g,
                "requests": int(requests),
                "errors": int(errors),
                "input_tokens": int(inp),
                "output_tokens": int(outp),
                "cache_read_tokens": int(cread),
                "cache_creation_tokens": int(cwrite),
                "cost_micros": int(micros),
                "cost_usd": round(int(micros) / 1e6, 6),
            }
        )
    return out


class Store(Protocol):
    kind: str

    def migrate(self) -> int: ...
    def write(self, rows: list[LedgerRow]) -> int: ...
    def requests(self, q: Query) -> list[dict]: ...
    def request(self, request_id: str) -> dict | None: ...
    def usage(self, group: str, since: int | None, until: int | None) -> list[dict]: ...
    def usage_by_batch(self, batch_id: str | None, since: int | None, until: int | None) -> list[dict]: ...
    def dlq_list(self, limit: int, since: int | None) -> list[dict]: ...
    def dlq_get(self, entry_id: str) -> dict | None: ...
    def dlq_mark(self, entry_id: str, request_id: str, status: int, at: int) -> None: ...
    def retain(self, now: int, days: int, bodies_days: int, dlq_days: int) -> dict: ...
    def size(self) -> dict: ...
    def close(self) -> None: ...
