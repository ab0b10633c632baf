"""L2 backends against the same contract: SQLite on a temp file (two
instances on one file standing in for two worker processes) and Redis."""

from __future__ import annotations

import functools
import sqlite3
import uuid

import pytest
import trio

from cache.l2 import L2Backend, L2Unavailable
from cache.redis import RedisL2
from cache.sqlite import SQLiteL2


class FakeWallClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall():
    return FakeWallClock()


@pytest.fixture
async def sqlite_l2(tmp_path, wall):
    async with SQLiteL2(str(tmp_path / "l2.db"), max_bytes=10_000, clock=wall) as l2:
        yield l2


# -- SQLite -------------------------------------------------------------------

async def test_sqlite_get_set_delete(sqlite_l2):
    assert isinstance(sqlite_l2, L2Backend)
    assert await sqlite_l2.get("t:a") is None
    await sqlite_l2.set("t:a", b"value-a", ttl=60)
    assert await sqlite_l2.get("t:a") == b"value-a"
    await sqlite_l2.set("t:a", b"value-a2", ttl=60)
    assert await sqlite_l2.get("t:a") == b"value-a2"
    await sqlite_l2.delete("t:a")
    assert await sqlite_l2.get("t:a") is None
    stats = await sqlite_l2.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes"]) == (2, 2, 0, 0)


async def test_sqlite_expired_rows_are_misses_and_deleted(sqlite_l2, wall):
    await sqlite_l2.set("t:a", b"v", ttl=10)
    wall.now += 9.9
    assert await sqlite_l2.get("t:a") == b"v"
    wall.now += 0.2
    assert await sqlite_l2.get("t:a") is None
    assert (await sqlite_l2.stats())["entries"] == 0


async def test_sqlite_evicts_least_recently_used_beyond_max_bytes(tmp_path, wall):
    async with SQLiteL2(str(tmp_path / "l2.db"), max_bytes=3 * 1_003, touch_interval=0, clock=wall) as l2:
        for k in ("t:0", "t:1", "t:2"):  # 1000-byte values + 3-byte keys: exactly full
            await l2.set(k, b"v" * 1000, ttl=60)
            wall.now += 1
        assert await l2.get("t:0") is not None  # touch: t:1 becomes the oldest
        wall.now += 1
        await l2.set("t:3", b"v" * 1000, ttl=60)
        assert await l2.get("t:1") is None
        for k in ("t:0", "t:2", "t:3"):
            assert await l2.get(k) is not None
        stats = await l2.stats()
        assert stats["bytes"] == 3 * 1_003 and stats["evictions"] == 1
        await l2.set("t:big", b"v" * 5000, ttl=60)  # bigger than the whole bound: not stored
        assert await l2.get("t:big") is None
        assert (await l2.stats())["entries"] == 3


async def test_sqlite_claim_is_exclusive_until_released_or_expired(sqlite_l2, wall):
    assert await sqlite_l2.claim("t:a", lease=5) is True
    assert await sqlite_l2.claim("t:a", lease=5) is False
    assert await sqlite_l2.leased("t:a") is True
    await sqlite_l2.release("t:a")
    assert await sqlite_l2.leased("t:a") is False
    assert await sqlite_l2.claim("t:a", lease=5) is True
    wall.now += 5.1  # the holder died: its lease lapses
    assert await sqlite_l2.leased("t:a") is False
    assert await sqlite_l2.claim("t:a", lease=5) is True


async def test_sqlite_purge_by_tenant_tag(sqlite_l2):
    for key in ("aaaa:1", "aaaa:2", "aaab:1", "aaa:1", "bbbb:1"):
        await sqlite_l2.set(key, b"v", ttl=60)
    assert await sqlite_l2.purge("aaaa") == 2
    assert await sqlite_l2.get("aaaa:1") is None
    for key in ("aaab:1", "aaa:1", "bbbb:1"):
        assert await sqlite_l2.get(key) == b"v"
    assert await sqlite_l2.purge(None) == 3


async def test_sqlite_returns_corrupt_rows_as_stored(sqlite_l2, tmp_path):
    """The backend is byte-transparent; detecting corruption is the tiered
    cache's job (see test_cache_tiered)."""
    await sqlite_l2.set("t:a", b"ok", ttl=60)
    with sqlite3.connect(tmp_path / "l2.db") as db:
        db.execute("UPDATE weir_cache SET value = ? WHERE key = 't:a'", (b"\xc1garbage",))
    assert await sqlite_l2.get("t:a") == b"\xc1garbage"


