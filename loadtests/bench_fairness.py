"""Fair queuing under a flood, side by side with a FIFO semaphore, in one run.

    .venv/bin/python -m loadtests.bench_fairness [--quick]

Starts the mock upstream and two Weir instances on one target with a
connection budget of 16: one scheduling with the fair queue, one with a plain
FIFO semaphore (``scheduler.policy = "fifo"``, the design Weir replaced).
Then, for each:

* quiet alone: one tenant sends requests one at a time (100 ms upstream);
* quiet + flood: another tenant keeps 3× the budget in flight (upstream time
  drawn from 50–150 ms, as real generations vary) while the quiet tenant
  repeats its run — its p99 against its p99 alone is the head-of-line figure;
* equal backlogged tenants: four tenants each keep 16 requests in flight;
  Jain's fairness index over what each was served;
* weighted tenants: weights 3 and 1, both backlogged; their shares of service.

Each load loop uses its own one-connection httpx client: one client with a
big pool spends its time scanning that pool (see proxy/upstream/pool.py).
Results: loadtests/results/runs/fairness-<timestamp>.json|md; ``--save`` also
overwrites the committed loadtests/results/fairness-latest.json|md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from loadtests.bench import VENV_BIN, Server, _weir_env
from loadtests.procs import free_port
from loadtests.record import add_save_flag, record

BUDGET = 16  # the target's connection budget: the scheduler's cap
BODY = b'{"model":"claude-haiku-4-5","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}'
TENANTS = {"quiet": 1.0, "flood": 1.0, "t1": 1.0, "t2": 1.0, "t3": 1.0, "t4": 1.0, "heavy": 3.0, "light": 1.0}


def _config(mock_url: str, policy: str) -> str:
    keys = ",\n  ".join(f'{{ tenant = "{t}", key = "key-{t}", weight = {w} }}' for t, w in TENANTS.items())
    return f"""
