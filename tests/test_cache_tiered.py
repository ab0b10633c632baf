"""The tiered cache: L2 hits are promoted, a sick L2 degrades to L1 without
raising, corrupt L2 values become misses and are removed, writes never block."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from cache.entry import Entry, encode_entry
from cache.l1 import L1Cache
from cache.l2 import L2Unavailable
from cache.sqlite import SQLiteL2
from cache.tiered import TieredCache

WALL = 1_700_000_000.0



def entry(ttl: float = 60.0, body: bytes = b'{"ok":true}') -> Entry:
    return Entry(200, [("content-type", "application/json")], body, None, None, WALL, ttl)


class MemoryL2:
    """An in-memory L2 that can be made to fail or stall on demand."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.leases: set[str] = set()
        self.down = False
        self.gate: trio.Event | None = None  # when set, writes wait for it
        self.deleted: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise L2Unavailable("down")

    async def get(self, key):
        self._check()
        return self.data.get(key)

    async def set(self, key, value, ttl):
        if self.gate is not None:
            await self.gate.wait()
        self._check()
        self.data[key] = value

    async def delete(self, key):
        self._check()
        self.deleted.append(key)
        self.data.pop(key, None)

    async def purge(self, tenant_tag):
        self._check()
        doomed = [k for k in self.data if tenant_tag is None or k.startswith(tenant_tag + ":")]
        for k in doomed:
            del self.data[k]
        return len(doomed)

    async def claim(self, key, lease):
        self._check()
        if key in self.leases:
            return False
        self.leases.add(key)
        return True

    async def leased(self, key):
        self._check()
        return key in self.leases

    async def release(self, key):
        self._check()
        self.leases.discard(key)

    async def stats(self):
        self._check()
        return {"entries": len(self.data)}

    async def aclose(self):
        pass


def l1() -> L1Cache:
    return L1Cache(max_bytes=1_000_000, default_ttl=60.0, timer=trio.current_time)


async def test_write_reaches_both_levels_and_l2_hits_are_promoted(autojump_clock):
    l2 = MemoryL2()
    async with trio.open_nursery() as nursery:
        writer = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL)
        writer.set("t:k", entry())
        assert await writer.get("t:k") == (entry(), "l1")
    assert "t:k" in l2.data  # the background write finished with the nursery

    async with trio.open_nursery() as nursery:
        # Another worker: empty L1, same L2.
        reader = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL + 10)
        assert await reader.get("t:k") == (entry(), "l2")
        assert await reader.get("t:k") == (entry(), "l1")
        # Promoted for the *remaining* 50 s of its life, not a fresh 60.
        await trio.sleep(50.1)
        l2.data.clear()
        assert await reader.get("t:k") is None
        stats = await reader.stats()
        assert stats["l1"]["hits"] == 1 and stats["l2"]["hits"] == 1 and stats["l2"]["misses"] == 1


async def test_an_expired_l2_entry_is_not_served(autojump_clock):
    l2 = MemoryL2()
    l2.data["t:k"] = encode_entry(entry(ttl=5))
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL + 6)
        assert await cache.get("t:k") is None


async def test_l2_down_degrades_to_l1_and_logs_rarely(autojump_clock, caplog):
    l2 = MemoryL2()
    l2.down = True
    log = logging.getLogger("test.tiered")
    caplog.set_level(logging.WARNING, logger="test.tiered")
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), l2, nursery=nursery, log=log, error_log_interval=30.0, wall_clock=lambda: WALL)
        assert await cache.get("t:missing") is None
        cache.set("t:k", entry())
        await trio.sleep(1)
        assert await cache.get("t:k") == (entry(), "l1")
        assert await cache.claim("t:x", lease=5) is True  # fill it yourself
        await cache.release("t:x")
        assert await cache.wait_filled("t:y", poll=0.1, timeout=5) is None
        stats = await cache.stats()
        assert stats["l2"]["l2_errors"] == 6
        assert len(caplog.records) == 1
        await trio.sleep(31)
        assert await cache.get("t:missing") is None
        assert len(caplog.records) == 2
        assert "L2 unavailable" in caplog.records[0].getMessage()