async def test_two_instances_on_one_file_are_one_cache(tmp_path, wall):
    path = str(tmp_path / "shared.db")
    async with SQLiteL2(path, max_bytes=100_000, clock=wall) as a, SQLiteL2(path, max_bytes=100_000, clock=wall) as b:
        await a.set("t:k", b"from-a", ttl=60)
        assert await b.get("t:k") == b"from-a"
        assert await a.claim("t:k", lease=5) is True
        assert await b.claim("t:k", lease=5) is False
        await b.delete("t:k")
        assert await a.get("t:k") is None

        async def hammer(l2, worker):
            for i in range(50):
                await l2.set(f"t:{worker}:{i}", b"x" * 100, ttl=60)
                assert await l2.get(f"t:{worker}:{i}") == b"x" * 100

        async with trio.open_nursery() as nursery:
            for worker in range(4):
                nursery.start_soon(hammer, a if worker % 2 else b, worker)
        stats = await a.stats()
        assert stats["entries"] == 200
        assert stats["bytes"] == sum(100 + len(f"t:{w}:{i}") for w in range(4) for i in range(50))


async def test_a_locked_database_is_l2_unavailable(tmp_path, wall):
    path = str(tmp_path / "locked.db")
    async with SQLiteL2(path, max_bytes=100_000, busy_timeout_ms=10, clock=wall) as l2:
        await l2.set("t:a", b"v", ttl=60)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(L2Unavailable):
                await l2.set("t:b", b"v", ttl=60)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert (await l2.stats())["errors"] == 1
        await l2.set("t:b", b"v", ttl=60)  # recovers once the lock is gone
    with pytest.raises(L2Unavailable):
        await l2.get("t:a")  # closed


def _damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "was damaged" in r.getMessage()]


async def test_a_file_that_is_not_a_database_is_moved_aside_and_rebuilt(tmp_path, wall, caplog):
    path = tmp_path / "cache.db"
    garbage = b"this is not an SQLite file " * 400
    path.write_bytes(garbage)
    async with SQLiteL2(str(path), max_bytes=100_000, clock=wall) as l2:
        await l2.set("t:a", b"v", ttl=60)
        assert await l2.get("t:a") == b"v"  # L2 is back, not off for good
        assert (await l2.stats())["errors"] == 0
    assert (tmp_path / "cache.db.corrupt").read_bytes() == garbage  # kept for a post-mortem
    assert len(_damage_warnings(caplog)) == 1
    async with SQLiteL2(str(path), max_bytes=100_000, clock=wall) as again:
        assert await again.get("t:a") == b"v"  # the rebuilt file is kept, not moved again
    assert len(_damage_warnings(caplog)) == 1


async def test_damage_found_by_a_later_call_is_rebuilt_at_the_next_start(tmp_path, wall, caplog):
    """Opening reads only the header, schema and meta row; a damaged index
    page turns up on a lookup, and the next start moves the file aside."""
    path = str(tmp_path / "cache.db")
    async with SQLiteL2(path, max_bytes=1_000_000, clock=wall) as l2:
        for i in range(50):
            await l2.set(f"t:{i}", b"x" * 1000, ttl=60)
    conn = sqlite3.connect(path)
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_weir_cache_1'").fetchone()
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    async with SQLiteL2(path, max_bytes=1_000_000, clock=wall) as l2:
        assert _damage_warnings(caplog) == []  # the cheap check passes…
        with pytest.raises(L2Unavailable, match="malformed"):
            await l2.get("t:1")  # …the lookup meets the damage
    async with SQLiteL2(path, max_bytes=1_000_000, clock=wall) as l2:
        assert await l2.get("t:1") is None  # empty, and working
        await l2.set("t:1", b"v", ttl=60)
        assert await l2.get("t:1") == b"v"
    assert len(_damage_warnings(caplog)) == 1 and (tmp_path / "cache.db.corrupt").exists()
    assert not (tmp_path / "cache.db-corrupt").exists()


