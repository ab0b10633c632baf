"""Cache keys and the policy helpers: same question → same key, anything
that could change the answer → a different key."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.entry import CorruptEntry, Entry, decode_entry, encode_entry, size
from cache.keys import cache_key, tenant_tag
from cache.policy import CacheControl, is_cacheable_request, parse_cache_control

REQUEST = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "temperature": 0,
    "system": [{"type": "text", "text": "You are terse."}],
    "messages": [{"role": "user", "content": "hello"}],
    "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
}


def key(body: bytes, *, tenant="acme", route="/v1/messages", version="2023-06-01", beta="") -> str:
    return cache_key(tenant=tenant, route=route, anthropic_version=version, anthropic_beta=beta, body=body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=6)


def _shuffled_dumps(obj, rnd, indent) -> str:
    """JSON with dict keys in a random order at every depth."""
    def shuffle(o):
        if isinstance(o, dict):
            items = list(o.items())
            rnd.shuffle(items)
            return {k: shuffle(v) for k, v in items}
        if isinstance(o, list):
            return [shuffle(v) for v in o]
        return o
    return json.dumps(shuffle(obj), indent=indent)


@settings(max_examples=150, deadline=None)
@given(body=bodies, rnd=st.randoms(use_true_random=False), indent=st.sampled_from([None, 1, 4]))
def test_key_ignores_key_order_and_whitespace(body, rnd, indent):
    assert key(json.dumps(body).encode()) == key(_shuffled_dumps(body, rnd, indent).encode())


@settings(max_examples=100, deadline=None)
@given(body=bodies, field=st.text(min_size=1, max_size=8), value=json_values)
def test_changing_any_semantic_field_changes_the_key(body, field, value):
    if field in ("stream", "metadata", "user") or body.get(field, object()) == value:
        return
    changed = {**body, field: value}
    assert key(json.dumps(body).encode()) != key(json.dumps(changed).encode())


@settings(max_examples=50, deadline=None)
@given(a=st.text(max_size=20), b=st.text(max_size=20))
def test_different_tenants_get_different_keys_and_tags(a, b):
    if a == b:
        return
    body = json.dumps(REQUEST).encode()
    assert key(body, tenant=a) != key(body, tenant=b)
    assert tenant_tag(a) != tenant_tag(b)
    assert key(body, tenant=a).startswith(tenant_tag(a) + ":")


def test_stream_and_metadata_do_not_split_entries():
    plain = json.dumps(REQUEST).encode()
    streamed = json.dumps({**REQUEST, "stream": True, "metadata": {"user_id": "session-42"}}).encode()
    assert key(plain) == key(streamed)


def test_route_version_and_betas_are_in_the_key_and_betas_are_normalized():
    body = json.dumps(REQUEST).encode()
    base = key(body, beta="a-2025, b-2024")
    assert key(body, beta=" b-2024,a-2025,,a-2025 ") == base
    assert key(body, beta="a-2025") != base
    assert key(body, beta="a-2025, b-2024", route="/v1/chat/completions") != base
    assert key(body, beta="a-2025, b-2024", version="2024-01-01") != base


def test_semantic_differences_change_the_key():
    variants = [
        {**REQUEST, "temperature": 0.5},
        {**REQUEST, "messages": [{"role": "user", "content": "hello!"}]},
        {**REQUEST, "tools": list(reversed(REQUEST["tools"] + [{"name": "x", "input_schema": {}}]))},
        {**REQUEST, "stream_options": {"include_usage": True}},
    ]
    keys = {key(json.dumps(v).encode()) for v in variants} | {key(json.dumps(REQUEST).encode())}
    assert len(keys) == len(variants) + 1


def test_key_does_not_contain_the_raw_tenant():
    k = key(json.dumps(REQUEST).encode(), tenant="tenant-secret-name")
    assert "tenant-secret-name" not in k
    tag, digest = k.split(":")
    assert len(tag) == 16 and len(digest) == 64


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b"\"text\"", b"{'single': 1}"])
def test_malformed_bodies_raise_value_error(body):
    with pytest.raises(ValueError):
        key(body)


# -- the entry codec ---------------------------------------------------------

def test_entry_round_trips():
    entry = Entry(200, [("content-type", "text/event-stream"), ("request-id", "req_1")], None,
                  [b"event: ping\ndata: {}\n\n"], {"input_tokens": 3, "output_tokens": 7}, 1.7e9, 60.0, "m")
    blob = encode_entry(entry)
    assert decode_entry(blob) == entry
    assert size(entry) == len(blob)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_decoding_random_bytes_raises_only_corrupt_entry(data):
    try:
        decode_entry(data)
    except CorruptEntry:
        pass


@settings(max_examples=200, deadline=None)
@given(prefix_len=st.integers(0, 60), junk=st.binary(max_size=8))
def test_truncated_or_mangled_entries_raise_corrupt_entry(prefix_len, junk):
    blob = encode_entry(Entry(200, [("a", "b")], b"x" * 40, None, None, 1.0, 2.0))
    mangled = blob[:prefix_len] + junk
    if mangled == blob:
        return
    try:
        decode_entry(mangled)
    except CorruptEntry:
        pass


def test_valid_msgpack_of_the_wrong_shape_is_corrupt():
    with pytest.raises(CorruptEntry):
        decode_entry(msgspec.msgpack.encode({"status": 200}))


# -- policy ------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("", CacheControl()),
    ("no-cache", CacheControl(no_cache=True)),
    ("No-Store, max-age=60", CacheControl(no_store=True, max_age=60.0)),
    ('max-age="30"', CacheControl(max_age=30.0)),
    ("max-age=-5, private", CacheControl()),
    ("max-age=abc", CacheControl()),
    ("max-age=nan", CacheControl()),
])
def test_parse_cache_control(value, expected):
    assert parse_cache_control(value) == expected


@pytest.mark.parametrize("body, header, mode, expected", [
    ({"temperature": 0}, None, "deterministic", True),
    ({"temperature": 0.0}, None, "deterministic", True),
    ({"temperature": 0.7}, None, "deterministic", False),
    ({}, None, "deterministic", False),  # absent = Anthropic's default 1.0
    ({"temperature": False}, None, "deterministic", False),
    ({"temperature": 1}, "on", "deterministic", True),
    ({"temperature": 0}, "OFF", "deterministic", False),
    ({"temperature": 1}, None, "all", True),
    ({"temperature": 1}, "off", "all", False),
    ({"temperature": 0}, "on", "off", False),
])
def test_is_cacheable_request(body, header, mode, expected):
    assert is_cacheable_request(body, header, mode) is expected


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError):
        is_cacheable_request({}, None, "sometimes")
