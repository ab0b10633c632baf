"""The ledger's unit: one narrow row per finished request, whatever its outcome.

A row is plain data (a msgspec Struct): the request path builds it once, the
writer batches it, the spool persists it as msgpack, the backends store its
columns. Times are integers — wall-clock microseconds since the epoch for
``started_at``/``ended_at`` (rows from many processes and hosts are compared),
microseconds for durations — so a row costs a few bytes per field on disk and
compares exactly after a round trip through any backend.

Bodies and the dead-letter entry travel with the row (so the spool keeps them
as durably as the row) but are stored in tables of their own.
"""

from __future__ import annotations

import msgspec

__all__ = ["LedgerRow", "Bodies", "DeadLetter", "COLUMNS", "V1_COLUMNS", "row_to_dict"]


class Bodies(msgspec.Struct, omit_defaults=True, frozen=True):
    """Request and response bodies, stored only when ``ledger.bodies`` asks."""

    request: bytes = b""
    response: bytes = b""


class DeadLetter(msgspec.Struct, omit_defaults=True, frozen=True):
    """What a replay needs besides the body: never a credential (headers are
    filtered before they get here; see ``proxy.ledger.capture``)."""

    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = []
    body: bytes = b""


class LedgerRow(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    started_at: int  # µs since the epoch
    ended_at: int = 0
    tenant: str = ""
    project: str = ""  # x-weir-project
    ingress: str = ""  # "anthropic" | "openai"
    kind: str = ""
    method: str = ""
    path: str = ""
    model: str = ""  # asked for
    target: str = ""  # upstream that served (or last tried)
    served_model: str = ""
    key_id: str = ""  # the key pool's id, never the key
    status: int = 0
    outcome: str = ""
    error_type: str = ""
    cache: str = ""  # hit | miss | coalesced | bypass | ""
    attempts: int = 0
    failover: int = 0  # index of the target in the route's chain
    stream: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_micros: int = 0  # integer micro-dollars
    price_version: str = ""  # "" = no price known for the model
    queue_us: int = 0
    upstream_head_us: int = 0
    first_token_us: int = 0
    total_us: int = 0
    overhead_us: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    client: str = ""  # user-agent family
    replay_of: str = ""  # the dead-letter entry this request replayed
    # The Message Batch this request ran for (proxy/batches/): "" for every
    # other request. Last, because ledger migration 2 appended the column.
    batch_id: str = ""
    # Carried with the row, stored elsewhere.
    bodies: Bodies | None = None
    dead_letter: DeadLetter | None = None


# The stored columns, in table order (everything but the two carried extras).
COLUMNS: tuple[str, ...] = tuple(f for f in LedgerRow.__struct_fields__ if f not in ("bodies", "dead_letter"))
# The columns the first migration created; later migrations add the rest, so
# migration 1's DDL stays what it was on a database made before them.
V1_COLUMNS: tuple[str, ...] = COLUMNS[: COLUMNS.index("batch_id")]


def row_to_dict(row: LedgerRow) -> dict:
    return {c: getattr(row, c) for c in COLUMNS}
