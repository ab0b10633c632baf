"""The response cache, end to end: real Hypercorn, the mock upstream on a socket.

Each test reads as: a client sends X, the upstream sees Y (``mock.calls``),
the client gets Z (status, ``x-weir-cache``, bytes).
"""

from __future__ import annotations

import logging
import socket
import uuid

import anthropic
import httpx
import msgspec
import pytest
import trio
import trio.testing

from cache import Entry, encode_entry
from proxy.caching import build_entry, plan_lookup, replay
from proxy.sse import SSEParser

from .harness import body, closed_port, make_settings, running_mock, running_weir, weir_and_mock

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}
ADMIN = {"x-api-key": "admin-secret"}



def det(**fields) -> bytes:
    """A deterministic (temperature 0) request, unique per test so shared
    stores (Redis) cannot leak entries between tests."""
    fields.setdefault("messages", [{"role": "user", "content": "hello " + uuid.uuid4().hex}])
    return body(temperature=0, **fields)


async def post(client: httpx.AsyncClient, url: str, data: bytes, **headers: str) -> httpx.Response:
    return await client.post(url + "/v1/messages", content=data, headers={**KEY, **headers})


def cache_header(resp: httpx.Response) -> str:
    return resp.headers["x-weir-cache"]


# ------------------------------------------------------------- policy (pure)


def test_policy_decisions() -> None:
    temp0, temp1 = body(temperature=0), body(temperature=1)
    common = dict(path="/v1/messages", tenant="t", default_ttl=60.0)
    assert plan_lookup(headers={}, body=temp0, mode="deterministic", **common) is not None
    assert plan_lookup(headers={}, body=temp1, mode="deterministic", **common) is None
    assert plan_lookup(headers={}, body=body(), mode="deterministic", **common) is None  # absent = 1.0
    assert plan_lookup(headers={b"x-weir-cache": b"on"}, body=temp1, mode="deterministic", **common) is not None
    assert plan_lookup(headers={b"x-weir-cache": b"off"}, body=temp0, mode="all", **common) is None
    assert plan_lookup(headers={}, body=temp1, mode="all", **common) is not None
    assert plan_lookup(headers={b"x-weir-cache": b"on"}, body=temp0, mode="off", **common) is None
    assert plan_lookup(headers={}, body=temp0, mode="deterministic", tenant="t", default_ttl=60.0, path="/v1/messages/count_tokens") is None
    lk = plan_lookup(headers={b"cache-control": b"no-cache, max-age=5"}, body=temp0, mode="deterministic", **common)
    assert lk is not None and not lk.read and lk.write and lk.ttl == 5.0 and lk.max_age == 5.0
    lk = plan_lookup(headers={b"cache-control": b"no-store"}, body=temp0, mode="deterministic", **common)
    assert lk is not None and lk.read and not lk.write
    # The stream flag and metadata do not change the key; the tenant does.
    a = plan_lookup(headers={}, body=body(temperature=0, stream=True, metadata={"user_id": "x"}), mode="deterministic", **common)
    b = plan_lookup(headers={}, body=temp0, mode="deterministic", **common)
    c = plan_lookup(headers={}, body=temp0, mode="deterministic", path="/v1/messages", tenant="u", default_ttl=60.0)
    assert a is not None and b is not None and c is not None and a.key == b.key != c.key


def test_entry_refuses_errors_truncation_and_size() -> None:
    sse = [(b"content-type", b"text/event-stream")]
    start = b'event: message_start\ndata: {"type":"message_start","message":{"type":"message","role":"assistant","content":[],"usage":{"input_tokens":3}}}\n\n'
    delta = b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}\n\n'
    stop = delta + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ok = build_entry(200, sse + [(b"anthropic-ratelimit-requests-remaining", b"9"), (b"request-id", b"r1")], [start, stop], now=0, ttl=9, max_bytes=10_000)
    assert ok is not None and ok.events == [start, delta, stop[len(delta):]] and ok.usage == {"input_tokens": 3, "output_tokens": 1}
    assert ok.headers == [("request-id", "r1")]  # rate-limit headers are not replayed
    assert build_entry(200, sse, [start], now=0, ttl=9, max_bytes=10_000) is None  # no message_stop
    assert build_entry(200, sse, [start, stop[:-5]], now=0, ttl=9, max_bytes=10_000) is None  # cut mid-event
    assert build_entry(200, sse, [start, stop], now=0, ttl=9, max_bytes=len(start)) is None  # too big
    assert build_entry(500, [], [b'{"type":"error"}'], now=0, ttl=9, max_bytes=10_000) is None
    assert build_entry(200, [(b"content-type", b"application/json")], [b'{"type":"mess'], now=0, ttl=9, max_bytes=10_000) is None


