"""Message Batches, pure: the batch record, the create body's validation, and
the JSON Anthropic's clients expect back.

Everything here is bytes in, bytes out, no I/O and no clock: the store
(``sqlite.py``, ``postgres.py``) keeps ``Batch`` records and item results,
the HTTP layer renders them with ``batch_json`` and ``result_line``. The
shapes follow the official SDK's types (``anthropic/types/messages/
message_batch*.py``), so ``client.messages.batches.*`` parses them.
"""

from __future__ import annotations

import re
import secrets
import string
from datetime import datetime, timedelta, timezone
from typing import Literal, NamedTuple

import msgspec

from ..errors import ProxyError
from ..ingress.anthropic import decode_envelope, decode_messages

__all__ = [
    "Batch",
    "Counts",
    "Item",
    "Limits",
    "Mode",
    "Status",
    "ItemResult",
    "CUSTOM_ID",
    "new_batch_id",
    "parse_create",
    "batch_json",
    "page_json",
    "deleted_json",
    "result_line",
    "rfc3339",
]

Mode = Literal["weir", "passthrough"]
Status = Literal["in_progress", "canceling", "ended"]
# What an item ends as; the first two are the runner's, the others the store's.
ItemResult = Literal["succeeded", "errored", "canceled", "expired"]

# Anthropic's rule for custom_id (Message Batches reference).
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class Counts(msgspec.Struct, frozen=True):
    """Items per state: ``processing`` is pending + running; the rest are ended items."""

    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0

    @property
    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired


class Batch(msgspec.Struct, kw_only=True):
    """One batch as the store keeps it. Times are µs since the epoch (wall clock).

    ``counts`` are the real per-state counts, always up to date (the admin
    view); ``batch_json`` shows clients what Anthropic shows. ``target`` and
    ``upstream_id`` are set for passthrough batches only (the Anthropic
    target that runs it, and its id there); those have no items here.
    """

    id: str
    tenant: str
    created_at: int
    expires_at: int
    mode: Mode = "weir"
    target: str = ""
    upstream_id: str = ""
    processing_status: Status = "in_progress"
    counts: Counts = Counts()
    ended_at: int | None = None
    cancel_initiated_at: int | None = None
    archived_at: int | None = None


class Item(NamedTuple):
    """One request of a batch: what ``BatchStore.create`` takes (a plain tuple)."""

    custom_id: str
    params: bytes  # the client's own bytes of the item's ``params``, a /v1/messages body


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    """What ``parse_create`` enforces; ``BatchSettings`` has the same fields."""

    # Anthropic's limits for one batch: 100,000 requests or 256 MB.
    max_requests: int = 100_000
    max_bytes: int = 256 * 1024 * 1024


_BASE62 = string.digits + string.ascii_letters


def new_batch_id() -> str:
    """``msgbatch_`` and 24 base62 characters, as Anthropic's ids look (~143 random bits)."""
    return "msgbatch_" + "".join(secrets.choice(_BASE62) for _ in range(24))


# -- the create body -----------------------------------------------------------


class _Request(msgspec.Struct):
    custom_id: str
    params: msgspec.Raw


class _Create(msgspec.Struct):
    requests: list[_Request]


_create_decoder = msgspec.json.Decoder(_Create)


def _bad(message: str) -> ProxyError:
    return ProxyError(400, message, "invalid_request_error")


def parse_create(body: bytes, limits: Limits | object) -> list[Item]:
    """The items of a ``POST /v1/messages/batches`` body, or a ``ProxyError``.

    Checked all at creation, so a batch the store accepts can run to the end:
    size and count limits, each ``custom_id`` (pattern, unique in the batch),
    and each item's ``params`` as a /v1/messages body through the ingress's
    own decoder — the same bytes a direct request would be refused for.
    ``stream: true`` is refused as Anthropic refuses it: a batch item's
    result is one message. Items keep the client's bytes of ``params``.
    """
    max_bytes: int = getattr(limits, "max_bytes")
    max_requests: int = getattr(limits, "max_requests")
    if len(body) > max_bytes:
        # Anthropic answers an oversized body with 413 request_too_large.
        raise ProxyError(413, f"batch body is {len(body)} bytes; the limit is {max_bytes}", "request_too_large")
    env: _Create = decode_envelope(_create_decoder, body)
    if not env.requests:
        raise _bad("requests: at least one request is required")
    if len(env.requests) > max_requests:
        raise _bad(f"requests: {len(env.requests)} requests in one batch; the limit is {max_requests}")
    seen: set[str] = set()
    items: list[Item] = []
    for i, req in enumerate(env.requests):
        cid = req.custom_id
        if not CUSTOM_ID.fullmatch(cid):
            raise _bad(f"requests.{i}.custom_id: {cid[:80]!r} must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'")
        if cid in seen:
            raise _bad(f"requests.{i}.custom_id: {cid!r} is used more than once; custom_id must be unique within the batch")
        seen.add(cid)
        params = bytes(req.params)
        try:
            env_i = decode_messages(params)
        except ProxyError as exc:
            raise _bad(f"requests.{i} (custom_id {cid!r}): params: {exc.message}") from None
        if env_i.stream:
            raise _bad(f"requests.{i} (custom_id {cid!r}): params.stream: streaming is not supported in a batch")
        items.append(Item(cid, params))
    return items


