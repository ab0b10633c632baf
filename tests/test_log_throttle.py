"""A dead or sick Redis is logged at most once per interval, not once per request."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import httpx
import trio

from proxy.logs import Throttle

from .harness import closed_port

ROOT = Path(__file__).resolve().parents[1]


def test_throttle_passes_one_record_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = Throttle(30.0, clock=lambda: now[0])
    passed = []
    for i in range(100):  # 100 failures in 50 s
        record = logging.LogRecord("coredis", logging.INFO, "", 0, "retry %d", (i,), None)
        if throttle.filter(record):
            passed.append(record)
        now[0] += 0.5
    assert [r.getMessage() for r in passed] == ["retry 0", "retry 60"]
    assert passed[1].suppressed == 59


async def _resetting_redis(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accepts, reads the first command, hangs up: a Redis that keeps dying."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_a_sick_redis_is_logged_once_per_interval_not_per_request(tmp_path: Path) -> None:
    """A real `weir serve` process and its JSON log: the cache's L2 on a Redis
    that drops every connection, the rate limiter on one that refuses them.
    Requests within one interval give at most one record per logger."""
    async with trio.open_nursery() as nursery:
        resetting = f"redis://127.0.0.1:{await nursery.start(_resetting_redis)}/0"
        unreachable = f"redis://127.0.0.1:{closed_port()}/0"
        port = closed_port()  # free now; weir binds it
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_SERVER__DATA_DIR": str(tmp_path),
            "WEIR_CACHE__L2": "redis", "WEIR_CACHE__REDIS_URL": resetting,
            "WEIR_RATELIMIT__REQUESTS_PER_MINUTE": "100000", "WEIR_RATELIMIT__REDIS_URL": unreachable,
        }  # fmt: skip
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)], env=env, stderr=open(tmp_path / "log", "wb")
        )
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=10) as client:
                with trio.fail_after(20):
                    while True:
                        try:
                            if (await client.get(url + "/ready")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.05)
                for i in range(10):
                    det = {"model": "m", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": f"q{i}"}]}
                    r = await client.post(url + "/v1/messages", json=det, headers={"x-api-key": "k"})
                    assert r.status_code == 200  # fails open, serves from L1
        finally:
            proc.terminate()
            await proc.wait()
        nursery.cancel_scope.cancel()
    records = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if line.startswith("{")]
    per_logger = Counter(r["logger"] for r in records if r["level"] != "debug")
    assert per_logger["weir.cache"] == 1 and per_logger["proxy.ratelimit"] == 1, per_logger
    assert per_logger["coredis"] <= 1, per_logger
