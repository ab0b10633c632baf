"""Real servers on real sockets, inside the test's trio run.

``running_weir`` starts Weir under Hypercorn's trio worker on an ephemeral
port, exactly as ``weir serve`` does minus the signal handling; the mock
upstream runs beside it. Both live in a nursery the test owns, so a test
that ends stops them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.trio import worker_serve

from proxy.app import Weir, build_app
from proxy.cli import hypercorn_config
from proxy.mock_upstream import MockSettings, MockUpstream
from proxy.settings import Settings, settings_from_dict


@asynccontextmanager
async def running_mock(**kwargs: Any) -> AsyncIterator[tuple[MockUpstream, str]]:
    mock = MockUpstream(MockSettings(**kwargs))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.serve, "127.0.0.1", 0)
        yield mock, f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def make_settings(upstream_url: str | None, **sections: Any) -> Settings:
    data: dict[str, Any] = {"server": {"host": "127.0.0.1", "port": 0, "access_log": False, "drain_s": 5}}
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
        binds = await nursery.start(partial(worker_serve, ASGIWrapper(app), config, shutdown_trigger=stop.wait))
        server = WeirServer(app, binds[0], stop)
        yield server
        stop.set()
        nursery.cancel_scope.deadline = trio.current_time() + 10


@asynccontextmanager
async def weir_and_mock(mock: dict[str, Any] | None = None, environ: dict[str, str] | None = None, **sections: Any) -> AsyncIterator[tuple[WeirServer, MockUpstream]]:
    async with running_mock(**(mock or {})) as (upstream, url):
        async with running_weir(make_settings(url, **sections), environ=environ) as weir:
            yield weir, upstream


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    base.update(fields)
    return msgspec.json.encode(base)
