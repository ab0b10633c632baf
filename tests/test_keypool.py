"""The key pool: which key goes next, learned from rate-limit headers, with ``now`` passed in."""

from __future__ import annotations

import email.utils
from collections import Counter
from datetime import datetime, timezone

import pytest

from proxy.keypool import KeyPool, KeyPoolConfig, Lease, parse_duration

SECRETS = ["sk-ant-api03-AAAAsecretalpha0001", "sk-ant-api03-BBBBsecretbravo0002", "sk-ant-api03-CCCCsecretcharlie03"]


def pool(n: int = 3, **cfg: object) -> KeyPool:
    return KeyPool(SECRETS[:n], name="anthropic", config=KeyPoolConfig(**cfg))


def ids(p: KeyPool) -> list[str]:
    return p.key_ids


def anthropic_headers(requests: int, tokens: int | None = None) -> dict[str, str]:
    h = {"anthropic-ratelimit-requests-remaining": str(requests)}
    if tokens is not None:
        h["anthropic-ratelimit-tokens-remaining"] = str(tokens)
    return h


def teach(p: KeyPool, key_index: int, headers: dict[str, str], now: float = 0.0, status: int = 200) -> None:
    """Send one request through a given key (by leasing until we get it) and report its response."""
    held: list[Lease] = []
    for _ in range(10_000):
        lease = p.pick(now)
        assert lease is not None
        if lease.key_id == ids(p)[key_index]:
            break
        held.append(lease)
    else:
        pytest.fail(f"the pool never offered key #{key_index}")
    for other in held:
        p.release(other)
    p.observe(lease, status, headers, now)


def test_parse_duration() -> None:
    assert parse_duration("1s") == 1.0
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    for bad in ("", "5", "1x", "s", "1s 2m", "-1s"):
        assert parse_duration(bad) is None


def test_unknown_keys_take_turns() -> None:
    p = pool()
    picks = []
    for _ in range(6):
        lease = p.pick(0.0)
        assert lease is not None
        picks.append(lease.key_id)
        p.observe(lease, 200, {}, 0.0)
    assert picks == ids(p) * 2


def test_picks_the_key_with_most_remaining_capacity() -> None:
    p = pool()
    teach(p, 0, anthropic_headers(400))
    teach(p, 1, anthropic_headers(900))
    teach(p, 2, anthropic_headers(500))
    for _ in range(5):
        lease = p.pick(1.0)
        assert lease is not None and lease.key_id == ids(p)[1]
        p.observe(lease, 200, anthropic_headers(900), 1.0)


def test_unknown_ranks_below_known_high_but_above_known_low() -> None:
    p = pool(unknown_remaining=100)
    teach(p, 0, anthropic_headers(5))
    teach(p, 1, anthropic_headers(5000))
    lease = p.pick(1.0)
    assert lease is not None and lease.key_id == ids(p)[1]
    p.release(lease)
    teach(p, 1, anthropic_headers(50))
    lease = p.pick(1.0)
    assert lease is not None and lease.key_id == ids(p)[2]  # the unknown one


