"""A pool of API keys for one provider, and which one to use next.

Why a pool: provider rate limits are per key (per organisation, really), so a
deployment with several keys gets their sum only if load goes where the
capacity is. The pool learns each key's remaining capacity from the rate-limit
headers on every response, cools a key down after a 429, and takes a key out
of rotation when a 401/403 is *confirmed* — until an admin re-enables it.

The key is shared by every tenant, so the pool must judge the key, not the
request. A 401/403 can be the request's own doing (a beta, a model or an
endpoint that key may not use): one tenant's odd request must not take the
key away from all. So a 401/403 only marks the key *suspect*; the router
then sends one cheap probe with that key (``begin_probe``/``end_probe``) and
the key is disabled only if the probe is refused the same way. A 429 that
names no wait cools the key for a short time that doubles while 429s keep
coming, instead of a long fixed one.

Sans-IO: no clock (``now`` is ``trio.current_time()``, passed in), no tasks,
no sockets. The router holds a ``Lease`` for the duration of one upstream
request and hands it back with ``observe`` (a response arrived) or
``release`` (it didn't: connect error, cancellation).

Secrets: a key is named everywhere by a non-secret id, ``<pool>#<index>:<first
8 hex of sha256(key)>`` — an operator can match it against a key they hold by
hashing it. The secret itself is reachable only as ``Lease.secret``; it never
appears in ``snapshot()``, in any ``repr``/``str``, or in an exception message.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone

import msgspec

from proxy.retry import parse_retry_after, parse_retry_after_ms

__all__ = ["KeyPool", "KeyPoolConfig", "Lease", "parse_duration"]


class KeyPoolConfig(msgspec.Struct, frozen=True, kw_only=True):
    # A 429 that names no wait (no retry-after, no reset header): the first
    # cool-down is the Anthropic and OpenAI SDKs' initial retry delay (0.5 s),
    # doubling while 429s keep coming, up to half of the per-minute window
    # both providers meter (30 s). One 429 must not idle a shared key for long.
    cooldown_s: float = 0.5
    cooldown_max_s: float = 30.0
    # After a probe found a key good, further 401/403s on it within this long
    # are the requests' fault without another probe: one probe per key per
    # minute at most, however many refused requests a tenant sends.
    probe_interval_s: float = 60.0
    # An unobserved key ranks as if it had this many requests left: above a
    # key that reported it is nearly spent, below one that reported a healthy
    # budget (Anthropic's tier 2 starts at 1,000 requests a minute).
    unknown_remaining: int = 100
    # Learned capacity without a reset time is forgotten after one per-minute
    # window: by then the bucket has refilled, or a newer response told us.
    stale_s: float = 60.0


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def parse_duration(value: str) -> float | None:
    """Seconds from OpenAI's reset durations: "1s", "6m0s", "20ms", "1h2m3.5s"."""
    value = value.strip()
    if not value:
        return None
    total = 0.0
    pos = 0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            return None
        n = float(m.group(1))
        total += n * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[m.group(2)]
        pos = m.end()
    if pos != len(value):
        return None
    return total


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def _parse_rfc3339(value: str, ref_wallclock: float | None) -> float | None:
    """Seconds until an RFC 3339 instant (Anthropic's ``*-reset`` headers)."""
    if ref_wallclock is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - ref_wallclock)


class _Capacity(msgspec.Struct):
    """What one response said about its key: remaining counts and seconds to their reset."""

    requests: int | None = None
    requests_reset_s: float | None = None
    tokens: int | None = None
    tokens_reset_s: float | None = None


def _read_capacity(h: Mapping[str, str], ref_wallclock: float | None) -> _Capacity:
    cap = _Capacity()
    # Anthropic: counts, and RFC 3339 instants for the resets.
    cap.requests = _parse_int(h.get("anthropic-ratelimit-requests-remaining"))
    if cap.requests is not None and (r := h.get("anthropic-ratelimit-requests-reset")):
        cap.requests_reset_s = _parse_rfc3339(r, ref_wallclock)
    # The tightest of the token buckets Anthropic reports decides.
    for dim in ("tokens", "input-tokens", "output-tokens"):
        n = _parse_int(h.get(f"anthropic-ratelimit-{dim}-remaining"))
        if n is not None and (cap.tokens is None or n < cap.tokens):
            cap.tokens = n
            r = h.get(f"anthropic-ratelimit-{dim}-reset")
            cap.tokens_reset_s = _parse_rfc3339(r, ref_wallclock) if r else None
    # OpenAI: counts, and durations for the resets.
    if cap.requests is None:
        cap.requests = _parse_int(h.get("x-ratelimit-remaining-requests"))
        if cap.requests is not None and (r := h.get("x-ratelimit-reset-requests")):
            cap.requests_reset_s = parse_duration(r)
    if cap.tokens is None:
        cap.tokens = _parse_int(h.get("x-ratelimit-remaining-tokens"))
        if cap.tokens is not None and (r := h.get("x-ratelimit-reset-tokens")):
            cap.tokens_reset_s = parse_duration(r)
    return cap