# ------------------------------------------------------------- hit / miss / bypass


@pytest.mark.parametrize("coalesce", [True, False])
async def test_second_deterministic_request_is_a_byte_identical_hit(coalesce: bool) -> None:
    # Both store paths: the coalescer's flight, and the plain recorded exchange.
    async with weir_and_mock(cache={"l2": "none", "coalesce": coalesce}) as (weir, mock):
        async with httpx.AsyncClient() as client:
            data = det()
            first = await post(client, weir.url, data)
            second = await post(client, weir.url, data)
            assert first.status_code == second.status_code == 200
            assert (cache_header(first), cache_header(second)) == ("miss", "hit")
            assert second.content == first.content and first.json()["type"] == "message"
            assert second.headers["request-id"] == first.headers["request-id"]
            assert mock.calls == 1

            streamed = det(stream=True)
            s1 = await post(client, weir.url, streamed)
            s2 = await post(client, weir.url, streamed)
            assert (cache_header(s1), cache_header(s2)) == ("miss", "hit")
            assert s2.content == s1.content and s1.content.startswith(b"event: message_start")
            assert s2.headers["content-type"].startswith("text/event-stream")
            assert mock.calls == 2

            # Sampling requests bypass; the opt-in header caches them; opt-out wins.
            sampled = body(temperature=1, messages=[{"role": "user", "content": uuid.uuid4().hex}])
            b1, b2 = await post(client, weir.url, sampled), await post(client, weir.url, sampled)
            assert (cache_header(b1), cache_header(b2)) == ("bypass", "bypass") and mock.calls == 4
            o1 = await post(client, weir.url, sampled, **{"x-weir-cache": "on"})
            o2 = await post(client, weir.url, sampled, **{"x-weir-cache": "on"})
            assert (cache_header(o1), cache_header(o2)) == ("miss", "hit") and mock.calls == 5
            off = await post(client, weir.url, data, **{"x-weir-cache": "off"})
            assert cache_header(off) == "bypass" and mock.calls == 6


async def test_stream_and_plain_answer_each_other_through_the_sdk() -> None:
    async with weir_and_mock() as (weir, mock):
        client = anthropic.AsyncAnthropic(base_url=weir.url, api_key="sk-client", max_retries=0)
        # extra_body: this SDK's messages.stream() has no temperature parameter.
        kw = dict(model="claude-sonnet-4-5", max_tokens=64, extra_body={"temperature": 0})
        # Recorded as a stream, asked for plain.
        msgs = [{"role": "user", "content": "stream first " + uuid.uuid4().hex}]
        async with client.messages.stream(messages=msgs, **kw) as stream:
            streamed = await stream.get_final_message()
        plain = await client.messages.with_raw_response.create(messages=msgs, **kw)
        assert plain.headers["x-weir-cache"] == "hit" and mock.calls == 1
        parsed = await plain.parse()
        assert parsed.content[0].text == streamed.content[0].text and parsed.usage.output_tokens == streamed.usage.output_tokens
        # Recorded plain, asked for a stream.
        msgs = [{"role": "user", "content": "plain first " + uuid.uuid4().hex}]
        first = await client.messages.create(messages=msgs, **kw)
        async with client.messages.stream(messages=msgs, **kw) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert mock.calls == 2
        assert text == first.content[0].text == final.content[0].text and final.stop_reason == first.stop_reason


async def test_one_tenant_never_gets_anothers_entry() -> None:
    async with weir_and_mock() as (weir, mock):
        async with httpx.AsyncClient() as client:
            data = det()
            a1 = await post(client, weir.url, data, **{"x-api-key": "sk-tenant-a"})
            b1 = await post(client, weir.url, data, **{"x-api-key": "sk-tenant-b"})
            a2 = await post(client, weir.url, data, **{"x-api-key": "sk-tenant-a"})
            assert [cache_header(r) for r in (a1, b1, a2)] == ["miss", "miss", "hit"]
            assert mock.calls == 2


