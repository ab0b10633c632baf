"""``weir serve --workers N``: N worker processes on one port, kept alive.

Defence in depth behind proxy/server.py: whatever kills a worker (a bug, the
OOM killer, a stray ``kill -9``), the supervisor starts a new one, with
exponential backoff so a worker that dies at once does not spin, logs it and
counts it. Workers bind the port each with ``SO_REUSEPORT``: while one is
down the kernel sends new connections to the others, so the port keeps
answering.

A worker that exits before it ever served (bad configuration, a failing
lifespan start-up) is not restarted: restarting cannot fix it, so the
supervisor stops the others and exits with its code. A worker says it serves
by writing to a pipe the supervisor gives it, once its listeners are open.

The count is published in a small JSON file, ``<data_dir>/supervisor-<port>.json``
(``SupervisorState``: the supervisor's pid, the live worker pids, restarts so
far, the last exit), rewritten atomically on every change. Each worker gets its
path in ``WEIR_SUPERVISOR_STATE``. With metrics on, the supervisor also counts
restarts in prometheus-client's multiprocess directory
(``weir_worker_restarts_total``) and marks a dead worker's gauges dead.

The backoff is a pure function (``restart_delay``); the trio shell around it
owns the processes and the signals: SIGTERM/SIGINT are forwarded to every
worker, which drains itself, and nothing is restarted after one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import trio

log = logging.getLogger("weir.supervisor")

__all__ = ["SupervisorState", "restart_delay", "supervise", "STATE_ENV", "SUPERVISOR_PID_ENV"]

STATE_ENV = "WEIR_SUPERVISOR_STATE"
# The supervisor's pid, so a worker can tell it was orphaned before it asked
# to die with its parent (proxy/cli.py _die_with_supervisor).
SUPERVISOR_PID_ENV = "WEIR_SUPERVISOR_PID"

# First restart after half a second (a worker's start-up takes about that), doubling
# to at most 30 s; a worker that ran STABLE_S before dying starts again from the first
# step. The same shape as systemd's Restart= with RestartSec and a burst window.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
STABLE_S = 60.0


def restart_delay(consecutive_failures: int, uptime_s: float) -> tuple[float, int]:
    """Delay before restarting a worker that died after ``uptime_s``, and the new
    count of consecutive failures (reset when the worker had run ``STABLE_S``)."""
    failures = 1 if uptime_s >= STABLE_S else consecutive_failures + 1
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (failures - 1)), failures


class SupervisorState(msgspec.Struct):
    pid: int
    port: int
    workers: list[int]  # pids of the live workers that are serving
    worker_restarts: int = 0
    last_exit: str = ""


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


WORKER_COMMAND = [sys.executable, "-m", "proxy.cli", "_worker"]


async def supervise(
    payload: bytes,
    workers: int,
    port: int,
    state_path: str,
    command: list[str] = WORKER_COMMAND,
    on_exit: Callable[[int], None] | None = None,
    on_restart: Callable[[], None] | None = None,
) -> int:
    """Run ``workers`` worker processes until a signal drains them; the exit code.

    A worker is ``command`` plus the number of the fd to write to once serving;
    it reads ``payload`` (the settings) from stdin. ``on_exit(pid)`` runs (in a
    thread) after any worker exits, ``on_restart()`` when one is restarted: the
    metrics' hooks (proxy/metrics.py)."""
    state = SupervisorState(pid=os.getpid(), port=port, workers=[])
    live: dict[int, trio.Process] = {}
    serving: set[int] = set()  # pids of live workers that reached serving
    stopping = trio.Event()
    codes: list[int] = []

    def publish() -> None:
        state.workers = sorted(p.pid for p in live.values() if p.pid in serving)
        tmp = f"{state_path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(state))
        os.replace(tmp, state_path)

    async def start(slot: int) -> tuple[trio.Process, bool]:
        """One worker; whether it reached serving (False: it died first)."""
        ready_r, ready_w = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(
                [*command, str(ready_w)],
                stdin=subprocess.PIPE,
                pass_fds=(ready_w,),
                # Its own session: a terminal's Ctrl-C reaches the supervisor
                # only, which forwards it once (twice would mean "stop now").
                start_new_session=True,
                env={**os.environ, STATE_ENV: state_path, SUPERVISOR_PID_ENV: str(os.getpid())},
            )
        finally:
            os.close(ready_w)
        live[slot] = proc
        # Settings (which may hold keys) go through stdin, not argv or the environment.
        assert proc.stdin is not None
        async with proc.stdin:
            try:
                await proc.stdin.send_all(payload)
            except trio.BrokenResourceError:
                pass  # it died already: the ready pipe says so
        async with trio.lowlevel.FdStream(ready_r) as ready:
            try:
                served = bool(await ready.receive_some(16))
            except trio.BrokenResourceError:
                served = False
        if served:
            serving.add(proc.pid)
            await trio.to_thread.run_sync(publish)
        return proc, served

    async def run_slot(slot: int, nursery: trio.Nursery) -> None:
        failures = 0
        while True:
            proc, served = await start(slot)
            started = trio.current_time()
            code = await proc.wait()
            del live[slot]
            serving.discard(proc.pid)
            if on_exit is not None:
                await trio.to_thread.run_sync(on_exit, proc.pid)
            if stopping.is_set():
                codes.append(code)
                await trio.to_thread.run_sync(publish)
                return
            if not served:
                log.error("worker %d exited before serving (%s): stopping", slot, _describe(code))
                codes.append(code or 1)
                stop(signal.SIGTERM)
                nursery.cancel_scope.deadline = trio.current_time() + 30
                return
            delay, failures = restart_delay(failures, trio.current_time() - started)
            state.worker_restarts += 1
            if on_restart is not None:
                on_restart()
            state.last_exit = f"worker {slot} (pid {proc.pid}): {_describe(code)}"
            log.error("worker died: restarting it", extra={"worker": slot, "pid": proc.pid, "exit": _describe(code), "restart_in_s": delay, "worker_restarts": state.worker_restarts})
            await trio.to_thread.run_sync(publish)
            with trio.move_on_at(trio.current_time() + delay):
                await stopping.wait()
            if stopping.is_set():
                return

    def stop(signum: int) -> None:
        stopping.set()
        for proc in list(live.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

    async def forward_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                stop(signum)  # a second signal is forwarded too: workers stop at once

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward_signals)
            async with trio.open_nursery() as slots:
                for slot in range(workers):
                    slots.start_soon(run_slot, slot, slots)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for proc in live.values():
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            try:
                os.unlink(state_path)
            except OSError:
                pass
    return max(codes, default=0)


def read_state(path: str) -> SupervisorState | None:
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=SupervisorState)
    except (OSError, msgspec.DecodeError):
        return None


def worker_restarts(environ: Any = os.environ) -> int | None:
    """For a worker: the supervisor's restart count, or None when not supervised."""
    path = environ.get(STATE_ENV)
    state = read_state(path) if path else None
    return None if state is None else state.worker_restarts
