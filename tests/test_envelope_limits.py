"""Nesting, duplicate keys and types: refused at the decoder, on both ingresses, each in its own shape."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ingress.anthropic import decode_count_tokens, decode_messages
from proxy.ingress.openai import decode_chat
from proxy.ingress.structure import MAX_DEPTH, BadStructure, duplicate_top_level_key, loads_object, nesting_depth
from proxy.errors import ProxyError

from .harness import make_settings, running_mock, running_weir

# ------------------------------------------------------------------ pure

# Strings full of the bytes a structural scan could trip on.
tricky_text = st.text(alphabet='ab[]{}":,\\ \n\u00e9', max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(tricky_text, children, max_size=3),
    max_leaves=25,
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=150, deadline=None)
@given(json_values, st.sampled_from([None, 1, 2]))
def test_nesting_depth_matches_a_json_reader(value: object, indent: int | None) -> None:
    raw = json.dumps(value, indent=indent, ensure_ascii=indent == 2).encode()
    assert nesting_depth(raw) == _depth(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["model", "stream", "a\"b", "é", "x\\y", "m"]), json_values), max_size=6), st.sampled_from(["", " ", "\n  "]))
def test_duplicate_key_found_exactly_when_a_json_reader_sees_one(pairs: list, ws: str) -> None:
    # Build the object by hand, so keys may repeat and spacing varies.
    # Compact bodies spell keys in literal UTF-8, as JSON.stringify does: the
    # length shortcut of duplicate_in decides those, the walk the others.
    body = ("{" + ws + ("," + ws).join(f"{json.dumps(k, ensure_ascii=bool(ws))}{ws}:{ws}{json.dumps(v)}" for k, v in pairs) + ws + "}").encode()
    keys = [k for k, _ in pairs]
    repeated = {k for k in keys if keys.count(k) > 1}
    found = duplicate_top_level_key(body)
    if repeated:
        assert found in repeated
    else:
        assert found is None


def _refused(decode, body: bytes, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProxyError) as err:
        decode(body)
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    assert words in err.value.message, err.value.message


BASE = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]'
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]'


@pytest.mark.parametrize("decode,base", [(decode_messages, BASE), (decode_count_tokens, BASE), (decode_chat, CHAT)])
def test_nested_past_msgspecs_guard_is_400_not_a_recursion_error(decode, base: bytes) -> None:  # type: ignore[no-untyped-def]
    _refused(decode, base + b',"metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply")


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 900, 5_000, 100_000])
def test_whole_body_readers_refuse_past_max_depth(depth: int) -> None:
    body = BASE + b',"metadata":' + b"[" * depth + b"]" * depth + b"}"
    if depth + 1 > MAX_DEPTH:  # the body object is a level too
        with pytest.raises(BadStructure, match="nested deeper"):
            loads_object(body)
    else:
        assert loads_object(body)["model"] == "m"


@pytest.mark.parametrize("decode,base", [(decode_messages, BASE), (decode_count_tokens, BASE), (decode_chat, CHAT)])
def test_duplicate_model_is_400(decode, base: bytes) -> None:  # type: ignore[no-untyped-def]
    _refused(decode, b'{"model":"cheap",' + base[1:] + b"}", "'model' more than once")


def test_chat_shapes_only_openai_targets_know_still_decode() -> None:
    # Kinds of tool the translator has no word for are its to refuse (a
    # TranslationError, 400), not the decoder's: an OpenAI target takes them.
    decode_chat(
        b'{"model":"m","messages":[{"role":"assistant","tool_calls":[{"type":"custom","custom":{"name":"x","input":"y"}}]}],'
        b'"tools":[{"type":"custom","custom":{"name":"x"}}],"tool_choice":{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[]}}}'
    )


@pytest.mark.parametrize(
    "field",
    [
        b'"temperature":[1]',
        b'"tools":true',
        b'"tools":[{"type":"function","function":{"name":1}}]',
        b'"tool_choice":5',
        b'"stop":[1]',
        b'"max_tokens":"9"',
        b'"stream":"yes"',
        b'"stream_options":[]',
        b'"messages":[{"role":"user","content":[{"type":"text","text":1}]}]',
        b'"messages":[{"role":"user","content":7}]',
        b'"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":3}}]}]',
    ],
)
def test_chat_wrong_types_are_400_naming_the_field(field: bytes) -> None:
    body = b'{"model":"m",' + field + (b"" if b'"messages"' in field else b',"messages":[{"role":"user","content":"hi"}]') + b"}"
    with pytest.raises(ProxyError) as err:
        decode_chat(body)
    assert err.value.status == 400 and "$." in err.value.message


# ----------------------------------------------------------- over sockets

AUTH = {"client_keys": [{"tenant": "t", "key": "sk-client"}]}


async def _weir(fn, kind: str = "anthropic") -> None:  # type: ignore[no-untyped-def]
    async with running_mock() as (mock, url):
        up = {"name": "up", "url": url if kind == "anthropic" else url + "/v1", "kind": kind, "api_keys": ["sk-up"]}
        if kind == "openai":
            up["model"] = "gpt-mock"
        async with running_weir(make_settings(None, upstreams=[up], auth=AUTH)) as weir:
            async with httpx.AsyncClient(base_url=weir.url, timeout=10) as client:
                await fn(client, mock)


def _anthropic_400(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


async def test_messages_ingress_refuses_deep_and_duplicate_bodies_in_anthropic_shape() -> None:
    async def check(client: httpx.AsyncClient, mock) -> None:  # type: ignore[no-untyped-def]
        h = {"x-api-key": "sk-client", "content-type": "application/json"}
        deep = BASE + b',"metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        _anthropic_400(await client.post("/v1/messages", content=deep, headers=h))
        _anthropic_400(await client.post("/v1/messages/count_tokens", content=deep, headers=h))
        dup = b'{"model":"claude-haiku-4-5",' + BASE[1:] + b"}"
        r = await client.post("/v1/messages", content=dup, headers=h)
        _anthropic_400(r)
        assert "'model' more than once" in r.json()["error"]["message"]
        assert list(mock.requests) == []

    await _weir(check)


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_chat_ingress_answers_every_error_in_openai_shape(kind: str) -> None:
    async def check(client: httpx.AsyncClient, mock) -> None:  # type: ignore[no-untyped-def]
        h = {"authorization": "Bearer sk-client", "content-type": "application/json"}
        for field in (b'"temperature":[1]', b'"tools":true', b'"messages":[{"role":"user","content":[{"type":"text","text":1}]}]'):
            body = b'{"model":"m",' + field + (b"" if b'"messages"' in field else b',"messages":[{"role":"user","content":"hi"}]') + b"}"
            err = _openai_error(await client.post("/v1/chat/completions", content=body, headers=h), 400)
            assert err["type"] == "invalid_request_error" and "$." in err["message"]
        deep = CHAT + b',"user":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        _openai_error(await client.post("/v1/chat/completions", content=deep, headers=h), 400)
        if kind == "anthropic":  # translated: read whole, so MAX_DEPTH applies
            deepish = CHAT + b',"metadata":' + b"[" * 200 + b"]" * 200 + b"}"
            err = _openai_error(await client.post("/v1/chat/completions", content=deepish, headers=h), 400)
            assert "nested deeper" in err["message"]
        dup = b'{"model":"other",' + CHAT[1:] + b"}"
        _openai_error(await client.post("/v1/chat/completions", content=dup, headers=h), 400)
        _openai_error(await client.post("/v1/chat/completions", content=CHAT + b"}", headers={"authorization": "Bearer wrong"}), 401)
        _openai_error(await client.get("/v1/chat/completions", headers=h), 405)
        _openai_error(await client.post("/v1/chat/nothing", content=CHAT + b"}", headers=h), 404)
        assert list(mock.requests) == []
        # And a good request still goes through.
        ok = await client.post("/v1/chat/completions", content=CHAT + b"}", headers=h)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"

    await _weir(check, kind)
