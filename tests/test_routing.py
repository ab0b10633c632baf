"""Routing, retries, failover, breakers and key pools, end to end on real sockets.

A client sends a request through Weir; one or more upstreams (the mock, or a
tiny fake that tells keys apart) answer or fail; the client gets one answer.
Time-based behaviour runs under trio's MockClock.
"""

from __future__ import annotations

import collections
import socket
from urllib.parse import quote
from collections.abc import Callable

import httpx
import msgspec
import pytest
import trio
import trio.testing

from .harness import body, closed_port, make_settings, read_head, running_mock, running_weir

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}
ADMIN = {"x-api-key": "admin-secret"}
CLIENT_AUTH = {"client_keys": [{"tenant": "team", "key": "sk-client"}], "admin_key": "admin-secret"}

_MESSAGE = msgspec.json.encode(
    {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": "fake",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
)



Reply = tuple[int, list[tuple[bytes, bytes]], bytes]


class FakeUpstream:
    """An Anthropic-ish upstream that answers per key: what the mock can't do.

    ``reply(key)`` decides each answer; ``hits`` counts requests per key and
    ``accepts`` counts TCP connections, so a test can prove Weir never
    connected. Every reply closes its connection: simple, and honest for counting.
    """

    def __init__(self, reply: Callable[[str], Reply] | None = None, *, slam: bool = False) -> None:
        self.reply = reply or (lambda key: (200, [], _MESSAGE))
        self.slam = slam  # accept, then close without a word: a reset before the head
        self.hits: collections.Counter[str] = collections.Counter()
        self.accepts = 0

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepts += 1
        if self.slam:
            await stream.aclose()
            return
        try:
            got = await read_head(stream)
            if got is None:
                return
            head, rest = got
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            key = headers.get(b"x-api-key", b"").decode()
            self.hits[key] += 1
            status, extra, payload = self.reply(key)
            lines = [b"HTTP/1.1 %d X" % status, b"content-type: application/json", b"content-length: %d" % len(payload), b"connection: close"]
            lines += [n + b": " + v for n, v in extra]
            await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


def _error(status: int, type_: str) -> bytes:
    return msgspec.json.encode({"type": "error", "error": {"type": type_, "message": f"fake {status}"}})


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}"


# ------------------------------------------------------------ failover & breaker


async def test_failover_on_refused_connection_then_breaker_skips_the_dead_target() -> None:
    async with running_mock() as (mock, url):
        settings = make_settings(
            None,
            upstreams=[{"name": "dead", "url": closed_port_url()}, {"name": "good", "url": url}],
            routes=[{"match": "*sonnet*", "targets": ["dead", "good"]}],
            breaker={"failure_threshold": 3},
        )
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            for _ in range(5):
                r = await c.post("/v1/messages", content=body())
                assert r.status_code == 200, r.text
                assert r.headers["x-weir-target"] == "good"
            assert mock.calls == 5
            dead = weir.app.router.lane("dead")
            assert dead is not None
            snap = dead.breaker.snapshot(trio.current_time())
            assert snap["state"] == "open"
            # Tripped after exactly the threshold: the last two requests never tried it.
            assert snap["consecutive_failures"] == 3


async def test_open_breaker_means_no_connection_attempt(autojump_clock: trio.testing.MockClock) -> None:
    slammer = FakeUpstream(slam=True)
    async with trio.open_nursery() as nursery, running_mock() as (mock, url):
        bad_url = await nursery.start(slammer.serve)
        settings = make_settings(
            None,
            upstreams=[{"name": "flaky", "url": bad_url}, {"name": "good", "url": url}],
            routes=[{"match": "*", "targets": ["flaky", "good"]}],
            breaker={"failure_threshold": 3, "open_s": 60},
        )
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body())
            # A reset before the head is retried on the same target (3 attempts), then fails over.
            assert r.status_code == 200 and r.headers["x-weir-target"] == "good"
            assert slammer.accepts == 3
            for _ in range(4):
                r = await c.post("/v1/messages", content=body())
                assert r.status_code == 200 and r.headers["x-weir-target"] == "good"
            assert slammer.accepts == 3, "an open breaker must skip the target without connecting"
            assert mock.calls == 5
        nursery.cancel_scope.cancel()


