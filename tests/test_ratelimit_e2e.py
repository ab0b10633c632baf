"""Per-tenant rate limits through the live proxy: refusals are well-formed, budgets are shared."""

from __future__ import annotations

import secrets

import httpx
import trio
import trio.testing
import pytest

from .harness import body, closed_port, make_settings, running_mock, running_weir, weir_and_mock



def _key() -> dict[str, str]:
    # Passthrough mode: a fresh key is a fresh tenant (and a fresh Redis key).
    return {"x-api-key": "sk-" + secrets.token_hex(8)}


async def test_requests_per_minute_refuses_with_anthropic_headers(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock(ratelimit={"requests_per_minute": 2}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=_key()) as c:
            first = await c.post("/v1/messages", content=body())
            second = await c.post("/v1/messages", content=body())
            third = await c.post("/v1/messages", content=body())
            assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
            # Weir's budget, not the upstream key's, is what the client sees.
            assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
            assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
            assert third.json()["error"]["type"] == "rate_limit_error"
            assert third.headers["anthropic-ratelimit-requests-remaining"] == "0"
            assert int(third.headers["retry-after"]) >= 1
            assert mock.calls == 2
            await trio.sleep(31)  # half a minute refills one request
            assert (await c.post("/v1/messages", content=body())).status_code == 200
        # Another tenant has its own budget.
        async with httpx.AsyncClient(base_url=weir.url, headers=_key()) as c:
            assert (await c.post("/v1/messages", content=body())).status_code == 200
        assert sum(weir.app.limited.values()) == 1


async def test_tokens_are_settled_on_real_usage() -> None:
    async with weir_and_mock(ratelimit={"tokens_per_minute": 1000}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=_key()) as c:
            r1 = await c.post("/v1/messages", content=body(), headers={"x-mock-output-tokens": "50"})
            assert r1.status_code == 200
            used = r1.json()["usage"]
            r2 = await c.post("/v1/messages", content=body(), headers={"x-mock-output-tokens": "50"})
            # Same body, same estimate: between the two admissions the bucket
            # lost exactly what the first request really used.
            before = int(r1.headers["anthropic-ratelimit-tokens-remaining"])
            after = int(r2.headers["anthropic-ratelimit-tokens-remaining"])
            spent = used["input_tokens"] + used["output_tokens"]
            # Real time passes between the admissions: the bucket refills 1000/60 tokens a second.
            assert before - spent <= after <= before - spent + 3


async def test_per_tenant_limits_from_config() -> None:
    auth = {"client_keys": [{"tenant": "small", "key": "k-small"}, {"tenant": "big", "key": "k-big"}]}
    ratelimit = {"requests_per_minute": 100, "tenants": {"small": {"requests_per_minute": 1}}}
    async with weir_and_mock(auth=auth, ratelimit=ratelimit) as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            small = [await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-small"}) for _ in range(2)]
            big = [await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-big"}) for _ in range(2)]
    assert [r.status_code for r in small] == [200, 429]
    assert [r.status_code for r in big] == [200, 200]
    assert big[0].headers["anthropic-ratelimit-requests-limit"] == "100"


async def test_redis_budget_is_shared_by_two_weir_instances(redis_url: str) -> None:
    ratelimit = {"requests_per_minute": 3, "redis_url": redis_url}
    key = _key()
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url, ratelimit=ratelimit)) as a, running_weir(make_settings(url, ratelimit=ratelimit)) as b:
            async with httpx.AsyncClient(headers=key) as c:
                codes = [(await c.post(w.url + "/v1/messages", content=body())).status_code for w in (a, b, a, b)]
    assert codes == [200, 200, 200, 429]
    assert mock.calls == 3


async def test_redis_down_fails_open() -> None:
    async with weir_and_mock(ratelimit={"requests_per_minute": 1, "redis_url": f"redis://127.0.0.1:{closed_port()}/0"}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=_key()) as c:
            codes = [(await c.post("/v1/messages", content=body())).status_code for _ in range(3)]
    assert codes == [200, 200, 200]  # a limiter outage is not a gateway outage
    assert weir.app.ratelimiter.errors >= 3


async def test_admin_stats_show_limited_and_queue_figures() -> None:
    auth = {"admin_key": "adm", "client_keys": [{"tenant": "t", "key": "k-t"}]}
    async with weir_and_mock(auth=auth, ratelimit={"requests_per_minute": 1}) as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            for _ in range(3):
                await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-t"})
            assert (await c.get("/admin/stats", headers={"x-api-key": "k-t"})).status_code == 401
            stats = (await c.get("/admin/stats", headers={"x-api-key": "adm"})).json()
    assert stats["rate_limited"] == {"t": 2}
    assert stats["ratelimiter"]["kind"] == "LocalRateLimiter"
    (sched,) = stats["schedulers"].values()
    assert sched["in_flight"] == 0 and sched["tenants"]["t"]["granted"] == 1
