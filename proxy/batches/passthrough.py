"""Passthrough batches: Anthropic's own Message Batches API, behind Weir.

A batch whose every request routes to one Anthropic-kind target that runs
batches itself (``passthrough_route``) is not run by Weir: the create goes to
that target, on its keys, through the router (breaker, key pool, fair queue,
retries) pinned to it, and the store keeps a row — mode ``passthrough``, the
target, the upstream's id, the tenant, no items. Every later call names
Weir's id; ``api.py`` finds the row (tenant-checked: another tenant's id is
a 404) and hands it here, so the call goes to the right target under the
upstream's id.

What the client gets back is the upstream's own batch object, unknown fields
and all, with two fields rewritten: ``id`` (Weir's) and ``results_url``
(Weir's public base), so the SDK's ``batches.results()`` comes back through
Weir instead of going past it. The results are streamed through as the
upstream sends them — one ASGI send per upstream read, never the whole file
in memory — while the lines are read on the side for their usage: one ledger
row per succeeded request, carrying the batch id, keyed so that reading the
results twice records nothing twice.

Every upstream batch object seen is written back to the row (``sync``): a
passthrough row has no items to derive its state from, and ``delete`` and
``retain`` need to know it ended.

The decision and the line reading are pure; ``PassthroughBatches`` is the
trio shell.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..context import Deadlines, Outcome, RequestContext
from ..errors import ProxyError, upstream_failure
from ..headers import client_response_headers, upstream_request_headers
from ..ledger.capture import row_for
from ..upstream import UpstreamError, UpstreamRequest, UpstreamResponse
from ..upstream.base import read_up_to
from .model import Batch, Counts, new_batch_id

if TYPE_CHECKING:
    from ..auth import Identity
    from ..relay import Relay
    from ..router import Router

__all__ = ["PassRoute", "passthrough_route", "PassthroughBatches", "ResultLines", "rewritten", "state_of"]

log = logging.getLogger("weir.batches")

_BATCHES = "/v1/messages/batches"
# A batch object is well under a kilobyte; this bounds a misbehaving upstream.
_OBJECT_LIMIT = 1024 * 1024
# Upstream calls at once to refresh a list page: a page is 20 rows by default
# (up to 1,000); a handful in flight keeps the page quick without taking the
# target's whole connection budget (upstreams.max_connections, 64).
_REFRESH_AT_ONCE = 8
# One result line is one message: Anthropic caps output at 128k tokens (~0.5 MB
# of text); past this a line is forwarded but not read for its usage.
_LINE_LIMIT = 64 * 1024 * 1024
# Anthropic bills a batch's requests at half the standard price ("Batch
# processing costs 50% less than standard API calls").
_BATCH_PRICE = 0.5
_JSON = (b"content-type", b"application/json")
# Headers of the upstream's answer that describe bytes Weir rewrote.
_BODY_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding", b"transfer-encoding"})


# ---------------------------------------------------------------- the decision


class PassRoute(msgspec.Struct, frozen=True):
    """Where a passthrough batch goes: the target, and for each model of its
    requests the name the route sends ("" = the client's own)."""

    target: str
    models: dict[str, str]


def passthrough_route(router: Router, models: Iterable[str]) -> PassRoute | None:
    """The target that runs this batch itself, or None: Weir runs it.

    Passthrough when every request's model routes (as a ``main`` request) to
    the same first target, that target speaks Anthropic's API, and its
    ``batches`` setting is ``passthrough`` or unset (unset: passthrough for
    an Anthropic-kind target, Weir for an OpenAI-kind one). Only the first
    target counts: a passthrough batch cannot fail over, the upstream holds it.
    """
    target = None
    sends: dict[str, str] = {}
    for model in models:
        if model in sends:
            continue
        lane, send = router.resolve(model, "main")[0]
        t = lane.target
        if t.kind != "anthropic" or t.settings.batch_mode() != "passthrough" or (target is not None and lane.name != target):
            return None
        target = lane.name
        sends[model] = send if send != model else ""
    if target is None:
        return None
    return PassRoute(target=target, models=sends)


def _with_models(body: bytes, models: Mapping[str, str]) -> bytes:
    """The create body with each request's model as its route names it.

    Untouched (the client's bytes) when no route renames a model; otherwise
    re-serialised, every other field kept."""
    if not any(models.values()):
        return body
    doc = json.loads(body)
    for r in doc["requests"]:
        params = r["params"]
        params["model"] = models.get(params["model"]) or params["model"]
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


# ------------------------------------------------------------ batch objects


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _us(stamp: Any) -> int | None:
    """An RFC 3339 timestamp → µs since the epoch, exactly (None, or not a time, → None)."""
    if not isinstance(stamp, str):
        return None
    try:
        at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.timezone.utc)
    return (at - _EPOCH) // _MICROSECOND


