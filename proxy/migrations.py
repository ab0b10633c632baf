"""Versioned migrations for the ledger's and the batches' stores, on SQLite
and PostgreSQL alike.

Each store has its own version table (``ledger_schema``, ``batch_schema``)
so the stores evolve apart in one database. The caller holds the write lock
(SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's advisory lock) in one
transaction: one worker migrates, the rest wait, then find it done. No trio
here: the stores run this from threads.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["apply_migrations"]

# The version table and the row that records a version, per engine (they
# spell a timestamp and a parameter differently).
_SQL = {
    "sqlite": (
        "CREATE TABLE IF NOT EXISTS {t} (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        "INSERT INTO {t} VALUES (?, strftime('%s','now'))",
    ),
    "postgresql": (
        "CREATE TABLE IF NOT EXISTS {t} (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        "INSERT INTO {t} (version) VALUES (%s)",
    ),
}


def apply_migrations(conn: Any, engine: Literal["sqlite", "postgresql"], table: str, migrations: list[tuple[int, str]]) -> int:
    """Run, in order, each migration newer than the version ``table`` records,
    recording each; returns the version the database is now at."""
    create, record = (s.format(t=table) for s in _SQL[engine])
    conn.execute(create)
    have = conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}").fetchone()[0]
    for version, script in migrations:
        if version > have:
            for stmt in script.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(record, (version,))
            have = version
    return have
