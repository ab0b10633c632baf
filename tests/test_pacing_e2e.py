"""Provider budgets end to end: a burst of clients, Weir, and a mock upstream
that enforces a provider's quota (the ``rate_limit`` fault), under MockClock."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from proxy.settings import SettingsError

from .harness import make_settings, running_mock, running_weir
from .test_pacing import most_in_any_window

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}
BODY = b'{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'


async def burst_of(n: int, url: str) -> list[int]:
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=None, limits=limits) as client:

        async def one() -> None:
            statuses.append((await client.post("/v1/messages", content=BODY)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return statuses


async def test_a_hundred_at_once_against_forty_a_minute(autojump_clock: trio.testing.MockClock) -> None:
    """The issue's figure: 0 upstream 429s, 0 client errors, and the spacing the upstream saw."""
    async with running_mock(fault="rate_limit=40") as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "nim", "url": url, "requests_per_minute": 40}])
        async with running_weir(settings) as weir:
            start = trio.current_time()
            statuses = await burst_of(100, weir.url)
            took = trio.current_time() - start
            budget = weir.app.router.lanes[0].scheduler.stats().budget
    assert statuses == [200] * 100
    assert mock.core.rate_limited == 0 and mock.calls == 100
    seen = sorted(t - start for t in mock.arrived)
    gaps = [b - a for a, b in zip(seen[1:], seen[2:])]
    assert most_in_any_window(seen, 60 + 1e-6) == 40
    assert min(gaps) > 60 / 38 - 0.01 and max(gaps) < 60 / 38 + 0.01
    assert 60 / 38 * 98 - 1e-6 <= took < 60 / 38 * 98 + 5  # the last one leaves after 98 intervals
    assert budget is not None and budget["rate_limited"] == 0 and budget["scale"] == 1.0


async def test_without_a_budget_the_same_burst_meets_the_providers_429s(autojump_clock: trio.testing.MockClock) -> None:
    """The control: the same burst, no budget configured — the provider refuses 60 of 100."""
    async with running_mock(fault="rate_limit=40") as (mock, url):
        async with running_weir(make_settings(None, upstreams=[{"name": "nim", "url": url}])) as weir:
            statuses = await burst_of(100, weir.url)
    assert statuses.count(200) == 40 and statuses.count(429) == 60
    assert mock.core.rate_limited == 60


async def test_a_provider_smaller_than_configured_is_found_by_its_429s(autojump_clock: trio.testing.MockClock) -> None:
    """Configured at 40 a minute, the provider allows 20: each upstream 429 is relayed to its
    client (passthrough: the client's SDK retries), and lowers the budget, so only a few of the
    60 meet one — without AIMD, pacing at 38 a minute, 18 of every 38 would."""
    async with running_mock(fault="rate_limit=20") as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "nim", "url": url, "requests_per_minute": 40}])
        async with running_weir(settings) as weir:
            statuses = await burst_of(60, weir.url)
            budget = weir.app.router.lanes[0].scheduler.stats().budget
    assert budget is not None and budget["rate_limited"] == mock.core.rate_limited
    assert statuses.count(429) == mock.core.rate_limited and statuses.count(200) == 60 - mock.core.rate_limited
    assert 0 < mock.core.rate_limited <= 4


def test_budget_settings_are_checked_at_start_up() -> None:
    for upstream, message in [
        ({"requests_per_minute": 2, "burst": 2}, "burst must be below requests_per_minute"),
        ({"requests_per_minute": 40, "burst": 0}, "burst must be at least 1"),
        ({"requests_per_minute": -1}, "must be 0 \\(none\\) or positive"),
    ]:
        with pytest.raises(SettingsError, match=message):
            make_settings(None, upstreams=[{"name": "nim", "url": "http://127.0.0.1:1", **upstream}])
    with pytest.raises(SettingsError, match="need scheduler.policy"):
        make_settings(None, upstreams=[{"name": "nim", "url": "http://127.0.0.1:1", "requests_per_minute": 40}], scheduler={"policy": "fifo"})
