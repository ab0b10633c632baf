"""Circuit breaker for one upstream target.

Why a breaker at all: when a target is down, every request routed to it pays a
connect timeout (or a slow 5xx) before it fails over. The breaker remembers
recent failures so the router skips the target at once, then lets a few probe
requests through after a cool-off to find out whether it came back.

The object is sans-IO in the h11 sense: no sockets, no clock, no tasks. The
caller passes ``now`` (``trio.current_time()``) to every method, so the whole
policy is tested by feeding numbers in. State lives in one explicit state
machine (``_TRANSITIONS``) rather than in flags spread over the methods.

What counts as a failure is the caller's decision, and the contract is:

* failure — the target itself misbehaved: connect error, reset or read timeout,
  HTTP 5xx, 529 ``overloaded_error``;
* success — the target answered sensibly, *including* 4xx: a 400 or a 404 is
  the client's fault, and a 429 is a key's quota (the key pool's business),
  not evidence that the target is down;
* neither — the request was cancelled (client went away, deadline hit before
  the target could be blamed), or Weir itself refused to send it (its own
  HTTP client rejected the request line or a header): call
  ``release(permit)``, so a half-open probe slot is freed without counting
  an outcome. A client must never be able to open a breaker shared by all.

Every permit handed out must end in exactly one ``record`` or ``release``
(put it in a ``finally``); a lost half-open permit would keep its probe slot
until the next state change.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import msgspec

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker", "Permit"]


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tuning for one target's breaker; the defaults suit LLM APIs whose calls last seconds."""

    # Envoy outlier detection: ``consecutive_5xx`` defaults to 5.
    failure_threshold: int = 5
    # resilience4j ``failureRateThreshold`` and Hystrix ``errorThresholdPercentage`` both default to 50%.
    failure_ratio: float = 0.5
    # Hystrix ``circuitBreaker.requestVolumeThreshold`` defaults to 20: below that a ratio is noise.
    min_requests: int = 20
    # Hystrix and Envoy use 10 s; LLM calls last tens of seconds, so 20 outcomes take longer to gather.
    window_s: float = 30.0
    # Hystrix ``metrics.rollingStats.numBuckets`` defaults to 10: old outcomes expire a bucket at a time.
    window_buckets: int = 10
    # Between Hystrix's 5 s sleep window and Envoy's 30 s base ejection time.
    open_s: float = 15.0
    # Hystrix lets 1 probe through, resilience4j 10; 2 survives one unlucky probe without a stampede.
    half_open_probes: int = 2
    # Hystrix closes on a single success; 2 in a row guards against one lucky probe.
    success_threshold: int = 2

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if not 0.0 < self.failure_ratio <= 1.0:
            raise ValueError("failure_ratio must be in (0, 1]")
        if self.min_requests < 1:
            raise ValueError("min_requests must be >= 1")
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError("window_s must be a positive finite number")
        if self.window_buckets < 1:
            raise ValueError("window_buckets must be >= 1")
        if not self.open_s >= 0:
            raise ValueError("open_s must be >= 0")
        if self.half_open_probes < 1:
            raise ValueError("half_open_probes must be >= 1")
        if self.success_threshold < 1:
            raise ValueError("success_threshold must be >= 1")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class _Event(enum.Enum):
    TRIPPED = "tripped"  # too many failures while closed
    COOLED_OFF = "cooled_off"  # open_s elapsed
    PROBE_FAILED = "probe_failed"
    PROBES_PASSED = "probes_passed"  # success_threshold consecutive probe successes
    RESET = "reset"  # admin


