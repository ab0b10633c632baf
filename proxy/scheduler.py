"""Schedule: the fair queue in front of one upstream target.

One global semaphore lets a long request hold the line for short ones and lets
one heavy client fill every slot. This module replaces it with a fair queue per
upstream target, and it is the *only* queue on the path: the concurrency cap is
the target's connection budget, so the connection pool never holds waiters of
its own (docs/ARCHITECTURE.md: httpcore's pool scans grew with waiters, and 500
queued requests under its default limits ended in PoolTimeout).

Two layers, h11-style:

* :class:`FairQueue` is the policy. It is pure code: tickets go in, grants come
  out, and every method that needs the time takes ``now``. Deterministic tests
  drive it with simulated arrivals.
* :class:`Scheduler` is the thin trio shell: ``async with scheduler.slot(...)``
  parks the task until the policy grants it and frees the slot exactly once on
  every way out of the block.
* :class:`PaceBudget` is a provider's per-minute quota, inside the same
  policy: when a target has one, a grant needs a free slot *and* the budget's
  say-so, so requests beyond the quota wait in this queue, fairly ordered and
  evenly spaced, instead of going out to fail with 429.

:class:`FifoSemaphoreScheduler` is the old design behind the same interface,
kept so the benchmark compares the two in one run.
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

import msgspec
import trio

from proxy.errors import ProxyError

__all__ = [
    "FairQueue",
    "PaceBudget",
    "FifoSemaphoreScheduler",
    "Overloaded",
    "Scheduler",
    "Ticket",
    "QUEUED",
    "GRANTED",
    "RELEASED",
    "CANCELLED",
]

# Ticket states. A ticket moves QUEUED -> GRANTED -> RELEASED, or QUEUED ->
# CANCELLED; a shed ticket never leaves NEW. Explicit states (not flags) make
# "free the slot exactly once" a check on one field.
NEW = "new"
QUEUED = "queued"
GRANTED = "granted"
RELEASED = "released"
CANCELLED = "cancelled"

# Shed reasons, as they appear in stats and in Overloaded.reason.
SHED_QUEUE_FULL = "queue_full"
SHED_TENANT_QUEUE_FULL = "tenant_queue_full"
SHED_DEADLINE = "deadline"
SHED_EXPIRED = "deadline_expired"  # the deadline passed while the ticket waited


class Overloaded(ProxyError):
    """The scheduler will not serve this request in time: answer 529 now.

    Failing fast with a ``retry-after`` beats holding a connection until the
    client's own timeout fires, and 529 ``overloaded_error`` is what Anthropic
    answers in the same situation, so SDKs back off as they would against it.
    """

    def __init__(self, retry_after: float, reason: str) -> None:
        self.retry_after = retry_after
        self.reason = reason
        # retry-after is whole seconds (RFC 9110); round up so clients never retry early.
        seconds = str(max(1, math.ceil(retry_after))).encode()
        super().__init__(
            529,
            f"Overloaded: {reason}",
            "overloaded_error",
            headers=[(b"retry-after", seconds)],
        )


class PaceBudget:
    """A provider's per-minute quota for one target, spent evenly: pure policy.

    Providers publish a quota per minute (NVIDIA NIM's free tier: 40
    requests) and answer 429 past it. Sending a backlog at once and letting
    the provider refuse most of it wastes the calls and the client's retries;
    this budget instead says *when* the queue's next grant may go, so waiting
    requests leave spaced out and none is refused.

    Pacing is GCRA (the leaky bucket as a virtual schedule, one float per
    quota): each grant moves the "theoretical arrival time" ``tat`` one
    interval on, and a grant may go once ``tat`` is at most ``burst - 1``
    intervals ahead of now. For requests the interval is ``60 / (L - burst)``
    seconds, not ``60 / L``: GCRA lets ``burst + 60/interval`` requests
    through in any 60-second window, so spacing at ``L - burst`` a minute
    keeps every window — a provider's sliding one included — at ``L`` or
    fewer (40 a minute, burst 2: one request every 1.58 s, 40 in any minute,
    never 41). Tokens are paced at their quota (their costs are estimates,
    request bytes / 4, so there is no exact window to keep), with the same
    burst counted in requests of the size last sent.

    A 429 means the quota is smaller than configured, or shared with someone
    else: AIMD, as TCP does for the same reason. The rate halves (at most once
    per flight: a 429 for a request sent before the last decrease says
    nothing new), the budget sends nothing until the 429's ``retry-after``,
    and it stays lowered until the provider's window has passed (the
    ``retry-after`` or a whole minute); after that each success adds back a
    tenth of the configured rate.
    """

    __slots__ = (
        "window", "burst", "requests_per_window", "tokens_per_window",
        "_interval", "_tok_rate", "_scale", "_decrease", "_increase", "_floor",
        "_tat", "_tok_tat", "_tok_step", "_hold_until", "_decreased_at", "rate_limited",
    )

    def __init__(
        self,
        *,
        requests_per_minute: float = 0.0,
        tokens_per_minute: float = 0.0,
        burst: int = 2,  # the default; see UpstreamSettings.burst
        window: float = 60.0,  # providers count per minute
        # TCP's multiplicative decrease (RFC 5681 halves the window on loss).
        decrease: float = 0.5,
        # A tenth of the configured rate per success: back to full within ten
        # good answers once the window has passed.
        increase: float = 0.1,
        # Never below 1/16 of the quota: a quota halved four times in a row
        # is a provider that is down, which the breaker handles, not pacing.
        floor: float = 1 / 16,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if requests_per_minute and burst >= requests_per_minute:
            raise ValueError("burst must be below requests_per_minute")
        self.window = window
        self.burst = burst
        self.requests_per_window = requests_per_minute
        self.tokens_per_window = tokens_per_minute
        self._interval = window / (requests_per_minute - burst) if requests_per_minute else 0.0
        self._tok_rate = tokens_per_minute / window if tokens_per_minute else 0.0
        self._scale = 1.0
        self._decrease, self._increase, self._floor = decrease, increase, floor
        self._tat = -math.inf
        self._tok_tat = -math.inf
        self._tok_step = 0.0
        self._hold_until = -math.inf
        self._decreased_at = -math.inf
        self.rate_limited = 0  # upstream 429s seen

    @property
    def scale(self) -> float:
        """The share of the configured quota in use (1.0 until a 429)."""
        return self._scale

    def interval(self) -> float:
        """Seconds between paced requests now (0: no request quota)."""
        return self._interval / self._scale

    def ready_at(self) -> float:
        """The earliest time the next grant may go (``-inf``: now)."""
        slack = self.burst - 1
        t = self._tat - slack * self._interval / self._scale if self._interval else -math.inf
        if self._tok_rate:
            t = max(t, self._tok_tat - slack * self._tok_step)
        return t

    def wait(self, now: float, ahead: int, tokens: int) -> float:
        """Seconds until a request with ``ahead`` grants before it may go.

        GCRA's schedule, read forward: the ``j``-th grant from now goes at
        ``max(tat, now) + (j - (burst - 1)) × interval``, no earlier than now.
        The token term assumes the requests ahead are the size of this one.
        """
        slack = self.burst - 1
        wait = 0.0
        if self._interval:
            wait = max(self._tat, now) + (ahead - slack) * self.interval() - now
        if self._tok_rate:
            tok = max(self._tok_tat, now) - slack * self._tok_step + ahead * tokens / (self._tok_rate * self._scale) - now
            wait = max(wait, tok)
        return max(0.0, wait)

    def charge(self, now: float, tokens: int) -> None:
        """A grant went at ``now`` carrying an estimated ``tokens``."""
        if self._interval:
            self._tat = max(self._tat, now) + self._interval / self._scale
        if self._tok_rate:
            self._tok_step = tokens / (self._tok_rate * self._scale)
            self._tok_tat = max(self._tok_tat, now) + self._tok_step

    def rate_limited_by_upstream(self, now: float, sent_at: float, retry_after: float | None) -> None:
        """The provider answered 429 to a request granted at ``sent_at``."""
        self.rate_limited += 1
        if sent_at >= self._decreased_at:  # else sent at the old rate: that decrease answered it
            self._scale = max(self._floor, self._scale * self._decrease)
            self._decreased_at = now
        pause = retry_after if retry_after is not None and retry_after > 0 else 0.0
        if pause:
            # Nothing goes before the provider said it may: the next grant's
            # ready_at lands on now + retry-after.
            slack = self.burst - 1
            if self._interval:
                self._tat = max(self._tat, now + pause + slack * self._interval / self._scale)
            if self._tok_rate:
                self._tok_tat = max(self._tok_tat, now + pause + slack * self._tok_step)
        self._hold_until = max(self._hold_until, now + (pause or self.window))

    def succeeded(self, now: float) -> None:
        """The provider accepted a request: past the window, win back some rate."""
        if self._scale < 1.0 and now >= self._hold_until:
            self._scale = min(1.0, self._scale + self._increase)

    def snapshot(self) -> dict[str, float]:
        return {
            "requests_per_minute": self.requests_per_window,
            "tokens_per_minute": self.tokens_per_window,
            "burst": self.burst,
            "scale": self._scale,
            "interval_s": self.interval(),
            "rate_limited": self.rate_limited,
        }


class Ticket:
    """One request's place in the queue.

    A plain slotted class rather than a Struct: tickets are hashed by identity
    and mutated on the hot path. ``handle`` belongs to the shell (the trio
    Event it parks on); the policy never reads it.
    """

    __slots__ = ("tenant", "priority", "cost", "tokens", "enqueued_at", "deadline", "granted_at", "state", "handle", "_tq")

    def __init__(
        self,
        tenant: str,
        priority: str,
        enqueued_at: float,
        deadline: float | None = None,
        cost: float = 1.0,  # one request; token-estimated costs plug in here later
        tokens: int = 0,  # estimated input tokens, charged to a PaceBudget's token quota
    ) -> None:
        self.tenant = tenant
        self.priority = priority
        self.cost = cost
        self.tokens = tokens
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.granted_at: float | None = None
        self.state = NEW
        self.handle: object = None
        self._tq: _TenantQueue | None = None

    def __repr__(self) -> str:
        return f"Ticket({self.tenant!r}, {self.priority!r}, state={self.state})"


class _TenantQueue:
    """One tenant's FIFO inside one priority class.

    Cancelled tickets stay in ``items`` as garbage (cancel is O(1)) but leave
    the counts at once; the deque is compacted when garbage outgrows the live
    tickets, so a tenant that enqueues and cancels in a loop cannot grow it.
    """

    __slots__ = ("tenant", "weight", "items", "live", "garbage", "deficit", "in_ring", "credited")

    def __init__(self, tenant: str, weight: float) -> None:
        self.tenant = tenant
        self.weight = weight
        self.items: deque[Ticket] = deque()
        self.live = 0
        self.garbage = 0
        self.deficit = 0.0
        self.in_ring = False
        self.credited = False

    def head(self) -> Ticket | None:
        items = self.items
        while items:
            t = items[0]
            if t.state is QUEUED:
                return t
            items.popleft()
            self.garbage -= 1
        return None

    def compact(self) -> None:
        self.items = deque(t for t in self.items if t.state is QUEUED)
        self.garbage = 0


class _Class:
    """One priority class: a DRR ring over its backlogged tenants."""

    __slots__ = ("name", "rank", "tenants", "ring", "live", "active_weight", "skipped")

    def __init__(self, name: str, rank: int) -> None:
        self.name = name
        self.rank = rank
        self.tenants: dict[str, _TenantQueue] = {}
        self.ring: deque[_TenantQueue] = deque()
        self.live = 0
        self.active_weight = 0.0  # sum of weights of tenants with live tickets
        self.skipped = 0  # grants given to higher classes while this one waited


class _TenantStats:
    __slots__ = ("granted", "shed", "wait_count", "wait_sum", "wait_max")

    def __init__(self) -> None:
        self.granted = 0
        self.shed: dict[str, int] = {}
        self.wait_count = 0
        self.wait_sum = 0.0
        self.wait_max = 0.0


class TenantStats(msgspec.Struct):
    depth: dict[str, int]  # priority class -> tickets waiting
    granted: int
    shed: dict[str, int]  # reason -> count
    wait_count: int
    wait_sum: float
    wait_max: float


class QueueStats(msgspec.Struct):
    capacity: int
    in_flight: int
    depth: int
    depth_by_priority: dict[str, int]
    service_time_ewma: float | None
    tenants: dict[str, TenantStats]
    budget: dict[str, float] | None = None  # the provider quota's pacing, when the target has one


class FairQueue:
    """Deficit round-robin over tenants, inside strict-but-not-starving priority classes.

    Why DRR and not WFQ/virtual time: DRR is O(1) per grant with a deque per
    class (WFQ needs a heap, O(log n), and virtual-time bookkeeping that must be
    repaired whenever a waiter cancels), it needs no clock, and with equal costs
    its long-run shares are exact: each backlogged tenant gets ``weight ×
    quantum`` of cost per round. Its known weakness, burstiness within a round,
    is at most one quantum per tenant — one request at the default quantum.

    The grant loop visits the tenant at the head of the ring; on the first visit
    of a round the tenant's deficit grows by its quantum, it is served while its
    deficit covers its head ticket's cost, then it goes to the back. A tenant
    whose queue empties leaves the ring and forfeits its deficit (standard DRR:
    idle tenants bank no credit). The loop turns at most ``ceil(cost /
    quantum)`` rounds per grant, so keep ``quantum`` near the typical cost if
    costs become token estimates.

    Priority classes are ordered, highest first. The highest class with waiters
    goes first, except that a lower class which has watched ``starvation_limit
    - 1`` grants go above it while it waited gets the next one: each backlogged
    lower class receives at least one grant in ``starvation_limit``.

    Capacity counts tickets, not cost: it is the target's connection budget,
    and one request holds one connection whatever its size.
    """

    def __init__(
        self,
        *,
        capacity: int,
        max_queue: int,
        weights: dict[str, float] | None = None,
        default_weight: float = 1.0,  # unlisted tenants share equally (the brief's default)
        priorities: tuple[str, ...] = ("interactive", "batch"),  # highest first
        # 10 => batch keeps >= 10% of grants under an interactive flood while
        # interactive keeps >= 90%; our choice, tune per deployment.
        starvation_limit: int = 10,
        # None => one tenant may fill the whole queue; set lower so a flood
        # from one tenant cannot push everyone else into shedding.
        max_queue_per_tenant: int | None = None,
        quantum: float = 1.0,  # one default-cost request per weight unit per round
        # 0.2 => a sample's influence halves after ~3 more samples: follows a
        # shift in model latency within a few requests without jumping on one outlier.
        ewma_alpha: float = 0.2,
        # None => no deadline shedding until a real hold has been measured;
        # guessing would shed good requests on a cold start.
        initial_service_time: float | None = None,
        # retry-after below 1 s invites an instant retry storm; HTTP rounds to seconds anyway.
        min_retry_after: float = 1.0,
        # The provider's quota for this target; None = only the slots limit grants.
        budget: PaceBudget | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if starvation_limit < 2:
            raise ValueError("starvation_limit must be >= 2")
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_queue_per_tenant = max_queue if max_queue_per_tenant is None else max_queue_per_tenant
        self._weights = dict(weights or {})
        self._default_weight = default_weight
        self._starvation_limit = starvation_limit
        self._quantum = quantum
        self._alpha = ewma_alpha
        self._service = initial_service_time
        self._min_retry_after = min_retry_after
        self.budget = budget
        self._classes = [_Class(name, i) for i, name in enumerate(priorities)]
        self._by_name = {c.name: c for c in self._classes}
        self._tenant_live: dict[str, int] = {}
        self._stats: dict[str, _TenantStats] = {}
        self.in_flight = 0
        self.depth = 0

    # -- queries -----------------------------------------------------------

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, self._default_weight)

    @property
    def service_time(self) -> float | None:
        return self._service

    def expected_wait(self, ticket: Ticket, now: float | None = None) -> float | None:
        """Seconds ``ticket`` would wait if enqueued now; None with no estimate yet.

        The estimator, O(1) per call:

        * ``mine`` = tickets of the same tenant already in its class; they all
          go before this one (FIFO within a tenant).
        * Under DRR, while the tenant gets ``mine + 1`` grants, the other
          backlogged tenants of the class get ``(mine + 1) × (W − w) / w``,
          where ``w`` is the tenant's weight and ``W`` the sum over backlogged
          tenants — capped by what they actually have queued. This assumes
          the others stay backlogged, so it errs towards waiting longer.
        * Higher classes go first, but the starvation guard gives this class
          one grant in ``starvation_limit``: at most ``(limit − 1)`` higher
          grants per grant of ours, capped by their queued tickets.
        * The tickets ahead drain at ``capacity`` slots per EWMA slot-hold
          time, after the free slots absorb the first ones:
          ``wait = max(0, ahead + 1 − free) × service_time / capacity``.
        * With a provider budget (and ``now``), the tickets ahead also leave
          one budget interval apart after the budget's next opening; the
          longer of the two waits is the estimate (the pacing wait is known
          from the first request on, so it sheds even on a cold start).
        """
        if self._service is None and (self.budget is None or now is None):
            return None
        cls = self._by_name[ticket.priority]
        w = self.weight(ticket.tenant)
        tq = cls.tenants.get(ticket.tenant)
        mine = tq.live if tq is not None else 0
        total_w = cls.active_weight + (w if mine == 0 else 0.0)
        others_queued = cls.live - mine
        others = min(others_queued, (mine + 1) * (total_w - w) / w) if others_queued else 0.0
        in_class = mine + others
        higher = 0
        for c in self._classes[: cls.rank]:
            higher += c.live
        if higher:
            higher = min(higher, (in_class + 1) * (self._starvation_limit - 1))
        ahead = in_class + higher
        needed = ahead + 1 - (self.capacity - self.in_flight)
        slots = 0.0 if needed <= 0 or self._service is None else needed * self._service / self.capacity
        if self.budget is not None and now is not None:
            return max(slots, self.budget.wait(now, math.ceil(ahead), ticket.tokens))
        return slots

    def should_shed(self, ticket: Ticket, now: float) -> str | None:
        """Why ``ticket`` must be refused now, or None to enqueue it.

        Shedding at the door is cheaper for everyone than queueing a request
        that will time out anyway: the client learns at once and can retry
        elsewhere, and the slot it would have taken serves a request that can
        still finish.
        """
        if self.depth >= self.max_queue:
            return SHED_QUEUE_FULL
        if self._tenant_live.get(ticket.tenant, 0) >= self.max_queue_per_tenant:
            return SHED_TENANT_QUEUE_FULL
        if ticket.deadline is not None:
            if ticket.deadline <= now:
                return SHED_DEADLINE
            wait = self.expected_wait(ticket, now)
            if wait is not None and now + wait > ticket.deadline:
                return SHED_DEADLINE
        return None

    def retry_after(self, ticket: Ticket, now: float | None = None) -> float:
        """A client's back-off hint: how long until this queue could take it."""
        wait = self.expected_wait(ticket, now)
        if wait is None:
            return self._min_retry_after
        return max(self._min_retry_after, wait)

    # -- mutations -----------------------------------------------------------

    def record_shed(self, ticket: Ticket, reason: str) -> None:
        st = self._tstats(ticket.tenant)
        st.shed[reason] = st.shed.get(reason, 0) + 1

    def enqueue(self, ticket: Ticket) -> None:
        """Queue ``ticket`` (the caller has asked :meth:`should_shed` first)."""
        cls = self._by_name.get(ticket.priority)
        if cls is None:
            raise ValueError(f"unknown priority class {ticket.priority!r}")
        if ticket.state is not NEW:
            raise ValueError(f"cannot enqueue a {ticket.state} ticket")
        tq = cls.tenants.get(ticket.tenant)
        if tq is None:
            tq = cls.tenants[ticket.tenant] = _TenantQueue(ticket.tenant, self.weight(ticket.tenant))
        ticket.state = QUEUED
        ticket._tq = tq
        tq.items.append(ticket)
        if tq.live == 0:
            cls.active_weight += tq.weight
        tq.live += 1
        cls.live += 1
        self.depth += 1
        self._tenant_live[ticket.tenant] = self._tenant_live.get(ticket.tenant, 0) + 1
        if not tq.in_ring:
            tq.in_ring = True
            tq.credited = False
            cls.ring.append(tq)

    def cancel(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out of the queue at once; False if it was not waiting.

        The ticket stays in its tenant's deque as garbage (skipped by the grant
        loop, compacted in bulk) so this is O(1); every count it contributed to
        drops now.
        """
        if ticket.state is not QUEUED:
            return False
        ticket.state = CANCELLED
        tq = ticket._tq
        assert tq is not None
        self._unlive(ticket, tq)
        tq.garbage += 1
        if tq.garbage > 32 and tq.garbage > tq.live:  # 32: don't rebuild tiny deques
            tq.compact()
        return True

    def grant(self, now: float) -> list[Ticket]:
        """Tickets to admit now, while slots are free and the budget allows, in fair order."""
        granted: list[Ticket] = []
        budget = self.budget
        while self.in_flight < self.capacity and self.depth:
            if budget is not None:
                if budget.ready_at() > now:
                    break
            cls = self._pick_class()
            ticket = self._next_in_class(cls)
            if budget is not None:
                budget.charge(now, ticket.tokens)
            ticket.granted_at = now
            ticket.state = GRANTED
            self._unlive(ticket, ticket._tq)  # type: ignore[arg-type]
            self.in_flight += 1
            st = self._tstats(ticket.tenant)
            st.granted += 1
            wait = now - ticket.enqueued_at
            st.wait_count += 1
            st.wait_sum += wait
            if wait > st.wait_max:
                st.wait_max = wait
            granted.append(ticket)
        return granted

    def release(self, ticket: Ticket) -> bool:
        """Free ``ticket``'s slot; False (and no change) if it holds none.

        Taking the ticket rather than a bare count is what makes a double
        release harmless instead of silently raising capacity.
        """
        if ticket.state is not GRANTED:
            return False
        ticket.state = RELEASED
        self.in_flight -= 1
        return True

    def next_grant_at(self) -> float | None:
        """When the budget lets the next waiter go, if only the budget holds it back.

        None when nothing waits, or when slots are the limit (a release will
        grant) or there is no budget: then no timer is needed.
        """
        if self.budget is None or not self.depth or self.in_flight >= self.capacity:
            return None
        return self.budget.ready_at()

    def peek(self) -> Ticket | None:
        """A waiting ticket (the head of the busiest class's ring), without granting it."""
        for c in self._classes:
            if c.live:
                for tq in c.ring:
                    head = tq.head()
                    if head is not None:
                        return head
        return None

    def observe_response(self, ticket: Ticket, status: int, retry_after: float | None, now: float) -> None:
        """Feed an upstream answer to the budget: a 429 lowers it, a success wins some back."""
        budget = self.budget
        if budget is None or ticket.granted_at is None:
            return
        if status == 429:
            budget.rate_limited_by_upstream(now, ticket.granted_at, retry_after)
        elif status < 400:
            budget.succeeded(now)

    def observe_service_time(self, seconds: float) -> None:
        """Feed one slot-hold duration into the EWMA behind expected waits."""
        if self._service is None:
            self._service = seconds
        else:
            self._service += self._alpha * (seconds - self._service)

    def stats(self) -> QueueStats:
        tenants: dict[str, TenantStats] = {}
        names = set(self._stats) | set(self._tenant_live)
        for name in names:
            st = self._stats.get(name) or _TenantStats()
            depth = {}
            for c in self._classes:
                tq = c.tenants.get(name)
                if tq is not None and tq.live:
                    depth[c.name] = tq.live
            tenants[name] = TenantStats(
                depth=depth,
                granted=st.granted,
                shed=dict(st.shed),
                wait_count=st.wait_count,
                wait_sum=st.wait_sum,
                wait_max=st.wait_max,
            )
        return QueueStats(
            capacity=self.capacity,
            in_flight=self.in_flight,
            depth=self.depth,
            depth_by_priority={c.name: c.live for c in self._classes},
            service_time_ewma=self._service,
            tenants=tenants,
            budget=self.budget.snapshot() if self.budget is not None else None,
        )

    # -- internals -------------------------------------------------------------

    def _tstats(self, tenant: str) -> _TenantStats:
        st = self._stats.get(tenant)
        if st is None:
            st = self._stats[tenant] = _TenantStats()
        return st

    def _unlive(self, ticket: Ticket, tq: _TenantQueue) -> None:
        cls = self._by_name[ticket.priority]
        tq.live -= 1
        if tq.live == 0:
            cls.active_weight -= tq.weight
            if cls.live == 1:
                cls.active_weight = 0.0  # no float drift once the class empties
        cls.live -= 1
        self.depth -= 1
        n = self._tenant_live[ticket.tenant] - 1
        if n:
            self._tenant_live[ticket.tenant] = n
        else:
            del self._tenant_live[ticket.tenant]

    def _pick_class(self) -> _Class:
        """Highest class with waiters, unless a lower one is owed its share."""
        first: _Class | None = None
        starving: _Class | None = None
        limit = self._starvation_limit - 1
        for c in self._classes:
            if not c.live:
                c.skipped = 0
                continue
            if first is None:
                first = c
            elif starving is None and c.skipped >= limit:
                starving = c
        chosen = starving or first
        assert chosen is not None
        for c in self._classes:
            if c.live and c.rank > chosen.rank:
                c.skipped += 1
        chosen.skipped = 0
        return chosen

    def _next_in_class(self, cls: _Class) -> Ticket:
        ring = cls.ring
        while True:
            tq = ring[0]
            head = tq.head()
            if head is None:
                # Emptied by cancellations since its last turn: leave the ring.
                ring.popleft()
                tq.in_ring = False
                tq.deficit = 0.0
                tq.credited = False
                tq.garbage = 0
                del cls.tenants[tq.tenant]  # idle tenants leave no state behind
                continue
            if not tq.credited:
                tq.deficit += tq.weight * self._quantum
                tq.credited = True
            if tq.deficit >= head.cost:
                tq.deficit -= head.cost
                tq.items.popleft()
                if tq.live == 1:  # its last live ticket: whatever remains is garbage
                    ring.popleft()
                    tq.in_ring = False
                    tq.deficit = 0.0
                    tq.credited = False
                    tq.items.clear()
                    tq.garbage = 0
                    del cls.tenants[tq.tenant]
                return head
            ring.rotate(-1)
            tq.credited = False


class Scheduler:
    """The trio shell around :class:`FairQueue`, one per upstream target.

    Waiters park on a per-ticket ``trio.Event``: a grant wakes exactly the task
    it names, with no thundering herd and no scan. The policy only changes
    state from inside ``slot()`` — on enqueue, on release, and when a budget's
    next opening comes — so no background task is needed and none exists: when
    a budget holds the queue back, one waiter (the *pacer*) also sleeps until
    that opening and grants whoever is next in fair order. A pacer that leaves
    (granted, cancelled, expired) wakes another waiter to take over, so there
    is exactly one timer per paced queue and no herd.
    """

    def __init__(
        self,
        *,
        capacity: int,
        max_queue: int,
        weights: dict[str, float] | None = None,
        **policy: object,
    ) -> None:
        self._q = FairQueue(capacity=capacity, max_queue=max_queue, weights=weights, **policy)  # type: ignore[arg-type]
        self._pacer: Ticket | None = None

    @property
    def policy(self) -> FairQueue:
        return self._q

    @property
    def in_flight(self) -> int:
        return self._q.in_flight

    def _pump(self, now: float) -> None:
        for t in self._q.grant(now):
            ev = t.handle
            if ev is not None:
                ev.set()  # type: ignore[attr-defined]
        self._elect()

    def _elect(self) -> None:
        """Make sure a waiter sleeps until the budget's next opening, if one is due."""
        if self._pacer is not None or self._q.next_grant_at() is None:
            return
        t = self._q.peek()
        # A ticket with no handle yet is inside slot(), about to wait: it claims the role itself.
        if t is not None and t.handle is not None:
            t.handle.set()  # type: ignore[attr-defined]

    async def _wait(self, ticket: Ticket, deadline: float | None) -> None:
        """Park until ``ticket`` is granted; raise Overloaded if ``deadline`` passes first."""
        q = self._q
        limit = math.inf if deadline is None else deadline
        while True:
            ev = ticket.handle = trio.Event()
            wake = limit
            if self._pacer is None or self._pacer is ticket:
                opening = q.next_grant_at()
                if opening is not None:
                    self._pacer = ticket
                    wake = min(wake, opening)
            with trio.move_on_at(wake):
                await ev.wait()
            if ticket.state is not QUEUED:
                return
            if self._pacer is ticket:
                self._pacer = None
            now = trio.current_time()
            if now >= limit:
                q.cancel(ticket)
                q.record_shed(ticket, SHED_EXPIRED)
                raise Overloaded(q.retry_after(ticket, now), SHED_EXPIRED)
            self._pump(now)
            if ticket.state is not QUEUED:
                return

    @asynccontextmanager
    async def slot(
        self,
        *,
        tenant: str,
        priority: str = "interactive",  # the class a client gets unless it asks to be batch
        deadline: float | None = None,  # trio time; None => bounded only by the caller's cancel scope
        cost: float = 1.0,  # one request; see Ticket
        tokens: int = 0,  # estimated input tokens, for a budget's token quota
    ) -> AsyncIterator[Ticket]:
        """Hold one of the target's connection slots for the duration of the block.

        Raises :class:`Overloaded` at once when the policy sheds the request,
        or when ``deadline`` passes while it waits. Whatever ends the block —
        normal exit, an exception, ``trio.Cancelled`` while queued, just after
        the grant or inside the body — the ``finally`` below looks at the
        ticket's single state field and either withdraws it or releases its
        slot, never both and never twice.
        """
        q = self._q
        now = trio.current_time()
        ticket = Ticket(tenant, priority, now, deadline, cost, tokens)
        reason = q.should_shed(ticket, now)
        if reason is not None:
            q.record_shed(ticket, reason)
            raise Overloaded(q.retry_after(ticket, now), reason)
        q.enqueue(ticket)
        self._pump(now)
        held_from: float | None = None
        try:
            if ticket.state is QUEUED:
                await self._wait(ticket, deadline)
            else:
                # Granted without waiting: still a cancellation point (the
                # finally covers it), but no yield to the scheduler — the
                # upstream send that follows is one, and a yield here cost a
                # whole trip through trio's run loop on every request.
                await trio.lowlevel.checkpoint_if_cancelled()
            held_from = trio.current_time()
            yield ticket
        finally:
            if self._pacer is ticket:
                self._pacer = None
            if ticket.state is QUEUED:
                q.cancel(ticket)
            elif ticket.state is GRANTED:
                q.release(ticket)
                end = trio.current_time()
                if held_from is not None:
                    q.observe_service_time(end - held_from)
                self._pump(end)
            self._elect()

    def report(self, ticket: Ticket | None, status: int, retry_after: float | None) -> None:
        """The upstream's answer to a granted request, for the provider budget's AIMD."""
        if ticket is not None:
            self._q.observe_response(ticket, status, retry_after, trio.current_time())

    def stats(self) -> QueueStats:
        return self._q.stats()


class FifoSemaphoreScheduler:
    """The design Weir replaces: one FIFO ``trio.Semaphore`` per target.

    Same ``slot()`` interface so the benchmark and tests can swap it in.
    Tenant and priority are accepted and ignored — that is the point.
    """

    def __init__(self, *, capacity: int, max_queue: int, **_ignored: object) -> None:
        self._sem = trio.Semaphore(capacity)
        self.capacity = capacity
        self.max_queue = max_queue
        self.waiting = 0
        self.granted = 0
        self.shed = 0

    @property
    def in_flight(self) -> int:
        return self.capacity - self._sem.value

    @asynccontextmanager
    async def slot(
        self,
        *,
        tenant: str,
        priority: str = "interactive",  # ignored; same signature as Scheduler.slot
        deadline: float | None = None,  # trio time
        cost: float = 1.0,  # ignored
        tokens: int = 0,  # ignored
    ) -> AsyncIterator[None]:
        if self.waiting >= self.max_queue:
            self.shed += 1
            raise Overloaded(1.0, SHED_QUEUE_FULL)
        self.waiting += 1
        acquired = False
        try:
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._sem.acquire()
                acquired = True
        finally:
            self.waiting -= 1
        if not acquired:
            self.shed += 1
            raise Overloaded(1.0, SHED_EXPIRED)
        self.granted += 1
        try:
            yield
        finally:
            self._sem.release()

    def report(self, ticket: object, status: int, retry_after: float | None) -> None:
        """No budget here; same interface as Scheduler.report."""

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "depth": self.waiting,
            "granted": self.granted,
            "shed": self.shed,
        }
