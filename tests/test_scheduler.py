"""The fair queue: pure policy under simulated arrivals, then the trio shell under a mock clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from proxy.scheduler import (
    CANCELLED,
    GRANTED,
    FairQueue,
    FifoSemaphoreScheduler,
    Overloaded,
    Scheduler,
    Ticket,
)


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def serve(q: FairQueue, n: int, now: float = 0.0) -> list[Ticket]:
    """Run ``n`` grant/release cycles on a capacity-1 queue; the order of service."""
    order: list[Ticket] = []
    for _ in range(n):
        (t,) = q.grant(now)
        order.append(t)
        assert q.release(t)
    return order


def fill(q: FairQueue, tenant: str, n: int, priority: str = "interactive", now: float = 0.0) -> list[Ticket]:
    out = []
    for _ in range(n):
        t = Ticket(tenant, priority, now)
        assert q.should_shed(t, now) is None
        q.enqueue(t)
        out.append(t)
    return out


# -- policy -------------------------------------------------------------------


def test_equal_weights_are_fair_even_when_one_tenant_arrived_first():
    q = FairQueue(capacity=1, max_queue=10_000)
    # The heavy tenant queues 500 before anyone else shows up: FIFO would serve
    # only it for the first 500 grants (Jain = 0.25 over four tenants).
    fill(q, "heavy", 500)
    for name in ("a", "b", "c"):
        fill(q, name, 100)
    order = serve(q, 400)
    counts = {n: 0 for n in ("heavy", "a", "b", "c")}
    for t in order:
        counts[t.tenant] += 1
    assert jain(list(counts.values())) >= 0.98, counts
    # and within every window of 4 grants each tenant appears once (round robin)
    assert {t.tenant for t in order[:4]} == set(counts)


def test_random_arrivals_backlogged_tenants_get_jain_above_098():
    rng = random.Random(7)
    q = FairQueue(capacity=4, max_queue=100_000)
    tenants = [f"t{i}" for i in range(8)]
    served = {t: 0 for t in tenants}
    waiting = {t: 0 for t in tenants}
    in_flight: list[Ticket] = []
    # Bursty arrivals of random size keep every tenant backlogged; the 4 slots
    # complete in random order, as real requests of different lengths do.
    for step in range(2_000):
        for t in tenants:
            if waiting[t] < 3:
                n = rng.randint(1, 20)
                fill(q, t, n, now=float(step))
                waiting[t] += n
        for g in q.grant(float(step)):
            waiting[g.tenant] -= 1
            in_flight.append(g)
        done = in_flight.pop(rng.randrange(len(in_flight)))
        q.release(done)
        served[done.tenant] += 1
    assert jain(list(served.values())) >= 0.98, served


def test_weighted_shares_within_5_percent():
    weights = {"gold": 3.0, "silver": 1.5, "bronze": 0.5}
    q = FairQueue(capacity=1, max_queue=100_000, weights=weights)
    for name in weights:
        fill(q, name, 2_000)
    order = serve(q, 1_000)
    total_w = sum(weights.values())
    for name, w in weights.items():
        share = sum(1 for t in order if t.tenant == name) / len(order)
        expected = w / total_w
        assert abs(share - expected) / expected < 0.05, (name, share, expected)


def test_costs_are_charged_so_big_requests_get_fewer_grants():
    q = FairQueue(capacity=1, max_queue=10_000)
    big = [Ticket("big", "interactive", 0.0, cost=4.0) for _ in range(100)]
    for t in big:
        q.enqueue(t)
    fill(q, "small", 400)
    order = serve(q, 250)
    n_big = sum(1 for t in order if t.tenant == "big")
    n_small = len(order) - n_big
    assert n_small == pytest.approx(4 * n_big, rel=0.05)


def test_interactive_goes_first_but_batch_is_not_starved():
    q = FairQueue(capacity=1, max_queue=10_000, starvation_limit=10)
    fill(q, "etl", 200, priority="batch")  # batch arrived first
    fill(q, "chat", 200, priority="interactive")
    order = serve(q, 100)
    assert order[0].priority == "interactive"
    assert [t.priority for t in order[:9]] == ["interactive"] * 9
    assert order[9].priority == "batch"
    assert sum(1 for t in order if t.priority == "batch") == 10  # exactly 1 in 10
    # once interactive drains, batch gets every slot
    q2 = FairQueue(capacity=1, max_queue=100)
    fill(q2, "etl", 5, priority="batch")
    fill(q2, "chat", 2, priority="interactive")
    assert [t.priority for t in serve(q2, 7)] == ["interactive"] * 2 + ["batch"] * 5


def test_shed_when_over_queue_bound_and_tenant_bound():
    q = FairQueue(capacity=1, max_queue=5, max_queue_per_tenant=3)
    fill(q, "a", 3)
    assert q.should_shed(Ticket("a", "interactive", 0.0), 0.0) == "tenant_queue_full"
    fill(q, "b", 2)
    assert q.should_shed(Ticket("c", "interactive", 0.0), 0.0) == "queue_full"
    q.grant(0.0)  # one leaves the queue for the slot
    assert q.should_shed(Ticket("c", "interactive", 0.0), 0.0) is None


def test_shed_when_expected_wait_exceeds_deadline():
    q = FairQueue(capacity=2, max_queue=1_000)
    fill(q, "a", 10)
    # no service-time estimate yet: never shed on a guess
    assert q.should_shed(Ticket("a", "interactive", 0.0, deadline=0.5), 0.0) is None
    q.observe_service_time(2.0)
    q.grant(0.0)  # 2 in flight, 8 of a's waiting
    # a's next ticket has 8 of its own ahead: (8 + 1) slots × 2 s / 2 = 9 s
    assert q.expected_wait(Ticket("a", "interactive", 0.0)) == pytest.approx(9.0)
    assert q.should_shed(Ticket("a", "interactive", 0.0, deadline=8.0), 0.0) == "deadline"
    assert q.should_shed(Ticket("a", "interactive", 0.0, deadline=10.0), 0.0) is None
    # a newcomer tenant is only one fair-share turn behind a, not 8 requests
    assert q.expected_wait(Ticket("b", "interactive", 0.0)) == pytest.approx(2.0)
    assert q.should_shed(Ticket("b", "interactive", 0.0, deadline=3.0), 0.0) is None
    assert q.should_shed(Ticket("b", "interactive", 0.0, deadline=-1.0), 0.0) == "deadline"
    assert q.retry_after(Ticket("a", "interactive", 0.0)) == pytest.approx(9.0)


def test_service_time_is_an_ewma():
    q = FairQueue(capacity=1, max_queue=1, ewma_alpha=0.5)
    q.observe_service_time(4.0)
    q.observe_service_time(2.0)
    assert q.service_time == pytest.approx(3.0)


def test_cancel_removes_a_waiter_at_once():
    q = FairQueue(capacity=1, max_queue=3)
    a1, a2, a3 = fill(q, "a", 3)
    assert q.should_shed(Ticket("b", "interactive", 0.0), 0.0) == "queue_full"
    assert q.cancel(a2)
    assert a2.state == CANCELLED
    assert q.depth == 2
    assert q.stats().tenants["a"].depth == {"interactive": 2}
    assert q.should_shed(Ticket("b", "interactive", 0.0), 0.0) is None  # its place is free now
    assert [t for t in serve(q, 2)] == [a1, a3]
    assert not q.cancel(a2)  # twice is a no-op
    assert q.depth == 0 and q.in_flight == 0


def test_cancel_churn_does_not_grow_memory():
    q = FairQueue(capacity=1, max_queue=10)
    (blocker,) = fill(q, "a", 1)
    q.grant(0.0)
    for _ in range(10_000):
        (t,) = fill(q, "b", 1)
        q.cancel(t)
    (keep,) = fill(q, "b", 1)
    tq = keep._tq
    assert tq is not None and len(tq.items) < 100
    q.release(blocker)
    assert q.grant(1.0) == [keep]


def test_release_is_exactly_once_and_stats_count():
    q = FairQueue(capacity=2, max_queue=10)
    ts = fill(q, "a", 3)
    g = q.grant(5.0)
    assert g == ts[:2] and all(t.state == GRANTED for t in g)
    assert q.release(g[0]) and not q.release(g[0])
    assert q.in_flight == 1
    assert q.grant(7.0) == [ts[2]]
    q.record_shed(Ticket("a", "interactive", 0.0), "queue_full")
    st = q.stats()
    assert st.tenants["a"].granted == 3
    assert st.tenants["a"].wait_count == 3
    assert st.tenants["a"].wait_max == 7.0 and st.tenants["a"].wait_sum == 17.0
    assert st.tenants["a"].shed == {"queue_full": 1}
    assert st.in_flight == 2 and st.depth == 0


# -- trio shell -------------------------------------------------------------------



async def _hold(sched, tenant, seconds, log=None, **kw):
    async with sched.slot(tenant=tenant, **kw):
        if log is not None:
            log.append((tenant, trio.current_time()))
        await trio.sleep(seconds)


async def test_cancel_while_queued_frees_nothing_and_next_waiter_goes(autojump_clock):
    sched = Scheduler(capacity=1, max_queue=10)
    log: list = []
    async with trio.open_nursery() as n:
        n.start_soon(_hold, sched, "a", 5.0, log)
        await trio.sleep(0.1)
        n.start_soon(_hold, sched, "b", 1.0, log)  # queued behind a
        await trio.sleep(0.1)
        victim = trio.CancelScope()

        async def cancellable():
            with victim:
                await _hold(sched, "c", 1.0, log)

        n.start_soon(cancellable)
        await trio.sleep(0.1)
        assert sched.stats().depth == 2
        t0 = trio.current_time()
        victim.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == t0
        assert sched.stats().depth == 1  # gone at once, not when a releases
        assert sched.in_flight == 1
    assert [t for t, _ in log] == ["a", "b"]
    assert log[1][1] == pytest.approx(5.0)  # b granted the moment a released
    assert sched.in_flight == 0 and sched.stats().depth == 0


async def test_cancel_just_after_grant_before_body(autojump_clock):
    sched = Scheduler(capacity=1, max_queue=10)
    ran = False
    with trio.CancelScope() as cs:
        cs.cancel()
        async with sched.slot(tenant="a"):  # granted at once, cancelled at its checkpoint
            ran = True
    assert not ran
    assert sched.in_flight == 0
    assert sched.stats().tenants["a"].granted == 1  # it was granted, then released
    async with sched.slot(tenant="b"):
        assert sched.in_flight == 1
    assert sched.in_flight == 0


async def test_cancel_racing_the_grant_never_leaks(autojump_clock):
    # The holder releases and, in the same step, the waiter's scope is
    # cancelled: whichever wins, the slot must come back.
    sched = Scheduler(capacity=1, max_queue=10)
    waiter_scope = trio.CancelScope()
    body_ran = []

    async def waiter():
        with waiter_scope:
            async with sched.slot(tenant="w"):
                body_ran.append(True)
                await trio.sleep(1)

    async with trio.open_nursery() as n:
        async with sched.slot(tenant="h"):
            n.start_soon(waiter)
            await trio.sleep(1)
            assert sched.stats().depth == 1
        waiter_scope.cancel()  # the grant happened in the holder's exit above
    # trio had already woken the waiter, so the cancel lands at the body's first checkpoint
    assert body_ran == [True]
    assert sched.stats().tenants["w"].granted == 1
    assert sched.in_flight == 0 and sched.stats().depth == 0
    async with sched.slot(tenant="next"):
        assert sched.in_flight == 1


async def test_cancel_and_errors_inside_body(autojump_clock):
    sched = Scheduler(capacity=1, max_queue=10)
    with trio.move_on_after(1.0):
        async with sched.slot(tenant="a"):
            await trio.sleep(10)
    assert sched.in_flight == 0
    with pytest.raises(RuntimeError):
        async with sched.slot(tenant="a"):
            raise RuntimeError("upstream blew up")
    assert sched.in_flight == 0
    # the 1 s hold was measured for the EWMA; the raise held the slot for 0 s
    assert sched.policy.service_time is not None


async def test_waiter_bounded_by_enclosing_scope_is_removed(autojump_clock):
    sched = Scheduler(capacity=1, max_queue=10)
    async with trio.open_nursery() as n:
        n.start_soon(_hold, sched, "a", 10.0)
        await trio.sleep(0.1)
        with trio.move_on_after(2.0) as cs:
            async with sched.slot(tenant="b"):
                pytest.fail("granted while the holder still holds")
        assert cs.cancelled_caught
        assert sched.stats().depth == 0 and sched.in_flight == 1
    assert sched.in_flight == 0


async def test_deadline_expiry_while_queued_raises_overloaded(autojump_clock):
    sched = Scheduler(capacity=1, max_queue=10)
    async with trio.open_nursery() as n:
        n.start_soon(_hold, sched, "a", 10.0)
        await trio.sleep(0.1)
        with pytest.raises(Overloaded) as ei:
            async with sched.slot(tenant="b", deadline=trio.current_time() + 2.0):
                pytest.fail("granted while the holder still holds")
        assert ei.value.reason == "deadline_expired"
        assert trio.current_time() == pytest.approx(2.1)
        assert ei.value.status == 529 and (b"retry-after", b"1") in ei.value.headers
        assert sched.stats().depth == 0 and sched.in_flight == 1
    # a's 10 s hold is now the service-time estimate: a 2 s deadline is shed at the door
    async with trio.open_nursery() as n:
        n.start_soon(_hold, sched, "a", 10.0)
        await trio.sleep(0.1)
        t0 = trio.current_time()
        with pytest.raises(Overloaded) as ei:
            async with sched.slot(tenant="b", deadline=t0 + 2.0):
                pass
        assert trio.current_time() == t0  # refused without waiting
        assert ei.value.reason == "deadline"
        assert ei.value.retry_after == pytest.approx(10.0)
    st = sched.stats()
    assert st.tenants["b"].shed == {"deadline_expired": 1, "deadline": 1}


async def test_queue_bound_sheds_at_once(autojump_clock):
    sched = Scheduler(capacity=1, max_queue=2)
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(_hold, sched, "a", 1.0)
        await trio.sleep(0.1)
        with pytest.raises(Overloaded) as ei:
            async with sched.slot(tenant="b"):
                pass
        assert ei.value.reason == "queue_full"
    assert sched.in_flight == 0


async def _flood_then_single(sched) -> float:
    """Tenant a floods 40 one-second requests on 2 slots; b sends one at t=0.5.

    Returns how long b waited.
    """
    waited: list[float] = []

    async def single():
        t0 = trio.current_time()
        async with sched.slot(tenant="b"):
            waited.append(trio.current_time() - t0)
            await trio.sleep(1.0)

    async with trio.open_nursery() as n:
        for _ in range(40):
            n.start_soon(_hold, sched, "a", 1.0)
        await trio.sleep(0.5)
        n.start_soon(single)
    assert sched.in_flight == 0
    return waited[0]


async def test_flood_from_one_tenant_does_not_delay_another(autojump_clock):
    fair = await _flood_then_single(Scheduler(capacity=2, max_queue=100))
    fifo = await _flood_then_single(FifoSemaphoreScheduler(capacity=2, max_queue=100))
    # Fair share: b is next as soon as one of a's two in-flight requests ends.
    assert fair == pytest.approx(0.5)
    # The semaphore makes b wait behind all 38 queued requests of a.
    assert fifo == pytest.approx(19.5)


async def test_fifo_scheduler_honours_deadline_and_cancellation(autojump_clock):
    sched = FifoSemaphoreScheduler(capacity=1, max_queue=10)
    async with trio.open_nursery() as n:
        n.start_soon(_hold, sched, "a", 5.0)
        await trio.sleep(0.1)
        with pytest.raises(Overloaded):
            async with sched.slot(tenant="b", deadline=trio.current_time() + 1):
                pass
        assert sched.in_flight == 1
    assert sched.in_flight == 0
