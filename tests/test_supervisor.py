"""Worker supervision (proxy/supervisor.py): a worker that dies is restarted,
logged and counted, and the port keeps answering meanwhile. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from functools import partial

import httpx
import trio

from proxy.supervisor import FIRST_DELAY_S, MAX_DELAY_S, STABLE_S, read_state, restart_delay, supervise

from .harness import closed_port

ROOT = Path(__file__).resolve().parent.parent


def test_backoff_doubles_to_a_cap_and_resets_after_a_stable_run() -> None:
    delays, failures = [], 0
    for _ in range(10):
        delay, failures = restart_delay(failures, uptime_s=1)
        delays.append(delay)
    assert delays[:3] == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, 4 * FIRST_DELAY_S]
    assert delays[-1] == MAX_DELAY_S
    assert restart_delay(failures, uptime_s=STABLE_S) == (FIRST_DELAY_S, 1)


def _wait(predicate, what: str, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(tmp_path: Path) -> None:
    port = closed_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_CACHE__L2": "none", "WEIR_METRICS__PUBLIC": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "2", "--data-dir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    state_path = str(tmp_path / f"supervisor-{port}.json")
    url = f"http://127.0.0.1:{port}/health"

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        before = _wait(lambda: (s := read_state(state_path)) and len(s.workers) == 2 and answers() and s, "two workers")
        assert before.pid == proc.pid and before.worker_restarts == 0
        victim = before.workers[0]
        os.kill(victim, signal.SIGKILL)
        # Meanwhile the port answers: the kernel sends new connections to the live worker.
        failures = sum(not answers() for _ in range(20))
        assert failures == 0
        after = _wait(lambda: (s := read_state(state_path)) and len(s.workers) == 2 and s.worker_restarts == 1 and s, "a restart")
        assert victim not in after.workers and "SIGKILL" in after.last_exit
        assert answers()
        # The metrics engineer's counter, summed over the multiprocess directory.
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "weir_worker_restarts_total 1.0" in scrape, [l for l in scrape.splitlines() if "restarts" in l]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(state_path)
        assert b"worker died: restarting it" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_worker_that_dies_before_serving_is_not_restarted(tmp_path: Path) -> None:
    # Restarting cannot fix a start-up failure (bad config, a failing lifespan):
    # the supervisor stops and reports the worker's exit code.
    never_ready = [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"]
    with trio.fail_after(30):
        code = await supervise(b"{}", 2, 0, str(tmp_path / "state.json"), command=never_ready)
    assert code == 3
    assert not (tmp_path / "state.json").exists()


async def test_a_worker_that_dies_after_serving_is_restarted_and_counted(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    # Serves (writes to the ready fd), then dies a moment later: restarted each time.
    flaky = [sys.executable, "-c", "import os, sys, time; sys.stdin.read(); os.write(int(sys.argv[1]), b'1'); time.sleep(0.2); sys.exit(1)"]
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(supervise, b"{}", 1, 0, str(state), command=flaky))
            while (s := read_state(str(state))) is None or s.worker_restarts < 2:
                await trio.sleep(0.05)
            assert s.last_exit.endswith("exit code 1")
            nursery.cancel_scope.cancel()
    assert s.worker_restarts >= 2


def test_workers_drain_and_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """kill -9 on the supervisor must not leave orphan workers holding the port."""
    port = closed_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_CACHE__L2": "none", "WEIR_LEDGER__URL": "off"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "2", "--data-dir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state_path = str(tmp_path / f"supervisor-{port}.json")

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie is dead too (its parent, now init, reaps it when it gets to it).
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        workers = _wait(lambda: (s := read_state(state_path)) and len(s.workers) == 2 and s.workers, "two workers")
        proc.kill()
        proc.wait()
        _wait(lambda: not any(alive(pid) for pid in workers), "the orphaned workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in read_state(state_path).workers if os.path.exists(state_path) else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