def test_openai_headers_are_read_too() -> None:
    p = KeyPool(SECRETS[:2], name="openai")
    teach(p, 0, {"x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "6m0s"})
    teach(p, 1, {"x-ratelimit-remaining-requests": "300", "x-ratelimit-remaining-tokens": "90000"})
    snap = {s["id"]: s for s in p.snapshot(0.0)}
    assert snap[ids(p)[0]]["remaining_requests"] == 10
    assert snap[ids(p)[1]]["remaining_tokens"] == 90000
    lease = p.pick(0.0)
    assert lease is not None and lease.key_id == ids(p)[1]


def test_capacity_is_forgotten_at_its_reset() -> None:
    p = KeyPool(SECRETS[:1], name="openai")
    teach(p, 0, {"x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "20ms"})
    assert p.snapshot(0.0)[0]["remaining_requests"] == 7
    assert p.snapshot(0.02)[0]["remaining_requests"] is None


def test_equal_known_capacity_is_round_robin() -> None:
    p = pool()
    for i in range(3):
        teach(p, i, anthropic_headers(1000))
    seen = []
    for _ in range(9):
        lease = p.pick(1.0)
        assert lease is not None
        seen.append(lease.key_id)
        p.observe(lease, 200, anthropic_headers(1000), 1.0)
    assert Counter(seen) == {k: 3 for k in ids(p)}
    assert seen[:3] != [seen[0]] * 3


def test_concurrent_picks_spread_over_keys_by_in_flight() -> None:
    p = pool()
    teach(p, 0, anthropic_headers(1000))
    teach(p, 1, anthropic_headers(1001))
    teach(p, 2, anthropic_headers(1002))
    leases = [p.pick(1.0) for _ in range(30)]
    assert all(lease is not None for lease in leases)
    counts = Counter(lease.key_id for lease in leases)
    # Without in-flight accounting all 30 would go to the key reporting 1002;
    # with it, each key ends with the same 991 left after its leases.
    assert [counts[k] for k in ids(p)] == [9, 10, 11]
    assert [s["in_flight"] for s in p.snapshot(1.0)] == [9, 10, 11]
    for lease in leases:
        p.release(lease)
    assert [s["in_flight"] for s in p.snapshot(1.0)] == [0, 0, 0]


def test_a_lease_ends_once() -> None:
    p = pool(1)
    lease = p.pick(0.0)
    assert lease is not None
    p.observe(lease, 429, {"retry-after": "5"}, 0.0)
    p.observe(lease, 401, {}, 0.0)  # ignored: the lease already ended
    p.release(lease)
    snap = p.snapshot(0.0)[0]
    assert (snap["in_flight"], snap["count_429"], snap["count_401"], snap["state"]) == (0, 1, 0, "cooling")
    with pytest.raises(ValueError):
        pool(2).release(lease)


def test_429_storm_on_one_key_never_picks_it_while_others_have_capacity() -> None:
    p = pool()
    hot = ids(p)[0]
    hot_picks: list[float] = []
    others = 0
    for i in range(300):
        now = i * 0.1  # 30 s of traffic
        lease = p.pick(now)
        assert lease is not None
        if lease.key_id == hot:
            hot_picks.append(now)
            # Every use of the hot key is rejected with a 10 s retry-after.
            p.observe(lease, 429, {"retry-after": "10"}, now)
        else:
            others += 1
            p.observe(lease, 200, {}, now)
    # Tried at the start and again as each cool-down ended, never during one.
    assert len(hot_picks) == 3 and hot_picks[0] == 0.0
    assert all(b - a >= 10.0 - 1e-9 for a, b in zip(hot_picks, hot_picks[1:])), hot_picks
    assert all(b - a <= 10.2 for a, b in zip(hot_picks, hot_picks[1:])), hot_picks
    assert others == 297
    snap = {s["id"]: s for s in p.snapshot(30.0)}
    assert snap[hot]["count_429"] == 3 and snap[hot]["state"] == "cooling"


def test_a_key_that_reported_zero_left_goes_last_after_its_cool_down() -> None:
    p = pool()
    teach(p, 0, anthropic_headers(0), status=429)  # cooling 30 s by default, and spent
    for t in (1.0, 31.0, 59.0):
        for _ in range(4):
            lease = p.pick(t)
            assert lease is not None and lease.key_id != ids(p)[0]
            p.observe(lease, 200, anthropic_headers(3), t)
    # Once the others are spent too, it is still better than nothing.
    teach(p, 1, anthropic_headers(0), 59.0)
    teach(p, 2, anthropic_headers(0), 59.0)
    assert p.pick(59.0) is not None
    # With no reset reported, "zero left" is forgotten after stale_s (60 s) and the key is back.
    p2 = pool(2)
    teach(p2, 0, anthropic_headers(0))
    teach(p2, 1, anthropic_headers(3))
    lease = p2.pick(59.0)
    assert lease is not None and lease.key_id == ids(p2)[1]
    p2.release(lease)
    lease = p2.pick(60.0)
    assert lease is not None and lease.key_id == ids(p2)[0]


def test_429_cool_down_sources_in_order() -> None:
    p = pool(1, cooldown_s=30.0, cooldown_max_s=30.0)
    now = 1000.0
    lease = p.pick(now)
    p.observe(lease, 429, {}, now)  # no hint at all: the default
    assert p.soonest_available(now) == 30.0

    p = pool(1)
    lease = p.pick(now)
    p.observe(lease, 429, {"retry-after-ms": "1500", "retry-after": "9"}, now)
    assert p.soonest_available(now) == 1.5

    # Only a reset time: cool until it.
    p = KeyPool(SECRETS[:1], name="openai")
    lease = p.pick(now)
    p.observe(lease, 429, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6s"}, now)
    assert p.soonest_available(now) == 6.0
    assert p.pick(now + 5.9) is None
    assert p.pick(now + 6.0) is not None


def test_anthropic_reset_timestamp_is_read_against_the_date_header() -> None:
    p = pool(1)
    wall = 1_700_000_000.0
    reset = datetime.fromtimestamp(wall + 20, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    headers = {
        "date": email.utils.formatdate(wall, usegmt=True),
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset,
    }
    lease = p.pick(50.0)
    p.observe(lease, 200, headers, 50.0)
    # A key that reports zero left is as good as cooling until its reset.
    assert p.pick(50.0) is None
    assert p.soonest_available(50.0) == pytest.approx(20.0)
    assert p.snapshot(60.0)[0]["state"] == "cooling"
    assert p.pick(70.0) is not None


def test_all_cooling_returns_none_and_the_soonest_end() -> None:
    p = pool()
    now = 10.0
    for wait in ("30", "5", "12"):
        lease = p.pick(now)
        p.observe(lease, 429, {"retry-after": wait}, now)
    assert p.pick(now) is None
    assert p.soonest_available(now) == 5.0
    assert p.soonest_available(now + 3) == 2.0
    assert [s["state"] for s in p.snapshot(now)] == ["cooling"] * 3
    lease = p.pick(now + 5)
    assert lease is not None and lease.key_id == ids(p)[1]
    assert p.soonest_available(now + 5) == 0.0


def _refused_and_confirmed(p: KeyPool, lease, status: int, now: float) -> None:  # type: ignore[no-untyped-def]
    p.observe(lease, status, {}, now)
    assert p.begin_probe(lease.key_id)
    p.end_probe(lease.key_id, status, now)


def test_401_disables_until_enabled() -> None:
    p = pool(2)
    bad = p.pick(0.0)
    _refused_and_confirmed(p, bad, 401, 0.0)
    for t in range(1, 100):
        lease = p.pick(float(t))
        assert lease is not None and lease.key_id != bad.key_id
        p.observe(lease, 200, {}, float(t))
    assert p.snapshot(100.0)[0]["state"] == "disabled" and p.snapshot(100.0)[0]["count_401"] == 1
    p.enable(bad.key_id)
    picked = set()
    for _ in range(2):
        lease = p.pick(100.0)
        picked.add(lease.key_id)
        p.release(lease)
    assert bad.key_id in picked


def test_all_disabled_returns_none_and_no_soonest() -> None:
    p = pool(2)
    a = p.pick(0.0)
    _refused_and_confirmed(p, a, 401, 0.0)
    b = p.pick(0.0)
    _refused_and_confirmed(p, b, 403, 0.0)
    assert p.pick(0.0) is None
    assert p.soonest_available(0.0) is None
    assert [s["count_403"] for s in p.snapshot(0.0)] == [0, 1]


def test_a_401_alone_disables_nothing_until_a_probe_confirms_it() -> None:
    p = pool(1)
    lease = p.pick(0.0)
    p.observe(lease, 403, {}, 0.0)
    assert p.snapshot(0.0)[0]["state"] == "ok" and p.pick(0.0) is not None
    # One probe at a time.
    assert p.begin_probe(lease.key_id) and not p.begin_probe(lease.key_id)
    p.end_probe(lease.key_id, 200, 0.0)  # the key works: the request was at fault
    assert p.snapshot(1.0)[0]["state"] == "ok"
    # Refused requests right after a good probe need no new probe…
    for t in (1.0, 30.0, 59.0):
        p.observe(p.pick(t), 403, {}, t)
        assert not p.begin_probe(lease.key_id)
    # …until probe_interval_s has passed.
    p.observe(p.pick(60.0), 401, {}, 60.0)
    assert p.begin_probe(lease.key_id)
    p.end_probe(lease.key_id, None, 61.0)  # no answer: the key stays in rotation
    assert p.snapshot(61.0)[0]["state"] == "ok"
    assert p.begin_probe(lease.key_id)  # still suspect: the next chance probes again
    p.end_probe(lease.key_id, 401, 62.0)
    assert p.snapshot(62.0)[0]["state"] == "disabled" and p.pick(62.0) is None


def test_429_without_a_wait_cools_briefly_and_backs_off_on_repeats() -> None:
    p = pool(1)
    now = 0.0
    waits = []
    for _ in range(9):
        lease = p.pick(now)
        assert lease is not None
        p.observe(lease, 429, {}, now)
        wait = p.soonest_available(now)
        waits.append(wait)
        now += wait
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    p.observe(p.pick(now), 200, {}, now)  # an answer: the streak is over
    p.observe(p.pick(now), 429, {}, now)
    assert p.soonest_available(now) == 0.5


def test_disabled_and_cooling_mixed_reports_the_cooling_one() -> None:
    p = pool(2)
    p.disable(ids(p)[0])
    lease = p.pick(0.0)
    p.observe(lease, 429, {"retry-after": "7"}, 0.0)
    assert p.pick(0.0) is None
    assert p.soonest_available(0.0) == 7.0


def test_other_statuses_leave_the_key_alone() -> None:
    p = pool(1)
    for status in (200, 400, 404, 500, 529):
        lease = p.pick(0.0)
        assert lease is not None
        p.observe(lease, status, {}, 0.0)
    assert p.snapshot(0.0)[0]["state"] == "ok"


def test_secrets_never_leak() -> None:
    p = pool()
    leases = [p.pick(0.0) for _ in range(3)]
    p.observe(leases[0], 429, {"retry-after": "5"}, 0.0)
    p.observe(leases[1], 401, {}, 0.0)
    texts = [repr(p), str(p), repr(p.snapshot(0.0)), str(p.snapshot(0.0)), repr(leases), str(leases[2]), repr(ids(p))]
    for exc_call in (lambda: p.enable("nope"), lambda: KeyPool([SECRETS[0], SECRETS[0]], name="x")):
        with pytest.raises((KeyError, ValueError)) as info:
            exc_call()
        texts += [str(info.value), repr(info.value)]
    blob = "\n".join(texts)
    for secret in SECRETS:
        # Not the key, nor any distinctive 8-character piece of it.
        assert secret not in blob
        for i in range(len("sk-ant-api03-"), len(secret) - 8):
            assert secret[i : i + 8] not in blob, secret[i : i + 8]
    # The lease still gives the router what it must send.
    assert leases[2].secret == SECRETS[2]


def test_empty_pool_and_empty_key_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyPool([], name="x")
    with pytest.raises(ValueError):
        KeyPool(["", "k"], name="x")