def state_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The state a passthrough row keeps, from the upstream's batch object."""
    counts = doc.get("request_counts") or {}
    return {
        "processing_status": doc.get("processing_status", "in_progress"),
        "counts": Counts(**{k: int(counts.get(k, 0)) for k in ("processing", "succeeded", "errored", "canceled", "expired")}),
        "ended_at": _us(doc.get("ended_at")),
        "cancel_initiated_at": _us(doc.get("cancel_initiated_at")),
        "archived_at": _us(doc.get("archived_at")),
    }


def rewritten(doc: dict[str, Any], batch_id: str, base: str) -> dict[str, Any]:
    """The upstream's object as the client sees it: Weir's id, and results at Weir.
    Every other field, known or not, is the upstream's."""
    doc["id"] = batch_id
    if doc.get("results_url"):
        doc["results_url"] = f"{base}{_BATCHES}/{batch_id}/results"
    return doc


# ------------------------------------------------------------- result lines


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    model: str = ""
    usage: _Usage | None = None


class _Result(msgspec.Struct):
    type: str = ""
    message: _Message | None = None


class _Line(msgspec.Struct):
    custom_id: str = ""
    result: _Result | None = None


_decode_line = msgspec.json.Decoder(_Line).decode


class ResultLines:
    """Complete JSONL lines out of a byte stream cut anywhere; sans-IO.

    ``feed`` returns the succeeded results completed by a chunk, as
    (custom_id, model, usage); a line over ``_LINE_LIMIT`` is skipped, not held.
    """

    def __init__(self, limit: int = _LINE_LIMIT) -> None:
        self._tail = bytearray()
        self._limit = limit
        self._skipping = False

    def feed(self, chunk: bytes) -> list[tuple[str, str, _Usage]]:
        out: list[tuple[str, str, _Usage]] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._tail += chunk[start:end]
                self._one(bytes(self._tail), out)
            self._tail.clear()
            start = end + 1
        if not self._skipping:
            self._tail += chunk[start:]
            if len(self._tail) > self._limit:
                self._tail.clear()
                self._skipping = True
        return out

    def close(self) -> list[tuple[str, str, _Usage]]:
        """A last line without its newline."""
        out: list[tuple[str, str, _Usage]] = []
        if self._tail and not self._skipping:
            self._one(bytes(self._tail), out)
        self._tail.clear()
        return out

    @staticmethod
    def _one(line: bytes, out: list[tuple[str, str, _Usage]]) -> None:
        if not line.strip():
            return
        try:
            parsed = _decode_line(line)
        except msgspec.MsgspecError:
            return  # forwarded all the same: the client's SDK judges it
        r = parsed.result
        if r is not None and r.type == "succeeded" and r.message is not None and r.message.usage is not None:
            out.append((parsed.custom_id, r.message.model, r.message.usage))


# --------------------------------------------------------------- the shell


class _MeteredOpener:
    """The router, each good response's result lines read for usage on the way
    by (``_Metered``): an opener like any other, for ``Weir.relay_opened``."""

    __slots__ = ("_inner", "_on_lines")

    def __init__(self, inner: Any, on_lines: Any) -> None:
        self._inner, self._on_lines = inner, on_lines

    def open(self, req: Any, ctx: Any) -> _MeteredCall:
        return _MeteredCall(self._inner.open(req, ctx), self._on_lines)


class _MeteredCall:
    __slots__ = ("_inner", "_on_lines")

    def __init__(self, inner: Any, on_lines: Any) -> None:
        self._inner, self._on_lines = inner, on_lines

    async def __aenter__(self) -> UpstreamResponse:
        resp = await self._inner.__aenter__()
        return _Metered(resp, self._on_lines) if resp.status < 400 else resp

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        return await self._inner.__aexit__(exc_type, exc, tb)


