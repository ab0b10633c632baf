"""The mock upstream, through real sockets, as the proxy and the SDKs see it.

Each test starts ``MockUpstream`` in the test's own trio run. Tests of the
mock's own delays request ``autojump_clock``, so seconds of simulated latency
cost no real time and the measured durations are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import msgspec
import openai
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from mock import (
    VOCABULARY,
    Fault,
    MockSettings,
    MockUpstream,
    add_arguments,
    parse_fault,
    settings_from_args,
)
from proxy.sse import SSEParser

from .harness import running_mock



running = running_mock


@asynccontextmanager
async def client_for(**settings: Any) -> AsyncIterator[tuple[MockUpstream, httpx.AsyncClient]]:
    async with running(**settings) as (mock, url):
        # No timeouts: under the mock clock they would fire the moment the run idles.
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            yield mock, client


def msg(text: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-20250514", "max_tokens": 1024, "messages": [{"role": "user", "content": text}], **fields}


def chat(text: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **fields}


def sse(raw: bytes) -> list[tuple[str, Any]]:
    """(event name, decoded data) for every event; data is bytes if not JSON."""
    parser = SSEParser()
    out = []
    for ev in parser.feed(raw) + parser.close():
        try:
            data = json.loads(ev.data) if ev.data != b"[DONE]" else "[DONE]"
        except ValueError:
            data = ev.data
        out.append((ev.name, data))
    return out


WEATHER = {
    "name": "get_weather",
    "description": "weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
}


# ---------------------------------------------------------------------------
# Anthropic API through the official SDK
# ---------------------------------------------------------------------------


async def test_anthropic_sdk_create_and_stream_helper() -> None:
    async with running() as (mock, url):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        made = await client.messages.create(**msg("hi there"))
        assert made.id.startswith("msg_mock_") and made.type == "message" and made.role == "assistant"
        assert made.model == "claude-sonnet-4-20250514"
        assert made.stop_reason == "end_turn" and made.stop_sequence is None
        assert len(made.content) == 1 and made.content[0].type == "text"
        assert len(made.content[0].text.split()) == 16  # output_tokens default
        assert made.usage.output_tokens == 16 and made.usage.input_tokens > 0
        assert made.usage.cache_read_input_tokens == 0

        pieces = []
        async with client.messages.stream(**msg("hi there")) as stream:
            async for text in stream.text_stream:
                pieces.append(text)
            final = await stream.get_final_message()
        assert len(pieces) == 16
        assert "".join(pieces) == final.content[0].text == made.content[0].text  # same body, same words
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 16
        # The SDK's stream request differs from create's only by "stream": true.
        assert [json.loads(r.body).get("stream", False) for r in mock.requests] == [False, True]
        assert mock.calls == 2


async def test_anthropic_stream_event_sequence_and_headers() -> None:
    async with client_for() as (_, client):
        r = await client.post("/v1/messages", json=msg(stream=True))
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.headers["request-id"].startswith("req_mock_")
        for name in ("requests", "tokens"):
            for part in ("limit", "remaining", "reset"):
                assert r.headers[f"anthropic-ratelimit-{name}-{part}"]
        events = sse(r.content)
    names = [n for n, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 16 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(n == d["type"] for n, d in events)
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn" and events[-2][1]["usage"]["output_tokens"] == 16


async def test_thinking_block_comes_first_with_a_signature() -> None:
    async with client_for() as (_, client):
        body = msg(thinking={"type": "enabled", "budget_tokens": 2048}, stream=True)
        events = sse((await client.post("/v1/messages", json=body)).content)
        whole = (await client.post("/v1/messages", json={**body, "stream": False})).json()
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [d["delta"]["type"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert deltas[-1] == "signature_delta" and set(deltas[:-1]) == {"thinking_delta"} and len(deltas) > 1
    assert [b["type"] for b in whole["content"]] == ["thinking", "text"]
    assert whole["content"][0]["signature"]


async def test_tool_use_when_forced_or_asked_for() -> None:
    async with client_for() as (_, client):
        forced = (await client.post("/v1/messages", json=msg(tools=[WEATHER], tool_choice={"type": "any"}))).json()
        named = msg(tools=[{"name": "other", "input_schema": {}}, WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
        by_name = (await client.post("/v1/messages", json=named)).json()
        asked = await client.post("/v1/messages", json=msg("please use a tool now", tools=[WEATHER], stream=True))
        plain = (await client.post("/v1/messages", json=msg("just talk", tools=[WEATHER]))).json()
    for reply in (forced, by_name):
        assert reply["stop_reason"] == "tool_use"
        (block,) = reply["content"]
        assert block["type"] == "tool_use" and block["id"].startswith("toolu_mock_") and block["name"] == "get_weather"
        assert set(block["input"]) == {"city", "days"} and isinstance(block["input"]["days"], int)
    events = sse(asked.content)
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert len([n for n, _ in events if n == "content_block_delta"]) > 2  # streamed in pieces
    assert set(json.loads(partial)) == {"city", "days"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert plain["stop_reason"] == "end_turn" and plain["content"][0]["type"] == "text"


async def test_max_tokens_stop_sequences_and_length_header() -> None:
    async with client_for() as (_, client):
        short = (await client.post("/v1/messages", json=msg(max_tokens=5))).json()
        assert short["stop_reason"] == "max_tokens" and len(short["content"][0]["text"].split()) == 5
        assert short["usage"]["output_tokens"] == 5
        longer = (await client.post("/v1/messages", json=msg(), headers={"x-mock-output-tokens": "40"})).json()
        assert len(longer["content"][0]["text"].split()) == 40 and longer["stop_reason"] == "end_turn"

        # Try each word as a stop sequence until one cuts a reply mid-way: the
        # reply is then the words before it, and it names the sequence.
        cut = None
        for word in VOCABULARY:
            reply = (await client.post("/v1/messages", json=msg(stop_sequences=[word]))).json()
            words = reply["content"][0]["text"].split() if reply["content"] else []
            assert word not in words
            if reply["stop_reason"] == "stop_sequence":
                assert reply["stop_sequence"] == word
                if words:
                    cut = words
            else:
                assert reply["stop_reason"] == "end_turn" and len(words) == 16
        assert cut is not None and 0 < len(cut) < 16


async def test_identical_requests_get_byte_identical_bodies() -> None:
    async with client_for() as (_, client):
        body = msgspec.json.encode(msg("determinism"))
        stream_body = msgspec.json.encode(msg("determinism", stream=True))
        a = await client.post("/v1/messages", content=body)
        b = await client.post("/v1/messages", content=body)
        sa = await client.post("/v1/messages", content=stream_body)
        sb = await client.post("/v1/messages", content=stream_body)
        other = await client.post("/v1/messages", content=msgspec.json.encode(msg("something else")))
        ca = await client.post("/v1/chat/completions", content=msgspec.json.encode(chat(stream=True)))
        cb = await client.post("/v1/chat/completions", content=msgspec.json.encode(chat(stream=True)))
    assert a.content == b.content and sa.content == sb.content and ca.content == cb.content
    assert len(sa.content) > 1000
    assert other.json()["content"][0]["text"] != a.json()["content"][0]["text"]
    assert other.json()["id"] != a.json()["id"]


async def test_recorded_request_is_byte_identical() -> None:
    # Odd spacing, key order, unicode and a Claude Code style query string: all must arrive untouched.
    body = '{ "stream":false,"max_tokens" :64, "model":"m","messages":[{"role":"user","content":"h\u00e9llo \\u2603"}],"metadata":{"user_id":"u"}}'.encode()
    async with client_for() as (mock, client):
        r = await client.post(
            "/v1/messages?beta=true",
            content=body,
            headers={"anthropic-beta": "a-2025,b-2025", "x-api-key": "sk-test", "Content-Type": "application/json"},
        )
        assert r.status_code == 200
        await client.post("/v1/messages/count_tokens", content=b"")  # a second one, to check ordering
    first = mock.requests[0]
    assert first.method == "POST" and first.path == "/v1/messages" and first.query == "beta=true"
    assert first.body == body
    assert first.header(b"anthropic-beta") == b"a-2025,b-2025" and first.header(b"content-type") == b"application/json"
    assert mock.requests[-1].path == "/v1/messages/count_tokens" and mock.requests[-1].body == b""


async def test_recorded_requests_are_bounded() -> None:
    mock = MockUpstream(MockSettings(), keep_requests=3)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for i in range(5):
                await client.post("/v1/messages", json=msg(f"n{i}"))
        nursery.cancel_scope.cancel()
    assert mock.calls == 5 and [json.loads(r.body)["messages"][0]["content"] for r in mock.requests] == ["n2", "n3", "n4"]

    big = MockUpstream(MockSettings(), keep_bytes=2500)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(big.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for i in range(5):
                await client.post("/v1/messages", json=msg(f"{i}" * 1000))
        nursery.cancel_scope.cancel()
    assert big.calls == 5 and [json.loads(r.body)["messages"][0]["content"][0] for r in big.requests] == ["3", "4"]


async def test_validation_auth_models_and_count_tokens() -> None:
    async with client_for() as (_, client):
        bad = await client.post("/v1/messages", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        for missing in ("model", "max_tokens", "messages"):
            body = msg()
            del body[missing]
            r = await client.post("/v1/messages", json=body)
            assert r.status_code == 400 and missing in r.json()["error"]["message"]
        denied = await client.post("/v1/messages", json=msg(), headers={"x-api-key": "invalid"})
        assert denied.status_code == 401 and denied.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
        counted = (await client.post("/v1/messages/count_tokens", json={"model": "m", "messages": []})).json()
        assert isinstance(counted["input_tokens"], int) and counted["input_tokens"] > 0
        one = await client.get("/v1/models/claude-sonnet-4-20250514", headers={"anthropic-version": "2023-06-01"})
        assert one.json()["type"] == "model" and one.json()["display_name"] == "Claude Sonnet 4"
        # Every model /v1/messages accepts — any — has an entry, in each API's shape.
        other = await client.get("/v1/models/claude-opus-5-5", headers={"anthropic-version": "2023-06-01"})
        assert other.json() == {"type": "model", "id": "claude-opus-5-5", "display_name": "claude-opus-5-5", "created_at": "2025-01-01T00:00:00Z"}
        nim = await client.get("/v1/models/deepseek-ai/deepseek-r1", headers={"authorization": "Bearer k"})
        assert nim.json()["id"] == "deepseek-ai/deepseek-r1" and nim.json()["object"] == "model"
        gone = await client.get("/v1/models/")
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
        oai_bad = await client.post("/v1/chat/completions", content=b"[")
        assert oai_bad.status_code == 400 and set(oai_bad.json()["error"]) >= {"message", "type", "code"}
        oai_denied = await client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer invalid"})
        assert oai_denied.status_code == 401 and oai_denied.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/nowhere")).status_code == 404


async def test_model_lists_in_both_shapes_through_the_sdks() -> None:
    async with running() as (_, url):
        a = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        page = await a.models.list()
        assert [m.id for m in page.data][:1] == ["claude-opus-4-1-20250805"] and not page.has_more
        o = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        listed = await o.models.list()
        assert {m.object for m in listed.data} == {"model"} and len(listed.data) == len(page.data)
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic.AsyncAnthropic(base_url=url, api_key="invalid", max_retries=0).messages.create(**msg())


# ---------------------------------------------------------------------------
# OpenAI-compatible API through the official SDK
# ---------------------------------------------------------------------------

FUNC = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}},
}


async def test_openai_sdk_create_and_stream_with_tool_calls() -> None:
    async with running() as (_, url):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        made = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert made.object == "chat.completion" and made.choices[0].finish_reason == "length"
        assert len(made.choices[0].message.content.split()) == 4 and made.usage.completion_tokens == 4
        assert made.usage.total_tokens == made.usage.prompt_tokens + 4

        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            tools=[FUNC],
            tool_choice="required",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        assert calls[0].id.startswith("call_mock_") and calls[0].function.name == "lookup"
        args = json.loads("".join(tc.function.arguments or "" for tc in calls))
        assert set(args) == {"q", "n"} and all(tc.index == 0 for tc in calls) and len(calls) > 2
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == ["tool_calls"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

        whole = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], tools=[FUNC], tool_choice={"type": "function", "function": {"name": "lookup"}}
        )
        assert whole.choices[0].finish_reason == "tool_calls"
        assert whole.choices[0].message.content is None
        assert set(json.loads(whole.choices[0].message.tool_calls[0].function.arguments)) == {"q", "n"}


async def test_openai_stream_text_reasoning_and_done() -> None:
    async with client_for() as (_, client):
        r = await client.post("/v1/chat/completions", json=chat(stream=True, reasoning_effort="low"))
        events = sse(r.content)
        plain = (await client.post("/v1/chat/completions", json=chat(reasoning_effort="low", stream=False))).json()
    assert events[-1] == ("message", "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)  # no include_usage
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert reasoning and len(content.split()) == 16
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert plain["choices"][0]["message"]["content"] == content
    assert plain["choices"][0]["message"]["reasoning_content"] == reasoning


# ---------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------


def test_fault_syntax() -> None:
    f = parse_fault("status=429;retry_after=2, slow=50,unknown_event")
    assert (f.status, f.retry_after, f.slow_ms, f.unknown_event, f.hang) == (429, "2", 50.0, True, False)
    assert parse_fault("fail_first=2").status == 500
    with pytest.raises(ValueError):
        parse_fault("stauts=500")


async def test_status_faults_in_each_api_shape() -> None:
    async with client_for() as (_, client):
        limited = await client.post("/v1/messages", json=msg(), headers={"x-mock-fault": "status=429;retry_after=2"})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        overloaded = await client.post("/v1/messages", json=msg(), headers={"x-mock-fault": "status=529"})
        assert overloaded.status_code == 529 and overloaded.json()["error"]["type"] == "overloaded_error"
        assert "retry-after" not in overloaded.headers
        oai = await client.post("/v1/chat/completions", json=chat(), headers={"x-mock-fault": "status=429"})
        assert oai.status_code == 429 and oai.json()["error"]["code"] == "rate_limit_exceeded"
        typo = await client.post("/v1/messages", json=msg(), headers={"x-mock-fault": "hnag"})
        assert typo.status_code == 400 and "hnag" in typo.json()["error"]["message"]


async def test_fail_first_is_counted_per_identical_body() -> None:
    async with client_for(fault="status=503;fail_first=2") as (_, client):  # the settings default
        statuses = [(await client.post("/v1/messages", json=msg("retry me"))).status_code for _ in range(4)]
        assert statuses == [503, 503, 200, 200]
        assert (await client.post("/v1/messages", json=msg("another"))).status_code == 503
        healthy = await client.post("/v1/messages", json=msg("another"), headers={"x-mock-fault": ""})
        assert healthy.status_code == 200  # the header replaces the default


async def test_hang_counts_a_disconnect_when_the_client_gives_up(autojump_clock: trio.testing.MockClock) -> None:
    async with client_for() as (mock, client):
        start = trio.current_time()
        with trio.move_on_after(30) as scope:
            await client.post("/v1/messages", json=msg(), headers={"x-mock-fault": "hang"})
        assert scope.cancelled_caught and trio.current_time() - start == pytest.approx(30)
        with trio.fail_after(1):
            await mock.wait_disconnect()
        assert mock.disconnects == 1 and mock.calls == 1


async def test_hang_after_sends_n_events_then_stalls(autojump_clock: trio.testing.MockClock) -> None:
    async with client_for() as (mock, client):
        parser = SSEParser()
        got: list[str] = []
        with trio.move_on_after(60):
            async with client.stream("POST", "/v1/messages", json=msg(stream=True), headers={"x-mock-fault": "hang_after=4"}) as r:
                async for chunk in r.aiter_raw():
                    got.extend(e.name for e in parser.feed(chunk))
        assert got == ["message_start", "content_block_start", "ping", "content_block_delta"]
        with trio.fail_after(1):
            await mock.wait_disconnect()


async def test_reset_after_aborts_the_connection() -> None:
    async with running() as (mock, url):
        port = int(url.rsplit(":", 1)[1])
        body = msgspec.json.encode(msg(stream=True))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-mock-fault: reset_after=5\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        received = b""
        with pytest.raises(trio.BrokenResourceError):  # ECONNRESET, not a clean EOF
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    received += chunk
        await stream.aclose()
        head, _, rest = received.partition(b"\r\n\r\n")
        assert b" 200 " in head
        assert rest.count(b"event: ") == 5 and not rest.endswith(b"0\r\n\r\n")  # no terminating chunk
        assert mock.disconnects == 0  # our own abort is not the peer going away


async def test_reset_after_through_httpx() -> None:
    async with client_for() as (_, client):
        got = []
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True), headers={"x-mock-fault": "reset_after=3"}) as r:
                parser = SSEParser()
                async for chunk in r.aiter_raw():
                    got.extend(parser.feed(chunk))
        assert len(got) == 3
        # Unstreamed: the head and half the body, then the reset.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.post("/v1/messages", json=msg(), headers={"x-mock-fault": "reset_after=1"})
        assert (await client.post("/v1/messages", json=msg())).status_code == 200  # a fresh connection works


async def test_malformed_unknown_and_error_events() -> None:
    async with client_for() as (_, client):
        bad = sse((await client.post("/v1/messages", json=msg(stream=True), headers={"x-mock-fault": "malformed"})).content)
        assert sum(isinstance(d, bytes) for _, d in bad) == 1 and bad[-1][0] == "message_stop"
        future = sse((await client.post("/v1/messages", json=msg(stream=True), headers={"x-mock-fault": "unknown_event"})).content)
        assert [n for n, _ in future][:4] == ["message_start", "content_block_start", "ping", "future_event"]
        r = await client.post("/v1/messages", json=msg(stream=True), headers={"x-mock-fault": "error_event_after=5"})
        assert r.status_code == 200  # the body ended properly: httpx read it whole
        errored = sse(r.content)
        assert [n for n, _ in errored] == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta", "error"]
        assert errored[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded (mock fault)"}}


async def test_sdk_skips_an_unknown_event_type() -> None:
    async with running() as (_, url):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, default_headers={"x-mock-fault": "unknown_event"})
        async with client.messages.stream(**msg()) as stream:
            text = "".join([t async for t in stream.text_stream])
        assert len(text.split()) == 16


# ---------------------------------------------------------------------------
# Timing (mock clock)
# ---------------------------------------------------------------------------


async def test_latency_ttft_and_pacing(autojump_clock: trio.testing.MockClock) -> None:
    async with client_for(latency_ms=200, ttft_ms=500, tokens_per_second=10, output_tokens=5) as (_, client):
        start = trio.current_time()
        stamps: list[tuple[str, float]] = []
        async with client.stream("POST", "/v1/messages", json=msg(stream=True)) as r:
            head_at = trio.current_time() - start
            parser = SSEParser()
            async for chunk in r.aiter_raw():
                stamps.extend((e.name, trio.current_time() - start) for e in parser.feed(chunk))
        assert head_at == pytest.approx(0.2)
        deltas = [t for n, t in stamps if n == "content_block_delta"]
        assert stamps[0] == ("message_start", pytest.approx(0.2))
        assert deltas == pytest.approx([0.7, 0.8, 0.9, 1.0, 1.1])
        # Per-request overrides, and an unstreamed reply waits out the whole generation.
        start = trio.current_time()
        r = await client.post("/v1/messages", json=msg(), headers={"x-mock-latency-ms": "0", "x-mock-ttft-ms": "100", "x-mock-tokens-per-second": "50"})
        assert r.status_code == 200 and trio.current_time() - start == pytest.approx(0.1 + 5 / 50)


async def test_slow_fault_spaces_every_event(autojump_clock: trio.testing.MockClock) -> None:
    async with client_for(output_tokens=3) as (_, client):
        start = trio.current_time()
        r = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"x-mock-fault": "slow=250"})
        n = len(sse(r.content))  # role, 3 content, finish, [DONE]
        assert n == 6 and trio.current_time() - start == pytest.approx(0.25 * (n - 1))


async def test_paced_stream_notices_the_client_leaving(autojump_clock: trio.testing.MockClock) -> None:
    async with client_for(tokens_per_second=1, output_tokens=100) as (mock, client):
        async with client.stream("POST", "/v1/messages", json=msg(stream=True)) as r:
            parser = SSEParser()
            async for chunk in r.aiter_raw():
                if any(e.name == "content_block_delta" for e in parser.feed(chunk)):
                    break  # leaving the block closes the half-read response's connection
        left_at = trio.current_time()
        with trio.fail_after(0.5):
            await mock.wait_disconnect()
        assert mock.disconnects == 1 and trio.current_time() - left_at < 0.5
        assert (await client.post("/v1/messages", json=msg())).status_code == 200  # the server goes on


async def test_keep_alive_reuses_one_connection() -> None:
    async with client_for() as (mock, client):
        for stream in (False, True, False):
            assert (await client.post("/v1/messages", json=msg(stream=stream))).status_code == 200
        assert (await client.get("/_mock/stats")).json()["calls"] == 3
    assert mock.connections == 1 and mock.calls == 3


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


async def _pids_seen(url: str, want: int) -> set[int]:
    pids: set[int] = set()
    with trio.fail_after(10):  # child start-up is an interpreter launch, ~0.3 s
        while len(pids) < want:
            # A fresh connection each time: SO_REUSEPORT spreads connections, not requests.
            async with httpx.AsyncClient(base_url=url) as client:
                try:
                    pids.add((await client.get("/_mock/stats")).json()["pid"])
                except httpx.ConnectError:
                    pass
            await trio.sleep(0.02)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_share_the_port_and_die_with_the_parent() -> None:
    async with running(workers=2) as (_, url):
        pids = await _pids_seen(url, 2)
        assert os.getpid() in pids
    (child,) = pids - {os.getpid()}
    with trio.fail_after(5):
        while _alive(child):
            await trio.sleep(0.02)


async def test_command_line_prints_its_address_and_stops_on_sigterm() -> None:
    argv = [sys.executable, "-m", "mock", "--port", "0", "--workers", "2", "--output-tokens", "3"]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status: trio.run_process(argv, stdout=subprocess.PIPE, check=False, task_status=task_status))
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        assert line.startswith(b"mock upstream listening on http://127.0.0.1:")
        url = line.decode().split(" on ")[1].strip()
        pids = await _pids_seen(url, 2)
        async with httpx.AsyncClient(base_url=url) as client:
            reply = (await client.post("/v1/messages", json=msg())).json()
        assert len(reply["content"][0]["text"].split()) == 3
        proc.terminate()
    assert proc.returncode == 0
    assert not any(_alive(p) for p in pids)


def test_command_line_on_a_busy_port_is_one_line_and_exit_status_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "mock", "--port", str(port)], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"python -m mock: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_argument_helpers_round_trip() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--latency-ms", "5", "--tokens-per-second", "20", "--fault", "slow=1", "--workers", "3"])
    assert settings_from_args(ns) == MockSettings(latency_ms=5, tokens_per_second=20, fault="slow=1", workers=3)
    assert (ns.host, ns.port) == ("127.0.0.1", 8081)


# ---------------------------------------------------------------------------
# Real clients' loops: tools, structured output, thinking, models, --help
# ---------------------------------------------------------------------------


async def test_anthropic_sdk_tool_runner_loop_runs_to_an_answer() -> None:
    """The SDK's own tool loop: a tool call the last user message asked for, the result sent back, then text."""
    from anthropic import beta_async_tool

    calls: list[tuple[str, int]] = []

    @beta_async_tool
    async def get_weather(city: str, days: int) -> str:
        """Weather for a city, a few days ahead."""
        calls.append((city, days))
        return "sunny"

    @beta_async_tool
    async def get_time(zone: str) -> str:
        """The time in a zone."""
        raise AssertionError("not asked for")

    async with running() as (mock, url):
        async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client:
            runner = client.beta.messages.tool_runner(
                model="claude-opus-5-5", max_tokens=256, tools=[get_time, get_weather],
                messages=[{"role": "user", "content": "Please use the get_weather tool for Paris."}],
            )  # fmt: skip
            replies = [m async for m in runner]
    assert [m.stop_reason for m in replies] == ["tool_use", "end_turn"]
    assert len(calls) == 1 and isinstance(calls[0][1], int)
    assert replies[-1].content[0].type == "text" and mock.calls == 2


