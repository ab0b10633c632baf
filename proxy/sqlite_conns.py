"""SQLite connections for the stores that share the host's ``ledger.db``:
the ledger (proxy/ledger/sqlite.py) and the batches (proxy/batches/sqlite.py).

A small idle pool, one connection taken per call by whichever thread runs it:
trio's thread cache does not pin work to a thread, so a connection per
thread would be a connection per call. cache/sqlite.py does the same for the
cache's L2 on its own (cache/ is a standalone library and imports nothing
from proxy/).

Every connection is in WAL mode, so the admin API reads while a worker's
writer commits, with a busy timeout for the write lock the host's workers
share. No trio here: the stores' async shells call these from threads.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

__all__ = ["SQLitePool"]


class SQLitePool:
    """The connections of one store to one file. ``unavailable`` is the store's
    own error (``LedgerUnavailable``, ``BatchUnavailable``): every
    ``sqlite3.Error`` a call meets is raised as that, so callers see one kind."""

    def __init__(self, path: str, busy_timeout_ms: int, unavailable: type[Exception]) -> None:
        self.path = path
        self._busy_ms = busy_timeout_ms
        self._unavailable = unavailable
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_ms / 1000)
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL under WAL: a power cut may lose the last commits, never
        # corrupt the file. The ledger's kill -9 bound is its writer's flush
        # interval anyway; a batch's lost finish is an item run again, a lost
        # create was never acknowledged to the client.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _take(self) -> sqlite3.Connection:
        # pop-or-connect in one step: a check and then a pop races with other
        # threads taking the last idle connection (IndexError).
        try:
            return self._idle.pop()
        except IndexError:
            return self._connect()

    def call(self, fn: Any, *args: Any, immediate: bool = False) -> Any:
        """``fn(conn, *args)`` on a pooled connection; inside one ``BEGIN
        IMMEDIATE`` transaction when ``immediate`` (rolled back on any error),
        else as ``fn`` manages it (rolled back on an SQLite error)."""
        try:
            conn = self._take()
        except sqlite3.Error as exc:
            raise self._unavailable(f"sqlite {self.path}: {exc}") from exc
        try:
            if not immediate:
                return fn(conn, *args)
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn, *args)
                conn.execute("COMMIT")
                return out
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._unavailable(f"sqlite {self.path}: {exc}") from exc
        finally:
            with self._lock:
                closed = self._closed
                if not closed:
                    self._idle.append(conn)
            if closed:
                conn.close()  # the pool was closed while this call ran (see close)

    def close(self) -> None:
        """Close the idle connections; one still running a call — a write the
        ledger's writer abandoned at its timeout or at shutdown, a read the
        admin API gave up on — is closed by its own thread as that call
        returns. Closing it from here, under the running statement, crashed
        the test process (SIGSEGV in the ledger's write, seen with batches
        sharing the file)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
