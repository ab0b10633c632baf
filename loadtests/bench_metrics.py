"""GET /metrics on a real ``weir serve --workers 2``: scrape time and size.

50 configured tenants x 10 models, every combination served by the mock
(once per worker, on average, over fresh connections), then the scrape timed
on whichever worker answers. Run: ``.venv/bin/python -m loadtests.bench_metrics``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

TENANTS = 50
MODELS = 10
ADMIN = "bench-admin"


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tempfile.mkdtemp(prefix="weir-bench-metrics-")
    config = os.path.join(data, "weir.toml")
    with open(config, "w") as f:
        f.write(f'[auth]\nadmin_key = "{ADMIN}"\n')
        f.write("[cache]\nl2 = \"none\"\nmode = \"off\"\n[server]\naccess_log = false\n")
        # A limit nobody reaches: the limiter reads every reply's usage, so the token series exist too.
        f.write("[ratelimit]\nrequests_per_minute = 1000000\n")
        for t in range(TENANTS):
            f.write(f'[[auth.client_keys]]\ntenant = "tenant-{t:02d}"\nkey = "key-{t:02d}"\n')
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "2", "--config", config, "--data-dir", data],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

        def one(i: int) -> int:
            t, m = divmod(i % (TENANTS * MODELS), MODELS)
            body = json.dumps({"model": f"claude-model-{m}", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
            with httpx.Client(base_url=url, timeout=30) as c:
                return c.post("/v1/messages", content=body, headers={"x-api-key": f"key-{t:02d}"}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(2 * TENANTS * MODELS)))
        assert set(codes) == {200}, set(codes)
        time.sleep(1.5)  # both workers' refresh beat has flushed
        times, size, series = [], 0, 0
        for _ in range(20):
            with httpx.Client(base_url=url, timeout=30) as c:
                t0 = time.perf_counter()
                r = c.get("/metrics", headers={"x-api-key": ADMIN})
                times.append(time.perf_counter() - t0)
            size = len(r.content)
            series = sum(1 for line in r.text.splitlines() if line and not line.startswith("#"))
            total = sum(float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line.startswith("weir_requests_total{"))
        print(f"requests counted {total:.0f} of {len(codes)}; series {series}; body {size / 1024:.1f} KiB")
        print(f"scrape: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms over {len(times)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
