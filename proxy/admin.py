"""Everything off the hot path: health, readiness, the admin API.

A Quart-Trio app, because here routing, JSON helpers and error handlers are
worth more than the ~30% per-request cost ARCHITECTURE.md measured. Errors
keep Anthropic's shape so a client that wandered here still parses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio

from .errors import error_body
from .headers import request_id

if TYPE_CHECKING:
    from .app import Weir

__all__ = ["build_admin"]


def _json_error(status: int, type_: str, message: str) -> Response:
    return Response(error_body(type_, message), status=status, content_type="application/json")


def build_admin(weir: Weir) -> QuartTrio:
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

    @app.before_request
    async def admin_auth() -> Any:
        if not request.path.startswith("/admin/"):
            return None
        if not weir.auth.admin_enabled:
            return _json_error(404, "not_found_error", "the admin API is disabled: set auth.admin_key")
        if not weir.auth.is_admin({k.lower().encode(): v.encode() for k, v in request.headers.items()}):
            return _json_error(401, "authentication_error", "admin key required")
        return None

    @app.get("/admin/stats")
    async def stats() -> Any:
        return {
            "in_flight": weir.in_flight,
            "served": weir.served,
            "draining": weir.draining,
            "targets": [
                {"name": t.name, "kind": t.kind, "url": t.url, "in_flight": t.in_flight, "max_connections": t.settings.max_connections}
                for t in weir.targets
            ],
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
