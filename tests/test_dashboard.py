"""/dashboard: login by form and cookie, server-rendered tables, live charts —
over HTTP, then in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import os
import re
import tempfile
from functools import partial

import httpx
import pytest
import trio

from proxy.dashboard import COOKIE, SESSION_S, make_session, session_valid
from tests.harness import body, weir_and_mock

ADMIN = "dash-admin-key"
AUTH = {"admin_key": ADMIN, "client_keys": [{"tenant": "team-a", "key": "ka"}, {"tenant": "team-b", "key": "kb"}]}
CHROMIUM = "/usr/bin/chromium"


def test_session_cookie_is_signed_and_expires() -> None:
    secret = b"s3cret"
    cookie = make_session(secret, 1000.0)
    assert session_valid(secret, cookie, 1001.0)
    assert not session_valid(secret, cookie, 1000.0 + SESSION_S + 1)  # expired
    assert not session_valid(b"other", cookie, 1001.0)  # the admin key changed
    expires, mac = cookie.split(".")
    assert not session_valid(secret, f"{int(expires) + 10**6}.{mac}", 1001.0)  # expiry pushed out
    for junk in ("", ".", "abc.def", "1.2.3", "9" * 40 + ".x", None):
        assert not session_valid(secret, junk, 1001.0)
    assert not session_valid(b"", cookie, 1001.0)  # no admin key, no dashboard


async def login(client: httpx.AsyncClient) -> None:
    r = await client.post("/dashboard/login", data={"key": ADMIN})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(COOKIE + "=") and ADMIN not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie


async def test_login_form_cookie_and_tables() -> None:
    async with weir_and_mock(auth=AUTH, cache={"mode": "all"}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            for key in ("ka", "ka", "kb"):
                assert (await client.post("/v1/messages", content=body(), headers={"x-api-key": key})).status_code == 200
            r = await client.get("/dashboard")
            assert r.status_code == 200
            assert re.search(r"<input[^>]*type=password", r.text) and "action='/dashboard/login'" in r.text
            assert "default-src 'none'" in r.headers["content-security-policy"]
            r = await client.post("/dashboard/login", data={"key": "ka"})
            assert r.status_code == 401 and "set-cookie" not in r.headers
            assert (await client.get("/dashboard/events")).status_code == 401
            await login(client)
            r = await client.get("/dashboard")
            assert r.status_code == 200 and "id=targets" in r.text
            assert "<td>primary</td>" in r.text and "<td>closed</td>" in r.text
            assert "<td>team-a</td><td>2</td>" in r.text and "<td>team-b</td><td>1</td>" in r.text
            assert "id=cache" in r.text and "id=purge" in r.text
            # The chart library and the page's script are Weir's own files.
            js = await client.get("/dashboard/static/uPlot.iife.min.js")
            assert js.status_code == 200 and "uPlot" in js.text and js.headers["content-type"].startswith("text/javascript")
            assert "MIT" in (await client.get("/dashboard/static/uPlot.LICENSE")).text
            assert (await client.get("/dashboard/static/..%2Fdashboard.py")).status_code == 404
            r = await client.post("/dashboard/logout")
            assert r.status_code == 303
            assert "type=password" in (await client.get("/dashboard")).text


async def test_events_stream_cumulative_totals() -> None:
    async with weir_and_mock(auth=AUTH) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            await login(client)
            assert (await client.post("/v1/messages", content=body(), headers={"x-api-key": "ka"})).status_code == 200
            import json

            async with client.stream("GET", "/dashboard/events") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        snap = json.loads(line[6:])
                        break
    assert snap["requests"] == 1 and snap["tenants"]["team-a"]["requests"] == 1
    assert snap["duration"][-1] == ["+Inf", 1]


async def test_purge_needs_the_cookie_and_this_origin() -> None:
    async with weir_and_mock(auth=AUTH, cache={"mode": "all"}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            assert (await client.post("/v1/messages", content=body(), headers={"x-api-key": "ka"})).status_code == 200
            assert (await client.post("/dashboard/cache/purge")).status_code == 401
            assert (await client.post("/dashboard/dlq/some-entry/replay")).status_code == 401
            assert (await client.get("/dashboard/requests/some-id")).status_code == 401
            await login(client)
            assert (await client.post("/dashboard/cache/purge", headers={"origin": "https://evil.example"})).status_code == 401
            assert (await weir.app.cache.stats())["l1"]["entries"] == 1
            r = await client.post("/dashboard/cache/purge", headers={"origin": weir.url})
            assert r.status_code == 303
            assert (await weir.app.cache.stats())["l1"]["entries"] == 0


async def test_no_admin_key_no_dashboard() -> None:
    async with weir_and_mock() as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            assert (await client.get("/dashboard")).status_code == 404
            assert (await client.post("/dashboard/login", data={"key": ""})).status_code == 404


# ------------------------------------------------------------------ browser


def _need_browser() -> None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("playwright is not installed, and CI=true forbids skipping")
        pytest.skip("playwright is not installed")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium), and CI=true forbids skipping")
        pytest.skip(f"{CHROMIUM} is missing")


def _wait_points(page: object, n: int, limit_ms: int = 20000) -> None:
    """Until the rps chart holds ``n`` points (polled: the page's CSP forbids evaluated strings)."""
    waited = 0
    while int(page.get_attribute("#chart-rps", "data-points") or 0) < n:  # type: ignore[attr-defined]
        assert waited < limit_ms, "the chart did not draw"
        page.wait_for_timeout(200)  # type: ignore[attr-defined]
        waited += 200


def _browse(url: str, shot: str, sent: list[str]) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    seen: dict[str, object] = {"external": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("request", lambda req: None if req.url.startswith(url) else seen["external"].append(req.url))  # type: ignore[union-attr]
            page.goto(url + "/dashboard")
            page.fill("input[type=password]", ADMIN)
            page.click("button[type=submit]")
            page.wait_for_selector("#chart-rps canvas")
            assert ADMIN not in page.url
            # Charts draw once two snapshots a second apart have arrived and traffic flows.
            _wait_points(page, 3)
            seen["cookie_visible_to_js"] = page.evaluate("document.cookie")
            # The ledger's recent requests show ids the client was given.
            for _ in range(50):
                page.reload()
                page.wait_for_selector("#tenants")
                if any(rid in page.inner_text("#requests") for rid in list(sent)):
                    break
                page.wait_for_timeout(200)
            seen["tenants"] = page.inner_text("#tenants")
            seen["requests"] = page.inner_text("#requests")
            _wait_points(page, 2)
            page.screenshot(path=shot, full_page=True)
            page.click("#purge")
            page.wait_for_selector("#cache")
            seen["cache_after_purge"] = page.inner_text("#cache")
            # The dead-letter entry of the failed request: replay it from its button.
            seen["dlq_before"] = page.inner_text("#dlq")
            page.click("#dlq button.replay")
            page.wait_for_selector("#dlq")
            seen["dlq_after"] = page.inner_text("#dlq")
            # Drill down into one request.
            page.click("#requests a")
            page.wait_for_selector("#request")
            seen["detail"] = page.inner_text("#request")
        finally:
            browser.close()
    return seen


async def test_dashboard_in_a_real_browser() -> None:
    _need_browser()
    shot = os.path.join(tempfile.mkdtemp(prefix="weir-dashboard-"), "dashboard.png")
    sent: list[str] = []
    ledger = {"server": {"data_dir": tempfile.mkdtemp(prefix="weir-dashboard-data-")}, "ledger": {"url": "", "flush_interval_ms": 20}, "retry": {"max_attempts": 1}}
    async with weir_and_mock(auth=AUTH, cache={"mode": "all"}, **ledger) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            failed = await client.post("/v1/messages", content=body(), headers={"x-api-key": "ka", "x-mock-fault": "status=503"})
            assert failed.status_code == 503
            async with trio.open_nursery() as nursery:

                async def traffic() -> None:
                    i = 0
                    while True:
                        key = "ka" if i % 3 else "kb"
                        r = await client.post("/v1/messages", content=body(messages=[{"role": "user", "content": f"hi {i % 5}"}]), headers={"x-api-key": key})
                        sent.append(r.headers["x-request-id"])
                        i += 1
                        await trio.sleep(0.05)

                nursery.start_soon(traffic)
                seen = await trio.to_thread.run_sync(partial(_browse, weir.url, shot, sent))
                nursery.cancel_scope.cancel()
    assert seen["external"] == [], "the page fetched nothing from elsewhere"
    assert COOKIE not in str(seen["cookie_visible_to_js"]), "the session cookie is HttpOnly"
    assert "team-a" in str(seen["tenants"]) and "team-b" in str(seen["tenants"])
    assert any(rid in str(seen["requests"]) for rid in sent), "request ids the clients got are in the table"
    assert failed.headers["x-request-id"] in str(seen["dlq_before"]) and "Replay" in str(seen["dlq_before"])
    assert "(200)" in str(seen["dlq_after"]), "the replayed entry shows its new request and status"
    assert "request_id" in str(seen["detail"])
    assert os.path.getsize(shot) > 10_000
    print("screenshot:", shot)


async def test_tokens_and_cost_reach_the_metrics_at_the_ledgers_prices() -> None:
    ledger = {"server": {"data_dir": tempfile.mkdtemp(prefix="weir-metrics-cost-")}, "ledger": {"url": "", "flush_interval_ms": 20}}
    async with weir_and_mock(auth=AUTH, metrics={"public": True}, **ledger) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            r = await client.post("/v1/messages", content=body(), headers={"x-api-key": "ka"})
            assert r.status_code == 200
            text = (await client.get("/metrics")).text
            micros, _ = weir.app.ledger.prices.cost("claude-sonnet-4-5", r.json()["usage"]["input_tokens"], r.json()["usage"]["output_tokens"])
    from tests.test_metrics import value

    assert value(text, "weir_tokens_total", tenant="team-a", type="output") == r.json()["usage"]["output_tokens"] > 0
    assert micros > 0 and abs(value(text, "weir_cost_usd_total", tenant="team-a") - micros / 1e6) < 1e-9
