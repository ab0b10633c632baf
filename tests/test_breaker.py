"""The circuit breaker, driven by explicit ``now`` values: no clock, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.breaker import BreakerConfig, BreakerState, CircuitBreaker, Permit

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def fail(b: CircuitBreaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        p = b.allow(now)
        assert p is not None
        b.record(p, False, now)


def succeed(b: CircuitBreaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        p = b.allow(now)
        assert p is not None
        b.record(p, True, now)


def open_breaker(b: CircuitBreaker, now: float) -> None:
    fail(b, now, b.config.failure_threshold)
    assert b.state(now) is OPEN


def test_defaults_match_the_brief() -> None:
    c = BreakerConfig()
    assert (c.failure_threshold, c.failure_ratio, c.min_requests, c.window_s) == (5, 0.5, 20, 30.0)
    assert (c.open_s, c.half_open_probes, c.success_threshold) == (15.0, 2, 2)


@pytest.mark.parametrize("bad", [{"failure_threshold": 0}, {"failure_ratio": 0.0}, {"half_open_probes": 0}])
def test_nonsense_config_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**bad)


def test_opens_after_n_consecutive_failures_and_not_before() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=3))
    fail(b, 0.0, 2)
    assert b.state(0.0) is CLOSED
    fail(b, 0.0)
    assert b.state(0.0) is OPEN
    assert b.snapshot(0.0)["opened_at"] == 0.0


def test_a_success_breaks_the_consecutive_run() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=3))
    for _ in range(5):
        fail(b, 1.0, 2)
        succeed(b, 1.0)
    assert b.state(1.0) is CLOSED
    assert b.snapshot(1.0)["consecutive_failures"] == 0


def test_opens_on_failure_ratio_over_the_window() -> None:
    # Threshold out of reach, so only the ratio can trip it.
    b = CircuitBreaker(BreakerConfig(failure_threshold=1000, failure_ratio=0.5, min_requests=20))
    # Alternate: never two failures in a row, ratio 50%.
    for i in range(9):
        succeed(b, float(i))
        fail(b, float(i))
    succeed(b, 9.0)
    assert b.snapshot(9.0)["window_requests"] == 19
    assert b.state(9.0) is CLOSED
    fail(b, 9.0)  # 20 requests, 10 failures: 50%
    assert b.state(9.0) is OPEN


def test_ratio_is_ignored_below_min_requests() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=1000, min_requests=20))
    fail(b, 0.0, 19)  # 100% failures, but only 19 requests
    assert b.state(0.0) is CLOSED


def test_ratio_below_threshold_keeps_it_closed() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=1000, failure_ratio=0.5, min_requests=20))
    for _ in range(30):
        succeed(b, 0.0, 2)
        fail(b, 0.0)  # 33% failures
    assert b.state(0.0) is CLOSED
    assert b.snapshot(0.0)["window_requests"] == 90


def test_old_outcomes_leave_the_window() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=1000, min_requests=20, window_s=30.0))
    fail(b, 0.0, 19)
    # 31 s later the 19 failures have expired: one more failure is 1 of 1, below min_requests.
    fail(b, 31.0)
    assert b.snapshot(31.0)["window_requests"] == 1
    assert b.state(31.0) is CLOSED


def test_open_skips_until_cool_off_then_half_opens() -> None:
    b = CircuitBreaker(BreakerConfig(open_s=15.0))
    open_breaker(b, 100.0)
    assert b.allow(100.0) is None
    assert b.allow(114.999) is None
    assert b.snapshot(110.0)["next_probe_at"] == 115.0
    assert b.state(115.0) is HALF_OPEN
    assert b.allow(115.0) is not None


def test_half_open_hands_out_at_most_the_probe_limit() -> None:
    b = CircuitBreaker(BreakerConfig(open_s=1.0, half_open_probes=2))
    open_breaker(b, 0.0)
    p1, p2 = b.allow(1.0), b.allow(1.0)
    assert p1 is not None and p2 is not None and p1.probe and p2.probe
    assert b.allow(1.0) is None
    assert b.snapshot(1.0)["next_probe_at"] is None
    b.release(p1, 1.5)  # a cancelled probe frees its slot without a verdict
    p3 = b.allow(1.5)
    assert p3 is not None
    assert b.allow(1.5) is None
    assert b.state(1.5) is HALF_OPEN


def test_closes_only_after_consecutive_probe_successes() -> None:
    b = CircuitBreaker(BreakerConfig(open_s=1.0, half_open_probes=1, success_threshold=3))
    open_breaker(b, 0.0)
    for i in range(2):
        succeed(b, 2.0 + i)
        assert b.state(2.0 + i) is HALF_OPEN
    succeed(b, 5.0)
    assert b.state(5.0) is CLOSED
    snap = b.snapshot(5.0)
    # A closed breaker starts over: the failures that opened it are forgotten.
    assert snap["consecutive_failures"] == 0 and snap["window_requests"] == 0 and snap["opened_at"] is None


def test_probe_failure_reopens_and_restarts_cool_off() -> None:
    b = CircuitBreaker(BreakerConfig(open_s=10.0, half_open_probes=2, success_threshold=2))
    open_breaker(b, 0.0)
    good, bad = b.allow(10.0), b.allow(10.0)
    assert good is not None and bad is not None
    b.record(good, True, 11.0)
    b.record(bad, False, 12.0)
    assert b.state(12.0) is OPEN
    assert b.allow(21.9) is None
    assert b.state(22.0) is HALF_OPEN
    # The earlier success doesn't carry over: two fresh ones are needed.
    succeed(b, 22.0)
    assert b.state(22.0) is HALF_OPEN
    succeed(b, 22.0)
    assert b.state(22.0) is CLOSED


def test_manual_reset_closes_and_stale_permits_are_ignored() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=2))
    old = [b.allow(0.0) for _ in range(3)]
    assert all(p is not None for p in old)
    fail(b, 0.0, 2)
    assert b.state(0.0) is OPEN
    b.reset(1.0)
    assert b.state(1.0) is CLOSED and b.allow(1.0) is not None
    # Failures of permits issued before the reset say nothing about now.
    for p in old:
        b.record(p, False, 2.0)
    assert b.state(2.0) is CLOSED
    assert b.snapshot(2.0)["consecutive_failures"] == 0


def test_outcomes_from_before_the_trip_do_not_count_as_probes() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, open_s=1.0, success_threshold=1))
    slow = b.allow(0.0)
    assert slow is not None
    fail(b, 0.0)
    assert b.state(1.0) is HALF_OPEN
    b.record(slow, True, 1.0)  # a pre-outage success must not close it
    assert b.state(1.0) is HALF_OPEN
    b.record(slow, False, 1.0)
    assert b.state(1.0) is HALF_OPEN


def test_a_permit_counts_once() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=2))
    p = b.allow(0.0)
    assert p is not None
    b.record(p, False, 0.0)
    b.record(p, False, 0.0)
    assert b.state(0.0) is CLOSED
    assert b.snapshot(0.0)["consecutive_failures"] == 1
    # A permit forged with an unissued serial is ignored too.
    b.record(Permit(serial=999, probe=False), False, 0.0)
    assert b.snapshot(0.0)["consecutive_failures"] == 1


class BreakerMachine(RuleBasedStateMachine):
    """Random schedules of allow/record/release/reset/time, checked against a tiny model."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = BreakerConfig(
            failure_threshold=3, min_requests=4, window_s=10.0, open_s=5.0, half_open_probes=2, success_threshold=2
        )
        self.b = CircuitBreaker(self.cfg)
        self.now = 0.0
        self.state = CLOSED
        # permit -> still countable? (False once recorded, released or made stale)
        self.live: dict[int, tuple[Permit, bool]] = {}
        self.opened_at: float | None = None
        self.probe_successes = 0
        self.denials_while_closed = 0

    def _observe(self, *, after_success_record: bool = False) -> None:
        new = self.b.state(self.now)
        if new is not self.state:
            if new is CLOSED:
                assert after_success_record or self._resetting
                if after_success_record:
                    assert self.probe_successes >= self.cfg.success_threshold
            if new is OPEN:
                self.opened_at = self.now
            if self.state is OPEN and not self._resetting:
                assert new is HALF_OPEN and self.opened_at is not None
                assert self.now >= self.opened_at + self.cfg.open_s
            self.probe_successes = 0
            for serial, (p, _) in self.live.items():
                self.live[serial] = (p, False)
            self.state = new

    _resetting = False

    @rule(dt=st.floats(min_value=0.0, max_value=8.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._observe()

    @rule()
    def allow(self) -> None:
        self._observe()
        before = self.state
        p = self.b.allow(self.now)
        if before is OPEN:
            assert self.opened_at is not None and self.now < self.opened_at + self.cfg.open_s
            assert p is None
        if before is CLOSED:
            assert p is not None and not p.probe
        if p is not None:
            assert p.probe == (before is HALF_OPEN)
            self.live[p.serial] = (p, True)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), success=st.booleans())
    def record(self, data: st.DataObject, success: bool) -> None:
        serial = data.draw(st.sampled_from(sorted(self.live)))
        p, countable = self.live.pop(serial)
        before = self.b.snapshot(self.now)
        self.b.record(p, success, self.now)
        if not countable:
            assert self.b.snapshot(self.now) == before, "a stale permit changed the breaker"
            return
        if p.probe and success:
            self.probe_successes += 1
        self._observe(after_success_record=p.probe and success)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        serial = data.draw(st.sampled_from(sorted(self.live)))
        p, _ = self.live.pop(serial)
        self.b.release(p, self.now)
        self._observe()

    @rule()
    def reset(self) -> None:
        self._resetting = True
        self.b.reset(self.now)
        self._observe()
        self._resetting = False
        assert self.state is CLOSED
        # Closed → closed is no visible change, but earlier permits are stale all the same.
        for serial, (p, _) in self.live.items():
            self.live[serial] = (p, False)
        self.probe_successes = 0

    @invariant()
    def probes_never_exceed_the_limit(self) -> None:
        live_probes = sum(1 for p, countable in self.live.values() if countable and p.probe)
        assert live_probes <= self.cfg.half_open_probes
        assert self.b.snapshot(self.now)["probes_in_flight"] == live_probes

    @invariant()
    def open_never_allows_before_cool_off(self) -> None:
        if self.b.state(self.now) is OPEN:
            assert self.opened_at is not None and self.now < self.opened_at + self.cfg.open_s


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_state_machine = BreakerMachine.TestCase
