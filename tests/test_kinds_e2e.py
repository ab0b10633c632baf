"""Request kinds end to end: the access log names them, routes send them to
their own target, and ``answer_locally`` answers them with no upstream call."""

from __future__ import annotations

import io

import anthropic
import httpx
import msgspec
import pytest
import trio

from proxy.logs import AccessLog
from proxy.settings import SettingsError

from . import side_calls
from .harness import make_settings, running_mock, running_weir, weir_and_mock

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}


def sdk(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key="sk-client", max_retries=0)


_SDK_PARAMS = {"model", "max_tokens", "messages", "system", "tools", "metadata"}


def call(doc: dict) -> dict:
    """A side call's body as SDK keyword arguments; fields the SDK has no parameter for ride in extra_body."""
    extra = {k: v for k, v in doc.items() if k not in _SDK_PARAMS}
    return {**{k: v for k, v in doc.items() if k in _SDK_PARAMS}, "extra_body": extra}


async def test_access_log_carries_the_kind() -> None:
    lines = io.StringIO()
    async with weir_and_mock() as (weir, mock):
        weir.app.access, weir.app._access_on = AccessLog(lines), True
        async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            for kind in ("quota_probe", "title", "bash_prefix", "filepath", "suggestion"):
                r = await c.post("/v1/messages", content=side_calls.encode(side_calls.ALL[kind]()))
                assert r.status_code == 200
            assert (await c.post("/v1/messages", content=side_calls.encode({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))).status_code == 200
            assert (await c.get("/v1/models")).status_code == 200
        await trio.testing.wait_all_tasks_blocked()
    kinds = [msgspec.json.decode(line)["kind"] for line in lines.getvalue().splitlines()]
    assert kinds == ["quota_probe", "title", "bash_prefix", "filepath", "suggestion", "main", None]
    # Without answer_locally every side call went upstream.
    assert len(mock.requests) == 7


@pytest.mark.parametrize("stream", [False, True])
async def test_listed_kinds_are_answered_locally_in_the_mode_asked_for(stream: bool) -> None:
    lines = io.StringIO()
    answer = ["quota_probe", "title", "bash_prefix", "filepath", "suggestion"]
    async with weir_and_mock(claude_code={"answer_locally": answer}) as (weir, mock):
        weir.app.access, weir.app._access_on = AccessLog(lines), True
        client = sdk(weir.url)
        texts = {}
        for kind in answer:
            doc = side_calls.ALL[kind]()
            if stream:
                async with client.messages.stream(**call(doc)) as s:
                    pieces = [t async for t in s.text_stream]
                    msg = await s.get_final_message()
                assert "".join(pieces) == "".join(b.text for b in msg.content)
            else:
                raw = await client.messages.with_raw_response.create(**call(doc))
                assert raw.headers["x-weir-target"] == "local" and raw.headers["x-request-id"]
                msg = await raw.parse()
            assert msg.role == "assistant" and msg.model == doc["model"] and msg.stop_reason == "end_turn"
            assert (msg.usage.input_tokens, msg.usage.output_tokens) == (0, 0)
            texts[kind] = "".join(b.text for b in msg.content)
        # A main call still goes upstream.
        main = await client.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        assert main.usage.output_tokens > 0
        await trio.testing.wait_all_tasks_blocked()
    assert len(mock.requests) == 1 and b"hi" in mock.requests[0].body
    assert texts["bash_prefix"] == "none" and texts["suggestion"] == "" and texts["quota_probe"]
    assert '"title"' in texts["title"]
    records = [msgspec.json.decode(line) for line in lines.getvalue().splitlines()]
    assert [(r["kind"], r["target"], r["status"], r["outcome"]) for r in records[:5]] == [(k, "local", 200, "ok") for k in answer]
    assert all(r["bytes_out"] > 0 for r in records)


async def test_unlisted_kinds_still_go_upstream() -> None:
    async with weir_and_mock(claude_code={"answer_locally": ["quota_probe"]}) as (weir, mock):
        client = sdk(weir.url)
        probe = await client.messages.create(**call(side_calls.quota_probe()))
        title = await client.messages.create(**call(side_calls.title_v1()))
    assert probe.usage.output_tokens == 0 and title.usage.output_tokens > 0
    assert len(mock.requests) == 1 and b"new conversation topic" in mock.requests[0].body


async def test_a_local_answer_needs_a_valid_key_like_any_request() -> None:
    async with weir_and_mock(
        claude_code={"answer_locally": ["quota_probe"]},
        auth={"client_keys": [{"tenant": "a", "key": "weir-key-a"}]},
    ) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            r = await c.post("/v1/messages", content=side_calls.encode(side_calls.quota_probe()), headers={"x-api-key": "wrong"})
            assert r.status_code == 401 and r.json()["type"] == "error"
            r = await c.post("/v1/messages", content=side_calls.encode(side_calls.quota_probe()), headers={"x-api-key": "weir-key-a"})
            assert r.status_code == 200 and r.headers["x-weir-target"] == "local"
    assert len(mock.requests) == 0


async def test_routes_send_side_calls_to_a_cheap_target() -> None:
    async with running_mock() as (main, main_url), running_mock() as (cheap, cheap_url):
        settings = make_settings(
            None,
            upstreams=[{"name": "main", "url": main_url}, {"name": "cheap", "url": cheap_url}],
            routes=[
                {"kind": "title", "targets": ["cheap:claude-haiku-cheap"]},
                {"kind": "suggestion", "match": "*opus*", "targets": ["cheap"]},
                {"match": "*", "targets": ["main"]},
            ],
        )
        async with running_weir(settings) as weir:
            client = sdk(weir.url)
            await client.messages.create(**call(side_calls.title_v1()))
            # suggestion routed by kind only for opus models
            await client.messages.create(**call({**side_calls.suggestion(), "model": "claude-opus-4-1"}))
            await client.messages.create(**call(side_calls.suggestion()))
            await client.messages.create(model="claude-opus-4-1", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert [msgspec.json.decode(r.body)["model"] for r in cheap.requests] == ["claude-haiku-cheap", "claude-opus-4-1"]
    assert [msgspec.json.decode(r.body)["model"] for r in main.requests] == [side_calls.HAIKU, "claude-opus-4-1"]


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"routes": [{"kind": "titel", "targets": ["primary"]}]}, "titel"),
        ({"claude_code": {"answer_locally": ["main"]}}, "'main' cannot be answered locally"),
        ({"claude_code": {"answer_locally": ["quota"]}}, "'quota' cannot be answered locally"),
    ],
)
def test_bad_kind_settings_stop_start_up(sections: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        make_settings("http://127.0.0.1:1", **sections)