async def test_workers_starting_together_move_a_damaged_file_once(tmp_path, wall, caplog):
    path = tmp_path / "cache.db"
    path.write_bytes(b"garbage" * 1000)
    async with trio.open_nursery() as nursery:
        opened: list[SQLiteL2] = []

        async def worker() -> None:
            l2 = SQLiteL2(str(path), max_bytes=100_000, clock=wall)
            await l2.open()
            opened.append(l2)

        for _ in range(4):
            nursery.start_soon(worker)
    await opened[0].set("t:a", b"v", ttl=60)
    assert [await l2.get("t:a") for l2 in opened] == [b"v"] * 4  # one file for all
    assert len(_damage_warnings(caplog)) == 1
    for l2 in opened:
        await l2.aclose()


# -- Redis ----------------------------------------------------------------------

@pytest.fixture
async def redis_l2(redis_url):
    prefix = f"weir:test:{uuid.uuid4().hex}:"
    async with RedisL2(redis_url, prefix=prefix) as l2:
        try:
            yield l2
        finally:
            # Leases included: leave nothing under this test's prefix.
            leftovers = [k async for k in l2._client.scan_iter(match=prefix + "*")]
            if leftovers:
                await l2._client.unlink(leftovers)


async def pttl_ms(l2: RedisL2, raw_key: str) -> int:
    return await l2._client.pttl(l2._prefix + raw_key)


async def test_redis_get_set_ttl_delete(redis_l2):
    assert isinstance(redis_l2, L2Backend)
    assert await redis_l2.get("t:a") is None
    await redis_l2.set("t:a", b"value", ttl=60)
    assert await redis_l2.get("t:a") == b"value"
    await redis_l2.delete("t:a")
    assert await redis_l2.get("t:a") is None
    # Redis expires keys on its own clock, which no mock reaches: check the
    # TTL it recorded instead of waiting for it.
    await redis_l2.set("t:b", b"short", ttl=2.5)
    assert 2_000 < await pttl_ms(redis_l2, "t:b") <= 2_500
    await redis_l2.set("t:c", b"tiny", ttl=0.0001)  # rounds up to 1 ms, never an error
    assert (await redis_l2.stats())["hits"] == 1


async def test_redis_claim_release_and_lapse(redis_l2):
    assert await redis_l2.claim("t:a", lease=5) is True
    assert await redis_l2.claim("t:a", lease=5) is False
    assert await redis_l2.leased("t:a") is True
    assert 4_000 < await pttl_ms(redis_l2, "lease:t:a") <= 5_000  # lapses on its own if we die
    await redis_l2.release("t:a")
    assert await redis_l2.leased("t:a") is False
    assert await redis_l2.claim("t:a", lease=5) is True


async def test_redis_purge_by_tenant_spares_others_and_leases(redis_l2):
    for i in range(1_200):  # more than one SCAN batch
        await redis_l2.set(f"aaaa:{i}", b"v", ttl=60)
    await redis_l2.set("bbbb:1", b"v", ttl=60)
    await redis_l2.claim("aaaa:1", lease=60)
    assert await redis_l2.purge("aaaa") == 1_200
    assert await redis_l2.get("aaaa:5") is None
    assert await redis_l2.get("bbbb:1") == b"v"
    assert await redis_l2.purge(None) == 1
    assert await redis_l2.leased("aaaa:1") is True
    await redis_l2.release("aaaa:1")


async def test_redis_down_is_l2_unavailable_and_fast():
    # Nothing listens on port 1: connection refused, immediately.
    async with RedisL2("redis://127.0.0.1:1/0", op_timeout=0.5) as l2:
        start = trio.current_time()
        with pytest.raises(L2Unavailable):
            await l2.get("t:a")
        with pytest.raises(L2Unavailable):
            await l2.set("t:a", b"v", ttl=1)
        assert trio.current_time() - start < 1.5
        assert (await l2.stats())["errors"] == 2


async def test_a_hung_redis_times_out_as_l2_unavailable():
    """A server that accepts and never answers must cost at most op_timeout."""
    async def black_hole(stream):
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, black_hole, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with RedisL2(f"redis://127.0.0.1:{port}/0", op_timeout=0.2, connect_timeout=0.2) as l2:
            start = trio.current_time()
            with pytest.raises(L2Unavailable):
                await l2.get("t:a")
            assert trio.current_time() - start < 1.0
        nursery.cancel_scope.cancel()
