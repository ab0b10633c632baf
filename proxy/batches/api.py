"""The HTTP face of Message Batches: Anthropic's ``/v1/messages/batches`` contract.

``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (``before_id``,
``after_id``, ``limit``), ``GET …/{id}``, ``POST …/{id}/cancel``,
``DELETE …/{id}`` and ``GET …/{id}/results`` — raw ASGI handlers like the
rest of ``/v1/*`` (proxy/app.py), so each request has its ``Outcome``,
access-log line and ledger row. Every error is in Anthropic's shape; another
tenant's batch is a 404, as an unknown one is.

A batch runs in one of two modes. ``weir``: the items go into the store and
this worker's runner is woken (proxy/batches/runner.py). ``passthrough``:
Anthropic's own batch API behind Weir (proxy/batches/passthrough.py decides
which and does the forwarding); either way the client sees Weir's batch id
and a ``results_url`` that points at Weir, so the SDK's ``batches.results()``
comes back through the proxy.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec
import trio

from ..errors import ProxyError
from .model import Batch, Counts, batch_json, deleted_json, new_batch_id, parse_create
from .passthrough import PassthroughBatches, passthrough_route
from .store import BatchUnavailable

if TYPE_CHECKING:
    from ..app import Weir
    from ..auth import Identity
    from ..relay import Relay

__all__ = ["BatchAPI", "public_base", "ROOT"]

ROOT = "/v1/messages/batches"
# Anthropic's list: limit 1..1000, 20 when not given.
_LIMIT_DEFAULT, _LIMIT_MAX = 20, 1000
# Result lines per store read while streaming results: ~1,000 lines is a few
# hundred KB to a few MB per send, and one short read transaction.
_RESULTS_PAGE = 1000
# A Host header fit to put in a URL we hand back: a name or IPv4, or a
# bracketed IPv6 literal, with an optional port. Anything else falls back to
# the address the connection arrived on.
_HOST = re.compile(rb"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_JSON = (b"content-type", b"application/json")


def public_base(scope: dict[str, Any], headers: dict[bytes, bytes], settings: Any) -> str:
    """Weir's origin as clients reach it, for ``results_url``:
    ``batches.public_url`` when set (behind a proxy that rewrites Host or
    terminates TLS), else the request's scheme and Host header."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme = scope.get("scheme") or "http"
    host = headers.get(b"host")
    if host and _HOST.fullmatch(host):
        return f"{scheme}://{host.decode('ascii')}"
    server = scope.get("server")
    if server:
        name, port = server[0], server[1]
        name = f"[{name}]" if ":" in name else name
        return f"{scheme}://{name}" if port is None else f"{scheme}://{name}:{port}"
    return f"{scheme}://127.0.0.1"


def _not_found(batch_id: str) -> ProxyError:
    return ProxyError(404, f"message batch {batch_id!r} not found", "not_found_error")


def _unavailable(exc: Exception) -> ProxyError:
    return ProxyError(503, f"the batch store is unavailable: {exc}", "api_error")


class _Model(msgspec.Struct):
    model: str


_model_of = msgspec.json.Decoder(_Model)


