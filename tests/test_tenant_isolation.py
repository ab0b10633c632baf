"""One tenant's requests must not deny service to another.

The breaker and the key pool are shared by every tenant of a target, so they
must judge the upstream, never a client: a request Weir refuses itself, a
401/403 the request earned on its own, a 429 with no retry-after — none may
take the target or its key away from everyone else.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from proxy.context import Deadlines, RequestContext
from proxy.errors import ProxyError
from proxy.upstream import UpstreamRequest

from .harness import body, make_settings, running_mock, running_weir
from .test_target_path import raw_exchange

AUTH = {"client_keys": [{"tenant": "mallory", "key": "k-mallory"}, {"tenant": "alice", "key": "k-alice"}]}
# Two failures in a row would open the breaker for everyone.
TOUCHY = {"breaker": {"failure_threshold": 2, "open_s": 60}, "retry": {"max_attempts": 1}}


def _settings(url: str):  # type: ignore[no-untyped-def]
    return make_settings(None, upstreams=[{"name": "up", "url": url, "api_keys": ["sk-shared"]}], auth=AUTH, **TOUCHY)


def _state(weir) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    lane = weir.app.router.lanes[0]
    now = trio.current_time()
    return lane.breaker.snapshot(now)["state"], lane.keys.snapshot(now)[0]["state"]


async def test_requests_weir_refuses_to_send_never_count_against_the_target() -> None:
    """Our own h11 client refusing a request line is the request's fault: a 400, no breaker verdict."""
    async with running_mock() as (mock, url), running_weir(_settings(url)) as weir:
        router = weir.app.router
        for target in ("/v1/models/x\x00y", "/v1/models/x\r\ny", "/v1/models/x y", "/v1/models/x\xffy"):
            req = UpstreamRequest(method="GET", path=target, query=b"", headers=[], body=b"")
            ctx = RequestContext(
                request_id="t", received=0.0, method="GET", path=target, ingress="anthropic", tenant="mallory", passthrough=False,
                model="", stream=False, priority="interactive", deadlines=Deadlines(total=trio.current_time() + 10, first_byte_s=10, idle_s=10),
            )
            with pytest.raises(ProxyError) as err:
                async with router.open(req, ctx):
                    pass
            assert err.value.status == 400
        snap = router.lanes[0].breaker.snapshot(trio.current_time())
        assert (snap["state"], snap["window_requests"], snap["consecutive_failures"]) == ("closed", 0, 0)
        assert router.lanes[0].keys.snapshot(trio.current_time())[0]["in_flight"] == 0
        assert list(mock.requests) == []


async def test_one_tenant_cannot_deny_service_to_another(autojump_clock: trio.abc.Clock) -> None:
    async with running_mock() as (mock, url), running_weir(_settings(url)) as weir:
        mallory = httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "k-mallory"}, timeout=30)
        alice = httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "k-alice"}, timeout=30)
        async with mallory, alice:
            # Targets our own HTTP client would refuse, over a raw socket.
            for target in (b"/v1/models/x%00y", b"/v1/models/x%0d%0ay", b"/v1/models/x%20y", b"/v1/models/x%ffy"):
                for _ in range(2):
                    req = b"GET " + target + b" HTTP/1.1\r\nhost: weir\r\nx-api-key: k-mallory\r\n\r\n"
                    status, _, _ = await raw_exchange(weir.url, req)
                    assert status == 400
            assert _state(weir) == ("closed", "ok")

            # 401s and 403s her requests earn: the key is probed, found good, and stays.
            for fault in ("403", "401", "403", "401"):
                r = await mallory.post("/v1/messages", content=body(), headers={"x-mock-fault": f"status={fault}"})
                assert r.status_code == int(fault)
            assert _state(weir) == ("closed", "ok")
            probes = [r for r in mock.requests if r.path == "/v1/models"]
            assert len(probes) == 1, "one probe per key per probe_interval_s, however many refusals"
            assert probes[0].header(b"x-api-key") == b"sk-shared" and probes[0].query == "limit=1"
            r = await alice.post("/v1/messages", content=body())
            assert r.status_code == 200, r.text

            # A 429 with no retry-after cools the shared key briefly, then longer if it repeats.
            r = await mallory.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=429"})
            assert r.status_code == 429
            cooling = weir.app.router.lanes[0].keys.snapshot(trio.current_time())[0]["cooling_for_s"]
            assert 0 < cooling <= 0.5
            await trio.sleep(0.5)
            r = await alice.post("/v1/messages", content=body())
            assert r.status_code == 200, r.text
            assert _state(weir) == ("closed", "ok")


async def test_a_revoked_key_is_confirmed_by_its_probe_and_the_next_key_answers() -> None:
    """The mock refuses the key "invalid" everywhere: the probe confirms it, the request moves to the good key."""
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "up", "url": url, "api_keys": ["invalid", "sk-good"]}], auth=AUTH, **TOUCHY)
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "k-alice"}, timeout=30) as c:
            statuses = [(await c.post("/v1/messages", content=body())).status_code for _ in range(3)]
            assert statuses == [200, 200, 200]
            keys = {k["id"].split(":")[0]: k["state"] for k in weir.app.router.lanes[0].keys.snapshot(trio.current_time())}
            assert keys == {"up#0": "disabled", "up#1": "ok"}
            assert weir.app.router.lanes[0].breaker.snapshot(trio.current_time())["state"] == "closed"
