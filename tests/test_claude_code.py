"""Today's Claude Code (2.1.x) through both target kinds, streamed and not.

The official anthropic SDK sends the request that stands for Claude Code
(``claude_code_request``: ``?beta=true``, eight betas, a dozen tools, a
``role: "system"`` item after the first user turn, adaptive thinking,
``output_config``, ``context_management``, ``claude-opus-5-5``, 128k
``max_tokens``) to Weir over a real socket; Weir sends it on to the mock,
either as is (an Anthropic target) or translated (an OpenAI-compatible one),
and the SDK must accept the answer. What the OpenAI target cannot carry is
named in ``x-weir-dropped`` and in the access log.
"""

from __future__ import annotations

import io
import json
from functools import partial
from typing import Any

import anthropic
import msgspec
import pytest
import trio

from proxy.logs import AccessLog

from .harness import CLAUDE_CODE_BETA, CLAUDE_CODE_DROPPED, CLAUDE_CODE_MODEL, claude_code_request, make_settings, read_head, running_mock, running_weir

CLIENT_KEY = "sk-client"


def settings_for(kind: str, url: str):  # type: ignore[no-untyped-def]
    if kind == "anthropic":
        upstream = {"name": "claude", "url": url}
    else:
        upstream = {"name": "nim", "kind": "openai", "url": url + "/v1", "model": "deepseek-ai/deepseek-r1", "api_keys": ["sk-upstream"]}
    return make_settings(None, upstreams=[upstream], auth={"client_keys": [{"tenant": "t", "key": CLIENT_KEY}]})


async def sdk_call(client: anthropic.AsyncAnthropic, stream: bool) -> tuple[Any, Any]:
    """The fixture through the SDK's beta surface, with Claude Code's ``?beta=true``: the message and the HTTP response."""
    doc = claude_code_request(stream=stream)
    del doc["stream"]
    extra = {"weir_never_heard_of_this": doc.pop("weir_never_heard_of_this")}
    kwargs = {**doc, "betas": CLAUDE_CODE_BETA.split(","), "extra_body": extra, "extra_query": {"beta": "true"}}
    if stream:
        async with client.beta.messages.stream(**kwargs) as s:
            async for _ in s:
                pass
            return await s.get_final_message(), s.response
    # 128k max_tokens: the SDK insists on streaming unless a timeout is given.
    raw = await client.beta.messages.with_raw_response.create(**kwargs, timeout=60)
    return await raw.parse(), raw.http_response


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_claude_code_request_through_each_target_kind(kind: str, stream: bool) -> None:
    lines = io.StringIO()
    async with running_mock() as (mock, url), running_weir(settings_for(kind, url)) as weir:
        weir.app.access, weir.app._access_on = AccessLog(lines), True
        async with anthropic.AsyncAnthropic(base_url=weir.url, api_key=CLIENT_KEY, max_retries=0) as client:
            msg, http = await sdk_call(client, stream)
        seen = mock.requests[-1]
    assert msg.model == CLAUDE_CODE_MODEL and msg.role == "assistant"
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens > 0
    texts = [b.text for b in msg.content if b.type == "text"]
    assert texts and all(texts)
    # display: "omitted" — whichever target answered, no thinking text reaches the client.
    assert all(not b.thinking for b in msg.content if b.type == "thinking")
    [record] = [msgspec.json.decode(line) for line in lines.getvalue().splitlines()]
    assert record["status"] == 200 and record["outcome"] == "ok" and record["stream"] is stream
    if kind == "anthropic":
        # Passthrough: the query, the betas and every field arrive as sent; nothing is dropped.
        assert seen.path == "/v1/messages" and seen.query == "beta=true"
        assert seen.header(b"anthropic-beta") == CLAUDE_CODE_BETA.encode()
        sent = msgspec.json.decode(seen.body)
        assert sent["messages"][1]["role"] == "system" and sent["context_management"] and sent["max_tokens"] == 128000
        assert "x-weir-dropped" not in http.headers and record["dropped"] is None
        return
    assert seen.path == "/v1/chat/completions" and seen.query == ""
    sent = msgspec.json.decode(seen.body)
    assert sent["model"] == "deepseek-ai/deepseek-r1" and sent["max_tokens"] == 128000
    assert [m["role"] for m in sent["messages"]][:3] == ["system", "user", "system"]  # the system item, in place
    assert sent["reasoning_effort"] == "medium" and len(sent["tools"]) == 12
    assert http.headers["x-weir-target"] == "nim:deepseek-ai/deepseek-r1"
    assert http.headers["x-weir-dropped"] == CLAUDE_CODE_DROPPED
    assert record["dropped"] == CLAUDE_CODE_DROPPED.split(",")
    if stream:
        assert http.headers["content-type"].startswith("text/event-stream")


async def _tagged_upstream(stream: trio.SocketStream, pieces: list[str], seen: list[dict[str, Any]]) -> None:
    """An OpenAI-compatible server whose model writes <think> and <tool_call> into its text, one piece a write."""
    got = await read_head(stream)
    assert got is not None
    head, rest = got
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    seen.append(json.loads(rest))
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    await stream.send_all(chunk({"role": "assistant", "content": ""}))
    for piece in pieces:
        await stream.send_all(chunk({"content": piece}))
    await stream.send_all(chunk({}, "stop") + b"data: [DONE]\n\n")
    await stream.aclose()


async def test_think_and_tool_call_tags_from_a_real_upstream_reach_the_sdk_as_blocks() -> None:
    reply = '<think>\nList first.\n</think>\n\nListing.\n<tool_call>\n{"name": "Tool3", "arguments": {"path": "src"}}\n</tool_call>'
    pieces = [reply[i : i + 3] for i in range(0, len(reply), 3)]  # every tag cut across writes
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, partial(_tagged_upstream, pieces=pieces, seen=seen), 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1"
        settings = make_settings(None, upstreams=[{"name": "qwen", "kind": "openai", "url": url, "model": "qwen3"}])
        async with running_weir(settings) as weir:
            async with anthropic.AsyncAnthropic(base_url=weir.url, api_key="k", max_retries=0) as client:
                doc = claude_code_request(stream=True)
                doc["thinking"] = {"type": "adaptive"}  # shown, this time
                async with client.messages.stream(**{k: doc[k] for k in ("model", "max_tokens", "messages", "system", "tools", "thinking")}) as s:
                    final = await s.get_final_message()
        nursery.cancel_scope.cancel()
    assert seen[0]["stream"] is True
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "List first." and final.content[1].text == "Listing."
    assert final.content[2].name == "Tool3" and final.content[2].input == {"path": "src"}
    assert final.stop_reason == "tool_use"