class _Metered:
    """The upstream's results, passed on read by read; every completed line is
    read for its usage on the side (``on_lines``)."""

    __slots__ = ("status", "headers", "served", "_raw", "_lines", "_on_lines")

    def __init__(self, raw: UpstreamResponse, on_lines: Any) -> None:
        self.status = raw.status
        self.headers = raw.headers
        self.served = raw.served
        self._raw = raw
        self._lines = ResultLines()
        self._on_lines = on_lines

    async def aiter(self) -> AsyncIterator[bytes]:
        async for chunk in self._raw.aiter():
            found = self._lines.feed(chunk)
            if found:
                self._on_lines(found)
            yield chunk
        found = self._lines.close()
        if found:
            self._on_lines(found)

    async def read(self, limit: int) -> bytes:
        return await read_up_to(self.aiter(), limit)


class PassthroughBatches:
    """The passthrough half of the batch routes; ``api.py`` owns the routes and
    calls in here once it knows the batch is (or will be) passthrough.

    ``store`` is the awaitable store api.py uses (``AsyncBatchStore``). Each
    method answers the client itself through ``relay``: the upstream's object
    rewritten, or an error in Anthropic's shape — the upstream's own, passed
    on, or Weir's when no answer came.
    """

    def __init__(self, app: Any, store: Any) -> None:
        self.app = app
        self.store = store

    # ------------------------------------------------------------ routes

    async def create(self, scope: Any, receive: Any, relay: Relay, ident: Identity, headers: Mapping[bytes, bytes], body: bytes, route: PassRoute, base: str) -> None:
        sent = _with_models(body, route.models)
        got = await self._exchange(receive, relay, ident, headers, route.target, "POST", _BATCHES, sent)
        if got is None:
            return
        doc, extra = got
        upstream_id = doc.get("id")
        if not isinstance(upstream_id, str) or not upstream_id:
            await relay.send_error(ProxyError(502, f"upstream {route.target} answered a batch create without a batch id", "api_error"))
            return
        state = state_of(doc)
        created = _us(doc.get("created_at")) or int(time.time() * 1_000_000)
        batch = Batch(
            id=new_batch_id(),
            tenant=ident.tenant,
            mode="passthrough",
            target=route.target,
            upstream_id=upstream_id,
            created_at=created,
            # Anthropic's: 24 hours after creation.
            expires_at=_us(doc.get("expires_at")) or created + 86_400_000_000,
            **state,
        )
        try:
            await self.store.create(batch, [])
        except BaseException:
            # The upstream holds a batch nobody can reach through Weir: say which.
            log.error("passthrough batch %s created on %s but not recorded", upstream_id, route.target)
            raise
        await self._send_object(relay, doc, batch.id, base, extra)

    async def retrieve(self, scope: Any, receive: Any, relay: Relay, ident: Identity, batch: Batch, headers: Mapping[bytes, bytes], base: str) -> None:
        got = await self._exchange(receive, relay, ident, headers, batch.target, "GET", f"{_BATCHES}/{batch.upstream_id}", b"")
        if got is not None:
            await self._sync(batch, got[0])
            await self._send_object(relay, got[0], batch.id, base, got[1])

    async def cancel(self, scope: Any, receive: Any, relay: Relay, ident: Identity, batch: Batch, headers: Mapping[bytes, bytes], base: str) -> None:
        got = await self._exchange(receive, relay, ident, headers, batch.target, "POST", f"{_BATCHES}/{batch.upstream_id}/cancel", b"")
        if got is not None:
            await self._sync(batch, got[0])
            await self._send_object(relay, got[0], batch.id, base, got[1])

    async def delete(self, scope: Any, receive: Any, relay: Relay, ident: Identity, batch: Batch, headers: Mapping[bytes, bytes]) -> None:
        """Deleted upstream first — which refuses a batch still processing, in
        its own words, passed on — then here."""
        got = await self._exchange(receive, relay, ident, headers, batch.target, "DELETE", f"{_BATCHES}/{batch.upstream_id}", b"")
        if got is None:
            return
        doc, extra = got
        await self.store.delete(batch.tenant, batch.id)
        doc["id"] = batch.id
        body = json.dumps(doc, separators=(",", ":")).encode()
        await relay.send_whole(200, [*extra, _JSON, (b"content-length", b"%d" % len(body))], body)

    async def refresh(self, ident: Identity, batches: Sequence[Batch], headers: Mapping[bytes, bytes]) -> list[Batch]:
        """A list page's rows, the passthrough ones still running as their
        upstream says they are now (and synced to the store); the rest as
        stored — an ended batch's state is final. A few asked at once; a row
        whose upstream does not answer in time stays as stored."""
        page = list(batches)
        limiter = trio.CapacityLimiter(_REFRESH_AT_ONCE)

        async def one(i: int, batch: Batch) -> None:
            async with limiter:
                try:
                    with trio.fail_after(self.app.settings.deadlines.first_byte_s):
                        req = self._request(ident, headers, batch.target, "GET", f"{_BATCHES}/{batch.upstream_id}", b"")
                        async with self.app.router.open(req, self._ctx(ident, req, None)) as resp:
                            if resp.status >= 400:
                                return
                            doc = json.loads(await resp.read(_OBJECT_LIMIT))
                except (ProxyError, UpstreamError, trio.TooSlowError, ValueError):
                    return
                if isinstance(doc, dict):
                    page[i] = await self._sync(batch, doc)

        async with trio.open_nursery() as nursery:
            for i, batch in enumerate(page):
                if batch.mode == "passthrough" and batch.processing_status != "ended":
                    nursery.start_soon(one, i, batch)
        return page

    async def results(self, scope: Any, receive: Any, relay: Relay, ident: Identity, batch: Batch, headers: Mapping[bytes, bytes]) -> None:
        """The upstream's JSONL, streamed through as read; usage per line to the ledger.

        The path is the one the upstream's own ``results_url`` names (Anthropic:
        "this path should not be assumed"), asked of the same target; a batch
        without one yet is asked at the usual path, and the upstream's refusal
        passed on."""
        got = await self._exchange(receive, relay, ident, headers, batch.target, "GET", f"{_BATCHES}/{batch.upstream_id}", b"")
        if got is None:
            return
        doc = got[0]
        await self._sync(batch, doc)
        path = f"{_BATCHES}/{batch.upstream_id}/results"
        query = b""
        url = doc.get("results_url")
        if isinstance(url, str) and url:
            parts = url.split("://", 1)[-1]
            target = parts[parts.find("/") :] if "/" in parts else path
            path, _, q = target.partition("?")
            query = q.encode()
        ended_at = _us(doc.get("ended_at")) or batch.ended_at or int(time.time() * 1_000_000)
        req = self._request(ident, headers, batch.target, "GET", path, b"", query)
        ctx = self._ctx(ident, req, relay)
        await self.app.relay_opened(receive, relay, req, ctx, _MeteredOpener(self.app.router, self._recorder(batch, ended_at)))

    # ----------------------------------------------------------- helpers

    def _recorder(self, batch: Batch, ended_at: int) -> Any:
        """One ledger row per succeeded result: its usage, at batch prices.

        ``request_id`` = batch id + custom_id and ``started_at`` = the batch's
        end: the ledger's unique key then makes a second read of the
        results a no-op."""
        ledger = self.app.ledger
        if ledger is None:
            return lambda found: None
        wall = ended_at / 1_000_000

        def record(found: list[tuple[str, str, _Usage]]) -> None:
            for custom_id, model, usage in found:
                cache_write = usage.cache_creation_input_tokens or 0
                out = Outcome(
                    request_id=f"{batch.id}:{custom_id}",
                    received=0.0,
                    method="POST",
                    path="/v1/messages",
                    tenant=batch.tenant,
                    model=model,
                    kind="main",
                    status=200,
                    target=batch.target,
                    served_model=model,
                    attempts=1,
                    input_tokens=usage.input_tokens + cache_write,
                    output_tokens=usage.output_tokens,
                    cache_read_tokens=usage.cache_read_input_tokens or 0,
                    cache_creation_tokens=cache_write,
                    batch_id=batch.id,
                )
                row = row_for(out, now_wall=wall, prices=ledger.prices, bodies="off")
                row.cost_micros = int(row.cost_micros * _BATCH_PRICE)
                ledger.put(row)

        return record

    def _request(self, ident: Identity, headers: Mapping[bytes, bytes], target: str, method: str, path: str, body: bytes, query: bytes = b"") -> UpstreamRequest:
        """The call for the batch's target alone (``UpstreamRequest.target``)."""
        if self.app.router.lane(target) is None:
            raise ProxyError(502, f"upstream {target!r}, which holds this batch, is no longer configured", "api_error")
        client = [(n, v) for n, v in headers.items() if n != b"content-length"]
        if body:
            client.append((b"content-length", b"%d" % len(body)))
        return UpstreamRequest(
            method=method,
            path=path,
            query=query,
            headers=upstream_request_headers(client, forward_credentials=ident.passthrough),
            body=body,
            target=target,
        )

    def _ctx(self, ident: Identity, req: UpstreamRequest, relay: Relay | None) -> RequestContext:
        d = self.app.settings.deadlines
        out = relay.out if relay is not None else None
        return RequestContext(
            request_id=out.request_id if out is not None else "",
            received=out.received if out is not None else time.perf_counter(),
            method=req.method,
            path=req.path,
            ingress="anthropic",
            tenant=ident.tenant,
            passthrough=ident.passthrough,
            model="",
            stream=False,
            # A batch's bookkeeping is a client waiting on an answer, not batch work.
            priority="interactive",
            deadlines=Deadlines(total=trio.current_time() + d.total_s, first_byte_s=d.first_byte_s, idle_s=d.idle_s),
        )

    async def _exchange(
        self,
        receive: Any,
        relay: Relay,
        ident: Identity,
        headers: Mapping[bytes, bytes],
        target: str,
        method: str,
        path: str,
        body: bytes,
    ) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]] | None:
        """One call to the batch's target, its JSON object read whole.

        Returns (object, the upstream's headers for the client), or None once
        the client has had its answer: the upstream's error passed on, or
        Weir's when the upstream gave none."""
        try:
            req = self._request(ident, headers, target, method, path, body)
        except ProxyError as err:
            await relay.send_error(err)
            return None
        ctx = self._ctx(ident, req, relay)
        d = ctx.deadlines
        out = relay.out
        with trio.CancelScope(deadline=min(trio.current_time() + d.first_byte_s, d.total)) as cs:
            resp = None
            try:
                async with self.app.router.open(req, ctx) as resp:
                    if resp.status >= 400:
                        await relay.error_response(resp)
                        return None
                    cs.deadline = d.total
                    raw = await resp.read(_OBJECT_LIMIT)
                    extra = [(n, v) for n, v in client_response_headers(resp.headers, drop_ratelimit=relay.own_ratelimit) if n not in _BODY_HEADERS]
            except ProxyError as err:
                if err.served is not None:
                    out.take(err.served)
                await relay.send_error(err)
                return None
            except UpstreamError as exc:
                await relay.send_error(upstream_failure(exc, target))
                return None
            finally:
                if resp is not None:
                    out.take(resp.served)
        if cs.cancelled_caught:
            out.result = "deadline"
            await relay.send_error(ProxyError(504, f"upstream {target} did not answer within the deadline", "timeout_error"))
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            await relay.send_error(ProxyError(502, f"upstream {target} answered {method} {path} with a body that is not a JSON object", "api_error"))
            return None
        return doc, extra

    async def _sync(self, batch: Batch, doc: Mapping[str, Any]) -> Batch:
        """The row as the upstream's object says it is, written back to the store."""
        if doc.get("type") != "message_batch":
            return batch
        s = state_of(doc)
        await self.store.sync(batch.tenant, batch.id, s["processing_status"], s["counts"], s["ended_at"], s["cancel_initiated_at"], s["archived_at"])
        return msgspec.structs.replace(batch, **s)

    async def _send_object(self, relay: Relay, doc: dict[str, Any], batch_id: str, base: str, extra: list[tuple[bytes, bytes]]) -> None:
        body = json.dumps(rewritten(doc, batch_id, base), ensure_ascii=False, separators=(",", ":")).encode()
        await relay.send_whole(200, [*extra, _JSON, (b"content-length", b"%d" % len(body))], body)


