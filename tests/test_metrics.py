"""Prometheus metrics: the module on its own, then /metrics on a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import OTHER, PASSTHROUGH, Metrics
from tests.harness import body, weir_and_mock
from tests.test_settings_cli import ROOT, _free_port, _wait_ready

ADMIN = "admin-secret"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for (n, lab), v in samples(text).items():
        d = dict(lab)
        if n == name and all(d.get(k) == val for k, val in labels.items()):
            total += v
    return total


def scrape(m: Metrics) -> str:
    m.flush()
    return m.render().decode()


def one(m: Metrics, **kw: object) -> None:
    args: dict[str, object] = dict(route="/v1/messages", tenant="team-a", model="claude-x", target="primary", code=200, cache="miss", kind="messages", stream=False, duration_s=0.2, overhead_s=0.0004)
    args.update(kw)
    m.request(**args)  # type: ignore[arg-type]


def test_request_counts_and_histograms() -> None:
    m = Metrics(tenants=["team-a"], targets=["primary"])
    one(m, ttft_s=0.05, input_tokens=10, output_tokens=20, cache_read_tokens=3, cost_usd=0.25)
    one(m, stream=True, duration_s=1.5)
    text = scrape(m)
    assert value(text, "weir_requests_total", tenant="team-a", model="claude-x", target="primary", code="200", cache="miss", kind="messages") == 2
    assert value(text, "weir_tokens_total", type="input") == 10
    assert value(text, "weir_tokens_total", type="output") == 20
    assert value(text, "weir_tokens_total", type="cache_read") == 3
    assert value(text, "weir_cost_usd_total", tenant="team-a") == 0.25
    assert value(text, "weir_request_duration_seconds_count", stream="true") == 1
    assert value(text, "weir_request_duration_seconds_bucket", stream="true", le="2.56") == 1
    assert value(text, "weir_request_duration_seconds_bucket", stream="true", le="1.28") == 0
    assert value(text, "weir_time_to_first_token_seconds_count", target="primary", model="claude-x") == 1
    assert value(text, "weir_overhead_seconds_count") == 2
    assert value(text, "weir_worker_restarts_total") == 0


def test_ttft_buckets_are_the_genai_conventions() -> None:
    m = Metrics(tenants=[], targets=["t"])
    one(m, target="t", ttft_s=0.03)
    les = [dict(lab)["le"] for (n, lab) in samples(scrape(m)) if n == "weir_time_to_first_token_seconds_bucket"]
    assert les == ["0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "+Inf"]


def test_label_values_are_bounded() -> None:
    m = Metrics(tenants=["team-a"], targets=["primary"], max_models=2)
    one(m, tenant="key:abcdef", model="m1")  # passthrough tenant
    one(m, model="junk-1", code=400)  # a model no upstream accepted
    one(m, model="m2")
    one(m, model="m3")  # past max_models
    one(m, target="primary:override-model", route="/v1/models/some-id")
    one(m, target="nobody", route="/v1/nowhere")
    text = scrape(m)
    tenants = {dict(lab).get("tenant") for (n, lab) in samples(text) if n == "weir_requests_total"}
    models = {dict(lab).get("model") for (n, lab) in samples(text) if n == "weir_requests_total"}
    targets = {dict(lab).get("target") for (n, lab) in samples(text) if n == "weir_requests_total"}
    routes = {dict(lab).get("route") for (n, lab) in samples(text) if n == "weir_requests_total"}
    assert tenants == {"team-a", PASSTHROUGH}
    assert models == {"m1", "m2", OTHER}  # junk-1 was refused, m3 and claude-x came past the cap
    assert targets == {"primary", OTHER}
    assert routes == {"/v1/messages", "/v1/models/{id}", OTHER}


def test_label_children_are_looked_up_once() -> None:
    m = Metrics(tenants=["team-a"], targets=["primary"])
    calls = []
    real = m.requests.labels
    m.requests.labels = lambda *a, **k: calls.append(a) or real(*a, **k)  # type: ignore[method-assign]
    for _ in range(3):
        for _ in range(100):
            one(m)
        assert value(scrape(m), "weir_requests_total") in (100, 200, 300)
    assert len(calls) == 1
    assert value(scrape(m), "weir_requests_total") == 300  # nothing pending, nothing counted twice


def test_gauges() -> None:
    m = Metrics(tenants=[], targets=["a", "b"])
    m.set_gauges(inflight=3, breakers=[("a", "closed"), ("b", "open")], keys=[("a", "k1", True), ("a", "k2", False)], cache_bytes=[("l1", 1234)], ledger_queue=5, ledger_spooled=0)
    text = scrape(m)
    assert value(text, "weir_inflight_requests") == 3
    assert value(text, "weir_breaker_state", target="b") == 2
    assert value(text, "weir_breaker_state", target="a") == 0
    assert value(text, "weir_key_available", key_id="k2") == 0
    assert value(text, "weir_key_available", key_id="k1") == 1
    assert value(text, "weir_cache_bytes", level="l1") == 1234
    assert value(text, "weir_ledger_queue_depth") == 5


# ------------------------------------------------------------ end to end


async def test_metrics_endpoint_counts_real_requests() -> None:
    auth = {"admin_key": ADMIN, "client_keys": [{"tenant": "team-a", "key": "ka"}]}
    async with weir_and_mock(auth=auth, cache={"mode": "all"}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            for _ in range(2):
                r = await client.post("/v1/messages", content=body(), headers={"x-api-key": "ka"})
                assert r.status_code == 200
            r = await client.post("/v1/messages", content=body(stream=True, max_tokens=7), headers={"x-api-key": "ka"})
            assert r.status_code == 200
            r = await client.post("/v1/messages", content=b"{", headers={"x-api-key": "ka"})
            assert r.status_code == 400
            r = await client.get("/metrics")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await client.get("/metrics", headers={"x-api-key": "ka"})
            assert r.status_code == 401
            r = await client.get("/metrics", headers={"x-api-key": ADMIN})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert value(text, "weir_requests_total", tenant="team-a", code="200", cache="miss", target="primary") == 2
    assert value(text, "weir_requests_total", tenant="team-a", code="200", cache="hit") == 1
    assert value(text, "weir_requests_total", code="400") == 1
    assert value(text, "weir_upstream_attempts_total", target="primary", outcome="ok") == 2
    assert value(text, "weir_queue_wait_seconds_count", target="primary", priority="interactive") == 2
    assert value(text, "weir_time_to_first_token_seconds_count", target="primary") >= 2
    assert value(text, "weir_breaker_state", target="primary") == 0
    assert value(text, "weir_inflight_requests") == 0


async def test_metrics_public_needs_no_key_and_disabled_is_404() -> None:
    async with weir_and_mock(metrics={"public": True}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            r = await client.get("/metrics")
            assert r.status_code == 200 and "weir_requests_total" in r.text
    async with weir_and_mock(metrics={"enabled": False}, auth={"admin_key": ADMIN}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            r = await client.get("/metrics", headers={"x-api-key": ADMIN})
            assert r.status_code == 404 and r.json()["type"] == "error"


async def test_upstream_failures_and_shed_are_counted() -> None:
    async with weir_and_mock(auth={"admin_key": ADMIN}, retry={"max_attempts": 1}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            r = await client.post("/v1/messages", content=body(), headers={"x-mock-fault": "status=500", "x-api-key": "client-key"})
            assert r.status_code == 500
            r = await client.get("/metrics", headers={"x-api-key": ADMIN})
    assert value(r.text, "weir_upstream_attempts_total", target="primary", outcome="5xx") >= 1
    assert value(r.text, "weir_requests_total", code="500", tenant=PASSTHROUGH) == 1


@pytest.mark.parametrize("limit", [1])
async def test_ratelimit_rejections_are_counted(limit: int) -> None:
    auth = {"admin_key": ADMIN, "client_keys": [{"tenant": "team-a", "key": "ka"}]}
    async with weir_and_mock(auth=auth, ratelimit={"requests_per_minute": limit}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            codes = [(await client.post("/v1/messages", content=body(), headers={"x-api-key": "ka"})).status_code for _ in range(3)]
            assert codes == [200, 429, 429]
            r = await client.get("/metrics", headers={"x-api-key": ADMIN})
    assert value(r.text, "weir_ratelimit_rejections_total", tenant="team-a", kind="requests") == 2


def test_two_workers_are_summed_and_their_files_managed(tmp_path: Path) -> None:
    """``weir serve --workers 2``: one scrape, on either worker, counts both;
    the directory starts empty; an exited worker's live gauges are dropped."""
    port = _free_port()
    metrics_dir = tmp_path / "data" / "metrics"
    metrics_dir.mkdir(parents=True)
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_CACHE__L2": "none", "WEIR_METRICS__PUBLIC": "true"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "2", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, limit=60)  # two processes' start-up, on a busy CI machine
        assert not (metrics_dir / "counter_999999.db").exists()
        workers: set[str] = set()
        sent = 0
        deadline = time.monotonic() + 15
        while (len(workers) < 2 or sent < 10) and time.monotonic() < deadline:
            with httpx.Client(base_url=url) as client:  # a new connection: the kernel picks a worker
                r = client.post("/v1/messages", content=body(), headers={"x-api-key": "k"}, timeout=10)
            assert r.status_code == 200
            workers.add(r.headers["x-request-id"][: len("req_weir_") + 12])
            sent += 1
        assert len(workers) == 2
        # Each worker hands its counts to the shared files on its refresh beat
        # (metrics.refresh_s, 1 s) and before answering a scrape.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with httpx.Client(base_url=url) as client:
                if value(client.get("/metrics", timeout=10).text, "weir_requests_total") == sent:
                    break
            time.sleep(0.2)
        for _ in range(4):  # whichever worker answers the scrape
            with httpx.Client(base_url=url) as client:
                text = client.get("/metrics", timeout=10).text
            assert value(text, "weir_requests_total", code="200") == sent
            assert value(text, "weir_upstream_attempts_total", outcome="ok") == sent
            assert value(text, "weir_worker_restarts_total") == 0
        assert list(metrics_dir.glob("gauge_livesum_*.db"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not list(metrics_dir.glob("gauge_livesum_*.db")), "exited workers' live gauges were dropped"
        assert list(metrics_dir.glob("counter_*.db")), "their counters stay"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_grafana_dashboard_queries_metrics_that_exist() -> None:
    import json
    import re

    dash = json.loads((ROOT / "docs" / "grafana" / "weir-dashboard.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bweir_[a-z_]+", target["expr"]))
    m = Metrics(tenants=[], targets=["t"])
    one(m, target="t", ttft_s=0.1, input_tokens=1, cost_usd=0.1)
    m.attempt("t", "ok")
    m.shed_one("t", "queue_full")
    m.ratelimit_rejection("x", "requests")
    m.waited("t", "interactive", 0.1)
    m.batch_item("succeeded")
    m.batch_retry("429")
    m.set_gauges(inflight=0, breakers=[("t", "closed")], keys=[("t", "k", True)], cache_bytes=[("l1", 1)], ledger_queue=0, ledger_spooled=0, batch_running=0)
    exposed = {name for name, _ in samples(scrape(m))}
    assert used and used <= exposed, used - exposed


async def test_overhead_is_weirs_time_before_the_head_not_the_stream() -> None:
    async with weir_and_mock(metrics={"public": True}) as (weir, _mock):
        async with httpx.AsyncClient(base_url=weir.url) as client:
            r = await client.post("/v1/messages", content=body(stream=True), headers={"x-api-key": "k", "x-mock-fault": "slow=40"})
            assert r.status_code == 200
            text = (await client.get("/metrics")).text
    duration = value(text, "weir_request_duration_seconds_sum")
    assert duration > 0.3  # the stream took its time…
    assert value(text, "weir_overhead_seconds_sum") < duration / 3  # …which is not Weir's
    assert 0 < value(text, "weir_time_to_first_token_seconds_sum") < duration
