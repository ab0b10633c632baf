"""Passthrough batches: Anthropic's own batch API behind Weir.

The decision and the results' line reader are unit-tested; the rest runs end
to end — the official SDK's ``client.messages.batches.*`` against a real Weir
server fronting the mock's Anthropic batch API.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest
import trio

from proxy.batches.passthrough import PassRoute, ResultLines, _with_models, passthrough_route
from proxy.router import Router
from proxy.settings import settings_from_dict
from proxy.upstream import Target, UpstreamRequest

from .harness import make_settings, running_mock, running_weir

CLIENT_KEYS = [{"tenant": "team-a", "key": "k-a"}, {"tenant": "team-b", "key": "k-b"}]
UPSTREAM_KEY = "sk-upstream-1"


# ------------------------------------------------------------- the decision


def _router(upstreams: list[dict[str, Any]], routes: list[dict[str, Any]]) -> Router:
    settings = settings_from_dict({"upstreams": upstreams, "routes": routes, "cache": {"l2": "none"}, "ledger": {"url": "off"}})
    return Router(settings, [Target(u, url=u.url, keys=[], deadlines=settings.deadlines) for u in settings.upstreams])


def test_a_batch_is_passthrough_only_when_every_model_starts_at_one_anthropic_target_that_runs_batches() -> None:
    router = _router(
        [
            {"name": "anth", "url": "http://a"},
            {"name": "anth-b", "url": "http://b"},
            {"name": "anth-weir", "url": "http://c", "batches": "weir"},
            {"name": "nim", "kind": "openai", "url": "http://d/v1"},
            {"name": "nim-named", "kind": "openai", "url": "http://e/v1"},
        ],
        [
            {"match": "*haiku*", "targets": ["anth:claude-haiku-4-5-20251001", "anth-b"]},
            {"match": "claude-b", "targets": ["anth-b"]},
            {"match": "claude-w", "targets": ["anth-weir"]},
            {"match": "llama*", "targets": ["nim"]},
            {"match": "*", "targets": ["anth", "nim"]},  # a fallback does not count: the first target holds the batch
        ],
    )
    assert passthrough_route(router, ["claude-sonnet-4-5", "claude-opus-4-1", "claude-sonnet-4-5"]) == PassRoute("anth", {"claude-sonnet-4-5": "", "claude-opus-4-1": ""})
    # The route's model override is what the target is sent.
    assert passthrough_route(router, ["claude-haiku-4-5", "claude-sonnet-4-5"]) == PassRoute("anth", {"claude-haiku-4-5": "claude-haiku-4-5-20251001", "claude-sonnet-4-5": ""})
    assert passthrough_route(router, ["claude-b"]) == PassRoute("anth-b", {"claude-b": ""})
    assert passthrough_route(router, ["claude-b", "claude-sonnet-4-5"]) is None  # two targets: Weir runs it
    assert passthrough_route(router, ["claude-w"]) is None  # batches = "weir" on an Anthropic target
    assert passthrough_route(router, ["llama-3.1-8b"]) is None  # an OpenAI-kind target has no batch API
    assert passthrough_route(router, ["claude-sonnet-4-5", "llama-3.1-8b"]) is None
    assert passthrough_route(router, []) is None
    # The create body as the target gets it: the client's bytes, unless a route renames a model.
    body = json.dumps({"requests": [{"custom_id": "h", "params": {"model": "claude-haiku-4-5", "x": 1}}, {"custom_id": "s", "params": {"model": "claude-sonnet-4-5"}}]}).encode()
    route = passthrough_route(router, ["claude-haiku-4-5", "claude-sonnet-4-5"])
    assert [r["params"] for r in json.loads(_with_models(body, route.models))["requests"]] == [{"model": "claude-haiku-4-5-20251001", "x": 1}, {"model": "claude-sonnet-4-5"}]
    assert _with_models(body, {"claude-sonnet-4-5": ""}) is body
    # Every later call is pinned to the batch's target: that target or nothing, never a failover.
    pinned = UpstreamRequest(method="GET", path="/v1/messages/batches/msgbatch_x", query=b"", headers=[], body=b"", target="anth-b")
    assert [lane.name for lane, _ in router.resolve_request(pinned)] == ["anth-b"]
    assert router.resolve_request(UpstreamRequest(method="GET", path="/v1/messages/batches/msgbatch_x", query=b"", headers=[], body=b"", target="gone")) == []


def test_an_openai_target_first_in_config_means_weir_runs_it_and_passthrough_can_be_asked_for() -> None:
    openai_first = _router([{"name": "nim", "kind": "openai", "url": "http://d/v1"}, {"name": "anth", "url": "http://a"}], [])
    assert passthrough_route(openai_first, ["claude-sonnet-4-5"]) is None
    explicit = _router([{"name": "anth", "url": "http://a", "batches": "passthrough"}], [])
    assert passthrough_route(explicit, ["claude-sonnet-4-5"]) == PassRoute("anth", {"claude-sonnet-4-5": ""})


# ------------------------------------------------------------ result lines


def test_result_lines_are_read_wherever_the_reads_cut_them() -> None:
    lines = [
        {"custom_id": "a", "result": {"type": "succeeded", "message": {"model": "m", "usage": {"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2}, "novel": [1]}}},
        {"custom_id": "b", "result": {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}}},
        {"custom_id": "c", "result": {"type": "canceled"}},
        {"custom_id": "d", "result": {"type": "succeeded", "message": {"model": "m", "usage": {"input_tokens": 1, "output_tokens": 9}}}},
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    for size in (1, 7, 64, len(data)):
        reader = ResultLines()
        found = [f for i in range(0, len(data), size) for f in reader.feed(data[i : i + size])] + reader.close()
        assert [(cid, u.input_tokens, u.output_tokens, u.cache_read_input_tokens) for cid, _, u in found] == [("a", 7, 3, 2), ("d", 1, 9, None)]
    # A last line without its newline still counts; a line past the limit is skipped, not held.
    reader = ResultLines(limit=200)
    big = json.dumps({"custom_id": "big", "result": {"type": "succeeded", "message": {"model": "m", "usage": {"input_tokens": 1, "output_tokens": 1}, "pad": "x" * 500}}}).encode()
    found = reader.feed(big[:300]) + reader.feed(big[300:] + b"\n" + data[:-1]) + reader.close()
    assert [cid for cid, _, _ in found] == ["a", "d"]


async def test_results_pass_through_read_by_read_and_are_metered_on_the_side() -> None:
    """Each upstream read goes on before the next is asked for: nothing waits for the whole file."""
    from proxy.batches.passthrough import _Metered
    from proxy.context import Served

    send, recv = trio.open_memory_channel[bytes](1)

    class Raw:
        status, headers, served = 200, [], Served()

        async def aiter(self) -> Any:
            async for chunk in recv:
                yield chunk

    seen: list[str] = []
    stream = _Metered(Raw(), lambda found: seen.extend(cid for cid, _, _ in found)).aiter()
    line = b'{"custom_id":"%s","result":{"type":"succeeded","message":{"model":"m","usage":{"input_tokens":1,"output_tokens":2}}}}\n'
    async with send:
        await send.send(line % b"a" + (line % b"b")[:10])
        assert await stream.__anext__() == line % b"a" + (line % b"b")[:10] and seen == ["a"]
        await send.send((line % b"b")[10:])
        assert await stream.__anext__() == (line % b"b")[10:] and seen == ["a", "b"]
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


# --------------------------------------------------------------- end to end


def _sections(tmp_path: Any, url: str) -> dict[str, Any]:
    return dict(
        server={"data_dir": str(tmp_path)},
        auth={"client_keys": CLIENT_KEYS, "admin_key": "adm"},
        ledger={"url": "", "flush_interval_ms": 20},
        upstreams=[{"name": "anthropic", "url": url, "api_keys": [UPSTREAM_KEY]}],
        retry={"max_attempts": 1},
    )


def _request(cid: str, **params: Any) -> dict[str, Any]:
    return {"custom_id": cid, "params": {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": f"say {cid}"}], **params}}


async def _ledger_rows(data_dir: Any, batch_id: str, count: int) -> list[dict[str, Any]]:
    """The ledger's rows for a batch, once the writer has flushed ``count`` of them (it flushes every 20 ms)."""
    import sqlite3

    def read() -> list[dict[str, Any]]:
        with sqlite3.connect(str(data_dir / "ledger.db")) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM ledger_requests WHERE batch_id = ?", (batch_id,))]

    with trio.fail_after(10):
        while len(await trio.to_thread.run_sync(read)) < count:
            await trio.sleep(0.05)
    await trio.sleep(0.1)  # a second read's rows, were any written, would be flushed by now
    return await trio.to_thread.run_sync(read)