# -- what clients get back -----------------------------------------------------


class _RequestCounts(msgspec.Struct):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class _BatchOut(msgspec.Struct, tag_field="type", tag="message_batch"):
    id: str
    processing_status: str
    request_counts: _RequestCounts
    ended_at: str | None
    created_at: str
    expires_at: str
    archived_at: str | None
    cancel_initiated_at: str | None
    results_url: str | None


_encode = msgspec.json.Encoder().encode
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def rfc3339(us: int | None) -> str | None:
    """µs since the epoch as Anthropic writes times: ``2024-08-20T18:37:24.100435Z``."""
    if us is None:
        return None
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def results_url(batch_id: str, base: str) -> str:
    """Where the SDK's ``batches.results()`` fetches from: Weir itself, not past it."""
    return f"{base.rstrip('/')}/v1/messages/batches/{batch_id}/results"


def _out(b: Batch, base: str) -> _BatchOut:
    c = b.counts
    if b.processing_status == "ended" or b.mode == "passthrough":
        # A passthrough batch's counts are what its upstream last said (``sync``).
        counts = _RequestCounts(c.processing, c.succeeded, c.errored, c.canceled, c.expired)
    else:
        # Anthropic's contract (MessageBatchRequestCounts): requests count as
        # processing until the whole batch ends; the other tallies are zero
        # until then. The sum is always the batch's size.
        counts = _RequestCounts(c.total, 0, 0, 0, 0)
    return _BatchOut(
        id=b.id,
        processing_status=b.processing_status,
        request_counts=counts,
        ended_at=rfc3339(b.ended_at),
        created_at=rfc3339(b.created_at) or "",
        expires_at=rfc3339(b.expires_at) or "",
        archived_at=rfc3339(b.archived_at),
        cancel_initiated_at=rfc3339(b.cancel_initiated_at),
        # Specified only once processing ends (MessageBatch.results_url).
        results_url=results_url(b.id, base) if b.processing_status == "ended" else None,
    )


def batch_json(batch: Batch, results_url_base: str) -> bytes:
    """Anthropic's ``message_batch`` object; ``results_url_base`` is Weir's own
    origin as the client reached it (``http://host:port``)."""
    return _encode(_out(batch, results_url_base))


class _Page(msgspec.Struct):
    data: list[_BatchOut]
    has_more: bool
    first_id: str | None
    last_id: str | None


def page_json(batches: list[Batch], has_more: bool, results_url_base: str) -> bytes:
    """A list page as the SDK's ``SyncPage`` pages on: ``first_id`` feeds
    ``before_id``, ``last_id`` feeds ``after_id``."""
    return _encode(
        _Page(
            data=[_out(b, results_url_base) for b in batches],
            has_more=has_more,
            first_id=batches[0].id if batches else None,
            last_id=batches[-1].id if batches else None,
        )
    )


def deleted_json(batch_id: str) -> bytes:
    """``DeleteMessageBatch``: what ``DELETE /v1/messages/batches/{id}`` answers."""
    return _encode({"id": batch_id, "type": "message_batch_deleted"})


def result_line(custom_id: str, result: ItemResult, payload: bytes = b"") -> bytes:
    """One line of the results JSONL, newline included, so a results stream is
    the lines concatenated.

    ``payload`` is JSON: the message for ``succeeded``, the Anthropic error
    body (``{"type":"error","error":{…}}``) for ``errored``; nothing for
    ``canceled`` and ``expired``. Spliced in as bytes, never re-encoded: a
    large message is copied once.
    """
    head = b'{"custom_id":' + _encode(custom_id) + b',"result":{"type":"' + result.encode() + b'"'
    if result == "succeeded":
        return head + b',"message":' + payload + b"}}\n"
    if result == "errored":
        return head + b',"error":' + (payload or _UNKNOWN_ERROR) + b"}}\n"
    return head + b"}}\n"


_UNKNOWN_ERROR = b'{"type":"error","error":{"type":"api_error","message":"the request failed"}}'
