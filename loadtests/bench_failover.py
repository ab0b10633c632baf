"""Failover cost, measured: a primary that refuses connections, a healthy fallback.

Three numbers, each the median over sequential requests through Weir (real
Hypercorn, real sockets, the mock upstream, wall clock):

* direct — a route whose only target is the fallback (the baseline);
* first failover — the first requests of the failing route, while the
  primary's breaker is still closed (connect refused, then the fallback);
* breaker open — later requests, which skip the primary without connecting.

Run: ``.venv/bin/python -m loadtests.bench_failover [--requests N]``.
No locust import (docs/ARCHITECTURE.md: it monkey-patches trio away).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import httpx
import trio

from tests.harness import body, make_settings, running_mock, running_weir

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _timed(c: httpx.AsyncClient, model: str) -> float:
    t = time.perf_counter()
    r = await c.post("/v1/messages", content=body(model=model))
    assert r.status_code == 200, r.text
    return (time.perf_counter() - t) * 1000.0


async def run(n: int, threshold: int) -> dict[str, float]:
    async with running_mock() as (_, url):
        settings = make_settings(
            None,
            upstreams=[{"name": "dead", "url": f"http://127.0.0.1:{_closed_port()}"}, {"name": "good", "url": url}],
            routes=[{"match": "direct", "targets": ["good"]}, {"match": "failing", "targets": ["dead", "good"]}],
            breaker={"failure_threshold": threshold},
        )
        async with running_weir(settings) as weir, httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
            for _ in range(20):  # warm connections and code paths
                await _timed(c, "direct")
            direct = [await _timed(c, "direct") for _ in range(n)]
            first = [await _timed(c, "failing") for _ in range(threshold)]
            skipped = [await _timed(c, "failing") for _ in range(n)]
            state = weir.app.router.lane("dead").breaker.state(trio.current_time()).value  # type: ignore[union-attr]
    return {
        "direct_ms": statistics.median(direct),
        "first_failover_ms": statistics.median(first),
        "failover_overhead_ms": statistics.median(first) - statistics.median(direct),
        "breaker_open_ms": statistics.median(skipped),
        "breaker_open_overhead_ms": statistics.median(skipped) - statistics.median(direct),
        "breaker_state": state,  # type: ignore[dict-item]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--threshold", type=int, default=5, help="breaker failure_threshold (the settings default)")
    ns = p.parse_args()
    result = trio.run(run, ns.requests, ns.threshold)
    for k, v in result.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")


if __name__ == "__main__":
    main()
