"""Anthropic endpoints Weir does not read (files, skills, batches, whatever comes
next) are forwarded to an Anthropic-kind target; 404 only where the target kind
has no equivalent; the request target is checked before anything is forwarded."""

from __future__ import annotations

import httpx

from .harness import make_settings, running_mock, running_weir

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01", "anthropic-beta": "files-api-2025-04-14"}


async def test_unlisted_endpoints_reach_the_anthropic_target_as_sent() -> None:
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url)) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                r = await c.get("/v1/files", params={"limit": "2", "after_id": "file_01"})
                # The upstream's own answer (the mock has no files API), not Weir's 404.
                assert r.status_code == 404 and "no route for GET /v1/files" in r.json()["error"]["message"]
                upload = await c.post("/v1/files", files={"file": ("notes.txt", b"\x00\x01 raw bytes \xff", "text/plain")})
                assert upload.status_code == 404 and "no route for POST /v1/files" in upload.json()["error"]["message"]
                assert (await c.delete("/v1/skills/skill_01AbC")).status_code == 404
                assert (await c.get("/v1/files/file_011CNha8iCJcU1wXNR6q4V8w/content")).status_code == 404
    sent = list(mock.requests)
    assert [(r.method, r.path, r.query) for r in sent] == [
        ("GET", "/v1/files", "limit=2&after_id=file_01"),
        ("POST", "/v1/files", ""),
        ("DELETE", "/v1/skills/skill_01AbC", ""),
        ("GET", "/v1/files/file_011CNha8iCJcU1wXNR6q4V8w/content", ""),
    ]
    assert b"\x00\x01 raw bytes \xff" in sent[1].body  # multipart body byte for byte
    assert sent[1].header(b"content-type").startswith(b"multipart/form-data; boundary=")  # type: ignore[union-attr]
    assert sent[0].header(b"anthropic-beta") == b"files-api-2025-04-14"


async def test_they_skip_openai_targets_for_the_anthropic_one() -> None:
    async with running_mock() as (oai, oai_url), running_mock() as (anth, anth_url):
        settings = make_settings(
            None,
            upstreams=[{"name": "nim", "kind": "openai", "url": oai_url + "/v1", "model": "m"}, {"name": "anthropic", "url": anth_url}],
        )
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                await c.get("/v1/files")
                await c.post("/v1/messages/batches", json={"requests": []})
                # A generation still follows the default route: the first upstream.
                assert (await c.post("/v1/messages", json={"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})).status_code == 200
    assert [r.path for r in anth.requests] == ["/v1/files", "/v1/messages/batches"]
    assert [r.path for r in oai.requests] == ["/v1/chat/completions"]


async def test_with_only_openai_targets_they_get_a_404_naming_why() -> None:
    async with running_mock() as (oai, oai_url):
        settings = make_settings(None, upstreams=[{"name": "nim", "kind": "openai", "url": oai_url + "/v1", "model": "m"}])
        async with running_weir(settings) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                r = await c.get("/v1/skills")
    assert r.status_code == 404
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
    assert "no equivalent on an OpenAI-compatible upstream" in r.json()["error"]["message"]
    assert len(oai.requests) == 0


async def test_hostile_targets_are_refused_before_forwarding() -> None:
    async with running_mock() as (mock, url):
        async with running_weir(make_settings(url)) as weir:
            async with httpx.AsyncClient(base_url=weir.url, headers=KEY) as c:
                for raw in ("/v1/files/..%2F..%2Fadmin", "/v1/files/%2e%2e/x", "/v1/files//x", "/v1/skills/a%00b"):
                    r = await c.get(httpx.URL(weir.url + raw))
                    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", raw
                r = await c.request("OPTIONS", "/v1/files")
                assert r.status_code == 405 and "GET" in r.headers["allow"]
                # The OpenAI ingress keeps its own 404, in OpenAI's shape.
                r = await c.post("/v1/chat/nothing", json={})
                assert r.status_code == 404 and "error" in r.json() and "type" not in r.json()
    assert len(mock.requests) == 0
