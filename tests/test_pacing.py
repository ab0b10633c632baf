"""Provider budgets: the pure pacing policy (PaceBudget, FairQueue with a budget)
and the trio shell under MockClock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.scheduler import FairQueue, Overloaded, PaceBudget, Scheduler, Ticket


def most_in_any_window(times: list[float], window: float = 60.0) -> int:
    """The largest number of ``times`` inside one closed window of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def drain(budget: PaceBudget, n: int, tokens: int = 0, start: float = 0.0) -> list[float]:
    """Send ``n`` requests as early as the budget allows; their send times."""
    now, sent = start, []
    for _ in range(n):
        now = max(now, budget.ready_at())
        budget.charge(now, tokens)
        sent.append(now)
    return sent


# ------------------------------------------------------------------ PaceBudget


def test_forty_a_minute_with_a_burst_of_two_never_puts_41_in_a_minute() -> None:
    sent = drain(PaceBudget(requests_per_minute=40, burst=2), 200)
    assert sent[:2] == [0.0, 0.0]  # the burst
    gaps = [b - a for a, b in zip(sent[1:], sent[2:])]
    assert all(g == pytest.approx(60 / 38) for g in gaps)  # then evenly spread
    assert most_in_any_window(sent, 60 + 1e-6) == 40


@pytest.mark.parametrize("rpm, burst", [(40, 1), (40, 2), (40, 5), (3, 2), (1000, 10), (7.5, 1)])
def test_any_window_holds_at_most_the_quota(rpm: float, burst: int) -> None:
    sent = drain(PaceBudget(requests_per_minute=rpm, burst=burst), 300)
    assert most_in_any_window(sent, 60 + 1e-6) <= rpm
    assert sent[burst - 1] == 0.0 and sent[burst] > 0.0


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(min_value=2, max_value=600),
    burst=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), min_size=1, max_size=150),
)
def test_whatever_the_arrivals_no_window_exceeds_the_quota(rpm: int, burst: int, gaps: list[float]) -> None:
    """Requests arriving at any times, each sent as soon as the budget allows: never more than
    ``rpm`` in a 60-second window (GCRA's bound, whatever the arrival pattern)."""
    if burst >= rpm:
        burst = rpm - 1
    budget = PaceBudget(requests_per_minute=rpm, burst=burst)
    arrival, last, sent = 0.0, 0.0, []
    for gap in gaps:
        arrival += gap
        at = max(arrival, last, budget.ready_at())  # FIFO: never before the one ahead
        budget.charge(at, 0)
        sent.append(at)
        last = at
    assert most_in_any_window(sent, 60 + 1e-6) <= rpm


def test_token_quota_spaces_requests_by_their_size() -> None:
    budget = PaceBudget(tokens_per_minute=6000, burst=2)
    sent = drain(budget, 6, tokens=1000)
    # 6000 tokens a minute = 100 a second: after a burst of two, one 1000-token request every 10 s.
    assert sent == pytest.approx([0, 0, 10, 20, 30, 40])


def test_both_quotas_the_stricter_wins() -> None:
    sent = drain(PaceBudget(requests_per_minute=40, tokens_per_minute=6000, burst=1), 4, tokens=1000)
    assert sent == pytest.approx([0, 10, 20, 30])
    sent = drain(PaceBudget(requests_per_minute=40, tokens_per_minute=6_000_000, burst=1), 3, tokens=1000)
    assert sent == pytest.approx([0, 60 / 39, 120 / 39])


def test_a_429_halves_the_rate_once_per_flight_and_pauses_for_retry_after() -> None:
    b = PaceBudget(requests_per_minute=40, burst=2)
    drain(b, 5)  # sent at 0, 0, 1.58, 3.16, 4.74
    base = b.interval()
    b.rate_limited_by_upstream(5.0, sent_at=4.74, retry_after=3.0)
    assert b.scale == 0.5 and b.interval() == pytest.approx(2 * base)
    assert b.ready_at() == pytest.approx(8.0)  # nothing before now + retry-after
    # More 429s for requests sent before that decrease say nothing new.
    b.rate_limited_by_upstream(5.1, sent_at=3.16, retry_after=None)
    assert b.scale == 0.5
    # A 429 for a request sent after it does.
    b.rate_limited_by_upstream(9.0, sent_at=8.0, retry_after=None)
    assert b.scale == 0.25 and b.rate_limited == 3


def test_the_rate_comes_back_additively_only_after_the_window() -> None:
    b = PaceBudget(requests_per_minute=40, burst=2)
    b.rate_limited_by_upstream(0.0, sent_at=0.0, retry_after=None)  # no retry-after: a minute's window
    assert b.scale == 0.5
    b.succeeded(30.0)
    assert b.scale == 0.5  # still inside the window
    for i in range(4):
        b.succeeded(60.0 + i)
    assert b.scale == pytest.approx(0.9)
    for i in range(5):
        b.succeeded(70.0 + i)
    assert b.scale == 1.0  # never past the configured quota


def test_the_rate_never_falls_below_its_floor() -> None:
    b = PaceBudget(requests_per_minute=40, burst=1)
    for i in range(10):
        b.rate_limited_by_upstream(float(i), sent_at=float(i), retry_after=None)
    assert b.scale == 1 / 16


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError):
        PaceBudget(requests_per_minute=2, burst=2)
    with pytest.raises(ValueError):
        PaceBudget(requests_per_minute=10, burst=0)