async def test_openai_sdk_tool_loop_and_the_rule_for_auto() -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}
    async with running() as (_, url):
        o = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Use the GET_WEATHER tool, please."}]
        first = await o.chat.completions.create(model="m", messages=messages, tools=[FUNC, weather], tool_choice="auto")
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["input_schema"])
        messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        second = await o.chat.completions.create(model="m", messages=messages, tools=[FUNC, weather], tool_choice="auto")
        assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content
        # "use a tool" picks the first; a mere mention of tools, or none, does not call one.
        generic = await o.chat.completions.create(model="m", messages=[{"role": "user", "content": "use a tool"}], tools=[FUNC, weather])
        assert generic.choices[0].message.tool_calls[0].function.name == "lookup"
        chat_only = await o.chat.completions.create(model="m", messages=[{"role": "user", "content": "what tools do you have?"}], tools=[FUNC])
        assert chat_only.choices[0].finish_reason == "stop"


async def test_structured_output_fits_the_schema_through_both_sdks() -> None:
    import pydantic

    class Plan(pydantic.BaseModel):
        title: str
        steps: list[str]
        effort: int
        risk: Literal["low", "high"]

    async with running() as (_, url):
        o = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        parsed = await o.chat.completions.parse(model="m", messages=[{"role": "user", "content": "plan"}], response_format=Plan)
        assert isinstance(parsed.choices[0].message.parsed, Plan)
        async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as a:
            msg_ = await a.messages.parse(model="claude-opus-5-5", max_tokens=512, messages=[{"role": "user", "content": "plan"}], output_format=Plan)
            assert isinstance(msg_.parsed_output, Plan)
        # Streamed, and through the beta's top-level output_format: the text deltas join to a fitting document.
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3}}, "required": ["n", "tags"], "additionalProperties": False}
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            for fmt in ({"output_config": {"format": {"type": "json_schema", "schema": schema}}}, {"output_format": {"type": "json_schema", "schema": schema}}):
                events = sse((await client.post("/v1/messages", json=msg(stream=True, **fmt))).content)
                text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
                jsonschema.validate(json.loads(text), schema)
            bad = await client.post("/v1/messages", json=msg(output_config={"format": {"type": "json_schema"}}))
            assert bad.status_code == 400 and "schema" in bad.json()["error"]["message"]
            obj = (await client.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))).json()
            assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)


