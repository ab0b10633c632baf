"""Added latency: serial requests and synchronized bursts, direct to the mock vs through Weir.

Run: ``.venv/bin/python -m loadtests.latency [--requests 300] [--bursts 30]``
(about a minute). Needs ``hey`` (``apt-get install hey``).

Pinned like ``loadtests/bench.py``: Weir alone on core 0; hey and the mock on
core 1. The body is the benchmark's Claude-Code-shaped request (~45 KB).

* serial: ``hey -c 1 -n N``, direct and through Weir; added = through − direct
  at p50 and p99 (hey's own percentiles);
* bursts: ``hey -c 10 -n 10`` run ``--bursts`` times, every request's time
  kept (``-o csv``); p99 through Weir against Weir's CPU time per burst
  (its process's utime+stime over the bursts / bursts) — a burst cannot
  finish before the CPU it needs, so that is its floor.

Prints one JSON object. On a shared machine, compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .payload import claude_code_body, claude_code_headers
from .procs import free_port, stop

ROOT = Path(__file__).resolve().parents[1]


def _wait(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hey(url: str, body: Path, headers: dict[str, str], c: int, n: int, csv: bool = False) -> str:
    argv = ["taskset", "-c", "1", "hey", "-c", str(c), "-n", str(n), "-m", "POST", "-T", "application/json", "-D", str(body)]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    if csv:
        argv += ["-o", "csv"]
    return subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout


def _summary_ms(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        for pct in ("50%", "99%"):
            if line.startswith(pct + " in "):
                out["p" + pct[:-1]] = float(line.split()[2]) * 1000.0
    return out


def _csv_ms(text: str) -> list[float]:
    rows = text.strip().splitlines()[1:]
    return [float(r.split(",")[0]) * 1000.0 for r in rows if r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadtests.latency")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--bursts", type=int, default=30)
    ns = ap.parse_args(argv)
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="weir-latency-"))
    body = tmp / "body.json"
    body.write_bytes(claude_code_body(stream=False))
    headers = {k: v for k, v in claude_code_headers().items() if k.lower() != "content-type"}
    mport, wport = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_CACHE__L2": "none", "WEIR_SERVER__DATA_DIR": str(tmp)}
    procs = []
    try:
        mock = subprocess.Popen(["taskset", "-c", "1", py, "-m", "mock", "--port", str(mport), "--output-tokens", "100"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(mock)
        _wait(mport, mock)
        weir = subprocess.Popen(
            ["taskset", "-c", "0", py, "-m", "proxy.cli", "serve", "--port", str(wport), "--upstream", f"http://127.0.0.1:{mport}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(weir)
        _wait(wport, weir)
        direct, through = f"http://127.0.0.1:{mport}/v1/messages", f"http://127.0.0.1:{wport}/v1/messages"
        _hey(through, body, headers, 1, 50)  # warm both
        d = _summary_ms(_hey(direct, body, headers, 1, ns.requests))
        t = _summary_ms(_hey(through, body, headers, 1, ns.requests))
        direct_b: list[float] = []
        through_b: list[float] = []
        for _ in range(ns.bursts):
            direct_b += _csv_ms(_hey(direct, body, headers, 10, 10, csv=True))
        cpu0 = _cpu_s(weir.pid)
        for _ in range(ns.bursts):
            through_b += _csv_ms(_hey(through, body, headers, 10, 10, csv=True))
        burst_cpu_ms = (_cpu_s(weir.pid) - cpu0) / ns.bursts * 1000.0

        def p(xs: list[float], q: float) -> float:
            return statistics.quantiles(xs, n=100)[int(q) - 1]

        result = {
            "serial": {"direct": d, "through": t, "added_p50_ms": round(t["p50"] - d["p50"], 3), "added_p99_ms": round(t["p99"] - d["p99"], 3)},
            "burst10": {
                "direct_p50_ms": round(p(direct_b, 50), 3),
                "direct_p99_ms": round(p(direct_b, 99), 3),
                "through_p50_ms": round(p(through_b, 50), 3),
                "through_p99_ms": round(p(through_b, 99), 3),
                "weir_cpu_per_burst_ms": round(burst_cpu_ms, 3),
                "p99_over_cpu": round(p(through_b, 99) / burst_cpu_ms, 2) if burst_cpu_ms else None,
            },
        }
        print(json.dumps(result, indent=2))
    finally:
        stop(procs, timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