# ------------------------------------------------------- FairQueue with a budget


def test_fair_queue_grants_only_when_the_budget_allows() -> None:
    q = FairQueue(capacity=64, max_queue=100, budget=PaceBudget(requests_per_minute=40, burst=2))
    tickets = [Ticket("a" if i % 2 else "b", "interactive", 0.0) for i in range(6)]
    for t in tickets:
        q.enqueue(t)
    assert len(q.grant(0.0)) == 2  # the burst, though 62 slots are free
    assert q.next_grant_at() == pytest.approx(60 / 38)
    assert q.grant(1.0) == []
    granted = q.grant(60 / 38)
    assert len(granted) == 1 and granted[0].granted_at == pytest.approx(60 / 38)
    # Fair order still holds under pacing: tenants alternate.
    order = [t.tenant for t in tickets if t.granted_at is not None]
    assert order == ["b", "a", "b"]


def test_the_pacing_wait_sheds_at_the_door_even_on_a_cold_start() -> None:
    q = FairQueue(capacity=64, max_queue=1000, budget=PaceBudget(requests_per_minute=40, burst=2))
    shed = granted = 0
    for _ in range(100):
        t = Ticket("a", "interactive", 0.0, deadline=59.0)
        if q.should_shed(t, 0.0):
            shed += 1
            continue
        q.enqueue(t)
        granted += 1
    # 2 at once, then one every 60/38 s: 39 go within the 59 s deadline, the rest are told at once.
    assert granted == 39 and shed == 61
    late = Ticket("a", "interactive", 0.0, deadline=59.0)
    assert q.retry_after(late, 0.0) == pytest.approx(38 * 60 / 38)


def test_observed_429_reaches_the_budget() -> None:
    budget = PaceBudget(requests_per_minute=40, burst=2)
    q = FairQueue(capacity=4, max_queue=10, budget=budget)
    t = Ticket("a", "interactive", 0.0)
    q.enqueue(t)
    q.grant(0.0)
    q.observe_response(t, 429, 2.0, 0.5)
    assert budget.scale == 0.5 and q.stats().budget["rate_limited"] == 1  # type: ignore[index]


# --------------------------------------------------------------- the trio shell


async def test_a_hundred_at_once_leave_evenly_spaced_within_their_deadline(autojump_clock: trio.testing.MockClock) -> None:
    sched = Scheduler(capacity=64, max_queue=512, budget=PaceBudget(requests_per_minute=40, burst=2))
    start = trio.current_time()
    sent: list[float] = []
    errors: list[Exception] = []

    async def one() -> None:
        try:
            async with sched.slot(tenant="t", deadline=start + 600):
                sent.append(trio.current_time() - start)
                await trio.sleep(3)  # a reply takes a while; slots are not the limit
        except Overloaded as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    assert errors == [] and len(sent) == 100
    assert most_in_any_window(sent, 60 + 1e-6) == 40  # (a hair over 60 s: float sums of 60/38)
    gaps = [b - a for a, b in zip(sent[1:], sent[2:])]
    assert min(gaps) == pytest.approx(60 / 38) and max(gaps) == pytest.approx(60 / 38)
    assert sched.stats().depth == 0 and sched.in_flight == 0


async def test_waiters_that_would_miss_their_deadline_are_shed_with_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    sched = Scheduler(capacity=64, max_queue=512, budget=PaceBudget(requests_per_minute=40, burst=2))
    start = trio.current_time()
    sent: list[float] = []
    shed: list[Overloaded] = []

    async def one() -> None:
        try:
            async with sched.slot(tenant="t", deadline=start + 31):
                sent.append(trio.current_time() - start)
        except Overloaded as exc:
            shed.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    assert len(sent) + len(shed) == 100
    assert all(t <= 31 for t in sent) and len(sent) == 21  # 2 at once + one every 1.58 s until 31 s
    assert all(e.status == 529 and dict(e.headers)[b"retry-after"] for e in shed)
    assert {e.reason for e in shed} == {"deadline"}  # told at the door, not after waiting


async def test_a_pacer_that_leaves_hands_the_timer_on(autojump_clock: trio.testing.MockClock) -> None:
    sched = Scheduler(capacity=64, max_queue=512, budget=PaceBudget(requests_per_minute=40, burst=1))
    start = trio.current_time()
    sent: list[float] = []

    async def one(cancel_at: float | None) -> None:
        with trio.CancelScope(deadline=math.inf if cancel_at is None else start + cancel_at):
            async with sched.slot(tenant="t"):
                sent.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, None)  # granted at once
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(one, 0.5)  # the pacer, gone before its turn
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            nursery.start_soon(one, None)
    assert sent == pytest.approx([0, 60 / 39, 120 / 39, 180 / 39])
    assert sched.stats().depth == 0


async def test_a_429_slows_the_queue_down(autojump_clock: trio.testing.MockClock) -> None:
    sched = Scheduler(capacity=64, max_queue=512, budget=PaceBudget(requests_per_minute=40, burst=1))
    start = trio.current_time()
    sent: list[float] = []

    async def one(i: int) -> None:
        async with sched.slot(tenant="t") as ticket:
            sent.append(trio.current_time() - start)
            if i == 0:
                sched.report(ticket, 429, None)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
    # The second had its place before the 429; after it, half the rate.
    assert sent == pytest.approx([0, 60 / 39, 180 / 39])
