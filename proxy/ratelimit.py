"""Guard: per-tenant request and token rate limits, with Anthropic's headers.

Each tenant has two token buckets, requests per minute (RPM) and tokens per
minute (TPM), shaped as Anthropic describes its own limits: capacity equals the
per-minute limit and refills continuously at limit/60 per second, so a tenant
may burst up to its minute's allowance and then proceeds at the steady rate.

Input tokens are only *estimated* at admission (from the body size) and output
tokens are unknown until the response ends, so admission takes the estimate
and :meth:`settle` charges the difference afterwards.

Three layers:

* :class:`TokenBucket` — the arithmetic, sans-IO (``now`` passed in).
* :class:`LocalRateLimiter` — buckets in this process: one worker, or tests.
* :class:`RedisRateLimiter` — the same buckets in Redis behind one atomic Lua
  script, so every worker on every host draws on one budget.
"""

from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

import cachetools
import coredis
import coredis.exceptions
import msgspec
import trio

from .settings import RateLimitSettings

__all__ = ["Decision", "Limits", "LocalRateLimiter", "RedisRateLimiter", "TokenBucket"]

log = logging.getLogger(__name__)


class TokenBucket:
    """A continuously refilled bucket of ``burst`` tokens at ``rate_per_s``.

    Debt is allowed: :meth:`adjust` may drive the level below zero when the
    real usage exceeds the estimate. We keep the debt rather than clamping at
    zero because the tokens *were* spent upstream; clamping would let a tenant
    that always under-estimates (short prompt, long answer) exceed its TPM
    indefinitely. A bucket in debt refuses until it has earned its way back
    above the next request's size — the same after-the-fact accounting the
    upstream applies to output tokens.

    A request larger than the whole burst could never fit; it is admitted when
    the bucket is full and leaves it in debt, so a big request is slowed, not
    refused forever.
    """

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0 or burst <= 0:
            raise ValueError("rate_per_s and burst must be positive")
        self.rate = rate_per_s
        self.burst = burst
        self.level = burst  # a new tenant starts with its full allowance
        self.stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self.stamp is not None and now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        if self.stamp is None or now > self.stamp:
            self.stamp = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` could be taken (0 if now), without taking."""
        self._refill(now)
        need = min(n, self.burst)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def try_take(self, n: float, now: float) -> float:
        """Take ``n`` and return 0, or take nothing and return the seconds to wait."""
        wait = self.wait_for(n, now)
        if wait == 0.0:
            self.level -= n
        return wait

    def adjust(self, delta: float, now: float) -> None:
        """Charge ``delta`` more tokens (negative refunds), debt allowed, never above burst."""
        self._refill(now)
        self.level = min(self.burst, self.level - delta)

    refund = adjust  # refund(-n) reads oddly, but one code path keeps the math in one place

    def remaining(self, now: float) -> float:
        self._refill(now)
        return self.level

    def time_to_full(self, now: float) -> float:
        self._refill(now)
        return (self.burst - self.level) / self.rate


class Limits(msgspec.Struct, frozen=True):
    """One tenant's limits; 0 means unlimited for that dimension."""

    requests_per_minute: int
    tokens_per_minute: int


class Decision(msgspec.Struct):
    """The outcome of one admission, with what the response headers report."""

    allowed: bool
    retry_after: float
    requests_limit: int = 0
    requests_remaining: int = 0
    requests_reset: str = ""
    tokens_limit: int = 0
    tokens_remaining: int = 0
    tokens_reset: str = ""
    # True when the limiter could not decide (its store was unreachable) and
    # let the request through: no figures to report, so no headers.
    degraded: bool = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Anthropic's ``anthropic-ratelimit-*`` headers, plus ``retry-after`` on a refusal."""
        out: list[tuple[bytes, bytes]] = []
        if self.degraded:
            return out
        if self.requests_limit:
            out += [
                (b"anthropic-ratelimit-requests-limit", str(self.requests_limit).encode()),
                (b"anthropic-ratelimit-requests-remaining", str(self.requests_remaining).encode()),
                (b"anthropic-ratelimit-requests-reset", self.requests_reset.encode()),
            ]
        if self.tokens_limit:
            out += [
                (b"anthropic-ratelimit-tokens-limit", str(self.tokens_limit).encode()),
                (b"anthropic-ratelimit-tokens-remaining", str(self.tokens_remaining).encode()),
                (b"anthropic-ratelimit-tokens-reset", self.tokens_reset.encode()),
            ]
        if not self.allowed:
            # whole seconds (RFC 9110), rounded up so a client never retries early
            out.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return out


def rfc3339(wall: float) -> str:
    """Seconds since the epoch as Anthropic formats its reset times: UTC, whole seconds, ``Z``."""
    return datetime.fromtimestamp(math.ceil(wall), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decision(
    allowed: bool,
    retry_after: float,
    limits: Limits,
    req_left: float,
    req_full_in: float,
    tok_left: float,
    tok_full_in: float,
    wall: float,
) -> Decision:
    return Decision(
        allowed=allowed,
        retry_after=retry_after,
        requests_limit=limits.requests_per_minute,
        requests_remaining=max(0, int(req_left)),
        requests_reset=rfc3339(wall + req_full_in) if limits.requests_per_minute else "",
        tokens_limit=limits.tokens_per_minute,
        tokens_remaining=max(0, int(tok_left)),
        tokens_reset=rfc3339(wall + tok_full_in) if limits.tokens_per_minute else "",
    )


def _bucket(per_minute: int) -> TokenBucket | None:
    return TokenBucket(per_minute / 60.0, float(per_minute)) if per_minute else None


class _TenantBuckets:
    __slots__ = ("limits", "requests", "tokens")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.requests = _bucket(limits.requests_per_minute)
        self.tokens = _bucket(limits.tokens_per_minute)


class LocalRateLimiter:
    """Per-tenant RPM and TPM buckets held in this process.

    ``clock`` drives the bucket math (the app passes ``trio.current_time``, so
    tests run it on a mock clock); ``wall_clock`` only turns "seconds until
    full" into the RFC 3339 reset time (the app passes ``time.time``).

    Idle tenants are evicted: buckets live in a TTL map whose entries expire
    ``idle_ttl`` after last use. A bucket idle that long has refilled
    completely unless it carried debt, so eviction forgives at most the tail of
    a debt; the ``max_tenants`` bound (LRU beyond it) keeps memory fixed
    whatever the key churn.
    """

    def __init__(
        self,
        limits: dict[str, Limits],
        *,
        default: Limits,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        max_tenants: int = 100_000,  # ~200 B per tenant => ~20 MB worst case per worker
        idle_ttl: float = 120.0,  # twice the 60 s refill window of a per-minute bucket
    ) -> None:
        self._limits = dict(limits)
        self._default = default
        self._clock = clock
        self._wall = wall_clock
        self._buckets: cachetools.TTLCache[str, _TenantBuckets] = cachetools.TTLCache(
            maxsize=max_tenants, ttl=idle_ttl, timer=clock
        )

    def limits_for(self, tenant: str) -> Limits:
        return self._limits.get(tenant, self._default)

    def _get(self, tenant: str) -> _TenantBuckets:
        b = self._buckets.get(tenant)
        if b is None:
            b = _TenantBuckets(self.limits_for(tenant))
        self._buckets[tenant] = b  # re-set on every use: the TTL counts from last use
        return b

    async def admit(self, tenant: str, est_tokens: int) -> Decision:
        """Take one request and ``est_tokens`` from the tenant's buckets, or neither."""
        now = self._clock()
        b = self._get(tenant)
        wait_r = b.requests.wait_for(1, now) if b.requests else 0.0
        wait_t = b.tokens.wait_for(est_tokens, now) if b.tokens else 0.0
        allowed = wait_r == 0.0 and wait_t == 0.0
        if allowed:
            if b.requests:
                b.requests.level -= 1
            if b.tokens:
                b.tokens.level -= est_tokens
        return self._report(b, allowed, max(wait_r, wait_t), now)

    async def settle(self, tenant: str, est_tokens: int, actual_tokens: int) -> None:
        """Charge the difference between the admitted estimate and the real usage."""
        b = self._get(tenant)
        if b.tokens and actual_tokens != est_tokens:
            b.tokens.adjust(actual_tokens - est_tokens, self._clock())

    def _report(self, b: _TenantBuckets, allowed: bool, wait: float, now: float) -> Decision:
        r, t = b.requests, b.tokens
        return _decision(
            allowed,
            wait,
            b.limits,
            r.remaining(now) if r else 0,
            r.time_to_full(now) if r else 0.0,
            t.remaining(now) if t else 0,
            t.time_to_full(now) if t else 0.0,
            self._wall(),
        )


# One script does admission and settlement, so both see the same refill math
# and every call is atomic. The tenant's two buckets share one hash (one key,
# one cluster slot): fields rl/tl = levels, ts = last refill, all in seconds
# of *Redis server time* — one clock for every host, immune to skew between
# proxy hosts. The key expires once both buckets would be full again (plus a
# margin), so an idle tenant costs nothing: an absent key *is* a full bucket.
#
# ARGV: mode ("admit" | "adjust"), rpm, tpm, n_tokens (estimate for admit,
# delta for adjust), margin_s. Limits are per minute; 0 = unlimited.
# Returns strings (Lua numbers become integers on the way out):
# {allowed, retry_after, req_left, req_full_in, tok_left, tok_full_in}.
_LUA = """
local key = KEYS[1]
local mode = ARGV[1]
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local st = redis.call('HMGET', key, 'rl', 'tl', 'ts')
local rl = tonumber(st[1]) or rpm
local tl = tonumber(st[2]) or tpm
local ts = tonumber(st[3]) or now
local dt = math.max(0, now - ts)
local rr = rpm / 60
local tr = tpm / 60
if rpm > 0 then rl = math.min(rpm, rl + dt * rr) end
if tpm > 0 then tl = math.min(tpm, tl + dt * tr) end
local allowed = 1
local wait = 0
if mode == 'admit' then
  if rpm > 0 and rl < 1 then wait = math.max(wait, (1 - rl) / rr) end
  if tpm > 0 then
    local need = math.min(n, tpm)
    if tl < need then wait = math.max(wait, (need - tl) / tr) end
  end
  if wait > 0 then
    allowed = 0
  else
    if rpm > 0 then rl = rl - 1 end
    if tpm > 0 then tl = tl - n end
  end
else
  if tpm > 0 then tl = math.min(tpm, tl - n) end
end
local rfull = 0
local tfull = 0
if rpm > 0 then rfull = (rpm - rl) / rr end
if tpm > 0 then tfull = (tpm - tl) / tr end
redis.call('HSET', key, 'rl', tostring(rl), 'tl', tostring(tl), 'ts', tostring(now))
redis.call('PEXPIRE', key, math.ceil((math.max(rfull, tfull) + margin) * 1000))
return {tostring(allowed), tostring(wait), tostring(rl), tostring(rfull), tostring(tl), tostring(tfull)}
"""


class RedisRateLimiter:
    """Per-tenant RPM and TPM buckets in Redis, shared by every worker and host.

    Fails open: if Redis is unreachable, slow (over ``timeout``) or errs, the
    request is allowed and the error counted in ``errors``, with at most one
    log line per ``log_interval``. A rate limiter protects the upstream budget;
    an outage of it must not become an outage of the gateway, and the upstream
    still enforces its own limits with 429s we pass through. The log line is
    rate limited because during an outage every request fails the same way.

    The ``client`` must already be open (coredis 6 clients are entered with
    ``async with``); its owner — the app lifespan — closes it. :meth:`connect`
    does both for a standalone limiter.
    """

    def __init__(
        self,
        client: coredis.Redis,
        limits: dict[str, Limits],
        *,
        default: Limits,
        wall_clock: Callable[[], float],
        clock: Callable[[], float] = trio.current_time,  # only paces the outage log line
        prefix: str = "weir:rl:",  # namespaces our keys in a Redis shared with the cache
        # Redis answers in < 1 ms on a LAN; 50 ms of waiting is already worse than failing open.
        timeout: float = 0.05,
        log_interval: float = 10.0,  # one line per 10 s during an outage is enough to page on
        expiry_margin: float = 5.0,  # keep a just-full key a little longer than needed
    ) -> None:
        self._client = client
        self._script = client.register_script(_LUA)
        self._limits = dict(limits)
        self._default = default
        self._wall = wall_clock
        self._clock = clock
        self._prefix = prefix
        self._timeout = timeout
        self._log_interval = log_interval
        self._margin = expiry_margin
        self._last_log: float | None = None
        self.errors = 0

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, limits: dict[str, Limits], **kw: object) -> AsyncIterator[RedisRateLimiter]:
        client = coredis.Redis.from_url(url)
        async with client:
            yield cls(client, limits, **kw)  # type: ignore[arg-type]

    def limits_for(self, tenant: str) -> Limits:
        return self._limits.get(tenant, self._default)

    async def _call(self, tenant: str, mode: str, limits: Limits, n: int) -> list[bytes] | None:
        try:
            with trio.move_on_after(self._timeout):
                return await self._script(
                    keys=[self._prefix + tenant],
                    args=[mode, limits.requests_per_minute, limits.tokens_per_minute, n, self._margin],
                )
            err: BaseException = TimeoutError(f"no answer within {self._timeout} s")
        except (coredis.exceptions.RedisError, OSError) as exc:
            err = exc
        self.errors += 1
        now = self._clock()
        if self._last_log is None or now - self._last_log >= self._log_interval:
            self._last_log = now
            log.warning("rate limiter failing open: Redis unavailable (%d errors so far): %r", self.errors, err)
        return None

    async def admit(self, tenant: str, est_tokens: int) -> Decision:
        limits = self.limits_for(tenant)
        res = await self._call(tenant, "admit", limits, est_tokens)
        if res is None:
            return Decision(allowed=True, retry_after=0.0, degraded=True)
        allowed, wait, rl, rfull, tl, tfull = (float(x) for x in res)
        return _decision(allowed == 1, wait, limits, rl, rfull, tl, tfull, self._wall())

    async def settle(self, tenant: str, est_tokens: int, actual_tokens: int) -> None:
        limits = self.limits_for(tenant)
        if limits.tokens_per_minute and actual_tokens != est_tokens:
            await self._call(tenant, "adjust", limits, actual_tokens - est_tokens)


async def serve_ratelimiter(settings: RateLimitSettings, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Own the app's rate limiter for the lifespan: None when no limit is set.

    Runs as a task in the lifespan nursery so the Redis client (a context
    manager in coredis 6) is opened and closed by its owner.
    """
    import time

    default = Limits(settings.requests_per_minute, settings.tokens_per_minute)
    per_tenant = {
        tenant: Limits(v.get("requests_per_minute", default.requests_per_minute), v.get("tokens_per_minute", default.tokens_per_minute))
        for tenant, v in settings.tenants.items()
    }
    if not any(l.requests_per_minute or l.tokens_per_minute for l in [default, *per_tenant.values()]):
        task_status.started(None)
        return
    if settings.redis_url:
        async with RedisRateLimiter.connect(settings.redis_url, per_tenant, default=default, wall_clock=time.time) as limiter:
            task_status.started(limiter)
            await trio.sleep_forever()
    task_status.started(LocalRateLimiter(per_tenant, default=default, clock=trio.current_time, wall_clock=time.time))
