"""Both batch stores, the same behaviour: SQLite (a temp file) and PostgreSQL
(a schema of the test's own on the real service). Times are chosen, never read."""

from __future__ import annotations

import json
import threading
import time

import msgspec
import pytest

from proxy.batches.model import Batch, Counts
from proxy.batches.store import Claim, open_store
from proxy.ledger.store import DAY_US

T0 = 1_764_633_600_000_000
S = 1_000_000
LEASE = 60 * S
P = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store("", str(tmp_path))
    else:
        s = open_store(request.getfixturevalue("database_url"), str(tmp_path), pg_schema=request.getfixturevalue("pg_schema"))
    assert s.migrate() == 1
    yield s
    s.close()


def make(store, n: int, *, tenant: str = "t1", bid: str | None = None, at: int = T0, expires_in: int = DAY_US) -> Batch:
    make.seq += 1
    b = Batch(id=bid or f"msgbatch_{make.seq:024d}", tenant=tenant, created_at=at, expires_at=at + expires_in)
    store.create(b, [(f"c{i}", P) for i in range(n)])
    return b


make.seq = 0


def test_migrate_is_idempotent_and_leaves_the_ledger_alone(store) -> None:
    assert store.migrate() == 1
    if store.kind == "sqlite":
        from proxy.ledger.service import open_store

        ledger = open_store("", str(__import__("os").path.dirname(store.path)))
        assert ledger.migrate() == 2  # its own version table (the ledger is at 2: batch_id), same file
        ledger.close()


def test_create_get_and_tenant_isolation(store) -> None:
    b = make(store, 3)
    got = store.get("t1", b.id)
    assert got is not None and got.counts == Counts(processing=3) and got.processing_status == "in_progress"
    assert (got.created_at, got.expires_at, got.mode, got.ended_at) == (T0, T0 + DAY_US, "weir", None)
    assert store.get("t2", b.id) is None
    assert store.get("t1", "msgbatch_nope") is None
    assert store.list("t2", limit=10) == ([], False)
    assert store.cancel("t2", b.id, T0) is None
    assert store.delete("t2", b.id) == "not_found"
    assert store.results("t2", b.id, -1, 10) == []


def test_list_pages_newest_first_both_ways(store) -> None:
    ids = [make(store, 1).id for _ in range(5)]
    make(store, 1, tenant="other")
    newest = ids[::-1]
    page, more = store.list("t1", limit=2)
    assert [b.id for b in page] == newest[:2] and more
    page, more = store.list("t1", after_id=page[-1].id, limit=2)
    assert [b.id for b in page] == newest[2:4] and more
    page, more = store.list("t1", after_id=page[-1].id, limit=2)
    assert [b.id for b in page] == newest[4:] and not more
    # before_id: the page just newer than the cursor, still newest first.
    page, more = store.list("t1", before_id=newest[4], limit=2)
    assert [b.id for b in page] == newest[2:4] and more
    page, more = store.list("t1", before_id=newest[1], limit=2)
    assert [b.id for b in page] == newest[:1] and not more
    assert store.list("t1", after_id="msgbatch_unknown", limit=2) == ([], False)
    assert store.list("other", after_id=newest[0], limit=2) == ([], False)


def finish_all(store, claims, now=T0, result="succeeded") -> None:
    for c in claims:
        assert store.finish(c, result, b'{"n":%d}' % c.idx, now)


