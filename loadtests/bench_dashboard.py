"""The dashboard in Debian's chromium: first paint and every byte it loads.

Starts Weir (with its built-in test mock) in-process, logs in through the
form, and reads the browser's own paint timing and the size of each response.
Run: ``.venv/bin/python -m loadtests.bench_dashboard``.
"""

from __future__ import annotations

from functools import partial

import trio

from tests.harness import weir_and_mock

ADMIN = "bench-admin"


def browse(url: str) -> None:
    from playwright.sync_api import sync_playwright

    sizes: dict[str, int] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        # The page's CSP forbids evaluated scripts; the timing probe below is one.
        page = browser.new_page(bypass_csp=True)
        page.goto(url + "/dashboard")
        page.fill("input[type=password]", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_selector("#chart-rps canvas")
        page.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if not r.url.endswith("/events") else None)
        page.reload()  # a logged-in first load, cache disabled by reload semantics for the document
        page.wait_for_selector("#chart-rps canvas")
        page.wait_for_timeout(500)
        fcp = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
        dcl = page.evaluate("performance.timing.domContentLoadedEventEnd - performance.timing.navigationStart")
        browser.close()
    total = sum(sizes.values())
    for u, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{n / 1024:8.1f} KiB  {u.replace(url, '')}")
    print(f"total {total / 1024:.1f} KiB in {len(sizes)} responses; first contentful paint {fcp:.0f} ms; DOMContentLoaded {dcl} ms")


async def main() -> None:
    async with weir_and_mock(auth={"admin_key": ADMIN}) as (weir, _mock):
        await trio.to_thread.run_sync(partial(browse, weir.url))


if __name__ == "__main__":
    trio.run(main)