async def test_adaptive_thinking_and_omitted_display() -> None:
    async with client_for() as (_, client):
        shown = (await client.post("/v1/messages", json=msg(thinking={"type": "adaptive"}))).json()
        hidden = (await client.post("/v1/messages", json=msg(thinking={"type": "adaptive", "display": "omitted"}))).json()
        events = sse((await client.post("/v1/messages", json=msg(thinking={"type": "adaptive", "display": "omitted"}, stream=True))).content)
    assert [b["type"] for b in shown["content"]] == ["thinking", "text"] and shown["content"][0]["thinking"]
    assert hidden["content"][0]["type"] == "thinking" and hidden["content"][0]["thinking"] == "" and hidden["content"][0]["signature"]
    first_block = [d["delta"]["type"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert first_block == ["signature_delta"]  # Anthropic's omitted thinking: the signature and nothing else


def test_help_lists_every_fault_and_its_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    from mock import FAULTS
    from proxy.cli import main

    with pytest.raises(SystemExit):
        main(["mock-upstream", "--help"])
    out = capsys.readouterr().out
    for syntax, effect in FAULTS:
        assert f"{syntax}  " in out and effect in out
        key, _, value = syntax.partition("=")
        parse_fault(f"{key}={'1' if value else ''}" if value else key)  # every listed fault parses
    assert {s.partition("=")[0] for s, _ in FAULTS} == set(Fault.__struct_fields__) - {"slow_ms"} | {"slow"}


# ---------------------------------------------------------------------------
# fit: any schema of the supported subset gets an instance that validates
# ---------------------------------------------------------------------------

_leaf = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-50, 50), st.integers(0, 20)),
    st.builds(lambda lo: {"type": "number", "exclusiveMinimum": lo}, st.integers(-5, 5)),
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": lo + hi}, st.integers(0, 30), st.integers(0, 5)),
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"type": ["string", "null"]}, {"format": "date-time", "type": "string"}, {"enum": [1, "x", None]}, {"const": {"k": 1}}, {}]),
)
_schemas = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(
            lambda props, extra: {"type": "object", "properties": props, "required": sorted(props)[:1], "additionalProperties": extra},
            st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
            st.booleans(),
        ),
        st.builds(lambda items, n: {"type": "array", "items": items, "minItems": n, "maxItems": n + 2}, inner, st.integers(0, 3)),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
    ),
    max_leaves=8,
)


