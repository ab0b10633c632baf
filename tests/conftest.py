"""Shared fixtures.

Services (Redis, PostgreSQL) are read from ``WEIR_TEST_REDIS_URL`` and
``WEIR_TEST_DATABASE_URL``, defaulting to the local ones. A test that needs one
skips when it is unreachable — except under ``CI=true``, where a missing
service is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("WEIR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("WEIR_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Weir's default server.data_dir is the user's state directory
# (proxy/datadir.py): the tests, and the processes they start, get a private
# one instead, so they never write into the home of whoever runs them.
_STATE_HOME = tempfile.mkdtemp(prefix="weir-tests-state-")
os.environ["XDG_STATE_HOME"] = _STATE_HOME
os.environ.pop("STATE_DIRECTORY", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE_HOME, ignore_errors=True)


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def _need(url: str, port: int, what: str) -> str:
    if _reachable(url, port):
        return url
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} at {url} is unreachable, and CI=true forbids skipping")
    pytest.skip(f"{what} at {url} is unreachable")


@pytest.fixture
def redis_url() -> str:
    return _need(REDIS_URL, 6379, "Redis")


@pytest.fixture
def database_url() -> str:
    return _need(DATABASE_URL, 5432, "PostgreSQL")


# Time-based tests request pytest-trio's own ``autojump_clock`` fixture
# (``MockClock(autojump_threshold=0)``). Servers and clients run in the test's
# trio run and loopback writes land in the peer's buffer during the syscall,
# so "every task blocked" means "only timers are left": time may jump at once.


@pytest.fixture
def pg_schema(database_url: str):
    """A schema of its own for one test, dropped afterwards: parallel runs never collide."""
    import uuid

    import psycopg

    name = f"weir_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
