"""``/dashboard``: what Weir is doing, for an operator with the admin key.

Server-rendered HTML: the tables are written here, on each page load, from
the same state the admin API reports; the live charts are uPlot (MIT,
vendored from npm into ``proxy/static/`` with its licence) fed by one SSE
stream of cumulative totals a second, from which the page draws rates and
quantiles. No CDN, no build step: Weir serves every byte the page loads.

Login takes the admin key in a password field (a POST, never a URL) and sets
a cookie that is HttpOnly and SameSite=Strict: scripts cannot read it and
other sites cannot send it, so the forms below need no CSRF token. The
cookie holds an expiry and its HMAC under the admin key, not the key: every
worker can check it without shared state, and changing the key logs
everyone out. A Content-Security-Policy allows only Weir's own scripts and
styles, so a hostile model or tenant name in a table stays text.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from urllib.parse import quote, urlsplit

import trio
from quart import Response, redirect, request

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .app import Weir

__all__ = ["register_dashboard", "summarize"]

COOKIE = "weir_dashboard"
# A working day: long enough not to interrupt an on-call shift, short enough
# that a forgotten browser does not stay logged in for good.
SESSION_S = 12 * 3600
# Rows in the recent-requests and dead-letter tables: a screenful.
RECENT = 20
# One snapshot a second: the charts' resolution; Prometheus covers the long view.
TICK_S = 1.0
_STATIC = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "cache-control": "no-store",
    "referrer-policy": "same-origin",  # "no-referrer" makes chromium send `Origin: null` on form posts
    "x-content-type-options": "nosniff",
}


# ---------------------------------------------------------------- session


def _sign(secret: bytes, expires: int) -> str:
    return hmac.new(secret, b"weir-dashboard:%d" % expires, hashlib.sha256).hexdigest()


def make_session(secret: bytes, now: float) -> str:
    expires = int(now) + SESSION_S
    return f"{expires}.{_sign(secret, expires)}"


def session_valid(secret: bytes, cookie: str | None, now: float) -> bool:
    if not secret or not cookie or "." not in cookie:
        return False
    raw_expires, _, mac = cookie.partition(".")
    if not raw_expires.isdigit() or len(raw_expires) > 12:
        return False
    expires = int(raw_expires)
    return now < expires and hmac.compare_digest(mac, _sign(secret, expires))


# ---------------------------------------------------------------- numbers


def summarize(families: list[Any]) -> dict[str, Any]:
    """Cumulative totals for the charts and tables, from the merged metric families."""
    out: dict[str, Any] = {
        "requests": 0.0,
        "errors": {},
        "cache": {},
        "tokens": 0.0,
        "cost_usd": 0.0,
        "duration": {},
        "ttft": {},
        "tenants": {},
        "attempts": {},
    }
    for fam in families:
        name = fam.name
        for s in fam.samples:
            lab = s.labels
            v = s.value
            if s.name == "weir_requests_total":
                out["requests"] += v
                code = lab.get("code", "")
                if code >= "400":
                    out["errors"][code] = out["errors"].get(code, 0) + v
                c = lab.get("cache", "none")
                out["cache"][c] = out["cache"].get(c, 0) + v
                t = out["tenants"].setdefault(lab.get("tenant", ""), {"requests": 0, "tokens": 0, "cost_usd": 0, "refused": 0})
                t["requests"] += v
                if code in ("429", "529"):
                    t["refused"] += v
            elif s.name == "weir_tokens_total":
                out["tokens"] += v
                t = out["tenants"].setdefault(lab.get("tenant", ""), {"requests": 0, "tokens": 0, "cost_usd": 0, "refused": 0})
                t["tokens"] += v
            elif s.name == "weir_cost_usd_total":
                out["cost_usd"] += v
                t = out["tenants"].setdefault(lab.get("tenant", ""), {"requests": 0, "tokens": 0, "cost_usd": 0, "refused": 0})
                t["cost_usd"] += v
            elif s.name == "weir_upstream_attempts_total":
                a = out["attempts"].setdefault(lab.get("target", ""), {})
                a[lab.get("outcome", "")] = a.get(lab.get("outcome", ""), 0) + v
            elif s.name.endswith("_bucket") and name in ("weir_request_duration_seconds", "weir_time_to_first_token_seconds"):
                key = "duration" if name == "weir_request_duration_seconds" else "ttft"
                le = lab.get("le", "+Inf")
                out[key][le] = out[key].get(le, 0) + v
    for key in ("duration", "ttft"):
        out[key] = sorted(([float(le), n] for le, n in out[key].items()), key=lambda p: p[0])
        for pair in out[key]:
            if pair[0] == float("inf"):
                pair[0] = "+Inf"
    return out


# ---------------------------------------------------------------- pages


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><link rel=icon href='data:,'><meta name=viewport content='width=device-width,initial-scale=1'>"
        "<link rel=stylesheet href='/dashboard/static/uPlot.min.css'><link rel=stylesheet href='/dashboard/static/dashboard.css'>"
        f"</head><body>{body}</body></html>"
    )


def _login_page(message: str = "") -> str:
    note = f"<p class=error role=alert>{_e(message)}</p>" if message else ""
    return _page(
        "Weir — log in",
        "<main class=login><h1>Weir</h1>"
        f"{note}<form method=post action='/dashboard/login'>"
        "<label for=key>Admin key</label>"
        "<input id=key name=key type=password autocomplete=current-password required autofocus>"
        "<button type=submit>Log in</button></form></main>",
    )


def _table(headers: list[str], rows: list[list[Any]], empty: str, table_id: str) -> str:
    if not rows:
        return f"<p class=empty id={table_id}>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if isinstance(c, _Raw) else f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """A cell already rendered as HTML (a form with a button)."""


CHARTS = [
    ("rps", "Requests per second"),
    ("latency", "Latency p50 / p99 (s)"),
    ("ttft", "Time to first token p50 / p99 (s)"),
    ("tokens", "Tokens per second"),
    ("cost", "Cost per hour (USD)"),
    ("ratios", "Cache hit / coalesced ratio"),
    ("errors", "Errors per second by status"),
]


async def _dashboard_page(weir: Weir) -> str:
    now = trio.current_time()
    families: list[Any] = []
    if weir.metrics is not None:
        weir.metrics.flush()
        families = await trio.to_thread.run_sync(weir.metrics.collect)
    summary = summarize(families)
    targets = []
    for lane in weir.router.lanes if weir.started else []:
        snap = lane.snapshot(now)
        keys = ", ".join(f"{k['id']}: {k['state']}" for k in snap["keys"]) or "client keys"
        sched = snap["scheduler"]
        attempts = summary["attempts"].get(lane.name, {})
        targets.append([lane.name, lane.target.kind, snap["breaker"]["state"], keys, sched.get("depth", 0), f"{sched.get('in_flight', 0)} / {snap['max_connections']}", ", ".join(f"{k} {int(v)}" for k, v in sorted(attempts.items())) or "–"])
    tenants = []
    limited = dict(weir.limited)
    for name, t in sorted(summary["tenants"].items()):
        tenants.append([name, int(t["requests"]), int(t["tokens"]), f"{t['cost_usd']:.4f}", int(t["refused"])])
    for name, n in sorted(limited.items()):
        if name not in summary["tenants"]:
            tenants.append([name, 0, 0, "0.0000", n])
    cache_rows: list[list[Any]] = []
    if weir.cache is not None:
        stats = await weir.cache.stats()
        l1, l2 = stats.get("l1", {}), stats.get("l2", {})
        cache_rows.append(["l1 (this worker)", l1.get("entries", 0), l1.get("bytes", 0), l1.get("hits", 0), l1.get("misses", 0)])
        if stats.get("l2_backend", "none") != "none":
            cache_rows.append([f"l2 ({stats['l2_backend']})", l2.get("entries", "–"), l2.get("bytes", "–"), l2.get("hits", 0), l2.get("misses", 0)])
    ledger_html = await _ledger_tables(weir)
    charts = "".join(f"<figure class=chart><figcaption>{_e(title)}</figcaption><div id=chart-{cid} class=plot></div></figure>" for cid, title in CHARTS)
    purge = "<form method=post action='/dashboard/cache/purge'><button type=submit id=purge>Purge the cache</button></form>" if weir.cache is not None else ""
    body = (
        "<header><h1>Weir</h1><span id=status>connecting…</span>"
        "<form method=post action='/dashboard/logout'><button type=submit>Log out</button></form></header>"
        f"<section class=charts>{charts}</section>"
        "<section><h2>Targets</h2>"
        + _table(["target", "kind", "breaker", "keys", "queued", "in flight", "attempts"], targets, "no targets", "targets")
        + "</section><section><h2>Tenants</h2>"
        + _table(["tenant", "requests", "tokens", "cost (USD)", "refused"], tenants, "no requests yet", "tenants")
        + "</section><section><h2>Cache</h2>"
        + _table(["level", "entries", "bytes", "hits", "misses"], cache_rows, "the cache is off", "cache")
        + purge
        + "</section>"
        + ledger_html
        + "<script src='/dashboard/static/uPlot.iife.min.js'></script><script src='/dashboard/static/dashboard.js'></script>"
    )
    return _page("Weir dashboard", body)


def _when(us: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.gmtime(int(us) / 1e6))
    except (TypeError, ValueError, OverflowError):
        return ""


def _request_link(rid: Any) -> _Raw:
    rid = str(rid)
    return _Raw(f"<td><a href='/dashboard/requests/{quote(rid, safe='')}'>{_e(rid)}</a></td>")


async def _ledger_tables(weir: Weir) -> str:
    """Recent requests and the dead-letter queue, from the ledger (the admin API's own queries)."""
    ledger = weir.ledger
    if ledger is None:
        return "<section><h2>Recent requests</h2><p class=empty id=requests>The ledger is off.</p></section>"
    from .ledger.store import LedgerUnavailable
    from .ledger.query import requests_query

    try:
        recent = await ledger.requests(requests_query({"limit": str(RECENT)}, time.time()))
        dead = await ledger.dlq_list(RECENT, None)
    except LedgerUnavailable as exc:
        return f"<section><h2>Recent requests</h2><p class=error id=requests>The ledger database is unavailable: {_e(exc)}</p></section>"
    rows = [
        [_request_link(r.get("request_id")), _when(r.get("started_at")), r.get("tenant", ""), r.get("model", ""), r.get("target", ""), r.get("status", ""), r.get("outcome", ""), r.get("cache", ""),
         f"{r.get('input_tokens', 0)} / {r.get('output_tokens', 0)}", f"{int(r.get('cost_micros', 0) or 0) / 1e6:.6f}", f"{int(r.get('total_us', 0) or 0) / 1000:.1f}"]
        for r in recent
    ]
    dlq_rows = []
    for d in dead:
        entry = quote(str(d.get("id", "")), safe="")
        replayed = d.get("replayed_request_id") or ""
        button = _Raw(f"<td><form method=post action='/dashboard/dlq/{entry}/replay'><button type=submit class=replay>Replay</button></form></td>")
        dlq_rows.append([d.get("id", ""), _request_link(d.get("request_id")), _when(d.get("started_at")), d.get("tenant", ""), d.get("model", ""), d.get("status", ""), d.get("error_type", ""),
                         f"{replayed} ({d.get('replayed_status')})" if replayed else "–", button])
    return (
        "<section><h2>Recent requests</h2>"
        + _table(["request id", "started (UTC)", "tenant", "model", "target", "status", "outcome", "cache", "tokens in / out", "cost (USD)", "ms"], rows, "no requests recorded yet", "requests")
        + "</section><section><h2>Dead-letter queue</h2>"
        + _table(["entry", "request id", "started (UTC)", "tenant", "model", "status", "error", "replayed as", ""], dlq_rows, "empty", "dlq")
        + "</section>"
    )


# ---------------------------------------------------------------- routes


def register_dashboard(app: QuartTrio, weir: Weir) -> None:
    static = {name: resources.files("proxy").joinpath("static", name).read_bytes() for name in _STATIC}

    def secret() -> bytes:
        return weir.auth.admin_secret

    def logged_in() -> bool:
        return session_valid(secret(), request.cookies.get(COOKIE), time.time())

    def page(body: str, status: int = 200) -> Response:
        return Response(body, status=status, content_type="text/html; charset=utf-8", headers=_HEADERS)

    def same_origin() -> bool:
        """Belt and braces beside SameSite=Strict: a form posted from elsewhere is refused."""
        origin = request.headers.get("origin")
        # The host only: behind a TLS-terminating proxy the scheme differs.
        return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")

    @app.get("/dashboard")
    async def dashboard() -> Any:
        if not weir.auth.admin_enabled:
            return page(_page("Weir", "<p>The dashboard needs an admin key: set auth.admin_key.</p>"), 404)
        if not logged_in():
            return page(_login_page())
        return page(await _dashboard_page(weir))

    @app.post("/dashboard/login")
    async def login() -> Any:
        if not weir.auth.admin_enabled:
            return page(_page("Weir", "<p>The dashboard needs an admin key: set auth.admin_key.</p>"), 404)
        if not same_origin():
            return page(_login_page("refused: the form came from another site"), 403)
        form = await request.form
        key = form.get("key", "")
        if not weir.auth.is_admin({b"x-api-key": key.encode()}):
            return page(_login_page("That is not the admin key."), 401)
        resp = redirect("/dashboard", 303)
        resp.set_cookie(COOKIE, make_session(secret(), time.time()), max_age=SESSION_S, path="/dashboard", httponly=True, samesite="Strict", secure=request.scheme == "https")
        return resp

    @app.post("/dashboard/logout")
    async def logout() -> Any:
        resp = redirect("/dashboard", 303)
        resp.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="Strict")
        return resp

    @app.post("/dashboard/cache/purge")
    async def purge() -> Any:
        if not logged_in() or not same_origin():
            return page(_login_page("Log in first."), 401)
        from cache import L2Unavailable

        if weir.cache is not None:
            try:
                await weir.cache.purge(None)
            except L2Unavailable as exc:
                return page(_page("Weir", f"<p class=error>The shared cache (L2) could not be purged: {_e(exc)}</p><a href='/dashboard'>back</a>"), 503)
        return redirect("/dashboard", 303)

    @app.get("/dashboard/events")
    async def events() -> Any:
        """Cumulative totals once a second, as SSE; ends when Weir drains."""
        if not logged_in():
            return page(_login_page("Log in first."), 401)
        metrics = weir.metrics

        async def stream() -> Any:
            while not weir.draining:
                families: list[Any] = []
                if metrics is not None:
                    metrics.flush()
                    families = await trio.to_thread.run_sync(metrics.collect)
                snap = summarize(families)
                snap["t"] = time.time()
                snap["inflight"] = weir.in_flight
                yield b"data: " + json.dumps(snap, separators=(",", ":")).encode() + b"\n\n"
                await trio.sleep(TICK_S)

        return Response(stream(), content_type="text/event-stream", headers={**_HEADERS, "x-accel-buffering": "no"})

    @app.get("/dashboard/requests/<request_id>")
    async def request_detail(request_id: str) -> Any:
        """One ledger row, every column: the drill-down from the recent-requests table."""
        if not logged_in():
            return page(_login_page("Log in first."), 401)
        if weir.ledger is None:
            return page(_page("Weir", "<p>The ledger is off.</p><a href='/dashboard'>back</a>"), 404)
        from .ledger.store import LedgerUnavailable

        try:
            row = await weir.ledger.request(request_id)
        except LedgerUnavailable as exc:
            return page(_page("Weir", f"<p class=error>The ledger database is unavailable: {_e(exc)}</p>"), 503)
        if row is None:
            return page(_page("Weir", f"<p>No request {_e(request_id)} in the ledger.</p><a href='/dashboard'>back</a>"), 404)
        cells = [[k, v] for k, v in row.items()]
        return page(_page(f"Weir — {request_id}", f"<header><h1>Request {_e(request_id)}</h1><a href='/dashboard'>back</a></header>" + _table(["field", "value"], cells, "", "request")))

    @app.post("/dashboard/dlq/<entry_id>/replay")
    async def replay(entry_id: str) -> Any:
        """What ``POST /admin/dlq/{id}/replay`` does, for the button: send it again as its tenant."""
        if not logged_in() or not same_origin():
            return page(_login_page("Log in first."), 401)
        if weir.ledger is None:
            return page(_page("Weir", "<p>The ledger is off.</p>"), 404)
        from .ledger.store import LedgerUnavailable

        try:
            entry = await weir.ledger.dlq_get(entry_id)
            if entry is None:
                return page(_page("Weir", f"<p>No dead-letter entry {_e(entry_id)}.</p><a href='/dashboard'>back</a>"), 404)
            rid, status = await weir.replay(entry)
            await weir.ledger.dlq_mark(entry_id, rid, status, int(time.time() * 1e6))
        except LedgerUnavailable as exc:
            return page(_page("Weir", f"<p class=error>The ledger database is unavailable: {_e(exc)}</p>"), 503)
        return redirect("/dashboard", 303)

    @app.get("/dashboard/static/<name>")
    async def static_file(name: str) -> Any:
        body = static.get(name)
        if body is None:
            return Response("not found", status=404, content_type="text/plain")
        return Response(body, content_type=_STATIC[name], headers={"cache-control": "public, max-age=86400", "x-content-type-options": "nosniff"})
