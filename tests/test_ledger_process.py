"""The ledger in a real ``weir serve`` process: SIGTERM flushes every row;
``kill -9`` loses at most the rows of the last flush interval; the CLI reads
what the admin API serves.

Real processes and signals need real time: timings are small and generous.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from proxy.cli import main
from tests.harness import body, weir_and_mock
from tests.test_settings_cli import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parent.parent
REQ = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'


def _start(tmp_path: Path, ledger: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cfg = tmp_path / "weir.toml"
    cfg.write_text(f"[server]\naccess_log = false\ndrain_s = 10\ndata_dir = \"{tmp_path / 'data'}\"\n[cache]\nmode = \"off\"\n[ledger]\n{ledger}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(cfg)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, limit=60.0)  # a loaded 2-core machine starts Python slowly
    return proc, url


def _rows(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "data" / "ledger.db") as conn:
        return [r for (r,) in conn.execute("SELECT request_id FROM ledger_requests ORDER BY started_at")]


def test_sigterm_flushes_every_row(tmp_path: Path) -> None:
    # Nothing would flush on its own for a minute: every row is in the buffer at SIGTERM.
    proc, url = _start(tmp_path, "flush_interval_ms = 60000\nflush_rows = 100000\nmax_buffer_rows = 100000")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            ids = [c.post("/v1/messages", content=REQ, headers={"x-api-key": "k"}).headers["x-request-id"] for _ in range(40)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(_rows(tmp_path)) == sorted(ids)


def test_kill_9_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    proc, url = _start(tmp_path, "flush_interval_ms = 200")
    done: list[tuple[str, float]] = []
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                r = c.post("/v1/messages", content=REQ, headers={"x-api-key": "k"})
                done.append((r.headers["x-request-id"], time.monotonic()))
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stored = set(_rows(tmp_path))
    lost = [rid for rid, _ in done if rid not in stored]
    # Lost rows are the newest ones only, and only those that ended within the
    # last flush interval (plus a generous margin for a loaded test machine).
    recent = {rid for rid, t in done if t >= killed - 0.2 - 1.0}
    assert set(lost) <= recent, (len(lost), len(done))
    assert [rid for rid, _ in done[: len(done) - len(lost)]] == [rid for rid, _ in done if rid in stored]


async def test_cli_usage_requests_and_dlq(tmp_path, capsys):
    sections = dict(
        server={"data_dir": str(tmp_path)},
        auth={"admin_key": "adm", "client_keys": [{"tenant": "cli-team", "key": "k-c"}]},
        ledger={"url": "", "flush_interval_ms": 20},
        retry={"max_attempts": 1},
    )
    async with weir_and_mock(**sections) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            ok = await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-c"})
            bad = await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-c", "x-mock-fault": "status=500"})
            assert (ok.status_code, bad.status_code) == (200, 500)
            with trio.fail_after(10):
                while not (await c.get("/admin/dlq", headers={"x-api-key": "adm"})).json()["data"]:
                    await trio.sleep(0.02)
        common = ["--url", weir.url, "--admin-key", "adm"]

        async def weir_cli(*args: str) -> tuple[int, str]:
            code = await trio.to_thread.run_sync(main, [*args, *common])
            return code, capsys.readouterr().out

        code, out = await weir_cli("usage", "--group-by", "tenant")
        assert code == 0 and "cli-team" in out and "cost_usd" in out
        code, out = await weir_cli("requests", "tail", "--once", "--since-s", "60")
        assert code == 0 and ok.headers["x-request-id"] in out and bad.headers["x-request-id"] in out
        code, out = await weir_cli("dlq", "list")
        assert code == 0 and bad.headers["x-request-id"] in out
        entry = out.splitlines()[1].split()[0]
        code, out = await weir_cli("dlq", "show", entry)
        assert code == 0 and '"request_id"' in out
        code, out = await weir_cli("dlq", "replay", entry)
        assert code == 0 and "HTTP 200" in out
        code = await trio.to_thread.run_sync(main, ["usage", "--url", weir.url, "--admin-key", "wrong"])
        assert code == 1 and "401" in capsys.readouterr().err