async def _ended(client: anthropic.AsyncAnthropic, batch_id: str) -> Any:
    with trio.fail_after(10):
        while True:
            batch = await client.messages.batches.retrieve(batch_id)
            if batch.processing_status == "ended":
                return batch
            await trio.sleep(0.05)


async def test_sdk_batches_end_to_end_through_weir_to_anthropics_batch_api(tmp_path: Any) -> None:
    async with running_mock(batch_ms=150) as (mock, url):
        settings = make_settings(url, **_sections(tmp_path, url))
        async with running_weir(settings) as weir:
            a = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-a", max_retries=0)
            b = anthropic.AsyncAnthropic(base_url=weir.url, api_key="k-b", max_retries=0)
            # "bad" passes Weir's checks and is refused by the upstream's model: an errored result.
            bad = _request("bad", tools=[{"name": "x", "input_schema": {"type": "object"}}], tool_choice={"type": "tool", "name": "nope"})
            created = await a.messages.batches.create(requests=[_request("one"), _request("two"), bad])
            assert created.id.startswith("msgbatch_") and created.processing_status == "in_progress" and created.results_url is None
            assert created.request_counts.processing == 3
            (create_seen,) = [r for r in mock.requests if r.method == "POST" and r.path == "/v1/messages/batches"]
            assert [x["custom_id"] for x in json.loads(create_seen.body)["requests"]] == ["one", "two", "bad"]

            # Canceled through Weir; a list page asks the upstream about a batch still running.
            other = await a.messages.batches.create(requests=[_request("later")], extra_headers={"x-mock-batch-ms": "250"})
            canceling = await a.messages.batches.cancel(other.id)
            assert canceling.id == other.id and canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
            # An upstream error, in Anthropic's shape, as the upstream said it.
            with pytest.raises(anthropic.BadRequestError, match="still processing") as refused:
                await a.messages.batches.delete(other.id)
            assert refused.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": refused.value.body["error"]["message"]}}

            # Another tenant cannot see it, by any route.
            with pytest.raises(anthropic.NotFoundError):
                await b.messages.batches.retrieve(created.id)
            async with httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "k-b", "anthropic-version": "2023-06-01"}) as raw:
                for method, path in (("GET", ""), ("POST", "/cancel"), ("DELETE", ""), ("GET", "/results")):
                    r = await raw.request(method, f"/v1/messages/batches/{created.id}{path}")
                    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", (method, path)

            done = await _ended(a, created.id)
            assert done.id == created.id and done.results_url == f"{weir.url}/v1/messages/batches/{created.id}/results"
            assert (done.request_counts.succeeded, done.request_counts.errored) == (2, 1)
            before = len(mock.requests)
            results = {r.custom_id: r.result async for r in await a.messages.batches.results(created.id)}
            assert results["one"].type == "succeeded" and results["one"].message.usage.output_tokens > 0
            assert results["bad"].type == "errored" and results["bad"].error.error.type == "invalid_request_error"
            seen = [r.path for r in list(mock.requests)[before:]]
            assert seen[-1].endswith("/results") and created.id not in seen[-1]  # asked by Weir, under the upstream's id
            # Read twice: the ledger still has one row per succeeded request, carrying the batch id, at batch prices.
            again = [r.custom_id async for r in await a.messages.batches.results(created.id)]
            assert sorted(again) == ["bad", "one", "two"]
            rows = await _ledger_rows(tmp_path, created.id, 2)
            assert {r["request_id"] for r in rows} == {f"{created.id}:one", f"{created.id}:two"}
            one = next(r for r in rows if r["request_id"].endswith(":one"))
            assert one["tenant"] == "team-a" and one["target"] == "anthropic" and one["outcome"] == "served"
            assert one["input_tokens"] == results["one"].message.usage.input_tokens and one["output_tokens"] == results["one"].message.usage.output_tokens
            full = weir.app.ledger.prices.cost("claude-sonnet-4-5", one["input_tokens"], one["output_tokens"], 0, 0)[0]
            assert one["cost_micros"] == full // 2 > 0
            async with httpx.AsyncClient(base_url=weir.url, headers={"x-api-key": "adm"}) as admin:
                usage = (await admin.get("/admin/usage", params={"group_by": "batch", "batch_id": created.id})).json()["data"]
            assert usage[0]["batch"] == created.id and usage[0]["requests"] == 2 and usage[0]["output_tokens"] == sum(r["output_tokens"] for r in rows)
            # Weir, never the client, spoke to the mock: every request carries the upstream key, none a client key.
            assert {(r.header(b"x-api-key"), r.header(b"authorization")) for r in mock.requests} == {(UPSTREAM_KEY.encode(), None)}

            with trio.fail_after(10):
                while (page := [x async for x in a.messages.batches.list()])[0].processing_status != "ended":
                    await trio.sleep(0.05)
            assert [x.id for x in page] == [other.id, created.id] and page[0].request_counts.canceled == 1
            assert page[0].results_url == f"{weir.url}/v1/messages/batches/{other.id}/results"
            assert [x.id async for x in b.messages.batches.list()] == []
            assert (await a.messages.batches.delete(created.id)).id == created.id
            with pytest.raises(anthropic.NotFoundError):
                await a.messages.batches.retrieve(created.id)


