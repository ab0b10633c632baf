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

    async def _serve(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes], work: Any, limit: int | None = None) -> None:
        """Every handler's frame: identify the caller, read the body, find the
        store, run ``work`` (a handler's own logic), and answer what it raises
        in Anthropic's shape (a store that cannot be reached is a 503). ``work``
        returns the reply: JSON bytes (a 200), an async iterator of result
        lines (the results file), or None when it has answered itself (a
        passthrough batch). The reply is sent after the errors are handled: a
        results stream that fails half way cannot become an error reply."""
        try:
            ident, body = await self.app._identified_body(scope, receive, relay, headers, limit)
            reply = await work(_Ask(scope, receive, relay, headers, self._batches(), ident, body))
        except ProxyError as err:
            await relay.send_error(err)
            return
        except BatchUnavailable as exc:
            await relay.send_error(_unavailable(exc))
            return
        if reply is None:
            return
        if isinstance(reply, bytes):
            await relay.send_whole(200, [_JSON, (b"content-length", str(len(reply)).encode())], reply)
            return
        # Anthropic's content type for the results file; the SDK asks for it
        # (Accept: application/binary) and decodes the lines itself.
        await relay.send_stream(200, [(b"content-type", b"application/binary")], reply)

    async def _find(self, ask: _Ask) -> Batch:
        """The asker's batch named by the path; another tenant's is a 404 as an unknown one is."""
        batch = await ask.batches.store.get(ask.ident.tenant, ask.batch_id)
        if batch is None:
            raise _not_found(ask.batch_id)
        return batch

    # ------------------------------------------------------------ handlers

    async def create(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._serve(scope, receive, relay, headers, self._create, self.app.settings.batches.max_bytes)

    async def _create(self, ask: _Ask) -> bytes | None:
        """Validate every item (400 naming the first bad one), decide the mode,
        store the batch with its items in one transaction, wake the runner."""
        batches, settings = ask.batches, self.app.settings.batches
        # Off the event loop: checking every item is ~14 µs each here, so
        # 100,000 items would hold every other request for over a second.
        items = await trio.to_thread.run_sync(parse_create, ask.body, settings)
        base = public_base(ask.scope, ask.headers, settings)
        route = await self._passthrough_route(items)
        if route is not None:
            await self._passthrough(batches).create(ask.scope, ask.receive, ask.relay, ask.ident, ask.headers, ask.body, route, base)
            return None
        now = batches.now_us()
        batch = Batch(
            id=new_batch_id(), tenant=ask.ident.tenant, created_at=now, expires_at=now + int(settings.expiry_s * 1e6), counts=Counts(processing=len(items))
        )
        await batches.store.create(batch, items)
        batches.wake()
        return batch_json(batch, base)

    async def _passthrough_route(self, items: list[Any]) -> Any:
        """PASSTHROUGH's decision, asked only when some target could take a batch
        to Anthropic's own API (no need to read every item's model otherwise)."""
        app = self.app
        if app.router is None or not any(u.kind == "anthropic" and u.batch_mode() == "passthrough" for u in app.settings.upstreams):
            return None
        models = await trio.to_thread.run_sync(lambda: [_model_of.decode(i.params).model for i in items])
        return passthrough_route(app.router, models)

    async def list(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._serve(scope, receive, relay, headers, self._list)

    async def _list(self, ask: _Ask) -> bytes:
        """Newest first; ``after_id`` pages towards older batches, ``before_id`` towards newer."""
        batches = ask.batches
        args = dict(parse_qsl(ask.scope["query_string"].decode("latin-1"), keep_blank_values=True))
        limit = _limit(args.get("limit"))
        before, after = args.get("before_id") or None, args.get("after_id") or None
        if before and after:
            raise ProxyError(400, "give before_id or after_id, not both", "invalid_request_error")
        page, has_more = await batches.store.list(ask.ident.tenant, before_id=before, after_id=after, limit=limit)
        base = ask.base()
        if any(b.mode == "passthrough" for b in page):
            # Still running at their upstream: as it says they are now.
            page = await self._passthrough(batches).refresh(ask.ident, page, ask.headers)
        data = [batch_json(b, base) for b in page]
        first = msgspec.json.encode(page[0].id if page else None)
        last = msgspec.json.encode(page[-1].id if page else None)
        return b'{"data":[' + b",".join(data) + b'],"has_more":' + (b"true" if has_more else b"false") + b',"first_id":' + first + b',"last_id":' + last + b"}"

    async def retrieve(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._serve(scope, receive, relay, headers, self._retrieve)

    async def _retrieve(self, ask: _Ask) -> bytes | None:
        batch = await self._find(ask)
        base = ask.base()
        if batch.mode == "passthrough":
            await self._passthrough(ask.batches).retrieve(ask.scope, ask.receive, ask.relay, ask.ident, batch, ask.headers, base)
            return None
        return batch_json(batch, base)

    async def cancel(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._serve(scope, receive, relay, headers, self._cancel_batch)

    async def _cancel_batch(self, ask: _Ask) -> bytes | None:
        """``in_progress`` → ``canceling``: items not yet running are canceled at
        once, those in flight finish (as Anthropic's do); the sweep that follows
        ends the batch once nothing runs."""
        batches = ask.batches
        base = ask.base()
        found = await self._find(ask)
        if found.mode == "passthrough":
            await self._passthrough(batches).cancel(ask.scope, ask.receive, ask.relay, ask.ident, found, ask.headers, base)
            return None
        batch = await batches.store.cancel(ask.ident.tenant, ask.batch_id, batches.now_us())
        if batch is None:
            raise _not_found(ask.batch_id)
        batches.runner.sweep_soon()
        return batch_json(batch, base)

    async def delete(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._serve(scope, receive, relay, headers, self._delete)

    async def _delete(self, ask: _Ask) -> bytes | None:
        """Only an ended batch can be deleted (Anthropic: cancel it first)."""
        batch_id = ask.batch_id
        found = await self._find(ask)
        if found.mode == "passthrough":
            await self._passthrough(ask.batches).delete(ask.scope, ask.receive, ask.relay, ask.ident, found, ask.headers)
            return None
        done = await ask.batches.store.delete(ask.ident.tenant, batch_id)
        if done == "not_found":
            raise _not_found(batch_id)
        if done == "not_ended":
            raise ProxyError(400, f"message batch {batch_id!r} is still processing: cancel it, and delete it once it has ended", "invalid_request_error")
        return deleted_json(batch_id)

    async def results(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._serve(scope, receive, relay, headers, self._results_file)

    async def _results_file(self, ask: _Ask) -> Any:
        """The results JSONL, one line per item in request order, streamed from
        the store a page at a time (a 100,000-item batch is never held whole)."""
        store, tenant, batch_id = ask.batches.store, ask.ident.tenant, ask.batch_id
        batch = await self._find(ask)
        if batch.mode == "passthrough":
            await self._passthrough(ask.batches).results(ask.scope, ask.receive, ask.relay, ask.ident, batch, ask.headers)
            return None
        if batch.processing_status != "ended":
            raise ProxyError(400, f"message batch {batch_id!r} has not ended: its results are ready once processing_status is \"ended\"", "invalid_request_error")
        first = await store.results(tenant, batch_id, -1, _RESULTS_PAGE)

        async def pages() -> Any:
            page = first
            while page:
                yield b"".join(line for _, line in page)
                if len(page) < _RESULTS_PAGE:
                    return
                page = await store.results(tenant, batch_id, page[-1][0], _RESULTS_PAGE)

        return pages()


class _Ask:
    """One identified request to the batch API: what every handler starts from."""

    __slots__ = ("scope", "receive", "relay", "headers", "batches", "ident", "body")

    def __init__(self, scope: dict[str, Any], receive: Any, relay: Relay, headers: dict[bytes, bytes], batches: Any, ident: Identity, body: bytes) -> None:
        self.scope, self.receive, self.relay, self.headers = scope, receive, relay, headers
        self.batches, self.ident, self.body = batches, ident, body

    @property
    def batch_id(self) -> str:
        """The batch the path names (``/v1/messages/batches/{id}[/…]``)."""
        return self.scope["path"][len(ROOT) + 1 :].split("/", 1)[0]

    def base(self) -> str:
        """Weir's origin for this request's ``results_url``."""
        return public_base(self.scope, self.headers, self.batches.settings)


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
