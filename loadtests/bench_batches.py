"""A Message Batch run by Weir, against the mock's OpenAI endpoint: items per
second within the target's provider budget, and what the batch costs a quiet
interactive tenant.

    .venv/bin/python -m loadtests.bench_batches              # 10,000 items (a few minutes)
    .venv/bin/python -m loadtests.bench_batches --items 200  # smoke run

Starts the mock upstream (one process, every request ``--latency-ms`` long,
enforcing the provider's quota itself: past ``--rpm`` requests in any 60 s,
429) and one ``weir serve`` in front of it as an OpenAI-kind target with
that quota as its budget (``requests_per_minute``), the ledger on SQLite and
the cache off (every item is a real upstream call). Then:

* quiet alone: one tenant sends ``--quiet`` requests one at a time;
* the batch: another tenant creates one batch of ``--items`` items and polls
  it until it ended, while the quiet tenant repeats its run — its p99 during
  the batch against its p99 alone is the interference figure (issue 13's
  target: at most 1.2);
* items per second from creation to ``ended``, against the budget's own rate
  (``rpm / 60``): the batch may not go faster than the provider allows, and
  the mock's quota says whether it did (a 429 would show up as an item run
  that did not answer 200: ``item_runs_not_200``).

Results: loadtests/results/runs/batches-<timestamp>.json|md; ``--save`` also
overwrites the committed loadtests/results/batches-latest.json|md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from loadtests.bench import VENV_BIN, Server, _weir_env, read_proc_stat_cpu
from loadtests.procs import free_port
from loadtests.record import add_save_flag, record

ADMIN = "adm"
QUIET_BODY = b'{"model":"claude-haiku-4-5","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}'


def _config(mock_url: str, data_dir: Path, rpm: float, concurrency: int) -> str:
    return f"""
