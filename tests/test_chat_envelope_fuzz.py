"""The chat decoder is the OpenAI ingress's first reader of untrusted bytes: fuzz it, and what it lets through.

Whatever ``decode_chat`` accepts reaches the OpenAI → Anthropic translator;
the translator may refuse it (``TranslationError``, a 400), never crash on it.
"""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ingress.openai import decode_chat
from proxy.errors import ProxyError
from proxy.translate import TranslationError, openai_request_to_anthropic

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "refusal", "input_audio"]) | json_values},
    optional={"text": json_values | st.text(max_size=10), "image_url": json_values | st.just({"url": "data:image/png;base64,AAAA"}) | st.just("https://x/y.png"), "refusal": json_values},
)
call = st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": st.text(max_size=5) | json_values}, optional={"arguments": st.just('{"a":1}') | json_values})}, optional={"id": json_values, "type": json_values})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "nobody"]) | json_values},
    optional={
        "content": st.text(max_size=10) | st.lists(part, max_size=3) | json_values,
        "tool_calls": st.lists(call, max_size=2) | json_values,
        "tool_call_id": st.text(max_size=5) | json_values,
    },
)
tool = st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": st.text(max_size=5) | json_values}, optional={"description": json_values, "parameters": json_values})}, optional={"type": st.just("function") | json_values})
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=10) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "temperature": st.floats(0, 2) | json_values,
        "top_p": json_values,
        "max_tokens": st.integers(-2, 10_000) | json_values,
        "max_completion_tokens": st.integers(-2, 10_000) | json_values,
        "n": st.integers(0, 3) | json_values,
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=2) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}) | json_values,
        "tools": st.lists(tool, max_size=2) | json_values,
        "tool_choice": st.sampled_from(["auto", "required", "none", "bogus"]) | st.just({"type": "function", "function": {"name": "f"}}) | json_values,
        "parallel_tool_calls": st.booleans() | json_values,
        "reasoning_effort": st.sampled_from(["low", "medium", "high", "none"]) | json_values,
        "user": st.text(max_size=5) | json_values,
    },
)


def _only_400s(raw: bytes) -> None:
    try:
        decode_chat(raw)
    except ProxyError as err:
        assert err.status == 400 and err.type == "invalid_request_error" and err.message
        return
    try:
        openai_request_to_anthropic(json.loads(raw))
    except TranslationError:
        pass


@settings(max_examples=150, deadline=None)
@given(chat_like)
def test_structured_garbage_is_a_400_or_translates(doc: dict) -> None:
    _only_400s(msgspec.json.encode(doc))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_a_400(raw: bytes) -> None:
    _only_400s(raw)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=100))
def test_mutated_valid_body_is_a_400_or_translates(noise: bytes) -> None:
    base = b'{"model":"m","temperature":0.5,"tools":[{"type":"function","function":{"name":"f"}}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}'
    cut = len(noise) % len(base)
    _only_400s(base[:cut] + noise + base[cut:])