class _Key:
    __slots__ = (
        "index",
        "id",
        "secret",
        "disabled",
        "cooling_until",
        "requests",
        "requests_until",
        "tokens",
        "tokens_until",
        "requests_refill",
        "tokens_refill",
        "in_flight",
        "count_429",
        "count_401",
        "count_403",
        "streak_429",
        "suspect",
        "probing",
        "probed_ok_at",
    )

    def __init__(self, index: int, key_id: str, secret: str) -> None:
        self.index = index
        self.id = key_id
        self.secret = secret
        self.disabled = False
        self.cooling_until = -math.inf
        self.requests: int | None = None
        self.requests_until = math.inf  # when the learned count stops being true
        self.tokens: int | None = None
        self.tokens_until = math.inf
        # When a reported reset refills the bucket; unlike *_until, only ever
        # from the upstream's own headers, never from our stale_s guess.
        self.requests_refill: float | None = None
        self.tokens_refill: float | None = None
        self.in_flight = 0
        self.count_429 = 0
        self.count_401 = 0
        self.count_403 = 0
        self.streak_429 = 0  # 429s in a row: how far the default cool-down has doubled
        self.suspect = False  # a 401/403 awaits a confirming probe
        self.probing = False
        self.probed_ok_at = -math.inf

    def __repr__(self) -> str:
        return f"<key {self.id}>"

    def forget_stale(self, now: float) -> None:
        if self.requests is not None and now >= self.requests_until:
            self.requests, self.requests_until, self.requests_refill = None, math.inf, None
        if self.tokens is not None and now >= self.tokens_until:
            self.tokens, self.tokens_until, self.tokens_refill = None, math.inf, None

    def available_at(self) -> float:
        """When this key may be used again (ignoring ``disabled``); -inf if now.

        A key that reported zero left with a known refill time is as good as
        cooling until then: the upstream would only answer 429.
        """
        t = self.cooling_until
        if self.requests == 0 and self.requests_refill is not None:
            t = max(t, self.requests_refill)
        if self.tokens == 0 and self.tokens_refill is not None:
            t = max(t, self.tokens_refill)
        return t


class Lease:
    """One request's use of one key; hand it back with ``observe`` or ``release``."""

    __slots__ = ("_key", "_pool", "_done")

    def __init__(self, key: _Key, pool: KeyPool) -> None:
        self._key = key
        self._pool = pool
        self._done = False

    @property
    def key_id(self) -> str:
        return self._key.id

    @property
    def secret(self) -> str:
        """The API key to put in ``x-api-key`` / ``Authorization``. Never log it."""
        return self._key.secret

    def __repr__(self) -> str:
        return f"<Lease {self._key.id}{' done' if self._done else ''}>"

    __str__ = __repr__


def _key_id(pool: str, index: int, secret: str) -> str:
    return f"{pool}#{index}:{hashlib.sha256(secret.encode()).hexdigest()[:8]}"