def test_a_batch_runs_to_its_end_and_results_come_in_order(store) -> None:
    b = make(store, 5)
    claims = store.claim("w1", T0, LEASE, 10)
    assert sorted(c.idx for c in claims) == [0, 1, 2, 3, 4]
    assert all(c.tenant == "t1" and c.params == P and c.attempt == 1 for c in claims)
    assert store.claim("w2", T0, LEASE, 10) == []  # all leased
    finish_all(store, claims[:3])
    store.finish(claims[3], "errored", b'{"type":"error","error":{"type":"invalid_request_error","message":"no"}}', T0)
    assert store.sweep(T0 + 1) == []
    assert store.get("t1", b.id).counts == Counts(processing=1, succeeded=3, errored=1)
    assert store.delete("t1", b.id) == "not_ended"
    store.finish(claims[4], "succeeded", b'{"n":4}', T0)
    assert store.sweep(T0 + 2) == [b.id]
    got = store.get("t1", b.id)
    assert got.processing_status == "ended" and got.ended_at == T0 + 2 and got.counts == Counts(succeeded=4, errored=1)
    assert store.sweep(T0 + 3) == []
    first = store.results("t1", b.id, -1, 3)
    rest = store.results("t1", b.id, first[-1][0], 3)
    lines = [json.loads(line) for _, line in first + rest]
    assert [i for i, _ in first + rest] == [0, 1, 2, 3, 4]
    assert [ln["custom_id"] for ln in lines] == ["c0", "c1", "c2", "c3", "c4"]
    assert lines[0]["result"] == {"type": "succeeded", "message": {"n": 0}}
    assert lines[3]["result"]["type"] == "errored" and lines[3]["result"]["error"]["error"]["message"] == "no"
    assert store.delete("t1", b.id) == "deleted"
    assert store.get("t1", b.id) is None and store.results("t1", b.id, -1, 10) == []


def test_cancel_cancels_unclaimed_items_at_once_and_running_ones_finish(store) -> None:
    b = make(store, 4)
    running = store.claim("w1", T0, LEASE, 2)
    got = store.cancel("t1", b.id, T0 + 5)
    assert got.processing_status == "canceling" and got.cancel_initiated_at == T0 + 5
    assert got.counts == Counts(processing=2, canceled=2)
    assert store.claim("w2", T0 + 6, LEASE, 10) == []  # nothing more starts
    assert store.cancel("t1", b.id, T0 + 7).cancel_initiated_at == T0 + 5  # idempotent
    assert store.finish(running[0], "succeeded", b"{}", T0 + 8)
    assert store.sweep(T0 + 9) == []  # one still running
    assert store.release(running[1], T0)  # shed: a canceling batch cancels it instead of retrying
    assert store.sweep(T0 + 10) == [b.id]
    got = store.get("t1", b.id)
    assert got.processing_status == "ended" and got.counts == Counts(succeeded=1, canceled=3)
    kinds = [json.loads(line)["result"]["type"] for _, line in store.results("t1", b.id, -1, 10)]
    assert sorted(kinds) == ["canceled", "canceled", "canceled", "succeeded"]


def test_a_canceling_batch_whose_worker_died_still_ends(store) -> None:
    b = make(store, 2)
    store.claim("dead", T0, LEASE, 2)
    store.cancel("t1", b.id, T0)
    assert store.sweep(T0 + LEASE - 1) == []
    assert store.sweep(T0 + LEASE) == [b.id]
    assert store.get("t1", b.id).counts == Counts(canceled=2)


