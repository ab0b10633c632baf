"""Real servers on real sockets, inside the test's trio run.

``running_weir`` starts Weir under Hypercorn's trio worker on an ephemeral
port, exactly as ``weir serve`` does minus the signal handling; the mock
upstream runs beside it. Both live in a nursery the test owns, so a test
that ends stops them.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
import trio

from proxy.app import Weir, build_app
from proxy.cli import hypercorn_config
from mock import MockSettings, MockUpstream
from proxy.server import worker_serve
from proxy.settings import Settings, settings_from_dict


@asynccontextmanager
async def running_mock(**kwargs: Any) -> AsyncIterator[tuple[MockUpstream, str]]:
    mock = MockUpstream(MockSettings(**kwargs))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.serve, "127.0.0.1", 0)
        yield mock, f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def make_settings(upstream_url: str | None, **sections: Any) -> Settings:
    # No L2 file and no ledger unless a test asks for one: tests must not
    # share state through the disk.
    data: dict[str, Any] = {"server": {"host": "127.0.0.1", "port": 0, "access_log": False, "drain_s": 5, "gc_freeze": False}, "cache": {"l2": "none"}, "ledger": {"url": "off"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    if upstream_url is not None and "upstreams" not in data:
        data["upstreams"] = [{"name": "primary", "url": upstream_url}]
    return settings_from_dict(data)


class WeirServer:
    def __init__(self, app: Weir, url: str, stop: trio.Event) -> None:
        self.app = app
        self.url = url
        self._stop = stop

    def stop(self) -> None:
        self._stop.set()


@asynccontextmanager
async def running_weir(settings: Settings, environ: dict[str, str] | None = None) -> AsyncIterator[WeirServer]:
    app = build_app(settings, environ=environ or {})
    config = hypercorn_config(settings)
    config.bind = ["127.0.0.1:0"]
    config.errorlog = logging.getLogger("hypercorn.error")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(worker_serve, app, config, shutdown_trigger=stop.wait))
        server = WeirServer(app, binds[0], stop)
        yield server
        stop.set()
        nursery.cancel_scope.deadline = trio.current_time() + 10


@asynccontextmanager
async def weir_and_mock(mock: dict[str, Any] | None = None, environ: dict[str, str] | None = None, **sections: Any) -> AsyncIterator[tuple[WeirServer, MockUpstream]]:
    async with running_mock(**(mock or {})) as (upstream, url):
        async with running_weir(make_settings(url, **sections), environ=environ) as weir:
            yield weir, upstream


async def read_head(stream: trio.abc.ReceiveStream, buf: bytes = b"") -> tuple[bytes, bytes] | None:
    """One request head off a raw socket, for the tests' hand-made servers.

    Returns (head, bytes that followed it), or None when the peer closed first.
    """
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def closed_port() -> int:
    """A loopback port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    base.update(fields)
    return msgspec.json.encode(base)


async def anthropic_sdk_round_trip(client: Any) -> None:
    """The official SDK's three ways in — create, the stream helper, tools — against
    whatever upstream Weir fronts: three upstream calls, each checked as a client would."""
    msg = await client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert msg.role == "assistant" and msg.model == "claude-sonnet-4-5"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.usage.output_tokens > 0
    async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
        pieces = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == final.content[0].text and pieces
    assert final.stop_reason == "end_turn"
    # Tools: the SDK sees a tool_use block whose input parses.
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    async with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, tools=tools, tool_choice={"type": "any"}, messages=[{"role": "user", "content": "weather in Paris?"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    use = [b for b in final.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and isinstance(use.input, dict)


# Claude Code 2.1.x sends eight betas with every main-loop request.
CLAUDE_CODE_BETA = (
    "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,"
    "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27,context-1m-2025-08-07,"
    "thinking-display-updates-2026-08-18,mid-conversation-system-clear-at-2026-08-21"
)
CLAUDE_CODE_MODEL = "claude-opus-5-5"
# What a request shaped like Claude Code's carries that chat completions
# cannot: the translation must report exactly these (x-weir-dropped).
CLAUDE_CODE_DROPPED = "context_management,weir_never_heard_of_this"


def claude_code_request(stream: bool = True, tools: int = 12) -> dict[str, Any]:
    """A request shaped like Claude Code 2.1.x's: a dozen tools, metadata, a
    ``role: "system"`` item after the first user turn, adaptive thinking,
    ``output_config``, ``context_management``, 128k ``max_tokens`` — keys in
    Claude Code's order, with a field Weir has never heard of, so
    byte-identity means something. Sent to ``/v1/messages?beta=true`` with
    ``CLAUDE_CODE_BETA``."""
    tool_defs = [
        {
            "name": f"Tool{i}",
            "description": f"Tool number {i}. " * 20,
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "where"}, "limit": {"type": "integer"}},
                "required": ["path"],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        }
        for i in range(tools)
    ]
    doc = {
        "model": CLAUDE_CODE_MODEL,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"}, {"type": "text", "text": "List the files.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment\nWorking directory: /work\nPlatform: linux"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Tool0", "input": {"path": "."}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.py\nb.py"}]},
        ],
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be helpful. " * 200},
        ],
        "tools": tool_defs,
        "metadata": {"user_id": "user_abc_account_def_session_123"},
        "max_tokens": 128000,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "weir_never_heard_of_this": {"nested": [1, 2.50, "\u00e9"]},
        "stream": stream,
    }
    return doc


def claude_code_body(stream: bool = True, tools: int = 12) -> bytes:
    """``claude_code_request`` as bytes, spaced as Claude Code spaces them: a
    space after separators, unlike msgspec, so a re-serializing proxy is caught."""
    return json.dumps(claude_code_request(stream, tools), separators=(", ", ": "), ensure_ascii=False).encode()