class KeyPool:
    def __init__(self, keys: list[str], *, name: str, config: KeyPoolConfig | None = None) -> None:
        if not keys:
            raise ValueError(f"key pool {name!r} needs at least one key")
        seen: dict[str, int] = {}
        self._keys: list[_Key] = []
        for i, secret in enumerate(keys):
            if not isinstance(secret, str) or not secret.strip():
                raise ValueError(f"key pool {name!r}: key #{i} is empty")
            if secret in seen:
                raise ValueError(f"key pool {name!r}: key #{i} duplicates key #{seen[secret]}")
            seen[secret] = i
            self._keys.append(_Key(i, _key_id(name, i, secret), secret))
        self._by_id = {k.id: k for k in self._keys}
        self._name = name
        self._config = config if config is not None else KeyPoolConfig()
        self._cursor = 0  # round-robin start among equally good keys

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_ids(self) -> list[str]:
        return [k.id for k in self._keys]

    def __repr__(self) -> str:
        return f"<KeyPool {self._name} keys={len(self._keys)}>"

    __str__ = __repr__

    # -- choosing --------------------------------------------------------------

    def _rank(self, k: _Key) -> tuple[bool, float, float]:
        requests = self._config.unknown_remaining if k.requests is None else k.requests
        tokens = math.inf if k.tokens is None else k.tokens
        # A key that said it is spent but gave no refill time goes last, not out.
        spent = k.requests == 0 or k.tokens == 0
        # In-flight leases will spend capacity the last response didn't know about.
        return (not spent, requests - k.in_flight, tokens)

    def pick(self, now: float) -> Lease | None:
        """The usable key with the most capacity left, or None when none is usable.

        Equal keys take turns (the scan starts after the last key picked), so
        load spreads even before any rate-limit header has been seen.
        """
        n = len(self._keys)
        best: _Key | None = None
        best_rank: tuple[bool, float, float] | None = None
        for offset in range(n):
            k = self._keys[(self._cursor + offset) % n]
            k.forget_stale(now)
            if k.disabled or now < k.available_at():
                continue
            rank = self._rank(k)
            if best_rank is None or rank > best_rank:
                best, best_rank = k, rank
        if best is None:
            return None
        self._cursor = (best.index + 1) % n
        best.in_flight += 1
        return Lease(best, self)

    def soonest_available(self, now: float) -> float | None:
        """Seconds until some key can be used (0.0 if one can now); None if all are disabled.

        The router turns a number into a 429 with that ``retry-after``.
        """
        soonest: float | None = None
        for k in self._keys:
            if k.disabled:
                continue
            k.forget_stale(now)
            wait = max(0.0, k.available_at() - now)
            if soonest is None or wait < soonest:
                soonest = wait
        return soonest

    # -- learning --------------------------------------------------------------

    def _finish(self, lease: Lease) -> bool:
        if lease._pool is not self:
            raise ValueError(f"lease for {lease.key_id} belongs to another pool")
        if lease._done:
            return False
        lease._done = True
        lease._key.in_flight -= 1
        return True

    def release(self, lease: Lease) -> None:
        """End a lease whose request got no response (connect error, cancelled). Idempotent."""
        self._finish(lease)

    def observe(
        self,
        lease: Lease,
        status: int,
        headers: Mapping[str, str],
        now: float,
        *,
        wallclock: float | None = None,
    ) -> None:
        """Learn from the response a leased key got, and end the lease. Idempotent.

        ``wallclock`` (``time.time()``) is only needed to read absolute times
        (Anthropic's RFC 3339 resets, an HTTP-date retry-after); the
        response's own ``date`` header is preferred, as it shares the
        upstream's clock.
        """
        if not self._finish(lease):
            return
        k = lease._key
        h = {name.lower(): value for name, value in headers.items()}
        ref = wallclock
        if date := h.get("date"):
            try:
                ref = email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError, IndexError):
                pass

        cap = _read_capacity(h, ref)
        if cap.requests is not None:
            k.requests = cap.requests
            k.requests_refill = None if cap.requests_reset_s is None else now + cap.requests_reset_s
            k.requests_until = k.requests_refill if k.requests_refill is not None else now + self._config.stale_s
        if cap.tokens is not None:
            k.tokens = cap.tokens
            k.tokens_refill = None if cap.tokens_reset_s is None else now + cap.tokens_reset_s
            k.tokens_until = k.tokens_refill if k.tokens_refill is not None else now + self._config.stale_s

        if status == 429:
            k.count_429 += 1
            wait = parse_retry_after_ms(h.get("retry-after-ms"))
            if wait is None:
                wait = parse_retry_after(h.get("retry-after"), ref)
            if wait is None:
                resets = [s for s in (cap.requests_reset_s, cap.tokens_reset_s) if s is not None]
                c = self._config
                wait = max(resets) if resets else min(c.cooldown_max_s, c.cooldown_s * 2.0 ** min(k.streak_429, 32))
            k.streak_429 += 1
            k.cooling_until = max(k.cooling_until, now + wait)
            return
        k.streak_429 = 0
        if status in (401, 403):
            if status == 401:
                k.count_401 += 1
            else:
                k.count_403 += 1
            if now - k.probed_ok_at >= self._config.probe_interval_s:
                k.suspect = True

    # -- confirming a 401/403 --------------------------------------------------

    def begin_probe(self, key_id: str) -> bool:
        """True when the caller should probe this key now (it is suspect and nobody is probing it)."""
        k = self._get(key_id)
        if not k.suspect or k.probing or k.disabled:
            return False
        k.probing = True
        return True

    def end_probe(self, key_id: str, status: int | None, now: float) -> None:
        """The probe's answer: 401/403 disables the key; any other status clears it;
        ``None`` (no answer: unreachable, timed out, cancelled) leaves it enabled
        and lets the next 401/403 probe again."""
        k = self._get(key_id)
        k.probing = False
        if status is None:
            return
        k.suspect = False
        if status in (401, 403):
            k.disabled = True
        else:
            k.probed_ok_at = now

    # -- admin -----------------------------------------------------------------

    def _get(self, key_id: str) -> _Key:
        try:
            return self._by_id[key_id]
        except KeyError:
            raise KeyError(f"no key {key_id!r} in pool {self._name!r}") from None

    def enable(self, key_id: str) -> None:
        """Put a disabled key back in rotation (its 429 cool-down, if any, still runs)."""
        k = self._get(key_id)
        k.disabled = k.suspect = False

    def disable(self, key_id: str) -> None:
        self._get(key_id).disabled = True

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Plain data per key for the admin API and metrics; never the secret."""
        out: list[dict[str, object]] = []
        for k in self._keys:
            k.forget_stale(now)
            until = k.available_at()
            if k.disabled:
                state = "disabled"
            elif now < until:
                state = "cooling"
            else:
                state = "ok"
            out.append(
                {
                    "id": k.id,
                    "state": state,
                    "cooling_until": until if now < until else None,
                    "cooling_for_s": until - now if now < until else 0.0,
                    "remaining_requests": k.requests,
                    "remaining_tokens": k.tokens,
                    "in_flight": k.in_flight,
                    "count_429": k.count_429,
                    "count_401": k.count_401,
                    "count_403": k.count_403,
                }
            )
        return out

