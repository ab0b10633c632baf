"""The batch runner: the pure verdict on an item's reply, and the trio shell's
time logic under trio's MockClock — leases kept while an item runs, backoff
honoured, concurrency bounded, a prompt wake, items handed back on shutdown.

The store is the real SQLite one, called inline (a thread would let the mock
clock jump while it runs); ``execute`` stands in for Weir's request path."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from proxy.batches.model import Batch, Counts
from proxy.batches.runner import BACKOFF_CAP_S, BatchRunner, Finish, Retry, backoff, judge
from proxy.batches.service import AsyncBatchStore, WallClock
from proxy.batches.store import open_store
from proxy.errors import error_body

MESSAGE = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}]}).encode()
PARAMS = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
LEASE_S = 30.0


# ---------------------------------------------------------------- the policy


def test_a_message_is_the_result_and_errors_are_results_too() -> None:
    assert judge(200, [], MESSAGE, 1) == Finish("succeeded", MESSAGE)
    bad = error_body("invalid_request_error", "max_tokens: too large")
    assert judge(400, [], bad, 1) == Finish("errored", bad)
    assert judge(500, [], error_body("api_error", "boom"), 1).result == "errored"  # the router already retried it
    wrapped = judge(404, [], b"<html>not found</html>", 1)
    assert isinstance(wrapped, Finish) and json.loads(wrapped.payload)["error"]["type"] == "not_found_error"
    broken = judge(200, [], b'{"truncated', 1)
    assert isinstance(broken, Finish) and broken.result == "errored"


@pytest.mark.parametrize("status", [0, 408, 429, 502, 503, 504, 529])
def test_not_now_is_not_a_result(status: int) -> None:
    verdict = judge(status, [], error_body("overloaded_error", "busy"), 3)
    assert isinstance(verdict, Retry) and verdict.delay_s == backoff(3)
    assert verdict.reason == (str(status) if status else "no_reply")  # a metric label: a fixed set


def test_backoff_doubles_to_a_cap_and_never_undercuts_retry_after() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(40) == BACKOFF_CAP_S
    assert backoff(1, retry_after=20.0) == 20.0 and backoff(5, retry_after=2.0) == 16.0
    assert backoff(1, retry_after=1e9) == BACKOFF_CAP_S
    assert judge(429, [(b"retry-after", b"12")], b"", 1) == Retry(12.0, "429")
    assert judge(429, [(b"retry-after", b"Wed, 21 Oct 2026 07:28:00 GMT")], b"", 1) == Retry(1.0, "429")


# ---------------------------------------------------------------- the shell


@pytest.fixture
def store(tmp_path):
    s = open_store("", str(tmp_path))
    s.migrate()
    yield s
    s.close()


def new_batch(store, clock: WallClock, n: int, *, expires_s: float = 86400.0, bid: str = "msgbatch_a") -> Batch:
    now = clock.now_us()
    b = Batch(id=bid, tenant="t", created_at=now, expires_at=now + int(expires_s * 1e6), counts=Counts(processing=n))
    store.create(b, [(f"c{i}", PARAMS) for i in range(n)])
    return b


def runner(store, clock: WallClock, execute, *, owner: str = "w1", concurrency: int = 4, poll_s: float = 5.0) -> BatchRunner:
    return BatchRunner(
        AsyncBatchStore(store, inline=True), execute, now_us=clock.now_us, owner=owner, concurrency=concurrency, claim_size=8,
        lease_s=LEASE_S, poll_s=poll_s, sweep_s=1.0, results_days=29,
    )  # fmt: skip


def lines(store, bid: str = "msgbatch_a") -> list[dict]:
    return [json.loads(line) for _, line in store.results("t", bid, -1, 1000)]


async def test_a_long_item_keeps_its_lease_and_ends_once(store, autojump_clock: trio.testing.MockClock) -> None:
    clock = WallClock()
    new_batch(store, clock, 1)
    stolen: list = []

    async def slow(claim):
        # Five leases long: without renewals another worker would take it at 30 s.
        for _ in range(10):
            await trio.sleep(LEASE_S / 2)
            stolen.extend(store.claim("w2", clock.now_us(), int(LEASE_S * 1e6), 10))
        return 200, [], MESSAGE

    r = runner(store, clock, slow)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        with trio.fail_after(1000):
            while store.get("t", "msgbatch_a").processing_status != "ended":
                await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert stolen == [] and r.succeeded == 1 and r.duplicates == 0
    assert [x["result"]["type"] for x in lines(store)] == ["succeeded"]


async def test_not_now_waits_out_its_backoff_then_runs_again(store, autojump_clock: trio.testing.MockClock) -> None:
    clock = WallClock()
    new_batch(store, clock, 1)
    calls: list[tuple[float, int]] = []

    async def busy_then_fine(claim):
        calls.append((trio.current_time(), claim.attempt))
        if len(calls) == 1:
            return 529, [(b"retry-after", b"7")], error_body("overloaded_error", "shed")
        return 200, [], MESSAGE

    r = runner(store, clock, busy_then_fine, poll_s=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        with trio.fail_after(100):
            while store.get("t", "msgbatch_a").processing_status != "ended":
                await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    (t1, a1), (t2, a2) = calls
    assert (a1, a2) == (1, 2) and 7.0 <= t2 - t1 <= 7.0 + 0.5 + 0.01  # due at 7 s, found at the next poll
    assert r.retried == 1 and [x["result"]["type"] for x in lines(store)] == ["succeeded"]


async def test_concurrency_is_bounded_and_a_new_batch_wakes_the_runner(store, autojump_clock: trio.testing.MockClock) -> None:
    clock = WallClock()
    running = peak = 0
    started: list[float] = []

    async def work(claim):
        nonlocal running, peak
        started.append(trio.current_time())
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1
        return 200, [], MESSAGE

    r = runner(store, clock, work, concurrency=3, poll_s=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await trio.sleep(10)  # idle: nothing to claim, the next poll is a minute away
        created = trio.current_time()
        new_batch(store, clock, 10)
        r.wake()
        with trio.fail_after(100):
            while store.get("t", "msgbatch_a").processing_status != "ended":
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert peak == 3 and started[0] == created  # woken at once, not at the poll
    assert max(started) - created == pytest.approx(3.0)  # 10 items, 3 at a time, 1 s each: four rounds
    assert r.succeeded == 10 and len(lines(store)) == 10


async def test_shutdown_hands_items_in_flight_back_at_once(store, autojump_clock: trio.testing.MockClock) -> None:
    clock = WallClock()
    new_batch(store, clock, 2)
    first_started = trio.Event()

    async def hang(claim):
        first_started.set()
        await trio.sleep_forever()

    async def quick(claim):
        return 200, [], MESSAGE

    r1 = runner(store, clock, hang, owner="w1")
    async with trio.open_nursery() as nursery:
        await nursery.start(r1.run)
        await first_started.wait()
        nursery.cancel_scope.cancel()  # the lifespan ends mid-item
    # Released, not left to the lease: another worker takes both at once.
    r2 = runner(store, clock, quick, owner="w2")
    async with trio.open_nursery() as nursery:
        await nursery.start(r2.run)
        with trio.fail_after(LEASE_S / 2):
            while store.get("t", "msgbatch_a").processing_status != "ended":
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert r2.succeeded == 2


async def test_an_expired_batch_ends_with_what_was_left_expired(store, autojump_clock: trio.testing.MockClock) -> None:
    clock = WallClock()
    new_batch(store, clock, 6, expires_s=10.0)

    async def four_seconds(claim):
        await trio.sleep(4)
        return 200, [], MESSAGE

    r = runner(store, clock, four_seconds, concurrency=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        with trio.fail_after(100):
            while store.get("t", "msgbatch_a").processing_status != "ended":
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    kinds = [x["result"]["type"] for x in lines(store)]
    # Two finished by 8 s; the third was in flight at 10 s: expired, and its run stopped there.
    assert kinds == ["succeeded", "succeeded", "expired", "expired", "expired", "expired"]
    assert r.abandoned == 1 and r.duplicates == 0
    assert store.get("t", "msgbatch_a").counts == Counts(succeeded=2, expired=4)