async def test_with_no_client_keys_the_clients_own_key_reaches_anthropic_and_a_failed_create_leaves_no_batch(tmp_path: Any) -> None:
    async with running_mock(batch_ms=0) as (mock, url):
        sections = _sections(tmp_path, url)
        del sections["auth"]
        sections["upstreams"] = [{"name": "anthropic", "url": url}]  # no keys of its own: passthrough auth
        async with running_weir(make_settings(url, **sections)) as weir:
            mine = anthropic.AsyncAnthropic(base_url=weir.url, api_key="sk-ant-mine", max_retries=0)
            theirs = anthropic.AsyncAnthropic(base_url=weir.url, api_key="sk-ant-theirs", max_retries=0)
            with pytest.raises(anthropic.InternalServerError) as failed:
                await mine.messages.batches.create(requests=[_request("x")], extra_headers={"x-mock-fault": "status=529"})
            assert failed.value.status_code == 529 and failed.value.body["error"]["type"] == "overloaded_error"
            assert [x async for x in mine.messages.batches.list()] == []
            created = await mine.messages.batches.create(requests=[_request("x")])
            assert [r.result.type async for r in await mine.messages.batches.results(created.id)] == ["succeeded"]
            # This SDK sends its key as a bearer token; it goes upstream as sent.
            assert {r.header(b"authorization") or r.header(b"x-api-key") for r in mock.requests} == {b"Bearer sk-ant-mine"}
            with pytest.raises(anthropic.NotFoundError):  # another key is another tenant
                await theirs.messages.batches.retrieve(created.id)