async def test_every_target_unreachable_is_a_502() -> None:
    settings = make_settings(None, upstreams=[{"name": "a", "url": closed_port_url()}, {"name": "b", "url": closed_port_url()}], routes=[{"match": "*", "targets": ["a", "b"]}], retry={"base_s": 0.0})
    async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
        r = await c.post("/v1/messages", content=body())
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"


async def test_breaker_half_open_then_closed(autojump_clock: trio.testing.MockClock) -> None:
    healthy = False
    fake = FakeUpstream(lambda key: (200, [], _MESSAGE) if healthy else (500, [], _error(500, "api_error")))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve)
        settings = make_settings(url, breaker={"failure_threshold": 2, "open_s": 15, "success_threshold": 2, "half_open_probes": 2}, retry={"max_attempts": 1})
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            breaker = weir.app.router.lanes[0].breaker
            for _ in range(2):
                assert (await c.post("/v1/messages", content=body())).status_code == 500
            assert breaker.state(trio.current_time()).value == "open"
            r = await c.post("/v1/messages", content=body())
            assert r.status_code == 503 and "circuit breaker" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            assert sum(fake.hits.values()) == 2  # the open breaker answered alone
            healthy = True
            await trio.sleep(15)
            assert breaker.state(trio.current_time()).value == "half_open"
            assert (await c.post("/v1/messages", content=body())).status_code == 200
            # A probe is judged when its body has ended on the server side,
            # a moment after the client holds the whole reply.
            await trio.testing.wait_all_tasks_blocked()
            assert breaker.state(trio.current_time()).value == "half_open"  # one lucky probe is not enough
            assert (await c.post("/v1/messages", content=body())).status_code == 200
            await trio.testing.wait_all_tasks_blocked()
            assert breaker.state(trio.current_time()).value == "closed"
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------- retries


async def test_retry_500s_succeeds_on_third_attempt(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url)) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=500;fail_first=2"})
    assert r.status_code == 200, r.text
    assert mock.calls == 3


async def test_no_retry_on_400() -> None:
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "a", "url": url}, {"name": "b", "url": url}], routes=[{"match": "*", "targets": ["a", "b"]}])
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=400"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert mock.calls == 1  # neither retried nor failed over: every target would say the same
    assert r.headers["x-weir-target"] == "a"


async def test_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["k-one"]}], auth=CLIENT_AUTH)
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            t0 = trio.current_time()
            r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=429;retry_after=2;fail_first=1"})
            waited = trio.current_time() - t0
    assert r.status_code == 200, r.text
    assert mock.calls == 2
    assert 2.0 <= waited < 3.0, waited
    assert mock.requests[-1].header(b"x-api-key") == b"k-one"


# ------------------------------------------------------------------ key pools


async def test_429_storm_on_one_key_never_reaches_clients() -> None:
    fake = FakeUpstream(lambda key: (429, [(b"retry-after", b"20")], _error(429, "rate_limit_error")) if key == "k-b" else (200, [], _MESSAGE))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve)
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["k-a", "k-b", "k-c"]}], auth=CLIENT_AUTH)
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            statuses = []

            async def one() -> None:
                statuses.append((await c.post("/v1/messages", content=body())).status_code)

            async with trio.open_nursery() as clients:
                for _ in range(30):
                    clients.start_soon(one)
            assert statuses == [200] * 30
            # The bad key was tried (by the requests already in flight when its
            # first 429 came back), cooled, and left alone afterwards.
            assert 1 <= fake.hits["k-b"] <= 10
            assert fake.hits["k-a"] + fake.hits["k-c"] == 30
            before = fake.hits["k-b"]
            for _ in range(10):
                assert (await c.post("/v1/messages", content=body())).status_code == 200
            assert fake.hits["k-b"] == before
            r = await c.get("/admin/upstreams", headers=ADMIN)
            keys = r.json()["upstreams"][0]["keys"]
            assert [k["state"] for k in keys] == ["ok", "cooling", "ok"]
            assert "k-b" not in r.text and "k-a" not in r.text  # ids only, never secrets
        nursery.cancel_scope.cancel()


