"""Instructions per proxied request, counted by callgrind: the CPU figure a busy machine cannot blur.

Run: ``.venv/bin/python -m loadtests.instructions [--requests 200] [--floor]``
(about a minute; needs valgrind and hey: ``apt-get install valgrind hey``).

Wall-clock benchmarks on this shared 2-core machine move by 2-4x between
runs; valgrind's callgrind counts the instructions a process executes, which
repeat to within ~0.5% whatever else runs. Weir runs under callgrind with
counting off; after a warm-up, ``callgrind_control`` turns it on for
``--requests`` serial requests (``hey -c 1``, the benchmark's 45 KB
Claude-Code-shaped body, to the mock upstream), then dumps. ``--floor`` does
the same for the raw-ASGI floor of ``loadtests/bench.py`` under Hypercorn,
so the two counts give Weir's CPU as a multiple of the server's own.

What it does not count: the kernel's share (system calls, loopback TCP) and
waiting. Periodic work (the ledger's flush every 200 ms, the metrics
refresh) runs far more often per request under callgrind's ~50x slowdown, so
the count overstates it; compare builds with this script, not with the
wall-clock benchmarks. To compare two commits, run it from each checkout.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .payload import claude_code_body, claude_code_headers
from .procs import free_port, stop

ROOT = Path(__file__).resolve().parents[1]


def _hey(url: str, body: Path, headers: dict[str, str], n: int) -> None:
    argv = ["hey", "-c", "1", "-n", str(n), "-m", "POST", "-T", "application/json", "-D", str(body)]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    if f"[200]\t{n} responses" not in out:
        raise SystemExit(f"not every request answered 200:\n{out}")


def _wait_http(url: str, proc: subprocess.Popen, limit: float = 180.0) -> None:
    import httpx

    end = time.monotonic() + limit  # Python under callgrind starts ~50x slower
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer")


def _count(argv: list[str], env: dict[str, str], url: str, ready: str, body: Path, headers: dict[str, str], n: int, tmp: Path) -> float:
    out = tmp / "cg"
    out.mkdir()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p", *argv],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_http(ready, proc)
        _hey(url, body, headers, 30)  # warm: connections open, caches filled
        subprocess.run(["callgrind_control", "-i", "on"], capture_output=True, check=False)
        _hey(url, body, headers, n)
        subprocess.run(["callgrind_control", "-i", "off"], capture_output=True, check=False)
        subprocess.run(["callgrind_control", "-d"], capture_output=True, check=False)
    finally:
        stop([proc], timeout=30)
    total = 0
    for path in glob.glob(str(out / "cg.*")):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadtests.instructions")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--floor", action="store_true", help="also count the raw-ASGI floor")
    ns = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "hey"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="weir-instructions-"))
    body = tmp / "body.json"
    body.write_bytes(claude_code_body(stream=False))
    headers = {k: v for k, v in claude_code_headers().items() if k.lower() != "content-type"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_CACHE__L2": "none", "WEIR_SERVER__DATA_DIR": str(tmp / "data")}
    mport = free_port()
    mock = subprocess.Popen([py, "-m", "mock", "--port", str(mport), "--output-tokens", "100"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict[str, float] = {}
    try:
        _wait_http(f"http://127.0.0.1:{mport}/v1/models", mock)
        wport = free_port()
        (tmp / "w").mkdir()
        result["weir_instructions_per_request"] = round(_count(
            [py, "-m", "proxy.cli", "serve", "--port", str(wport), "--upstream", f"http://127.0.0.1:{mport}"], env,
            f"http://127.0.0.1:{wport}/v1/messages", f"http://127.0.0.1:{wport}/health", body, headers, ns.requests, tmp / "w",
        ))  # fmt: skip
        if ns.floor:
            fport = free_port()
            (tmp / "f").mkdir()
            hypercorn = str(Path(py).with_name("hypercorn"))
            result["floor_instructions_per_request"] = round(_count(
                [hypercorn, "-c", "python:proxy.hypercorn_conf.config", "--bind", f"127.0.0.1:{fport}", "loadtests.floor:app"], env,
                f"http://127.0.0.1:{fport}/v1/messages", f"http://127.0.0.1:{fport}/", body, headers, ns.requests, tmp / "f",
            ))  # fmt: skip
            result["weir_over_floor"] = round(result["weir_instructions_per_request"] / result["floor_instructions_per_request"], 3)
    finally:
        stop([mock], timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
