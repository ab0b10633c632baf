"""SQLite L2: the embedded default, one file shared by a host's workers.

Every Hypercorn worker process opens the same file. WAL journaling lets
readers proceed while one writer commits, which is the cache's load shape
(many reads, fewer writes). ``synchronous=NORMAL`` is safe under WAL and skips
an fsync per commit: a power cut may lose the last entries, which for a cache
is a few misses.

sqlite3 blocks, so every call runs in a worker thread via
``trio.to_thread.run_sync`` under a ``CapacityLimiter``. Connections are kept
in a small idle pool and a thread takes one for the duration of a call — one
connection per concurrently running thread, never shared between two at once
— because trio's thread cache does not pin work to a thread and a
thread-local connection would leak whenever an idle thread exits. Several
threads (not a limiter of 1) because WAL readers run in parallel and sqlite3
releases the GIL while it works.

Size is bounded with LRU eviction: each row carries ``size`` and
``last_access``; a running total lives in a one-row meta table kept exact by
triggers (summing sizes per write would be O(rows)); a write that takes the
total over ``max_bytes`` deletes expired rows, then the least recently used,
in the same transaction. ``last_access`` is refreshed by reads at most once
per ``touch_interval`` so that hot keys do not turn every read into a write.

TTL: rows carry ``expires_at`` in wall-clock seconds (processes share no
monotonic clock); an expired row is a miss and is deleted when read.

A damaged file is moved aside and rebuilt at start (``open``), with one
warning: otherwise every call fails until someone deletes the file by hand.
SQLite says so with ``SQLITE_CORRUPT`` or ``SQLITE_NOTADB``. Opening checks
only what it must read anyway (header, schema, the meta row), because
``PRAGMA quick_check`` reads the whole file — seconds per worker for a 2 GB
cache; damage deeper in, met by a later call, leaves a ``-corrupt`` marker
beside the file so that the next start rebuilds it. Workers of one host
start together, so the check and the move run under an exclusive ``flock``
on ``<file>-lock``: the first worker moves the file, the others find the
fresh one.

Leases (cross-worker singleflight) are rows in their own table with an expiry;
claiming is an ``INSERT OR IGNORE`` after deleting an expired lease, in one
``BEGIN IMMEDIATE`` transaction, so exactly one worker wins.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import trio

from cache.l2 import L2Unavailable

__all__ = ["SQLiteL2"]

log = logging.getLogger("weir.cache")

# SQLite's primary result codes for a damaged file (sqlite3.h); extended codes
# carry them in the low byte.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _is_damage(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS weir_cache (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS weir_cache_lru ON weir_cache (last_access);
CREATE INDEX IF NOT EXISTS weir_cache_expiry ON weir_cache (expires_at);
CREATE TABLE IF NOT EXISTS weir_cache_meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    evictions INTEGER NOT NULL
);
INSERT OR IGNORE INTO weir_cache_meta VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS weir_cache_ins AFTER INSERT ON weir_cache BEGIN
    UPDATE weir_cache_meta SET bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS weir_cache_del AFTER DELETE ON weir_cache BEGIN
    UPDATE weir_cache_meta SET bytes = bytes - OLD.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS weir_cache_upd AFTER UPDATE OF size ON weir_cache BEGIN
    UPDATE weir_cache_meta SET bytes = bytes - OLD.size + NEW.size WHERE id = 0;
END;
CREATE TABLE IF NOT EXISTS weir_cache_leases (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
"""

# Schema creation runs once at startup, possibly racing other workers doing
# the same; waiting seconds there is harmless, unlike on a request.
_INIT_BUSY_TIMEOUT_MS = 5000


def _prefix_range(tenant_tag: str) -> tuple[str, str]:
    # ";" is the code point after ":", so [tag:, tag;) is exactly the keys
    # starting with "tag:" and the primary-key index answers it.
    return tenant_tag + ":", tenant_tag + ";"