@settings(max_examples=int(os.environ.get("WEIR_HYPOTHESIS_EXAMPLES", "200")), deadline=None)
@given(_schemas, st.integers(0, 2**32))
def test_property_fit_builds_an_instance_of_any_supported_schema(schema: dict[str, Any], seed: int) -> None:
    import random

    from mock.schema import fit

    jsonschema.validate(fit(schema, random.Random(seed), VOCABULARY), schema)
    # and through a local $ref, as Pydantic writes nested models
    wrapped = {"$defs": {"Inner": schema}, "type": "object", "properties": {"x": {"$ref": "#/$defs/Inner"}}, "required": ["x"]}
    jsonschema.validate(fit(wrapped, random.Random(seed), VOCABULARY), wrapped)


# ---------------------------------------------------------------------------
# Message batches: Anthropic's API, as the SDK's types read it
# ---------------------------------------------------------------------------


def _batch_request(cid: str, **params: Any) -> dict[str, Any]:
    return {"custom_id": cid, "params": {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": cid}], **params}}


async def test_message_batches_through_the_sdk() -> None:
    """Create → in progress → ended after batch_ms; results answer each request
    as /v1/messages would (a refused one is errored); list, delete, 404."""
    async with running_mock(batch_ms=100) as (mock, url):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        batch = await client.messages.batches.create(requests=[_batch_request("ok"), _batch_request("bad", max_tokens=0)])
        assert batch.processing_status == "in_progress" and batch.results_url is None and batch.ended_at is None
        assert batch.request_counts.processing == 2 and (batch.expires_at - batch.created_at).total_seconds() == 86_400
        with pytest.raises(anthropic.BadRequestError, match="still processing"):
            await client.messages.batches.delete(batch.id)
        await trio.sleep(0.15)
        done = await client.messages.batches.retrieve(batch.id)
        assert done.processing_status == "ended" and done.ended_at is not None
        assert (done.request_counts.succeeded, done.request_counts.errored, done.request_counts.processing) == (1, 1, 0)
        assert done.results_url == f"{url}/v1/messages/batches/{batch.id}/results"  # the mock itself, as Anthropic points at itself
        results = {r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)}
        assert results["ok"].type == "succeeded" and results["ok"].message.usage.output_tokens > 0
        direct = await client.messages.create(**_batch_request("ok")["params"])
        assert results["ok"].message.content == direct.content  # the same generator, the same reply
        assert results["bad"].type == "errored" and results["bad"].error.error.type == "invalid_request_error"
        assert [b.id async for b in client.messages.batches.list()] == [batch.id]
        assert (await client.messages.batches.delete(batch.id)).type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.retrieve(batch.id)


def test_message_batches_core_cancel_pages_and_bad_input() -> None:
    from mock import MockCore, RecordedRequest

    core = MockCore(MockSettings(batch_ms=1000))
    host = [(b"host", b"mock")]

    def call(method: str, path: str, body: Any = None, query: str = "", now: float = 0.0) -> tuple[int, Any]:
        plan = core.respond(RecordedRequest(method, path, query, host, b"" if body is None else json.dumps(body).encode()), now, 1_700_000_000.0 + now)
        return plan.status, json.loads(plan.body) if (b"content-type", b"application/json") in plan.headers else plan.body

    ids = [call("POST", "/v1/messages/batches", {"requests": [_batch_request(f"r{i}") for i in range(3)]})[1]["id"] for _ in range(3)]
    status, canceled = call("POST", f"/v1/messages/batches/{ids[0]}/cancel", now=0.5)
    assert status == 200 and canceled["processing_status"] == "canceling" and canceled["cancel_initiated_at"] == "2023-11-14T22:13:20.500000Z"
    _, ended = call("GET", f"/v1/messages/batches/{ids[0]}", now=1.0)
    assert ended["processing_status"] == "ended" and ended["request_counts"]["canceled"] == 3
    assert ended["results_url"] == f"http://mock/v1/messages/batches/{ids[0]}/results"
    _, lines = call("GET", f"/v1/messages/batches/{ids[0]}/results", now=1.0)
    assert [json.loads(x)["result"] for x in lines.splitlines()] == [{"type": "canceled"}] * 3
    # Pages, newest first, with Anthropic's cursors.
    _, page = call("GET", "/v1/messages/batches", query="limit=2")
    assert [b["id"] for b in page["data"]] == ids[:0:-1] and page["has_more"] and page["last_id"] == ids[1]
    _, page = call("GET", "/v1/messages/batches", query=f"limit=2&after_id={ids[1]}")
    assert [b["id"] for b in page["data"]] == [ids[0]] and not page["has_more"]
    _, page = call("GET", "/v1/messages/batches", query=f"limit=1&before_id={ids[1]}")
    assert [b["id"] for b in page["data"]] == [ids[2]] and not page["has_more"]
    # Anthropic's rules for custom_id, and a 404 in its shape.
    for bad in ({"requests": []}, {"requests": [_batch_request("a b")]}, {"requests": [_batch_request("x"), _batch_request("x")]}, {"requests": [{"custom_id": "x"}]}):
        status, err = call("POST", "/v1/messages/batches", bad)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", bad
    status, err = call("GET", "/v1/messages/batches/msgbatch_nope")
    assert status == 404 and err["type"] == "error" and err["error"]["type"] == "not_found_error"