async def test_all_keys_cooling_is_429_with_soonest_retry_after() -> None:
    waits = {"k-a": b"50", "k-b": b"40"}
    fake = FakeUpstream(lambda key: (429, [(b"retry-after", waits[key])], _error(429, "rate_limit_error")))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve)
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["k-a", "k-b"]}], auth=CLIENT_AUTH)
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body())
            # Both keys tried; the waits exceed retry.max_retry_after_s, so the upstream's 429 is relayed.
            assert r.status_code == 429 and fake.hits == {"k-a": 1, "k-b": 1}
            r = await c.post("/v1/messages", content=body())
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            assert r.headers["retry-after"] in ("40", "39")  # the soonest key, not the latest
            assert sum(fake.hits.values()) == 2  # answered without calling the upstream
        nursery.cancel_scope.cancel()


async def test_401_disables_key_until_admin_enables_it() -> None:
    revoked = {"k-only"}
    fake = FakeUpstream(lambda key: (401, [], _error(401, "authentication_error")) if key in revoked else (200, [], _MESSAGE))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve)
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["k-only"]}], auth=CLIENT_AUTH)
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body())
            assert r.status_code == 401  # relayed once, never retried
            r = await c.post("/v1/messages", content=body())
            assert r.status_code == 503 and r.json()["error"]["type"] == "api_error"
            assert fake.hits["k-only"] == 2  # the request, and the probe that confirmed the key is revoked
            ups = (await c.get("/admin/upstreams", headers=ADMIN)).json()["upstreams"]
            key = ups[0]["keys"][0]
            assert key["state"] == "disabled" and key["count_401"] == 1
            revoked.clear()
            r = await c.post(f"/admin/upstreams/p/keys/{quote(key['id'], safe='')}/enable", headers=ADMIN)
            assert r.status_code == 200, r.text
            r = await c.post("/v1/messages", content=body())
            assert r.status_code == 200 and fake.hits["k-only"] == 3
            assert (await c.post("/admin/upstreams/p/keys/nope/enable", headers=ADMIN)).status_code == 404
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------- routes & admin


async def test_routes_pick_targets_and_models() -> None:
    async with running_mock() as (mock, url):
        settings = make_settings(
            None,
            upstreams=[{"name": "main", "url": url}, {"name": "cheap", "url": url}],
            routes=[{"match": "*haiku*", "targets": ["cheap:claude-haiku-4-5-20251001"]}, {"match": "fast", "targets": ["cheap"]}],
            auth={"admin_key": "admin-secret"},
        )
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(model="claude-3-5-haiku-latest"))
            assert r.headers["x-weir-target"] == "cheap:claude-haiku-4-5-20251001"
            assert msgspec.json.decode(mock.requests[-1].body)["model"] == "claude-haiku-4-5-20251001"
            r = await c.post("/v1/messages", content=body(model="fast"))
            assert r.headers["x-weir-target"] == "cheap"
            assert msgspec.json.decode(mock.requests[-1].body)["model"] == "fast"
            sent = body(model="claude-sonnet-4-5")
            r = await c.post("/v1/messages", content=sent)
            assert r.headers["x-weir-target"] == "main"  # no route matched: the first upstream
            assert mock.requests[-1].body == sent  # and the bytes are untouched
            routes = (await c.get("/admin/routes", headers=ADMIN)).json()
            assert routes["routes"][0] == {"match": "*haiku*", "targets": ["cheap:claude-haiku-4-5-20251001"]}
            assert routes["default"] == "main"
            assert (await c.get("/ready")).status_code == 200
            for lane in weir.app.router.lanes:
                for _ in range(5):
                    permit = lane.breaker.allow(trio.current_time())
                    assert permit is not None
                    lane.breaker.record(permit, False, trio.current_time())
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "no_usable_upstream"
            assert (await c.post("/admin/upstreams/main/breaker/reset", headers=ADMIN)).status_code == 200
            assert (await c.get("/ready")).status_code == 200


