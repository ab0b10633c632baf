"""Message Batches run by Weir, end to end: the official SDK's
``client.messages.batches.*`` through a real Weir server, against the mock's
OpenAI endpoint (an OpenAI-kind target: no batch API of its own), with the
items' results, the ledger's rows and the usage per batch read back."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import msgspec
import pytest
import trio

from tests.harness import make_settings, running_mock, running_weir

ADMIN = {"x-api-key": "adm"}
AUTH = {"admin_key": "adm", "client_keys": [{"tenant": "team-a", "key": "k-a"}, {"tenant": "team-b", "key": "k-b"}]}


def sections(tmp_path: Any, mock_url: str, ledger: dict[str, Any] | None = None, **batches: Any) -> dict[str, Any]:
    return dict(
        server={"data_dir": str(tmp_path)},
        auth=AUTH,
        upstreams=[{"name": "oai", "kind": "openai", "url": mock_url + "/v1", "model": "mock-model"}],
        ledger={"url": "", "flush_interval_ms": 20, **(ledger or {})},
        retry={"max_attempts": 1},
        batches={"poll_s": 0.05, "sweep_s": 0.05, **batches},
    )


def item(custom_id: str, text: str = "hello", **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": text}], **params}}


async def ended(client: anthropic.AsyncAnthropic, batch_id: str, timeout: float = 20.0) -> Any:
    with trio.fail_after(timeout):
        while True:
            b = await client.messages.batches.retrieve(batch_id)
            if b.processing_status == "ended":
                return b
            await trio.sleep(0.05)


async def test_the_sdk_runs_a_batch_against_an_openai_target(tmp_path):
    # A tool choice naming no tool: the mock's chat endpoint answers 400, so that item errors.
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    bad = item("d-bad", tools=tools, tool_choice={"type": "tool", "name": "nope"})
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(None, **sections(tmp_path, url))) as weir:
            a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
            b_client = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-b", max_retries=0)
            requests = [item("a-same", "same", temperature=0), item("b-same", "same", temperature=0), item("c-other", "other"), bad]
            batch = await a.messages.batches.create(requests=requests)
            assert batch.id.startswith("msgbatch_") and batch.processing_status == "in_progress"
            assert batch.request_counts.processing == 4 and batch.results_url is None
            assert (batch.expires_at - batch.created_at).total_seconds() == pytest.approx(86400)

            done = await ended(a, batch.id)
            counts = done.request_counts
            assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (0, 3, 1, 0, 0)
            assert done.ended_at is not None and done.results_url == f"{weir.url}/v1/messages/batches/{batch.id}/results"

            results = {r.custom_id: r.result async for r in await a.messages.batches.results(batch.id)}
            assert sorted(results) == ["a-same", "b-same", "c-other", "d-bad"]
            assert results["a-same"].type == "succeeded" and results["a-same"].message.content[0].text
            assert results["a-same"].message.content == results["b-same"].message.content  # one upstream call answered both
            assert results["c-other"].type == "succeeded" and results["c-other"].message.usage.output_tokens > 0
            assert results["d-bad"].type == "errored" and results["d-bad"].error.error.type == "invalid_request_error"
            # Three upstream calls for four items: the identical deterministic pair went once.
            assert len(mock.requests) == 3 and all(r.path == "/v1/chat/completions" for r in mock.requests)
            assert all(r.header(b"x-weir-priority") is None for r in mock.requests)  # Weir's own header never goes upstream

            # Another tenant sees nothing of it.
            with pytest.raises(anthropic.NotFoundError):
                await b_client.messages.batches.retrieve(batch.id)
            assert [x.id async for x in b_client.messages.batches.list()] == []

            second = await a.messages.batches.create(requests=[item("only")])
            await ended(a, second.id)
            listed = [x.id async for x in a.messages.batches.list(limit=1)]  # the SDK pages with after_id
            assert listed == [second.id, batch.id]

            async with httpx.AsyncClient(base_url=weir.url) as c:
                # Each item is a ledger row carrying its batch; usage per batch from those rows.
                with trio.fail_after(10):
                    while True:
                        usage = (await c.get("/admin/usage", params={"group_by": "batch", "batch_id": batch.id}, headers=ADMIN)).json()["data"]
                        if usage and usage[0]["requests"] >= 4:
                            break
                        await trio.sleep(0.05)
                assert usage[0]["batch"] == batch.id and usage[0]["requests"] == 4 and usage[0]["errors"] == 1
                rows = (await c.get("/admin/requests", params={"batch_id": batch.id}, headers=ADMIN)).json()["data"]
                assert sorted(r["cache"] for r in rows if r["status"] == 200) in (["coalesced", "miss", "miss"], ["hit", "miss", "miss"], ["bypass", "coalesced", "miss"], ["bypass", "hit", "miss"])
                assert {r["tenant"] for r in rows} == {"team-a"} and {r["client"] for r in rows} == {"weir-batch"}
                # Every upstream call waited in the target's fair queue at batch priority, below interactive traffic.
                metrics = (await c.get("/metrics", headers=ADMIN)).text
                waits = [line for line in metrics.splitlines() if line.startswith("weir_queue_wait_seconds_count") and 'priority="batch"' in line]
                assert len(waits) == 1 and float(waits[0].split()[-1]) == 4.0, waits  # 3 calls for the first batch, 1 for the second

            deleted = await a.messages.batches.delete(batch.id)
            assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
            with pytest.raises(anthropic.NotFoundError):
                await a.messages.batches.retrieve(batch.id)


def refused(r: httpx.Response, status: int, type_: str, words: str) -> None:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == type_ and words in doc["error"]["message"], doc


async def test_bad_input_is_refused_in_anthropics_shape(tmp_path):
    async with running_mock(latency_ms=800) as (mock, url):
        async with running_weir(make_settings(None, **sections(tmp_path, url, max_requests=3))) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "k-a"}) as c:
                root = "/v1/messages/batches"
                refused(await c.post(root, json={"requests": [item("x"), item("x")]}), 400, "invalid_request_error", "requests.1.custom_id")
                refused(await c.post(root, json={"requests": [item("has space")]}), 400, "invalid_request_error", "requests.0.custom_id")
                refused(await c.post(root, json={"requests": [item("a" * 65)]}), 400, "invalid_request_error", "custom_id")
                refused(await c.post(root, json={"requests": [item(f"i{n}") for n in range(4)]}), 400, "invalid_request_error", "limit is 3")
                no_max = {"custom_id": "m", "params": {"model": "x", "messages": [{"role": "user", "content": "hi"}]}}
                refused(await c.post(root, json={"requests": [item("ok"), no_max]}), 400, "invalid_request_error", "requests.1")
                refused(await c.post(root, json={"requests": [item("s", stream=True)]}), 400, "invalid_request_error", "stream")
                refused(await c.post(root, json={"requests": []}), 400, "invalid_request_error", "requests")
                refused(await c.post(root, content=b"{not json"), 400, "invalid_request_error", "JSON")
                refused(await c.get(root, params={"limit": "0"}), 400, "invalid_request_error", "limit")
                refused(await c.get(root, params={"limit": "1001"}), 400, "invalid_request_error", "limit")
                refused(await c.get(f"{root}/msgbatch_unknown"), 404, "not_found_error", "msgbatch_unknown")
                refused(await c.post(f"{root}/msgbatch_unknown/cancel"), 404, "not_found_error", "msgbatch_unknown")
                refused(await c.get(f"{root}/msgbatch_unknown/results"), 404, "not_found_error", "msgbatch_unknown")
                refused(await c.delete(f"{root}/msgbatch_unknown"), 404, "not_found_error", "msgbatch_unknown")
                refused(await c.get(f"{root}/msgbatch_unknown/nothing"), 404, "not_found_error", "Not found")
                refused(await c.put(root, json={}), 405, "invalid_request_error", "not allowed")
                # A batch still running: no results yet, and no deleting it.
                made = await c.post(root, json={"requests": [item("slow")]})
                assert made.status_code == 200 and made.headers["content-type"] == "application/json"
                bid = made.json()["id"]
                refused(await c.get(f"{root}/{bid}/results"), 400, "invalid_request_error", "has not ended")
                refused(await c.delete(f"{root}/{bid}"), 400, "invalid_request_error", "cancel it")
                # Another tenant's id is unknown to this one.
                refused(await c.get(f"{root}/{bid}", headers={"x-api-key": "k-b"}), 404, "not_found_error", bid)
                # results_url follows the Host the client used, or the configured public URL.
                r = await c.post(f"{root}/{bid}/cancel", headers={"host": "weir.example:8443"})
                assert r.status_code == 200 and r.json()["processing_status"] in ("canceling", "ended")
    assert len(mock.requests) <= 1  # only the one valid item ever went upstream


async def test_cancel_mid_run_ends_the_batch_with_the_rest_canceled(tmp_path):
    async with running_mock(latency_ms=100) as (mock, url):
        async with running_weir(make_settings(None, **sections(tmp_path, url, concurrency=2, public_url="https://weir.example/"))) as weir:
            a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
            batch = await a.messages.batches.create(requests=[item(f"i{n}", f"question {n}") for n in range(20)])
            with trio.fail_after(10):
                while len(mock.requests) < 3:
                    await trio.sleep(0.01)
            canceling = await a.messages.batches.cancel(batch.id)
            assert canceling.processing_status in ("canceling", "ended") and canceling.cancel_initiated_at is not None
            done = await ended(a, batch.id)
            c = done.request_counts
            assert c.succeeded >= 2 and c.canceled >= 10 and c.succeeded + c.canceled == 20 and c.errored == c.expired == 0
            assert done.results_url == f"https://weir.example/v1/messages/batches/{batch.id}/results"
            async with httpx.AsyncClient() as h:  # the configured public URL names no real host: fetch the path from Weir
                r = await h.get(f"{weir.url}/v1/messages/batches/{batch.id}/results", headers={"x-api-key": "k-a"})
            assert r.status_code == 200 and r.headers["content-type"] == "application/binary"
            got = [msgspec.json.decode(line) for line in r.content.splitlines()]
            assert [g["custom_id"] for g in got] == [f"i{n}" for n in range(20)]
            assert sum(g["result"]["type"] == "canceled" for g in got) == c.canceled
    assert len(mock.requests) == c.succeeded  # canceled items never went upstream


async def test_a_short_expiry_expires_what_is_left(tmp_path):
    async with running_mock(latency_ms=150) as (mock, url):
        async with running_weir(make_settings(None, **sections(tmp_path, url, concurrency=1, expiry_s=0.5))) as weir:
            a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
            batch = await a.messages.batches.create(requests=[item(f"i{n}", f"q {n}") for n in range(10)])
            done = await ended(a, batch.id)
            c = done.request_counts
            assert c.expired >= 5 and c.succeeded + c.expired == 10 and c.canceled == c.errored == 0
            kinds = [r.result.type async for r in await a.messages.batches.results(batch.id)]
            assert kinds.count("expired") == c.expired and kinds.count("succeeded") == c.succeeded


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_two_workers_share_one_batch(backend, request, tmp_path):
    """Two Weir apps on one database (as two ``--workers`` or two hosts): both
    claim items of a batch created on one of them; every item ends once."""
    ledger: dict[str, Any] = {}
    if backend == "postgresql":
        ledger = {"url": request.getfixturevalue("database_url"), "pg_schema": request.getfixturevalue("pg_schema")}
    async with running_mock(latency_ms=40) as (mock, url):
        one = make_settings(None, **sections(tmp_path / "one", url, ledger, concurrency=4))
        two = make_settings(None, **sections(tmp_path / "one" if backend == "sqlite" else tmp_path / "two", url, ledger, concurrency=4))
        async with running_weir(one) as w1, running_weir(two) as w2:
            a = anthropic.AsyncAnthropic(base_url=w1.url, api_key="k-a", max_retries=0)
            batch = await a.messages.batches.create(requests=[item(f"i{n}", f"q {n}") for n in range(40)])
            done = await ended(a, batch.id, timeout=30)
            assert done.request_counts.succeeded == 40
            r1, r2 = w1.app.batches.runner, w2.app.batches.runner  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=w2.url) as c:
                stats = (await c.get("/admin/stats", headers=ADMIN)).json()["batches"]
            assert stats["succeeded"] == r2.succeeded and stats["concurrency"] == 4 and stats["in_flight"] == 0
            assert r1.succeeded > 0 and r2.succeeded > 0 and r1.succeeded + r2.succeeded == 40
            ids = [r.custom_id async for r in await a.messages.batches.results(batch.id)]
            assert sorted(ids) == sorted(f"i{n}" for n in range(40))
    assert len(mock.requests) == 40 + r1.duplicates + r2.duplicates and r1.duplicates + r2.duplicates == 0


async def test_weir_starts_while_the_batch_database_is_away(database_url, pg_schema, tmp_path):
    """As the ledger does: the batch API answers 503 until the database is back,
    then batches run (the store's migration is retried in the background)."""
    from urllib.parse import urlsplit

    from tests.tcpproxy import running_tcp_proxy
    from tests.test_ledger_writer import _via

    parts = urlsplit(database_url)
    async with running_tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as tcp, running_mock() as (mock, url):
        tcp.cut()
        ledger = {"url": _via(database_url, tcp.listen_port), "pg_schema": pg_schema}
        async with running_weir(make_settings(None, **sections(tmp_path, url, ledger))) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "k-a"}) as c:
                assert (await c.get("/ready")).status_code == 200
                refused(await c.post("/v1/messages/batches", json={"requests": [item("x")]}), 503, "api_error", "unavailable")
                tcp.restore()
                # The store's set-up is retried with backoff (1 s doubling, each try
                # bounded by the connect timeout): on a loaded machine the first try
                # after the restore can be ~30 s away.
                with trio.fail_after(60):
                    while (r := await c.post("/v1/messages/batches", json={"requests": [item("x")]})).status_code == 503:
                        await trio.sleep(0.1)
                assert r.status_code == 200
                a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
                assert (await ended(a, r.json()["id"])).request_counts.succeeded == 1