async def test_cache_control_no_cache_no_store_max_age(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock() as (weir, mock):
        async with httpx.AsyncClient() as client:
            data = det()
            r = await post(client, weir.url, data, **{"cache-control": "no-store"})
            assert cache_header(r) == "miss"
            r = await post(client, weir.url, data)
            assert cache_header(r) == "miss" and mock.calls == 2  # nothing was stored
            r = await post(client, weir.url, data, **{"cache-control": "no-cache"})
            assert cache_header(r) == "miss" and mock.calls == 3  # skipped the read...
            r = await post(client, weir.url, data)
            assert cache_header(r) == "hit" and mock.calls == 3  # ...and still wrote

            # max-age caps the lifetime of what is stored (L1 runs on trio's clock).
            short = det()
            r = await post(client, weir.url, short, **{"cache-control": "max-age=5"})
            assert cache_header(r) == "miss"
            await trio.sleep(4)
            assert cache_header(await post(client, weir.url, short)) == "hit"
            await trio.sleep(2)
            assert cache_header(await post(client, weir.url, short)) == "miss"
            # max-age=0 on the read: nothing stored is young enough.
            assert cache_header(await post(client, weir.url, short, **{"cache-control": "max-age=0"})) == "miss"
            assert mock.calls == 6


async def test_errors_and_broken_streams_are_not_cached() -> None:
    # The breaker would answer the later requests itself after a run of
    # failures; these requests must all reach the upstream.
    async with weir_and_mock(breaker={"failure_threshold": 1000, "min_requests": 1000}, retry={"max_attempts": 1}) as (weir, mock):
        async with httpx.AsyncClient() as client:
            for stream, fault in [(False, "status=500"), (True, "status=529"), (True, "reset_after=3"), (True, "error_event_after=3"), (False, "reset_after=1")]:
                data = det(stream=stream)
                for _ in range(2):
                    before = mock.calls
                    try:
                        r = await post(client, weir.url, data, **{"x-mock-fault": fault})
                    except httpx.RemoteProtocolError:
                        pass  # a plain body cut short: the connection drops, as it should
                    else:
                        assert cache_header(r) == "miss"
                        if stream and "after" in fault:
                            assert b"event: error" in r.content
                        else:
                            assert r.status_code >= 500
                    assert mock.calls == before + 1, fault
            stats = await weir.app.cache.stats()
            assert stats["requests"]["hits"] == 0 and stats["l1"]["entries"] == 0
            assert stats["requests"]["misses"] == 10


# ------------------------------------------------------------- L2


async def test_sqlite_l2_is_shared_by_two_apps(tmp_path) -> None:
    cache, server = {"l2": "sqlite"}, {"data_dir": str(tmp_path)}
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url, cache=cache, server=server)) as one, running_weir(make_settings(url, cache=cache, server=server)) as two:
            async with httpx.AsyncClient() as client:
                data = det(stream=True)
                first = await post(client, one.url, data)
                assert cache_header(first) == "miss"
                for _ in range(100):  # the L2 write runs in the background
                    if (await one.app.cache.stats())["l2"].get("entries"):
                        break
                    await trio.sleep(0.01)
                second = await post(client, two.url, data)
                assert cache_header(second) == "hit" and second.content == first.content
                assert mock.calls == 1
                assert (await two.app.cache.stats())["l2"]["hits"] == 1


async def test_corrupt_l2_entry_is_a_miss(tmp_path) -> None:
    cache, server = {"l2": "sqlite"}, {"data_dir": str(tmp_path)}
    async with weir_and_mock(cache=cache, server=server) as (weir, mock):
        async with httpx.AsyncClient() as client:
            data = det()
            lk = plan_lookup(path="/v1/messages", headers={b"anthropic-version": b"2023-06-01"}, body=data,
                             tenant=weir.app.auth.identify({b"x-api-key": b"sk-client"}).tenant, mode="deterministic", default_ttl=60)
            l2 = weir.app.cache.tiered._l2
            await l2.set(lk.key, b"\xc1 not msgpack", 60)
            r = await post(client, weir.url, data)
            assert r.status_code == 200 and cache_header(r) == "miss" and mock.calls == 1
            assert (await weir.app.cache.stats())["l2"]["corrupt"] == 1
            assert cache_header(await post(client, weir.url, data)) == "hit"


