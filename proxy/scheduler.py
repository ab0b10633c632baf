"""Schedule: the fair queue in front of one upstream target.

One global semaphore lets a long request hold the line for short ones and lets
one heavy client fill every slot. This module replaces it with a fair queue per
upstream target, and it is the *only* queue on the path: the concurrency cap is
the target's connection budget, so httpx never holds waiters of its own
(ARCHITECTURE.md: httpcore's pool scans grow with waiters, and 500 queued
requests under default limits end in PoolTimeout).

Two layers, h11-style:

* :class:`FairQueue` is the policy. It is pure code: tickets go in, grants come
  out, and every method that needs the time takes ``now``. Deterministic tests
  drive it with simulated arrivals.
* :class:`Scheduler` is the thin trio shell: ``async with scheduler.slot(...)``
  parks the task until the policy grants it and frees the slot exactly once on
  every way out of the block.

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


class Ticket:
    """One request's place in the queue.

    A plain slotted class rather than a Struct: tickets are hashed by identity
    and mutated on the hot path. ``handle`` belongs to the shell (the trio
    Event it parks on); the policy never reads it.
    """

    __slots__ = ("tenant", "priority", "cost", "enqueued_at", "deadline", "state", "handle", "_tq")

    def __init__(
        self,
        tenant: str,
        priority: str,
        enqueued_at: float,
        deadline: float | None = None,
        cost: float = 1.0,  # one request; token-estimated costs plug in here later
    ) -> None:
        self.tenant = tenant
        self.priority = priority
        self.cost = cost
        self.enqueued_at = enqueued_at
        self.deadline = deadline
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

    def expected_wait(self, ticket: Ticket) -> float | None:
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
        """
        if self._service is None:
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
        if needed <= 0:
            return 0.0
        return needed * self._service / self.capacity

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
            wait = self.expected_wait(ticket)
            if wait is not None and now + wait > ticket.deadline:
                return SHED_DEADLINE
        return None

    def retry_after(self, ticket: Ticket) -> float:
        """A client's back-off hint: how long until this queue could take it."""
        wait = self.expected_wait(ticket)
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
        """Tickets to admit now, while slots are free, in fair order."""
        granted: list[Ticket] = []
        while self.in_flight < self.capacity and self.depth:
            cls = self._pick_class()
            ticket = self._next_in_class(cls)
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
    state from inside ``slot()`` — on enqueue and on release — so no background
    task is needed and none exists.
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

    @asynccontextmanager
    async def slot(
        self,
        *,
        tenant: str,
        priority: str = "interactive",  # the class a client gets unless it asks to be batch
        deadline: float | None = None,  # trio time; None => bounded only by the caller's cancel scope
        cost: float = 1.0,  # one request; see Ticket
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
        ticket = Ticket(tenant, priority, now, deadline, cost)
        reason = q.should_shed(ticket, now)
        if reason is not None:
            q.record_shed(ticket, reason)
            raise Overloaded(q.retry_after(ticket), reason)
        q.enqueue(ticket)
        self._pump(now)
        held_from: float | None = None
        try:
            if ticket.state is QUEUED:
                ev = ticket.handle = trio.Event()
                if deadline is None:
                    await ev.wait()
                else:
                    with trio.move_on_at(deadline):
                        await ev.wait()
                    if ticket.state is QUEUED:
                        q.cancel(ticket)
                        q.record_shed(ticket, SHED_EXPIRED)
                        raise Overloaded(q.retry_after(ticket), SHED_EXPIRED)
            else:
                # Granted without waiting: still a checkpoint, as trio expects
                # of every async call (and a cancellation point the finally covers).
                await trio.lowlevel.checkpoint()
            held_from = trio.current_time()
            yield ticket
        finally:
            if ticket.state is QUEUED:
                q.cancel(ticket)
            elif ticket.state is GRANTED:
                q.release(ticket)
                end = trio.current_time()
                if held_from is not None:
                    q.observe_service_time(end - held_from)
                self._pump(end)

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

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "depth": self.waiting,
            "granted": self.granted,
            "shed": self.shed,
        }
