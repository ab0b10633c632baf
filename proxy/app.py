"""The ASGI application: a lean hot path for ``/v1/*`` and Quart for the rest.

ARCHITECTURE.md measured Quart's per-request machinery at ~30% of a trivial
route's cost on Hypercorn's trio worker, so the API routes are plain ASGI
callables looked up in a dict; health, readiness and the admin API are a
Quart-Trio app, where the convenience is worth more than the microseconds.

The lifespan owns the one nursery every background task of this worker runs
in (the cache's flights and L2 writes, the Redis clients
of the cache and the rate limiter); it also owns the upstream pools and
closes them after the server stopped sending requests.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from .auth import Authenticator, Identity
from .caching import CacheStage, serve_cache
from .ingress.anthropic import count_tokens_locally, decode_count_tokens, decode_messages
from .ingress.openai import decode_chat, openai_error_send
from .errors import ProxyError
from .headers import request_id, upstream_request_headers
from .kinds import classify
from .local_answers import local_answer
from .logs import AccessLog, AccessRecord
from .metrics import Metrics
from .tracing import Tracing, client_trace_id, tracing_from_env
from .relay import (
    Deadlines,
    Exchange,
    end_stream_with_error,
    relay_error_response,
    relay_response,
    send_error,
)
from .ratelimit import LocalRateLimiter, RedisRateLimiter, serve_ratelimiter
from .router import Router
from .settings import Settings
from .target_path import BadTarget, checked_path, checked_query
from .upstream import Target, UpstreamError, UpstreamRequest
from .usage import estimate_input_tokens

__all__ = ["Weir", "build_app"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger("weir")

_DRAINING = ProxyError(503, "Weir is shutting down; retry on another instance", "overloaded_error", [(b"connection", b"close"), (b"retry-after", b"1")])


class Weir:
    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None, *, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        # Traces: passed in (tests), or from the OTEL_* variables; None = off.
        self.tracing = tracing if tracing is not None else tracing_from_env(self.environ)
        self.auth = Authenticator(settings.auth, self.environ)
        self.access = AccessLog()
        self._access_on = False  # decided at start-up, once logging is configured
        self.targets: list[Target] = []
        self.router: Router
        self.draining = False
        self.started = False
        self.in_flight = 0
        self.served = 0
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None
        self.ratelimiter: LocalRateLimiter | RedisRateLimiter | None = None
        self.limited: dict[str, int] = {}  # tenant → requests refused by the rate limiter
        self.cache: CacheStage | None = None  # built in startup(), after the router
        self.local_kinds = frozenset(settings.claude_code.answer_locally)
        self.metrics: Metrics | None = None
        self._refreshes = 0
        if settings.metrics.enabled:
            self.metrics = Metrics(
                tenants=[ck.tenant for ck in settings.auth.client_keys], targets=[u.name for u in settings.upstreams], max_models=settings.metrics.max_models
            )
        # path → method → handler. A dict lookup is the whole router.
        self.routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            "/v1/messages": {"POST": self.messages},
            "/v1/messages/count_tokens": {"POST": self.count_tokens},
            "/v1/models": {"GET": self.passthrough},
            "/v1/chat/completions": {"POST": self.chat_completions},
        }
        # The methods Anthropic's API uses on the endpoints Weir does not read.
        self._forwarded = dict.fromkeys(("GET", "POST", "DELETE", "PUT", "PATCH"), self.passthrough)
        from .admin import build_admin

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
        if path.startswith("/v1/chat/"):
            # The OpenAI ingress: every error it answers — 400, 401, 404, 405
            # included — in OpenAI's shape.
            send = openai_error_send(send)
        headers = dict(scope["headers"])
        try:
            # Route on, and forward, the raw path as checked — never Hypercorn's decoded one.
            path = scope["path"] = checked_path(scope.get("raw_path") or path.encode())
            scope["query_string"] = checked_query(scope["query_string"])
        except BadTarget as exc:
            ex = Exchange(request_id=request_id(headers), started=time.perf_counter(), method=scope["method"], path=path)
            await send_error(send, ex, ProxyError(400, str(exc), "invalid_request_error"))
            self._log(ex)
            return
        methods = self.routes.get(path)
        if methods is None:
            if path.startswith("/v1/models/"):
                methods = {"GET": self.passthrough}
            elif not path.startswith("/v1/chat/"):
                # Batches, files, skills and whatever Anthropic adds next:
                # forwarded, as checked above, to an Anthropic-kind target
                # (proxy/router.py resolves them); a target kind with no
                # equivalent answers 404 (proxy/upstream/adapters.py).
                methods = self._forwarded
        ex = Exchange(request_id=request_id(headers), started=time.perf_counter(), method=scope["method"], path=path)
        handler = methods.get(scope["method"]) if methods is not None else None
        if handler is None:
            if methods is None:
                err = ProxyError(404, f"Not found: {scope['method']} {path}", "not_found_error")
            else:
                allow = ", ".join(sorted(methods)).encode()
                err = ProxyError(405, f"Method {scope['method']} not allowed for {path}", "invalid_request_error", [(b"allow", allow)])
            await send_error(send, ex, err)
            self._log(ex)
            return
        if self.draining:
            await send_error(send, ex, _DRAINING)
            self._log(ex)
            return
        self.in_flight += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            if self.tracing is None:
                ex.trace_id = client_trace_id(headers.get(b"traceparent"))
                await handler(scope, receive, send, headers, ex)
            else:
                ex.span = self.tracing.start_request(scope["method"], path, headers, ex.request_id)
                ex.trace_id = self.tracing.trace_id(ex.span)
                with self.tracing.current(ex.span):
                    await handler(scope, receive, send, headers, ex)
        except _ClientGone:
            ex.status, ex.outcome = 499, "client_closed"
        except Exception:
            # A bug, not a client's fault: the traceback goes to our log with
            # the request id; the client gets Anthropic's shape and that id.
            log.exception("request failed", extra={"request_id": ex.request_id})
            ex.outcome, ex.error = "internal_error", "api_error"
            if not ex.head_sent:
                await send_error(send, ex, ProxyError(500, f"internal error; request id {ex.request_id}", "api_error"))
            elif ex.is_sse:
                await end_stream_with_error(send, ex, "api_error", f"internal error; request id {ex.request_id}")
        finally:
            self.in_flight -= 1
            self.served += 1
            if self.in_flight == 0:
                self._idle.set()
            self._log(ex)

    def _log(self, ex: Exchange) -> None:
        """The one place a finished request is recorded: metrics, then the access log."""
        if self.metrics is not None:
            self._measure(ex)
        if ex.span is not None:
            self._end_span(ex)
        if not self._access_on:
            return
        now = time.time()
        self.access.write(
            AccessRecord(
                ts=self.access.timestamp(now),
                request_id=ex.request_id,
                method=ex.method,
                path=ex.path,
                status=ex.status,
                tenant=ex.tenant,
                model=ex.model,
                stream=ex.stream,
                target=ex.target,
                outcome=ex.outcome or ("ok" if ex.status < 400 else "error"),
                error=ex.error or None,
                duration_ms=round((time.perf_counter() - ex.started) * 1000.0, 3),
                upstream_ms=round(ex.upstream_s * 1000.0, 3),
                bytes_out=ex.bytes_out,
                dropped=ex.dropped or None,
                kind=ex.kind or None,
                trace_id=ex.trace_id or None,
            )
        )

    def _measure(self, ex: Exchange) -> None:
        end = time.perf_counter()
        cache = ""
        for name, value in ex.extra_headers:
            if name == b"x-weir-cache":
                cache = value.decode()
        meter = ex.meter
        self.metrics.request(  # type: ignore[union-attr]
            route=ex.path,
            tenant=ex.tenant,
            model=ex.model,
            target=ex.target,
            code=ex.status,
            cache=cache,
            kind=ex.kind,
            stream=ex.stream,
            duration_s=end - ex.started,
            overhead_s=end - ex.started - ex.upstream_s,
            ttft_s=ex.first_byte - ex.started if ex.first_byte and ex.status < 400 else None,
            input_tokens=meter.input if meter is not None else 0,
            output_tokens=meter.output if meter is not None else 0,
        )

    def _end_span(self, ex: Exchange) -> None:
        name, _, served = ex.target.partition(":")
        lane = self.router.lane(name) if self.started and name else None
        meter = ex.meter
        cache = ""
        for n, value in ex.extra_headers:
            if n == b"x-weir-cache":
                cache = value.decode()
        self.tracing.finish_request(  # type: ignore[union-attr]
            ex.span,
            operation="chat" if ex.path in ("/v1/messages", "/v1/chat/completions") else "",
            provider=lane.target.kind if lane is not None else "",
            request_model=ex.model,
            response_model=served or ex.model,
            status=ex.status,
            error=ex.error if ex.error and ex.status >= 400 or ex.error.startswith("upstream_") else "",
            input_tokens=meter.input if meter is not None else 0,
            output_tokens=meter.output if meter is not None else 0,
            target=ex.target,
            cache=cache,
        )

    # ----------------------------------------------------------- handlers

    async def messages(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], ex: Exchange) -> None:
        await self._model_call(scope, receive, send, headers, ex, decode_messages)

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], ex: Exchange) -> None:
        """OpenAI clients, to either kind of upstream; every error in OpenAI's shape (see ``_api``)."""
        await self._model_call(scope, receive, send, headers, ex, decode_chat)

    async def _model_call(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], ex: Exchange, decode: Callable[[bytes], Any]
    ) -> None:
        """A generation in either dialect: identify, read, decode the envelope, admit, forward."""
        try:
            ident = self.auth.identify(headers)
            ex.tenant = ident.tenant
            body = await self._read_body(receive, headers)
            env = decode(body)
        except ProxyError as err:
            await send_error(send, ex, err)
            return
        ex.model = env.model
        ex.stream = env.stream
        ex.temperature = getattr(env, "temperature", ...)
        if decode is decode_messages:
            ex.kind = classify(env)
            if ex.kind in self.local_kinds:
                await self._answer_locally(send, ex)
                return
        await self._admit_and_forward(scope, receive, send, headers, ex, body, ident)

    async def _answer_locally(self, send: Send, ex: Exchange) -> None:
        """A side call the operator chose to answer without an upstream (proxy/local_answers.py)."""
        content_type, body = local_answer(ex.kind, ex.model, ex.stream)
        ex.status, ex.target = 200, "local"
        ex.is_sse = ex.stream
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), (b"x-weir-target", b"local"), *ex.weir_headers()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        ex.head_sent = True
        await send({"type": "http.response.body", "body": body})
        ex.bytes_out = len(body)
        ex.complete = True

    async def _admit_and_forward(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], ex: Exchange, body: bytes, ident: Identity) -> None:
        """Admit against the tenant's budget on an estimate; settle on the real usage.

        Tokens are the upstream's: settled with the usage of the reply relayed
        from an upstream call; a reply served whole from the cache, or a
        failed call, refunds the estimate.
        """
        limiter = self.ratelimiter
        if limiter is None:
            await self._forward(scope, receive, send, headers, ex, body, ident)
            return
        est = estimate_input_tokens(body)
        decision = await limiter.admit(ident.tenant, est)
        ex.extra_headers.extend(decision.headers())
        ex.own_ratelimit = not decision.degraded
        if not decision.allowed:
            self.limited[ident.tenant] = self.limited.get(ident.tenant, 0) + 1
            if self.metrics is not None:
                spent = decision.requests_limit and decision.requests_remaining <= 0
                self.metrics.ratelimit_rejection(ident.tenant, "requests" if spent else "tokens")
            ex.outcome = "rate_limited"
            await send_error(send, ex, ProxyError(429, f"rate limit exceeded for tenant {ident.tenant}; retry after {decision.retry_after:.1f}s", "rate_limit_error"))
            return
        ex.metered = True
        try:
            await self._forward(scope, receive, send, headers, ex, body, ident)
        finally:
            actual = ex.meter.tokens if ex.meter is not None else 0
            with trio.move_on_after(1) as cs:  # settle even when the client left
                cs.shield = True
                await limiter.settle(ident.tenant, est, actual)

    async def count_tokens(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], ex: Exchange) -> None:
        try:
            ident = self.auth.identify(headers)
            ex.tenant = ident.tenant
            body = await self._read_body(receive, headers)
            env = decode_count_tokens(body)
            ex.model = env.model
            lane, _ = self.router.resolve(env.model)[0]
            if lane.target.kind == "openai":
                # OpenAI-compatible servers have no token counter: estimate locally.
                counted = b'{"input_tokens":%d}' % count_tokens_locally(body)
                ex.status = 200
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(counted)).encode()), (b"x-weir-token-count", b"estimate"), *ex.weir_headers()]})
                await send({"type": "http.response.body", "body": counted})
                return
        except ProxyError as err:
            await send_error(send, ex, err)
            return
        await self._forward(scope, receive, send, headers, ex, body, ident)

    async def passthrough(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], ex: Exchange) -> None:
        """Routes Weir forwards without reading: models, batches, files, skills…"""
        try:
            ident = self.auth.identify(headers)
            ex.tenant = ident.tenant
            body = await self._read_body(receive, headers)
        except ProxyError as err:
            await send_error(send, ex, err)
            return
        await self._forward(scope, receive, send, headers, ex, body, ident)

    async def _read_body(self, receive: Receive, headers: Mapping[bytes, bytes]) -> bytes:
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

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        ex: Exchange,
        body: bytes,
        ident: Identity,
    ) -> None:
        cache = self.cache
        if cache is not None:
            ex.cache_plan = cache.plan(scope["path"], headers, body, ident, ex)
            if ex.cache_plan is not None:
                if self.tracing is None:
                    if await cache.answer(send, ex, ex.cache_plan):
                        return
                else:
                    with self.tracing.child("weir.cache_lookup") as span:
                        hit = await cache.answer(send, ex, ex.cache_plan)
                        span.set_attribute("weir.cache.hit", hit)
                    if hit:
                        return
        req = UpstreamRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"],
            headers=upstream_request_headers(scope["headers"], forward_credentials=ident.passthrough, credentials=[]),
            body=body,
            stream=ex.stream,
            model=ex.model,
            priority=headers.get(b"x-weir-priority", b"interactive").decode("latin-1"),
            kind=ex.kind or "main",
        )
        d = self.settings.deadlines
        deadlines = Deadlines(total=trio.current_time() + d.total_s, first_byte_s=d.first_byte_s, idle_s=d.idle_s)
        async with trio.open_nursery() as nursery:
            # A client that hangs up cancels everything below, the upstream
            # call included: the pool closes that connection as it unwinds,
            # which is how the upstream learns the call was abandoned.
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope, ex)

            async def send_tracked(message: dict[str, Any]) -> None:
                # Hypercorn reports http.disconnect as soon as a response is
                # complete (as ASGI says it should): mark completion *before*
                # the last send, so the watcher can tell that from a hang-up.
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    ex.complete = True
                await send(message)

            try:
                await self._respond(send_tracked, ex, req, headers, ident, deadlines)
            finally:
                nursery.cancel_scope.cancel()

    async def _respond(self, send: Send, ex: Exchange, req: UpstreamRequest, headers: dict[bytes, bytes], ident: Identity, deadlines: Deadlines) -> None:
        """cache → coalesce → route → upstream → respond."""
        if self.cache is None:
            await self._exchange(send, ex, req, ident, deadlines)
            return
        await self.cache.respond(send, ex, req, headers, ident, deadlines, self._exchange)

    async def _exchange(
        self,
        send: Send,
        ex: Exchange,
        req: UpstreamRequest,
        ident: Identity,
        deadlines: Deadlines,
        *,
        opener: Callable[..., Any] | None = None,
        tee: Callable[[bytes], None] | None = None,
    ) -> None:
        """One request relayed from its upstream call — or, with ``opener``
        (the coalescer's), from a call it shares; ``tee`` sees each chunk."""
        first = trio.current_time() + deadlines.first_byte_s
        with trio.CancelScope(deadline=min(first, deadlines.total)) as scope:
            ex.deadline_scope = scope
            t_up = time.perf_counter()
            try:
                async with (opener or self.router.open)(req, ident=ident, ex=ex, deadlines=deadlines) as resp:
                    ex.upstream_s = time.perf_counter() - t_up
                    if resp.status >= 400:
                        await relay_error_response(send, ex, resp)
                        return
                    await relay_response(send, ex, resp, scope, deadlines, tee=tee)
            except ProxyError as err:
                if not ex.head_sent:
                    await send_error(send, ex, err)
                return
            except UpstreamError:
                return  # broke after the head: relay_response already ended the stream
        if scope.cancelled_caught:
            ex.outcome = "deadline"
            if not ex.head_sent:
                phase = "first byte" if trio.current_time() < deadlines.total else "total"
                await send_error(send, ex, ProxyError(504, f"upstream {ex.target} did not answer within the {phase} deadline", "timeout_error"))
            elif ex.is_sse:
                await end_stream_with_error(send, ex, "timeout_error", "the request deadline expired mid-stream")

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
        self._nursery = nursery
        self._access_on = self.settings.server.access_log and self.access.enabled()
        upstreams = list(self.settings.upstreams)
        if self.settings.uses_mock():
            # The quick start's mock is started by whoever runs the app (proxy/cli.py).
            raise RuntimeError("no upstream has a URL: configure one, or start Weir through `weir serve`, which starts the mock upstream")
        for u in upstreams:
            target = Target(u, url=u.url, keys=u.keys(self.environ), deadlines=self.settings.deadlines)
            nursery.start_soon(target.pool.reap_idle)
            self.targets.append(target)
        self.router = Router(self.settings, self.targets, metrics=self.metrics, tracing=self.tracing)
        self.ratelimiter = await nursery.start(serve_ratelimiter, self.settings.ratelimit)
        # The cache stage owns its L2 connection and background work from a
        # task in this nursery (see proxy.caching.serve_cache); it closes when
        # the lifespan ends. The lambda looks the router up per call.
        self.cache = await nursery.start(
            serve_cache, self.settings.cache, lambda *a, **kw: self.router.open(*a, **kw), self.settings.server.data_path("cache.db")
        )
        if self.metrics is not None:
            nursery.start_soon(self._refresh_gauges)
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
        lanes = self.router.lanes if self.started else []
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

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait for those in flight; True if all finished."""
        self.draining = True
        with trio.move_on_after(timeout):
            await self._idle.wait()
            return True
        return False

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.started or not self.targets:
            return False, "starting"
        return True, "ready"


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


class _ClientGone(Exception):
    """The client disconnected while sending its body."""


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, ex: Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if ex.complete:
                return  # the response is whole: this is the end of the exchange, not a hang-up
            ex.outcome = "client_closed"
            if not ex.status:
                ex.status = 499  # nginx's convention for "client closed request"
            scope.cancel()
            return


def build_app(settings: Settings, environ: Mapping[str, str] | None = None, *, tracing: Tracing | None = None) -> Weir:
    return Weir(settings, environ, tracing=tracing)
