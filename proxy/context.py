"""What travels with one request, and what comes back about it.

Two records, kept apart on purpose:

- ``RequestContext``: the facts of the request, fixed once the envelope is
  read — who asks, for what, how urgently, by when, and what the cache may do.
  Frozen: every layer below ``app.py`` (cache, coalescer, router) reads it and
  none writes it, so a layer can never learn about a request from a field
  another layer happened to set.
- ``Outcome``: what happened — filled in once per request as the answer is
  produced (by the app from the ``Served`` facts each response carries and
  from the relay), then handed, finished, to ``Weir.finished``: the one place
  a request's record is emitted (the access log, and the ``Weir.on_finished``
  hooks the request ledger and the metrics read).

Closed sets are ``Literal`` types, as ``proxy/retry.py``'s ``Decision`` is a
union: a value outside the set is a bug a type checker can see.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "Ingress",
    "Priority",
    "CacheOutcome",
    "Result",
    "Verdict",
    "Deadlines",
    "RequestContext",
    "Served",
    "Outcome",
    "PRIORITIES",
]

Ingress = Literal["anthropic", "openai"]
# Scheduler classes, highest first (proxy/scheduler.py orders them so).
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
# x-weir-cache on every /v1/messages response.
CacheOutcome = Literal["hit", "miss", "coalesced", "bypass"]
# How a request ended, as the access log and the ledger report it.
Result = Literal["ok", "error", "client_closed", "deadline", "rate_limited", "internal_error"]
# What the breaker was told about the target that answered: a failure or a
# success recorded, or the permit given back without a verdict (the client left
# before the target could be judged).
Verdict = Literal["success", "failure", "released"]


class Deadlines(msgspec.Struct, frozen=True):
    """``total`` is an absolute trio time; the others are spans, in seconds."""

    total: float
    first_byte_s: float
    idle_s: float


class RequestContext(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    received: float  # perf_counter at arrival
    method: str
    path: str  # the checked raw path, as forwarded
    ingress: Ingress
    tenant: str
    # The client's own credentials go upstream (no client keys configured).
    passthrough: bool
    model: str  # as the client asked ("" for routes without a body model)
    stream: bool
    priority: Priority
    deadlines: Deadlines
    # The cache's plan (a ``proxy.caching.Lookup``): None means bypass.
    lookup: Any = None
    # Request kind ("main" for a conversation turn; side calls get their own)
    # and the project a client names in ``x-weir-project`` ("" when none).
    kind: str = "main"
    project: str = ""
    # The request's trace span (proxy/tracing.py); None when tracing is off.
    span: Any = None


class Served(msgspec.Struct):
    """Who answered, set by the layer that produced a response.

    Every response an opener yields carries one (``resp.served``). The router
    fills the target fields when the head arrives and ``verdict`` when the
    response closes; the cache layer fills ``cache``.
    """

    target: str = ""  # "name" or "name:model"; "" for a reply from the cache
    model: str = ""  # the model name sent upstream ("" = the client's)
    key_id: str | None = None
    attempts: int = 0  # upstream calls made, retries and failovers included
    failover_index: int = 0  # position in the route's chain of the target that answered
    queue_wait_s: float = 0.0  # in the answering target's fair queue
    cache: CacheOutcome | None = None
    verdict: Verdict | None = None  # set when the response closes
    # Request fields the target's translation could not carry (proxy/translate/to_openai.py).
    dropped: tuple[str, ...] = ()


class Outcome(msgspec.Struct, kw_only=True):
    """One request's record; the access-log line is built from it.

    Times are seconds of ``perf_counter`` from ``received``, or spans.
    """

    request_id: str
    received: float
    method: str
    path: str
    ingress: Ingress = "anthropic"
    tenant: str = ""
    model: str = ""
    stream: bool = False
    kind: str | None = None  # proxy/kinds.py: set on /v1/messages only
    project: str = ""
    status: int = 0
    result: Result = "ok"
    error: str | None = None  # the error type, Anthropic's vocabulary (or "upstream_reset" and kin)
    cache: CacheOutcome | None = None
    target: str = ""
    served_model: str = ""
    key_id: str | None = None
    attempts: int = 0
    failover_index: int = 0
    breaker: Verdict | None = None
    upstream_request_id: str | None = None
    queue_wait_s: float = 0.0
    upstream_head_s: float = 0.0  # from asking the opener to holding the head
    first_byte_s: float | None = None  # arrival to the first body byte sent (streams: the first token's event)
    total_s: float = 0.0
    overhead_s: float = 0.0  # Weir's own time before the head left (x-weir-overhead-ms)
    bytes_in: int = 0
    bytes_out: int = 0
    input_tokens: int | None = None  # cache writes included, as the rate limiter counts
    output_tokens: int | None = None
    cache_read_tokens: int | None = None  # priced apart by the ledger (proxy/ledger/prices.py)
    cache_creation_tokens: int | None = None
    dropped: tuple[str, ...] = ()
    # Weir's own trace id when tracing is on, else the client's traceparent's, else "".
    trace_id: str = ""
    span: Any = None  # the live span, ended by Weir.finished
    # For the request ledger (proxy/ledger/capture.py), references rather than
    # copies: the request as read (a failed one is dead-lettered with it, and
    # ledger.bodies may keep it), its query string and header map (the ledger
    # keeps only replay-safe headers, never a credential), the reply's first
    # bytes when ledger.bodies asks for them, and the dead-letter entry a
    # replay came from.
    body: bytes = b""
    query: bytes = b""
    headers: Any = None
    response_body: bytes = b""
    replay_of: str = ""
    # The Message Batch an item ran for (proxy/batches/runner.py), else "".
    batch_id: str = ""

    def take(self, served: Served) -> None:
        self.target = served.target
        self.served_model = served.model
        self.key_id = served.key_id
        self.attempts = served.attempts
        self.failover_index = served.failover_index
        self.queue_wait_s = served.queue_wait_s
        self.cache = served.cache
        self.dropped = served.dropped
