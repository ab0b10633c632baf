"""Anthropic clients against an OpenAI-compatible upstream (the mock's chat endpoint).

Claude Code or the anthropic SDK sends Messages; the upstream sees chat
completions; the client gets Anthropic's shape back, streams included.
"""

from __future__ import annotations

import anthropic
import httpx
import msgspec


from .harness import CLAUDE_CODE_BETA, anthropic_sdk_round_trip, body, claude_code_body, make_settings, running_mock, running_weir
from .validate import validate_anthropic_stream

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}


def openai_settings(url: str, **sections):  # type: ignore[no-untyped-def]
    return make_settings(None, upstreams=[{"name": "oai", "kind": "openai", "url": url + "/v1", "model": "gpt-mock", "api_keys": ["sk-upstream"]}], auth={"client_keys": [{"tenant": "t", "key": "sk-client"}]}, **sections)


async def test_claude_code_stream_through_openai_upstream() -> None:
    async with running_mock() as (mock, url), running_weir(openai_settings(url)) as weir:
        async with httpx.AsyncClient(base_url=weir.url) as c:
            r = await c.post("/v1/messages?beta=true", content=claude_code_body(stream=True), headers={**KEY, "anthropic-beta": CLAUDE_CODE_BETA})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-weir-target"] == "oai:gpt-mock"
        validate_anthropic_stream(r.content)
        sent = mock.requests[-1]
        assert sent.path == "/v1/chat/completions" and sent.query == ""
        assert sent.header(b"authorization") == b"Bearer sk-upstream"
        assert sent.header(b"x-api-key") is None and sent.header(b"anthropic-beta") is None
        doc = msgspec.json.decode(sent.body)
        assert doc["model"] == "gpt-mock" and doc["stream"] is True
        assert len(doc["tools"]) == 12 and doc["tools"][0]["type"] == "function"
        assert doc["reasoning_effort"] and doc["stream_options"] == {"include_usage": True}


async def test_anthropic_sdk_against_openai_upstream() -> None:
    async with running_mock() as (mock, url), running_weir(openai_settings(url)) as weir:
        client = anthropic.AsyncAnthropic(base_url=weir.url, api_key="sk-client", max_retries=0)
        async with client:
            await anthropic_sdk_round_trip(client)
        assert mock.calls == 3


async def test_errors_midstream_and_status_are_anthropic_shaped() -> None:
    async with running_mock() as (mock, url), running_weir(openai_settings(url, retry={"max_attempts": 1})) as weir:
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=400"})
            assert r.status_code == 400
            doc = r.json()
            assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
            assert "mock fault" in doc["error"]["message"]  # the upstream's own message survives
            r = await c.post("/v1/messages", content=body(stream=True), headers={"x-mock-fault": "reset_after=3"})
            assert r.status_code == 200
            assert b"event: error" in r.content
            validate_anthropic_stream(r.content, complete=False)


async def test_models_and_count_tokens_with_openai_upstream() -> None:
    async with running_mock() as (mock, url), running_weir(openai_settings(url)) as weir:
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            r = await c.get("/v1/models")
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["data"] and all(m["type"] == "model" and m["id"] for m in doc["data"])
            assert doc["has_more"] is False and doc["first_id"] == doc["data"][0]["id"]
            assert mock.requests[-1].path == "/v1/models"
            calls = mock.calls
            r = await c.post("/v1/messages/count_tokens", content=msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}))
            assert r.status_code == 200 and r.headers["x-weir-token-count"] == "estimate"
            assert 100 <= r.json()["input_tokens"] <= 120
            assert mock.calls == calls  # answered locally


async def test_quick_start_cli_settings_reach_the_openai_endpoint() -> None:
    """`weir serve --upstream URL/v1 --upstream-kind openai --upstream-model M --upstream-key-env VAR`."""
    from proxy.settings import load_settings

    async with running_mock() as (mock, url):
        # The overrides `weir serve` builds from those flags (proxy/cli.py _serve_command).
        overrides = {"upstreams.url": url + "/v1", "upstreams.kind": "openai", "upstreams.model": "gpt-mock", "upstreams.api_key_envs": ["UP_KEY"], "server.access_log": False}
        settings = load_settings(None, environ={}, overrides=overrides)
        async with running_weir(settings, environ={"UP_KEY": "sk-env"}) as weir:
            async with anthropic.AsyncAnthropic(base_url=weir.url, api_key="anything", max_retries=0) as client:
                msg = await client.messages.create(model="claude-sonnet-4-5", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
        assert msg.content[0].text
        sent = mock.requests[-1]
        assert sent.path == "/v1/chat/completions"
        assert sent.header(b"authorization") == b"Bearer sk-env"
        assert msgspec.json.decode(sent.body)["model"] == "gpt-mock"
