"""What Weir records about each request, and the response facts that go with it.

Every /v1 request ends in one ``Outcome`` (``proxy/context.py``), emitted by
``Weir.finished``: the access-log line is built from it, and the
``Weir.on_finished`` hooks (ledger, metrics) receive it. These tests send a
request and read both the response and the record.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import msgspec
import trio
import trio.testing

from proxy.context import Outcome
from proxy.logs import AccessLog

from .harness import body, make_settings, running_mock, running_weir, weir_and_mock

KEY = {"x-api-key": "sk-client"}
AUTH = {"client_keys": [{"tenant": "t", "key": "sk-client"}]}


def _recording(weir) -> tuple[io.StringIO, list[Outcome]]:  # type: ignore[no-untyped-def]
    lines = io.StringIO()
    weir.app.access, weir.app._access_on = AccessLog(lines), True
    seen: list[Outcome] = []
    weir.app.on_finished.append(seen.append)
    return lines, seen


def _records(lines: io.StringIO) -> list[dict]:
    return [msgspec.json.decode(line) for line in lines.getvalue().splitlines()]


async def test_one_outcome_per_request_with_who_answered_and_when() -> None:
    settings = make_settings(None, upstreams=[{"name": "p", "url": "http://127.0.0.1:1", "api_keys": ["k-one"]}], auth=AUTH)
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "p", "url": url, "api_keys": ["k-one"]}], auth=AUTH)
        async with running_weir(settings) as weir:
            lines, seen = _recording(weir)
            weir.app.meter_usage = True
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                r = await c.post("/v1/messages", content=body(stream=True), headers={"x-weir-project": "acme"})
    assert r.status_code == 200
    (out,) = seen
    assert out.request_id == r.headers["x-request-id"] and out.result == "ok" and out.status == 200
    assert (out.tenant, out.model, out.stream, out.kind, out.project) == ("t", "claude-sonnet-4-5", True, "main", "acme")
    assert out.target == "p" and out.key_id is not None and out.attempts == 1 and out.failover_index == 0
    assert out.breaker == "success" and out.cache == "bypass"
    assert out.bytes_in == len(body(stream=True)) and out.bytes_out == len(r.content)
    assert out.input_tokens and out.output_tokens
    assert out.upstream_request_id and out.upstream_request_id.startswith("req_mock_")
    assert 0 < out.first_byte_s <= out.total_s and 0 <= out.queue_wait_s <= out.upstream_head_s <= out.total_s
    (line,) = _records(lines)
    assert (line["kind"], line["project"], line["cache"], line["outcome"]) == ("main", "acme", "bypass", "ok")


async def test_start_up_objects_are_frozen_out_of_the_cycle_collector() -> None:
    import gc

    before = gc.get_freeze_count()
    try:
        async with running_mock() as (mock, url):
            async with running_weir(make_settings(url, server={"gc_freeze": True})):
                assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


async def test_translated_responses_carry_one_x_request_id() -> None:
    """An OpenAI-compatible upstream sends its own x-request-id: it travels as
    x-upstream-request-id, and x-request-id stays Weir's, once."""
    async with running_mock() as (mock, url):
        settings = make_settings(None, upstreams=[{"name": "oai", "kind": "openai", "url": url + "/v1", "api_keys": ["sk-up"]}], auth=AUTH)
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                for stream in (False, True):
                    r = await c.post("/v1/messages", content=body(stream=stream))
                    assert r.status_code == 200
                    assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]
                    assert r.headers["x-request-id"].startswith("req_weir_")
                    assert r.headers["x-upstream-request-id"].startswith("req_mock_")


async def test_a_stream_that_ends_with_an_error_event_is_an_error_outcome() -> None:
    async with weir_and_mock() as (weir, mock):
        lines, seen = _recording(weir)
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "error_event_after=3"})
    assert r.status_code == 200 and b"event: error" in r.content
    (line,) = _records(lines)
    assert (line["outcome"], line["error"]) == ("error", "overloaded_error")
    assert seen[0].result == "error" and seen[0].bytes_out == len(r.content)


async def test_bytes_out_counts_error_responses_too() -> None:
    async with weir_and_mock() as (weir, mock):
        lines, seen = _recording(weir)
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            answers = [
                await c.get("/v1/nowhere"),  # Weir's own 404
                await c.post("/v1/messages", content=b"{not json"),  # Weir's own 400
                await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=429"}),  # the upstream's error
                await c.post("/v1/chat/completions", content=b"{}"),  # OpenAI-shaped 400
            ]
    assert [r.status_code for r in answers] == [404, 400, 429, 400]
    assert [line["bytes_out"] for line in _records(lines)] == [len(r.content) for r in answers]
    assert all(len(r.content) > 0 for r in answers)
    assert [o.result for o in seen] == ["error"] * 4
    assert seen[2].error == "rate_limit_error"


async def test_no_cache_goes_upstream_even_after_a_hit(tmp_path: Path) -> None:
    """With the shared L2 on, a ``cache-control: no-cache`` request after a miss
    and a hit must reach the upstream — not be answered by the entry the first
    request stored (its lease is still up)."""
    data = body(temperature=0)
    async with running_mock() as (mock, url):
        settings = make_settings(url, cache={"l2": "sqlite"}, server={"data_dir": str(tmp_path)})
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                marks = []
                for extra in ({}, {}, {"cache-control": "no-cache"}):
                    r = await c.post("/v1/messages", content=data, headers=extra)
                    assert r.status_code == 200
                    marks.append(r.headers["x-weir-cache"])
    assert marks == ["miss", "hit", "miss"]
    assert mock.calls == 2


async def test_cache_misses_say_which_target_answered(autojump_clock: trio.testing.MockClock) -> None:
    async with weir_and_mock() as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            async with trio.open_nursery() as nursery:
                got: list[httpx.Response] = []

                async def one() -> None:
                    got.append(await c.post("/v1/messages", content=body(temperature=0, stream=True), headers={"x-mock-latency-ms": "50"}))

                for _ in range(3):
                    nursery.start_soon(one)
            hit = await c.post("/v1/messages", content=body(temperature=0))
    assert sorted(r.headers["x-weir-cache"] for r in got) == ["coalesced", "coalesced", "miss"]
    assert {r.headers["x-weir-target"] for r in got} == {"primary"}
    assert hit.headers["x-weir-cache"] == "hit" and "x-weir-target" not in hit.headers
    assert mock.calls == 1
