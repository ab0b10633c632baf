"""Weir's caching core: keys, entries, L1, L2 backends, the tiered cache and
Anthropic stream/body conversion. Knows nothing of HTTP frameworks; the
proxy's handlers call it.

``RedisL2`` and ``SQLiteL2`` are imported from their modules
(``cache.redis``, ``cache.sqlite``) so that using one does not import the
other's driver.
"""

from cache.entry import CorruptEntry, Entry, decode_entry, encode_entry, size
from cache.keys import cache_key, canonical_request, normalize_betas, tenant_tag
from cache.l1 import L1Cache
from cache.l2 import L2Backend, L2Unavailable
from cache.messages import assemble_message, split_message, stream_is_complete
from cache.policy import CacheControl, is_cacheable_request, parse_cache_control
from cache.tiered import TieredCache

__all__ = [
    "CacheControl",
    "CorruptEntry",
    "Entry",
    "L1Cache",
    "L2Backend",
    "L2Unavailable",
    "TieredCache",
    "assemble_message",
    "cache_key",
    "canonical_request",
    "decode_entry",
    "encode_entry",
    "is_cacheable_request",
    "normalize_betas",
    "parse_cache_control",
    "size",
    "split_message",
    "stream_is_complete",
    "tenant_tag",
]
