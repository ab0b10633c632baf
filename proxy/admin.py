"""Everything off the hot path: health, readiness, the admin API.

A Quart-Trio app, because here routing, JSON helpers and error handlers are
worth more than the ~30% per-request cost docs/ARCHITECTURE.md gives. Errors
keep Anthropic's shape so a client that wandered here still parses them.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import trio
import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from .errors import error_body
from .headers import request_id



class WeirView(Protocol):
    """What the admin app reads of the server it describes (``proxy.app.Weir``
    satisfies it); the app builds the admin app, never the other way round."""

    settings: Any
    auth: Any
    router: Any
    targets: list[Any]
    cache: Any
    ratelimiter: Any
    limited: dict[str, int]
    in_flight: int
    served: int
    draining: bool
    started: bool
    ledger: Any  # proxy.ledger.service.Ledger, or None when ledger.url = "off"
    batches: Any  # proxy.batches.service.Batches, or None when Weir does not run batches

    def ready(self) -> tuple[bool, str]: ...

    async def replay(self, entry: Any) -> tuple[str, int]: ...

__all__ = ["build_admin"]


def _json_error(status: int, type_: str, message: str) -> Response:
    return Response(error_body(type_, message), status=status, content_type="application/json")


def build_admin(weir: WeirView) -> QuartTrio:
    app = QuartTrio("weir")
    # Quart's own per-request logging would duplicate ours.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    @app.get("/health")
    async def health() -> Any:
        """Liveness: the process answers. Says nothing about upstreams, on purpose:
        an orchestrator restarting us because a provider is down helps no one."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        ok, reason = weir.ready()
        body = {"status": reason, "in_flight": weir.in_flight, "upstreams": [t.name for t in weir.targets]}
        return body, (200 if ok else 503)

    # Says what to set, as README documents it: a key in the environment,
    # named by auth.admin_key_env (auth.admin_key is for tests and files
    # kept out of version control). Names the variable, never a value.
    env = weir.settings.auth.admin_key_env
    disabled = (
        f"the admin API is disabled: auth.admin_key_env names {env}, which is not set in Weir's environment"
        if env
        else "the admin API is disabled: set auth.admin_key_env to the name of an environment variable holding the admin key"
    )

    @app.before_request
    async def admin_auth() -> Any:
        if not request.path.startswith("/admin/"):
            return None
        if not weir.auth.admin_enabled:
            return _json_error(404, "not_found_error", disabled)
        if not weir.auth.is_admin({k.lower().encode(): v.encode() for k, v in request.headers.items()}):
            return _json_error(401, "authentication_error", "admin key required")
        return None

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus' text format, summed over every worker (see proxy/metrics.py)."""
        if weir.metrics is None:
            return _json_error(404, "not_found_error", "metrics are disabled: set metrics.enabled = true")
        if not weir.settings.metrics.public:
            if not weir.auth.admin_enabled:
                return _json_error(404, "not_found_error", "/metrics needs the admin key (set auth.admin_key) or metrics.public = true")
            if not weir.auth.is_admin({k.lower().encode(): v.encode() for k, v in request.headers.items()}):
                return _json_error(401, "authentication_error", "admin key required")
        await weir.refresh_gauges()  # flushes this worker's pending counts too
        from .metrics import CONTENT_TYPE

        body = await trio.to_thread.run_sync(weir.metrics.render)
        return Response(body, status=200, content_type=CONTENT_TYPE)

    @app.get("/admin/upstreams")
    async def upstreams() -> Any:
        """Targets with their breaker, key pool (ids, never secrets) and scheduler state."""
        now = trio.current_time()
        return {"upstreams": [lane.snapshot(now) for lane in weir.router.lanes]}

    @app.post("/admin/upstreams/<name>/breaker/reset")
    async def breaker_reset(name: str) -> Any:
        lane = weir.router.lane(name)
        if lane is None:
            return _json_error(404, "not_found_error", f"no upstream {name!r}")
        lane.breaker.reset(trio.current_time())
        return {"upstream": name, "breaker": lane.breaker.snapshot(trio.current_time())}

    @app.post("/admin/upstreams/<name>/keys/<key_id>/<action>")
    async def key_toggle(name: str, key_id: str, action: str) -> Any:
        lane = weir.router.lane(name)
        if lane is None or lane.keys is None:
            return _json_error(404, "not_found_error", f"no key pool for upstream {name!r}")
        if action not in ("enable", "disable"):
            return _json_error(404, "not_found_error", f"unknown action {action!r}: enable or disable")
        try:
            getattr(lane.keys, action)(key_id)
        except KeyError:
            return _json_error(404, "not_found_error", f"no key {key_id!r} in upstream {name!r}")
        return {"upstream": name, "keys": lane.keys.snapshot(trio.current_time())}

    @app.get("/admin/routes")
    async def routes() -> Any:
        return {
            "routes": [{"match": r.match, "targets": list(r.targets), **({"kind": r.kind} if r.kind else {})} for r in weir.settings.routes],
            "default": weir.router.lanes[0].name if weir.router.lanes else None,
        }

    @app.get("/admin/stats")
    async def stats() -> Any:
        return {
            "in_flight": weir.in_flight,
            "served": weir.served,
            "draining": weir.draining,
            "targets": [
                {"name": t.name, "kind": t.kind, "url": t.url, "max_connections": t.settings.max_connections, "idle_connections": t.pool.idle}
                for t in weir.targets
            ],
            # Per tenant: refused by the rate limiter; per target: queue depth,
            # waits, grants and sheds from its scheduler.
            "rate_limited": dict(weir.limited),
            "ratelimiter": {"kind": type(weir.ratelimiter).__name__, "errors": getattr(weir.ratelimiter, "errors", 0)} if weir.ratelimiter else None,
            "schedulers": {lane.name: msgspec.to_builtins(lane.scheduler.stats()) for lane in weir.router.lanes} if weir.started else {},
            # This worker's batch runner: items in flight, results written, retries, leases lost.
            "batches": weir.batches.stats() if weir.batches is not None else None,
        }

    @app.get("/admin/cache")
    async def cache_stats() -> Any:
        if weir.cache is None:
            return _json_error(503, "api_error", "the cache is not running")
        return await weir.cache.stats()

    @app.post("/admin/cache/purge")
    async def cache_purge() -> Any:
        """All entries, or one tenant's with ``?tenant=<tenant id>``. A purge
        that could not reach L2 is a 503: an operator must not believe stale
        entries are gone when they are not."""
        from cache import L2Unavailable

        if weir.cache is None:
            return _json_error(503, "api_error", "the cache is not running")
        tenant = request.args.get("tenant") or None
        try:
            purged = await weir.cache.purge(tenant)
        except L2Unavailable as exc:
            return _json_error(503, "api_error", f"the shared cache (L2) could not be purged: {exc}")
        return {"purged": purged, "tenant": tenant}

    # ---- the request ledger (proxy/ledger/) --------------------------------

    def _ledger_or_error() -> Any:
        if weir.ledger is None:
            return None, _json_error(503, "api_error", "the ledger is off (ledger.url = \"off\")")
        return weir.ledger, None

    async def _ledger_call(fn: Any) -> Any:
        from .ledger.store import LedgerUnavailable
        from .ledger.query import BadQuery

        ledger, err = _ledger_or_error()
        if err is not None:
            return err
        try:
            return await fn(ledger)
        except BadQuery as exc:
            return _json_error(400, "invalid_request_error", str(exc))
        except LedgerUnavailable as exc:
            return _json_error(503, "api_error", f"the ledger database is unavailable: {exc}")

    @app.get("/admin/ledger")
    async def ledger_info() -> Any:
        """The ledger's size on disk and its writer's figures (spooled, dropped…)."""

        async def go(ledger: Any) -> Any:
            from .ledger.store import LedgerUnavailable

            try:
                size: Any = await ledger.size()
            except LedgerUnavailable as exc:
                size = {"error": str(exc)}
            return {"size": size, "writer": ledger.stats()}

        return await _ledger_call(go)

    @app.get("/admin/usage")
    async def usage() -> Any:
        """Usage and cost from the hourly rollups (never a scan of raw rows);
        ``since``/``until`` are rounded to the hour. ``group_by=batch``
        (``&batch_id=…`` for one) sums the batch items' rows instead, through
        the ledger's partial index on ``batch_id``."""
        from .ledger.query import usage_query

        async def go(ledger: Any) -> Any:
            group, since, until = usage_query(request.args, time.time())
            if group == "batch":
                data = await ledger.usage_by_batch(request.args.get("batch_id") or None, since, until)
            else:
                data = await ledger.usage(group, since, until)
            return {"group_by": group, "data": data, "price_version": ledger.prices.version}

        return await _ledger_call(go)

    @app.get("/admin/requests")
    async def requests_() -> Any:
        from .ledger.query import requests_query

        async def go(ledger: Any) -> Any:
            return {"data": await ledger.requests(requests_query(request.args, time.time()))}

        return await _ledger_call(go)

    @app.get("/admin/requests/<request_id>")
    async def request_one(request_id: str) -> Any:
        async def go(ledger: Any) -> Any:
            row = await ledger.request(request_id)
            if row is None:
                return _json_error(404, "not_found_error", f"no request {request_id!r} in the ledger")
            return row

        return await _ledger_call(go)

    @app.get("/admin/dlq")
    async def dlq_list() -> Any:
        from .ledger.query import limit_of, parse_time

        async def go(ledger: Any) -> Any:
            return {"data": await ledger.dlq_list(limit_of(request.args), parse_time("since", request.args.get("since"), time.time()))}

        return await _ledger_call(go)

    @app.get("/admin/dlq/<entry_id>")
    async def dlq_show(entry_id: str) -> Any:
        async def go(ledger: Any) -> Any:
            entry = await ledger.dlq_get(entry_id)
            if entry is None:
                return _json_error(404, "not_found_error", f"no dead-letter entry {entry_id!r}")
            entry["body"] = entry["body"].decode("utf-8", "replace")
            entry["headers"] = [list(h) for h in entry["headers"]]
            return entry

        return await _ledger_call(go)

    @app.post("/admin/dlq/<entry_id>/replay")
    async def dlq_replay(entry_id: str) -> Any:
        """Send the entry again through the router as its tenant; answer once it finished."""

        async def go(ledger: Any) -> Any:
            entry = await ledger.dlq_get(entry_id)
            if entry is None:
                return _json_error(404, "not_found_error", f"no dead-letter entry {entry_id!r}")
            rid, status = await weir.replay(entry)
            await ledger.dlq_mark(entry_id, rid, status, int(time.time() * 1e6))
            return {"id": entry_id, "request_id": rid, "status": status}

        return await _ledger_call(go)

    from .dashboard import register_dashboard

    register_dashboard(app, weir)

    @app.after_request
    async def tag(response: Response) -> Response:
        response.headers["x-request-id"] = request_id({b"x-request-id": request.headers.get("x-request-id", "").encode()})
        return response

    @app.errorhandler(404)
    async def not_found(_: Any) -> Response:
        return _json_error(404, "not_found_error", f"Not found: {request.method} {request.path}")

    @app.errorhandler(405)
    async def not_allowed(_: Any) -> Response:
        return _json_error(405, "invalid_request_error", f"Method {request.method} not allowed for {request.path}")

    @app.errorhandler(Exception)
    async def crashed(exc: Exception) -> Response:
        app.logger.exception("admin handler failed", exc_info=exc)
        return _json_error(500, "api_error", "internal error")

    return app
