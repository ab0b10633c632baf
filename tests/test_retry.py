"""The retry policy: every rule, with randomness and time passed in."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.retry import (
    GiveUp,
    Outcome,
    Retry,
    RetryConfig,
    RetryPolicy,
    parse_retry_after,
    parse_retry_after_ms,
    retry_after_from_headers,
)


def policy(r: float = 0.5, **cfg: object) -> RetryPolicy:
    return RetryPolicy(RetryConfig(**cfg), random=lambda: r)


def decide(p: RetryPolicy, outcome: Outcome, *, attempt: int = 0, now: float = 0.0, deadline: float | None = None,
           first_byte_sent: bool = False):
    return p.decide(attempt=attempt, outcome=outcome, now=now, deadline=deadline, first_byte_sent=first_byte_sent)


RETRYABLE = [
    Outcome("connect"),
    Outcome("timeout"),
    Outcome("reset"),
    *(Outcome("status", s) for s in (429, 500, 502, 503, 504, 529)),
]


@pytest.mark.parametrize("outcome", RETRYABLE, ids=repr)
def test_retryable_outcomes_are_retried(outcome: Outcome) -> None:
    d = decide(policy(), outcome)
    assert isinstance(d, Retry)
    assert d.delay_s == pytest.approx(0.5 * 0.2)


@pytest.mark.parametrize("outcome", RETRYABLE, ids=repr)
def test_never_after_the_first_byte_reached_the_client(outcome: Outcome) -> None:
    assert decide(policy(), outcome, first_byte_sent=True) == GiveUp("first_byte_sent", failover=False)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 413, 422])
def test_never_on_a_request_the_upstream_rejected(status: int) -> None:
    # Even with a retry-after and x-should-retry: the same bytes get the same 4xx.
    d = decide(policy(), Outcome("status", status, retry_after_s=1.0, should_retry=True))
    assert d == GiveUp("not_retryable", failover=False)


@pytest.mark.parametrize("status", [501, 505])
def test_unlisted_5xx_is_not_retried_but_fails_over(status: int) -> None:
    assert decide(policy(), Outcome("status", status)) == GiveUp("not_retryable", failover=True)


def test_x_should_retry_false_vetoes_a_retry_but_not_the_failover() -> None:
    assert decide(policy(), Outcome("status", 503, should_retry=False)) == GiveUp("not_retryable", failover=True)
    assert decide(policy(), Outcome("connect", should_retry=False)) == GiveUp("not_retryable", failover=True)


def test_status_outcome_needs_a_status() -> None:
    with pytest.raises(ValueError):
        decide(policy(), Outcome("status"))


def test_attempts_are_bounded_then_fail_over() -> None:
    p = policy(max_attempts=3)
    assert isinstance(decide(p, Outcome("connect"), attempt=0), Retry)
    assert isinstance(decide(p, Outcome("connect"), attempt=1), Retry)
    assert decide(p, Outcome("connect"), attempt=2) == GiveUp("attempts_exhausted", failover=True)
    assert decide(policy(max_attempts=1), Outcome("connect")) == GiveUp("attempts_exhausted", failover=True)


def test_full_jitter_range_and_exponential_ceiling() -> None:
    # random() = 0 → no wait; random() → 1 → the ceiling, which doubles per attempt up to the cap.
    assert decide(policy(0.0, max_attempts=10), Outcome("connect"), attempt=3).delay_s == 0.0
    ceilings = [decide(policy(0.999999, max_attempts=20), Outcome("connect"), attempt=a).delay_s for a in range(8)]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 8.0, 8.0], rel=1e-5)


@given(r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True), attempt=st.integers(0, 2000))
def test_jitter_stays_within_zero_and_the_ceiling(r: float, attempt: int) -> None:
    p = policy(r, max_attempts=10_000)
    d = decide(p, Outcome("timeout"), attempt=attempt)
    assert isinstance(d, Retry)
    assert 0.0 <= d.delay_s <= min(8.0, 0.2 * 2**min(attempt, 64))


def test_the_injected_random_is_what_spreads_the_delay() -> None:
    draws = iter([0.1, 0.9])
    p = RetryPolicy(RetryConfig(), random=lambda: next(draws))
    a = decide(p, Outcome("connect"), attempt=1)
    b = decide(p, Outcome("connect"), attempt=1)
    assert (a.delay_s, b.delay_s) == pytest.approx((0.04, 0.36))


def test_retry_after_is_a_floor_under_the_jitter() -> None:
    assert decide(policy(0.5), Outcome("status", 429, retry_after_s=2.5)).delay_s == 2.5
    # A retry-after shorter than the jittered backoff doesn't shorten it.
    d = decide(policy(0.999, max_attempts=10), Outcome("status", 529, retry_after_s=0.01), attempt=5)
    assert d.delay_s == pytest.approx(0.999 * 6.4)


def test_retry_after_beyond_the_limit_fails_over_now() -> None:
    assert isinstance(decide(policy(), Outcome("status", 429, retry_after_s=30.0)), Retry)
    d = decide(policy(), Outcome("status", 429, retry_after_s=30.5))
    assert d == GiveUp("retry_after_too_long", failover=True)


def test_retry_after_that_would_overrun_the_deadline_fails_over() -> None:
    d = decide(policy(), Outcome("status", 503, retry_after_s=5.0), now=100.0, deadline=104.0)
    assert d == GiveUp("deadline", failover=True)


def test_backoff_never_crosses_the_deadline() -> None:
    # Ceiling at attempt 4 is 3.2 s; 0.9 of that is 2.88 s, with 2 s left.
    p = policy(0.9, max_attempts=10)
    assert decide(p, Outcome("connect"), attempt=4, now=10.0, deadline=12.0) == GiveUp("deadline", failover=True)
    d = decide(p, Outcome("connect"), attempt=4, now=10.0, deadline=13.0)
    assert isinstance(d, Retry) and 10.0 + d.delay_s < 13.0


@given(
    r=st.floats(0.0, 1.0, exclude_max=True),
    attempt=st.integers(0, 30),
    now=st.floats(0.0, 1e6),
    left=st.floats(0.0, 60.0),
    retry_after=st.none() | st.floats(0.0, 100.0),
)
def test_no_retry_ever_sleeps_past_the_deadline(r, attempt, now, left, retry_after) -> None:
    p = policy(r, max_attempts=100)
    d = decide(p, Outcome("status", 429, retry_after_s=retry_after), attempt=attempt, now=now, deadline=now + left)
    if isinstance(d, Retry):
        assert now + d.delay_s < now + left
        if retry_after is not None:
            assert d.delay_s >= retry_after


def test_no_time_left_gives_up_entirely() -> None:
    assert decide(policy(), Outcome("connect"), now=5.0, deadline=5.0) == GiveUp("deadline_passed", failover=False)


def test_no_deadline_means_only_attempts_bound_it() -> None:
    assert isinstance(decide(policy(), Outcome("status", 429, retry_after_s=29.0), deadline=None), Retry)


# -- retry-after parsing -------------------------------------------------------

NOW = 1_700_000_000.0  # a fixed wall clock


def test_retry_after_delta_seconds() -> None:
    assert parse_retry_after("7", NOW) == 7.0
    assert parse_retry_after(" 0 ", NOW) == 0.0
    assert parse_retry_after("1.5", NOW) == 1.5  # non-standard, as the SDK accepts
    assert parse_retry_after("12", None) == 12.0


def test_retry_after_http_date() -> None:
    date = email.utils.formatdate(NOW + 42, usegmt=True)  # "Tue, 14 Nov 2023 22:14:02 GMT"
    assert parse_retry_after(date, NOW) == pytest.approx(42.0)
    assert parse_retry_after(email.utils.formatdate(NOW - 10, usegmt=True), NOW) == 0.0
    # A date without a clock to compare it with can't be read.
    assert parse_retry_after(date, None) is None


@pytest.mark.parametrize("garbage", ["", "soon", "-3", "nan", "inf", "Mon, 99 Foo 2023", None])
def test_retry_after_garbage_is_none(garbage: str | None) -> None:
    assert parse_retry_after(garbage, NOW) is None


def test_retry_after_ms() -> None:
    assert parse_retry_after_ms("1500") == 1.5
    assert parse_retry_after_ms("20.5") == pytest.approx(0.0205)
    assert parse_retry_after_ms("x") is None and parse_retry_after_ms("-1") is None and parse_retry_after_ms(None) is None


def test_headers_prefer_retry_after_ms_and_ignore_case() -> None:
    assert retry_after_from_headers({"Retry-After-Ms": "250", "retry-after": "3"}, NOW) == 0.25
    assert retry_after_from_headers({"Retry-After": "3"}, NOW) == 3.0
    assert retry_after_from_headers({"retry-after-ms": "bad", "retry-after": "3"}, NOW) == 3.0
    assert retry_after_from_headers({}, NOW) is None
