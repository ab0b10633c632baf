"""The envelope decoder is the first code that touches untrusted bytes: fuzz it."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ingress.anthropic import decode_count_tokens, decode_messages
from proxy.errors import ProxyError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.text(max_size=30),
        "max_tokens": json_values | st.integers(min_value=-5, max_value=200000),
        "messages": json_values | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=10)}), max_size=3),
        "stream": json_values,
        "temperature": json_values,
        "metadata": json_values,
    },
)


def _decodes_or_400(decode, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    try:
        decode(raw)
    except ProxyError as err:
        assert err.status == 400 and err.type == "invalid_request_error"
        assert err.message
        doc = msgspec.json.decode(err.body())
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_400(raw: bytes) -> None:
    _decodes_or_400(decode_messages, raw)
    _decodes_or_400(decode_count_tokens, raw)


@settings(max_examples=400, deadline=None)
@given(envelope_like)
def test_structured_garbage_never_raises_anything_but_400(doc: dict) -> None:
    raw = msgspec.json.encode(doc)
    _decodes_or_400(decode_messages, raw)
    _decodes_or_400(decode_count_tokens, raw)


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.integers(min_value=1, max_value=128000),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=40)}), min_size=1, max_size=4),
    st.booleans(),
)
def test_valid_envelopes_decode_to_what_was_sent(model: str, max_tokens: int, messages: list, stream: bool) -> None:
    raw = msgspec.json.encode({"model": model, "max_tokens": max_tokens, "messages": messages, "stream": stream, "unknown": {"x": 1}})
    env = decode_messages(raw)
    assert (env.model, env.max_tokens, env.stream, len(env.messages)) == (model, max_tokens, stream, len(messages))
    # The untouched messages are still the client's bytes.
    assert [msgspec.json.decode(bytes(m)) for m in env.messages] == messages


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_mutated_valid_body_never_raises_anything_but_400(noise: bytes) -> None:
    base = b'{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}'
    cut = len(noise) % len(base)
    _decodes_or_400(decode_messages, base[:cut] + noise + base[cut:])
