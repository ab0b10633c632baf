"""OpenAI clients on ``POST /v1/chat/completions``, to either kind of upstream.

The official openai SDK creates, streams and calls tools; errors reach it in
OpenAI's ``{"error": {...}}`` shape so it raises its own exception classes.
"""

from __future__ import annotations

import httpx
import msgspec
import openai
import pytest


from .harness import make_settings, running_mock, running_weir
from .validate import validate_openai_stream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MSGS = [{"role": "user", "content": "hi"}]


def settings_for(kind: str, url: str):  # type: ignore[no-untyped-def]
    up = {"name": kind, "kind": kind, "url": url + "/v1" if kind == "openai" else url, "api_keys": ["sk-upstream"]}
    return make_settings(None, upstreams=[up], auth={"client_keys": [{"tenant": "t", "key": "sk-client"}]}, retry={"max_attempts": 1})


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_openai_sdk_create_stream_and_tools(kind: str) -> None:
    async with running_mock() as (mock, url), running_weir(settings_for(kind, url)) as weir:
        async with openai.AsyncOpenAI(base_url=weir.url + "/v1", api_key="sk-client", max_retries=0) as client:
            done = await client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=32)
            assert done.choices[0].message.content and done.choices[0].finish_reason == "stop"
            assert done.usage is not None and done.usage.completion_tokens > 0

            stream = await client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=32, stream=True, stream_options={"include_usage": True})
            pieces, usage = [], None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
            assert "".join(pieces) and usage is not None

            called = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS, tool_choice="required", max_tokens=32)
            call = called.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather" and isinstance(msgspec.json.decode(call.function.arguments), dict)
            assert called.choices[0].finish_reason == "tool_calls"

        sent = mock.requests[-1]
        if kind == "openai":
            assert sent.path == "/v1/chat/completions" and sent.header(b"authorization") == b"Bearer sk-upstream"
        else:
            assert sent.path == "/v1/messages" and sent.header(b"x-api-key") == b"sk-upstream"
            assert sent.header(b"anthropic-version") == b"2023-06-01"
            assert msgspec.json.decode(sent.body)["tools"][0]["name"] == "get_weather"
        assert mock.calls == 3


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_raw_stream_is_well_formed(kind: str) -> None:
    async with running_mock() as (mock, url), running_weir(settings_for(kind, url)) as weir:
        async with httpx.AsyncClient(base_url=weir.url, headers={"authorization": "Bearer sk-client"}) as c:
            r = await c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 16, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    validate_openai_stream(r.content)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_errors_reach_openai_clients_in_openai_shape(kind: str) -> None:
    async with running_mock() as (mock, url), running_weir(settings_for(kind, url)) as weir:
        async with openai.AsyncOpenAI(base_url=weir.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                await bad.chat.completions.create(model="gpt-4o", messages=MSGS)
            assert info.value.body["type"] == "authentication_error"  # type: ignore[index]
        async with openai.AsyncOpenAI(base_url=weir.url + "/v1", api_key="sk-client", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="gpt-4o", messages=[])
        async with httpx.AsyncClient(base_url=weir.url, headers={"authorization": "Bearer sk-client"}) as c:
            r = await c.post("/v1/chat/completions", content=b"{not json")
            assert r.status_code == 400
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "code"} and err["code"] == "400"
            r = await c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "stream": True}, headers={"x-mock-fault": "reset_after=2"})
            assert r.status_code == 200
            assert b'data: {"error"' in r.content and r.content.endswith(b"data: [DONE]\n\n")
        # Last: the 429 cools the only key for a minute.
        async with openai.AsyncOpenAI(base_url=weir.url + "/v1", api_key="sk-client", max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as rl:
                await client.chat.completions.create(model="gpt-4o", messages=MSGS, extra_headers={"x-mock-fault": "status=429;retry_after=60"})
            assert rl.value.response.headers["retry-after"] == "60"
            assert rl.value.body["message"]  # type: ignore[index]
