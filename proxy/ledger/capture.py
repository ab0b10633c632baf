"""A finished request → its ledger row. Pure: no clock of its own, no I/O.

Called once per request from ``Weir.finished``'s ``on_finished`` hooks with
the request's ``Outcome`` (proxy/context.py). Everything here reads what the
request path already knew; nothing is decoded that the path had not.

Outcomes, a closed set:

- ``served`` — relayed from an upstream call;
- ``cache_hit`` / ``coalesced`` — answered from the cache, or from a call
  another request made (their tokens and cost are the other call's, so they
  are recorded as 0: usage is what the upstream billed);
- ``answered_locally`` — Weir answered without any upstream (e.g. a token
  count estimated for an OpenAI-compatible target);
- ``rate_limited`` — Weir's own budget said no;
- ``shed`` — the fair queue was full or Weir was draining;
- ``rejected`` — a 4xx: bad input, bad key, or the upstream's own 4xx;
- ``client_closed`` — the client hung up first;
- ``failed`` — a 5xx after retries and failover, a timeout, every breaker
  open, a connection error, or a stream that broke: these are dead-lettered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .prices import PriceTable
from .row import Bodies, DeadLetter, LedgerRow

__all__ = ["row_for", "REPLAY_HEADERS"]

# What a replay needs to say the same thing again. Credentials (x-api-key,
# authorization, cookies) are never kept: a replay runs on the target's own
# keys as the original tenant.
REPLAY_HEADERS = frozenset(
    {b"anthropic-version", b"anthropic-beta", b"content-type", b"accept", b"user-agent", b"x-weir-priority", b"x-weir-project", b"x-weir-cache"}
)
# Client-chosen strings land in every row: cut them to a sane length (a
# 1 MB model name must not make a 1 MB row) and drop NULs (PostgreSQL text
# cannot hold them).
_MAX_STR = 200
_MODEL_PATHS = ("/v1/messages", "/v1/chat/completions")
# Counts and durations are stored as 32-bit integers in PostgreSQL (a
# duration in µs up to 35 minutes): clamp, so an outlier is a capped value
# rather than a row the database refuses.
_I4 = 2**31 - 1
_I2 = 2**15 - 1


def _us(seconds: float) -> int:
    return min(int(seconds * 1e6), _I4)


def _clean(value: str) -> str:
    if len(value) > _MAX_STR:
        value = value[:_MAX_STR]
    return value.replace("\x00", "") if "\x00" in value else value


def _header(headers: Mapping[bytes, bytes], name: bytes) -> str:
    v = headers.get(name)
    return _clean(v.decode("latin-1")) if v else ""


def client_family(user_agent: str) -> str:
    """``claude-cli/2.0.8 (external, cli)`` → ``claude-cli``; ``Anthropic/Python 0.40`` → ``anthropic``."""
    token = user_agent.split("/", 1)[0].split(" ", 1)[0].strip().lower()
    return token[:40]


def outcome_of(out: Any) -> str:
    status, result, error = out.status, out.result, out.error or ""
    if result == "client_closed":
        return "client_closed"
    if result == "rate_limited":
        return "rate_limited"
    if error == "overloaded_error" and status in (503, 529) and out.upstream_request_id is None:
        return "shed"  # Weir's fair queue shed it, or Weir was draining
    # A 5xx, no answer at all, a deadline, a bug, or a stream that broke after a 200.
    if result in ("deadline", "internal_error") or status >= 500 or status == 0 or (result == "error" and status < 400):
        return "failed"
    if status >= 400:
        return "rejected"
    if out.cache == "hit":
        return "cache_hit"
    if out.cache == "coalesced":
        return "coalesced"
    if not out.target or out.target == "local":
        return "answered_locally"
    return "served"


def row_for(out: Any, *, now_wall: float, prices: PriceTable, bodies: str = "off", body_limit: int = 256 * 1024) -> LedgerRow:
    """The row for one finished request, from its ``proxy.context.Outcome``
    (``total_s`` already set); ``now_wall`` is read once by the caller."""
    total_s = out.total_s
    outcome = outcome_of(out)
    target = out.target.partition(":")[0]
    served = ""
    if out.target and out.target != "local":
        served = _clean(out.served_model or out.model)
    headers = out.headers if out.headers is not None else {}
    path = out.path
    row = LedgerRow(
        request_id=out.request_id,
        started_at=int((now_wall - total_s) * 1e6),
        ended_at=int(now_wall * 1e6),
        tenant=out.tenant,
        project=out.project,
        ingress=out.ingress,
        kind=out.kind or "",
        method=out.method,
        path=_clean(path),
        model=_clean(out.model),
        target=target,
        served_model=served,
        key_id=out.key_id or "",
        status=out.status,
        outcome=outcome,
        error_type=out.error or "",
        cache=out.cache or "",
        attempts=min(out.attempts, _I2),
        failover=min(out.failover_index, _I2),
        stream=out.stream,
        queue_us=_us(out.queue_wait_s),
        upstream_head_us=_us(max(0.0, out.upstream_head_s - out.queue_wait_s)),
        first_token_us=_us(out.first_byte_s) if out.first_byte_s else 0,
        total_us=_us(total_s),
        overhead_us=_us(out.overhead_s),
        bytes_in=min(out.bytes_in or len(out.body), _I4),
        bytes_out=min(out.bytes_out, _I4),
        client=client_family(_header(headers, b"user-agent")),
        replay_of=out.replay_of,
        batch_id=out.batch_id,
    )
    # Usage is what the upstream billed: a cache hit or a coalesced follower
    # rode on another request's call, so its tokens and cost stay 0.
    if outcome in ("served", "failed") and out.input_tokens is not None:
        cache_write = out.cache_creation_tokens or 0
        row.input_tokens = min(max(0, out.input_tokens - cache_write), _I4)
        row.output_tokens = min(out.output_tokens or 0, _I4)
        row.cache_read_tokens = min(out.cache_read_tokens or 0, _I4)
        row.cache_creation_tokens = min(cache_write, _I4)
        row.cost_micros, row.price_version = prices.cost(served or row.model, row.input_tokens, row.output_tokens, row.cache_read_tokens, row.cache_creation_tokens)
    if bodies == "all" or (bodies == "errors" and (out.status >= 400 or outcome == "failed")):
        row.bodies = Bodies(request=out.body[:body_limit], response=out.response_body[:body_limit])
    if outcome == "failed" and out.method == "POST" and path in _MODEL_PATHS and out.body and not out.batch_id:
        # Failed for good: kept whole, whatever ledger.bodies says, for replay.
        # Not a batch item's: the batch runner retries those itself, and its
        # result is the item's answer (proxy/batches/runner.py).
        row.dead_letter = DeadLetter(
            method=out.method,
            path=path,
            query=out.query.decode("latin-1"),
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers.items() if n in REPLAY_HEADERS],
            body=out.body,
        )
    return row
