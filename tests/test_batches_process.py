"""A batch survives a real ``weir serve`` stopping mid-batch: SIGTERM lets the
items in flight finish and hands the rest back; after ``kill -9`` the
restarted server resumes it, items that were in flight run again once their
lease lapses, and every item ends exactly once. Real processes need real
time: the lease is a second."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.harness import running_mock
from tests.test_settings_cli import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parent.parent


def _start(tmp_path: Path, mock_url: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cfg = tmp_path / "weir.toml"
    cfg.write_text(
        f"""[server]
access_log = false
drain_s = 5
data_dir = "{tmp_path / 'data'}"
[cache]
mode = "off"
[ledger]
flush_interval_ms = 50
[batches]
lease_s = 1.0
poll_s = 0.1
sweep_s = 0.2
concurrency = 4
[auth]
client_keys = [{{ tenant = "team-a", key = "k-a" }}]
[[upstreams]]
name = "oai"
kind = "openai"
url = "{mock_url}/v1"
model = "mock-model"
"""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(cfg)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"weir-{port}.err").open("wb"),
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


async def _ready(tmp_path: Path, mock_url: str) -> tuple[subprocess.Popen, str]:
    proc, url = _start(tmp_path, mock_url)
    await trio.to_thread.run_sync(lambda: _wait_ready(url, proc, limit=60.0))
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_sigterm_and_kill_9_mid_batch_then_restart_end_every_item_once(tmp_path: Path) -> None:
    n = 40
    key = {"x-api-key": "k-a"}
    items = [{"custom_id": f"i{k}", "params": {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": f"question {k}"}]}} for k in range(n)]
    async with running_mock(latency_ms=100) as (mock, mock_url):
        proc, url = await _ready(tmp_path, mock_url)
        try:
            async with httpx.AsyncClient(base_url=url, headers=key, timeout=10) as c:
                created = await c.post("/v1/messages/batches", json={"requests": items})
                assert created.status_code == 200, created.text
                bid = created.json()["id"]
                with trio.fail_after(30):
                    while len(mock.requests) < 5:
                        await trio.sleep(0.01)
            # SIGTERM first: the items in flight finish, nothing is left leased to a process that is gone.
            proc.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=30)) == 0
            with sqlite3.connect(tmp_path / "data" / "ledger.db") as db:
                states = dict(db.execute("SELECT state, count(*) FROM batch_items WHERE batch_id = ? GROUP BY state", (bid,)).fetchall())
            assert "running" not in states and states.get("pending", 0) > 0, states
        finally:
            _stop(proc)
        after_sigterm = len(mock.requests)
        proc, url = await _ready(tmp_path, mock_url)
        try:
            with trio.fail_after(30):
                while len(mock.requests) < after_sigterm + 5:
                    await trio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # items in flight: leased to a process that is gone
            await trio.to_thread.run_sync(proc.wait)
            before = len(mock.requests)
            assert before < n
        finally:
            _stop(proc)
        proc, url = await _ready(tmp_path, mock_url)
        try:
            async with httpx.AsyncClient(base_url=url, headers=key, timeout=10) as c:
                with trio.fail_after(60):
                    while (b := (await c.get(f"/v1/messages/batches/{bid}")).json())["processing_status"] != "ended":
                        await trio.sleep(0.1)
                assert b["request_counts"] == {"processing": 0, "succeeded": n, "errored": 0, "canceled": 0, "expired": 0}
                r = await c.get(f"/v1/messages/batches/{bid}/results")
                assert r.status_code == 200
                ids = [httpx.Response(200, content=line).json()["custom_id"] for line in r.content.splitlines()]
        finally:
            _stop(proc)
    assert proc.returncode == 0  # SIGTERM: the runner drained and the process exited cleanly
    assert sorted(ids) == sorted(f"i{k}" for k in range(n))  # every item, each once
    # Items in flight at the kill went upstream again: more calls than items, one result each.
    assert len(mock.requests) >= n
    with sqlite3.connect(tmp_path / "data" / "ledger.db") as db:
        rows = db.execute("SELECT count(*), count(DISTINCT request_id) FROM ledger_requests WHERE batch_id = ?", (bid,)).fetchone()
    assert rows[0] >= n - 4  # a row per run (the last flush before the kill may be lost), never a result twice
