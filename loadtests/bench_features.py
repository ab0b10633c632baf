"""What each optional feature costs on the hot path: Weir with the ledger, the
metrics and tracing switched on and off, side by side in one run.

Run: ``.venv/bin/python -m loadtests.bench_features [--duration 5] [--rounds 2] [--save]``
(about 2 minutes with the defaults). Results go to
``loadtests/results/runs/features-<timestamp>.json|md`` (ignored by git);
``--save`` also writes ``loadtests/results/features-latest.json|md``.

The same machinery as ``loadtests/bench`` (its ``Bench``, ``Server`` and
pinning): the mock upstream and wrk share core 1, the Weir under test runs
alone on core 0, and every variant gets the same ~45 KB Claude Code body at
saturation (32 connections, non-streamed). Variants run round-robin
(A B C … A B C …) so a neighbour's burst of CPU lands on all of them rather
than on one; each row reports the median req/s of its rounds.

Variants, each a fresh ``weir serve --workers 1`` with its own data directory:

* ``bare``: ledger off, metrics off — the reference;
* ``metrics``: metrics on (the default), ledger off;
* ``ledger-sqlite``: the ledger on its default SQLite file, metrics off;
* ``defaults``: what ``weir serve`` runs with no config (SQLite ledger + metrics);
* ``ledger-postgres``: the ledger in PostgreSQL (``WEIR_TEST_DATABASE_URL`` or
  the local service), metrics off — skipped when PostgreSQL is not reachable;
* ``tracing``: defaults plus OpenTelemetry exporting every span over OTLP/HTTP
  to a sink on the load core (``loadtests/floor.py`` answers any POST) —
  skipped when the ``otel`` extra is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import trio

from .bench import RESULTS, VENV_BIN, Bench, BenchConfig, Server, _pin, _tree, _weir_env
from .procs import free_port
from .record import add_save_flag, record

_PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_url() -> str | None:
    url = os.environ.get("WEIR_TEST_DATABASE_URL", _PG_DEFAULT)
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=2):
            return url
    except Exception:  # noqa: BLE001 - any failure means "no PostgreSQL here"
        return None


def _has_otel() -> bool:
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return False
    return True


def variants(pg_url: str | None, sink_url: str | None) -> dict[str, dict[str, str]]:
    off = {"WEIR_LEDGER__URL": "off", "WEIR_METRICS__ENABLED": "false"}
    out = {
        "bare": off,
        "metrics": {"WEIR_LEDGER__URL": "off"},
        "ledger-sqlite": {"WEIR_METRICS__ENABLED": "false"},
        "defaults": {},
    }
    if pg_url is not None:
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        out["ledger-postgres"] = {"WEIR_LEDGER__URL": pg_url, "WEIR_LEDGER__PG_SCHEMA": schema, "WEIR_METRICS__ENABLED": "false"}
    if sink_url is not None:
        out["tracing"] = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink_url + "/v1/traces", "OTEL_SERVICE_NAME": "weir-bench"}
    return out


async def run(bench: Bench, rounds: int) -> dict[str, Any]:
    cfg, tmp = bench.cfg, bench.tmp
    py = str(VENV_BIN / "python")
    on_server = ["taskset", "-c", str(bench.server_core)] if cfg.pin else []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    mock_port = free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = Server("mock", [py, "-m", "mock", "--port", str(mock_port), "--output-tokens", str(cfg.output_tokens)], env, tmp / "mock.log", mock_url + "/_mock/stats")
    sink_port = free_port()
    sink = Server(
        "otlp-sink",
        [str(VENV_BIN / "hypercorn"), "-c", "python:proxy.hypercorn_conf.config", "--bind", f"127.0.0.1:{sink_port}", "loadtests.floor:app"],
        env, tmp / "sink.log", f"http://127.0.0.1:{sink_port}/",
    )  # fmt: skip
    pg_url = await trio.to_thread.run_sync(_pg_url)
    table = variants(pg_url, f"http://127.0.0.1:{sink_port}" if _has_otel() else None)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    async with trio.open_nursery() as nursery:
        await mock.start(nursery)
        if "tracing" in table:
            await sink.start(nursery)
            _pin(await trio.to_thread.run_sync(_tree, sink.pid), bench.load_core)
        _pin(await trio.to_thread.run_sync(_tree, mock.pid), bench.load_core)
        for r in range(rounds):
            for name, extra in table.items():
                port = free_port()
                data_dir = tmp / f"data-{name}"
                wenv = {**_weir_env(True), **extra, "WEIR_SERVER__DATA_DIR": str(data_dir)}
                argv = on_server + [py, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "1", "--upstream", mock_url]
                w = Server(name, argv, wenv, tmp / f"weir-{name}-{r}.log", f"http://127.0.0.1:{port}/ready")
                await w.start(nursery)
                row = await bench.measure(f"{name} (round {r + 1})", f"http://127.0.0.1:{port}", False, cfg.connections, w, mock=mock)
                results[name].append(row)
                await w.stop()
        nursery.cancel_scope.cancel()

    summary: dict[str, Any] = {}
    base = statistics.median(r["rps"] for r in results["bare"])
    for name, rows in results.items():
        rps = statistics.median(r["rps"] for r in rows)
        cpu = [r["cpu_s_per_1k"] for r in rows if r.get("cpu_s_per_1k")]
        summary[name] = {
            "rps_median": rps,
            "vs_bare": rps / base if base else None,
            "p99_ms_median": statistics.median(r["p99_ms"] for r in rows),
            "cpu_s_per_1k_median": statistics.median(cpu) if cpu else None,
            "failures": sum(r["failures"] for r in rows),
        }
    return {
        "meta": {"rounds": rounds, "duration_s": cfg.duration_s, "connections": cfg.connections, "pinned": cfg.pin, "loadavg_at_end": os.getloadavg(), "postgres": pg_url is not None},
        "scenarios": bench.rows,
        "summary": summary,
        "failures": bench.failures,
    }


def render(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        "# Feature cost: Weir with its ledger, metrics and tracing on and off (one run)",
        "",
        f"{m['rounds']} rounds × {m['duration_s']:g} s per variant, round-robin, {m['connections']} connections, "
        f"non-streamed 45 KB Claude Code body; {'pinned (Weir core 0, load core 1)' if m['pinned'] else 'not pinned'}; "
        f"load average at end {m['loadavg_at_end'][0]:.2f}.",
        "",
        "| variant | req/s (median) | × bare | p99 ms | CPU-s / 1k req | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["summary"].items():
        cpu = f"{s['cpu_s_per_1k_median']:.3f}" if s["cpu_s_per_1k_median"] else "–"
        lines.append(f"| {name} | {s['rps_median']:,.0f} | {s['vs_bare']:.3f} | {s['p99_ms_median']:.2f} | {cpu} | {s['failures']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests/bench_features", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=BenchConfig().connections)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    add_save_flag(p, "features-latest")
    ns = p.parse_args(argv)
    pin = not ns.no_pin and (os.cpu_count() or 1) >= 2
    cfg = BenchConfig(duration_s=ns.duration, connections=ns.connections, pin=pin, nolog=False)
    if cfg.pin:
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="weir-features-") as tmp:
        report = trio.run(run, Bench(cfg, Path(tmp)), ns.rounds)
    md = render(report)
    written = record("features", "features-latest", {"json": json.dumps(report, indent=2) + "\n", "md": md}, save=ns.save, out=Path(ns.out))
    print()
    print(md)
    print("written: " + ", ".join(str(p) for p in written))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