async def test_a_small_batch_is_not_stuck_behind_another_tenants_big_one(tmp_path):
    """Claims go round-robin across tenants: a 3-item batch created after a
    60-item one of another tenant ends long before it."""
    async with running_mock(latency_ms=20) as (mock, url):
        async with running_weir(make_settings(None, **sections(tmp_path, url, concurrency=2, claim_size=2))) as weir:
            a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
            b = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-b", max_retries=0)
            big = await a.messages.batches.create(requests=[item(f"a{n}", f"a {n}") for n in range(60)])
            small = await b.messages.batches.create(requests=[item(f"b{n}", f"b {n}") for n in range(3)])
            await ended(b, small.id)
            done_a = sum(1 for r in mock.requests if b'"a ' in r.body)
            assert done_a <= 15, done_a  # two slots shared by two tenants: a handful of a's, not all 60 first
            assert (await ended(a, big.id)).request_counts.succeeded == 60


async def test_batch_items_show_in_prometheus_metrics(tmp_path):
    """/metrics counts this worker's batch items by result and by retry
    reason: every distinct request is answered 429 once, so each item is
    released once (its first backoff is 1 s) before its result."""
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    bad = item("bad", tools=tools, tool_choice={"type": "tool", "name": "nope"})  # the mock's chat endpoint answers 400
    async with running_mock(fault="status=429,fail_first=1") as (mock, url):
        async with running_weir(make_settings(None, **sections(tmp_path, url))) as weir:
            a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
            batch = await a.messages.batches.create(requests=[item("good"), bad])
            counts = (await ended(a, batch.id)).request_counts
            assert (counts.succeeded, counts.errored) == (1, 1)
            async with httpx.AsyncClient(base_url=weir.url) as c:
                text = (await c.get("/metrics", headers=ADMIN)).text
    found = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("weir_batch_") and "_created" not in line}
    assert found == {
        'weir_batch_items_total{result="succeeded"}': 1.0,
        'weir_batch_items_total{result="errored"}': 1.0,
        'weir_batch_retries_total{reason="429"}': 2.0,
        "weir_batch_items_running": 0.0,
    }, found