class BatchAPI:
    """The handlers, bound to one ``Weir``. ``routes(path)`` is what the app's
    dict lookup falls back to for the paths under ``/v1/messages/batches/``."""

    def __init__(self, app: Weir) -> None:
        self.app = app
        self.root = {"GET": self.list, "POST": self.create}
        self._one = {"GET": self.retrieve, "DELETE": self.delete}
        self._cancel = {"POST": self.cancel}
        self._results = {"GET": self.results}
        self._pt: Any = None

    def routes(self, path: str) -> dict[str, Any] | None:
        """The methods for a path under ``/v1/messages/batches/``, or None (404)."""
        rest = path[len(ROOT) + 1 :].split("/")
        if len(rest) == 1 and rest[0]:
            return self._one
        if len(rest) == 2 and rest[0]:
            if rest[1] == "cancel":
                return self._cancel
            if rest[1] == "results":
                return self._results
        return None

    # ------------------------------------------------------------ plumbing

    def _batches(self) -> Any:
        batches = self.app.batches
        if batches is None:
            raise ProxyError(503, "batches are starting; retry in a moment", "overloaded_error", [(b"retry-after", b"1")])
        if not batches.ready:
            raise ProxyError(503, "the batch store's database is unavailable; retry later", "api_error", [(b"retry-after", b"5")])
        return batches

    def _passthrough(self, batches: Any) -> PassthroughBatches:
        if self._pt is None:
            self._pt = PassthroughBatches(self.app, batches.store)
        return self._pt

    async def _begin(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes], limit: int | None = None) -> tuple[Any, Identity, bytes]:
        """(batches, who asks, body): the store to ask, the identity (a
        passthrough batch forwards the client's own key when Weir holds none),
        what they sent."""
        ident, body = await self.app._identified_body(scope, receive, relay, headers, limit)
        return self._batches(), ident, body

    @staticmethod
    def _id(scope: dict[str, Any]) -> str:
        return scope["path"][len(ROOT) + 1 :].split("/", 1)[0]

    async def _json(self, relay: Relay, body: bytes) -> None:
        await relay.send_whole(200, [_JSON, (b"content-length", str(len(body)).encode())], body)

    async def _find(self, batches: Any, tenant: str, batch_id: str) -> Batch:
        batch = await batches.store.get(tenant, batch_id)
        if batch is None:
            raise _not_found(batch_id)
        return batch

    # ------------------------------------------------------------ handlers

    async def create(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """Validate every item (400 naming the first bad one), decide the mode,
        store the batch with its items in one transaction, wake the runner."""
        try:
            settings = self.app.settings.batches
            batches, ident, body = await self._begin(scope, receive, relay, headers, settings.max_bytes)
            tenant = ident.tenant
            # Off the event loop: checking every item is ~14 µs each here, so
            # 100,000 items would hold every other request for over a second.
            items = await trio.to_thread.run_sync(parse_create, body, settings)
            base = public_base(scope, headers, settings)
            route = await self._passthrough_route(items)
            if route is not None:
                await self._passthrough(batches).create(scope, receive, relay, ident, headers, body, route, base)
                return
            now = batches.now_us()
            batch = Batch(
                id=new_batch_id(), tenant=tenant, created_at=now, expires_at=now + int(settings.expiry_s * 1e6), counts=Counts(processing=len(items))
            )
            await batches.store.create(batch, items)
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return
        batches.wake()
        await self._json(relay, batch_json(batch, base))

    async def _passthrough_route(self, items: list[Any]) -> Any:
        """PASSTHROUGH's decision, asked only when some target could take a batch
        to Anthropic's own API (no need to read every item's model otherwise)."""
        app = self.app
        if app.router is None or not any(u.kind == "anthropic" and u.batch_mode() == "passthrough" for u in app.settings.upstreams):
            return None
        models = await trio.to_thread.run_sync(lambda: [_model_of.decode(i.params).model for i in items])
        return passthrough_route(app.router, models)

    async def list(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """Newest first; ``after_id`` pages towards older batches, ``before_id`` towards newer."""
        try:
            batches, ident, _ = await self._begin(scope, receive, relay, headers)
            tenant = ident.tenant
            args = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
            limit = _limit(args.get("limit"))
            before, after = args.get("before_id") or None, args.get("after_id") or None
            if before and after:
                raise ProxyError(400, "give before_id or after_id, not both", "invalid_request_error")
            page, has_more = await batches.store.list(tenant, before_id=before, after_id=after, limit=limit)
            base = public_base(scope, headers, batches.settings)
            if any(b.mode == "passthrough" for b in page):
                # Still running at their upstream: as it says they are now.
                page = await self._passthrough(batches).refresh(ident, page, headers)
            data = [batch_json(b, base) for b in page]
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return
        first = msgspec.json.encode(page[0].id if page else None)
        last = msgspec.json.encode(page[-1].id if page else None)
        doc = b'{"data":[' + b",".join(data) + b'],"has_more":' + (b"true" if has_more else b"false") + b',"first_id":' + first + b',"last_id":' + last + b"}"
        await self._json(relay, doc)

    async def retrieve(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        try:
            batches, ident, _ = await self._begin(scope, receive, relay, headers)
            batch = await self._find(batches, ident.tenant, self._id(scope))
            base = public_base(scope, headers, batches.settings)
            if batch.mode == "passthrough":
                await self._passthrough(batches).retrieve(scope, receive, relay, ident, batch, headers, base)
                return
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return
        await self._json(relay, batch_json(batch, base))

    async def cancel(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """``in_progress`` → ``canceling``: items not yet running are canceled at
        once, those in flight finish (as Anthropic's do); the sweep that follows
        ends the batch once nothing runs."""
        try:
            batches, ident, _ = await self._begin(scope, receive, relay, headers)
            tenant = ident.tenant
            batch_id = self._id(scope)
            base = public_base(scope, headers, batches.settings)
            found = await self._find(batches, tenant, batch_id)
            if found.mode == "passthrough":
                await self._passthrough(batches).cancel(scope, receive, relay, ident, found, headers, base)
                return
            batch = await batches.store.cancel(tenant, batch_id, batches.now_us())
            if batch is None:
                raise _not_found(batch_id)
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return
        batches.runner.sweep_soon()
        await self._json(relay, batch_json(batch, base))

    async def delete(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """Only an ended batch can be deleted (Anthropic: cancel it first)."""
        try:
            batches, ident, _ = await self._begin(scope, receive, relay, headers)
            tenant = ident.tenant
            batch_id = self._id(scope)
            found = await self._find(batches, tenant, batch_id)
            if found.mode == "passthrough":
                await self._passthrough(batches).delete(scope, receive, relay, ident, found, headers)
                return
            done = await batches.store.delete(tenant, batch_id)
            if done == "not_found":
                raise _not_found(batch_id)
            if done == "not_ended":
                raise ProxyError(400, f"message batch {batch_id!r} is still processing: cancel it, and delete it once it has ended", "invalid_request_error")
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return
        await self._json(relay, deleted_json(batch_id))

    async def results(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """The results JSONL, one line per item in request order, streamed from
        the store a page at a time (a 100,000-item batch is never held whole)."""
        try:
            batches, ident, _ = await self._begin(scope, receive, relay, headers)
            tenant = ident.tenant
            batch_id = self._id(scope)
            batch = await self._find(batches, tenant, batch_id)
            if batch.mode == "passthrough":
                await self._passthrough(batches).results(scope, receive, relay, ident, batch, headers)
                return
            if batch.processing_status != "ended":
                raise ProxyError(400, f"message batch {batch_id!r} has not ended: its results are ready once processing_status is \"ended\"", "invalid_request_error")
            first = await batches.store.results(tenant, batch_id, -1, _RESULTS_PAGE)
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return

        async def pages() -> Any:
            page = first
            while page:
                yield b"".join(line for _, line in page)
                if len(page) < _RESULTS_PAGE:
                    return
                page = await batches.store.results(tenant, batch_id, page[-1][0], _RESULTS_PAGE)

        # Anthropic's content type for the results file; the SDK asks for it
        # (Accept: application/binary) and decodes the lines itself.
        await relay.send_stream(200, [(b"content-type", b"application/binary")], pages())


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return _LIMIT_DEFAULT
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= _LIMIT_MAX:
        raise ProxyError(400, f"limit: must be an integer from 1 to {_LIMIT_MAX}", "invalid_request_error")
    return n
