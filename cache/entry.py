"""The cache entry and its wire codec.

One codec serves both levels: L1 keeps entries in their encoded form (so its
byte accounting measures real bytes and a stored entry can never be mutated by
a caller holding a reference), and L2 stores the very same bytes. An entry is
encoded once per ``set`` and decoded once per hit.

msgpack with ``array_like=True`` drops field names from the encoding: smaller
rows, faster decode. The price is that fields may only ever be *appended* (with
defaults) — reordering them would misread every entry already stored in L2.
"""

from __future__ import annotations

import msgspec

__all__ = ["CorruptEntry", "Entry", "decode_entry", "encode_entry", "size"]


class CorruptEntry(ValueError):
    """Stored bytes are not a valid entry: a torn write, an older incompatible
    layout or a foreign value under our key. Callers treat it as a miss."""


class Entry(msgspec.Struct, array_like=True):
    """A recorded upstream reply, replayable as received.

    ``body`` holds a non-streamed reply, ``events`` a streamed one as its
    ordered raw SSE events (each exactly as received, framing included), so
    a replay is byte-identical. ``created_at`` is wall-clock epoch seconds
    because L2 is shared between processes (and hosts) that share no
    monotonic clock.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None
    events: list[bytes] | None
    usage: dict | None
    created_at: float
    ttl: float
    model: str = ""


# Built once: msgspec's encoders and typed decoders are reusable and much of
# their cost is construction.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(data: bytes) -> Entry:
    """Decode, folding every way bad bytes can fail into ``CorruptEntry`` so
    callers need exactly one except clause."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CorruptEntry(str(exc)) from exc


def size(entry: Entry) -> int:
    """Approximate footprint in bytes: the encoded length, which is what L1
    and L2 actually hold."""
    return len(_encoder.encode(entry))
