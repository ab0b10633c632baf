"""The ledger end to end: real server, real clients, the mock upstream as a real
HTTP server, rows read back through the admin API."""

from __future__ import annotations

import httpx
import trio

from tests.harness import body, weir_and_mock

ADMIN = {"x-api-key": "adm"}
AUTH = {"admin_key": "adm", "client_keys": [{"tenant": "team-a", "key": "k-a"}, {"tenant": "team-b", "key": "k-b"}]}


def ledger_sections(tmp_path, **ledger):
    return dict(
        server={"data_dir": str(tmp_path)},
        auth=AUTH,
        ledger={"url": "", "flush_interval_ms": 20, **ledger},
        retry={"max_attempts": 1},
    )


async def rows_for(client: httpx.AsyncClient, ids: list[str], timeout: float = 10.0) -> dict[str, dict]:
    """Poll the admin API until every id has its row (the writer flushes every 20 ms)."""
    with trio.fail_after(timeout):
        while True:
            got = {}
            for rid in ids:
                r = await client.get(f"/admin/requests/{rid}", headers=ADMIN)
                if r.status_code == 200:
                    got[rid] = r.json()
            if len(got) == len(ids):
                return got
            await trio.sleep(0.02)


async def test_every_outcome_gets_a_row(tmp_path):
    sections = ledger_sections(tmp_path)
    sections["claude_code"] = {"answer_locally": ["title"]}
    async with weir_and_mock(ratelimit={"tenants": {"team-b": {"requests_per_minute": 1}}}, **sections) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            ids = {}

            async def send(name, key="k-a", **kw):
                h = {"x-api-key": key, "x-weir-project": "proj-1", "user-agent": "claude-cli/2.0.8 (external, cli)", **kw.pop("headers", {})}
                r = await c.post(kw.pop("path", "/v1/messages"), content=kw.pop("content", None) or body(**kw), headers=h)
                ids[name] = r.headers["x-request-id"]
                return r

            assert (await send("served")).status_code == 200
            assert (await send("streamed", stream=True)).status_code == 200
            assert (await send("miss", temperature=0, messages=[{"role": "user", "content": "cache me"}])).status_code == 200
            hit = await send("hit", temperature=0, messages=[{"role": "user", "content": "cache me"}])
            assert hit.headers["x-weir-cache"] == "hit"
            assert (await send("bad", content=b"{not json")).status_code == 400
            assert (await send("failed", headers={"x-mock-fault": "status=500"})).status_code == 500
            assert (await send("limited1", key="k-b")).status_code == 200
            assert (await send("limited", key="k-b")).status_code == 429
            title = await send("local", system="Analyze if this message indicates a new conversation topic.")
            assert title.headers["x-weir-target"] == "local"
            assert (await send("openai", path="/v1/chat/completions", content=b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}')).status_code == 200

            rows = await rows_for(c, list(ids.values()))
            by = {name: rows[rid] for name, rid in ids.items()}
            assert by["served"]["outcome"] == "served" and by["served"]["status"] == 200
            served = by["served"]
            assert served["tenant"] == "team-a" and served["project"] == "proj-1" and served["client"] == "claude-cli"
            assert served["ingress"] == "anthropic" and served["target"] == "primary" and served["attempts"] == 1
            assert served["input_tokens"] > 0 and served["output_tokens"] > 0
            assert served["cost_micros"] > 0 and served["price_version"]  # claude-sonnet-4-5 is priced
            assert served["bytes_in"] > 0 and served["bytes_out"] > 0 and served["total_us"] >= served["overhead_us"] > 0
            assert served["ended_at"] > served["started_at"]
            assert by["streamed"]["stream"] is True and by["streamed"]["output_tokens"] > 0 and by["streamed"]["first_token_us"] > 0
            assert by["miss"]["cache"] == "miss" and by["miss"]["outcome"] == "served"
            assert by["hit"]["outcome"] == "cache_hit" and by["hit"]["cost_micros"] == 0
            assert by["bad"]["outcome"] == "rejected" and by["bad"]["status"] == 400
            assert by["failed"]["outcome"] == "failed" and by["failed"]["status"] == 500
            assert by["limited"]["outcome"] == "rate_limited" and by["limited"]["tenant"] == "team-b"
            assert by["openai"]["ingress"] == "openai"
            assert by["local"]["outcome"] == "answered_locally" and by["local"]["kind"] == "title" and by["local"]["cost_micros"] == 0
            assert served["kind"] == "main"
            # Never a credential, anywhere in a row.
            for r in rows.values():
                assert "k-a" not in str(r) and "k-b" not in str(r)

            usage = (await c.get("/admin/usage?group_by=tenant&since=1h", headers=ADMIN)).json()["data"]
            a = next(u for u in usage if u["tenant"] == "team-a")
            assert a["requests"] == 8 and a["cost_usd"] > 0
            assert a["input_tokens"] == sum(by[n]["input_tokens"] for n in ("served", "streamed", "miss", "openai"))
            r = await c.get("/admin/requests?tenant=team-b&limit=5", headers=ADMIN)
            assert {x["outcome"] for x in r.json()["data"]} == {"served", "rate_limited"}
            assert (await c.get("/admin/usage?group_by=colour", headers=ADMIN)).status_code == 400
            assert (await c.get("/admin/requests?since=yesterday-ish", headers=ADMIN)).status_code == 400
            assert (await c.get("/admin/requests/nope", headers=ADMIN)).status_code == 404
            info = (await c.get("/admin/ledger", headers=ADMIN)).json()
            assert info["size"]["bytes"] > 0 and info["writer"]["dropped"] == 0


async def test_a_failed_request_is_dead_lettered_and_replayed_as_its_tenant(tmp_path):
    async with weir_and_mock(**ledger_sections(tmp_path)) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            r = await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-a", "x-mock-fault": "status=503", "anthropic-version": "2023-06-01"})
            assert r.status_code == 503
            rid = r.headers["x-request-id"]
            with trio.fail_after(10):
                while not (entries := (await c.get("/admin/dlq", headers=ADMIN)).json()["data"]):
                    await trio.sleep(0.02)
            (entry,) = entries
            assert entry["request_id"] == rid and entry["status"] == 503 and entry["tenant"] == "team-a"
            shown = (await c.get(f"/admin/dlq/{entry['id']}", headers=ADMIN)).json()
            assert shown["body"] == body().decode() and ["anthropic-version", "2023-06-01"] in shown["headers"]
            assert not any(h[0] in ("x-api-key", "authorization") for h in shown["headers"])

            seen_before = len(mock.requests)
            replay = await c.post(f"/admin/dlq/{entry['id']}/replay", headers=ADMIN)
            assert replay.status_code == 200, replay.text
            out = replay.json()
            # The fault header was the client's, not part of the request: the replay succeeds.
            assert out["status"] == 200 and out["request_id"] != rid
            assert len(mock.requests) == seen_before + 1
            assert mock.requests[-1].body == body()
            new = (await rows_for(c, [out["request_id"]]))[out["request_id"]]
            assert new["replay_of"] == entry["id"] and new["tenant"] == "team-a" and new["outcome"] == "served"
            again = (await c.get("/admin/dlq", headers=ADMIN)).json()["data"][0]
            assert again["replayed_request_id"] == out["request_id"] and again["replayed_status"] == 200
            assert (await c.post("/admin/dlq/dlq_nope/replay", headers=ADMIN)).status_code == 404


async def test_bodies_are_kept_only_when_asked(tmp_path):
    async with weir_and_mock(**ledger_sections(tmp_path, bodies="errors")) as (weir, mock):
        async with httpx.AsyncClient(base_url=weir.url) as c:
            ok = await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-a"})
            bad = await c.post("/v1/messages", content=b'{"model": 1}', headers={"x-api-key": "k-a"})
            rows = await rows_for(c, [ok.headers["x-request-id"], bad.headers["x-request-id"]])
            assert "bodies" not in rows[ok.headers["x-request-id"]]
            kept = rows[bad.headers["x-request-id"]]["bodies"]
            assert kept["request"] == '{"model": 1}' and '"invalid_request_error"' in kept["response"]


async def test_ledger_off_answers_503_on_its_endpoints(tmp_path):
    async with weir_and_mock(server={"data_dir": str(tmp_path)}, auth=AUTH) as (weir, mock):
        assert weir.app.ledger is None
        async with httpx.AsyncClient(base_url=weir.url) as c:
            assert (await c.post("/v1/messages", content=body(), headers={"x-api-key": "k-a"})).status_code == 200
            r = await c.get("/admin/usage", headers=ADMIN)
            assert r.status_code == 503 and "off" in r.json()["error"]["message"]
    assert not (tmp_path / "ledger.db").exists()
