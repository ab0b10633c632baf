"""OpenTelemetry traces, through real sockets: spans exported in memory,
``traceparent`` read at the mock upstream."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.trio import worker_serve
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy.app import build_app
from proxy.cli import hypercorn_config
from proxy.logs import AccessLog
from proxy.tracing import Tracing, client_trace_id, tracing_from_env
from tests.harness import WeirServer, body, make_settings, running_mock, running_weir

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def test_client_trace_id() -> None:
    assert client_trace_id(TRACEPARENT.encode()) == CLIENT_TRACE
    assert client_trace_id(None) == ""
    assert client_trace_id(b"00-" + b"0" * 32 + b"-" + CLIENT_SPAN.encode() + b"-01") == ""  # the all-zero id is invalid
    assert client_trace_id(b"00-" + b"g" * 32 + b"-" + CLIENT_SPAN.encode() + b"-01") == ""
    assert client_trace_id(TRACEPARENT.encode()[:-1]) == ""


@given(st.binary(max_size=80))
def test_client_trace_id_never_raises(raw: bytes) -> None:
    got = client_trace_id(raw)
    assert got == "" or (len(got) == 32 and int(got, 16) > 0)


def test_tracing_is_on_only_when_otel_variables_ask() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}) is None
    on = tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert on is not None
    on.shutdown()


@asynccontextmanager
async def traced_weir(url: str, **sections: object) -> AsyncIterator[tuple[WeirServer, InMemorySpanExporter, list[bytes]]]:
    exporter = InMemorySpanExporter()
    settings = make_settings(url, **sections)
    app = build_app(settings, environ={}, tracing=Tracing(exporter, batch=False))
    lines: list[bytes] = []
    config = hypercorn_config(settings)
    config.bind = ["127.0.0.1:0"]
    config.errorlog = logging.getLogger("hypercorn.error")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(worker_serve, ASGIWrapper(app), config, shutdown_trigger=stop.wait))
        app.access, app._access_on = AccessLog(_Lines(lines)), True
        yield WeirServer(app, binds[0], stop), exporter, lines
        stop.set()


class _Lines(io.StringIO):
    def __init__(self, out: list[bytes]) -> None:
        super().__init__()
        self.out = out

    def fileno(self) -> int:
        raise OSError("not a file")

    def write(self, s: str) -> int:
        self.out.append(s.encode())
        return len(s)


def by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


async def test_spans_follow_the_request_and_traceparent_reaches_the_upstream() -> None:
    async with running_mock() as (mock, url):
        async with traced_weir(url, cache={"mode": "all"}) as (weir, exporter, lines):
            async with httpx.AsyncClient(base_url=weir.url) as client:
                r = await client.post("/v1/messages", content=body(stream=True), headers={"x-api-key": "k", "traceparent": TRACEPARENT})
                assert r.status_code == 200
    spans = by_name(exporter)
    (request,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    # Weir's span continues the client's trace, under the client's span.
    assert format(request.context.trace_id, "032x") == CLIENT_TRACE
    assert format(request.parent.span_id, "016x") == CLIENT_SPAN
    assert request.name == "chat claude-sonnet-4-5"
    a = request.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-sonnet-4-5" and a["gen_ai.response.model"] == "claude-sonnet-4-5"
    assert a["http.response.status_code"] == 200
    (attempt,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert attempt.parent.span_id == request.context.span_id
    assert attempt.attributes["gen_ai.provider.name"] == "anthropic" and attempt.attributes["http.response.status_code"] == 200
    (queue,) = spans["weir.queue_wait"]
    (lookup,) = spans["weir.cache_lookup"]
    assert queue.parent.span_id == request.context.span_id and lookup.parent.span_id == request.context.span_id
    assert lookup.attributes["weir.cache.hit"] is False
    # The upstream saw Weir's child — the attempt's span — in the same trace.
    tp = mock.requests[-1].header(b"traceparent").decode()
    assert tp == f"00-{CLIENT_TRACE}-{format(attempt.context.span_id, '016x')}-01"
    # The access log line carries the trace id.
    (line,) = [json.loads(x) for x in lines if b'"request"' in x]
    assert line["trace_id"] == CLIENT_TRACE


async def test_a_new_trace_without_a_client_traceparent() -> None:
    async with running_mock() as (mock, url):
        async with traced_weir(url, cache={"mode": "off"}) as (weir, exporter, lines):
            async with httpx.AsyncClient(base_url=weir.url) as client:
                r = await client.post("/v1/messages", content=body(), headers={"x-api-key": "k"})
                assert r.status_code == 200
    (request,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert request.parent is None
    tp = mock.requests[-1].header(b"traceparent")
    assert tp is not None and client_trace_id(tp) == format(request.context.trace_id, "032x")
    assert json.loads(lines[-1])["trace_id"] == format(request.context.trace_id, "032x")


async def test_tracing_off_passes_the_clients_traceparent_untouched() -> None:
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url)) as weir:
            lines: list[bytes] = []
            weir.app.access, weir.app._access_on = AccessLog(_Lines(lines)), True
            assert weir.app.tracing is None
            async with httpx.AsyncClient(base_url=weir.url) as client:
                r = await client.post("/v1/messages", content=body(), headers={"x-api-key": "k", "traceparent": TRACEPARENT, "tracestate": "vendor=1"})
                assert r.status_code == 200
    assert mock.requests[-1].header(b"traceparent") == TRACEPARENT.encode()
    assert mock.requests[-1].header(b"tracestate") == b"vendor=1"
    assert json.loads(lines[-1])["trace_id"] == CLIENT_TRACE


async def test_each_upstream_attempt_is_a_span() -> None:
    async with running_mock() as (mock, url):
        async with traced_weir(url, retry={"base_s": 0, "cap_s": 0}) as (weir, exporter, _lines):
            async with httpx.AsyncClient(base_url=weir.url) as client:
                r = await client.post("/v1/messages", content=body(), headers={"x-api-key": "k", "x-mock-fault": "fail_first=1"})
                assert r.status_code == 200
    attempts = sorted((s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)
    assert [s.attributes["weir.attempt"] for s in attempts] == [0, 1]
    assert attempts[0].attributes.get("error.type") and attempts[0].attributes["http.response.status_code"] >= 500
    assert attempts[1].attributes["http.response.status_code"] == 200
    sent = [rq.header(b"traceparent") for rq in mock.requests]
    assert len(set(sent)) == 2  # each attempt carried its own span


async def test_coalesced_followers_link_to_the_leader() -> None:
    async with running_mock(latency_ms=200) as (mock, url):
        async with traced_weir(url, cache={"mode": "all"}) as (weir, exporter, _lines):
            async with httpx.AsyncClient(base_url=weir.url) as client:
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(partial(client.post, "/v1/messages", content=body(), headers={"x-api-key": "k"}))
    assert len(mock.requests) == 1
    requests = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(requests) == 3
    leaders = [s for s in requests if s.attributes.get("weir.cache") == "miss"]
    followers = [s for s in requests if s.attributes.get("weir.cache") == "coalesced"]
    assert len(leaders) == 1 and len(followers) == 2
    for f in followers:
        assert [link.context.span_id for link in f.links] == [leaders[0].context.span_id]
    # The one upstream attempt belongs to the leader's trace.
    (attempt,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert attempt.context.trace_id == leaders[0].context.trace_id
