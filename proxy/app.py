"""The ASGI application: a lean hot path for ``/v1/*`` and Quart for the rest.

docs/ARCHITECTURE.md: Quart's per-request machinery measured ~30% of a
trivial route's cost on Hypercorn's trio worker, so the API routes are plain
ASGI callables looked up in a dict; health, readiness and the admin API are
a Quart-Trio app (``proxy/admin.py``), where the convenience is worth more
than the microseconds.

One request, top to bottom: ``_api`` checks the target and finds the
handler; the handler identifies the client, reads and decodes the body
(``proxy/ingress/``), builds the request's ``RequestContext`` and admits it
against the tenant's rate limit; ``_forward`` opens the one opener
(``self.opener``: the cache layer over the router) inside the request's
deadline scope and hands what comes back to the ``Relay``. Every request
ends in ``finished``, the one place its ``Outcome`` is emitted.

The lifespan owns the one nursery every background task of this worker runs
in (the cache's flights and L2 writes, the Redis clients of the cache and
the rate limiter); it also owns the upstream pools and closes them after the
server stopped sending requests.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from .admin import build_admin
from .auth import Authenticator, Identity
from .batches.api import ROOT as BATCHES_ROOT, BatchAPI
from .batches.service import Batches, batches_enabled, serve_batches
from .caching import CacheLayer, serve_cache
from .context import PRIORITIES, Deadlines, Outcome, RequestContext
from .errors import ProxyError, upstream_failure
from .headers import request_id, upstream_request_headers
from .ingress.anthropic import decode_count_tokens, decode_messages
from .ingress.openai import decode_chat, openai_error_send
from .kinds import classify
from .ledger.service import Ledger, serve_ledger
from .ledger.capture import row_for
from .local_answers import local_answer
from .logs import AccessLog, AccessRecord
from .metrics import Metrics
from .tracing import Tracing, client_trace_id, tracing_from_env
from .ratelimit import LocalRateLimiter, RedisRateLimiter, serve_ratelimiter
from .relay import Relay
from .router import Router
from .settings import Settings
from .target_path import BadTarget, checked_path, checked_query
from .upstream import Target, UpstreamError, UpstreamRequest
from .upstream.base import Opener
from .usage import estimate_input_tokens

__all__ = ["Weir", "build_app"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Scope, Receive, Relay, dict[bytes, bytes]], Awaitable[None]]

log = logging.getLogger("weir")

_DRAINING = ProxyError(503, "Weir is shutting down; retry on another instance", "overloaded_error", [(b"connection", b"close"), (b"retry-after", b"1")])
# x-weir-project: a label for cost reports, not an identifier to trust; kept short and printable.
_PROJECT_MAX = 128


class Weir:
    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None, *, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        # Traces: passed in (tests), or from the OTEL_* variables; None = off.
        self.tracing = tracing if tracing is not None else tracing_from_env(self.environ)
        self.auth = Authenticator(settings.auth, self.environ)
        self.access = AccessLog()
        self._access_on = False  # decided at start-up, once logging is configured
        # Called with every finished request's Outcome, after the access log
        # (the request ledger and the metrics register here). A hook must not
        # block: it runs on the request's task, after the response was sent.
        self.on_finished: list[Callable[[Outcome], None]] = []
        # Read the usage off every reply (tokens in and out on the Outcome),
        # not only when the rate limiter needs it to settle; set by whoever
        # wants usage recorded for every request.
        self.meter_usage = False
        self.ledger: Ledger | None = None  # started in startup(); None when ledger.url = "off"
        self.targets: list[Target] = []
        self.router: Router | None = None
        self.cache: CacheLayer | None = None
        # The one opener the handlers call: the cache layer over the router (built in startup).
        self.opener: Opener | None = None
        self._tasks: trio.Nursery | None = None  # the lifespan's nursery, once started
        self.draining = False
        self.started = False
        self.in_flight = 0
        self.served = 0
        self.ratelimiter: LocalRateLimiter | RedisRateLimiter | None = None
        self.limited: dict[str, int] = {}  # tenant → requests refused by the rate limiter
        self.local_kinds = frozenset(settings.claude_code.answer_locally)
        self.metrics: Metrics | None = None
        self._refreshes = 0
        if settings.metrics.enabled:
            self.metrics = Metrics(
                tenants=[ck.tenant for ck in settings.auth.client_keys], targets=[u.name for u in settings.upstreams], max_models=settings.metrics.max_models
            )
        # path → method → handler. A dict lookup is the whole router.
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/messages": {"POST": self.messages},
            "/v1/messages/count_tokens": {"POST": self.count_tokens},
            "/v1/models": {"GET": self.passthrough},
            "/v1/chat/completions": {"POST": self.chat_completions},
        }
        # Message Batches run by Weir (proxy/batches/): started in startup();
        # with batches off, their routes are forwarded like any endpoint Weir does not read.
        self.batches: Batches | None = None
        self.batch_api: BatchAPI | None = None
        if batches_enabled(settings):
            self.batch_api = BatchAPI(self)
            self.routes[BATCHES_ROOT] = self.batch_api.root
        # The methods Anthropic's API uses on the endpoints Weir does not read.
        self._forwarded: dict[str, Handler] = dict.fromkeys(("GET", "POST", "DELETE", "PUT", "PATCH"), self.passthrough)
        self.admin = build_admin(self)

    # ---------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/v1/"):
                await self._api(scope, receive, send, path)
            else:
                await self.admin(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        # websockets: nothing here speaks them; returning closes the socket.

    async def _api(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = dict(scope["headers"])
        captured: bytearray | None = None
        if self.ledger is not None and self.ledger.bodies != "off":
            send, captured = _capturing(send, self.ledger.body_limit)
        if path.startswith("/v1/chat/"):
            # The OpenAI ingress: every error it answers — 400, 401, 404, 405
            # included — in OpenAI's shape.
            out = Outcome(request_id=request_id(headers), received=time.perf_counter(), method=scope["method"], path=path, ingress="openai")
            relay = Relay(send, out, reshape=openai_error_send)
        else:
            out = Outcome(request_id=request_id(headers), received=time.perf_counter(), method=scope["method"], path=path)
            relay = Relay(send, out)
        out.headers = headers
        extensions = scope.get("extensions")
        if extensions:
            replay = extensions.get("weir.replay")
            if replay is not None:
                out.replay_of = replay["dlq_id"]
            item = extensions.get("weir.batch")
            if item is not None:
                out.batch_id = item["batch_id"]
        try:
            try:
                # Route on, and forward, the raw path as checked — never Hypercorn's decoded one.
                path = out.path = scope["path"] = checked_path(scope.get("raw_path") or path.encode())
                scope["query_string"] = out.query = checked_query(scope["query_string"])
            except BadTarget as exc:
                await relay.send_error(ProxyError(400, str(exc), "invalid_request_error"))
                return
            methods = self.routes.get(path)
            if methods is None:
                if path.startswith("/v1/models/"):
                    methods = {"GET": self.passthrough}
                elif self.batch_api is not None and path.startswith(BATCHES_ROOT + "/"):
                    methods = self.batch_api.routes(path)
                elif not path.startswith("/v1/chat/"):
                    # Batches, files, skills and whatever Anthropic adds next:
                    # forwarded, as checked above, to an Anthropic-kind target
                    # (proxy/router.py resolves them); a target kind with no
                    # equivalent answers 404 (proxy/upstream/adapters.py).
                    methods = self._forwarded
            handler = methods.get(scope["method"]) if methods is not None else None
            if handler is None:
                if methods is None:
                    err = ProxyError(404, f"Not found: {scope['method']} {path}", "not_found_error")
                else:
                    allow = ", ".join(sorted(methods)).encode()
                    err = ProxyError(405, f"Method {scope['method']} not allowed for {path}", "invalid_request_error", [(b"allow", allow)])
                await relay.send_error(err)
                return
            if self.draining:
                await relay.send_error(_DRAINING)
                return
            self.in_flight += 1
            try:
                if self.tracing is None:
                    out.trace_id = client_trace_id(headers.get(b"traceparent"))
                    await handler(scope, receive, relay, headers)
                else:
                    out.span = self.tracing.start_request(scope["method"], path, headers, out.request_id)
                    out.trace_id = self.tracing.trace_id(out.span)
                    with self.tracing.current(out.span):
                        await handler(scope, receive, relay, headers)
            finally:
                self.in_flight -= 1
                self.served += 1
        except _ClientGone:
            out.result = "client_closed"
            if not out.status:
                out.status = 499  # nginx's convention for "client closed request"
        except Exception:
            # A bug, not a client's fault: the traceback goes to our log with
            # the request id; the client gets Anthropic's shape and that id.
            log.exception("request failed", extra={"request_id": out.request_id})
            if not relay.head_sent:
                await relay.send_error(ProxyError(500, f"internal error; request id {out.request_id}", "api_error"))
            elif relay.is_sse:
                await relay.end_stream_with_error("api_error", f"internal error; request id {out.request_id}")
            out.result, out.error = "internal_error", "api_error"
        finally:
            if captured:
                out.response_body = bytes(captured)
            self.finished(out)

    def _identify(self, scope: Scope, headers: Mapping[bytes, bytes]) -> Identity:
        """The client's identity; a dead-letter replay (``Weir.replay``) and a
        batch item (``Weir.run_batch_item``) run as their tenant on the
        targets' own keys. The marker lives in the ASGI scope's extensions,
        which only the server — never a client — sets."""
        extensions = scope.get("extensions")
        if extensions:
            synthetic = extensions.get("weir.replay") or extensions.get("weir.batch")
            if synthetic is not None:
                return Identity(tenant=synthetic["tenant"], passthrough=False)
        return self.auth.identify(headers)

    def _record(self, out: Outcome) -> None:
        """The ledger's ``on_finished`` hook: one row per request, one append."""
        ledger = self.ledger
        assert ledger is not None
        ledger.put(row_for(out, now_wall=time.time(), prices=ledger.prices, bodies=ledger.bodies, body_limit=ledger.body_limit))

    async def replay(self, entry: Mapping[str, Any]) -> tuple[str, int]:
        """Send a dead-letter entry again, through the whole request path, as its
        tenant; returns (new request id, final status) once the reply is complete.

        It is an ordinary request to every stage (rate limit, cache, router) and
        gets its own ledger row, linked to the entry by ``replay_of``.
        """
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in entry["headers"]]
        extension = {"weir.replay": {"tenant": entry["tenant"], "dlq_id": entry["id"]}}
        rid, status, _, _ = await self._synthetic(entry["method"], entry["path"], entry["query"].encode("latin-1"), headers, entry["body"], extension, keep_body=False)
        return rid, status

    async def run_batch_item(self, tenant: str, batch_id: str, params: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One Message Batch item (proxy/batches/runner.py), as ``replay`` runs a
        dead letter: ``POST /v1/messages`` with the item's params, at ``batch``
        priority, as the batch's tenant — so the rate limit, the cache and its
        coalescing, the router, the fair queue, the provider budget and the
        ledger (a row carrying ``batch_id``) all apply. Returns the reply's
        status, headers and whole body."""
        _, status, headers, body = await self._synthetic("POST", "/v1/messages", b"", _BATCH_ITEM_HEADERS, params, {"weir.batch": {"tenant": tenant, "batch_id": batch_id}})
        return status, headers, body

    async def _synthetic(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes, extensions: dict[str, Any], *, keep_body: bool = True
    ) -> tuple[str, int, list[tuple[bytes, bytes]], bytes]:
        """A request Weir makes of itself, through ``_api`` like any client's:
        (request id, status, response headers, response body when ``keep_body``)."""
        rid = request_id({})
        headers = [*headers, (b"x-request-id", rid.encode()), (b"content-length", str(len(body)).encode())]
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "headers": headers,
            "client": None,
            "server": None,
            "extensions": extensions,
        }
        body_sent = False
        status = 0
        reply_headers: list[tuple[bytes, bytes]] = []
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await trio.sleep_forever()  # no hang-up: the reply is read to its end
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, reply_headers
            if message["type"] == "http.response.start":
                status, reply_headers = message["status"], message.get("headers", [])
            elif keep_body and message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self._api(scope, receive, send, path)
        return rid, status, reply_headers, b"".join(parts)

    def finished(self, out: Outcome) -> None:
        """The one place a finished request's record is emitted: the access
        log line, then every ``on_finished`` hook (ledger, metrics)."""
        out.total_s = time.perf_counter() - out.received
        if self.metrics is not None:
            self._measure(out)
        if out.span is not None:
            self._end_span(out)
        if self._access_on:
            now = time.time()
            self.access.write(
                AccessRecord(
                    ts=self.access.timestamp(now),
                    request_id=out.request_id,
                    method=out.method,
                    path=out.path,
                    status=out.status,
                    tenant=out.tenant,
                    model=out.model,
                    stream=out.stream,
                    kind=out.kind,
                    project=out.project,
                    target=out.target,
                    outcome=out.result,
                    error=out.error,
                    cache=out.cache,
                    duration_ms=round(out.total_s * 1000.0, 3),
                    upstream_ms=round(out.upstream_head_s * 1000.0, 3),
                    bytes_out=out.bytes_out,
                    dropped=out.dropped or None,
                    trace_id=out.trace_id or None,
                )
            )
        for hook in self.on_finished:
            try:
                hook(out)
            except Exception:  # a broken observer must not break the request path
                log.exception("on_finished hook failed", extra={"request_id": out.request_id})

    def _measure(self, out: Outcome) -> None:
        # Tokens and cost as the ledger counts them (proxy/ledger/capture.py):
        # what the upstream billed, so a hit or a coalesced follower adds none.
        billed = out.input_tokens is not None and out.cache not in ("hit", "coalesced")
        cache_write = (out.cache_creation_tokens or 0) if billed else 0
        input_tokens = max(0, (out.input_tokens or 0) - cache_write) if billed else 0
        output_tokens = (out.output_tokens or 0) if billed else 0
        cache_read = (out.cache_read_tokens or 0) if billed else 0
        cost = 0.0
        if billed and self.ledger is not None:
            cost = self.ledger.prices.cost(out.served_model or out.model, input_tokens, output_tokens, cache_read, cache_write)[0] / 1e6
        self.metrics.request(  # type: ignore[union-attr]
            route=out.path,
            tenant=out.tenant,
            model=out.model,
            target=out.target,
            code=out.status,
            cache=out.cache or "",
            kind=out.kind or "",
            stream=out.stream,
            duration_s=out.total_s,
            overhead_s=out.overhead_s,
            ttft_s=out.first_byte_s if out.first_byte_s is not None and out.status < 400 else None,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_creation_tokens=cache_write,
            cost_usd=cost,
        )

    def _end_span(self, out: Outcome) -> None:
        name = out.target.partition(":")[0]
        lane = self.router.lane(name) if self.router is not None and name else None
        error = out.error or ""
        self.tracing.finish_request(  # type: ignore[union-attr]
            out.span,
            operation="chat" if out.path in ("/v1/messages", "/v1/chat/completions") else "",
            provider=lane.target.kind if lane is not None else "",
            request_model=out.model,
            response_model=out.served_model or out.model,
            status=out.status,
            error=error if error and out.status >= 400 or error.startswith("upstream_") else "",
            input_tokens=out.input_tokens or 0,
            output_tokens=out.output_tokens or 0,
            target=out.target,
            cache=out.cache or "",
        )

    # ----------------------------------------------------------- handlers

    async def messages(self, scope: Scope, receive: Receive, relay: Relay, headers: dict[bytes, bytes]) -> None:
        await self._model_call(scope, receive, relay, headers, decode_messages)

    async def chat_completions(self, scope: Scope, receive: Receive, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """OpenAI clients, to either kind of upstream; every error in OpenAI's shape (see ``_api``)."""
        await self._model_call(scope, receive, relay, headers, decode_chat)

    async def _model_call(self, scope: Scope, receive: Receive, relay: Relay, headers: dict[bytes, bytes], decode: Callable[[bytes], Any]) -> None:
        """A generation in either dialect: identify, read, decode the envelope, admit, forward."""
        out = relay.out
        try:
            ident, body = await self._identified_body(scope, receive, relay, headers)
            env = decode(body)
        except ProxyError as err:
            await relay.send_error(err)
            return
        kind = "main"
        if decode is decode_messages:
            kind = out.kind = classify(env)
            if kind in self.local_kinds:
                await self._answer_locally(relay, kind, env.model, env.stream)
                return
        ctx = self._context(scope, headers, out, ident, body, env.model, env.stream, getattr(env, "temperature", ...), kind)
        await self._admit_and_forward(scope, receive, relay, ctx, body)

    async def _answer_locally(self, relay: Relay, kind: str, model: str, stream: bool) -> None:
        """A side call the operator chose to answer without an upstream (proxy/local_answers.py)."""
        content_type, body = local_answer(kind, model, stream)
        out = relay.out
        out.model, out.stream, out.target = model, stream, "local"
        relay.is_sse = stream
        await relay.send_whole(200, [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), (b"x-weir-target", b"local")], body)

    async def count_tokens(self, scope: Scope, receive: Receive, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """Counted by the upstream; estimated by the adapter for a target that has no counter."""
        out = relay.out
        try:
            ident, body = await self._identified_body(scope, receive, relay, headers)
            env = decode_count_tokens(body)
        except ProxyError as err:
            await relay.send_error(err)
            return
        ctx = self._context(scope, headers, out, ident, body, env.model, False)
        await self._forward(scope, receive, relay, ctx, body)

    async def _identified_body(self, scope: Scope, receive: Receive, relay: Relay, headers: dict[bytes, bytes], limit: int | None = None) -> tuple[Identity, bytes]:
        """Who is asking, then what they sent (bounded: ``server.max_body_bytes``
        unless the route has its own ``limit``): every handler's first step.
        Both go on the outcome as soon as they are known, so a refusal is logged with them."""
        ident = self._identify(scope, headers)
        relay.out.tenant = ident.tenant
        body = relay.out.body = await self._read_body(receive, headers, limit)
        return ident, body

    async def passthrough(self, scope: Scope, receive: Receive, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """Routes Weir forwards without reading: models, batches, files, skills…"""
        out = relay.out
        try:
            ident, body = await self._identified_body(scope, receive, relay, headers)
        except ProxyError as err:
            await relay.send_error(err)
            return
        ctx = self._context(scope, headers, out, ident, body, "", False)
        await self._forward(scope, receive, relay, ctx, body)

    def _context(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        out: Outcome,
        ident: Identity,
        body: bytes,
        model: str,
        stream: bool,
        temperature: Any = ...,
        kind: str = "main",
    ) -> RequestContext:
        """The request's facts, fixed from here on; the Outcome starts with the same ones."""
        path = out.path
        d = self.settings.deadlines
        raw_priority = headers.get(b"x-weir-priority")
        priority = "interactive"
        if raw_priority is not None and raw_priority.decode("latin-1") in PRIORITIES:
            priority = raw_priority.decode("latin-1")
        project = ""
        raw_project = headers.get(b"x-weir-project")
        if raw_project and len(raw_project) <= _PROJECT_MAX and raw_project.isascii():
            project = raw_project.decode("ascii")
            if not project.isprintable():
                project = ""
        cache = self.cache
        lookup = cache.plan(path, headers, body, ident.tenant, temperature) if cache is not None else None
        out.model, out.stream, out.bytes_in, out.project = model, stream, len(body), project
        return RequestContext(
            request_id=out.request_id,
            received=out.received,
            method=out.method,
            path=path,
            ingress=out.ingress,
            tenant=ident.tenant,
            passthrough=ident.passthrough,
            model=model,
            stream=stream,
            priority=priority,  # type: ignore[arg-type]
            deadlines=Deadlines(total=trio.current_time() + d.total_s, first_byte_s=d.first_byte_s, idle_s=d.idle_s),
            lookup=lookup,
            kind=kind,
            project=project,
            span=out.span,
        )

    async def _admit_and_forward(self, scope: Scope, receive: Receive, relay: Relay, ctx: RequestContext, body: bytes) -> None:
        """Admit against the tenant's budget on an estimate; settle on the real usage.

        Tokens are the upstream's: settled with the usage of the reply relayed
        from an upstream call; a reply served whole from the cache, or a
        failed call, refunds the estimate.
        """
        limiter = self.ratelimiter
        if limiter is None:
            await self._forward(scope, receive, relay, ctx, body)
            return
        est = estimate_input_tokens(body)
        decision = await limiter.admit(ctx.tenant, est)
        relay.extra_headers.extend(decision.headers())
        relay.own_ratelimit = not decision.degraded
        if not decision.allowed:
            self.limited[ctx.tenant] = self.limited.get(ctx.tenant, 0) + 1
            if self.metrics is not None:
                spent = decision.requests_limit and decision.requests_remaining <= 0
                self.metrics.ratelimit_rejection(ctx.tenant, "requests" if spent else "tokens")
            relay.out.result = "rate_limited"
            await relay.send_error(ProxyError(429, f"rate limit exceeded for tenant {ctx.tenant}; retry after {decision.retry_after:.1f}s", "rate_limit_error"))
            return
        relay.metered = True
        try:
            await self._forward(scope, receive, relay, ctx, body)
        finally:
            served_from_cache = relay.out.cache == "hit"
            actual = relay.meter.tokens if relay.meter is not None and not served_from_cache else 0
            with trio.move_on_after(1) as cs:  # settle even when the client left
                cs.shield = True
                await limiter.settle(ctx.tenant, est, actual)

    async def _read_body(self, receive: Receive, headers: Mapping[bytes, bytes], limit: int | None = None) -> bytes:
        if limit is None:
            limit = self.settings.server.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise ProxyError(413, f"request body is {int(declared)} bytes; the limit is {limit}", "request_too_large")
            except ValueError:
                raise ProxyError(400, "content-length is not a number", "invalid_request_error") from None
        first = await receive()
        if first["type"] == "http.disconnect":
            raise _ClientGone()
        body = first.get("body", b"")
        if not first.get("more_body", False):
            if len(body) > limit:
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
            return body
        parts = [body]
        size = len(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                if msg.get("more_body", False):
                    await _discard_rest(receive)
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _forward(self, scope: Scope, receive: Receive, relay: Relay, ctx: RequestContext, body: bytes) -> None:
        """Open the one opener inside the request's deadline scope and relay what comes back."""
        req = UpstreamRequest(
            method=ctx.method,
            path=ctx.path,
            query=scope["query_string"],
            headers=upstream_request_headers(scope["headers"], forward_credentials=ctx.passthrough),
            body=body,
            stream=ctx.stream,
            model=ctx.model,
        )
        if self.meter_usage:
            relay.metered = True
        out = relay.out
        opener = self.opener
        assert opener is not None, "a request before start-up"
        if ctx.lookup is not None and self.cache is not None:
            if self.tracing is None:
                hit = await self.cache.hit(ctx)
            else:
                with self.tracing.child("weir.cache_lookup") as span:
                    hit = await self.cache.hit(ctx)
                    span.set_attribute("weir.cache.hit", hit is not None)
            if hit is not None:
                out.take(hit.served)
                await relay.response(hit, trio.CancelScope(), ctx.deadlines)
                return
        await self.relay_opened(receive, relay, req, ctx, opener)

    async def relay_opened(self, receive: Receive, relay: Relay, req: UpstreamRequest, ctx: RequestContext, opener: Opener) -> None:
        """Open ``opener`` inside the request's deadline scope, beside the
        hang-up watcher, and relay what comes back: every answer a client gets
        from an upstream goes out through here (the passthrough batches'
        results too, proxy/batches/passthrough.py)."""
        out = relay.out
        # A client that hangs up cancels everything below, the upstream call
        # included: the pool closes that connection as it unwinds, which is how
        # the upstream learns the call was abandoned. The watcher runs in the
        # lifespan's nursery, not a nursery of the request's own: opening and
        # closing one per request (and waiting for the cancelled watcher to
        # unwind before returning) was ~2% of a proxied request's CPU.
        watcher = trio.CancelScope()
        d = ctx.deadlines
        try:
            with trio.CancelScope(deadline=min(trio.current_time() + d.first_byte_s, d.total)) as scope_:
                self._tasks.start_soon(_watch_disconnect, receive, scope_, relay, watcher)  # type: ignore[union-attr]
                asked = time.perf_counter()
                resp = None
                try:
                    async with opener.open(req, ctx) as resp:
                        out.upstream_head_s = time.perf_counter() - asked
                        if resp.status >= 400:
                            await relay.error_response(resp)
                        else:
                            await relay.response(resp, scope_, d)
                except ProxyError as err:
                    if err.served is not None:
                        out.take(err.served)
                    if not relay.head_sent:
                        await relay.send_error(err)
                except UpstreamError as exc:
                    # Past the head the relay already ended the stream; before it, nobody answered.
                    if not relay.head_sent:
                        await relay.send_error(upstream_failure(exc, out.target or "upstream"))
                finally:
                    if resp is not None:
                        out.take(resp.served)
                        out.breaker = resp.served.verdict
                    if relay.meter is not None and out.cache != "hit":
                        out.input_tokens, out.output_tokens = relay.meter.counts()
                        out.cache_read_tokens, out.cache_creation_tokens = relay.meter.cache_read, relay.meter.cache_creation
        finally:
            watcher.cancel()
        if scope_.cancelled_caught and out.result != "client_closed":
            out.result = "deadline"
            if not relay.head_sent:
                phase = "first byte" if trio.current_time() < d.total else "total"
                where = f"upstream {out.target}" if out.target else "the upstream"
                await relay.send_error(ProxyError(504, f"{where} did not answer within the {phase} deadline", "timeout_error"))
            elif relay.is_sse:
                await relay.end_stream_with_error("timeout_error", "the request deadline expired mid-stream")
            out.error = out.error or "timeout_error"

    # ----------------------------------------------------------- lifespan

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self.startup(nursery)
                    await self._quart_lifespan(nursery, scope)
                except Exception as exc:  # start-up failure: tell the server, which exits
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    nursery.cancel_scope.cancel()
                    return
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
                if self.batches is not None:
                    # Items in flight get a lease's length to finish; the rest
                    # are released when the nursery is cancelled, to run elsewhere.
                    await self.batches.runner.drain(min(self.settings.server.drain_s, self.settings.batches.lease_s))
                await self._quart_shutdown()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def _quart_lifespan(self, nursery: trio.Nursery, scope: Scope) -> None:
        """Run Quart's own lifespan inside ours, so it starts and stops with the app."""
        to_quart_send, to_quart_recv = trio.open_memory_channel[dict[str, Any]](1)
        from_quart_send, from_quart_recv = trio.open_memory_channel[dict[str, Any]](1)

        async def q_send(msg: dict[str, Any]) -> None:
            await from_quart_send.send(msg)

        nursery.start_soon(self.admin, scope, to_quart_recv.receive, q_send)
        await to_quart_send.send({"type": "lifespan.startup"})
        reply = await from_quart_recv.receive()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"admin app failed to start: {reply.get('message')}")
        self._quart_channels = (to_quart_send, from_quart_recv)

    async def _quart_shutdown(self) -> None:
        to_quart_send, from_quart_recv = self._quart_channels
        await to_quart_send.send({"type": "lifespan.shutdown"})
        with trio.move_on_after(5):
            await from_quart_recv.receive()

    async def startup(self, nursery: trio.Nursery) -> None:
        self._tasks = nursery  # the requests' disconnect watchers run here (``_forward``)
        self._access_on = self.settings.server.access_log and self.access.enabled()
        if self.settings.uses_mock():
            # The quick start's mock is started by whoever runs the app (proxy/cli.py).
            raise RuntimeError("no upstream has a URL: configure one, or start Weir through `weir serve`, which starts the mock upstream")
        # The ledger's writer flushes every buffered row when this nursery is
        # cancelled, which happens after the server has stopped taking requests.
        self.ledger = await nursery.start(serve_ledger, self.settings.ledger, self.settings.server.data_dir)
        if self.ledger is not None:
            self.meter_usage = True  # tokens and cost on every row
            self.on_finished.append(self._record)
        for u in self.settings.upstreams:
            target = Target(u, url=u.url, keys=u.keys(self.environ), deadlines=self.settings.deadlines)
            nursery.start_soon(target.pool.reap_idle)
            self.targets.append(target)
        self.router = Router(self.settings, self.targets, metrics=self.metrics, tracing=self.tracing)
        self.ratelimiter = await nursery.start(serve_ratelimiter, self.settings.ratelimit)
        # The cache layer wraps the router and owns its L2 connection and
        # background work from a task in this nursery (proxy.caching.serve_cache);
        # it closes when the lifespan ends.
        self.cache = await nursery.start(serve_cache, self.settings.cache, self.router, self.settings.server.data_path("cache.db"))
        self.opener = self.cache
        if self.batch_api is not None:
            # After the opener: the runner sends items through the request path at once.
            self.batches = await nursery.start(serve_batches, self)
        if self.metrics is not None:
            nursery.start_soon(self._refresh_gauges)
        if self.settings.server.gc_freeze:
            gc.collect()
            gc.freeze()
        self.started = True

    async def _refresh_gauges(self) -> None:
        """Copy component state into this worker's gauges, every ``metrics.refresh_s``."""
        while True:
            await self.refresh_gauges()
            await trio.sleep(self.settings.metrics.refresh_s)

    async def refresh_gauges(self) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        now = trio.current_time()
        lanes = self.router.lanes if self.started and self.router is not None else []
        keys = []
        for lane in lanes:
            if lane.keys is not None:
                keys += [(lane.name, k["id"], k["state"] == "ok") for k in lane.keys.snapshot(now)]
        sizes: list[tuple[str, int]] = []
        self._refreshes += 1
        # The cache's stats count L2's rows (an SQLite scan): a slower beat.
        if self.cache is not None and self._refreshes % _CACHE_REFRESH_EVERY == 1:
            stats = await self.cache.stats()
            sizes.append(("l1", int(stats.get("l1", {}).get("bytes", 0))))
            if "bytes" in stats.get("l2", {}):
                sizes.append(("l2", int(stats["l2"]["bytes"])))
        metrics.flush()
        metrics.set_gauges(
            inflight=self.in_flight,
            breakers=[(lane.name, str(lane.breaker.snapshot(now)["state"])) for lane in lanes],
            keys=keys,
            cache_bytes=sizes,
            ledger_queue=self.ledger.writer.buffered if self.ledger is not None else None,
            ledger_spooled=self.ledger.writer.spool_pending if self.ledger is not None else None,
            batch_running=self.batches.runner.in_flight if self.batches is not None else None,
        )

    async def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()  # this worker's last counts, before its files are left behind
        if self.tracing is not None:
            await trio.to_thread.run_sync(self.tracing.shutdown)
        for t in self.targets:
            await t.aclose()
        self.targets.clear()
        self.started = False

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.started or not self.targets:
            return False, "starting"
        if self.router is not None and not self.router.usable(trio.current_time()):
            # Every breaker is open: this instance can only answer 503s, so a
            # load balancer should send traffic elsewhere until a probe succeeds.
            return False, "no_usable_upstream"
        return True, "ready"


# A batch item's request head: the SDK's defaults, at batch priority (the fair
# queue serves interactive traffic first); the user agent names it in the ledger.
_BATCH_ITEM_HEADERS = [
    (b"content-type", b"application/json"),
    (b"anthropic-version", b"2023-06-01"),
    (b"x-weir-priority", b"batch"),
    (b"user-agent", b"weir-batch/1"),
]

# Gauge refreshes per cache-size refresh (15 s at the default 1 s beat).
_CACHE_REFRESH_EVERY = 15

# After refusing an oversized body, read this much more of it so the client,
# still sending, is listening when the 413 arrives; past it, the connection
# closes and a client that keeps sending sees a reset instead.
_DISCARD_LIMIT = 1024 * 1024


async def _discard_rest(receive: Receive) -> None:
    seen = 0
    while seen < _DISCARD_LIMIT:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


def _capturing(send: Send, limit: int) -> tuple[Send, bytearray]:
    """``send``, keeping the first ``limit`` bytes of the response body (ledger.bodies)."""
    kept = bytearray()

    async def capture(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and len(kept) < limit:
            kept.extend(message.get("body", b"")[: limit - len(kept)])
        await send(message)

    return capture, kept


class _ClientGone(Exception):
    """The client disconnected while sending its body."""


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, relay: Relay, watcher: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client hangs up; ends when ``watcher`` is cancelled.

    It runs in the lifespan's nursery, so it must never raise: a receive
    channel the server already closed ends it quietly.
    """
    with watcher:
        while True:
            try:
                message = await receive()
            except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if message["type"] == "http.disconnect":
                if relay.complete:
                    return  # the response is whole: this is the end of the exchange, not a hang-up
                relay.out.result = "client_closed"
                if not relay.out.status:
                    relay.out.status = 499  # nginx's convention for "client closed request"
                scope.cancel()
                return


def build_app(settings: Settings, environ: Mapping[str, str] | None = None, *, tracing: Tracing | None = None) -> Weir:
    return Weir(settings, environ, tracing=tracing)
