"""PostgreSQL connections for the ledger's and the batches' stores
(proxy/ledger/postgres.py, proxy/batches/postgres.py).

psycopg 3's async API needs asyncio, so this is its sync
``psycopg_pool.ConnectionPool``, called from trio through ``trio.to_thread``
by the stores' async shells (no trio here). Every setting is chosen to fail
fast when the database vanishes, so a store answers "unavailable" in seconds
and its caller (the writer's spool, the batch API's 503) carries on.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

__all__ = ["PGPool"]


class PGPool:
    """One store's connections. ``name`` is the pool's and the connections'
    ``application_name`` (what ``pg_stat_activity`` shows); ``unavailable``
    is the store's own error (``LedgerUnavailable``, ``BatchUnavailable``),
    raised for a database that cannot be reached."""

    def __init__(self, url: str, *, schema: str, max_connections: int, connect_timeout_s: float, name: str, unavailable: type[Exception]) -> None:
        self._timeout = connect_timeout_s
        self._unavailable = unavailable
        self._opened = False
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            # A connection that died while the database was away is noticed
            # when taken, not mid-transaction.
            check=ConnectionPool.check_connection,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, int(connect_timeout_s)),
                "options": f"-c search_path={schema}",
                # A database that vanishes without a reset (a cut cable, a
                # black-holed route) fails the socket after this, instead of
                # after the kernel's ~15 minutes of retransmissions.
                "tcp_user_timeout": 10_000,
                "keepalives_idle": 10,
                "application_name": name,
            },
            timeout=connect_timeout_s,
            name=name,
        )

    def open(self) -> None:
        """Start connecting in the background (a database that is down at
        start does not stop Weir from starting); once, whoever asks first."""
        if not self._opened:
            self._pool.open(wait=False)
            self._opened = True

    def call(self, fn: Any, *args: Any, tx: bool = False) -> Any:
        """``fn(conn, *args)`` on a pooled connection, in one transaction when ``tx``."""
        try:
            with self._pool.connection(timeout=self._timeout) as conn:
                if not tx:
                    return fn(conn, *args)
                with conn.transaction():
                    return fn(conn, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise self._unavailable(f"postgresql: {exc}") from exc

    def close(self) -> None:
        self._pool.close()