def test_claims_of_two_concurrent_workers_are_disjoint(store) -> None:
    make(store, 300)
    make(store, 300, tenant="t2")
    got: dict[str, list[Claim]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def worker(name: str) -> None:
        for _ in range(45):  # 45 rounds × 2 workers × 7 > 600: both run dry at the end
            start.wait()  # both claim at once, every round
            got[name] += store.claim(name, T0, LEASE, 7)

    threads = [threading.Thread(target=worker, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [(c.batch_id, c.idx) for c in got["a"] + got["b"]]
    assert len(keys) == 600 and len(set(keys)) == 600
    assert got["a"] and got["b"]


def test_claims_share_round_robin_across_tenants_and_batches(store) -> None:
    big = make(store, 100, tenant="big")
    small1 = make(store, 10, tenant="small")
    small2 = make(store, 10, tenant="small")
    cs = store.claim("w", T0, LEASE, 8)
    per = {b.id: sum(c.batch_id == b.id for c in cs) for b in (big, small1, small2)}
    assert per == {big.id: 4, small1.id: 2, small2.id: 2}
    # What a batch cannot use goes to the others.
    cs = store.claim("w", T0, LEASE, 40)
    per = {b.id: sum(c.batch_id == b.id for c in cs) for b in (big, small1, small2)}
    assert per == {big.id: 24, small1.id: 8, small2.id: 8}


def test_an_expired_lease_is_reclaimed_and_only_the_new_holder_finishes(store) -> None:
    b = make(store, 1)
    (old,) = store.claim("w1", T0, LEASE, 1)
    assert store.claim("w2", T0 + LEASE - 1, LEASE, 1) == []
    (new,) = store.claim("w2", T0 + LEASE, LEASE, 1)
    assert (new.idx, new.attempt) == (old.idx, 2) and new.lease != old.lease
    assert store.renew("w1", [old], T0 + LEASE, LEASE) == [old]  # w1 learns it lost it
    assert not store.finish(old, "succeeded", b'{"by":"w1"}', T0 + LEASE + 1)
    assert not store.release(old, T0)
    assert store.finish(new, "succeeded", b'{"by":"w2"}', T0 + LEASE + 2)
    assert not store.finish(new, "errored", b"{}", T0 + LEASE + 3)  # written once
    assert store.get("t1", b.id).counts == Counts(succeeded=1)
    ((_, line),) = store.results("t1", b.id, -1, 10)
    assert json.loads(line)["result"]["message"] == {"by": "w2"}


def test_renew_keeps_a_lease_alive(store) -> None:
    make(store, 1)
    (c,) = store.claim("w1", T0, LEASE, 1)
    assert store.renew("w1", [c], T0 + LEASE - 1, LEASE) == []
    assert store.claim("w2", T0 + LEASE + 1, LEASE, 1) == []
    assert len(store.claim("w2", T0 + 2 * LEASE, LEASE, 1)) == 1


def test_release_retries_later_without_a_result(store) -> None:
    b = make(store, 1)
    (c,) = store.claim("w1", T0, LEASE, 1)
    assert store.release(c, T0 + 10 * S)
    assert not store.finish(c, "succeeded", b"{}", T0)  # released: the lease is gone
    assert store.claim("w1", T0 + 10 * S - 1, LEASE, 1) == []
    (again,) = store.claim("w1", T0 + 10 * S, LEASE, 1)
    assert again.attempt == 2 and store.get("t1", b.id).counts == Counts(processing=1)


def test_expiry_expires_what_is_left_and_ends_the_batch(store) -> None:
    b = make(store, 3, expires_in=10 * S)
    c0, c1 = store.claim("w", T0, LEASE, 2)
    store.finish(c0, "succeeded", b"{}", T0 + 1)
    assert store.claim("w", T0 + 10 * S, LEASE, 5) == []  # past expiry: nothing starts
    assert store.sweep(T0 + 10 * S) == [b.id]
    got = store.get("t1", b.id)
    assert got.processing_status == "ended" and got.ended_at == T0 + 10 * S and got.counts == Counts(succeeded=1, expired=2)
    assert not store.finish(c1, "succeeded", b"{}", T0 + 10 * S + 1)  # too late: it expired
    assert [json.loads(line)["result"]["type"] for _, line in store.results("t1", b.id, -1, 10)] == ["succeeded", "expired", "expired"]


def test_two_sweepers_at_once_end_a_batch_once(store) -> None:
    b = make(store, 50, expires_in=10 * S)
    finish_all(store, store.claim("w", T0, LEASE, 10))
    start = threading.Barrier(2)
    ended: list[list[str]] = []

    def sweeper() -> None:
        start.wait()
        ended.append(store.sweep(T0 + 10 * S))

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ended, key=len) == [[], [b.id]]
    assert store.get("t1", b.id).counts == Counts(succeeded=10, expired=40)


def test_retain_drops_batches_ended_longer_ago_than_results_days(store, monkeypatch) -> None:
    monkeypatch.setattr(f"proxy.batches.{'postgres' if store.kind == 'postgresql' else 'sqlite'}.CHUNK", 2)  # several chunks
    old = make(store, 5)
    fresh = make(store, 1)
    store.cancel("t1", old.id, T0)
    store.sweep(T0)
    store.cancel("t1", fresh.id, T0 + 2 * DAY_US)
    store.sweep(T0 + 2 * DAY_US)
    assert store.retain(T0 + 2 * DAY_US, 1) == 1
    assert store.get("t1", old.id) is None and store.results("t1", old.id, -1, 10) == []
    assert store.get("t1", fresh.id) is not None and len(store.results("t1", fresh.id, -1, 10)) == 1
    make(store, 5, bid=old.id)  # no item of the old batch is left behind to collide with
    assert store.retain(T0 + 2 * DAY_US, 1) == 0


def test_passthrough_rows_are_records_only(store) -> None:
    b = Batch(id="msgbatch_pt", tenant="t1", created_at=T0, expires_at=T0 + DAY_US, mode="passthrough", target="anthropic", upstream_id="msgbatch_up")
    store.create(b, [])
    assert store.claim("w", T0, LEASE, 10) == [] and store.sweep(T0 + 1) == []
    got = store.get("t1", b.id)
    assert (got.mode, got.target, got.upstream_id, got.processing_status) == ("passthrough", "anthropic", "msgbatch_up", "in_progress")
    assert store.cancel("t1", b.id, T0).processing_status == "in_progress"  # the upstream cancels it
    store.sync("t2", b.id, "ended", Counts(succeeded=9), T0 + 1, None, None)  # another tenant's: ignored
    assert store.get("t1", b.id).processing_status == "in_progress"
    store.sync("t1", b.id, "ended", Counts(succeeded=2, errored=1), T0 + 3 * DAY_US, T0 + 2, None)
    got = store.get("t1", b.id)
    assert (got.processing_status, got.counts, got.ended_at, got.cancel_initiated_at) == ("ended", Counts(succeeded=2, errored=1), T0 + 3 * DAY_US, T0 + 2)
    assert store.list("t1", limit=5)[0][0].counts == got.counts
    never = msgspec.structs.replace(b, id="msgbatch_pt2")  # never synced: goes as if ended at its expiry
    store.create(never, [])
    assert store.retain(T0 + 30 * DAY_US, 29) == 0  # ended 27 days ago; expired 29 days ago
    assert store.retain(T0 + 33 * DAY_US, 29) == 2


def test_sync_leaves_weir_batches_alone(store) -> None:
    b = make(store, 2)
    store.sync("t1", b.id, "ended", Counts(succeeded=2), T0, None, None)
    assert store.get("t1", b.id).counts == Counts(processing=2)


def test_a_100000_item_batch_is_created_in_seconds_and_counted_in_a_row(store) -> None:
    items = [(f"c{i}", P) for i in range(100_000)]
    b = Batch(id="msgbatch_big", tenant="t1", created_at=T0, expires_at=T0 + DAY_US)
    t = time.perf_counter()
    store.create(b, items)
    created_s = time.perf_counter() - t
    assert created_s < 20, created_s  # a few seconds on this 2-core machine; minutes would be a row per round trip
    finish_all(store, store.claim("w", T0, LEASE, 50))
    t = time.perf_counter()
    for _ in range(50):
        got = store.get("t1", b.id)
    get_ms = (time.perf_counter() - t) * 1000 / 50
    assert got.counts == Counts(processing=99_950, succeeded=50)
    assert get_ms < 20, get_ms  # one row, not 100,000
    t = time.perf_counter()
    assert len(store.claim("w", T0, LEASE, 32)) == 32
    assert (time.perf_counter() - t) < 1
    print(f"\n{store.kind}: create 100k {created_s:.2f} s, get {get_ms:.2f} ms")


def test_sqlite_pool_survives_losing_the_last_idle_connection_to_another_thread(tmp_path) -> None:
    """Another thread takes the last idle connection between a look and a pop:
    the call connects anew instead of failing with IndexError."""
    s = open_store("", str(tmp_path))
    s.migrate()

    class Raced(list):
        def __bool__(self) -> bool:
            return True  # "one is idle" … and it is gone by the pop

    s._pool._idle = Raced()
    assert s.get("t1", "msgbatch_x") is None
    s.close()
