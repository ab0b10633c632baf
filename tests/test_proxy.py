"""The core proxy, end to end: real Hypercorn, real clients, the mock upstream on a socket.

Each test reads as: a client sends X, the upstream sees Y, the client gets Z.
"""

from __future__ import annotations

import anthropic
import httpx
import msgspec
import pytest
import trio
import trio.testing

from proxy.sse import SSEParser

from .harness import CLAUDE_CODE_BETA, anthropic_sdk_round_trip, body, claude_code_body, closed_port, make_settings, read_head, running_mock, running_weir, weir_and_mock

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}



def is_anthropic_error(resp: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert doc["type"] == "error"
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    if type_ is not None:
        assert doc["error"]["type"] == type_, doc
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    return doc


# --------------------------------------------------------------- SDK clients


async def test_anthropic_sdk_create_and_stream() -> None:
    async with weir_and_mock() as (weir, mock):
        client = anthropic.AsyncAnthropic(base_url=weir.url, api_key="sk-client", max_retries=0)
        await anthropic_sdk_round_trip(client)

        # The raw event iterator sees the same sequence the upstream sent.
        events = []
        async with await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True
        ) as raw:
            async for ev in raw:
                events.append(ev.type)
        assert events[0] == "message_start" and events[-1] == "message_stop"
        assert mock.calls == 4


async def test_sdk_errors_map_to_sdk_exceptions() -> None:
    async with weir_and_mock() as (weir, _):
        client = anthropic.AsyncAnthropic(base_url=weir.url, api_key="sk-client", max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-mock-fault": "status=429;retry_after=7"},
            )
        assert info.value.response.headers["retry-after"] == "7"
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])


# --------------------------------------------------------- byte-for-byte


async def test_claude_code_request_arrives_byte_identical() -> None:
    sent = claude_code_body(stream=True)
    headers = {
        **KEY,
        "anthropic-beta": CLAUDE_CODE_BETA,
        "anthropic-dangerous-direct-browser-access": "true",
        "x-stainless-lang": "js",
        "user-agent": "claude-cli/2.0.0 (external, cli)",
        "connection": "keep-alive",
        "x-weir-cache": "off",
        "content-type": "application/json",
    }
    async with weir_and_mock() as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            r = await c.post("/v1/messages?beta=true", content=sent, headers=headers)
        assert r.status_code == 200
        seen = mock.requests[-1]
        assert seen.body == sent
        assert seen.path == "/v1/messages" and seen.query == "beta=true"
        got = {k.decode(): v.decode() for k, v in seen.headers}
        assert got["anthropic-beta"] == CLAUDE_CODE_BETA
        assert got["anthropic-version"] == "2023-06-01"
        assert got["anthropic-dangerous-direct-browser-access"] == "true"
        assert got["x-stainless-lang"] == "js"
        assert got["user-agent"].startswith("claude-cli/")
        assert got["x-api-key"] == "sk-client"  # passthrough mode: the client's own key
        assert "x-weir-cache" not in got  # Weir's controls stay with Weir
        assert got.get("connection", "keep-alive") == "keep-alive"  # hop-by-hop: ours, not the client's


async def test_response_headers_and_sse_pass_through_untouched() -> None:
    async with running_mock() as (mock, url):
        async with httpx.AsyncClient() as c:
            direct = await c.post(url + "/v1/messages", content=body(stream=True), headers={**KEY, "x-mock-fault": "unknown_event"})
        async with running_weir(make_settings(url)) as weir:
            async with httpx.AsyncClient(base_url=weir.url) as c:
                via = await c.post("/v1/messages", content=body(stream=True), headers={**KEY, "x-mock-fault": "unknown_event"})
    assert via.content == direct.content  # the same bytes, unknown events included
    assert b"event: future_event" in via.content or b"future" in via.content
    for name in ("request-id", "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-tokens-limit"):
        assert via.headers[name] == direct.headers[name]
    assert via.headers["x-request-id"].startswith("req_weir_")
    assert float(via.headers["x-weir-overhead-ms"]) >= 0
    assert via.headers["content-type"].startswith("text/event-stream")


