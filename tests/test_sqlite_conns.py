"""proxy/sqlite_conns.py, the SQLite connections the ledger's and the batches' stores share."""

from __future__ import annotations

import sqlite3

import pytest

from proxy.batches.store import open_store as open_batch_store
from proxy.ledger.service import open_store as open_ledger_store


@pytest.mark.parametrize(("open_store", "table"), [(open_ledger_store, "ledger_requests"), (open_batch_store, "batches")], ids=["ledger", "batches"])
def test_close_leaves_a_connection_in_use_to_its_call(tmp_path, open_store, table) -> None:
    """A call still running when the store closes (a write the ledger's writer
    abandoned at shutdown) keeps its connection until it returns, then closes
    it: closed from another thread under a running statement, SQLite crashed
    the process (SIGSEGV, seen once batches shared the ledger's file)."""
    s = open_store("", str(tmp_path))
    s.migrate()
    used = []

    def during(conn):
        s.close()  # as the service's shutdown does, from another thread
        used.append(conn)
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    assert s._pool.call(during) == 0
    with pytest.raises(sqlite3.ProgrammingError):  # closed by the call itself, once it returned
        used[0].execute("SELECT 1")
