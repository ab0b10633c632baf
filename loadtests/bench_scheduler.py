"""Scheduler overhead per request with ~1,000 queued waiters: fair queue vs FIFO semaphore.

Run: ``.venv/bin/python loadtests/bench_scheduler.py [--waiters 1000] [--rounds 20]``

Each of ``waiters`` tasks from ``tenants`` tenants loops ``rounds`` times
through ``slot()`` with a body that only checkpoints, on ``capacity`` slots, so
about ``waiters - capacity`` tasks are queued at every moment. The same loop
without any scheduler (body only) is the baseline; overhead per request is
``(elapsed - baseline) / requests``. Both schedulers run in one process, one
after the other, on the real clock. No locust: it would monkey-patch trio away.

A second figure isolates the pure policy: enqueue + grant + release of one
ticket against a queue holding ``waiters`` tickets.
"""

from __future__ import annotations

import argparse
import gc
import time

import trio

from proxy.scheduler import FairQueue, FifoSemaphoreScheduler, Scheduler, Ticket


async def _run(sched, waiters: int, tenants: int, rounds: int) -> float:
    async def worker(i: int) -> None:
        tenant = f"t{i % tenants}"
        priority = "batch" if i % 10 == 0 else "interactive"
        for _ in range(rounds):
            if sched is None:
                await trio.lowlevel.checkpoint()
            else:
                async with sched.slot(tenant=tenant, priority=priority):
                    await trio.lowlevel.checkpoint()

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for i in range(waiters):
            n.start_soon(worker, i)
    return time.perf_counter() - t0


def _policy_ops(waiters: int, tenants: int, n: int) -> float:
    q = FairQueue(capacity=16, max_queue=waiters * 2)
    for i in range(waiters):
        q.enqueue(Ticket(f"t{i % tenants}", "interactive", 0.0))
    held = q.grant(0.0)
    t0 = time.perf_counter()
    for i in range(n):
        t = Ticket(f"t{i % tenants}", "interactive", 0.0)
        q.should_shed(t, 0.0)
        q.enqueue(t)
        q.release(held.pop())
        held.extend(q.grant(0.0))
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waiters", type=int, default=1_000)  # the brief's target load
    ap.add_argument("--tenants", type=int, default=50)  # many tenants: exercises the DRR ring
    ap.add_argument("--capacity", type=int, default=16)  # a typical per-target connection budget
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    requests = a.waiters * a.rounds

    def best(make) -> float:
        times = []
        for _ in range(a.repeats):
            gc.collect()
            times.append(trio.run(_run, make(), a.waiters, a.tenants, a.rounds))
        return min(times)

    base = best(lambda: None)
    fair = best(lambda: Scheduler(capacity=a.capacity, max_queue=a.waiters * 2))
    fifo = best(lambda: FifoSemaphoreScheduler(capacity=a.capacity, max_queue=a.waiters * 2))
    print(f"{a.waiters} waiters, {a.tenants} tenants, capacity {a.capacity}, {requests} requests")
    print(f"baseline (no scheduler): {base / requests * 1e6:7.2f} us/request")
    for name, t in (("fair queue", fair), ("fifo semaphore", fifo)):
        print(f"{name:>23}: {t / requests * 1e6:7.2f} us/request, overhead {(t - base) / requests * 1e6:6.2f} us")
    print(f"policy only (shed check + enqueue + grant + release at {a.waiters} queued): "
          f"{_policy_ops(a.waiters, a.tenants, 200_000) * 1e6:.2f} us")


if __name__ == "__main__":
    main()
