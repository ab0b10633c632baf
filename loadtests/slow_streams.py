"""2,000 concurrent slow streams through one Weir worker: memory per stream
(its client connection, its upstream connection and everything between) and
``/health`` latency while they run.

    .venv/bin/python -m loadtests.slow_streams [--streams 2000]

The mock upstream (its own process) paces tokens slowly, so every stream stays
open for the whole measurement. Weir's RSS is read from /proc before the
streams open (after a warm-up) and once every stream has its response head and
first events; the difference over the stream count is the figure. Then 200
sequential ``GET /health`` on one kept-alive connection give the latency.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import trio

from .procs import free_port, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _weir_pid(parent: int) -> int:
    """``weir serve`` with one worker serves in its own process."""
    return parent


async def run(port: int, streams: int, pid: int) -> None:
    body = b'{"model":"claude-sonnet-4-5","max_tokens":400,"stream":true,"messages":[{"role":"user","content":"slow %d"}]}'
    opened = 0
    all_open = trio.Event()
    done = trio.Event()

    async def one(i: int) -> None:
        nonlocal opened
        req = body % i
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\nx-weir-cache: off\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(req), req)
            )
            seen = b""
            while b"content_block_delta" not in seen:
                got = await stream.receive_some(65536)
                if not got:
                    raise RuntimeError(f"stream {i} closed early: {seen[:200]!r}")
                seen += got
            opened += 1
            if opened == streams:
                all_open.set()
            await done.wait()

    # Warm-up: a round of short requests so first-use allocations are not counted per stream.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client, trio.open_nursery() as nursery:
        for i in range(100):
            warm = b'{"model":"m","max_tokens":2,"messages":[{"role":"user","content":"warm %d"}]}' % i
            nursery.start_soon(partial(client.post, "/v1/messages", content=warm, headers={"x-api-key": "k", "x-weir-cache": "off", "x-mock-tokens-per-second": "0"}))
    await trio.sleep(1)
    before = _rss_kib(pid)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(one, i)
            if i % 100 == 99:
                await trio.sleep(0.05)  # stay inside the listen backlog
        with trio.fail_after(300):
            await all_open.wait()
        await trio.sleep(2)  # let allocations settle
        during = _rss_kib(pid)
        print(f"{streams} streams open after {time.monotonic() - started:.1f} s")
        print(f"Weir RSS: {before / 1024:.1f} MiB before → {during / 1024:.1f} MiB with {streams} streams")
        print(f"memory per stream (client + upstream connection): {(during - before) / streams:.1f} KiB")
        latencies = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(200):
                t = time.perf_counter()
                r = await client.get("/health")
                latencies.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
        latencies.sort()
        print(f"/health while they run: p50 {statistics.median(latencies):.2f} ms, p99 {latencies[197]:.2f} ms, max {latencies[-1]:.2f} ms")
        done.set()


def main() -> int:
    parser = argparse.ArgumentParser(prog="loadtests.slow_streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="weir-slow-")
    mock_port, port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_CACHE__L2": "none", "WEIR_METRICS__ENABLED": "false"}
    log = open(os.path.join(data_dir, "log"), "wb")
    # 400 tokens at 2 a second: each stream lasts minutes.
    mock = subprocess.Popen([sys.executable, "-m", "mock", "--port", str(mock_port), "--tokens-per-second", "2", "--output-tokens", "400"], env=env, stdout=log, stderr=log)
    weir = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--data-dir", data_dir,
         "--upstream", f"http://127.0.0.1:{mock_port}", "--upstream-concurrency", str(args.streams + 100)],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        if not wait_ready(f"http://127.0.0.1:{port}", weir):
            print("weir did not start", file=sys.stderr)
            return 1
        trio.run(run, port, args.streams, _weir_pid(weir.pid))
    finally:
        stop([weir, mock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
