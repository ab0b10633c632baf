"""The child processes a load script starts: a free port for each, a wait until
Weir answers ``/ready``, and a stop that never leaves one behind (SIGTERM,
then SIGKILL after ``timeout``)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable

__all__ = ["free_port", "stop", "wait_ready"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: Iterable[subprocess.Popen], timeout: float = 30) -> None:
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_ready(url: str, proc: subprocess.Popen, limit: float = 60.0) -> bool:
    """True once ``url/ready`` answers 200; False if ``proc`` exits or ``limit``
    passes first (60 s: a loaded 2-core machine starts Python slowly)."""
    import httpx

    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False
