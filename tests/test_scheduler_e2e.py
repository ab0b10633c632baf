"""The fair scheduler in the live proxy: one queue per target, in front of httpx.

Two tenants (client keys A and B) share a target with two connections; the
mock takes a (mock-clock) second per request.
"""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from .harness import body, make_settings, running_mock, running_weir

A = {"x-api-key": "key-a", "anthropic-version": "2023-06-01"}
B = {"x-api-key": "key-b", "anthropic-version": "2023-06-01"}
SLOW = {"x-mock-latency-ms": "1000"}
AUTH = {"client_keys": [{"tenant": "a", "key": "key-a"}, {"tenant": "b", "key": "key-b"}]}



def settings(url: str, capacity: int, **sections):  # type: ignore[no-untyped-def]
    return make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["sk-up"], "max_connections": capacity}], auth=AUTH, **sections)


async def test_flood_from_one_tenant_does_not_delay_another(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock() as (mock, url), running_weir(settings(url, 2)) as weir:
        done_a: list[float] = []
        t0 = trio.current_time()
        async with httpx.AsyncClient(base_url=weir.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:

            async def flood_one() -> None:
                r = await c.post("/v1/messages", content=body(), headers={**A, **SLOW})
                assert r.status_code == 200
                done_a.append(trio.current_time() - t0)

            async with trio.open_nursery() as n:
                for _ in range(20):
                    n.start_soon(flood_one)
                await trio.sleep(0.5)  # the flood is queued
                sched = weir.app.router.lanes[0].scheduler
                assert sched.stats().in_flight == 2 and sched.stats().depth == 18
                tb = trio.current_time()
                r = await c.post("/v1/messages", content=body(), headers={**B, **SLOW})
                b_latency = trio.current_time() - tb
                assert r.status_code == 200
        # B waits for one slot to free (<= 1 s) and is served next: not behind 18 of A's.
        assert b_latency <= 2.1, b_latency
        assert max(done_a) >= 10.0  # A's flood really was 10 s of work on two connections
        assert sum(1 for t in done_a if t > b_latency + 0.5) >= 15


async def test_shed_requests_get_a_well_formed_529(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock() as (mock, url), running_weir(settings(url, 1, scheduler={"max_queue": 3})) as weir:
        results: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=weir.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:

            async def one() -> None:
                results.append(await c.post("/v1/messages", content=body(), headers={**A, **SLOW}))

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(one)
        shed = [r for r in results if r.status_code == 529]
        assert len(shed) == 4 and sum(r.status_code == 200 for r in results) == 4
        for r in shed:
            doc = r.json()
            assert doc["type"] == "error" and doc["error"]["type"] == "overloaded_error"
            assert int(r.headers["retry-after"]) >= 1
        assert mock.calls == 4  # shed requests never reached the upstream


async def test_cancelled_waiters_free_their_slots(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock() as (mock, url), running_weir(settings(url, 1)) as weir:
        sched = weir.app.router.lanes[0].scheduler
        async with httpx.AsyncClient(base_url=weir.url, timeout=2.0, limits=httpx.Limits(max_connections=64)) as c:

            async def impatient() -> None:
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/v1/messages", content=body(), headers={**A, "x-mock-latency-ms": "10000"})

            async with trio.open_nursery() as n:
                for _ in range(5):
                    n.start_soon(impatient)
            await trio.sleep(1)  # let Weir notice the hang-ups
            stats = sched.stats()
            assert stats.in_flight == 0 and stats.depth == 0, stats
            r = await c.post("/v1/messages", content=body(), headers=B)
            assert r.status_code == 200
        await trio.sleep(0.1)  # the handler unwinds just after the client has its last byte
        assert sched.stats().in_flight == 0