[server]
access_log = false
drain_s = 5
data_dir = "{data_dir}"
[cache]
mode = "off"
l2 = "none"
[ledger]
url = ""
[batches]
concurrency = {concurrency}
poll_s = 0.5
sweep_s = 1.0
[[upstreams]]
name = "mock"
kind = "openai"
url = "{mock_url}/v1"
model = "mock-model"
max_connections = 64
requests_per_minute = {rpm}
api_keys = ["sk-upstream"]
[auth]
admin_key = "{ADMIN}"
client_keys = [
  {{ tenant = "quiet", key = "key-quiet" }},
  {{ tenant = "batch", key = "key-batch" }},
]
"""


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")  # a batch shorter than the quiet tenant's warm-up
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def quiet_run(url: str, n: int, stop: trio.Event | None = None) -> tuple[list[float], int]:
    """``n`` requests one after another (or until ``stop``); their latencies,
    and how many did not answer 200."""
    out: list[float] = []
    bad = 0
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        for i in range(n + 3):  # the first three warm the connection: not measured
            if stop is not None and stop.is_set():
                break
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/messages", content=QUIET_BODY, headers={"x-api-key": "key-quiet"})
            if i >= 3:
                out.append(time.perf_counter() - t0)
                bad += r.status_code != 200
    return out, bad


def batch_body(items: int) -> bytes:
    reqs = [
        {"custom_id": f"item-{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": f"question number {i}"}]}}
        for i in range(items)
    ]
    return msgspec.json.encode({"requests": reqs})


def cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        return read_proc_stat_cpu(f.read())


async def run_batch(url: str, items: int, quiet_n: int, weir_pid: int) -> dict[str, Any]:
    body = batch_body(items)
    async with httpx.AsyncClient(base_url=url, timeout=120, headers={"x-api-key": "key-batch"}) as c:
        cpu0 = cpu_s(weir_pid)
        t0 = time.perf_counter()
        created = await c.post("/v1/messages/batches", content=body, headers={"content-type": "application/json"})
        created.raise_for_status()
        bid = created.json()["id"]
        create_s = time.perf_counter() - t0
        during: list[float] = []
        quiet_bad = 0
        done = trio.Event()

        async def quiet_while_running() -> None:
            nonlocal quiet_bad
            # The quiet tenant's requests for as long as the batch lasts (its
            # samples spread over the whole batch), and none after it ended.
            while not done.is_set():
                lat, bad = await quiet_run(url, quiet_n, done)
                during.extend(lat)
                quiet_bad += bad

        async with trio.open_nursery() as nursery:
            nursery.start_soon(quiet_while_running)
            while True:
                b = (await c.get(f"/v1/messages/batches/{bid}")).json()
                if b["processing_status"] == "ended":
                    break
                await trio.sleep(0.25)
            elapsed = time.perf_counter() - t0
            cpu = cpu_s(weir_pid) - cpu0  # the quiet tenant's requests included: a few per second
            done.set()
        lines = 0
        async with c.stream("GET", f"/v1/messages/batches/{bid}/results") as r:
            async for line in r.aiter_lines():
                lines += bool(line.strip())
        usage: list[dict[str, Any]] = []
        for _ in range(50):  # the ledger's writer flushes every 200 ms
            usage = (await c.get("/admin/usage", params={"group_by": "batch", "batch_id": bid}, headers={"x-api-key": ADMIN})).json()["data"]
            if usage and usage[0]["requests"] - usage[0]["errors"] >= items:
                break
            await trio.sleep(0.2)
    runs = usage[0] if usage else {"requests": 0, "errors": 0}
    return {
        "batch_id": bid,
        "create_s": create_s,
        "elapsed_s": elapsed,
        "items_per_s": items / elapsed,
        "weir_cpu_s": cpu,
        "weir_cpu_ms_per_item": cpu * 1e3 / items,
        "weir_cpu_share": cpu / elapsed,
        "request_counts": b["request_counts"],
        "result_lines": lines,
        "item_runs": runs["requests"],
        "item_runs_not_200": runs["errors"],
        "during": during,
        "quiet_not_200_during": quiet_bad,
    }


async def main_async(items: int, rpm: float, quiet_n: int, latency_ms: float, concurrency: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="weir-batches-"))
    py = str(VENV_BIN / "python")
    mock_port = free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    report: dict[str, Any] = {"items": items, "rpm": rpm, "budget_items_per_s": rpm / 60.0, "latency_ms": latency_ms, "concurrency": concurrency, "quiet_n": quiet_n}
    async with trio.open_nursery() as nursery:
        # The provider's quota, enforced by the mock itself on every request.
        fault = f"rate_limit={int(rpm)},rate_window=60"
        mock = Server("mock", [py, "-m", "mock", "--port", str(mock_port), "--latency-ms", str(latency_ms), "--fault", fault], _weir_env(False), tmp / "mock.log", f"{mock_url}/_mock/stats")
        await mock.start(nursery)
        cfg = tmp / "weir.toml"
        cfg.write_text(_config(mock_url, tmp / "data", rpm, concurrency))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        weir = Server("weir", [py, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(cfg)], _weir_env(False), tmp / "weir.log", f"{url}/ready")
        await weir.start(nursery)
        try:
            alone, alone_bad = await quiet_run(url, quiet_n)
            batch = await run_batch(url, items, quiet_n, weir.pid)
        finally:
            await weir.stop()
            await mock.stop()
        nursery.cancel_scope.cancel()
    during = batch.pop("during")
    report.update(batch)
    report["quiet_alone"] = {"p50_ms": pct(alone, 50) * 1e3, "p99_ms": pct(alone, 99) * 1e3, "n": len(alone), "not_200": alone_bad}
    report["quiet_during"] = {"p50_ms": pct(during, 50) * 1e3, "p99_ms": pct(during, 99) * 1e3, "n": len(during)}
    report["quiet_p99_ratio"] = pct(during, 99) / pct(alone, 99)
    report["quiet_p50_ratio"] = pct(during, 50) / pct(alone, 50)
    report["within_budget"] = report["items_per_s"] <= report["budget_items_per_s"] * 1.01 and report["item_runs_not_200"] == 0
    return report


def render(r: dict[str, Any]) -> str:
    c = r["request_counts"]
    rows = [
        "| | |",
        "|---|---:|",
        f"| items | {r['items']:,} ({c['succeeded']:,} succeeded, {c['errored']} errored, {c['expired']} expired); {r['result_lines']:,} result lines |",
        f"| create (POST, {r['items']:,} items) | {r['create_s'] * 1e3:.0f} ms |",
        f"| created → ended | {r['elapsed_s']:.1f} s |",
        f"| **items per second** | **{r['items_per_s']:.1f}** (budget {r['budget_items_per_s']:.1f}/s: requests_per_minute = {r['rpm']:g}) |",
        f"| item runs / not 200 (429s from the mock's quota would count here) | {r['item_runs']:,} / {r['item_runs_not_200']} |",
        f"| Weir's CPU while the batch ran | {r['weir_cpu_s']:.1f} s: {r['weir_cpu_ms_per_item']:.2f} ms an item, {r['weir_cpu_share'] * 100:.0f}% of a core |",
        f"| quiet tenant alone, p50 / p99 ms | {r['quiet_alone']['p50_ms']:.1f} / {r['quiet_alone']['p99_ms']:.1f} ({r['quiet_alone']['n']} requests) |",
        f"| quiet tenant during the batch, p50 / p99 ms | {r['quiet_during']['p50_ms']:.1f} / {r['quiet_during']['p99_ms']:.1f} ({r['quiet_during']['n']} requests) |",
        f"| **quiet p99, during / alone** (target ≤ 1.2) | **{r['quiet_p99_ratio']:.2f}×** |",
        f"| quiet p50, during / alone | {r['quiet_p50_ratio']:.2f}× |",
        f"| quiet requests not 200 during the batch | {r['quiet_not_200_during']} |",
    ]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=10_000, help="items in the batch (issue 13: 10,000)")
    # 12,000 a minute = 200 items/s: a 10,000-item batch in under a minute,
    # below what one Weir worker on 2 shared cores serves, so what is measured
    # is the batch held to its budget, not a saturated CPU.
    p.add_argument("--rpm", type=float, default=12_000, help="the target's requests_per_minute (its provider budget, enforced by the mock)")
    p.add_argument("--quiet", type=int, default=300, help="quiet-tenant requests alone (and per run during the batch): with 300, p99 is not one unlucky sample")
    p.add_argument("--latency-ms", type=float, default=100, help="the mock's time per request")
    p.add_argument("--concurrency", type=int, default=32, help="batches.concurrency: items in flight")
    add_save_flag(p, "batches-latest")
    ns = p.parse_args(argv)
    report = trio.run(main_async, ns.items, ns.rpm, ns.quiet, ns.latency_ms, ns.concurrency)
    md = render(report)
    written = record("batches", "batches-latest", {"json": msgspec.json.format(msgspec.json.encode(report)), "md": md}, save=ns.save)
    print(md)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
