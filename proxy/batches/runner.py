"""Run Message Batch items: claim them with leases, send each through Weir's
own request path, write each result exactly once.

Two layers, as in ``proxy/scheduler.py``:

* ``judge`` and ``backoff`` are the policy, pure: an item's reply in, a
  ``Finish`` (the item's result) or a ``Retry`` (not now: try again later) out.
* ``BatchRunner`` is the trio shell, one per worker, in the app's lifespan
  nursery (nothing it starts outlives it). It claims items from the store
  (``BatchStore.claim``: leases, so several workers and hosts share a batch),
  runs at most ``concurrency`` at once, renews the leases of those in flight,
  finishes or releases each, and sweeps expiry, cancellation and retention.

Each item is an ordinary request to every layer below the app
(``Weir.run_batch_item``): the tenant's rate limit, the cache and its
coalescing, the router, the fair queue at ``batch`` priority (interactive
traffic is served first), the provider budget and the ledger. A reply that
says "not now" — a 429, a 529 shed by the fair queue, a 503 from an open
breaker or a draining worker, a timeout, an unreachable target — is not the
item's result: the item goes back to the store (``release``) and runs again
after a backoff. Anything else is its result: a message (``succeeded``) or
the error (``errored``).

Exactly once: an item that was in flight when its worker died is claimed
again once its lease ran out and runs again; the store's ``finish`` writes a
result only if the item has none, so a late finisher changes nothing.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
import trio

from ..errors import error_body, is_anthropic_error, type_for_status

__all__ = ["Finish", "Retry", "Verdict", "judge", "backoff", "BatchRunner", "new_owner"]

log = logging.getLogger("weir.batches")


class Finish(msgspec.Struct, frozen=True):
    """The item's result, written once: the message, or the error body."""

    result: Literal["succeeded", "errored"]
    payload: bytes


class Retry(msgspec.Struct, frozen=True):
    """Not the item's fault and not its answer: run it again after ``delay_s``.

    ``reason`` is the reply's status (one of ``_NOT_NOW``) or ``no_reply``: a
    fixed set, so it can be a metric's label."""

    delay_s: float
    reason: str


Verdict = Finish | Retry

# Replies that say "not now" rather than "this item is wrong": rate limited
# (Weir's own budget or the provider's), shed by the fair queue (529), an open
# breaker or a draining worker (503), a target that did not answer in time
# (504, 408) or could not be reached (502).
_NOT_NOW = frozenset((408, 429, 502, 503, 504, 529))
# First retry after 1 s, doubling to 5 minutes: a provider outage is waited out
# at a few calls an hour per item, well inside the batch's 24 h.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0


class _Message(msgspec.Struct):
    type: str


_message = msgspec.json.Decoder(_Message)


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name == b"retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None  # an HTTP date: rare from LLM APIs; the backoff covers it
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds before an item that was told "not now" on its ``attempt``-th
    run (1-based) may run again: exponential, capped, never before the
    upstream's own ``retry-after``."""
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** max(0, min(attempt - 1, 30)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, BACKOFF_CAP_S))
    return delay


def judge(status: int, headers: list[tuple[bytes, bytes]], body: bytes, attempt: int) -> Verdict:
    """An item's reply → its result, or a retry."""
    if status == 200:
        try:
            ok = _message.decode(body).type == "message"
        except msgspec.MsgspecError:
            ok = False
        if ok:
            return Finish("succeeded", body)
        return Finish("errored", error_body("api_error", "the upstream's reply was not a message"))
    if status == 0 or status in _NOT_NOW:
        return Retry(backoff(attempt, _retry_after(headers)), str(status) if status else "no_reply")
    if is_anthropic_error(body):
        return Finish("errored", body)
    return Finish("errored", error_body(type_for_status(status), f"HTTP {status}"))


