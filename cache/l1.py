"""L1: the in-process cache, bounded by bytes and by each entry's TTL.

Built on cachetools' ``TLRUCache``: its ``ttu`` hook gives every entry its own
expiry, its ``timer`` is injected (the app passes ``trio.current_time`` so
tests run on trio's ``MockClock``), and ``getsizeof`` makes ``maxsize`` a byte
budget.

Entries are held encoded (``cache.entry.encode_entry``), not as ``Entry``
objects: the size of a bytes object is known exactly, whereas a decoded
entry's real footprint (lists, tuples, small strings) is several times its
payload and hard to measure. Decoding on every hit costs a few microseconds;
an honest byte bound is worth more. It also means a caller mutating the
``Entry`` it got back cannot corrupt the cached copy.

An item is charged ``len(blob) + len(key) + PER_ITEM_OVERHEAD``. The overhead
is the bookkeeping cachetools and CPython spend per item (dict slots in three
maps, an ``OrderedDict`` node, a heap ``_Item``, the key and bytes object
headers, the value tuple, the heap's lazily-removed items), measured with
tracemalloc under key churn (``tests/test_cache_l1.py::
test_memory_stays_within_bound_under_churn``); without it a cache of small
entries would overshoot its budget by half.
"""

from __future__ import annotations

from collections.abc import Callable

import cachetools

from cache.entry import CorruptEntry, Entry, decode_entry, encode_entry

__all__ = ["PER_ITEM_OVERHEAD", "L1Cache"]

# Measured with tracemalloc on CPython 3.11 / cachetools 8 under a churn of
# 1M distinct 81-character keys: real bookkeeping swings between ~600 and
# ~800 bytes per live item as the dicts resize and the heap compacts; 700 is
# the middle, which keeps traced memory within -13%/+9% of max_bytes for
# 200-byte entries and -7%/+1% for 2 KB ones.
PER_ITEM_OVERHEAD = 700


class _Store(cachetools.TLRUCache):
    """TLRUCache that counts capacity evictions (expiry is not eviction)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evictions = 0

    def popitem(self):
        item = super().popitem()
        self.evictions += 1
        return item


# Values are (blob, ttl, charge): the charge is computed once, when the key is
# known, because getsizeof sees only the value.
def _ttu(_key: str, value: tuple[bytes, float, int], now: float) -> float:
    return now + value[1]


def _charge(value: tuple[bytes, float, int]) -> int:
    return value[2]


class L1Cache:
    def __init__(self, *, max_bytes: int, default_ttl: float, timer: Callable[[], float]) -> None:
        """``default_ttl`` applies to entries whose own ``ttl`` is not positive;
        an entry's positive ``ttl`` always wins, as the writer knew best."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._max_bytes = max_bytes
        self._default_ttl = default_ttl
        self._store = _Store(maxsize=max_bytes, ttu=_ttu, timer=timer, getsizeof=_charge)
        self._hits = 0
        self._misses = 0

    def get(self, key: str) -> Entry | None:
        value = self._store.get(key)
        if value is None:
            self._misses += 1
            return None
        try:
            entry = decode_entry(value[0])
        except CorruptEntry:
            # Cannot happen for bytes we encoded ourselves; treat as a miss
            # rather than trust it.
            self._store.pop(key, None)
            self._misses += 1
            return None
        self._hits += 1
        return entry

    def set(self, key: str, entry: Entry) -> None:
        self.set_encoded(key, encode_entry(entry), entry.ttl)

    def set_encoded(self, key: str, blob: bytes, ttl: float) -> None:
        """Store an already-encoded entry (the tiered cache encodes once for
        both levels). ``ttl`` is seconds from now on the L1 timer; an entry
        larger than the whole budget is silently not stored."""
        if ttl <= 0:
            ttl = self._default_ttl
        charge = len(blob) + len(key) + PER_ITEM_OVERHEAD
        if charge > self._max_bytes:
            self._store.pop(key, None)  # a stale smaller version must not linger
            return
        self._store[key] = (blob, ttl, charge)

    def delete(self, key: str) -> None:
        self._store.pop(key, None)

    def purge(self, tenant_tag: str | None) -> int:
        """Drop every entry (``None``) or one tenant's; returns how many live
        entries were dropped. O(entries): an admin operation, not a hot path."""
        if tenant_tag is None:
            count = len(self._store)
            self._store.clear()
            return count
        prefix = tenant_tag + ":"
        doomed = [key for key in list(self._store.keys()) if key.startswith(prefix)]
        for key in doomed:
            self._store.pop(key, None)
        return len(doomed)

    def stats(self) -> dict:
        self._store.expire()
        return {
            "hits": self._hits,
            "misses": self._misses,
            "entries": len(self._store),
            "bytes": self._store.currsize,
            "max_bytes": self._max_bytes,
            "evictions": self._store.evictions,
        }