_S = BreakerState
# The whole life cycle. Anything not listed is a bug in this module, not a caller error.
_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (_S.CLOSED, _Event.TRIPPED): _S.OPEN,
    (_S.OPEN, _Event.COOLED_OFF): _S.HALF_OPEN,
    (_S.HALF_OPEN, _Event.PROBE_FAILED): _S.OPEN,
    (_S.HALF_OPEN, _Event.PROBES_PASSED): _S.CLOSED,
    (_S.CLOSED, _Event.RESET): _S.CLOSED,
    (_S.OPEN, _Event.RESET): _S.CLOSED,
    (_S.HALF_OPEN, _Event.RESET): _S.CLOSED,
}


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to send one request; hand it back to ``record`` or ``release``.

    ``serial`` identifies the permit so a duplicate or stale outcome is
    recognised and ignored; ``probe`` says it was issued while half-open.
    """

    serial: int
    probe: bool


class _Window:
    """Rolling success/failure counts in fixed time buckets (Hystrix's layout).

    Buckets bound memory regardless of request rate; the price is that the
    window's edge moves a bucket at a time (window_s / window_buckets).
    """

    __slots__ = ("_bucket_s", "_n", "_index", "_ok", "_fail")

    def __init__(self, window_s: float, buckets: int) -> None:
        self._bucket_s = window_s / buckets
        self._n = buckets
        self._index = [-1] * buckets  # absolute bucket number held by each slot
        self._ok = [0] * buckets
        self._fail = [0] * buckets

    def add(self, success: bool, now: float) -> None:
        b = math.floor(now / self._bucket_s)
        slot = b % self._n
        if self._index[slot] != b:
            self._index[slot] = b
            self._ok[slot] = 0
            self._fail[slot] = 0
        if success:
            self._ok[slot] += 1
        else:
            self._fail[slot] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, failures) over the buckets still inside the window."""
        b = math.floor(now / self._bucket_s)
        total = failures = 0
        for slot in range(self._n):
            if b - self._n < self._index[slot] <= b:
                total += self._ok[slot] + self._fail[slot]
                failures += self._fail[slot]
        return total, failures

    def clear(self) -> None:
        self._index = [-1] * self._n
        self._ok = [0] * self._n
        self._fail = [0] * self._n


class CircuitBreaker:
    """One target's breaker: CLOSED → OPEN → HALF_OPEN → CLOSED (or back to OPEN).

    ``now`` must not go backwards between calls; the router passes
    ``trio.current_time()``.
    """

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self._config = config if config is not None else BreakerConfig()
        self._state = BreakerState.CLOSED
        self._window = _Window(self._config.window_s, self._config.window_buckets)
        self._consecutive_failures = 0
        self._probe_successes = 0
        self._opened_at: float | None = None
        self._next_serial = 0
        # Permits of the current state's lifetime that still await an outcome.
        # Cleared on every transition: that is what makes older permits stale.
        self._outstanding: dict[int, bool] = {}
        self._probes_out = 0

    @property
    def config(self) -> BreakerConfig:
        return self._config

    # -- state machine -------------------------------------------------------

    def _transition(self, event: _Event, now: float) -> None:
        new = _TRANSITIONS[(self._state, event)]
        self._state = new
        self._outstanding.clear()
        self._probes_out = 0
        self._probe_successes = 0
        if new is BreakerState.OPEN:
            self._opened_at = now
        elif new is BreakerState.CLOSED:
            # A fresh start: failures from before the outage must not re-trip it.
            self._opened_at = None
            self._consecutive_failures = 0
            self._window.clear()

    def _advance(self, now: float) -> None:
        """The only time-driven transition, taken lazily when someone looks."""
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and now >= self._opened_at + self._config.open_s
        ):
            self._transition(_Event.COOLED_OFF, now)

    # -- public API ----------------------------------------------------------

    def state(self, now: float) -> BreakerState:
        self._advance(now)
        return self._state

    def allow(self, now: float) -> Permit | None:
        """A permit to try this target, or None: skip it without connecting."""
        self._advance(now)
        if self._state is BreakerState.OPEN:
            return None
        probe = self._state is BreakerState.HALF_OPEN
        if probe:
            if self._probes_out >= self._config.half_open_probes:
                return None
            self._probes_out += 1
        permit = Permit(self._next_serial, probe)
        self._next_serial += 1
        self._outstanding[permit.serial] = probe
        return permit

    def record(self, permit: Permit, success: bool, now: float) -> None:
        """Count the outcome of a permitted request (see the module doc for what is a failure).

        Outcomes of permits issued before the last state change (or already
        recorded) are ignored: a slow request that started before the outage
        says nothing about the target's health now.
        """
        self._advance(now)
        if self._outstanding.pop(permit.serial, None) is None:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._probes_out -= 1
            if not success:
                self._transition(_Event.PROBE_FAILED, now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self._config.success_threshold:
                self._transition(_Event.PROBES_PASSED, now)
            return
        # CLOSED (an OPEN breaker has no outstanding permits).
        self._window.add(success, now)
        if success:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        total, failures = self._window.counts(now)
        if self._consecutive_failures >= self._config.failure_threshold or (
            total >= self._config.min_requests and failures >= self._config.failure_ratio * total
        ):
            self._transition(_Event.TRIPPED, now)

    def release(self, permit: Permit, now: float) -> None:
        """Hand back a permit whose request ended with no verdict on the target (cancelled)."""
        self._advance(now)
        probe = self._outstanding.pop(permit.serial, None)
        if probe:
            self._probes_out -= 1

    def reset(self, now: float) -> None:
        """Admin's manual close: forget failures, drop outstanding permits."""
        self._advance(now)
        self._transition(_Event.RESET, now)

    def snapshot(self, now: float) -> dict[str, object]:
        """Plain data for the admin API and metrics."""
        self._advance(now)
        total, failures = self._window.counts(now)
        if self._state is BreakerState.OPEN and self._opened_at is not None:
            next_probe_at: float | None = self._opened_at + self._config.open_s
        elif self._state is BreakerState.HALF_OPEN:
            next_probe_at = now if self._probes_out < self._config.half_open_probes else None
        else:
            next_probe_at = None
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive_failures,
            "window_requests": total,
            "window_failures": failures,
            "opened_at": self._opened_at,
            "next_probe_at": next_probe_at,
            "probes_in_flight": self._probes_out,
            "probe_successes": self._probe_successes,
        }

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._state.value} failures={self._consecutive_failures}>"
