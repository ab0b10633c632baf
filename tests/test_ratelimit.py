"""Rate limits: bucket arithmetic, the in-process limiter, and the shared Redis limiter."""

from __future__ import annotations

import logging
import re
import socket
import uuid

import coredis
import pytest
import trio
import trio.testing

from proxy.ratelimit import Decision, Limits, LocalRateLimiter, RedisRateLimiter, TokenBucket, rfc3339

from .harness import closed_port

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
WALL0 = 1_750_000_000.0  # a fixed wall clock: 2025-06-15T15:06:40Z



# -- TokenBucket ------------------------------------------------------------


def test_bucket_takes_until_empty_then_reports_the_wait():
    b = TokenBucket(rate_per_s=2.0, burst=10)
    assert b.try_take(10, now=0.0) == 0.0
    assert b.try_take(1, now=0.0) == pytest.approx(0.5)  # 1 token at 2/s
    assert b.try_take(4, now=1.0) == pytest.approx(1.0)  # 2 refilled, 2 more needed
    assert b.remaining(1.0) == pytest.approx(2.0)  # a refusal takes nothing
    assert b.try_take(4, now=2.0) == 0.0
    assert b.remaining(100.0) == 10  # never above burst


def test_bucket_debt_from_underestimates_delays_the_next_request():
    b = TokenBucket(rate_per_s=10.0, burst=100)
    assert b.try_take(50, now=0.0) == 0.0
    b.adjust(+120, now=0.0)  # the answer was 120 tokens longer than estimated
    assert b.remaining(0.0) == pytest.approx(-70)
    assert b.try_take(10, now=0.0) == pytest.approx(8.0)  # climb from -70 to 10 at 10/s
    b.refund(-1_000, now=0.0)  # over-estimates refund, but never above burst
    assert b.remaining(0.0) == 100


def test_bucket_admits_an_oversized_request_only_when_full():
    b = TokenBucket(rate_per_s=1.0, burst=10)
    assert b.try_take(5, now=0.0) == 0.0
    assert b.try_take(30, now=0.0) == pytest.approx(5.0)  # waits for a full bucket, not forever
    assert b.try_take(30, now=5.0) == 0.0
    assert b.remaining(5.0) == pytest.approx(-20)


async def test_bucket_with_trio_mock_clock(autojump_clock):
    b = TokenBucket(rate_per_s=1.0, burst=3)
    for _ in range(3):
        assert b.try_take(1, trio.current_time()) == 0.0
    wait = b.try_take(1, trio.current_time())
    assert wait == pytest.approx(1.0)
    await trio.sleep(wait)
    assert b.try_take(1, trio.current_time()) == 0.0


# -- LocalRateLimiter ---------------------------------------------------------


def make_local(autojump_clock=None, **kw) -> LocalRateLimiter:
    return LocalRateLimiter(
        {"small": Limits(requests_per_minute=3, tokens_per_minute=1_000)},
        default=Limits(requests_per_minute=60, tokens_per_minute=60_000),
        clock=trio.current_time,
        wall_clock=lambda: WALL0 + trio.current_time(),
        **kw,
    )


async def test_local_rpm_refuses_with_retry_after(autojump_clock):
    rl = make_local()
    for i in range(3):
        d = await rl.admit("small", 10)
        assert d.allowed and d.requests_remaining == 2 - i
    d = await rl.admit("small", 10)
    assert not d.allowed
    assert d.retry_after == pytest.approx(20.0)  # 3 per minute: one every 20 s
    assert d.tokens_remaining == 970  # the refused request took no tokens
    await trio.sleep(d.retry_after)
    assert (await rl.admit("small", 10)).allowed
    # other tenants have their own budget
    assert (await rl.admit("someone-else", 10)).allowed


async def test_local_tpm_refuses_and_settle_corrects(autojump_clock):
    rl = make_local()
    d = await rl.admit("small", 600)
    assert d.allowed and d.tokens_remaining == 400
    d = await rl.admit("small", 500)
    assert not d.allowed
    assert d.retry_after == pytest.approx(6.0)  # 100 tokens short at 1000/60 per s
    await rl.settle("small", est_tokens=600, actual_tokens=200)  # the estimate was high
    d = await rl.admit("small", 500)
    assert d.allowed and d.tokens_remaining == 300
    await rl.settle("small", est_tokens=500, actual_tokens=1_500)  # long answer: debt
    d = await rl.admit("small", 1)
    assert not d.allowed and d.tokens_remaining == 0
    assert d.retry_after == pytest.approx(701 / (1000 / 60))


async def test_headers_match_anthropic_names_and_formats(autojump_clock):
    rl = make_local()
    await rl.admit("small", 400)
    d = await rl.admit("small", 100)
    h = dict(d.headers())
    assert h[b"anthropic-ratelimit-requests-limit"] == b"3"
    assert h[b"anthropic-ratelimit-requests-remaining"] == b"1"
    assert h[b"anthropic-ratelimit-tokens-limit"] == b"1000"
    assert h[b"anthropic-ratelimit-tokens-remaining"] == b"500"
    # 2 requests short refill in 40 s; 500 tokens in 30 s
    assert h[b"anthropic-ratelimit-requests-reset"] == rfc3339(WALL0 + 40).encode()
    assert h[b"anthropic-ratelimit-tokens-reset"] == rfc3339(WALL0 + 30).encode()
    assert h[b"anthropic-ratelimit-tokens-reset"] == b"2025-06-15T15:07:10Z"
    assert all(RFC3339.match(v.decode()) for k, v in h.items() if k.endswith(b"reset"))
    assert b"retry-after" not in h
    await rl.admit("small", 1)
    refused = dict((await rl.admit("small", 1)).headers())
    assert refused[b"retry-after"] == b"20"
    assert Decision(allowed=True, retry_after=0, degraded=True).headers() == []


