"""Cache keys: which requests are "the same request".

A key is ``f"{tenant_tag}:{digest}"``.

``tenant_tag`` is the first 16 hex digits of sha256(``"weir-tenant:" + tenant``).
It prefixes the key so that purge-by-tenant is a prefix match (a Redis
``SCAN MATCH``, an SQLite primary-key range) without the raw tenant id being
stored in the cache.

``digest`` is the sha256 hex of the canonical request, which is the msgspec
JSON encoding, keys sorted at every depth and no whitespace, of::

    ["weir-cache-v1", tenant, route, anthropic_version, betas, body]

- ``tenant`` is in the digest too, not only in the tag: a 64-bit tag collision
  between two tenants must at worst make a purge over-reach, never let one
  tenant read another's entry.
- ``route`` is the caller's name for the endpoint (e.g. ``/v1/messages``).
- ``anthropic_version`` is the header value, stripped.
- ``betas`` is the ``anthropic-beta`` header split on commas, each item
  stripped, empties dropped, de-duplicated and sorted: the header's order and
  repetition carry no meaning.
- ``body`` is the request JSON decoded, with the top-level *volatile* fields
  (``VOLATILE_FIELDS``) removed:

  - ``stream``: a delivery mode, not a question. A streamed and a
    non-streamed request share one entry; ``cache.messages`` converts a
    recorded stream into a body and back.
  - ``metadata``: Anthropic's ``metadata.user_id`` (Claude Code puts a
    per-session id there) is for abuse tracking and does not change the answer.
  - ``user``: the OpenAI-compatible equivalent of ``metadata.user_id``.

  Everything else is semantic and kept, including ``stream_options`` (it
  changes what an OpenAI stream contains) and ``temperature``.

Not normalized, on purpose: numeric spelling (``0`` and ``0.0`` are different
keys, as JSON decoders keep int and float apart) and the order of list items
(message order, tool order and stop-sequence order are all visible to the
model). The cost is an occasional extra miss, never a wrong hit.

The version tag ``weir-cache-v1`` changes whenever this recipe does, so old
entries simply stop matching.
"""

from __future__ import annotations

import hashlib

import msgspec

__all__ = ["VOLATILE_FIELDS", "cache_key", "canonical_request", "normalize_betas", "tenant_tag"]

VOLATILE_FIELDS = frozenset({"stream", "metadata", "user"})

# Bump when the canonical form changes: stale entries then miss instead of
# answering a request they were not recorded for.
_RECIPE = "weir-cache-v1"

# 16 hex digits = 64 bits: collisions between a host's tenants are
# negligible, and a collision only widens a purge (see module docstring).
_TAG_HEX = 16

_json_encoder = msgspec.json.Encoder(order="sorted")


def tenant_tag(tenant: str) -> str:
    return hashlib.sha256(b"weir-tenant:" + tenant.encode()).hexdigest()[:_TAG_HEX]


def normalize_betas(header: str) -> list[str]:
    return sorted({item.strip() for item in header.split(",") if item.strip()})


def canonical_request(*, tenant: str, route: str, anthropic_version: str, anthropic_beta: str, body: bytes) -> bytes:
    """The exact bytes hashed into the digest; public so a surprising miss can
    be debugged by diffing two requests' canonical forms."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        # Nested past msgspec's guard: not cacheable (the proxy refuses such bodies first).
        raise ValueError("request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("request body is not a JSON object")
    for field in VOLATILE_FIELDS:
        obj.pop(field, None)
    return _json_encoder.encode(
        [_RECIPE, tenant, route, anthropic_version.strip(), normalize_betas(anthropic_beta), obj]
    )


def cache_key(*, tenant: str, route: str, anthropic_version: str, anthropic_beta: str, body: bytes) -> str:
    canonical = canonical_request(
        tenant=tenant, route=route, anthropic_version=anthropic_version, anthropic_beta=anthropic_beta, body=body
    )
    return f"{tenant_tag(tenant)}:{hashlib.sha256(canonical).hexdigest()}"
