"""The one retry policy every upstream call goes through.

Pure decision logic: the router reports how an attempt failed and gets back
either "wait this long, then try the same target again" or "stop" — and when
stopping, whether the next target in the route is still worth trying now. The
router does the sleeping (inside the request's cancel scope), so this module
has no clock and no randomness of its own: ``now`` and ``random`` come in.

Two rules outrank everything else:

* never retry once the first byte reached the client — the response is
  committed, and a second upstream answer can't be spliced into it;
* never retry a request the upstream rejected as a request (400, 401, 403,
  404, 413 …): the same bytes get the same answer.
"""

from __future__ import annotations

import email.utils
import math
from datetime import timezone
from collections.abc import Callable, Mapping
from typing import Literal

import msgspec

__all__ = [
    "Decision",
    "GiveUp",
    "Outcome",
    "Retry",
    "RetryConfig",
    "RetryPolicy",
    "parse_retry_after",
    "parse_retry_after_ms",
    "retry_after_from_headers",
]


class RetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Anthropic's Python SDK: DEFAULT_MAX_RETRIES = 2, i.e. 3 attempts in all.
    max_attempts: int = 3
    # The SDK starts at 0.5 s; we start lower because the client's own SDK
    # retries behind us, and waits stack up across the two layers.
    base_s: float = 0.2
    # Anthropic SDK's MAX_RETRY_DELAY = 8.0.
    cap_s: float = 8.0
    # The SDK retries 408, 409, 429 and every 5xx. We keep the statuses that
    # mean "the upstream is busy or broken right now"; 408/409 don't occur on
    # the Messages API, and 501/505 won't change on a retry.
    retry_statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504, 529})
    # The SDK obeys any retry-after; a proxy holding a request longer than
    # this is better off failing over to the next target.
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_s < 0 or self.cap_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("delays must be >= 0")


OutcomeKind = Literal["connect", "timeout", "status", "reset"]


class Outcome(msgspec.Struct, frozen=True):
    """How one attempt failed.

    ``kind``: "connect" (no connection made), "timeout" (read timeout),
    "reset" (connection dropped mid-response), "status" (an error status,
    given in ``status``). ``retry_after_s`` is the upstream's parsed
    retry-after (see ``retry_after_from_headers``); ``should_retry`` is
    Anthropic's ``x-should-retry`` header when present — it can veto a
    retry, never force one on a 4xx.
    """

    kind: OutcomeKind
    status: int | None = None
    retry_after_s: float | None = None
    should_retry: bool | None = None


class Retry(msgspec.Struct, frozen=True):
    """Sleep ``delay_s``, then try the same target again."""

    delay_s: float


GiveUpReason = Literal[
    "first_byte_sent",  # the client already has part of a response
    "not_retryable",  # the upstream rejected the request itself (4xx), or vetoed with x-should-retry
    "deadline_passed",  # no time left for anything
    "attempts_exhausted",
    "retry_after_too_long",  # the upstream asked for a wait beyond max_retry_after_s
    "deadline",  # the wait would cross the request's deadline
]


class GiveUp(msgspec.Struct, frozen=True):
    """Stop trying this target.

    ``failover`` tells the router whether to try the next target right away
    (the target is busy or broken) or to answer the client now (the request
    itself is at fault, time is up, or the response is already committed).
    """

    reason: GiveUpReason
    failover: bool


Decision = Retry | GiveUp


class RetryPolicy:
    def __init__(self, config: RetryConfig | None = None, *, random: Callable[[], float]) -> None:
        """``random`` returns a float in [0, 1): ``random.random`` in production, a stub in tests."""
        self._config = config if config is not None else RetryConfig()
        self._random = random

    @property
    def config(self) -> RetryConfig:
        return self._config

    def backoff_ceiling(self, attempt: int) -> float:
        """Upper bound of the jittered delay after attempt number ``attempt`` (0-based)."""
        c = self._config
        # min() before pow would still overflow for huge attempts; clamp the exponent.
        return min(c.cap_s, c.base_s * 2.0 ** min(attempt, 64))

    def decide(
        self,
        *,
        attempt: int,
        outcome: Outcome,
        now: float,
        deadline: float | None,
        first_byte_sent: bool = False,  # the router asks only before any byte reached the client
    ) -> Decision:
        """What to do after attempt number ``attempt`` (0 for the first try) failed with ``outcome``."""
        c = self._config
        if first_byte_sent:
            return GiveUp("first_byte_sent", failover=False)

        if outcome.kind == "status":
            status = outcome.status
            if status is None:
                raise ValueError("an Outcome of kind 'status' needs a status code")
            # A 5xx blames the target, so another target may do better; a 4xx
            # blames the request, and every target would answer the same.
            blames_target = status >= 500 or status == 429
            if status not in c.retry_statuses or outcome.should_retry is False:
                return GiveUp("not_retryable", failover=blames_target)
        elif outcome.should_retry is False:
            return GiveUp("not_retryable", failover=True)

        if deadline is not None and now >= deadline:
            return GiveUp("deadline_passed", failover=False)
        if attempt + 1 >= c.max_attempts:
            return GiveUp("attempts_exhausted", failover=True)

        retry_after = outcome.retry_after_s
        if retry_after is not None and retry_after > c.max_retry_after_s:
            return GiveUp("retry_after_too_long", failover=True)

        # AWS "Exponential Backoff and Jitter": full jitter spreads retries of
        # many clients that failed together, instead of synchronising them.
        delay = self._random() * self.backoff_ceiling(attempt)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if deadline is not None and now + delay >= deadline:
            return GiveUp("deadline", failover=True)
        return Retry(delay)


def parse_retry_after(value: str | None, now_wallclock: float | None) -> float | None:
    """Seconds to wait from a ``retry-after`` header: delta-seconds or an HTTP-date.

    ``now_wallclock`` is ``time.time()``: an HTTP-date names a wall-clock
    instant, unlike the trio clock used everywhere else; without it only the
    delta-seconds form can be read. A date in the past
    means "now" (0.0). Garbage yields None, and the caller falls back to its
    own backoff.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        # RFC 9110 says integer, but some servers send "1.5"; honour it as the SDK does.
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    if now_wallclock is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 HTTP-dates are GMT; parsedate_to_datetime leaves "-0000" naive.
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_wallclock)


def parse_retry_after_ms(value: str | None) -> float | None:
    """Seconds from the non-standard ``retry-after-ms`` header (Anthropic and OpenAI send it)."""
    if value is None:
        return None
    try:
        ms = float(value.strip())
    except ValueError:
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms >= 0 else None


def retry_after_from_headers(headers: Mapping[str, str], now_wallclock: float | None) -> float | None:
    """The upstream's requested wait, preferring the precise ``retry-after-ms``.

    ``headers`` may be any mapping; names are matched case-insensitively.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    ms = parse_retry_after_ms(lower.get("retry-after-ms"))
    if ms is not None:
        return ms
    return parse_retry_after(lower.get("retry-after"), now_wallclock)