async def test_idle_tenants_are_evicted(autojump_clock):
    rl = make_local(max_tenants=1_000, idle_ttl=120.0)
    for i in range(5_000):
        await rl.admit(f"t{i}", 1)
    assert len(rl._buckets) <= 1_000  # bounded whatever the churn
    await trio.sleep(121)
    rl._buckets.expire()
    assert len(rl._buckets) == 0


# -- RedisRateLimiter -------------------------------------------------------------


LIMITS = {"small": Limits(requests_per_minute=3, tokens_per_minute=1_000)}
DEFAULT = Limits(requests_per_minute=60, tokens_per_minute=60_000)


@pytest.mark.services
async def test_redis_two_limiters_share_one_budget(redis_url):
    prefix = f"weir:test:{uuid.uuid4().hex}:"
    client_a = coredis.Redis.from_url(redis_url)
    client_b = coredis.Redis.from_url(redis_url)
    async with client_a, client_b:
        a = RedisRateLimiter(client_a, LIMITS, default=DEFAULT, wall_clock=lambda: WALL0, prefix=prefix)
        b = RedisRateLimiter(client_b, LIMITS, default=DEFAULT, wall_clock=lambda: WALL0, prefix=prefix)
        try:
            assert (await a.admit("small", 300)).allowed
            d = await b.admit("small", 300)
            assert d.allowed and d.requests_remaining == 1 and d.tokens_remaining == 400
            d = await a.admit("small", 500)  # b's spend is visible to a
            assert not d.allowed
            assert d.retry_after == pytest.approx(6.0, abs=0.1)
            await b.settle("small", est_tokens=300, actual_tokens=0)
            d = await a.admit("small", 500)
            assert d.allowed and d.requests_remaining == 0
            d = await b.admit("small", 1)
            assert not d.allowed and d.retry_after == pytest.approx(20.0, abs=0.1)
            h = dict(d.headers())
            assert h[b"anthropic-ratelimit-requests-limit"] == b"3"
            assert RFC3339.match(h[b"anthropic-ratelimit-requests-reset"].decode())
            assert h[b"retry-after"] == b"20"
            # idle tenants don't leak: the key expires once the buckets would be full
            ttl = await client_a.pttl(prefix + "small")
            assert 0 < ttl <= (60 + 5) * 1000
            assert a.errors == 0 and b.errors == 0
        finally:
            await client_a.delete([prefix + "small"])


@pytest.mark.services
async def test_redis_debt_is_shared_and_settle_charges_it(redis_url):
    prefix = f"weir:test:{uuid.uuid4().hex}:"
    async with RedisRateLimiter.connect(
        redis_url, LIMITS, default=DEFAULT, wall_clock=lambda: WALL0, prefix=prefix
    ) as rl:
        assert (await rl.admit("small", 100)).allowed
        await rl.settle("small", est_tokens=100, actual_tokens=1_600)
        d = await rl.admit("small", 1)
        assert not d.allowed and d.tokens_remaining == 0
        assert d.retry_after == pytest.approx(601 / (1000 / 60), abs=0.1)
        await rl._client.delete([prefix + "small"])




async def test_redis_down_fails_open_with_counted_rate_limited_log(caplog):
    caplog.set_level(logging.WARNING, logger="proxy.ratelimit")
    now = [0.0]
    async with RedisRateLimiter.connect(
        f"redis://127.0.0.1:{closed_port()}/0",
        LIMITS,
        default=DEFAULT,
        wall_clock=lambda: WALL0,
        clock=lambda: now[0],
        timeout=1.0,
    ) as rl:
        for _ in range(5):  # 5 > the limit of 3: a working limiter would refuse
            d = await rl.admit("small", 10)
            assert d.allowed and d.degraded and d.headers() == []
        await rl.settle("small", est_tokens=10, actual_tokens=50)
        assert rl.errors == 6
        assert len(caplog.records) == 1  # one line, not one per request
        now[0] = 11.0
        await rl.admit("small", 10)
        assert len(caplog.records) == 2


async def test_redis_that_accepts_but_never_answers_fails_open_within_timeout(autojump_clock):
    # A hung Redis (accepts, never replies) is worse than a dead one: without
    # the timeout every request would wait on it.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held = []

    async def mute(stream):
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, mute, listeners)
        async with RedisRateLimiter.connect(
            f"redis://127.0.0.1:{port}/0", LIMITS, default=DEFAULT, wall_clock=lambda: WALL0, timeout=0.05
        ) as rl:
            t0 = trio.current_time()
            d = await rl.admit("small", 10)
            assert d.allowed and d.degraded
            assert trio.current_time() - t0 == pytest.approx(0.05)
            assert rl.errors == 1
            assert held  # it really connected: the timeout, not a refusal, ended the wait
        n.cancel_scope.cancel()
