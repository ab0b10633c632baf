"""Request coalescing (singleflight), end to end.

A client sends N identical requests at once; the upstream sees one call; every
client gets the same bytes — and the call's fate follows its subscribers, not
its first requester.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio
import trio.testing

from .harness import body, make_settings, running_mock, running_weir, weir_and_mock

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}



def det(**fields) -> bytes:
    fields.setdefault("messages", [{"role": "user", "content": "coalesce " + uuid.uuid4().hex}])
    return body(temperature=0, **fields)


async def _many(url: str, data: bytes, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n + 8), timeout=60) as client:

        async def one() -> None:
            out.append(await client.post(url + "/v1/messages", content=data, headers={**KEY, **headers}))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return out


@pytest.mark.parametrize("stream", [False, True])
async def test_hundred_identical_requests_make_one_upstream_call(stream: bool, autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock() as (weir, mock):
        replies = await _many(weir.url, det(stream=stream), 100, {"x-mock-latency-ms": "2000", "x-mock-fault": "slow=50"})
        assert mock.calls == 1
        assert len(replies) == 100 and all(r.status_code == 200 for r in replies)
        assert len({r.content for r in replies}) == 1
        marks = [r.headers["x-weir-cache"] for r in replies]
        assert marks.count("miss") == 1 and marks.count("coalesced") == 99, marks
        if stream:
            assert replies[0].content.rstrip().endswith(b'{"type":"message_stop"}')
        # The flight stored the reply once; the next request is a plain hit.
        stats = await weir.app.cache.stats()
        assert stats["requests"]["stored"] == 1 and stats["flights"] == 1


async def test_leader_hangs_up_followers_complete(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock() as (weir, mock):
        data = det(stream=True)
        headers = {**KEY, "x-mock-latency-ms": "1000", "x-mock-fault": "slow=100"}
        results: list[httpx.Response] = []
        async with httpx.AsyncClient(timeout=60) as client:
            async with trio.open_nursery() as nursery:
                leader_scope = trio.CancelScope()

                async def leader() -> None:
                    with leader_scope:
                        await client.post(weir.url + "/v1/messages", content=data, headers=headers)

                async def follower() -> None:
                    results.append(await client.post(weir.url + "/v1/messages", content=data, headers=headers))

                nursery.start_soon(leader)
                await trio.sleep(0.5)
                for _ in range(3):
                    nursery.start_soon(follower)
                await trio.sleep(0.6)  # head arrived, stream under way
                leader_scope.cancel()
        assert mock.calls == 1 and mock.disconnects == 0
        assert len(results) == 3 and all(r.status_code == 200 for r in results)
        assert len({r.content for r in results}) == 1 and b"message_stop" in results[0].content
        assert [r.headers["x-weir-cache"] for r in results] == ["coalesced"] * 3


async def test_all_subscribers_hang_up_cancels_the_upstream_call(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock() as (weir, mock):
        data = det(stream=True)
        headers = {**KEY, "x-mock-fault": "hang_after=2"}
        async with httpx.AsyncClient(timeout=60) as client:
            async with trio.open_nursery() as nursery:

                async def one() -> None:
                    async with client.stream("POST", weir.url + "/v1/messages", content=data, headers=headers) as resp:
                        async for _ in resp.aiter_bytes():
                            pass

                for _ in range(3):
                    nursery.start_soon(one)
                await trio.sleep(1)
                assert mock.calls == 1
                flight = next(iter(weir.app.cache.coalescer._flights.values()))
                assert flight.subscribers == 3
                nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            await mock.wait_disconnect(1)
        assert not weir.app.cache.coalescer._flights


async def test_upstream_error_reaches_every_waiter(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock(retry={"max_attempts": 1}) as (weir, mock):
        replies = await _many(weir.url, det(), 10, {"x-mock-latency-ms": "500", "x-mock-fault": "status=429;retry_after=3"})
        assert mock.calls == 1
        assert all(r.status_code == 429 and r.json()["type"] == "error" for r in replies)
        assert {r.headers["retry-after"] for r in replies} == {"3"}
        # Not cached: the next request goes upstream again.
        again = await _many(weir.url, det(), 1, {})
        assert again[0].status_code == 200 and mock.calls == 2


async def test_workers_sharing_sqlite_coalesce_through_the_lease(tmp_path) -> None:
    """Two Weir apps (as two Hypercorn workers would be) on one SQLite file:
    the one that loses the lease waits for the winner's entry.

    Real clock: SQLite runs in worker threads, and an autojumping MockClock
    jumps while the trio thread waits on them, firing every timeout."""
    cache, server = {"l2": "sqlite", "lease_poll_s": 0.05}, {"data_dir": str(tmp_path)}
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url, cache=cache, server=server)) as one, running_weir(make_settings(url, cache=cache, server=server)) as two:
            data = det()
            hdr = {"x-mock-latency-ms": "600"}
            async with trio.open_nursery() as nursery:
                got: dict[str, list[httpx.Response]] = {}

                async def run(name: str, where: str, delay: float) -> None:
                    await trio.sleep(delay)
                    got[name] = await _many(where, data, 5, hdr)

                nursery.start_soon(run, "one", one.url, 0)
                nursery.start_soon(run, "two", two.url, 0.3)
            assert mock.calls == 1
            replies = got["one"] + got["two"]
            assert len({r.content for r in replies}) == 1 and all(r.status_code == 200 for r in replies)
            assert {r.headers["x-weir-cache"] for r in got["two"]} == {"coalesced"}
            assert (await two.app.cache.stats())["requests"]["lease_fills"] == 1


# ----------------------------------------------------------- sealed flights (unit)


async def test_a_flight_past_its_limit_drops_what_every_reader_has_read() -> None:
    from proxy.coalesce import Coalescer, Flight

    release = trio.Event()

    async def fetch(flight: Flight) -> None:
        flight.start(200, [(b"content-type", b"text/event-stream")])
        for i in range(10):
            flight.push(b"%05d" % i)  # 5 bytes a chunk, limit 12: sealed at the third
            await trio.sleep(0)
            if i == 4:
                await release.wait()
        flight.finish()

    async with trio.open_nursery() as nursery:
        co = Coalescer(nursery)
        async with co.subscribe("k", fetch, deadline=trio.current_time() + 60, limit=12) as (fast, flight, leader):
            assert leader
            async with co.subscribe("k", fetch, deadline=trio.current_time() + 60, limit=12) as (slow, same, follower_leads):
                assert same is flight and not follower_leads
                await fast.wait_head()
                got_fast = b""
                async for chunk in fast.aiter():
                    got_fast += chunk
                    if len(got_fast) >= 25:
                        break
                # The slow reader has read nothing: nothing may be dropped yet.
                assert flight.sealed and flight.base == 0 and len(flight.chunks) == 5
                # Sealed: a newcomer gets a flight of its own.
                async with co.subscribe("k", fetch, deadline=trio.current_time() + 60, limit=12) as (_, other, newcomer_leads):
                    assert newcomer_leads and other is not flight
                await slow.wait_head()
                got_slow = b""
                release.set()
                async for chunk in slow.aiter():
                    got_slow += chunk
                async for chunk in fast.aiter():
                    got_fast += chunk
                assert got_slow == got_fast == b"".join(b"%05d" % i for i in range(10))
                # Both readers reached the end: everything before it was dropped on the way.
                assert flight.base > 0 and flight.size == 50


async def test_an_unsealed_flight_keeps_every_chunk_for_late_joiners() -> None:
    from proxy.coalesce import Coalescer, Flight

    go = trio.Event()

    async def fetch(flight: Flight) -> None:
        flight.start(200, [])
        flight.push(b"abc")
        await go.wait()
        flight.push(b"def")
        flight.finish()

    async with trio.open_nursery() as nursery:
        co = Coalescer(nursery)
        async with co.subscribe("k", fetch, deadline=trio.current_time() + 60, limit=1000) as (first, flight, _):
            await first.wait_head()
            async for chunk in first.aiter():
                assert chunk == b"abc"
                break
            async with co.subscribe("k", fetch, deadline=trio.current_time() + 60, limit=1000) as (late, same, leads):
                assert same is flight and not leads
                go.set()
                await late.wait_head()
                assert b"".join([c async for c in late.aiter()]) == b"abcdef"  # from byte 0