async def test_redis_l2(redis_url: str) -> None:
    cache = {"l2": "redis", "redis_url": redis_url}
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url, cache=cache)) as one, running_weir(make_settings(url, cache=cache)) as two:
            async with httpx.AsyncClient() as client:
                data = det()
                first = await post(client, one.url, data)
                second = None
                for _ in range(100):
                    second = await post(client, two.url, data, **{"x-weir-cache": "on"})
                    if cache_header(second) == "hit":
                        break
                    await trio.sleep(0.01)
                assert second is not None and cache_header(second) == "hit" and second.content == first.content
                assert (await two.app.cache.stats())["l2"]["hits"] >= 1


@pytest.mark.parametrize("redis", ["up", "down"])
async def test_redis_l2_closes_cleanly_at_shutdown(redis: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> None:
    """coredis' pool is a task group: closing it inside a scope opened after
    it corrupted trio's cancel-scope stack, and every shutdown failed."""
    url = request.getfixturevalue("redis_url") if redis == "up" else f"redis://127.0.0.1:{closed_port()}/0"
    async with weir_and_mock(cache={"l2": "redis", "redis_url": url}) as (weir, mock):
        async with httpx.AsyncClient() as client:
            assert (await post(client, weir.url, det())).status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_redis_down_still_serves_from_l1(caplog) -> None:
    cache = {"l2": "redis", "redis_url": f"redis://127.0.0.1:{closed_port()}/0"}
    async with weir_and_mock(cache=cache) as (weir, mock):
        async with httpx.AsyncClient() as client:
            data = det()
            r1 = await post(client, weir.url, data)
            r2 = await post(client, weir.url, data)
            assert r1.status_code == r2.status_code == 200
            assert (cache_header(r1), cache_header(r2)) == ("miss", "hit") and mock.calls == 1
            stats = await weir.app.cache.stats()
            assert stats["l2"]["l2_errors"] >= 1
    assert any("L2 unavailable" in rec.getMessage() or "redis L2" in rec.getMessage() for rec in caplog.records)


# ------------------------------------------------------------- admin


async def test_admin_stats_and_purge() -> None:
    async with weir_and_mock(auth={"admin_key": "admin-secret"}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            a, b = det(), det()
            await post(client, weir.url, a, **{"x-api-key": "sk-a"})
            await post(client, weir.url, b, **{"x-api-key": "sk-b"})
            assert (await client.get("/admin/cache")).status_code == 401
            stats = (await client.get("/admin/cache", headers=ADMIN)).json()
            assert stats["l1"]["entries"] == 2 and stats["requests"]["misses"] == 2 and "evictions" in stats["l1"]
            tenant_a = weir.app.auth.identify({b"x-api-key": b"sk-a"}).tenant
            r = await client.post("/admin/cache/purge", params={"tenant": tenant_a}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["purged"] == 1
            assert cache_header(await post(client, weir.url, a, **{"x-api-key": "sk-a"})) == "miss"
            assert cache_header(await post(client, weir.url, b, **{"x-api-key": "sk-b"})) == "hit"
            r = await client.post("/admin/cache/purge", headers=ADMIN)
            assert r.status_code == 200 and r.json()["purged"] == 2
            assert cache_header(await post(client, weir.url, b, **{"x-api-key": "sk-b"})) == "miss"
            stats = (await client.get("/admin/cache", headers=ADMIN)).json()
            assert stats["requests"] == {**stats["requests"], "hits": 1, "misses": 4}


def test_replay_converts_between_forms() -> None:
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message","role":"assistant","model":"x","content":[],"stop_reason":null,"usage":{"input_tokens":3,"output_tokens":0}}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n',
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    entry = Entry(status=200, headers=[("request-id", "r")], body=None, events=events, usage=None, created_at=0, ttl=1)
    status, headers, sse = replay(entry, True)
    assert sse == b"".join(events) and (b"request-id", b"r") in headers
    status, headers, plain = replay(entry, False)
    msg = msgspec.json.decode(plain)
    assert msg["content"] == [{"type": "text", "text": "hi"}] and msg["stop_reason"] == "end_turn"
    back = Entry(status=200, headers=[], body=plain, events=None, usage=None, created_at=0, ttl=1)
    names = [ev.name for ev in SSEParser().feed(replay(back, True)[2])]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert encode_entry(entry)  # round-trips through the codec the levels store