class SQLiteL2:
    def __init__(
        self,
        path: str,
        *,
        max_bytes: int,
        # Longer than a normal write transaction under WAL (well under a
        # millisecond to a few ms), so workers contending for the write lock
        # queue instead of failing; short enough that a stuck writer costs a
        # request at most 0.1 s before it degrades to a cache miss.
        busy_timeout_ms: int = 100,
        # Two cores per host is our reference machine; a few more threads than
        # cores keeps WAL readers busy while others wait on the disk.
        threads: int = 4,
        # Refreshing last_access on every read would make every hit a write;
        # LRU order only needs to be right to within a few seconds.
        touch_interval: float = 5.0,
        # Wall clock, not trio's: expiry stamps are compared across processes.
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._busy_timeout_ms = busy_timeout_ms
        self._touch_interval = touch_interval
        self._clock = clock
        self._limiter = trio.CapacityLimiter(threads)
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._closed = False
        self._initialized = False
        self._marked_damaged = False
        self._hits = 0
        self._misses = 0
        self._errors = 0

    # -- plumbing ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves, so read-only calls
        # never hold a transaction open. check_same_thread=False because the
        # pool hands a connection to whichever thread runs next (never two at
        # once).
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=0)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._all.append(conn)
        return conn

    def _in_thread(self, fn: Callable[..., Any], args: tuple) -> Any:
        try:
            conn = self._idle.pop()  # list.pop is atomic; check-then-pop would race
        except IndexError:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise L2Unavailable(f"sqlite: {exc}") from exc
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection is returned to the pool either way
            if _is_damage(exc) and not self._marked_damaged:
                self._marked_damaged = True
                try:
                    open(self._path + "-corrupt", "w").close()  # the next start rebuilds it
                except OSError:
                    pass
            raise L2Unavailable(f"sqlite: {exc}") from exc
        finally:
            self._idle.append(conn)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise L2Unavailable("sqlite L2 is closed")
        try:
            if not self._initialized:
                # Concurrent first calls may both run this; it is idempotent.
                await trio.to_thread.run_sync(self._in_thread, self._init_schema, (), limiter=self._limiter)
                self._initialized = True
            return await trio.to_thread.run_sync(self._in_thread, fn, args, limiter=self._limiter)
        except L2Unavailable:
            self._errors += 1
            raise

    def _open_checked(self) -> str | None:
        """Open the file under the start-up lock; move a damaged one aside.
        Returns the reason it was moved, or None."""
        lock = os.open(self._path + "-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(self._path + "-corrupt"):
                reason = "a previous run found it damaged"
            else:
                try:
                    self._check(self._connect())
                    return None
                except sqlite3.Error as exc:
                    if not _is_damage(exc):
                        raise
                    reason = str(exc)
            for conn in self._all:
                conn.close()
            self._all.clear()
            # One aside copy at most: each can be as big as the cache.
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self._path + suffix):
                    os.replace(self._path + suffix, self._path + ".corrupt" + suffix)
            try:
                os.unlink(self._path + "-corrupt")
            except FileNotFoundError:
                pass
            self._check(self._connect())
            return reason
        finally:
            os.close(lock)  # releases the flock

    def _check(self, conn: sqlite3.Connection) -> None:
        self._init_schema(conn)
        conn.execute("SELECT bytes FROM weir_cache_meta WHERE id = 0").fetchone()
        self._idle.append(conn)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {_INIT_BUSY_TIMEOUT_MS}")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")

    # -- the queries, run in a worker thread ------------------------------

    def _get(self, conn: sqlite3.Connection, key: str, now: float) -> bytes | None:
        row = conn.execute(
            "SELECT value, expires_at, last_access FROM weir_cache WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        value, expires_at, last_access = row
        try:
            if expires_at <= now:
                # Guarded by expires_at: another worker may have just refreshed it.
                conn.execute("DELETE FROM weir_cache WHERE key = ? AND expires_at <= ?", (key, now))
                return None
            if last_access < now - self._touch_interval:
                conn.execute("UPDATE weir_cache SET last_access = ? WHERE key = ?", (now, key))
        except sqlite3.OperationalError:
            # Housekeeping lost the write lock race; the read itself is good.
            pass
        return value

    def _set(self, conn: sqlite3.Connection, key: str, value: bytes, ttl: float, now: float) -> None:
        size = len(value) + len(key)
        if size > self._max_bytes:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM weir_cache WHERE key = ?", (key,))
            conn.execute("COMMIT")
            return
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO weir_cache (key, value, size, expires_at, last_access) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size,"
            " expires_at = excluded.expires_at, last_access = excluded.last_access",
            (key, value, size, now + ttl, now),
        )
        self._evict(conn, now)
        conn.execute("COMMIT")

    def _evict(self, conn: sqlite3.Connection, now: float) -> None:
        (total,) = conn.execute("SELECT bytes FROM weir_cache_meta WHERE id = 0").fetchone()
        if total <= self._max_bytes:
            return
        conn.execute("DELETE FROM weir_cache WHERE expires_at <= ?", (now,))
        (total,) = conn.execute("SELECT bytes FROM weir_cache_meta WHERE id = 0").fetchone()
        excess = total - self._max_bytes
        if excess <= 0:
            return
        doomed = []
        for key, size in conn.execute("SELECT key, size FROM weir_cache ORDER BY last_access, key"):
            doomed.append((key,))
            excess -= size
            if excess <= 0:
                break
        conn.executemany("DELETE FROM weir_cache WHERE key = ?", doomed)
        conn.execute("UPDATE weir_cache_meta SET evictions = evictions + ? WHERE id = 0", (len(doomed),))

    def _delete(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute("DELETE FROM weir_cache WHERE key = ?", (key,))

    def _purge(self, conn: sqlite3.Connection, tenant_tag: str | None) -> int:
        if tenant_tag is None:
            return conn.execute("DELETE FROM weir_cache").rowcount
        low, high = _prefix_range(tenant_tag)
        return conn.execute("DELETE FROM weir_cache WHERE key >= ? AND key < ?", (low, high)).rowcount

    def _claim(self, conn: sqlite3.Connection, key: str, lease: float, now: float) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM weir_cache_leases WHERE key = ? AND expires_at <= ?", (key, now))
        won = conn.execute(
            "INSERT OR IGNORE INTO weir_cache_leases (key, expires_at) VALUES (?, ?)", (key, now + lease)
        ).rowcount
        conn.execute("COMMIT")
        return won == 1

    def _leased(self, conn: sqlite3.Connection, key: str, now: float) -> bool:
        row = conn.execute("SELECT 1 FROM weir_cache_leases WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
        return row is not None

    def _release(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute("DELETE FROM weir_cache_leases WHERE key = ?", (key,))

    def _shared_stats(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        (entries,) = conn.execute("SELECT count(*) FROM weir_cache").fetchone()
        total, evictions = conn.execute("SELECT bytes, evictions FROM weir_cache_meta WHERE id = 0").fetchone()
        return entries, total, evictions

    # -- the L2Backend interface -------------------------------------------

    async def get(self, key: str) -> bytes | None:
        value = await self._run(self._get, key, self._clock())
        if value is None:
            self._misses += 1
        else:
            self._hits += 1
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._run(self._set, key, value, ttl, self._clock())

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key)

    async def purge(self, tenant_tag: str | None) -> int:
        return await self._run(self._purge, tenant_tag)

    async def claim(self, key: str, lease: float) -> bool:
        return await self._run(self._claim, key, lease, self._clock())

    async def leased(self, key: str) -> bool:
        return await self._run(self._leased, key, self._clock())

    async def release(self, key: str) -> None:
        await self._run(self._release, key)

    async def stats(self) -> dict:
        entries, total, evictions = await self._run(self._shared_stats)
        return {
            "hits": self._hits,
            "misses": self._misses,
            "errors": self._errors,
            "entries": entries,
            "bytes": total,
            "max_bytes": self._max_bytes,
            "evictions": evictions,
        }

    async def aclose(self) -> None:
        """Close every connection. Call once no task uses this backend any
        more (its owner's nursery has exited)."""
        self._closed = True
        conns, self._all, self._idle = self._all, [], []
        for conn in conns:
            conn.close()

    async def open(self) -> None:
        """Check the file at start, moving a damaged one aside (module docstring).
        Any other failure leaves the schema to the first call, as before."""
        try:
            reason = await trio.to_thread.run_sync(self._open_checked)
        except (sqlite3.Error, OSError) as exc:
            self._errors += 1
            log.warning("cache: SQLite L2 %s cannot be opened, will retry on use: %s", self._path, exc)
            return
        self._initialized = True
        if reason is not None:
            log.warning("cache: SQLite L2 %s was damaged (%s): moved it to %s.corrupt and started an empty one", self._path, reason, self._path)

    async def __aenter__(self) -> SQLiteL2:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