async def test_a_head_timeout_counts_against_the_breaker_and_fails_over_next_time(autojump_clock: trio.testing.MockClock) -> None:
    # A primary that accepts and never answers: the first request waits out
    # its first-byte deadline (504); that failure opens the breaker
    # (threshold 1), so the next request goes straight to the fallback.
    async with running_mock() as (primary, p_url), running_mock() as (fallback, f_url):
        settings = make_settings(
            None,
            upstreams=[{"name": "primary", "url": p_url}, {"name": "fallback", "url": f_url}],
            routes=[{"match": "*", "targets": ["primary", "fallback"]}],
            breaker={"failure_threshold": 1},
            deadlines={"first_byte_s": 30},
        )
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers={**KEY, "x-mock-fault": "hang"}, timeout=None) as c:
                first = await c.post("/v1/messages", content=body())
                assert first.status_code == 504 and first.json()["error"]["type"] == "timeout_error"
                # Healthy this time: only the open breaker keeps it off the primary.
                second = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": ""})
    assert second.status_code == 200 and second.headers["x-weir-target"] == "fallback"
    assert primary.calls == 1 and fallback.calls == 1


def _chain(p_url: str, f_url: str, **extra: object):  # type: ignore[no-untyped-def]
    return make_settings(
        None,
        upstreams=[{"name": "primary", "url": p_url}, {"name": "fallback", "url": f_url}],
        routes=[{"match": "*", "targets": ["primary", "fallback"]}],
        breaker={"failure_threshold": 1},
        **extra,
    )


@pytest.mark.parametrize(
    "fault",
    [
        "reset_after=3",  # the stream broke after a good head
        "hang_after=3",  # the stream stalled past the idle deadline
    ],
)
async def test_a_stream_that_breaks_after_its_head_counts_against_the_breaker(autojump_clock: trio.testing.MockClock, fault: str) -> None:
    async with running_mock() as (primary, p_url), running_mock() as (fallback, f_url):
        async with running_weir(_chain(p_url, f_url, deadlines={"idle_s": 20})) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
                first = await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": fault})
                assert first.status_code == 200 and b"event: error" in first.content
                second = await c.post("/v1/messages", content=body())
    assert second.headers["x-weir-target"] == "fallback"
    assert primary.calls == 1


async def test_a_coalesced_stream_that_stalls_counts_against_the_breaker(autojump_clock: trio.testing.MockClock) -> None:
    """A cacheable request goes upstream through a coalesced flight, which has no
    request of its own: its stall must still count against the target, as the
    same stall does for a request that is not coalesced (the test above)."""
    async with running_mock() as (primary, p_url), running_mock() as (fallback, f_url):
        async with running_weir(_chain(p_url, f_url, deadlines={"idle_s": 20})) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
                first = await c.post("/v1/messages", content=body(stream=True, temperature=0), headers={"x-mock-fault": "hang_after=3"})
                assert first.status_code == 200 and b"event: error" in first.content
                assert first.headers["x-weir-cache"] == "miss"
                second = await c.post("/v1/messages", content=body())
    assert second.headers["x-weir-target"] == "fallback"
    assert primary.calls == 1


async def test_a_client_hanging_up_mid_stream_does_not_count_against_the_breaker(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock() as (primary, p_url), running_mock() as (fallback, f_url):
        async with running_weir(_chain(p_url, f_url, deadlines={"idle_s": 20})) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
                with trio.move_on_after(5):  # well inside the idle deadline
                    await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "hang_after=3"})
            with trio.fail_after(1):
                await primary.wait_disconnect(1)
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
                second = await c.post("/v1/messages", content=body())
    assert second.status_code == 200 and second.headers["x-weir-target"] == "primary"
    assert fallback.calls == 0


async def test_per_try_budget_fails_over_from_a_stuck_target(autojump_clock: trio.testing.MockClock) -> None:
    async with running_mock(latency_ms=600_000) as (stuck, s_url), running_mock() as (fallback, f_url):
        settings = _chain(s_url, f_url, deadlines={"first_byte_s": 60, "per_try_first_byte_s": 5})
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
                start = trio.current_time()
                r = await c.post("/v1/messages", content=body())
                took = trio.current_time() - start
            with trio.fail_after(1):
                await stuck.wait_disconnect(1)  # the stuck call was abandoned, not left open
    assert r.status_code == 200 and r.headers["x-weir-target"] == "fallback"
    assert 5 <= took < 6  # one per-try budget, not the 60 s first-byte deadline
    assert stuck.calls == 1 and fallback.calls == 1