async def test_mid_stream_upstream_error_event_is_forwarded() -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            r = await c.post("/v1/messages", content=body(stream=True), headers={**KEY, "x-mock-fault": "error_event_after=3"})
    events = SSEParser().feed(r.content)
    assert events[-1].event == "error"
    assert msgspec.json.decode(events[-1].data)["error"]["type"] == "overloaded_error"


async def test_request_id_is_propagated_when_given() -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            r = await c.post("/v1/messages", content=body(), headers={**KEY, "x-request-id": "trace-abc_123"})
            bad = await c.post("/v1/messages", content=body(), headers={**KEY, "x-request-id": "no spaces allowed"})
    assert r.headers["x-request-id"] == "trace-abc_123"
    assert bad.headers["x-request-id"].startswith("req_weir_")


async def test_models_and_count_tokens() -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            models = await c.get("/v1/models")
            assert models.status_code == 200 and models.json()["data"]
            one = models.json()["data"][0]["id"]
            assert (await c.get(f"/v1/models/{one}")).json()["id"] == one
            # The upstream's 404 (the mock serves every id, so it is asked to fail) reaches the client as is.
            is_anthropic_error(await c.get("/v1/models/no-such-model", headers={"x-mock-fault": "status=404"}), 404, "not_found_error")
            count = await c.post("/v1/messages/count_tokens", content=msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            assert count.status_code == 200 and count.json()["input_tokens"] > 0
            is_anthropic_error(await c.post("/v1/messages/count_tokens", content=b'{"messages": []}'), 400, "invalid_request_error")


# ------------------------------------------------------------ bad input

BAD_BODIES = [
    (b"", "empty"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "top-level array"),
    (b'"just a string"', "top-level string"),
    (b'{"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}', "no model"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "no max_tokens"),
    (b'{"model": "m", "max_tokens": 10}', "no messages"),
    (b'{"model": 5, "max_tokens": 10, "messages": []}', "model not a string"),
    (b'{"model": "m", "max_tokens": "10", "messages": []}', "max_tokens a string"),
    (b'{"model": "m", "max_tokens": 10, "messages": {}}', "messages an object"),
    (b'{"model": "m", "max_tokens": 10, "messages": []}', "no message"),
    (b'{"model": "m", "max_tokens": 10, "messages": ["hi"]}', "message not an object"),
    (b'{"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}', "max_tokens zero"),
    (b'{"model": "", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "empty model"),
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream a string"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"model": "m\x80", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "invalid UTF-8 inside a string"),
]


async def test_bad_input_gets_a_clear_4xx_and_never_reaches_upstream() -> None:
    async with weir_and_mock(server={"max_body_bytes": 4096}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            for raw, why in BAD_BODIES:
                r = await c.post("/v1/messages", content=raw)
                doc = is_anthropic_error(r, 400, "invalid_request_error")
                assert "Traceback" not in doc["error"]["message"], why
            is_anthropic_error(await c.post("/v1/messages", content=body(pad="x" * 5000)), 413, "request_too_large")
            # No content-length up front (chunked): the limit holds while reading.

            async def chunks():
                for _ in range(10):
                    yield b"x" * 1000

            is_anthropic_error(await c.post("/v1/messages", content=chunks()), 413, "request_too_large")
            # (An unknown /v1/ path is no bad input: it is forwarded, see tests/test_forwarding.py.)
            r = await c.get("/v1/messages")
            is_anthropic_error(r, 405)
            assert r.headers["allow"] == "POST"
            is_anthropic_error(await c.delete("/v1/messages/count_tokens"), 405)
            is_anthropic_error(await c.get("/not-an-api-path"), 404, "not_found_error")
        async with httpx.AsyncClient(base_url=weir.url) as c:
            is_anthropic_error(await c.post("/v1/messages", content=body()), 401, "authentication_error")
        assert mock.calls == 0


# ------------------------------------------------------- upstream failures


@pytest.mark.parametrize(
    ("fault", "status", "type_"),
    [
        ("status=429;retry_after=3", 429, "rate_limit_error"),
        ("status=500", 500, "api_error"),
        ("status=529", 529, "overloaded_error"),
        ("status=401", 401, "authentication_error"),
    ],
)
async def test_upstream_errors_pass_through_in_anthropic_shape(fault: str, status: int, type_: str) -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": fault})
    is_anthropic_error(r, status, type_)
    if status == 429:
        assert r.headers["retry-after"] == "3"


async def _html_upstream(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An upstream behind a misbehaving load balancer: HTML error pages."""

    async def handler(stream: trio.SocketStream) -> None:
        if await read_head(stream) is None:
            return
        page = b"<html><body>502 Bad Gateway</body></html>"
        await stream.send_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(page), page))
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_non_anthropic_upstream_error_is_wrapped() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_html_upstream)
        async with running_weir(make_settings(f"http://127.0.0.1:{port}")) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                r = await c.post("/v1/messages", content=body())
        nursery.cancel_scope.cancel()
    doc = is_anthropic_error(r, 502, "api_error")
    assert "502" in doc["error"]["message"]


async def test_connection_refused_is_502() -> None:
    async with running_weir(make_settings(f"http://127.0.0.1:{closed_port()}")) as weir:
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body())
    is_anthropic_error(r, 502, "api_error")


async def test_upstream_reset_mid_stream_ends_with_error_event() -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "reset_after=4"})
    assert r.status_code == 200
    events = SSEParser().feed(r.content)
    assert [e.event for e in events[:2]] == ["message_start", "content_block_start"]
    assert events[-1].event == "error"
    assert msgspec.json.decode(events[-1].data)["type"] == "error"


async def test_upstream_reset_mid_body_truncates_the_client_connection() -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "reset_after=1"})


# ---------------------------------------------------------------- deadlines


async def test_first_byte_deadline_gives_504(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock(deadlines={"first_byte_s": 30}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
            start = trio.current_time()
            r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "hang"})
            elapsed = trio.current_time() - start
    doc = is_anthropic_error(r, 504, "timeout_error")
    assert "deadline" in doc["error"]["message"]
    assert 30 <= elapsed < 31
    assert mock.disconnects == 1  # the upstream call was abandoned, not left hanging


async def test_total_deadline_mid_stream_sends_error_event(autojump_clock: trio.testing.MockClock) -> None:
    # 16 events 1 s apart: the 10 s total deadline falls mid-stream.
    async with weir_and_mock(deadlines={"total_s": 10, "idle_s": 5}) as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
            r = await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "slow=1000"})
    events = SSEParser().feed(r.content)
    assert events[0].event == "message_start"
    assert events[-1].event == "error"
    assert msgspec.json.decode(events[-1].data)["error"]["type"] == "timeout_error"
    assert "message_stop" not in [e.event for e in events]


async def test_idle_deadline_cuts_a_stalled_stream(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock(deadlines={"idle_s": 20}) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
            start = trio.current_time()
            r = await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "hang_after=3"})
            assert 20 <= trio.current_time() - start < 21
        await mock.wait_disconnect(1)
    events = SSEParser().feed(r.content)
    assert len(events) == 4 and events[-1].event == "error"


# ---------------------------------------------------------------- disconnect


async def test_client_hangup_cancels_the_upstream_call(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock() as (weir, mock):
        for fault in ("hang", "hang_after=2"):
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
                with trio.move_on_after(5):
                    await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": fault})
            # The client's connection is closed now; the upstream must see Weir hang up.
            before = mock.disconnects
            with trio.fail_after(1):
                await mock.wait_disconnect(before + 1 if mock.disconnects == before else before)
        assert mock.disconnects == 2
        await trio.sleep(1)
        assert weir.app.in_flight == 0
        assert weir.app.router.lanes[0].scheduler.stats().in_flight == 0


# ------------------------------------------------------- connection budget


async def test_in_flight_is_capped_at_the_connection_budget(autojump_clock: trio.testing.MockClock) -> None:
    # Five hanging requests on a budget of two: two reach the upstream, three
    # wait in front of httpx (never inside it), and all five get their 504.
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "max_connections": 2}], deadlines={"first_byte_s": 30})
        async with running_weir(settings) as weir:
            results: list[int] = []

            async def one(c: httpx.AsyncClient) -> None:
                r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "hang"})
                results.append(r.status_code)

            async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None, limits=httpx.Limits(max_connections=10)) as c:
                async with trio.open_nursery() as n:
                    for _ in range(5):
                        n.start_soon(one, c)
                    await trio.sleep(1)
                    assert mock.calls == 2
                    assert weir.app.targets[0].pool.opened == 2  # never more connections than the budget
    assert results == [504] * 5
    assert mock.calls == 2


# ------------------------------------------------------------------ auth


async def test_client_keys_map_to_tenants_and_upstream_key_is_ours() -> None:
    auth = {"client_keys": [{"tenant": "team-a", "key": "weir-key-a"}]}
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["sk-upstream"]}], auth=auth)
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url) as c:
                ok = await c.post("/v1/messages", content=body(), headers={"authorization": "Bearer weir-key-a"})
                bad = await c.post("/v1/messages", content=body(), headers={"x-api-key": "weir-key-b"})
                none = await c.post("/v1/messages", content=body())
    assert ok.status_code == 200
    got = dict(mock.requests[-1].headers)
    assert got[b"x-api-key"] == b"sk-upstream"
    assert b"authorization" not in got
    is_anthropic_error(bad, 401, "authentication_error")
    is_anthropic_error(none, 401, "authentication_error")
    assert mock.calls == 1


# ------------------------------------------------------------------ health


async def test_health_and_ready() -> None:
    async with weir_and_mock() as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/ready")).json()["status"] == "ready"
            weir.app.draining = True
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "draining"
            refused = await c.post("/v1/messages", content=body(), headers=KEY)
            is_anthropic_error(refused, 503, "overloaded_error")


async def test_a_bug_is_answered_in_anthropic_shape_with_the_request_id(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async with weir_and_mock() as (weir, mock):

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(weir.app.router, "open", broken)
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body())
            ok = await c.get("/health")  # the worker lives on
    doc = is_anthropic_error(r, 500, "api_error")
    assert r.headers["x-request-id"] in doc["error"]["message"]
    assert "Traceback" not in r.text and "simulated bug" not in r.text
    assert ok.status_code == 200
    assert any("simulated bug" in (rec.exc_text or str(rec.exc_info)) for rec in caplog.records if rec.exc_info)


async def test_access_log_tells_a_completed_exchange_from_a_hang_up(autojump_clock: trio.testing.MockClock) -> None:
    import io

    from proxy.logs import AccessLog

    lines = io.StringIO()
    async with weir_and_mock() as (weir, mock):
        weir.app.access, weir.app._access_on = AccessLog(lines), True
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
            assert (await c.post("/v1/messages", content=body())).status_code == 200
            assert (await c.post("/v1/messages", content=body(stream=True))).status_code == 200
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY, timeout=None) as c:
            with trio.move_on_after(5):
                await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "hang_after=2"})
        with trio.fail_after(1):
            await mock.wait_disconnect(1)
        await trio.testing.wait_all_tasks_blocked()
    records = [msgspec.json.decode(line) for line in lines.getvalue().splitlines()]
    assert [(r["status"], r["outcome"]) for r in records] == [(200, "ok"), (200, "ok"), (200, "client_closed")]
    assert all(r["request_id"].startswith("req_weir_") and r["logger"] == "weir.access" for r in records)


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ({}, "set auth.admin_key_env to the name of an environment variable"),
        ({"admin_key_env": "WEIR_TEST_UNSET_ADMIN_KEY"}, "auth.admin_key_env names WEIR_TEST_UNSET_ADMIN_KEY, which is not set"),
    ],
)
async def test_a_disabled_admin_api_names_the_setting_readme_documents(auth: dict, says: str) -> None:
    async with weir_and_mock(auth=auth) as (weir, _):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            r = await client.get("/admin/stats")
    assert r.status_code == 404 and says in r.json()["error"]["message"]