def new_owner() -> str:
    """This worker's name on its leases: host, process, and a random tail (a
    restarted worker with a recycled pid is not its predecessor)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


Execute = Callable[[Any], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]]

# Store calls the shell makes when a worker stops: bounded, so a database that
# went away does not hold the shutdown (the lease covers what is not released).
_RELEASE_ON_EXIT_S = 2.0
# Retention runs once an hour; results are kept for days.
_RETAIN_EVERY_S = 3600.0
# finish() is retried this many times before the item is left to its lease.
_FINISH_TRIES = 3


class BatchRunner:
    """One worker's share of every batch in progress.

    ``store`` is the async store (``proxy.batches.service.AsyncBatchStore``);
    ``execute(claim)`` runs one item and returns (status, headers, body);
    ``now_us()`` is the wall clock the store is given (it never reads one).
    ``metrics`` (``proxy.metrics.Metrics``, or None when metrics are off)
    counts results and retries as they happen; the running gauge is read
    from ``in_flight`` on the app's refresh beat.
    """

    def __init__(
        self,
        store: Any,
        execute: Execute,
        *,
        now_us: Callable[[], int],
        owner: str,
        concurrency: int,
        claim_size: int,
        lease_s: float,
        poll_s: float,
        sweep_s: float,
        results_days: int,
        draining: Callable[[], bool] = lambda: False,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.now_us = now_us
        self.owner = owner
        self.concurrency = concurrency
        self.claim_size = claim_size
        self.lease_us = int(lease_s * 1e6)
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.sweep_s = sweep_s
        self.results_days = results_days
        self.draining = draining
        self.metrics = metrics
        self._running: dict[tuple[str, int], Any] = {}  # claims in flight, by (batch, idx): renewed together
        self._scopes: dict[tuple[str, int], trio.CancelScope] = {}  # each one's run, to stop it once it is no longer ours
        self.busy = 0  # slots taken: items in flight, and slots cooling after a retry
        self._more = False  # the last claim was a full page: more items are probably waiting
        self._stopping = False
        self._wake = trio.Event()
        self._sweep_wake = trio.Event()
        self._idle = trio.Event()
        self._finished_since_sweep = 0
        # Counters, for /admin/stats and the tests.
        self.succeeded = 0
        self.errored = 0
        self.retried = 0
        self.duplicates = 0  # finished elsewhere first (a lease that ran out)
        self.abandoned = 0  # stopped mid-run: the item expired, or its lease passed to another worker
        self.ended = 0

    # ------------------------------------------------------------ control

    def wake(self) -> None:
        """Look for items now (a batch was just created on this worker)."""
        self._more = True
        self._wake.set()

    def sweep_soon(self) -> None:
        """Sweep now (a batch was just cancelled: it may be able to end)."""
        self._sweep_wake.set()

    async def drain(self, timeout: float) -> None:
        """Stop claiming and wait up to ``timeout`` for the items in flight to end."""
        self._stopping = True
        self._wake.set()
        with trio.move_on_after(timeout):
            while self._running:
                self._idle = trio.Event()
                await self._idle.wait()

    @property
    def in_flight(self) -> int:
        """Items running on this worker now."""
        return len(self._running)

    def stats(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "in_flight": self.in_flight,
            "busy": self.busy,
            "concurrency": self.concurrency,
            "succeeded": self.succeeded,
            "errored": self.errored,
            "retried": self.retried,
            "duplicates": self.duplicates,
            "abandoned": self.abandoned,
            "ended": self.ended,
        }

    # ------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[BatchRunner] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. Items in flight when it is are released (or, if the
        store cannot be reached, left to their lease)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_leases)
            nursery.start_soon(self._sweeps)
            task_status.started(self)
            await self._claims(nursery)

    async def _claims(self, nursery: trio.Nursery) -> None:
        while True:
            if not self._stopping and not self.draining():
                free = self.concurrency - self.busy
                if free > 0:
                    want = min(free, self.claim_size)
                    claims = await self._claim(want)
                    for c in claims:
                        self._running[(c.batch_id, c.idx)] = c
                        self.busy += 1
                        nursery.start_soon(self._item, c)
                    self._more = len(claims) == want
                    if not self._more and self._finished_since_sweep:
                        self._sweep_wake.set()  # nothing left to claim here: a batch may have ended
                    if self._more and self.busy < self.concurrency:
                        continue  # a full page and room for more: claim again at once
            with trio.move_on_after(self.poll_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _claim(self, want: int) -> list[Any]:
        try:
            return await self.store.claim(self.owner, self.now_us(), self.lease_us, want)
        except Exception as exc:  # the store's BatchUnavailable, or a bug: both retried at the next poll
            log.warning("batch claim failed: %s", exc)
            return []

    async def _item(self, claim: Any) -> None:
        try:
            cool = await self._run(claim)
            if cool:
                await trio.sleep(cool)
        finally:
            self.busy -= 1
            if self._more:
                self._wake.set()

    async def _run(self, claim: Any) -> float:
        """Run one item and settle it; returns how long its slot should cool."""
        key = (claim.batch_id, claim.idx)
        settled = False
        cool = 0.0
        try:
            status, headers, body = 0, [], b""
            with trio.CancelScope() as scope:
                self._scopes[key] = scope
                try:
                    status, headers, body = await self.execute(claim)
                except Exception:
                    log.exception("batch item failed inside Weir", extra={"batch_id": claim.batch_id})
            verdict = judge(status, headers, body, claim.attempt)
            if scope.cancelled_caught:
                # Its batch expired or another worker holds it now: the result
                # is not ours to write, and the upstream call is not worth finishing.
                self.abandoned += 1
                settled = True
            elif isinstance(verdict, Finish):
                settled = await self._finish(claim, verdict)
            else:
                self.retried += 1
                if self.metrics is not None:
                    self.metrics.batch_retry(verdict.reason)
                # The slot cools too (up to a poll): an upstream saying "not
                # now" to everything is not asked again by every slot at once.
                cool = min(verdict.delay_s, self.poll_s)
                try:
                    await self.store.release(claim, self.now_us() + int(verdict.delay_s * 1e6))
                    settled = True
                except Exception as exc:
                    log.warning("batch item not released: %s", exc)
        finally:
            del self._running[key]
            self._scopes.pop(key, None)
            if not settled:
                with trio.move_on_after(_RELEASE_ON_EXIT_S) as cs:
                    cs.shield = True
                    try:
                        await self.store.release(claim, self.now_us())
                    except Exception as exc:
                        log.warning("batch item not released (its lease will lapse): %s", exc)
            if not self._running:
                self._idle.set()
        return cool

    async def _finish(self, claim: Any, verdict: Finish) -> bool:
        for attempt in range(_FINISH_TRIES):
            try:
                first = await self.store.finish(claim, verdict.result, verdict.payload, self.now_us())
            except Exception as exc:
                log.warning("batch item result not written (try %d): %s", attempt + 1, exc)
                await trio.sleep(0.5 * 2**attempt)
                continue
            self._finished_since_sweep += 1
            if not first:
                self.duplicates += 1
            else:
                if verdict.result == "succeeded":
                    self.succeeded += 1
                else:
                    self.errored += 1
                if self.metrics is not None:
                    self.metrics.batch_item(verdict.result)
            return True
        return False  # left to its lease: another run will write it

    async def _keep_leases(self) -> None:
        """Renew every lease in flight at a third of its length: two renewals
        may fail before another worker may take the item."""
        while True:
            await trio.sleep(self.lease_s / 3)
            if self._running:
                try:
                    lost = await self.store.renew(self.owner, list(self._running.values()), self.now_us(), self.lease_us)
                except Exception as exc:
                    log.warning("batch lease renewal failed: %s", exc)
                    continue
                self._stop({(c.batch_id, c.idx) for c in lost})

    def _stop(self, keys: set[tuple[str, int]]) -> None:
        """Stop the runs of items that are no longer this worker's."""
        for key in keys:
            scope = self._scopes.get(key)
            if scope is not None:
                scope.cancel()

    async def _sweeps(self) -> None:
        retained_at = -math.inf
        while True:
            now = trio.current_time()
            try:
                ended = await self.store.sweep(self.now_us())
                self._finished_since_sweep = 0
                self.ended += len(ended)
                if ended:
                    # An expired batch's items in flight here were just marked expired.
                    gone = set(ended)
                    self._stop({key for key in self._running if key[0] in gone})
                if now - retained_at >= _RETAIN_EVERY_S:
                    retained_at = now
                    await self.store.retain(self.now_us(), self.results_days)
            except Exception as exc:
                log.warning("batch sweep failed: %s", exc)
            with trio.move_on_after(self.sweep_s):
                await self._sweep_wake.wait()
            self._sweep_wake = trio.Event()
