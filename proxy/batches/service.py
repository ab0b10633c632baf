"""The batches' trio shell: the store's calls in threads, the runner in the
app's lifespan, and the ``Batches`` object the app and the API hold.

The store blocks (sqlite3, psycopg's pool), as the ledger's does, so every
call runs in ``trio.to_thread`` (``AsyncBatchStore``); a database that is
away fails the call with the store's ``BatchUnavailable``, which the API
answers with a 503 and the runner retries at its next beat.

Batches live in the ledger's database (its SQLite file, or its PostgreSQL
URL and schema): with the ledger off there is nowhere durable to keep them,
and ``batches_enabled`` says no.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import trio

from .runner import BatchRunner, new_owner
from .store import BatchUnavailable, open_store

log = logging.getLogger("weir.batches")

# A store that is down at start is tried again after 1 s, doubling to a minute.
_MIGRATE_RETRY_S = 1.0
_MIGRATE_RETRY_MAX_S = 60.0

__all__ = ["AsyncBatchStore", "Batches", "WallClock", "batches_enabled", "serve_batches"]


def batches_enabled(settings: Any) -> bool:
    """Weir runs batches itself when they are on and the ledger has a database."""
    return bool(settings.batches.enabled) and settings.ledger.url != "off"


class AsyncBatchStore:
    """Every ``BatchStore`` method, same name and arguments, awaited.

    ``inline=True`` calls the store on the trio thread instead: for tests under
    a ``MockClock``, whose autojump would otherwise move time while a thread
    runs.
    """

    def __init__(self, store: Any, *, inline: bool = False) -> None:
        self.store = store
        self._inline = inline

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._inline:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        # Never abandoned: a call left running in its thread could still be
        # using a connection when the store is closed at shutdown (sqlite3
        # crashes the process on that). The stores bound their own calls
        # (SQLite's busy timeout, psycopg's connect and TCP user timeouts).
        return await trio.to_thread.run_sync(fn, *args)

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call(partial(fn, **kwargs) if kwargs else fn, *args)

        call.__name__ = name
        return call


class WallClock:
    """Wall-clock µs for the store, advancing with trio's clock from one
    reading of the wall clock at start: immune to the wall clock stepping
    while the worker runs, and under a ``MockClock`` it follows the test."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._t0 = trio.current_time()

    def now_us(self) -> int:
        return int((self._wall0 + (trio.current_time() - self._t0)) * 1e6)


class Batches:
    """What the app holds (``Weir.batches``): the async store, the settings,
    the clock the store is given, and the runner."""

    def __init__(self, settings: Any, store: AsyncBatchStore, runner: BatchRunner, clock: WallClock) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.now_us = clock.now_us
        # The tables exist (the store's migration ran): until then the API
        # answers 503 and the runner has not started.
        self.ready = False

    def wake(self) -> None:
        """A batch was created here: claim its items now, not at the next poll."""
        self.runner.wake()

    def stats(self) -> dict[str, Any]:
        return self.runner.stats()


async def serve_batches(app: Any, *, task_status: trio.TaskStatus[Batches] = trio.TASK_STATUS_IGNORED) -> None:
    """Open the store, run this worker's runner until cancelled, then close the
    store. ``app`` is the ``Weir``: its settings, and ``run_batch_item`` for
    each item.

    A database that is down at start does not stop Weir from starting (the
    ledger's rule too): the migration is retried with backoff, batch calls
    answer 503 meanwhile, and the runner starts once the tables exist."""
    settings = app.settings
    bs, ls = settings.batches, settings.ledger
    store = open_store(ls.url, settings.server.data_dir, pg_schema=ls.pg_schema)
    try:
        astore = AsyncBatchStore(store)
        clock = WallClock()

        async def execute(claim: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            return await app.run_batch_item(claim.tenant, claim.batch_id, claim.params)

        runner = BatchRunner(
            astore,
            execute,
            now_us=clock.now_us,
            owner=new_owner(),
            concurrency=bs.concurrency,
            claim_size=bs.claim_size,
            lease_s=bs.lease_s,
            poll_s=bs.poll_s,
            sweep_s=bs.sweep_s,
            results_days=bs.results_days,
            draining=lambda: app.draining,
            metrics=app.metrics,
        )
        batches = Batches(bs, astore, runner, clock)
        started = False
        wait = _MIGRATE_RETRY_S
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await astore.migrate()
                    break
                except BatchUnavailable as exc:
                    log.warning("batch store unavailable; batches wait for it (next try in %.0f s): %s", wait, exc)
                if not started:  # serve meanwhile: batch calls answer 503 until the tables exist
                    task_status.started(batches)
                    started = True
                await trio.sleep(wait)
                wait = min(wait * 2, _MIGRATE_RETRY_MAX_S)
            batches.ready = True
            await nursery.start(runner.run)
            if not started:  # the usual case: start-up waited for the migration
                task_status.started(batches)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