[server]
access_log = false
drain_s = 5
[cache]
mode = "off"
l2 = "none"
[scheduler]
policy = "{policy}"
max_queue = 4096
max_queue_per_tenant = 4096
[[upstreams]]
name = "mock"
url = "{mock_url}"
max_connections = {BUDGET}
api_keys = ["sk-upstream"]
[auth]
client_keys = [
  {keys}
]
"""


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def _one(client: httpx.AsyncClient, url: str, tenant: str, latency_ms: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/messages", content=BODY, headers={"x-api-key": f"key-{tenant}", "x-mock-latency-ms": f"{latency_ms:.0f}"})
    return r.status_code, time.perf_counter() - t0


async def quiet_run(url: str, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=60) as c:
        for _ in range(3):  # warm-up: connections and code paths, not measured
            await _one(c, url, "quiet", 100)
        for _ in range(n):
            status, dt = await _one(c, url, "quiet", 100)
            assert status == 200, status
            out.append(dt)
    return out


async def load_loop(url: str, tenant: str, stop: trio.Event, served: dict[str, int], errors: dict[int, int], rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        while not stop.is_set():
            status, _ = await _one(c, url, tenant, rng.uniform(50, 150))
            if status == 200:
                served[tenant] = served.get(tenant, 0) + 1
            else:
                errors[status] = errors.get(status, 0) + 1


async def backlog(url: str, tenants: dict[str, int], seconds: float, warmup: float = 1.0) -> tuple[dict[str, int], dict[int, int]]:
    """Keep ``tenants[t]`` requests in flight per tenant; count what each was served after warm-up."""
    served: dict[str, int] = {}
    errors: dict[int, int] = {}
    stop = trio.Event()
    rng = random.Random(7)
    async with trio.open_nursery() as n:
        for t, k in tenants.items():
            for _ in range(k):
                n.start_soon(load_loop, url, t, stop, served, errors, rng)
        await trio.sleep(warmup)
        served.clear()
        await trio.sleep(seconds)
        snapshot = dict(served)
        stop.set()
    return snapshot, errors


async def measure(url: str, quick: bool) -> dict[str, Any]:
    n_quiet = 40 if quick else 100
    window = 4.0 if quick else 8.0
    alone = await quiet_run(url, n_quiet)
    stop = trio.Event()
    served: dict[str, int] = {}
    errors: dict[int, int] = {}
    rng = random.Random(1)
    async with trio.open_nursery() as n:
        for _ in range(3 * BUDGET):
            n.start_soon(load_loop, url, "flood", stop, served, errors, rng)
        await trio.sleep(1.0)  # the flood fills the queue first
        flooded = await quiet_run(url, n_quiet)
        stop.set()
    equal, eq_err = await backlog(url, {"t1": BUDGET, "t2": BUDGET, "t3": BUDGET, "t4": BUDGET}, window)
    weighted, w_err = await backlog(url, {"heavy": BUDGET * 2, "light": BUDGET * 2}, window)
    total_w = weighted.get("heavy", 0) + weighted.get("light", 0)
    return {
        "quiet_alone": {"p50_ms": pct(alone, 50) * 1e3, "p99_ms": pct(alone, 99) * 1e3},
        "quiet_flooded": {"p50_ms": pct(flooded, 50) * 1e3, "p99_ms": pct(flooded, 99) * 1e3},
        "quiet_p99_ratio": pct(flooded, 99) / pct(alone, 99),
        "quiet_p50_ratio": statistics.median(flooded) / statistics.median(alone),
        "flood_served": served.get("flood", 0),
        "equal_served": equal,
        "jain": jain([float(equal.get(t, 0)) for t in ("t1", "t2", "t3", "t4")]),
        "weighted_served": weighted,
        "heavy_share": weighted.get("heavy", 0) / total_w if total_w else 0.0,
        "errors": {str(k): v for k, v in {**errors, **eq_err, **w_err}.items()},
    }


def render(report: dict[str, Any]) -> str:
    rows = [
        "| | fair queue | FIFO semaphore |",
        "|---|---:|---:|",
    ]
    f, s = report["fair"], report["fifo"]
    rows.append(f"| quiet tenant alone, p50 / p99 ms | {f['quiet_alone']['p50_ms']:.1f} / {f['quiet_alone']['p99_ms']:.1f} | {s['quiet_alone']['p50_ms']:.1f} / {s['quiet_alone']['p99_ms']:.1f} |")
    rows.append(f"| quiet tenant under a 3× flood, p50 / p99 ms | {f['quiet_flooded']['p50_ms']:.1f} / {f['quiet_flooded']['p99_ms']:.1f} | {s['quiet_flooded']['p50_ms']:.1f} / {s['quiet_flooded']['p99_ms']:.1f} |")
    rows.append(f"| **quiet p99, flooded / alone** | **{f['quiet_p99_ratio']:.2f}×** | **{s['quiet_p99_ratio']:.2f}×** |")
    rows.append(f"| quiet p50, flooded / alone | {f['quiet_p50_ratio']:.2f}× | {s['quiet_p50_ratio']:.2f}× |")
    rows.append(f"| Jain's index, 4 equal backlogged tenants | {f['jain']:.4f} | {s['jain']:.4f} |")
    rows.append(f"| heavy (weight 3) share vs light (weight 1); ideal 0.750 | {f['heavy_share']:.3f} | {s['heavy_share']:.3f} |")
    rows.append(f"| non-200 responses | {sum(f['errors'].values())} | {sum(s['errors'].values())} |")
    return "\n".join(rows) + "\n"


async def main_async(quick: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="weir-fair-"))
    py = str(VENV_BIN / "python")
    mock_port = free_port()
    report: dict[str, Any] = {"budget": BUDGET, "quick": quick}
    async with trio.open_nursery() as nursery:
        mock = Server("mock", [py, "-m", "mock", "--port", str(mock_port), "--workers", "2"], _weir_env(False), tmp / "mock.log", f"http://127.0.0.1:{mock_port}/_mock/stats")
        await mock.start(nursery)
        for policy in ("fair", "fifo"):
            cfg = tmp / f"{policy}.toml"
            cfg.write_text(_config(f"http://127.0.0.1:{mock_port}", policy))
            port = free_port()
            weir = Server(f"weir-{policy}", [py, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(cfg)], _weir_env(False), tmp / f"weir-{policy}.log", f"http://127.0.0.1:{port}/ready")
            await weir.start(nursery)
            try:
                report[policy] = await measure(f"http://127.0.0.1:{port}", quick)
            finally:
                await weir.stop()
            print(f"{policy}: {report[policy]}", file=sys.stderr)
        await mock.stop()
        nursery.cancel_scope.cancel()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    add_save_flag(p, "fairness-latest")
    ns = p.parse_args(argv)
    report = trio.run(main_async, ns.quick)
    md = render(report)
    written = record("fairness", "fairness-latest", {"json": msgspec.json.format(msgspec.json.encode(report)), "md": md}, save=ns.save)
    print(md)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
