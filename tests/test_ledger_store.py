"""Both ledger stores, the same behaviour: SQLite (a temp file) and PostgreSQL
(a schema of the test's own on the real service)."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import pytest

from proxy.ledger.service import open_store
from proxy.ledger.row import Bodies, DeadLetter, LedgerRow
from proxy.ledger.store import DAY_US, HOUR_US, Query

NOW = int(time.time() * 1e6)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store("", str(tmp_path))
    else:
        url = request.getfixturevalue("database_url")
        s = open_store(url, str(tmp_path), pg_schema=request.getfixturevalue("pg_schema"))
    s.migrate()
    yield s
    s.close()


def row(i: int, **kw) -> LedgerRow:
    base = dict(
        request_id=f"req_{i}",
        started_at=NOW + i,
        ended_at=NOW + i + 1000,
        tenant=f"t{i % 3}",
        model="claude-sonnet-4-5",
        target="primary",
        status=200,
        outcome="served",
        input_tokens=10,
        output_tokens=5,
        cost_micros=105,
        stream=bool(i % 2),
    )
    base.update(kw)
    return LedgerRow(**base)


def test_migrations_are_versioned_and_idempotent(store):
    assert store.migrate() == 2
    assert store.migrate() == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_database_gains_the_batch_column(backend, request, tmp_path, monkeypatch):
    """A ledger made before batches (migration 1 only) is brought to 2 in place."""
    import importlib

    module = importlib.import_module(f"proxy.ledger.{'sqlite' if backend == 'sqlite' else 'postgres'}")
    if backend == "sqlite":
        s = open_store("", str(tmp_path))
    else:
        s = open_store(request.getfixturevalue("database_url"), str(tmp_path), pg_schema=request.getfixturevalue("pg_schema"))
    try:
        with monkeypatch.context() as m:
            m.setattr(module, "MIGRATIONS", module.MIGRATIONS[:1])
            assert s.migrate() == 1
        assert s.migrate() == 2
        assert s.write([row(1, batch_id="msgbatch_a"), row(2)]) == 2
        assert s.request("req_1")["batch_id"] == "msgbatch_a" and s.request("req_2")["batch_id"] == ""
    finally:
        s.close()


def test_a_row_round_trips_field_for_field(store):
    r = row(1, project="p", ingress="openai", kind="agent", served_model="m2", key_id="pool#0:abcd", error_type="x", cache="miss",
            attempts=2, failover=1, cache_read_tokens=3, cache_creation_tokens=4, price_version="v1", queue_us=5, upstream_head_us=6,
            first_token_us=7, total_us=8, overhead_us=9, bytes_in=10, bytes_out=11, client="claude-cli", replay_of="dlq_x",
            method="POST", path="/v1/messages", batch_id="msgbatch_01")  # fmt: skip
    assert store.write([r]) == 1
    got = store.request("req_1")
    from proxy.ledger.row import row_to_dict

    assert got == row_to_dict(r)


def test_replayed_rows_are_stored_once_and_counted_once(store):
    rows = [row(i) for i in range(30)]
    assert store.write(rows) == 30
    assert store.write(rows[10:]) == 0  # a spool batch replayed twice
    assert store.write([row(30), *rows[:5]]) == 1
    usage = {u["tenant"]: u for u in store.usage("tenant", None, None)}
    assert sum(u["requests"] for u in usage.values()) == 31
    assert usage["t0"]["requests"] == 11 and usage["t0"]["input_tokens"] == 110
    assert usage["t0"]["cost_micros"] == 11 * 105 and usage["t0"]["cost_usd"] == pytest.approx(11 * 105 / 1e6)


def test_usage_groups_and_time_range(store):
    old = NOW - 3 * DAY_US
    store.write([row(1, tenant="a", model="m1", kind="agent"), row(2, tenant="a", model="m2", served_model="m3"), row(3, tenant="b", started_at=old)])
    # By the model that served (what was billed); equal costs order by name.
    assert [(u["model"], u["requests"]) for u in store.usage("model", None, None)] == [("claude-sonnet-4-5", 1), ("m1", 1), ("m3", 1)]
    recent = store.usage("tenant", NOW - HOUR_US, None)
    assert [(u["tenant"], u["requests"]) for u in recent] == [("a", 2)]
    assert [u["kind"] for u in store.usage("kind", None, NOW - DAY_US)] == [""]
    assert {u["target"] for u in store.usage("target", None, None)} == {"primary"}


def test_usage_per_batch_comes_from_the_items_rows(store):
    old = NOW - 3 * DAY_US
    store.write([
        row(1, batch_id="msgbatch_a"), row(2, batch_id="msgbatch_a", status=529, cost_micros=0, input_tokens=0, output_tokens=0),
        row(3, batch_id="msgbatch_b", cost_micros=500), row(4), row(5, batch_id="msgbatch_b", started_at=old),
    ])  # fmt: skip
    every = store.usage_by_batch(None, None, None)
    assert [(u["batch"], u["requests"], u["errors"], u["cost_micros"]) for u in every] == [("msgbatch_b", 2, 0, 605), ("msgbatch_a", 2, 1, 105)]
    assert [(u["batch"], u["requests"]) for u in store.usage_by_batch("msgbatch_b", NOW - HOUR_US, None)] == [("msgbatch_b", 1)]
    assert store.usage_by_batch("msgbatch_none", None, None) == []
    assert [r["request_id"] for r in store.requests(Query(batch_id="msgbatch_a", limit=10))] == ["req_2", "req_1"]


def test_request_lookup_filters_and_bodies(store):
    store.write([row(i, status=200 if i % 4 else 529, bodies=Bodies(request=b'{"q":1}', response=b"ok") if i == 4 else None) for i in range(12)])
    assert [r["request_id"] for r in store.requests(Query(status=529, limit=10))] == ["req_8", "req_4", "req_0"]
    assert [r["request_id"] for r in store.requests(Query(tenant="t1", limit=2))] == ["req_10", "req_7"]
    assert store.requests(Query(since=NOW + 10, limit=10))[-1]["request_id"] == "req_10"
    assert store.request("req_4")["bodies"] == {"request": '{"q":1}', "response": "ok"}
    assert "bodies" not in store.request("req_5")
    assert store.request("nope") is None
    tail = store.requests(Query(ended_since=NOW + 1000 + 11, limit=10))
    assert [r["request_id"] for r in tail] == ["req_11"]


def test_dead_letters_are_kept_and_marked_replayed(store):
    dl = DeadLetter(method="POST", path="/v1/messages", query="beta=true", headers=[("anthropic-version", "2023-06-01")], body=b'{"model":"x"}')
    store.write([row(1, status=502, error_type="api_error", dead_letter=dl), row(2)])
    store.write([row(1, status=502, error_type="api_error", dead_letter=dl)])  # replayed: still one entry
    entries = store.dlq_list(10, None)
    assert len(entries) == 1 and entries[0]["request_id"] == "req_1" and entries[0]["status"] == 502
    full = store.dlq_get(entries[0]["id"])
    assert full["body"] == b'{"model":"x"}' and full["headers"] == [("anthropic-version", "2023-06-01")] and full["query"] == "beta=true"
    store.dlq_mark(entries[0]["id"], "req_new", 200, NOW)
    assert store.dlq_get(entries[0]["id"])["replayed_request_id"] == "req_new"
    assert store.dlq_get("dlq_missing") is None


def test_retention_removes_old_rows_bodies_and_dead_letters(store):
    old = NOW - 40 * DAY_US
    mid = NOW - 10 * DAY_US
    dl = DeadLetter(method="POST", path="/v1/messages")
    store.write([row(1, started_at=old, dead_letter=dl), row(2, started_at=mid, bodies=Bodies(request=b"x"), dead_letter=dl), row(3, bodies=Bodies(request=b"y"))])
    done = store.retain(NOW, 30, 7, 7)
    assert done
    assert store.request("req_1") is None
    assert store.request("req_2") is not None and "bodies" not in store.request("req_2")
    assert store.request("req_3")["bodies"]["request"] == "y"
    assert store.dlq_list(10, None) == []
    # Usage rollups outlive the raw rows.
    assert sum(u["requests"] for u in store.usage("tenant", None, None)) == 3
    size = store.size()
    assert size["bytes"] > 0 and size["dlq_entries"] == 0


def test_concurrent_writers_keep_rollups_exact(store):
    """Eight writers upserting the same rollup rows at once: no deadlock, exact sums."""
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for b in range(5):
                store.write([row(w * 10_000 + b * 100 + i, tenant=f"t{i % 4}") for i in range(100)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(u["requests"] for u in store.usage("tenant", None, None)) == 8 * 500


def test_postgres_rows_live_in_daily_partitions(database_url, pg_schema, tmp_path):
    import psycopg

    s = open_store(database_url, str(tmp_path), pg_schema=pg_schema)
    s.migrate()
    s.write([row(1, started_at=NOW - 3 * DAY_US), row(2)])
    with psycopg.connect(database_url, autocommit=True) as conn:
        names = {n for (n,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'ledger_requests_p%%'", (pg_schema,))}
    assert len(names) >= 2
    dropped = s.retain(NOW, 2, 2, 7)
    assert len(dropped["ledger_requests"]) == 1  # the old day's partition, dropped whole
    s.close()
    assert urlsplit(database_url).scheme.startswith("postgres")