async def test_a_corrupt_l2_entry_is_a_miss_and_is_deleted(autojump_clock, caplog):
    l2 = MemoryL2()
    l2.data["t:k"] = b"\xc1 not msgpack"
    caplog.set_level(logging.WARNING, logger="test.tiered")
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), l2, nursery=nursery, log=logging.getLogger("test.tiered"), wall_clock=lambda: WALL)
        assert await cache.get("t:k") is None
    assert l2.deleted == ["t:k"] and "t:k" not in l2.data
    assert "corrupt" in caplog.records[0].getMessage()


async def test_corrupt_row_in_a_real_sqlite_l2_is_deleted(tmp_path, autojump_clock):
    import sqlite3

    path = str(tmp_path / "l2.db")
    async with SQLiteL2(path, max_bytes=1_000_000, clock=lambda: WALL) as l2:
        await l2.set("t:k", b"placeholder", ttl=60)
        with sqlite3.connect(path) as db:
            db.execute("UPDATE weir_cache SET value = ? WHERE key = 't:k'", (encode_entry(entry())[:-3],))
        async with trio.open_nursery() as nursery:
            cache = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL)
            assert await cache.get("t:k") is None
        assert (await l2.stats())["entries"] == 0


async def test_pending_l2_writes_are_bounded_and_set_never_blocks(autojump_clock):
    l2 = MemoryL2()
    l2.gate = trio.Event()  # L2 stalls every write until released
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), l2, nursery=nursery, log=None, max_pending_writes=3, wall_clock=lambda: WALL)
        start = trio.current_time()
        for i in range(10):
            cache.set(f"t:{i}", entry())
        assert trio.current_time() == start
        await trio.sleep(1)
        stats = await cache.stats()
        assert stats["l2"]["pending_writes"] == 3 and stats["l2"]["dropped_writes"] == 7
        assert [(await cache.get(f"t:{i}"))[1] for i in range(10)] == ["l1"] * 10
        l2.gate.set()
    assert sorted(l2.data) == ["t:0", "t:1", "t:2"]
    assert (await cache.stats())["l2"]["pending_writes"] == 0


async def test_wait_filled_returns_the_leaders_entry(autojump_clock):
    l2 = MemoryL2()
    async with trio.open_nursery() as nursery:
        leader = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL)
        follower = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL)
        assert await leader.claim("t:k", lease=30) is True
        assert await follower.claim("t:k", lease=30) is False

        async def lead():
            await trio.sleep(2)  # the upstream call
            leader.set("t:k", entry())
            await trio.sleep(0.5)  # the L2 write lands before release in real code too
            await leader.release("t:k")

        nursery.start_soon(lead)
        start = trio.current_time()
        assert await follower.wait_filled("t:k", poll=0.1, timeout=10) == entry()
        assert 2 <= trio.current_time() - start < 3


async def test_wait_filled_gives_up_when_the_lease_goes_or_time_runs_out(autojump_clock):
    l2 = MemoryL2()
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL)
        await cache.claim("t:k", lease=30)

        async def fail_and_release():
            await trio.sleep(1)
            await cache.release("t:k")

        nursery.start_soon(fail_and_release)
        start = trio.current_time()
        assert await cache.wait_filled("t:k", poll=0.1, timeout=10) is None
        assert 1 <= trio.current_time() - start < 1.5

        await cache.claim("t:other", lease=30)
        start = trio.current_time()
        assert await cache.wait_filled("t:other", poll=0.1, timeout=3) is None
        assert trio.current_time() - start == pytest.approx(3, abs=0.2)


async def test_no_l2_is_l1_only(autojump_clock):
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), None, nursery=nursery, log=None)
        cache.set("aaaa:k", entry())
        assert await cache.get("aaaa:k") == (entry(), "l1")
        assert await cache.claim("aaaa:k", lease=5) is True
        assert await cache.purge("aaaa") == 1
        assert await cache.get("aaaa:k") is None


async def test_purge_reaches_both_levels(autojump_clock):
    l2 = MemoryL2()
    async with trio.open_nursery() as nursery:
        cache = TieredCache(l1(), l2, nursery=nursery, log=None, wall_clock=lambda: WALL)
        cache.set("aaaa:1", entry())
        cache.set("bbbb:1", entry())
        await trio.sleep(1)
        assert await cache.purge("aaaa") == 1
        assert await cache.get("aaaa:1") is None
        assert await cache.get("bbbb:1") is not None
        l2.down = True
        with pytest.raises(L2Unavailable):
            await cache.purge(None)  # an operator must learn the purge did not happen
