"""Cache-hit throughput through Weir, as a ratio of the raw-ASGI floor, in one run.

Starts the mock upstream, the floor (``loadtests/floor.py`` under Hypercorn)
and one Weir per cache level, primes one deterministic request, then points
wrk at each. Levels:

* L1 — ``cache.l2 = none``: every request is an in-process hit.
* L2 SQLite / L2 Redis — ``cache.l1_max_bytes = 1``, so no entry fits in L1
  and every hit is read (and decoded) from the shared level.

Run: ``.venv/bin/python -m loadtests.bench_cache [--duration 5] [--connections 64]``.
Redis is skipped when 127.0.0.1:6379 does not answer. The server under test
runs alone on core 0; this process, wrk and the mock share core 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import httpx
import msgspec
import trio

from loadtests.bench import VENV_BIN, Server, _pin, _tree, _weir_env, lua_script, run_wrk
from loadtests.procs import free_port
from loadtests.record import add_save_flag, record

_BODY = msgspec.json.encode({"model": "claude-sonnet-4-5", "max_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": "bench the cache"}]})
_HEADERS = {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01", "content-type": "application/json"}


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


async def main_async(duration: float, connections: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-cache-"))
    py = str(VENV_BIN / "python")
    env = _weir_env(False)
    mock_port, floor_port = free_port()()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = Server("mock", [py, "-m", "mock", "--port", str(mock_port)], env, tmp / "mock.log", mock_url + "/_mock/stats")
    floor = Server("floor", [str(VENV_BIN / "hypercorn"), "-c", "python:proxy.hypercorn_conf.config", "--bind", f"127.0.0.1:{floor_port}", "loadtests.floor:app"],
                   env, tmp / "floor.log", f"http://127.0.0.1:{floor_port}/")
    levels = {"L1": {"WEIR_CACHE__L2": "none"},
              "L2 sqlite": {"WEIR_CACHE__L2": "sqlite", "WEIR_CACHE__SQLITE_PATH": str(tmp / "l2.db"), "WEIR_CACHE__L1_MAX_BYTES": "1"}}
    if _redis_up():
        levels["L2 redis"] = {"WEIR_CACHE__L2": "redis", "WEIR_CACHE__REDIS_URL": "redis://127.0.0.1:6379/14", "WEIR_CACHE__L1_MAX_BYTES": "1"}
    body_path = tmp / "body.json"
    body_path.write_bytes(_BODY)
    script = tmp / "hit.lua"
    script.write_text(lua_script(str(body_path), "/v1/messages", _HEADERS))
    floor_script = tmp / "floor.lua"
    floor_script.write_text(lua_script(str(body_path), "/", {}))
    results: dict = {}
    async with trio.open_nursery() as nursery:
        # As loadtests/bench does: the server under test alone on core 0;
        # this process, wrk and the mock on core 1 (2-core machine).
        os.sched_setaffinity(0, {1})
        await mock.start(nursery)
        _pin(await trio.to_thread.run_sync(_tree, mock.pid), 1)
        await floor.start(nursery)
        _pin(await trio.to_thread.run_sync(_tree, floor.pid), 0)
        floor_res = await run_wrk(f"http://127.0.0.1:{floor_port}", floor_script, connections, duration)
        results["floor"] = {"rps": floor_res.rps, "p99_ms": floor_res.p99_ms}
        print(f"floor: {floor_res.rps:,.0f} req/s p99 {floor_res.p99_ms:.1f} ms", flush=True)
        for name, extra in levels.items():
            port = free_port()
            w = Server(name, [py, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "1", "--upstream", mock_url],
                       {**env, **extra}, tmp / f"weir-{name.replace(' ', '-')}.log", f"http://127.0.0.1:{port}/ready")
            await w.start(nursery)
            _pin(await trio.to_thread.run_sync(_tree, w.pid), 0)
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient() as client:
                marks = []
                for _ in range(50):  # prime, then wait for the background L2 write to land
                    r = await client.post(url + "/v1/messages", content=_BODY, headers=_HEADERS)
                    marks.append(r.headers.get("x-weir-cache"))
                    if marks[-1] == "hit":
                        break
                    await trio.sleep(0.05)
            res = await run_wrk(url, script, connections, duration)
            ratio = res.rps / floor_res.rps if floor_res.rps else 0.0
            results[name] = {"rps": res.rps, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms, "failures": res.failures, "vs_floor": round(ratio, 3), "primed": marks[-1]}
            print(f"{name}: {res.rps:,.0f} req/s p50 {res.p50_ms:.1f} ms p99 {res.p99_ms:.1f} ms failures {res.failures} = {ratio:.2f} x floor (primed: {marks[-1]})", flush=True)
            await w.stop()
        await floor.stop()
        await mock.stop()
        nursery.cancel_scope.cancel()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0)  # 5 s holds thousands of hits at the measured rates
    p.add_argument("--connections", type=int, default=64)  # docs/ARCHITECTURE.md's reference load
    add_save_flag(p, "cache-latest")
    ns = p.parse_args(argv)
    out = trio.run(main_async, ns.duration, ns.connections)
    written = record("cache", "cache-latest", {"json": msgspec.json.format(msgspec.json.encode(out))}, save=ns.save)
    print(msgspec.json.encode(out).decode())
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
